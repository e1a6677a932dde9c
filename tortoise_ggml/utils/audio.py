"""Audio front-end in numpy: what tortoise does to voice clips before any model sees them.

Mirrors, section by section:
  * torchaudio.functional.resample (sinc_interp_hann / sinc_interp_kaiser), which tortoise's load_audio and
    get_conditioning_latents call: same kernel construction, same float dtype, then the same strided convolution;
  * tortoise/utils/audio.py: load_audio, the tacotron mel normalisation, TacotronSTFT (with utils/stft.py's
    STFT.transform and librosa's slaney mel basis) and wav_to_univnet_mel, the diffusion model's 24 kHz mels;
  * tortoise/models/arch_util.py TorchMelSpectrogram (torchaudio.transforms.MelSpectrogram, then
    log(clamp(1e-5)) / mel_norms): the autoregressive model's 22.05 kHz conditioning mels;
  * tortoise/api.py pad_or_truncate and format_conditioning.

Waveforms are float32 numpy arrays with time last. The STFTs run in float64 (the reference runs float32), so
results agree with the reference to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .checks import as_generator

# frames per FFT batch: bounds the float64 scratch to ~16 MB whatever the clip length
_STFT_CHUNK = 2048
# output frames per resampling batch, for the same reason
_RESAMPLE_CHUNK = 1 << 16


def _as_waveform(wav, name: str = "wav", min_dim: int = 1, max_dim: int = 2) -> np.ndarray:
    arr = np.asarray(wav)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold float samples (audio in [-1, 1]), got dtype {arr.dtype}")
    if not min_dim <= arr.ndim <= max_dim:
        raise ValueError(f"{name} must have {min_dim} to {max_dim} dimensions (time last), got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# torchaudio.functional.resample
# ---------------------------------------------------------------------------------------------------------------
def _get_sinc_resample_kernel(orig_freq: int, new_freq: int, gcd: int, lowpass_filter_width: int = 6,
                              rolloff: float = 0.99, resampling_method: str = "sinc_interp_hann",
                              beta: float | None = None, dtype=np.float32) -> tuple[np.ndarray, int]:
    """Kernel (new_freq/gcd, orig_freq/gcd + 2*width) and width, computed in ``dtype`` as torchaudio computes it
    in the waveform's dtype (the float32 rounding is part of what the reference produces)."""
    if not (int(orig_freq) == orig_freq and int(new_freq) == new_freq):
        raise ValueError(f"sample rates must be integers, got {orig_freq} and {new_freq}")
    if resampling_method not in ("sinc_interp_hann", "sinc_interp_kaiser"):
        raise ValueError(f"invalid resampling method {resampling_method!r}")
    orig_freq = int(orig_freq) // gcd
    new_freq = int(new_freq) // gcd
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    dtype = np.dtype(dtype)
    # the low-pass sits below both Nyquist rates: when upsampling too, since the edges act like zero padding
    base_freq = min(orig_freq, new_freq) * rolloff
    # an FIR approximation of the ideal sinc, cut after lowpass_filter_width zero crossings
    width = math.ceil(lowpass_filter_width * orig_freq / base_freq)
    idx = np.arange(-width, width + orig_freq, dtype=dtype)[None, None] / dtype.type(orig_freq)
    t = np.arange(0, -new_freq, -1, dtype=dtype)[:, None, None] / dtype.type(new_freq) + idx
    t *= dtype.type(base_freq)
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width).astype(dtype, copy=False)
    if resampling_method == "sinc_interp_hann":
        window = np.cos(t * dtype.type(math.pi) / dtype.type(lowpass_filter_width) / dtype.type(2)) ** 2
    else:
        beta = 14.769656459379492 if beta is None else beta
        b = dtype.type(beta)
        window = (np.i0(b * np.sqrt(1 - (t / dtype.type(lowpass_filter_width)) ** 2)) / np.i0(b)).astype(dtype)
    t *= dtype.type(math.pi)
    scale = base_freq / orig_freq
    with np.errstate(invalid="ignore", divide="ignore"):
        kernels = np.where(t == 0, dtype.type(1.0), np.sin(t) / t).astype(dtype)
    kernels *= window * dtype.type(scale)
    return kernels.reshape(new_freq, -1), width


