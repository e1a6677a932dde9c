"""Voices (tortoise_ggml.voices): folders of clips, stored names, latents files, "a&b" mixes as tortoise's
load_voices; convert --voices computing clip voices' latents; python -m tortoise_ggml.get_conditioning_latents."""
import os
import sys

import numpy as np
import pytest
import soundfile

from tortoise_ggml import voices as vc
from tortoise_ggml.generate import main as generate
from tortoise_ggml.get_conditioning_latents import main as get_latents


def _clip(path, seed, seconds=1.5, rate=22050):
    rng = np.random.default_rng(seed)
    soundfile.write(str(path), (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate)


@pytest.fixture(scope="module")
def tts(small_gguf):
    from tortoise_ggml.api import TextToSpeech
    return TextToSpeech(str(small_gguf), threads=2, autoregressive_batch_size=2)


@pytest.fixture
def voices_dir(tmp_path):
    """alice, bob: clip folders; carol, dave: latents (.npz, tortoise .pth); empty: nothing."""
    d = tmp_path / "voices"
    for name, seeds in (("alice", (1, 2)), ("bob", (3,))):
        (d / name).mkdir(parents=True)
        for s in seeds:
            _clip(d / name / f"{s}.wav", s)
    rng = np.random.default_rng(7)
    (d / "carol").mkdir()
    vc.save_latents(d / "carol" / "carol.npz", (rng.standard_normal((1, 128)).astype(np.float32),
                                                rng.standard_normal((1, 256)).astype(np.float32)))
    (d / "dave").mkdir()
    vc.save_latents(d / "dave" / "dave.pth", (rng.standard_normal((1, 128)).astype(np.float32),
                                              rng.standard_normal((1, 256)).astype(np.float32)))
    (d / "empty").mkdir()
    return d


def test_latents_files_round_trip(tmp_path):
    pytest.importorskip("torch")
    lat = (np.arange(4, dtype=np.float32).reshape(1, 4), np.ones((1, 6), np.float32))
    for name in ("v.npz", "v.pth"):
        vc.save_latents(tmp_path / name, lat)
        got = vc.load_latents(tmp_path / name)
        np.testing.assert_array_equal(got[0], lat[0])
        np.testing.assert_array_equal(got[1], lat[1])
    assert sorted(os.listdir(tmp_path)) == ["v.npz", "v.pth"]        # no temporary files left
    np.savez(tmp_path / "bad.npz", autoregressive=lat[0])
    with pytest.raises(vc.VoiceError, match="no diffusion"):
        vc.load_latents(tmp_path / "bad.npz")
    with pytest.raises(vc.VoiceError, match="end in .npz"):
        vc.save_latents(tmp_path / "v.txt", lat)


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "v.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch -> ImportError
    with pytest.raises(vc.VoiceError, match="pip install torch.*npz"):
        vc.load_latents(tmp_path / "v.pth")


def test_find_voice_by_path_dir_and_name(voices_dir, tts):
    assert vc.find_voice("random").is_random
    alice = vc.find_voice(str(voices_dir / "alice"))
    assert alice.source == "folder" and [os.path.basename(c) for c in alice.clips] == ["1.wav", "2.wav"]
    assert vc.find_voice("alice", tts, [str(voices_dir)]).clips == alice.clips
    carol = vc.find_voice("carol", None, [str(voices_dir)])
    assert carol.latents[0].shape == (1, 128) and not carol.clips
    assert vc.find_voice(str(voices_dir / "carol" / "carol.npz")).latents[1].shape == (1, 256)
    assert vc.find_voice(str(voices_dir / "bob" / "3.wav")).clips == [str(voices_dir / "bob" / "3.wav")]


def test_voice_errors_say_what_exists(voices_dir, tts, tmp_path):
    with pytest.raises(vc.VoiceError, match=r"unknown voice 'zed'.*Known voices: random, alice, bob, carol"):
        vc.find_voice("zed", tts, [str(voices_dir)])
    with pytest.raises(vc.VoiceError, match="holds no audio clips"):
        vc.find_voice("empty", tts, [str(voices_dir)])
    (voices_dir / "carol" / "again.npz").write_bytes((voices_dir / "carol" / "carol.npz").read_bytes())
    with pytest.raises(vc.VoiceError, match="several latents files"):
        vc.find_voice("carol", tts, [str(voices_dir)])
    with pytest.raises(vc.VoiceError, match="mixes clip voices"):
        vc.load_voices("alice&dave", tts, [str(voices_dir)])
    wrong = tmp_path / "wide.npz"
    vc.save_latents(wrong, (np.zeros((1, 1024), np.float32), np.zeros((1, 2048), np.float32)))
    with pytest.raises(vc.VoiceError, match="1024 wide, this model's is 128"):
        vc.load_voices(str(wrong), tts)


def test_mixes_follow_tortoise_load_voices(voices_dir, tts, oracle):
    """tortoise.utils.audio.load_voices: latent voices averaged (stack, mean), clip voices' clips pooled."""
    import torch
    from tortoise.utils.audio import load_voices as ref_load_voices
    dirs = [str(voices_dir)]
    # tortoise reads one .pth alone as latents: give carol's latents its format too
    carol = vc.load_latents(voices_dir / "carol" / "carol.npz")
    torch.save(tuple(torch.from_numpy(a) for a in carol), voices_dir / "carol" / "carol.pth")
    os.remove(voices_dir / "carol" / "carol.npz")
    ref_clips, ref_latents = ref_load_voices(["carol", "dave"], dirs)
    clips, latents = vc.load_voices("carol&dave", tts, dirs)
    assert clips is None and ref_clips is None
    for ours, ref in zip(latents, ref_latents):
        assert ours.shape == tuple(ref.shape)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-7)
    ref_clips, ref_latents = ref_load_voices(["alice", "bob"], dirs)
    clips, latents = vc.load_voices("alice&bob", tts, dirs)
    assert latents is None and ref_latents is None and len(clips) == len(ref_clips) == 3
    for ours, ref in zip(sorted(clips, key=lambda c: c.sum()), sorted(ref_clips, key=lambda c: float(c.sum()))):
        np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)
    assert vc.load_voices("random&alice", tts, dirs) == (None, None)    # tortoise: a random voice


