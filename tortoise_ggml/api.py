"""TextToSpeech: the tortoise-tts API (tortoise/api.py) on ggml.

    tts = TextToSpeech("tortoise.gguf", device="cpu", threads=8)
    latents = tts.get_conditioning_latents([clip1, clip2])          # 22.05 kHz float arrays
    wav = tts.tts_with_preset("Hello world.", conditioning_latents=latents, preset="fast")   # (1, samples) @ 24 kHz

Each stage is also reachable on its own: ``tts.autoregressive`` (UnifiedVoice: teacher-forced logits, latents,
sampled codes), ``tts.clvp``, ``tts.diffusion``, ``tts.vocoder`` (mel -> wav). Stages whose component is not in
the model file raise a clear error when used.

Randomness: tortoise draws from torch's global RNG; here every call takes a ``seed`` or numpy Generator, so a run is
reproducible, but not the same stream as the PyTorch original.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time

import numpy as np

import pyggml as pg

from .models.config import AudioConfig, AutoregressiveConfig
from .utils import audio
from .utils.audio import denormalize_tacotron_mel, load_audio  # noqa: F401 (load_audio: part of the API)
from .utils.checks import as_generator
from .utils.diffusion import SpacedDiffusion, check_sampler, get_named_beta_schedule, space_timesteps
from .utils.sampling import CALM_TOKEN, fix_autoregressive_output
from .utils.text import VoiceBpeTokenizer
from .weights.model_file import ModelFile
from .weights.registry import REGISTRY

log = logging.getLogger(__name__)

# tortoise/api.py's tts_with_preset settings
PRESET_SETTINGS = {'temperature': .8, 'length_penalty': 1.0, 'repetition_penalty': 2.0, 'top_p': .8,
                   'cond_free_k': 2.0, 'diffusion_temperature': 1.0}
PRESETS = {
    'ultra_fast': {'num_autoregressive_samples': 16, 'diffusion_iterations': 30, 'cond_free': False},
    'fast': {'num_autoregressive_samples': 96, 'diffusion_iterations': 80},
    'standard': {'num_autoregressive_samples': 256, 'diffusion_iterations': 200},
    'high_quality': {'num_autoregressive_samples': 256, 'diffusion_iterations': 400},
    # tortoise-tts-fast's few-step presets (its ultra_fast and fast: ultra_fast with diffusion_iterations=10,
    # sampler="ddim", cond_free=True; fast with diffusion_iterations=20, sampler="dpm++2m")
    'single_sample': {'num_autoregressive_samples': 8, 'diffusion_iterations': 10, 'sampler': 'ddim'},
    'very_fast': {'num_autoregressive_samples': 32, 'diffusion_iterations': 30, 'sampler': 'dpm++2m'},
}
# tortoise's sample rates (the model file's AudioConfig holds them per file: tts.audio_config)
AR_SAMPLE_RATE = AudioConfig.input_sample_rate         # conditioning clips and AR codes
OUTPUT_SAMPLE_RATE = AudioConfig.output_sample_rate    # the diffusion mels and the audio


def serialized(method):
    """Run ``method`` holding the TextToSpeech's lock: the models share one backend, its graph allocator, cached
    graphs and the KV cache, so two calls at once would overwrite each other's memory. Re-entrant: tts() calls
    get_conditioning_latents under the same lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class MissingComponent(RuntimeError):
    """The model file has no weights for a stage that was asked for."""