def _apply_sinc_resample_kernel(waveform: np.ndarray, orig_freq: int, new_freq: int, gcd: int,
                                kernel: np.ndarray, width: int) -> np.ndarray:
    orig_freq = int(orig_freq) // gcd
    new_freq = int(new_freq) // gcd
    shape = waveform.shape
    waveform = waveform.reshape(-1, shape[-1])
    num_wavs, length = waveform.shape
    padded = np.pad(waveform, ((0, 0), (width, width + orig_freq)))
    # the strided conv1d: output frame f uses samples [f*orig, f*orig + K) and yields new_freq outputs
    frames = sliding_window_view(padded, kernel.shape[-1], axis=-1)[:, ::orig_freq]
    out = np.empty((num_wavs, frames.shape[1], new_freq), dtype=waveform.dtype)
    for s in range(0, frames.shape[1], _RESAMPLE_CHUNK):
        out[:, s:s + _RESAMPLE_CHUNK] = frames[:, s:s + _RESAMPLE_CHUNK] @ kernel.T
    resampled = out.reshape(num_wavs, -1)
    # torchaudio takes the ceiling of a float32 scalar: mirror that rounding so lengths agree on every input
    target_length = int(np.ceil(np.float32(new_freq * length / orig_freq)))
    resampled = resampled[..., :target_length]
    return resampled.reshape(shape[:-1] + resampled.shape[-1:])


def resample(waveform, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99,
             resampling_method: str = "sinc_interp_hann", beta: float | None = None) -> np.ndarray:
    """torchaudio.functional.resample on a numpy waveform (..., time), float32 unless given float64."""
    wav = _as_waveform(waveform, "waveform", 1, 8)
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_freq} and {new_freq}")
    if orig_freq == new_freq:
        return wav
    gcd = math.gcd(int(orig_freq), int(new_freq))
    kernel, width = _get_sinc_resample_kernel(orig_freq, new_freq, gcd, lowpass_filter_width, rolloff,
                                              resampling_method, beta, wav.dtype)
    return _apply_sinc_resample_kernel(wav, orig_freq, new_freq, gcd, kernel, width)


# ---------------------------------------------------------------------------------------------------------------
# tortoise/utils/audio.py: loading
# ---------------------------------------------------------------------------------------------------------------
def load_wav(full_path: str) -> tuple[np.ndarray, int]:
    """Samples as float32 in [-1, 1] (integer PCM scaled by 2**15 / 2**31 like tortoise's load_wav_to_torch) and
    the file's sample rate. Shape (time,) or (time, channels)."""
    import soundfile

    try:
        data, sampling_rate = soundfile.read(full_path, dtype="float32", always_2d=False)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise ValueError(f"could not read audio from {full_path!r}: {e}") from None
    return data, int(sampling_rate)


def _load_mp3(path: str, sampling_rate: int) -> np.ndarray:
    """What tortoise's librosa.load(path, sr=...) does: decode, average the channels, resample with soxr 'HQ' and
    fix the length to ceil(n * ratio)."""
    import soxr

    data, lsr = load_wav(path)
    if data.ndim > 1:
        data = data.mean(axis=1)
    if lsr == sampling_rate:
        return data
    y = soxr.resample(data, lsr, sampling_rate, quality="soxr_hq").astype(np.float32)
    n = int(np.ceil(data.shape[-1] * float(sampling_rate) / lsr))
    return np.pad(y, (0, max(0, n - y.shape[-1])))[:n]


