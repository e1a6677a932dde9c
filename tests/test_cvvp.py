"""CVVP (tortoise_ggml.models.cvvp) against tortoise-tts 3.0.0's own class, small config, and api.py's use of it.

Tolerances (f32 weights): similarities within 1e-5 absolute + 1e-4 relative of the reference, as CLVP's.
"""
import numpy as np
import pytest

from tortoise_ggml.models.cvvp import CVVP

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-4, 1e-5

COMPONENTS = ["cvvp"]  # what the shared model_file fixture loads
REFERENCE = "cvvp"  # the component whose tortoise-tts model the shared reference fixture loads


@pytest.fixture(scope="module")
def cvvp(model_file):
    return CVVP(model_file)


def _inputs(n=3, n_frames=517, n_codes=120, seed=0):
    rng = np.random.default_rng(seed)
    mels = rng.standard_normal((n, 80, n_frames)).astype(np.float32)
    codes = rng.integers(0, 8192, (n, n_codes))
    codes[:, -3:] = (45, 45, 248)
    codes[0, 60:] = 83
    return mels, codes


@pytest.mark.parametrize("n_frames", [517, 30, 31])  # api.py's 132300-sample clips; odd lengths for the strides
def test_forward_matches_reference(cvvp, reference, n_frames):
    mels, codes = _inputs(n_frames=n_frames)
    with torch.no_grad():
        want = reference(torch.from_numpy(mels), torch.from_numpy(codes), return_loss=False).numpy()
    got = cvvp.forward(mels, codes)
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_score_is_api_accumulation(cvvp, reference):
    """api.py: for each clip, cvvp(auto_conds[:, cl].repeat(B, 1, 1), batch), summed in clip order and divided by
    the number of clips."""
    mels, _ = _inputs(n=2)
    _, codes = _inputs(n=5, seed=1)
    auto_conds = mels[None]                               # (1, n_clips, 80, T), as get_conditioning_latents gives
    with torch.no_grad():
        acc = 0
        for cl in range(auto_conds.shape[1]):
            cond = torch.from_numpy(auto_conds[:, cl]).repeat(codes.shape[0], 1, 1)
            acc = acc + reference(cond, torch.from_numpy(codes), return_loss=False)
        want = (acc / auto_conds.shape[1]).numpy()
    np.testing.assert_allclose(cvvp.score(auto_conds, codes), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(cvvp.forward(mels[:1], codes), cvvp.similarities(mels, codes)[:, 0], rtol=1e-6)


def test_batches_agree(model_file):
    mels, codes = _inputs(n=1)
    _, many = _inputs(n=5, seed=2)
    whole = CVVP(model_file).score(mels, many)
    chunked = CVVP(model_file, max_batch=2).score(mels, many)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)


def test_bad_inputs_are_named(cvvp):
    mels, codes = _inputs(n=2)
    with pytest.raises(ValueError, match="mel_cond"):
        cvvp.forward(mels[:, :40], codes)
    with pytest.raises(ValueError, match="outside"):
        cvvp.forward(mels, codes + 8192)
    with pytest.raises(TypeError, match="integer"):
        cvvp.forward(mels, codes.astype(np.float32))
    with pytest.raises(ValueError, match="rows"):
        cvvp.forward(mels, np.concatenate([codes, codes]))


# -- api.py: cvvp_amount ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tts(small_gguf):
    from tortoise_ggml.api import TextToSpeech
    return TextToSpeech(str(small_gguf), threads=2, autoregressive_batch_size=2)


@pytest.mark.parametrize("amount", [0.0, 0.3, 1.0])
def test_candidate_scores_mix_as_tortoise(tts, oracle, small_ckpt_dir, reference, amount):
    """tortoise/api.py: per batch, clvp_out unless amount == 1; cvvp = the mean over clips; amount == 1: cvvp alone,
    else cvvp * amount + clvp_out * (1 - amount)."""
    clvp = oracle.load("clvp", "small", str(small_ckpt_dir))
    rng = np.random.default_rng(3)
    text = oracle.text_tokens_for().numpy()
    samples = rng.integers(0, 8192, (5, 80))
    samples[:, -3:] = (45, 45, 248)
    auto_conds = rng.standard_normal((1, 2, 80, 200)).astype(np.float32)
    want = []
    with torch.no_grad():
        for batch in torch.split(torch.from_numpy(samples), 2):
            if amount != 1:
                clvp_out = clvp(torch.from_numpy(text).repeat(batch.shape[0], 1), batch, return_loss=False)
            if amount > 0:
                acc = 0
                for cl in range(auto_conds.shape[1]):
                    acc = acc + reference(torch.from_numpy(auto_conds[:, cl]).repeat(batch.shape[0], 1, 1), batch,
                                          return_loss=False)
                cvvp = acc / auto_conds.shape[1]
                want.append(cvvp if amount == 1 else cvvp * amount + clvp_out * (1 - amount))
            else:
                want.append(clvp_out)
    want = torch.cat(want).numpy()
    got = tts.score_candidates(text, samples, batch_size=2, cvvp_amount=amount,
                               auto_conds=auto_conds if amount else None)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert np.argmax(got) == np.argmax(want)


def test_tts_with_cvvp(tts):
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(30000).astype(np.float32) for _ in range(2)]
    kw = dict(num_autoregressive_samples=2, max_mel_tokens=10, diffusion_iterations=2, verbose=False, seed=0)
    wav = tts.tts("Hi.", voice_samples=clips, cvvp_amount=0.5, **kw)
    assert wav.ndim == 2 and wav.shape[1] > 0 and np.isfinite(wav).all()
    np.testing.assert_array_equal(wav, tts.tts("Hi.", voice_samples=clips, cvvp_amount=0.5, **kw))
    latents = tts.get_conditioning_latents(clips, seed=0)
    with pytest.raises(ValueError, match="cvvp_amount > 0 needs voice_samples"):
        tts.tts("Hi.", conditioning_latents=latents, cvvp_amount=0.5, **kw)
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="cvvp_amount must be a number in"):
            tts.tts("Hi.", voice_samples=clips, cvvp_amount=bad, **kw)


def test_cli_cvvp_amount(small_gguf, tmp_path, capsys):
    import soundfile

    from tortoise_ggml.generate import main as generate
    voice = tmp_path / "me"
    voice.mkdir()
    rng = np.random.default_rng(1)
    soundfile.write(str(voice / "a.wav"), (0.1 * rng.standard_normal(30000)).astype(np.float32), 22050)
    common = ["--model", str(small_gguf), "--text", "Hi.", "--num-autoregressive-samples", "2",
              "--diffusion-iterations", "2", "--max-mel-tokens", "10", "--seed", "1", "--threads", "2", "-q"]
    assert generate(common + ["--voice", str(voice), "--cvvp-amount", "0.5", "-o", str(tmp_path / "a.wav")]) == 0
    assert soundfile.info(str(tmp_path / "a.wav")).frames > 0
    assert generate(common + ["--cvvp-amount", "0.5", "-o", str(tmp_path / "b.wav")]) == 2
    assert "needs the voice's clips" in capsys.readouterr().err
