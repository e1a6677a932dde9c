"""Audio front-end against the reference: tortoise-tts 3.0.0's TorchMelSpectrogram / format_conditioning /
wav_to_univnet_mel / load_audio, running torchaudio 2.11.0's own MelSpectrogram and resample code.

Tolerances: ours runs the STFTs in float64, the reference in float32, so log-mels agree to float32 rounding
(measured max abs error ~5e-6 on mel_norms-scaled log-mels of magnitude ~7, ~2e-6 on univnet log-mels);
resampling agrees to ~2e-7 (float32 kernels equal to 1 ulp, float32 products summed in another order).
"""
import math

import numpy as np
import pytest

from tortoise_ggml.utils import audio

MEL_ATOL = 3e-5
RESAMPLE_ATOL = 1e-6


def _voice_like(n, sr=22050, seed=0):
    """A tone with noise, a stretch of digital silence and a very quiet stretch: exercises the 1e-5 clamp."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / sr
    w = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t) + 0.05 * g.standard_normal(n)
    w[n // 5:n // 3] = 0
    w[n // 3:n // 3 + 2000] *= 1e-4
    return w.astype(np.float32)


@pytest.fixture(scope="module")
def torch(oracle):
    import torch
    return torch


@pytest.fixture(scope="module")
def mel_norms(oracle):
    from tortoise.models.arch_util import TorchMelSpectrogram
    return TorchMelSpectrogram().mel_norms.numpy()


def test_torch_mel_spectrogram_matches(torch, mel_norms):
    from tortoise.models.arch_util import TorchMelSpectrogram
    wavs = np.stack([_voice_like(50000, seed=1), _voice_like(50000, seed=2)])
    ref = TorchMelSpectrogram()(torch.from_numpy(wavs)).numpy()
    got = audio.TorchMelSpectrogram(mel_norms=mel_norms)(wavs)
    assert got.shape == ref.shape == (2, 80, 1 + 50000 // 256) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=MEL_ATOL)
    # (B, 1, N) is squeezed like the reference does; no mel_norms means no division
    np.testing.assert_array_equal(audio.TorchMelSpectrogram(mel_norms=mel_norms)(wavs[:, None]), got)
    raw = TorchMelSpectrogram(mel_norm_file=None)(torch.from_numpy(wavs)).numpy()
    np.testing.assert_allclose(audio.TorchMelSpectrogram()(wavs), raw, rtol=0, atol=MEL_ATOL)
    # torchaudio's normalized=True (window energy) and a window shorter than the FFT, centred in it
    ref = TorchMelSpectrogram(win_length=800, normalize=True, mel_norm_file=None)(torch.from_numpy(wavs)).numpy()
    got = audio.TorchMelSpectrogram(win_length=800, normalize=True)(wavs)
    np.testing.assert_allclose(got, ref, rtol=0, atol=MEL_ATOL)


@pytest.mark.parametrize("n", [100000, 132300, 150000])
def test_format_conditioning_matches(torch, mel_norms, monkeypatch, n):
    """Short clips are padded, long ones cropped: the reference's random.randint is forced to the offset that
    our seeded numpy Generator draws."""
    import tortoise.api as api
    clip = _voice_like(n, seed=n)
    gap = n - 132300
    start = int(np.random.default_rng(5).integers(0, gap, endpoint=True)) if gap > 0 else None

    def randint(a, b):
        assert (a, b) == (0, gap)
        return start
    monkeypatch.setattr(api.random, "randint", randint)
    ref = api.format_conditioning(torch.from_numpy(clip)[None], device="cpu").numpy()
    got = audio.format_conditioning(clip[None], mel_norms, rng=np.random.default_rng(5))
    assert ref.shape == (1, 80, 517) and got.shape == (80, 517)
    np.testing.assert_allclose(got, ref[0], rtol=0, atol=MEL_ATOL)
    np.testing.assert_array_equal(audio.format_conditioning(clip, mel_norms, rng=5), got)  # (N,) and a seed
    if gap > 0:
        direct = audio.TorchMelSpectrogram(mel_norms=mel_norms)(clip[None, start:start + 132300])[0]
        np.testing.assert_array_equal(got, direct)


def test_format_conditioning_crop_is_random_and_seedable(mel_norms):
    clip = _voice_like(140000, seed=3)
    a = audio.format_conditioning(clip, mel_norms, rng=11)
    np.testing.assert_array_equal(a, audio.format_conditioning(clip, mel_norms, rng=np.random.default_rng(11)))
    assert any(not np.array_equal(a, audio.format_conditioning(clip, mel_norms, rng=s)) for s in (1, 2, 3))


@pytest.mark.parametrize("src,dst", [(22050, 24000), (44100, 22050), (24000, 22050), (16000, 22050),
                                     (48000, 22050), (8000, 24000)])
def test_resample_matches(torch, src, dst):
    from torchaudio.functional import resample
    g = np.random.default_rng(src + dst)
    wav = (0.3 * g.standard_normal((2, 12345))).astype(np.float32)
    ref = resample(torch.from_numpy(wav), src, dst).numpy()
    got = audio.resample(wav, src, dst)
    assert got.shape == ref.shape == (2, math.ceil(12345 * dst / src)) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=RESAMPLE_ATOL)


def test_resample_float64_and_options(torch):
    from torchaudio.functional import resample
    wav = np.random.default_rng(0).standard_normal(5000)
    ref = resample(torch.from_numpy(wav), 22050, 24000).numpy()
    got = audio.resample(wav, 22050, 24000)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    ref = resample(torch.from_numpy(wav.astype(np.float32)), 24000, 16000, lowpass_filter_width=4, rolloff=0.9,
                   resampling_method="sinc_interp_kaiser", beta=8.0).numpy()
    got = audio.resample(wav.astype(np.float32), 24000, 16000, lowpass_filter_width=4, rolloff=0.9,
                         resampling_method="sinc_interp_kaiser", beta=8.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=RESAMPLE_ATOL)
    assert audio.resample(wav, 22050, 22050) is wav


def test_univnet_mel_matches(torch, monkeypatch):
    from tortoise.api import pad_or_truncate
    from tortoise.utils import stft
    # the reference STFT's constructor pseudo-inverts a 1026x1024 basis for the inverse transform (seconds on
    # 2 cores); the forward transform never reads it
    monkeypatch.setattr(stft.np.linalg, "pinv", lambda a: np.zeros(a.shape[::-1]))
    from torchaudio.functional import resample
    from tortoise.utils.audio import wav_to_univnet_mel
    clips = np.stack([_voice_like(60000, seed=4), _voice_like(60000, seed=5)])
    # the diffusion conditioning path of get_conditioning_latents: 22.05 -> 24 kHz, pad to 102400, mels
    ref_wav = pad_or_truncate(resample(torch.from_numpy(clips), 22050, 24000), 102400)
    ref = wav_to_univnet_mel(ref_wav, do_normalization=False, device="cpu").numpy()
    got = audio.wav_to_univnet_mel(audio.pad_or_truncate(audio.resample(clips, 22050, 24000), 102400))
    assert got.shape == ref.shape == (2, 100, 401) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=MEL_ATOL)
    from tortoise.utils.audio import normalize_tacotron_mel
    np.testing.assert_allclose(audio.wav_to_univnet_mel(ref_wav.numpy(), do_normalization=True),
                               normalize_tacotron_mel(torch.from_numpy(ref)).numpy(), rtol=0, atol=MEL_ATOL)
    # the STFT itself, phase included (compared where the phase is well defined)
    mag, phase = stft.STFT(1024, 256, 1024).transform(ref_wav[:1])
    got_mag, got_phase = audio.STFT(1024, 256, 1024).transform(ref_wav[:1].numpy())
    np.testing.assert_allclose(got_mag, mag.numpy(), rtol=0, atol=2e-5 * float(mag.max()))
    strong = mag.numpy() > 1e-3 * float(mag.max())
    wrapped = np.angle(np.exp(1j * (got_phase - phase.numpy())))
    assert np.abs(wrapped[strong]).max() < 1e-3
    np.testing.assert_allclose(audio.denormalize_tacotron_mel(audio.normalize_tacotron_mel(got)), got, atol=1e-5)


def test_pad_or_truncate(torch):
    from tortoise.api import pad_or_truncate
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    for n in (3, 5, 8):
        np.testing.assert_array_equal(audio.pad_or_truncate(x, n), pad_or_truncate(torch.from_numpy(x), n).numpy())


@pytest.mark.parametrize("name,sr,channels,subtype", [
    ("int16_44k_stereo.wav", 44100, 2, "PCM_16"),
    ("int32_24k.wav", 24000, 1, "PCM_32"),
    ("float_22k.wav", 22050, 1, "FLOAT"),
    ("stereo_44k.mp3", 44100, 2, None),
])
def test_load_audio_matches(torch, tmp_path, name, sr, channels, subtype):
    import soundfile
    from tortoise.utils.audio import load_audio
    g = np.random.default_rng(sr)
    n = sr // 2
    t = np.arange(n) / sr
    data = 0.4 * np.sin(2 * np.pi * 330 * t)[:, None] * np.linspace(1, 0.5, channels)[None]
    data += 0.02 * g.standard_normal((n, channels))
    path = str(tmp_path / name)
    soundfile.write(path, data if channels > 1 else data[:, 0], sr, subtype=subtype)
    ref = load_audio(path, 22050).numpy()
    got = audio.load_audio(path, 22050)
    assert got.shape == ref.shape and got.shape[0] == 1 and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=RESAMPLE_ATOL)


def test_bad_inputs(tmp_path, mel_norms):
    wav = _voice_like(30000)
    with pytest.raises(TypeError, match="float samples"):
        audio.TorchMelSpectrogram()(np.zeros((1, 3000), dtype=np.int16))
    with pytest.raises(ValueError, match="dimensions"):
        audio.TorchMelSpectrogram()(np.zeros((1, 1, 1, 3000), dtype=np.float32))
    with pytest.raises(ValueError, match="batch, 1, time"):
        audio.TorchMelSpectrogram()(np.zeros((1, 2, 3000), dtype=np.float32))
    with pytest.raises(ValueError, match="too short"):
        audio.TorchMelSpectrogram()(np.zeros((1, 300), dtype=np.float32))
    with pytest.raises(ValueError, match="mel_norms must have shape"):
        audio.TorchMelSpectrogram(mel_norms=np.ones(100))
    with pytest.raises(ValueError, match="one mono waveform"):
        audio.format_conditioning(np.stack([wav, wav]), mel_norms)
    with pytest.raises(ValueError, match=r"\[-10, 10\]"):
        audio.wav_to_univnet_mel(wav[None] * 100)
    with pytest.raises(ValueError, match="empty"):
        audio.resample(np.zeros(0, np.float32), 22050, 24000)
    with pytest.raises(ValueError, match="integers"):
        audio.resample(wav, 22050.5, 24000)
    with pytest.raises(FileNotFoundError):
        audio.load_audio(str(tmp_path / "missing.wav"), 22050)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="could not read audio"):
        audio.load_audio(str(junk), 22050)


def test_mel_norms_from_model_file(small_gguf, mel_norms):
    import pyggml as pg
    from tortoise_ggml.weights.model_file import ModelFile
    mf = ModelFile(str(small_gguf), pg.Backend("cpu", threads=1), components=["rlg_auto"])
    np.testing.assert_array_equal(mf.mel_norms, mel_norms)
    clip = _voice_like(132300)
    np.testing.assert_array_equal(audio.format_conditioning(clip, mf.mel_norms),
                                  audio.format_conditioning(clip, mel_norms))