def load_audio(audiopath: str | os.PathLike, sampling_rate: int) -> np.ndarray:
    """A voice clip as float32 (1, time) at ``sampling_rate``, as tortoise.utils.audio.load_audio gives it.

    WAV (and anything else libsndfile reads) keeps the first channel and is resampled with torchaudio's sinc
    resampler; MP3 is mixed to mono and resampled with soxr, as librosa.load does for tortoise."""
    path = os.fspath(audiopath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no audio file at {path!r}")
    if int(sampling_rate) != sampling_rate or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive integer, got {sampling_rate}")
    sampling_rate = int(sampling_rate)
    if path.lower().endswith(".mp3"):
        audio, lsr = _load_mp3(path, sampling_rate), sampling_rate
    else:
        audio, lsr = load_wav(path)
    if audio.size == 0:
        raise ValueError(f"{path!r} holds no samples")
    # remove any channel data (tortoise's test, including its reading of very short clips as channel-first)
    if audio.ndim > 1:
        if audio.shape[0] < 5:
            audio = audio[0]
        else:
            audio = audio[:, 0]
    if lsr != sampling_rate:
        audio = resample(audio, lsr, sampling_rate)
    # tortoise complains about clips outside [-2, 2] or without negative samples (a sign of bad decoding)
    if np.any(audio > 2) or not np.any(audio < 0):
        warnings.warn(f"suspicious audio in {path!r}: max={audio.max()} min={audio.min()}", stacklevel=2)
    audio = np.clip(audio, -1, 1).astype(np.float32, copy=False)
    return audio[None]


# ---------------------------------------------------------------------------------------------------------------
# tortoise/utils/audio.py: mel normalisation
# ---------------------------------------------------------------------------------------------------------------
TACOTRON_MEL_MAX = 2.3143386840820312
TACOTRON_MEL_MIN = -11.512925148010254


def denormalize_tacotron_mel(norm_mel):
    return ((norm_mel + 1) / 2) * (TACOTRON_MEL_MAX - TACOTRON_MEL_MIN) + TACOTRON_MEL_MIN


def normalize_tacotron_mel(mel):
    return 2 * ((mel - TACOTRON_MEL_MIN) / (TACOTRON_MEL_MAX - TACOTRON_MEL_MIN)) - 1


def dynamic_range_compression(x, C=1, clip_val=1e-5):
    return np.log(np.maximum(x, clip_val) * C)


# ---------------------------------------------------------------------------------------------------------------
# Windowed real FFT shared by both mel front-ends
# ---------------------------------------------------------------------------------------------------------------
def hann_window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window / scipy get_window('hann', fftbins=True)), centred in n_fft
    samples as torch.stft and librosa's pad_center place a shorter window."""
    n = np.arange(win_length, dtype=np.float64)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    left = (n_fft - win_length) // 2
    return np.pad(w, (left, n_fft - win_length - left))


def _stft_chunks(wav: np.ndarray, n_fft: int, hop_length: int, window: np.ndarray):
    """Centred frames (reflect padding by n_fft//2, 1 + N//hop of them) of (B, N), as float64 rfft chunks:
    yields (first frame, complex (B, frames, n_fft//2 + 1))."""
    pad = n_fft // 2
    if wav.shape[-1] <= pad:
        raise ValueError(f"a clip of {wav.shape[-1]} samples is too short for reflect padding by {pad}")
    padded = np.pad(wav.astype(np.float64), ((0, 0), (pad, pad)), mode="reflect")
    frames = sliding_window_view(padded, n_fft, axis=-1)[:, ::hop_length]    # (B, T, n_fft), no copy
    for s in range(0, frames.shape[1], _STFT_CHUNK):
        yield s, np.fft.rfft(frames[:, s:s + _STFT_CHUNK] * window, axis=-1)


def _n_frames(n_samples: int, hop_length: int) -> int:
    return 1 + n_samples // hop_length


