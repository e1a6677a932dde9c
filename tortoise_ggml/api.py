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
import re
import threading
import time

import numpy as np

import pyggml as pg

from .models.config import AudioConfig, AutoregressiveConfig
from .utils import audio
from .utils.audio import denormalize_tacotron_mel, load_audio  # noqa: F401 (load_audio: part of the API)
from .utils.checks import as_generator
from .utils.diffusion import SpacedDiffusion, check_sampler, get_named_beta_schedule, space_timesteps
from .utils.files import atomic_path
from .utils.sampling import CALM_TOKEN, fix_autoregressive_output
from .utils.text import TTS_TEXT_PAD, VoiceBpeTokenizer
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
# the decoders tts() offers: tortoise/api.py's diffusion + UnivNet pipeline (the default), and api_fast.py's HiFi-GAN
# on the autoregressive latents (the hifigan component, from hifidecoder.pth)
DECODERS = ("univnet", "hifigan")
# api_fast.py tts_stream: the first decode waits for this many codes, later ones for stream_chunk_size
STREAM_FIRST_BUFFER = 60
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

    def _text_tokens(self, text: str) -> np.ndarray:
        """(1, T) token ids with tortoise's trailing pad 0 ("This may not be necessary."); text that leaves no
        tokens (empty, only symbols the cleaners drop) is an error, not a clip of noise, and so is text beyond the
        model's max_text_tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, not {type(text).__name__}")
        tokens = self.tokenizer.encode(text) if re.search(r"[^\W_]", text) else []
        if not tokens:
            raise ValueError(f"the text {text[:40]!r} has nothing to speak: no letters or digits left after "
                             "tortoise's text cleaners")
        text_tokens = np.pad(np.asarray(tokens, np.int32)[None], ((0, 0), (0, TTS_TEXT_PAD)))
        limit = self.autoregressive.config.max_text_tokens
        if text_tokens.shape[-1] > limit:
            raise ValueError(f"too much text ({text_tokens.shape[-1]} tokens, limit {limit}): split it with "
                             "tortoise_ggml.utils.text.split_and_recombine_text and speak the parts")
        return text_tokens

    def _check_max_mel_tokens(self, max_mel_tokens) -> None:
        top = self.autoregressive.max_mel_tokens - 3
        if isinstance(max_mel_tokens, bool) or not isinstance(max_mel_tokens, (int, np.integer)) \
                or not 0 < max_mel_tokens <= top:
            raise ValueError(f"max_mel_tokens must be an integer in (0, {top}], got {max_mel_tokens!r}")

    def _auto_conditioning(self, voice_samples, rng):
        """The clips as a list, their conditioning mels (1, clips, spec_dim, T) and the autoregressive latent."""
        if isinstance(voice_samples, np.ndarray) and voice_samples.ndim == 1:
            voice_samples = [voice_samples]
        voice_samples = list(voice_samples)
        if not voice_samples:
            raise ValueError("get_conditioning_latents needs at least one voice clip")
        length = self.audio_config.conditioning_length
        auto_conds = np.stack([audio.format_conditioning(v, self.mel_norms, cond_length=length, rng=rng)
                               for v in voice_samples])[None]
        return voice_samples, auto_conds, self.autoregressive.get_conditioning(auto_conds)

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
        voice_samples, auto_conds, auto_latent = self._auto_conditioning(voice_samples, as_generator(seed))
        ac = self.audio_config
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
            return auto_latent, diffusion_latent, auto_conds, diffusion_conds
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
            cond_free_k: float = 2, diffusion_temperature: float = 1.0, top_k: int = 50, return_stats: bool = False,
            decoder: str = "univnet"):
        """Speak ``text``: (1, samples) float32 at 24 kHz, or a list of k such clips (tortoise's tts()).

        Voice: ``voice_samples`` (22.05 kHz clips), else ``conditioning_latents`` (a pair from
        get_conditioning_latents), else a random voice. ``length_penalty`` only matters for beam search, which
        tortoise never uses; it is accepted for compatibility. ``seed`` (int or numpy Generator) makes the run
        reproducible. ``return_stats`` adds a dict of per-stage seconds. ``sampler``: the diffusion sampler, as
        tortoise-tts-fast names them ("p": tortoise's own, "ddim", "dpm++2m"; utils.diffusion.SAMPLERS), run for
        ``diffusion_iterations`` steps; DPM-Solver samplers need ``cond_free``.

        ``decoder``: "univnet" (default): tortoise/api.py's pipeline (num_autoregressive_samples candidates ranked
        by CLVP, diffusion to a mel, UnivNet), the quality tortoise is known for and what every release model file
        holds. "hifigan": tortoise/api_fast.py's tts(): one autoregressive sample (no CLVP ranking, no diffusion),
        its latents decoded straight to audio by the HiFi-GAN decoder (the hifigan component, converted from
        hifidecoder.pth): many times faster, at the fast path's quality, and the ``num_autoregressive_samples``
        and diffusion settings are unused (``k`` must be 1). See also ``tts_stream``.
        """
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}: choose from {', '.join(DECODERS)}")
        if decoder == "hifigan":
            if k != 1:
                raise ValueError(f"decoder='hifigan' speaks one autoregressive sample (api_fast.py): k must be 1, "
                                 f"got {k}")
            return self._tts_hifigan(text, voice_samples, conditioning_latents, verbose, seed, temperature,
                                     repetition_penalty, top_p, top_k, max_mel_tokens, return_stats)
        self._need("autoregressive", "clvp", "diffusion", "vocoder")
        if isinstance(cvvp_amount, bool) or not isinstance(cvvp_amount, (int, float, np.number)) \
                or not 0 <= cvvp_amount <= 1:
            raise ValueError(f"cvvp_amount must be a number in [0, 1], got {cvvp_amount!r}")
        if cvvp_amount > 0:
            self._need("cvvp")
            if voice_samples is None:
                raise ValueError("cvvp_amount > 0 needs voice_samples: CVVP compares the candidates with the voice "
                                 "clips' conditioning mels, which conditioning latents do not carry (tortoise needs "
                                 "the clips too); pass the clips, or cvvp_amount=0")
        self._check_max_mel_tokens(max_mel_tokens)
        if num_autoregressive_samples < 1 or k < 1 or k > num_autoregressive_samples:
            raise ValueError(f"need 1 <= k ({k}) <= num_autoregressive_samples ({num_autoregressive_samples})")
        rng = as_generator(seed)
        stats = {}
        t0 = time.perf_counter()
        text_tokens = self._text_tokens(text)
        auto_conds = None  # the clips' conditioning mels (1, n_clips, 80, T), which CVVP compares with
        if voice_samples is not None:
            auto_conditioning, diffusion_conditioning, auto_conds, _ = self.get_conditioning_latents(
                voice_samples, return_mels=True, seed=rng)
        elif conditioning_latents is not None:
            if isinstance(conditioning_latents, (str, os.PathLike)):  # a .npz or tortoise .pth latents file
                from .voices import load_latents
                conditioning_latents = load_latents(conditioning_latents)
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
        # every sample asked for: a last, smaller batch takes the remainder (tortoise silently drops it)
        batches = [batch_size] * (num_autoregressive_samples // batch_size)
        if num_autoregressive_samples % batch_size:
            batches.append(num_autoregressive_samples % batch_size)
        progress = _progress(len(batches) * max_mel_tokens, "autoregressive", verbose)
        for b, rows in enumerate(batches):
            done = b * max_mel_tokens
            codes = self.autoregressive.inference_speech(
                auto_conditioning, text_tokens, num_return_sequences=rows, max_generate_length=max_mel_tokens,
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
        clip_results = self.score_candidates(text_tokens, samples, batch_size, cvvp_amount, auto_conds, verbose)
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

    @serialized
    def score_candidates(self, text_tokens, samples, batch_size: int = 16, cvvp_amount: float = 0.0,
                         auto_conds=None, verbose: bool = False) -> np.ndarray:
        """tortoise's candidate scores (N,) for fixed codes ``samples`` (N, S): CLVP's, mixed with CVVP's as
        ``cvvp * cvvp_amount + clvp * (1 - cvvp_amount)`` when ``cvvp_amount`` > 0, CVVP's being the mean over the
        clips' conditioning mels ``auto_conds`` (1, n_clips, 80, T) (get_conditioning_latents(return_mels=True));
        per batch of ``batch_size`` candidates, as tortoise/api.py."""
        if cvvp_amount > 0 and auto_conds is None:
            raise ValueError("cvvp_amount > 0 needs the voice clips' conditioning mels (auto_conds)")
        if verbose:
            log.info("Computing best candidates using " + ("CLVP" if not cvvp_amount else
                     f"CLVP {(1 - cvvp_amount) * 100:2.0f}% and CVVP {cvvp_amount * 100:2.0f}%"))
        results = []
        for batch in np.split(samples, range(batch_size, len(samples), batch_size)):
            clvp_out = (self.clvp.forward(np.repeat(text_tokens, len(batch), axis=0), batch)
                        if cvvp_amount != 1 else None)
            if cvvp_amount > 0:
                cvvp = self.cvvp.score(auto_conds, batch)
                results.append(cvvp if cvvp_amount == 1 else
                               cvvp * np.float32(cvvp_amount) + clvp_out * np.float32(1 - cvvp_amount))
            else:
                results.append(clvp_out)
        return np.concatenate(results).astype(np.float32, copy=False)


    # -- api_fast.py's path: one AR sample, its latents, HiFi-GAN -----------------------------------------------
    def _need_hifigan(self) -> None:
        self._need("autoregressive")
        if self.hifi_decoder is None:
            raise MissingComponent(
                f"{self.model_file.path} has no hifigan component (tortoise api_fast.py's HiFi-GAN decoder, "
                "hifidecoder.pth), which decoder='hifigan' and tts_stream need: put hifidecoder.pth in the models "
                f"folder and convert again (python -m tortoise_ggml.convert MODELS_DIR -o {self.model_file.path}; "
                "the converter includes hifidecoder.pth whenever it is there)")

    def _fast_prepare(self, text: str, voice_samples, conditioning_latents, rng, max_mel_tokens: int):
        """Text tokens and the autoregressive conditioning latent (1, model_dim) for the HiFi-GAN path: from clips,
        given latents (a get_conditioning_latents pair or the AR latent alone), or a random voice (rlg_auto)."""
        self._need_hifigan()
        ar = self.autoregressive
        self._check_max_mel_tokens(max_mel_tokens)
        text_tokens = self._text_tokens(text)
        if voice_samples is not None:
            auto_conditioning = self._auto_conditioning(voice_samples, rng)[2]
        elif conditioning_latents is not None:
            auto_conditioning = (conditioning_latents[0] if isinstance(conditioning_latents, (tuple, list))
                                 else conditioning_latents)
        else:
            self._need("rlg_auto")
            auto_conditioning = self.rlg_auto.sample(rng, 1)
        auto_conditioning = np.asarray(auto_conditioning, dtype=np.float32).reshape(1, -1) \
            if np.size(auto_conditioning) == ar.model_dim else np.asarray(auto_conditioning)
        if auto_conditioning.shape != (1, ar.model_dim) or not np.isfinite(auto_conditioning).all():
            raise ValueError(f"the autoregressive conditioning latent must be ({ar.model_dim},) or "
                             f"(1, {ar.model_dim}) finite floats, got shape {np.shape(auto_conditioning)}")
        return text_tokens, auto_conditioning

    def _tts_hifigan(self, text, voice_samples, conditioning_latents, verbose, seed, temperature,
                     repetition_penalty, top_p, top_k, max_mel_tokens, return_stats):
        """api_fast.py's tts(): one sample, the teacher-forced latents of its codes, HiFi-GAN (under tts()'s lock)."""
        rng = as_generator(seed)
        stats = {}
        t0 = time.perf_counter()
        text_tokens, auto_conditioning = self._fast_prepare(text, voice_samples, conditioning_latents, rng,
                                                            max_mel_tokens)
        stats["conditioning_s"] = time.perf_counter() - t0
        ar = self.autoregressive
        t0 = time.perf_counter()
        progress = _progress(max_mel_tokens, "autoregressive", verbose)
        codes = ar.inference_speech(auto_conditioning, text_tokens, num_return_sequences=1,
                                    max_generate_length=max_mel_tokens, do_sample=True, top_p=top_p,
                                    temperature=temperature, repetition_penalty=repetition_penalty, top_k=top_k,
                                    rng=rng, mel_positions=self.mel_positions,
                                    progress=(lambda n, total: progress(n)) if progress else None)
        if progress:
            progress.close()
        stats["autoregressive_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents = ar.forward(auto_conditioning, text_tokens, np.array([text_tokens.shape[-1]]), codes,
                             np.array([codes.shape[-1] * ar.mel_length_compression]), return_latent=True,
                             clip_inputs=False)
        stats["latents_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        wav = self.hifi_decoder.inference(latents, auto_conditioning)[0]              # (1, samples)
        stats["hifigan_s"] = time.perf_counter() - t0
        return (wav, stats) if return_stats else wav

    def tts_stream(self, text: str, voice_samples=None, conditioning_latents=None, verbose: bool = False,
                   seed=None, overlap_wav_len: int = 1024, stream_chunk_size: int = 40, temperature: float = .8,
                   length_penalty: float = 1, repetition_penalty: float = 2.0, top_p: float = .8, top_k: int = 50,
                   max_mel_tokens: int = 500, do_sample: bool = True, first_buffer: int = STREAM_FIRST_BUFFER):
        """Speak ``text`` as it is generated: a generator of float32 chunks (samples,) at 24 kHz, with
        tortoise/api_fast.py tts_stream's semantics. One autoregressive sample is decoded step by step; each step's
        latent is the final norm of its last hidden state (taken from the decode step, as tortoise's stream
        generator yields it). After the first ``first_buffer`` codes (api_fast: 60; fewer give the first audio
        sooner), then every ``stream_chunk_size`` codes, and once at the end, the latents so far are decoded by
        HiFi-GAN and joined as api_fast's handle_chunks does: each chunk is the audio after the previous one's,
        its first ``overlap_wav_len`` samples a linear crossfade with the previous decode's last
        ``overlap_wav_len`` samples, which that chunk held back (so, as in tortoise, the last ``overlap_wav_len``
        samples of the utterance are never yielded).

        Unlike tortoise, each decode computes only the new audio and its receptive field
        (HifiganGenerator.decode), not all the audio so far: the same samples up to float rounding, at a cost
        that does not grow with the utterance. Voice as tts(decoder="hifigan"): ``voice_samples``, else
        ``conditioning_latents`` (a pair, or the autoregressive latent alone), else a random voice (rlg_auto).
        ``max_mel_tokens`` caps the codes (tortoise's stream caps prompt + codes at 500 instead). ``seed``: int or
        numpy Generator: with the same seed the codes are those of tts(decoder="hifigan"). Bad arguments raise
        here, before anything is generated. Returns a SpeechStream (an iterator of chunks, with the codes, latents
        and timings so far); closing or dropping it frees its KV cache.
        """
        started = time.perf_counter()
        for name, value, low in (("stream_chunk_size", stream_chunk_size, 1), ("overlap_wav_len", overlap_wav_len, 0),
                                 ("first_buffer", first_buffer, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        with self._lock:
            self._need_hifigan()
            hop = self.hifi_decoder.hop_length
            from .models.hifigan_decoder import upsampled_frames
            # the fewest samples a chunk of stream_chunk_size codes adds (frames are floored), and the first chunk
            chunk_samples = min(hop * (upsampled_frames(stream_chunk_size + 1) - upsampled_frames(1)),
                                hop * upsampled_frames(max(stream_chunk_size, first_buffer)) - overlap_wav_len)
            if overlap_wav_len > chunk_samples:
                raise ValueError(f"overlap_wav_len ({overlap_wav_len} samples) is longer than a chunk: "
                                 f"{stream_chunk_size} codes make at least {chunk_samples} samples")
            rng = as_generator(seed)
            text_tokens, auto_conditioning = self._fast_prepare(text, voice_samples, conditioning_latents, rng,
                                                                max_mel_tokens)
            codes = self.autoregressive.inference_speech_stream(
                auto_conditioning, text_tokens, max_generate_length=max_mel_tokens, do_sample=do_sample,
                top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty, top_k=top_k, rng=rng,
                mel_positions=self.mel_positions)
        return SpeechStream(self, codes, auto_conditioning, int(stream_chunk_size), int(overlap_wav_len), verbose,
                            started, int(first_buffer))


class SpeechStream:
    """What tts_stream returns: an iterator of float32 audio chunks (samples,) at 24 kHz, with what it has made so
    far: ``codes`` (the generated codes, the stop code included), ``latents`` (N, model_dim) (one per code: the
    final-normed hidden state it was sampled from) and ``stats`` (seconds: ``first_chunk_s`` from the call to the
    first chunk, ``autoregressive_s``, ``hifigan_s``, ``elapsed_s``; ``audio_s`` yielded). ``close()`` (or
    dropping it) stops the generation and frees its KV cache.

    The TextToSpeech's lock is held while a step computes, never across a yield: a consumer may pause as long as it
    likes, but another call on the same TextToSpeech meanwhile takes the KV cache over, and the stream then raises.
    """

    def __init__(self, tts: TextToSpeech, codes, auto_conditioning: np.ndarray, chunk_size: int, overlap: int,
                 verbose: bool, started: float, first_buffer: int = STREAM_FIRST_BUFFER):
        self.codes: list[int] = []
        self._latents: list[np.ndarray] = []
        self.stats = {"first_chunk_s": None, "autoregressive_s": 0.0, "hifigan_s": 0.0, "elapsed_s": 0.0,
                      "audio_s": 0.0}
        self._steps = codes
        # the generator gets the lists, not the stream: no reference cycle, so dropping the stream frees it at once
        self._gen = _stream_chunks(tts, codes, auto_conditioning, chunk_size, overlap, verbose, started, self.codes,
                                   self._latents, self.stats, first_buffer)

    @property
    def latents(self) -> np.ndarray:
        return np.stack(self._latents) if self._latents else np.zeros((0, 0), np.float32)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self._steps.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass



def _stream_chunks(tts: TextToSpeech, codes, auto_conditioning, chunk_size: int, overlap: int, verbose: bool,
                   started: float, code_list: list, latents: list, stats: dict, first_buffer: int):
    """SpeechStream's generator: api_fast.py's tts_stream loop and its handle_chunks, decoding only new audio."""
    from .models.hifigan_decoder import upsample_latents
    hifi = tts.hifi_decoder
    hop = hifi.hop_length
    rate = tts.audio_config.output_sample_rate
    pending = 0
    prev_len, tail = None, None       # api_fast's wav_gen_prev.shape[0] and wav_overlap
    ended = False
    try:
        while not ended:
            with tts._lock:
                t0 = time.perf_counter()
                try:
                    code, latent = next(codes)
                    latents.append(latent)
                    code_list.append(code)
                    pending += 1
                except StopIteration:
                    ended = True
                stats["autoregressive_s"] += time.perf_counter() - t0
                if not ended and pending < max(chunk_size, first_buffer):
                    continue
                first_buffer, pending = 0, 0
                if not latents:
                    break
                t0 = time.perf_counter()
                frames = upsample_latents(np.stack(latents)[None])                   # (1, F, d)
                total = frames.shape[1] * hop                                           # api_fast's len(wav_gen)
                if prev_len is not None and total <= prev_len:
                    continue                                                            # nothing new
                start = 0 if prev_len is None else max(prev_len - overlap, 0)
                first = start // hop
                wav = hifi.decode(frames, auto_conditioning, first, frames.shape[1])[0, :, 0]
                wav = wav[start - first * hop:]                                         # wav_gen[start:]
                chunk = wav[:max(total - overlap - start, 0)].copy()                    # ...[:-overlap]
                if tail is not None and overlap:
                    n = min(overlap, chunk.shape[0])
                    ramp_up, ramp_down = _linspace(0.0, 1.0, overlap)[:n], _linspace(1.0, 0.0, overlap)[:n]
                    chunk[:n] = tail[:n] * ramp_down + chunk[:n] * ramp_up
                tail = wav[wav.shape[0] - overlap:].copy() if overlap else None
                prev_len = total
                stats["hifigan_s"] += time.perf_counter() - t0
            if chunk.shape[0]:
                stats["audio_s"] += chunk.shape[0] / rate
                stats["elapsed_s"] = time.perf_counter() - started
                if stats["first_chunk_s"] is None:
                    stats["first_chunk_s"] = stats["elapsed_s"]
                if verbose:
                    log.info("stream: %d codes, %.2f s of audio in %.2f s", len(latents), stats["audio_s"],
                             stats["elapsed_s"])
                yield chunk
    finally:
        codes.close()  # releases the KV cache (also when the consumer stops early)
        stats["elapsed_s"] = time.perf_counter() - started


def _linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32 as torch's CPU kernel computes it (from both ends)."""
    if steps == 1:
        return np.array([start], np.float32)
    f = np.float32
    step = (f(end) - f(start)) / f(steps - 1)
    idx = np.arange(steps)
    half = steps // 2
    lo = f(start) + step * idx[:half].astype(np.float32)
    hi = f(end) - step * (steps - idx[half:] - 1).astype(np.float32)
    return np.concatenate([lo, hi]).astype(np.float32)


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
    """Write a float waveform (samples,) or (1, samples) as 16-bit PCM (soundfile; the format from the extension,
    .wav when none). Atomic: written to a temporary file beside ``path``, then renamed, so a full disk or an
    interruption never leaves a truncated file (or destroys the one that was there)."""
    import soundfile
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1:
        raise ValueError(f"write_wav takes one mono clip (samples,) or (1, samples), got shape {wav.shape}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower() or ".wav"
    fmt = soundfile.available_formats().get(ext[1:].upper())
    if fmt is None:
        raise ValueError(f"{path}: unknown audio format {ext!r} (soundfile writes "
                         f"{', '.join(sorted(soundfile.available_formats()))})")
    subtype = "PCM_16" if ext[1:].upper() in ("WAV", "FLAC", "AIFF") else None
    with atomic_path(path) as tmp:
        soundfile.write(tmp, np.clip(wav, -1.0, 1.0), sample_rate, subtype=subtype, format=ext[1:].upper())