class TextToSpeech:
    """Tortoise TTS from one GGUF file (``python -m tortoise_ggml.convert`` makes it).

    ``device``: "cpu" or "cuda" (or "cuda:N"); ``threads``: CPU threads (default: all available);
    ``autoregressive_batch_size``: rows decoded together (tortoise picks 16 on large GPUs);
    ``kv_cache_type``: "f32" or "f16" storage for the GPT-2 KV cache;
    ``mel_positions``: "fixed" (default) or "original" (reproduces tortoise's KV-cache position offset; see
    tortoise_ggml.models.autoregressive).

    Threads: one TextToSpeech may be shared; its methods run one at a time (a lock around the models' shared
    backend, graphs and KV cache), so two threads get what serial calls give. The model objects it holds
    (``tts.autoregressive``, ...) take no lock: call those from one thread.
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 autoregressive_batch_size: int = 16, kv_cache_type: str = "f32", mel_positions: str = "fixed",
                 components=None):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"no model file at {model_path!r} (convert the checkpoints with "
                                    "python -m tortoise_ggml.convert MODELS_DIR -o tortoise.gguf)")
        if autoregressive_batch_size < 1:
            raise ValueError(f"autoregressive_batch_size must be >= 1, got {autoregressive_batch_size}")
        if mel_positions not in ("fixed", "original"):
            raise ValueError(f"mel_positions must be 'fixed' or 'original', got {mel_positions!r}")
        self._lock = threading.RLock()
        self.backend = pg.Backend(device, threads=threads) if device == "cpu" else pg.Backend(device)
        self.model_file = ModelFile(model_path, self.backend, components=components)
        self.autoregressive_batch_size = int(autoregressive_batch_size)
        self.mel_positions = mel_positions
        self.audio_config = self.model_file.audio_config
        self.tokenizer = VoiceBpeTokenizer.from_model_file(self.model_file)
        self.mel_norms = self.model_file.mel_norms
        options = {"autoregressive": {"kv_cache_type": kv_cache_type}}
        for entry in REGISTRY.values():
            model = None
            if entry.model is not None and entry.name in self.model_file.components:
                model = entry.model_class()(self.model_file, self.backend, component=entry.name,
                                            **options.get(entry.name, {}))
            setattr(self, entry.attribute, model)

    def _need(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) is None:
                raise MissingComponent(f"{self.model_file.path} has no {name} weights (convert it with that "
                                       "component)")

    # -- conditioning ------------------------------------------------------------------------------------------
    @serialized
    def get_conditioning_latents(self, voice_samples, return_mels: bool = False, seed=None):
        """(autoregressive latent (1, model_dim), diffusion latent (1, 2*model_channels)) from 22.05 kHz clips.

        ``voice_samples``: one array or a list of arrays (samples,) or (1, samples). Clips longer than 6 s are
        randomly cropped (as tortoise; ``seed`` makes the crop reproducible). The diffusion latent is None when
        the model file has no diffusion weights.
        """
        self._need("autoregressive")
        if isinstance(voice_samples, np.ndarray) and voice_samples.ndim == 1:
            voice_samples = [voice_samples]
        voice_samples = list(voice_samples)
        if not voice_samples:
            raise ValueError("get_conditioning_latents needs at least one voice clip")
        rng = as_generator(seed)
        ac = self.audio_config
        auto_conds = np.stack([audio.format_conditioning(v, self.mel_norms, cond_length=ac.conditioning_length,
                                                         rng=rng) for v in voice_samples])
        auto_latent = self.autoregressive.get_conditioning(auto_conds[None])
        diffusion_latent = diffusion_conds = None
        if self.diffusion is not None:
            mels = []
            for sample in voice_samples:
                sample = audio.resample(np.asarray(sample, np.float32), ac.input_sample_rate, ac.output_sample_rate)
                sample = audio.pad_or_truncate(sample, ac.diffusion_conditioning_length)
                mels.append(audio.wav_to_univnet_mel(sample.reshape(1, -1), do_normalization=False,
                                                     n_mels=self.diffusion.config.in_channels))
            diffusion_conds = np.stack([m.reshape(m.shape[-2], m.shape[-1]) for m in mels])[None]
            diffusion_latent = self.diffusion.get_conditioning(diffusion_conds)
        if return_mels:
            return auto_latent, diffusion_latent, auto_conds[None], diffusion_conds
        return auto_latent, diffusion_latent

    @serialized
    def get_random_conditioning_latents(self, seed=None):
        """A random voice: the random-latent generators' (autoregressive, diffusion) latents."""
        self._need("rlg_auto", "rlg_diffusion")
        rng = as_generator(seed)
        return self.rlg_auto.sample(rng, 1), self.rlg_diffusion.sample(rng, 1)

    # -- the pipeline ------------------------------------------------------------------------------------------
    def tts_with_preset(self, text: str, preset: str = 'fast', **kwargs):
        """``tts`` with one of tortoise's presets: ultra_fast, fast, standard, high_quality."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose from {sorted(PRESETS)}")
        settings = dict(PRESET_SETTINGS)
        settings.update(PRESETS[preset])
        settings.update(kwargs)
        return self.tts(text, **settings)

    @serialized
    def tts(self, text: str, voice_samples=None, conditioning_latents=None, k: int = 1, verbose: bool = True,
            seed=None, num_autoregressive_samples: int = 512, temperature: float = .8, length_penalty: float = 1,
            repetition_penalty: float = 2.0, top_p: float = .8, max_mel_tokens: int = 500,
            cvvp_amount: float = .0, diffusion_iterations: int = 100, cond_free: bool = True, sampler: str = "p",
            cond_free_k: float = 2, diffusion_temperature: float = 1.0, top_k: int = 50, return_stats: bool = False):
        """Speak ``text``: (1, samples) float32 at 24 kHz, or a list of k such clips (tortoise's tts()).

        Voice: ``voice_samples`` (22.05 kHz clips), else ``conditioning_latents`` (a pair from
        get_conditioning_latents), else a random voice. ``length_penalty`` only matters for beam search, which
        tortoise never uses; it is accepted for compatibility. ``seed`` (int or numpy Generator) makes the run
        reproducible. ``return_stats`` adds a dict of per-stage seconds. ``sampler``: the diffusion sampler, as
        tortoise-tts-fast names them ("p": tortoise's own, "ddim", "dpm++2m"; utils.diffusion.SAMPLERS), run for
        ``diffusion_iterations`` steps; DPM-Solver samplers need ``cond_free``.
        """
        self._need("autoregressive", "clvp", "diffusion", "vocoder")
        if cvvp_amount:
            raise NotImplementedError("CVVP re-ranking is not implemented (tortoise's default cvvp_amount is 0)")
        if not 0 < max_mel_tokens <= self.autoregressive.max_mel_tokens - 3:
            raise ValueError(f"max_mel_tokens must be in (0, {self.autoregressive.max_mel_tokens - 3}], "
                             f"got {max_mel_tokens}")
        if num_autoregressive_samples < 1 or k < 1 or k > num_autoregressive_samples:
            raise ValueError(f"need 1 <= k ({k}) <= num_autoregressive_samples ({num_autoregressive_samples})")
        rng = as_generator(seed)
        stats = {}
        t0 = time.perf_counter()
        text_tokens = np.asarray(self.tokenizer.encode(text), np.int32)[None]
        text_tokens = np.pad(text_tokens, ((0, 0), (0, 1)))   # as tortoise: "This may not be necessary."
        limit = self.autoregressive.config.max_text_tokens
        if text_tokens.shape[-1] > limit:
            raise ValueError(f"too much text ({text_tokens.shape[-1]} tokens, limit {limit}): split it with "
                             "tortoise_ggml.utils.text.split_and_recombine_text and speak the parts")
        if voice_samples is not None:
            auto_conditioning, diffusion_conditioning = self.get_conditioning_latents(voice_samples, seed=rng)
        elif conditioning_latents is not None:
            auto_conditioning, diffusion_conditioning = conditioning_latents
        else:
            auto_conditioning, diffusion_conditioning = self.get_random_conditioning_latents(seed=rng)
        if diffusion_conditioning is None:
            raise ValueError("conditioning_latents lack the diffusion latent")
        stats["conditioning_s"] = time.perf_counter() - t0

        diffuser = load_discrete_vocoder_diffuser(desired_diffusion_steps=diffusion_iterations, cond_free=cond_free,
                                                  cond_free_k=cond_free_k, sampler=sampler)
        stop_mel_token = self.autoregressive.stop_mel_token

        t0 = time.perf_counter()
        samples = []
        batch_size = min(self.autoregressive_batch_size, num_autoregressive_samples)
        num_batches = max(1, num_autoregressive_samples // batch_size)
        progress = _progress(num_batches * max_mel_tokens, "autoregressive", verbose)
        for b in range(num_batches):
            done = b * max_mel_tokens
            codes = self.autoregressive.inference_speech(
                auto_conditioning, text_tokens, num_return_sequences=batch_size, max_generate_length=max_mel_tokens,
                do_sample=True, top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty,
                top_k=top_k, rng=rng, mel_positions=self.mel_positions,
                progress=(lambda n, total, done=done: progress(done + n)) if progress else None)
            codes = np.pad(codes, ((0, 0), (0, max_mel_tokens - codes.shape[1])), constant_values=stop_mel_token)
            samples.append(codes)
        if progress:
            progress.close()
        samples = np.concatenate(samples, axis=0)
        stats["autoregressive_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        samples = fix_autoregressive_output(samples, stop_mel_token, complain=verbose)
        clip_results = np.concatenate([
            self.clvp.forward(np.repeat(text_tokens, len(batch), axis=0), batch)
            for batch in np.split(samples, range(batch_size, len(samples), batch_size))])
        best = np.argsort(-clip_results, kind="stable")[:k]
        best_results = samples[best]
        stats["clvp_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        best_latents = self.autoregressive.forward(
            np.repeat(np.asarray(auto_conditioning).reshape(1, -1), k, axis=0), np.repeat(text_tokens, k, axis=0),
            np.array([text_tokens.shape[-1]]), best_results,
            np.array([best_results.shape[-1] * self.autoregressive.mel_length_compression]),
            return_latent=True, clip_inputs=False)
        stats["latents_s"] = time.perf_counter() - t0

        wav_candidates, stats["diffusion_s"], stats["vocoder_s"] = [], 0.0, 0.0
        for b in range(k):
            latents = best_latents[b:b + 1, :trim_at_silence(best_results[b])]
            t0 = time.perf_counter()
            mel = do_spectrogram_diffusion(self.diffusion, diffuser, latents, diffusion_conditioning,
                                           temperature=diffusion_temperature, rng=rng, verbose=verbose)
            stats["diffusion_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            wav_candidates.append(self.vocoder.inference(mel, rng=rng))
            stats["vocoder_s"] += time.perf_counter() - t0
        res = wav_candidates if len(wav_candidates) > 1 else wav_candidates[0]
        return (res, stats) if return_stats else res


def trim_at_silence(codes: np.ndarray) -> int:
    """Number of latent frames to keep: tortoise cuts where a run of calm tokens first exceeds 8, giving the diffusion
    model some breathing room to end the speech."""
    ctokens = 0
    for i, c in enumerate(codes):
        ctokens = ctokens + 1 if c == CALM_TOKEN else 0
        if ctokens > 8:
            return i
    return len(codes)


class _Progress:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False)

    def __call__(self, n: int) -> None:
        self.bar.update(n - self.bar.n)  # redraws at most every mininterval (a forced refresh per token floods logs)

    def close(self) -> None:
        self.bar.close()


def _progress(total: int, desc: str, verbose: bool):
    return _Progress(total, desc) if verbose else None



# ------------------------------------------------------------------------------------------------------------------
# tortoise/api.py's glue around the diffusion sampler
# ------------------------------------------------------------------------------------------------------------------
def load_discrete_vocoder_diffuser(trained_diffusion_steps: int = 4000, desired_diffusion_steps: int = 200,
                                   cond_free: bool = True, cond_free_k: float = 1,
                                   sampler: str = "p") -> SpacedDiffusion:
    """The diffuser tortoise/api.py samples mels with; ``sampler`` as tortoise-tts-fast's: "p" (tortoise's
    ancestral sampler), "ddim", "dpm++2m" (utils.diffusion.SAMPLERS). Bad steps or samplers raise here, before any
    model runs."""
    check_sampler(sampler, cond_free)
    if isinstance(desired_diffusion_steps, bool) or not isinstance(desired_diffusion_steps, (int, np.integer)):
        raise ValueError(f"diffusion steps must be an integer, got {desired_diffusion_steps!r}")
    if not 1 <= desired_diffusion_steps <= trained_diffusion_steps:
        raise ValueError(f"diffusion steps must be in 1..{trained_diffusion_steps} (the trained schedule), got "
                         f"{desired_diffusion_steps}: it cannot divide the {trained_diffusion_steps} trained steps")
    return SpacedDiffusion(use_timesteps=space_timesteps(trained_diffusion_steps, [desired_diffusion_steps]),
                           model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse",
                           betas=get_named_beta_schedule("linear", trained_diffusion_steps),
                           conditioning_free=cond_free, conditioning_free_k=cond_free_k, sampler=sampler)


def do_spectrogram_diffusion(diffusion_model, diffuser: SpacedDiffusion, latents, conditioning_latents,
                             temperature: float = 1, verbose: bool = False, rng=None, progress=None,
                             output_seq_len: int | None = None) -> np.ndarray:
    """Mel spectrogram (B, in_channels, frames) for AR ``latents`` (B, S, D) and the diffusion conditioning
    latent (B, 2*model_channels), as tortoise/api.py's do_spectrogram_diffusion: ``temperature`` scales the
    starting noise; ``rng`` (numpy Generator or seed) draws all noise; ``verbose`` shows a tqdm bar (the
    reference's default is True; a library stays quiet unless asked); ``progress``, a callable
    ``progress(step, total)``, is called before each step instead. ``output_seq_len``: the frames for S latents
    (default: tortoise's S * 4 * 24000 // 22050, from the model file's audio config)."""
    latents = np.asarray(latents)
    if latents.ndim < 2:
        raise ValueError(f"latents must be (batch, length, channels), got shape {latents.shape}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    rng = as_generator(rng)
    seq_len = output_seq_len or diffusion_frames(diffusion_model.model_file, latents.shape[1])
    output_shape = (latents.shape[0], diffusion_model.config.in_channels, seq_len)
    precomputed_embeddings = diffusion_model.timestep_independent(latents, conditioning_latents, seq_len, False)
    noise = rng.standard_normal(output_shape, dtype=np.float32) * np.float32(temperature)
    mel = diffuser.sample_loop(diffusion_model, output_shape, noise=noise,
                               model_kwargs={"precomputed_aligned_embeddings": precomputed_embeddings},
                               rng=rng, progress=progress if progress is not None else verbose)
    return denormalize_tacotron_mel(mel)[:, :, :seq_len]


def diffusion_frames(model_file, n_codes: int) -> int:
    """Frames of mel the diffusion decoder makes for ``n_codes`` AR codes or latents (output_seq_len)."""
    compression = (model_file.config("autoregressive").mel_length_compression
                   if "autoregressive" in model_file.available_components
                   else AutoregressiveConfig.mel_length_compression)
    return model_file.audio_config.diffusion_frames(n_codes, compression)


def write_wav(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = OUTPUT_SAMPLE_RATE) -> None:
    """Write a float waveform (samples,) or (1, samples) as 16-bit PCM WAV (soundfile)."""
    import soundfile
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1:
        raise ValueError(f"write_wav takes one mono clip (samples,) or (1, samples), got shape {wav.shape}")
    soundfile.write(os.fspath(path), np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16")
