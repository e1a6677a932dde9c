"""python -m tortoise_ggml.get_conditioning_latents: save a voice's conditioning latents (tortoise's
get_conditioning_latents.py).

    python -m tortoise_ggml.get_conditioning_latents --model tortoise.gguf --voice voices/me -o me.npz
    python -m tortoise_ggml.get_conditioning_latents --voice pat,emma --voices-dir voices --output_path latents/

The latents (autoregressive (1, model_dim), diffusion (1, 2*model_channels)) are expressive: they can feed other
models, be edited and given back (``--voice me.npz``, ``TextToSpeech.tts(conditioning_latents="me.npz")``). ``.npz``
needs nothing but numpy; ``.pth`` is tortoise's format (torch tensors, which tortoise's load_voice reads) and needs
torch. A voice is anything --voice takes elsewhere (tortoise_ggml.voices), "a&b" mixes included.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tortoise_ggml.get_conditioning_latents", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("TORTOISE_GGML_MODEL", "tortoise.gguf"),
                    help="GGUF from python -m tortoise_ggml.convert (default: $TORTOISE_GGML_MODEL or tortoise.gguf)")
    ap.add_argument("--voice", required=True,
                    help="a folder of clips, a stored or --voices-dir voice name, a latents file, 'a&b' (a mix); "
                    "comma-separated: several voices (with --output_path)")
    ap.add_argument("--voices-dir", "--voices_dir", action="append", default=[], dest="voices_dir",
                    help="a folder of voice folders (tortoise's extra_voice_dirs); may repeat")
    ap.add_argument("-o", "--output", default=None, help="the latents file, .npz or .pth (one voice)")
    ap.add_argument("--output_path", "--output-path", dest="output_path", default=None,
                    help="a folder for VOICE.npz (VOICE.pth with --format pth) per voice")
    ap.add_argument("--format", default="npz", choices=["npz", "pth"], help="file format with --output_path")
    ap.add_argument("--seed", type=int, default=None,
                    help="crop seed for clips longer than 6 s (default: tortoise_ggml.voices.CROP_SEED)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    from . import voices as vc
    try:
        specs = vc.split_voices(args.voice)
        if (args.output is None) == (args.output_path is None):
            raise vc.VoiceError("give -o FILE (one voice) or --output_path FOLDER")
        if args.output is not None:
            if len(specs) > 1:
                raise vc.VoiceError(f"-o names one file for {len(specs)} voices: use --output_path FOLDER")
            if not args.output.lower().endswith(vc.LATENT_EXTS):
                raise vc.VoiceError(f"-o {args.output!r}: latents files end in .npz (or .pth, tortoise's format)")
            folder = os.path.dirname(os.path.abspath(args.output))
            if not os.path.isdir(folder):
                raise vc.VoiceError(f"output folder {folder!r} does not exist")
            targets = [args.output]
        else:
            os.makedirs(args.output_path, exist_ok=True)
            targets = [os.path.join(args.output_path, f"{_file_stem(s)}.{args.format}") for s in specs]
        if args.format == "pth" or any(t.lower().endswith(".pth") for t in targets):
            vc._torch("writing .pth latents")      # fail before the work, not after it
        if not os.path.isfile(args.model):
            raise vc.VoiceError(f"no model file {args.model!r}: convert the checkpoints first (python -m "
                                "tortoise_ggml.convert MODELS_DIR -o tortoise.gguf) or pass --model")
        from .api import TextToSpeech
        tts = TextToSpeech(args.model, device=args.device, threads=args.threads,
                           components=_components(args.model))
        seed = vc.CROP_SEED if args.seed is None else args.seed
        for spec, target in zip(specs, targets):
            latents = vc.conditioning_latents(tts, spec, args.voices_dir, seed=seed)
            vc.save_latents(target, latents)
            if not args.quiet:
                print(f"wrote {target} (autoregressive {tuple(latents[0].shape)}, diffusion "
                      f"{tuple(latents[1].shape)})")
        return 0
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _file_stem(spec: str) -> str:
    from .read import voice_folder
    return voice_folder(spec)


def _components(model: str):
    """The components get_conditioning_latents needs (and the random-latent generators, for 'random')."""
    import pyggml as pg

    from .weights.model_file import ModelFile
    with ModelFile(model, pg.Backend("cpu", threads=1), components=[]) as mf:
        have = mf.available_components
    return [c for c in ("autoregressive", "diffusion", "rlg_auto", "rlg_diffuser") if c in have]


if __name__ == "__main__":
    sys.exit(main())
