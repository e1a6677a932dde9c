"""python -m tortoise_ggml.convert: Tortoise's release checkpoints (.pth) into one GGUF file.

    python -m tortoise_ggml.convert MODELS_DIR -o tortoise.gguf [--type f32|f16|q8_0] [--components a,b]
                                    [--voices DIR]

The work is tortoise_ggml.weights.convert's; this is the command line over it.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .weights.checkpoints import CheckpointError
from .weights.convert import TYPES, ConvertError, convert
from .weights.names import TensorNameError
from .weights.registry import COMPONENTS

__all__ = ["convert", "main", "ConvertError"]

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tortoise_ggml.convert",
                                 description="Convert Tortoise .pth checkpoints into one GGUF file.")
    ap.add_argument("models_dir", help="directory with autoregressive.pth, diffusion_decoder.pth, clvp2.pth, ...")
    ap.add_argument("-o", "--output", required=True, help="GGUF file to write")
    ap.add_argument("--type", default="f32", choices=TYPES, help="storage type of the weight matrices")
    ap.add_argument("--components", default=None,
                    help=f"comma-separated subset of: {','.join(COMPONENTS)} (default: every required component, "
                         "and the optional ones whose checkpoint is in MODELS_DIR)")
    ap.add_argument("--voices", default=None,
                    help="tortoise voices dir (DIR/NAME/*.wav|mp3|flac clips, or DIR/NAME/*.pth latents): store "
                    "each voice's conditioning latents (computed from the clips with the checkpoints)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer announces endianness and shard plans
    try:
        convert(a.models_dir, a.output, a.type, a.components, a.voices)
    except (ConvertError, CheckpointError, TensorNameError, OSError) as e:
        msg = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
