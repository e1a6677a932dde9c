"""Front-end benchmark: tokenizer, conditioning mels, resampling and the random-latent generators at the full
(api.py) size, ours vs the PyTorch reference (tortoise-tts 3.0.0) on the same inputs and random weights.

    python benchmarks/frontend.py [--threads 2] [--backend cpu|cuda] [--iters 5]

Prints one row per stage: median wall time of each side and the largest absolute difference of the outputs.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from reference import oracle  # noqa: E402  (installs the torchaudio stand-in, imports torch + tortoise)

import pyggml as pg  # noqa: E402
from tortoise_ggml.convert import convert  # noqa: E402
from tortoise_ggml.models.random_latent_generator import RandomLatentConverter  # noqa: E402
from tortoise_ggml.utils import audio, text  # noqa: E402
from tortoise_ggml.weights.model_file import ModelFile  # noqa: E402


def _median_s(fn, iters):
    fn()  # warm-up: caches, lazy imports, graph allocator
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _diff(a, b):
    if isinstance(a, list):
        return "equal" if a == b else "DIFFER"
    return f"{np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max():.2e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    be = pg.Backend(a.backend, threads=a.threads) if a.backend == "cpu" else pg.Backend(a.backend)

    from torchaudio.functional import resample
    from tortoise.api import format_conditioning, pad_or_truncate
    from tortoise.models.arch_util import TorchMelSpectrogram
    from tortoise.utils.audio import wav_to_univnet_mel
    from tortoise.utils.tokenizer import VoiceBpeTokenizer

    rows = []

    def row(name, ours_fn, ref_fn):
        got, ref = ours_fn(), ref_fn()
        rows.append((name, _median_s(ours_fn, a.iters), _median_s(ref_fn, a.iters), _diff(got, ref)))
        print(f"  measured {name}", file=sys.stderr, flush=True)

    ref_tok = VoiceBpeTokenizer()
    from tortoise.utils import tokenizer as ref_tok_mod
    tok = text.VoiceBpeTokenizer(ref_tok_mod.DEFAULT_VOCAB_FILE)
    row("tokenize SAMPLE_TEXT", lambda: tok.encode(oracle.SAMPLE_TEXT), lambda: ref_tok.encode(oracle.SAMPLE_TEXT))

    norms = TorchMelSpectrogram().mel_norms
    g = np.random.default_rng(0)
    clip = (0.1 * g.standard_normal(132300)).astype(np.float32)   # 6 s at 22.05 kHz, as format_conditioning keeps
    clip_t = torch.from_numpy(clip)[None]
    with torch.no_grad():
        row("AR cond mels (6 s clip)", lambda: audio.format_conditioning(clip, norms.numpy()),
            lambda: format_conditioning(clip_t, device="cpu")[0].numpy())
        row("resample 22.05->24 kHz (6 s)", lambda: audio.resample(clip, 22050, 24000),
            lambda: resample(clip_t[0], 22050, 24000).numpy())
        clip24 = audio.pad_or_truncate(audio.resample(clip[None], 22050, 24000), 102400)
        clip24_t = pad_or_truncate(resample(clip_t, 22050, 24000), 102400)
        # the reference rebuilds its STFT (a 1026x1024 pseudo-inverse) on every call: that is part of its cost
        row("univnet mels (102400 @ 24 kHz)", lambda: audio.wav_to_univnet_mel(clip24),
            lambda: wav_to_univnet_mel(clip24_t, do_normalization=False, device="cpu").numpy())

        with tempfile.TemporaryDirectory() as d:
            oracle.save_all("full", d, seed=0, names=["rlg_auto", "rlg_diffuser"])
            path = convert(d, os.path.join(d, "rlg-f32.gguf"), type="f32", components=["rlg_auto", "rlg_diffuser"])
            mf = ModelFile(path, be)
            for comp in ("rlg_auto", "rlg_diffuser"):
                ref = oracle.load(comp, "full", d)
                ours = RandomLatentConverter(mf, component=comp)
                noise = g.standard_normal((1, ours.channels)).astype(np.float32)
                noise_t = torch.from_numpy(noise)
                row(f"{comp} ({ours.channels} ch, batch 1)", lambda: ours(noise),
                    lambda: ref.layers(noise_t).numpy())

    print(f"\nfront-end: ours ({be!r}) vs reference (torch {torch.__version__}, {a.threads} threads), "
          f"median of {a.iters}")
    print(f"{'stage':34s} {'ours ms':>10s} {'ref ms':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, t_ours, t_ref, diff in rows:
        print(f"{name:34s} {t_ours * 1e3:10.2f} {t_ref * 1e3:10.2f} {t_ref / t_ours:8.2f}x {diff:>11s}")


if __name__ == "__main__":
    main()
