"""TextToSpeech and the CLI, end to end on the small random model."""
import numpy as np
import pytest
import soundfile

from tortoise_ggml.api import MissingComponent, TextToSpeech, trim_at_silence
from tortoise_ggml.generate import main as generate


@pytest.fixture(scope="module")
def tts(small_gguf):
    return TextToSpeech(str(small_gguf), device="cpu", threads=2, autoregressive_batch_size=2)


def test_conditioning_latents_match_reference(tts, oracle, small_ckpt_dir):
    import torch
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(100000).astype(np.float32) for _ in range(2)]   # short: no random crop
    auto, diff, auto_mels, diff_mels = tts.get_conditioning_latents(clips, return_mels=True)
    ar = oracle.load("autoregressive", "small", str(small_ckpt_dir))
    ref_auto, _ = oracle.ar_conditioning(ar, [torch.from_numpy(c) for c in clips])
    np.testing.assert_allclose(np.asarray(auto).reshape(ref_auto.shape), ref_auto.numpy(), atol=2e-4, rtol=1e-3)
    diffusion = oracle.load("diffusion", "small", str(small_ckpt_dir))
    with torch.no_grad():
        ref_diff = diffusion.get_conditioning(torch.from_numpy(np.asarray(diff_mels)))
    np.testing.assert_allclose(np.asarray(diff).reshape(ref_diff.shape), ref_diff.numpy(), atol=2e-4, rtol=1e-3)


def test_random_voice_is_seeded(tts):
    a1, d1 = tts.get_random_conditioning_latents(seed=3)
    a2, d2 = tts.get_random_conditioning_latents(seed=3)
    a3, _ = tts.get_random_conditioning_latents(seed=4)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(d1, d2)
    assert not np.array_equal(a1, a3)


def test_tts_end_to_end(tts):
    latents = tts.get_random_conditioning_latents(seed=0)
    wav, stats = tts.tts("Hi.", conditioning_latents=latents, num_autoregressive_samples=2, k=1,
                         max_mel_tokens=12, diffusion_iterations=2, verbose=False, seed=0, return_stats=True)
    assert wav.dtype == np.float32 and wav.ndim == 2 and wav.shape[0] == 1 and wav.shape[1] > 0
    assert np.abs(wav).max() <= 1.0 and np.isfinite(wav).all()
    assert set(stats) >= {"autoregressive_s", "clvp_s", "diffusion_s", "vocoder_s"}
    again = tts.tts("Hi.", conditioning_latents=latents, num_autoregressive_samples=2, k=1, max_mel_tokens=12,
                    diffusion_iterations=2, verbose=False, seed=0)
    np.testing.assert_array_equal(wav, again)


def test_tts_rejects_bad_arguments(tts):
    with pytest.raises(ValueError, match="preset"):
        tts.tts_with_preset("Hi.", preset="warp_speed")
    with pytest.raises(ValueError, match="too much text"):
        tts.tts("word " * 500, verbose=False)
    with pytest.raises(ValueError, match="max_mel_tokens"):
        tts.tts("Hi.", max_mel_tokens=10_000, verbose=False)


def test_missing_component_is_named(small_gguf):
    voc_only = TextToSpeech(str(small_gguf), threads=1, components=["vocoder"])
    with pytest.raises(MissingComponent, match="autoregressive"):
        voc_only.get_conditioning_latents([np.zeros(1000, np.float32)])
    wav = voc_only.vocoder(np.full((1, 100, 6), -5.0, np.float32), seed=0)
    assert wav.shape == (1, 6 * 256)


def test_trim_at_silence():
    codes = np.array([5, 83, 83, 83, 83, 83, 83, 83, 83, 83, 83, 7])
    assert trim_at_silence(codes) == 9         # the ninth calm token in a row (index 9) is cut
    assert trim_at_silence(np.array([1, 2, 3])) == 3


def test_cli_speaks_and_vocodes(small_gguf, tmp_path, capsys):
    out = tmp_path / "hi.wav"
    assert generate(["--model", str(small_gguf), "--text", "Hi.", "--preset", "ultra_fast",
                     "--num-autoregressive-samples", "2", "--diffusion-iterations", "2", "--max-mel-tokens", "16",
                     "--seed", "1",
                     "-o", str(out), "-q"]) == 0
    wav, sr = soundfile.read(out)
    assert sr == 24000 and wav.ndim == 1 and len(wav) > 0
    mel = np.full((100, 8), -6.0, np.float32)
    np.save(tmp_path / "mel.npy", mel)
    assert generate(["--model", str(small_gguf), "--mel", str(tmp_path / "mel.npy"), "-o",
                     str(tmp_path / "v.wav"), "-q"]) == 0
    assert soundfile.info(str(tmp_path / "v.wav")).frames == 8 * 256


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert generate(["--model", str(tmp_path / "nope.gguf"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "nope.gguf" in err and "Traceback" not in err


def test_one_tts_shared_by_two_threads_gives_the_serial_results(tts):
    """Two threads speaking at once (this crashed in ggml_get_rows before the lock) get what serial calls give."""
    import threading

    def speak(seed):
        latents = tts.get_random_conditioning_latents(seed=seed)
        return tts.tts("Hi.", conditioning_latents=latents, num_autoregressive_samples=2, max_mel_tokens=10,
                       diffusion_iterations=2, verbose=False, seed=seed)

    serial = {seed: speak(seed) for seed in (1, 2)}
    got, errors = {}, []

    def run(seed):
        try:
            got[seed] = speak(seed)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in (1, 2):
        np.testing.assert_array_equal(got[seed], serial[seed])