def test_conditioning_latents_cli_and_api(voices_dir, tts, tmp_path, capsys):
    out = tmp_path / "alice.npz"
    assert get_latents(["--model", str(tts.model_file.path), "--voice", str(voices_dir / "alice"), "-o", str(out),
                        "--threads", "2", "-q"]) == 0
    from tortoise_ggml.utils.audio import load_audio
    want = tts.get_conditioning_latents([load_audio(voices_dir / "alice" / f, 22050) for f in ("1.wav", "2.wav")],
                                        seed=vc.CROP_SEED)
    got = vc.load_latents(out)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert get_latents(["--model", str(tts.model_file.path), "--voice", "alice,bob", "--voices-dir", str(voices_dir),
                        "--output_path", str(tmp_path / "lat"), "--format", "pth", "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "lat")) == ["alice.pth", "bob.pth"]
    np.testing.assert_array_equal(vc.load_latents(tmp_path / "lat" / "alice.pth")[0], want[0])
    # a latents file is a voice everywhere, the API's conditioning_latents included
    wav = tts.tts("Hi.", conditioning_latents=str(out), num_autoregressive_samples=1, max_mel_tokens=10,
                  diffusion_iterations=2, verbose=False, seed=0)
    again = tts.tts("Hi.", conditioning_latents=want, num_autoregressive_samples=1, max_mel_tokens=10,
                    diffusion_iterations=2, verbose=False, seed=0)
    np.testing.assert_array_equal(wav, again)
    capsys.readouterr()
    assert get_latents(["--model", str(tts.model_file.path), "--voice", "nobody", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown voice 'nobody'") and err.count("\n") == 1


def test_generate_takes_voices_dir_and_mixes(voices_dir, small_gguf, tmp_path, capsys):
    common = ["--model", str(small_gguf), "--text", "Hi.", "--num-autoregressive-samples", "1",
              "--diffusion-iterations", "2", "--max-mel-tokens", "10", "--seed", "1", "--threads", "2", "-q"]
    assert generate(common + ["--voices-dir", str(voices_dir), "--voice", "carol&dave",
                              "-o", str(tmp_path / "mix.wav")]) == 0
    assert soundfile.info(str(tmp_path / "mix.wav")).frames > 0
    assert generate(common + ["--voice", str(voices_dir / "carol" / "carol.npz"), "-o", str(tmp_path / "c.wav")]) == 0
    assert generate(common + ["--voices-dir", str(voices_dir), "--voice", "empty", "-o", str(tmp_path / "e.wav")]) == 2
    assert "holds no audio clips" in capsys.readouterr().err
    assert not (tmp_path / "e.wav").exists()


def test_convert_computes_clip_voices(small_ckpt_dir, voices_dir, tts, tmp_path):
    """convert --voices: clip folders get latents from tortoise-ggml's own conditioning path (a temporary f32 GGUF
    of the checkpoints), latents folders are stored as saved."""
    from tortoise_ggml.convert import convert
    from tortoise_ggml.utils.audio import load_audio
    from tortoise_ggml.weights.model_file import ModelFile
    os.rmdir(voices_dir / "empty")
    out = convert(small_ckpt_dir, tmp_path / "v.gguf", components="autoregressive,rlg_auto", voices_dir=voices_dir)
    assert sorted(os.listdir(tmp_path)) == ["v.gguf", "voices"]      # the temporary model file is gone
    with ModelFile(out, tts.backend, components=[]) as mf:
        assert mf.voices == ["alice", "bob", "carol", "dave"]
        want = tts.get_conditioning_latents([load_audio(voices_dir / "alice" / f, 22050) for f in ("1.wav", "2.wav")],
                                            seed=vc.CROP_SEED)
        alice = mf.voice("alice")
        np.testing.assert_allclose(alice["autoregressive"], want[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(alice["diffusion"], want[1], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(mf.voice("carol")["diffusion"],
                                      vc.load_latents(voices_dir / "carol" / "carol.npz")[1])
        # the stored names are voices for the API and CLIs; a --voices-dir folder of the same name wins
        stored = vc.find_voice("alice", mf)
        assert stored.source == "model file"
        assert vc.find_voice("alice", mf, [str(voices_dir)]).source == "folder"