def _stft_abs2(wav: np.ndarray, n_fft: int, hop_length: int, window: np.ndarray) -> np.ndarray:
    """|STFT|^2 in float64, time-major: (B, frames, n_fft//2 + 1)."""
    out = np.empty((wav.shape[0], _n_frames(wav.shape[-1], hop_length), n_fft // 2 + 1), dtype=np.float64)
    for s, spec in _stft_chunks(wav, n_fft, hop_length, window):
        out[:, s:s + spec.shape[1]] = spec.real ** 2 + spec.imag ** 2
    return out


# ---------------------------------------------------------------------------------------------------------------
# tortoise/utils/stft.py + tortoise/utils/audio.py: TacotronSTFT (diffusion / vocoder mels)
# ---------------------------------------------------------------------------------------------------------------
def _hz_to_mel_slaney(freq):
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep,
                    freq / f_sp)


def _mel_to_hz_slaney(mels):
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def _hz_to_mel_htk(freq):
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mels):
    return 700.0 * (10.0 ** (np.asarray(mels, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def librosa_mel_fn(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) with its defaults (slaney scale, slaney area norm):
    float32 (n_mels, n_fft//2 + 1). Read-only: it is cached."""
    if fmax is None:
        fmax = float(sr) / 2
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    lower = -ramps[:n_mels] / fdiff[:n_mels, None]
    upper = ramps[2:n_mels + 2] / fdiff[1:n_mels + 1, None]
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    # slaney: scale each triangle to constant energy per channel
    enorm = 2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, None]
    weights.flags.writeable = False
    return weights


class STFT:
    """tortoise/utils/stft.py's STFT, forward transform only (tortoise never inverts it)."""

    def __init__(self, filter_length: int = 800, hop_length: int = 200, win_length: int = 800):
        if filter_length < win_length:
            raise ValueError(f"filter_length {filter_length} is shorter than win_length {win_length}")
        self.filter_length = filter_length
        self.hop_length = hop_length
        self.win_length = win_length
        self.window = hann_window(win_length, filter_length)

    def transform(self, input_data) -> tuple[np.ndarray, np.ndarray]:
        """(B, N) -> float32 magnitude and phase, each (B, filter_length//2 + 1, 1 + N//hop)."""
        wav = _as_waveform(input_data, "input_data", 2, 2)
        shape = (wav.shape[0], _n_frames(wav.shape[-1], self.hop_length), self.filter_length // 2 + 1)
        magnitude, phase = np.empty(shape, np.float32), np.empty(shape, np.float32)
        # the reference correlates with +cos / -sin bases: exactly the rfft's real and imaginary parts
        for s, spec in _stft_chunks(wav, self.filter_length, self.hop_length, self.window):
            magnitude[:, s:s + spec.shape[1]] = np.abs(spec)
            phase[:, s:s + spec.shape[1]] = np.angle(spec)
        return magnitude.transpose(0, 2, 1), phase.transpose(0, 2, 1)


class TacotronSTFT:
    def __init__(self, filter_length: int = 1024, hop_length: int = 256, win_length: int = 1024,
                 n_mel_channels: int = 80, sampling_rate: int = 22050, mel_fmin: float = 0.0,
                 mel_fmax: float = 8000.0):
        self.n_mel_channels = n_mel_channels
        self.sampling_rate = sampling_rate
        self.stft_fn = STFT(filter_length, hop_length, win_length)
        self.mel_basis = librosa_mel_fn(sampling_rate, filter_length, n_mel_channels, float(mel_fmin),
                                        None if mel_fmax is None else float(mel_fmax))

    def spectral_normalize(self, magnitudes):
        return dynamic_range_compression(magnitudes)

    def mel_spectrogram(self, y) -> np.ndarray:
        """(B, N) waveform in [-1, 1] -> float32 (B, n_mel_channels, 1 + N//hop) log-magnitude mels."""
        y = _as_waveform(y, "y", 2, 2)
        # the reference asserts this range: anything wider is not an audio clip in [-1, 1]
        lo, hi = float(y.min()), float(y.max())
        if lo < -10 or hi > 10:
            raise ValueError(f"waveform values must lie in [-10, 10] (audio in [-1, 1]), got [{lo}, {hi}]")
        y = np.clip(y, -1, 1)
        magnitudes, _ = self.stft_fn.transform(y)
        mel_output = np.matmul(self.mel_basis.astype(np.float64), magnitudes)
        return self.spectral_normalize(mel_output).astype(np.float32)


def wav_to_univnet_mel(wav, do_normalization: bool = False, n_mels: int = 100, sample_rate: int = 24000,
                       hop_length: int = 256) -> np.ndarray:
    """24 kHz waveform (B, N) -> (B, n_mels, 1 + N//hop) log mels, the diffusion model's conditioning input
    (n_mels: the diffusion decoder's in_channels)."""
    stft = TacotronSTFT(1024, hop_length, 1024, n_mels, sample_rate, 0, sample_rate // 2)
    mel = stft.mel_spectrogram(wav)
    if do_normalization:
        mel = normalize_tacotron_mel(mel)
    return mel


# ---------------------------------------------------------------------------------------------------------------
# tortoise/models/arch_util.py: TorchMelSpectrogram (torchaudio.transforms.MelSpectrogram)
# ---------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def melscale_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                    norm: str | None = None, mel_scale: str = "htk") -> np.ndarray:
    """torchaudio.functional.melscale_fbanks: (n_freqs, n_mels) triangles on an htk or slaney mel scale.
    Computed in float64, returned read-only (cached)."""
    if norm not in (None, "slaney"):
        raise ValueError('norm must be None or "slaney"')
    if mel_scale not in ("htk", "slaney"):
        raise ValueError('mel_scale must be "htk" or "slaney"')
    to_mel, to_hz = ((_hz_to_mel_htk, _mel_to_hz_htk) if mel_scale == "htk"
                     else (_hz_to_mel_slaney, _mel_to_hz_slaney))
    all_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    f_pts = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down_slopes = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up_slopes = slopes[:, 2:] / f_diff[1:]
    fb = np.maximum(0.0, np.minimum(down_slopes, up_slopes))
    if norm == "slaney":
        fb *= (2.0 / (f_pts[2:n_mels + 2] - f_pts[:n_mels]))[None, :]
    fb.flags.writeable = False
    return fb


class TorchMelSpectrogram:
    """torchaudio MelSpectrogram(power 2, norm 'slaney', htk scale, centred reflect-padded periodic-Hann
    frames), then log(clamp(1e-5)) and division by ``mel_norms`` (80 floats: ModelFile.mel_norms; None skips
    it, like the reference's mel_norm_file=None)."""

    def __init__(self, filter_length: int = 1024, hop_length: int = 256, win_length: int = 1024,
                 n_mel_channels: int = 80, mel_fmin: float = 0, mel_fmax: float = 8000, sampling_rate: int = 22050,
                 normalize: bool = False, mel_norms=None):
        self.filter_length = filter_length
        self.hop_length = hop_length
        self.win_length = win_length
        self.n_mel_channels = n_mel_channels
        self.mel_fmin = mel_fmin
        self.mel_fmax = mel_fmax
        self.sampling_rate = sampling_rate
        self.normalize = normalize
        self.window = hann_window(win_length, filter_length)
        self.fb = melscale_fbanks(filter_length // 2 + 1, float(mel_fmin), float(mel_fmax), n_mel_channels,
                                  sampling_rate, "slaney", "htk")
        if mel_norms is None:
            self.mel_norms = None
        else:
            norms = np.asarray(mel_norms, dtype=np.float32)
            if norms.shape != (n_mel_channels,):
                raise ValueError(f"mel_norms must have shape ({n_mel_channels},), got {norms.shape}")
            self.mel_norms = norms

    def __call__(self, inp) -> np.ndarray:
        """(B, N) or (B, 1, N) float waveform -> float32 (B, n_mel_channels, 1 + N//hop)."""
        wav = _as_waveform(inp, "inp", 2, 3)
        if wav.ndim == 3:  # a mono channel axis, as the reference squeezes it
            if wav.shape[1] != 1:
                raise ValueError(f"inp must be (batch, time) or (batch, 1, time), got shape {wav.shape}")
            wav = wav[:, 0]
        spec = _stft_abs2(wav, self.filter_length, self.hop_length, self.window)
        if self.normalize:
            spec /= np.sum(self.window ** 2)
        mel = np.matmul(spec, self.fb).transpose(0, 2, 1)   # (B, n_mels, frames)
        # dynamic range compression
        mel = np.log(np.maximum(mel, 1e-5)).astype(np.float32)
        if self.mel_norms is not None:
            mel = mel / self.mel_norms[None, :, None]
        return mel


# ---------------------------------------------------------------------------------------------------------------
# tortoise/api.py: conditioning clips
# ---------------------------------------------------------------------------------------------------------------
def pad_or_truncate(t: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad or cut the last axis to ``length``."""
    t = np.asarray(t)
    if t.shape[-1] == length:
        return t
    elif t.shape[-1] < length:
        return np.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, length - t.shape[-1])])
    else:
        return t[..., :length]


def format_conditioning(clip, mel_norms, cond_length: int = 132300, rng=None) -> np.ndarray:
    """A 22.05 kHz voice clip ((time,) or (1, time)) -> float32 (n_mels, 1 + cond_length//256) conditioning mels
    (n_mels: one per mel norm, the autoregressive model's conditioning_spec_dim).

    Shorter clips are zero-padded at the end; longer ones are cut to a random window of ``cond_length`` samples
    starting at ``rng.integers(0, gap, endpoint=True)``, where tortoise draws ``random.randint(0, gap)`` from
    Python's global RNG. ``rng``: a numpy Generator, or a seed for one (None: fresh OS entropy), so a seeded run
    repeats its crops; the offsets differ from tortoise's for the same seed.
    """
    clip = _as_waveform(clip, "clip", 1, 2).astype(np.float32, copy=False)
    if clip.ndim == 1:
        clip = clip[None]
    if clip.shape[0] != 1:
        raise ValueError(f"clip must be one mono waveform, (time,) or (1, time), got shape {clip.shape}")
    gap = clip.shape[-1] - cond_length
    if gap < 0:
        clip = np.pad(clip, ((0, 0), (0, -gap)))
    elif gap > 0:
        rand_start = int(as_generator(rng).integers(0, gap, endpoint=True))
        clip = clip[:, rand_start:rand_start + cond_length]
    norms = np.asarray(mel_norms, np.float32)
    return TorchMelSpectrogram(n_mel_channels=norms.shape[-1], mel_norms=norms)(clip)[0]


# ------------------------------------------------------------------------------------------------------------------
# 16-bit PCM and WAV headers (the server's responses, generate --stream)
# ------------------------------------------------------------------------------------------------------------------
# RIFF and data sizes of a WAV whose length is not known yet, as streaming WAV writers put them
STREAMING_SIZE = 0xFFFFFFFF


def to_pcm16(wav: np.ndarray) -> bytes:
    """Float samples as 16-bit little-endian PCM, as write_wav (soundfile's PCM_16) stores them: clipped to
    [-1, 1], scaled by 32767, rounded to nearest."""
    wav = np.asarray(wav, np.float32).reshape(-1)
    return (np.rint(np.clip(wav, -1.0, 1.0) * 32767.0)).astype("<i2").tobytes()


def wav_header(sample_rate: int, n_samples: int | None) -> bytes:
    """A 44-byte PCM-16 mono WAV header; ``n_samples`` None: the streaming sizes (0xFFFFFFFF)."""
    if n_samples is None:
        riff = data = STREAMING_SIZE
    else:
        data = 2 * n_samples
        riff = 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", data))
