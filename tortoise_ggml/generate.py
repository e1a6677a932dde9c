"""Command line: text -> speech, or mel -> wav.

    python -m tortoise_ggml.generate --model tortoise.gguf --text "Hello." --voice voices/me -o hello.wav
    python -m tortoise_ggml.generate --model tortoise.gguf --mel mel.npy -o out.wav      # vocoder only

With no --text the embedded default sentence is spoken; with no --voice a random voice is drawn. A voice is a
directory of clips (wav/mp3/flac, any rate), a name stored in the model file (convert --voices), or "random".
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time

import numpy as np

DEFAULT_TEXT = "Tortoise is a text to speech program built with priorities on multi-voice capabilities and realism."
AUDIO_EXTS = (".wav", ".mp3", ".flac", ".ogg")


class UsageError(Exception):
    pass


def load_voice(tts, voice: str | None, seed):
    """Conditioning latents for --voice: random, a stored voice name, or a directory of clips."""
    from .api import AR_SAMPLE_RATE
    from .utils.audio import load_audio
    if voice is None or voice == "random":
        return tts.get_random_conditioning_latents(seed=seed)
    if os.path.isdir(voice):
        clips = sorted(p for p in glob.glob(os.path.join(voice, "*")) if p.lower().endswith(AUDIO_EXTS))
        if not clips:
            raise UsageError(f"voice directory {voice!r} holds no audio clips ({', '.join(AUDIO_EXTS)})")
        return tts.get_conditioning_latents([load_audio(c, AR_SAMPLE_RATE)[0] for c in clips], seed=seed)
    stored = tts.model_file.voices
    if voice in stored:
        v = tts.model_file.voice(voice)
        return v["autoregressive"], v.get("diffusion")
    raise UsageError(f"unknown voice {voice!r}: not a directory, and the model file stores "
                     f"{', '.join(stored) if stored else 'no voices'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tortoise_ggml.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("TORTOISE_GGML_MODEL", "tortoise.gguf"),
                    help="GGUF from python -m tortoise_ggml.convert (default: $TORTOISE_GGML_MODEL or tortoise.gguf)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to speak (default: an embedded sentence)")
    src.add_argument("--textfile", help="file with the text to speak")
    src.add_argument("--mel", help="vocode this mel spectrogram (.npy, (n_mels, T) or (1, n_mels, T)) instead")
    ap.add_argument("--voice", default=None, help="clips directory, stored voice name, or 'random' (default)")
    from .api import PRESETS
    from .utils.diffusion import SAMPLERS
    ap.add_argument("--preset", default="fast", choices=list(PRESETS))
    ap.add_argument("--sampler", default=None, choices=SAMPLERS,
                    help="diffusion sampler, as tortoise-tts-fast's --sampler (default: the preset's, else p)")
    ap.add_argument("--candidates", type=int, default=1, help="clips to write (best by CLVP)")
    ap.add_argument("--num-autoregressive-samples", type=int, default=None, help="override the preset")
    ap.add_argument("--diffusion-iterations", "--steps", type=int, default=None, dest="diffusion_iterations",
                    help="diffusion steps (override the preset)")
    ap.add_argument("--max-mel-tokens", type=int, default=None, help="longest code sequence (default 500)")
    ap.add_argument("--mel-positions", default="fixed", choices=["fixed", "original"],
                    help="AR mel position scheme (original reproduces tortoise's KV-cache offset)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("-o", "--output", default="tortoise.wav", help="output wav (k > 1: NAME_0.wav, NAME_1.wav, ...)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    from .api import TextToSpeech, write_wav
    try:
        if not os.path.isfile(args.model):
            raise UsageError(f"no model file {args.model!r}: convert the checkpoints first "
                             "(python -m tortoise_ggml.convert MODELS_DIR -o tortoise.gguf) or pass --model")
        if args.mel:
            mel = np.load(args.mel)
            if mel.ndim == 2:
                mel = mel[None]
            tts = TextToSpeech(args.model, device=args.device, threads=args.threads, components=["vocoder"])
            t0 = time.perf_counter()
            wav = tts.vocoder.inference(mel, seed=args.seed)
            rate = tts.audio_config.output_sample_rate
            write_wav(args.output, wav[0], rate)
            _say(args, f"wrote {args.output} ({wav.shape[-1] / rate:.2f} s of audio in "
                       f"{time.perf_counter() - t0:.2f} s)")
            return 0
        text = args.text
        if args.textfile:
            with open(args.textfile, encoding="utf-8") as f:
                text = f.read()
        text = DEFAULT_TEXT if text is None else text
        if not text.strip():
            raise UsageError("the text is empty")
        tts = TextToSpeech(args.model, device=args.device, threads=args.threads)
        rng = np.random.default_rng(args.seed)
        latents = load_voice(tts, args.voice, rng)
        # 0 is a value (and an error the API names), not "use the preset"
        overrides = {name: getattr(args, name) for name in ("num_autoregressive_samples", "diffusion_iterations",
                                                            "max_mel_tokens", "sampler")
                     if getattr(args, name) is not None}
        t0 = time.perf_counter()
        res, stats = tts.tts_with_preset(text, preset=args.preset, conditioning_latents=latents,
                                         k=args.candidates, seed=rng, verbose=not args.quiet, return_stats=True,
                                         **overrides)
        elapsed = time.perf_counter() - t0
        clips = res if isinstance(res, list) else [res]
        stem, ext = os.path.splitext(args.output)
        for i, wav in enumerate(clips):
            path = args.output if len(clips) == 1 else f"{stem}_{i}{ext or '.wav'}"
            rate = tts.audio_config.output_sample_rate
            write_wav(path, wav, rate)
            _say(args, f"wrote {path} ({wav.shape[-1] / rate:.2f} s of audio)")
        _say(args, f"{elapsed:.1f} s: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in stats.items()))
        return 0
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg)


if __name__ == "__main__":
    sys.exit(main())
