"""Diffusion decoder benchmark: ours (ggml) vs the PyTorch reference (tortoise-tts 3.0.0) at the full (api.py) size
on the same random weights and inputs, ~5 s of audio (108 AR latents -> 470 mel frames).

    python benchmarks/bench_diffusion.py [--threads 2] [--codes 108] [--type f32] [--repeat 2] [--backend cpu]

Rows:
  * timestep_independent: the latent conditioner over the AR latents, once per utterance.
  * step (cond + cond-free): one sampling step with conditioning-free guidance; the reference calls the model
    twice (batch 1 each, as its p_mean_variance does), ours computes both in one graph of batch 2.
Each side runs in its own child process (ours without torch imported), so each peak RSS is that side's own. Each
child runs once untimed (warm-up), then reports the fastest of ``--repeat`` runs. ``max |diff|`` compares the
outputs (the step's: both halves). The random checkpoint and its GGUF are cached under
~/.cache/tortoise-ggml/bench_diffusion.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from _common import HERE, TESTS, add_child_args, child_backend, full_size_model, peak_rss_mb, run_child, timed_runs

TIMESTEP = 500


def _fastest(fn, repeat):
    fn()  # warm-up: graph build and allocation, lazy imports, caches
    out, times, _ = timed_runs(fn, repeat)
    return out, min(times)


def _child(a) -> None:
    """Time one side on the inputs in a.workdir; print one JSON line, save the outputs."""
    lat = np.load(os.path.join(a.workdir, "latents.npy"))
    cond = np.load(os.path.join(a.workdir, "cond.npy"))
    x = np.load(os.path.join(a.workdir, "x.npy"))
    length = x.shape[-1]
    res = {}
    if a.child == "ours":
        from tortoise_ggml.models.diffusion_decoder import DiffusionTts
        from tortoise_ggml.weights.model_file import ModelFile
        be = child_backend(a)
        model = DiffusionTts(ModelFile(a.gguf, be, components=["diffusion"]), be)
        res["weights_mb"] = model.model_file.nbytes / 2**20

        def precompute():
            return model.timestep_independent(lat, cond, length)

        def step(pre):
            both = model.forward(np.concatenate([x, x]), [TIMESTEP, TIMESTEP],
                                 precomputed_aligned_embeddings=np.concatenate([pre, pre]),
                                 conditioning_free=np.array([False, True]))
            return both
    else:
        sys.path.insert(0, TESTS)
        import torch
        from reference import oracle
        torch.set_num_threads(a.threads)
        ref = oracle.load("diffusion", "full", ckpt=a.ckpt)
        t = torch.tensor([TIMESTEP])

        def precompute():
            return oracle.diffusion_precompute(ref, torch.from_numpy(lat), torch.from_numpy(cond)).numpy()

        def step(pre):
            pre_t, xt = torch.from_numpy(pre), torch.from_numpy(x)
            return np.concatenate([oracle.diffusion_step(ref, xt, t, pre_t).numpy(),
                                   oracle.diffusion_step(ref, xt, t, pre_t, conditioning_free=True).numpy()])
    res["rss_loaded_mb"] = peak_rss_mb()
    pre, res["timestep_independent_s"] = _fastest(precompute, a.repeat)
    out, res["step_s"] = _fastest(lambda: step(pre), a.repeat)
    res["peak_rss_mb"] = peak_rss_mb()
    if a.child == "ours":
        res["graph_mb"] = model.backend.allocator.size / 2**20
        res["graph_nodes"] = model.last_graph_nodes
    np.save(os.path.join(a.workdir, f"pre_{a.child}.npy"), pre)
    np.save(os.path.join(a.workdir, f"step_{a.child}.npy"), out)
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--codes", type=int, default=108, help="AR latents (108 -> 470 mel frames, ~5 s)")
    ap.add_argument("--type", default="f32", help="GGUF type: f32, f16 or q8_0 (weight matrices only)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    add_child_args(ap)
    a = ap.parse_args()
    if a.child:
        return _child(a)

    ckpt, ggufs = full_size_model("diffusion", [a.type])
    gguf = ggufs[a.type]
    sys.path.insert(0, os.path.dirname(HERE))
    from tortoise_ggml.models.config import AudioConfig
    length = AudioConfig().diffusion_frames(a.codes, 1024)  # tortoise's codes * 4 * 24000 // 22050
    rng = np.random.default_rng(0)
    res = {}
    with tempfile.TemporaryDirectory() as work:
        np.save(os.path.join(work, "latents.npy"), rng.standard_normal((1, a.codes, 1024)).astype(np.float32))
        np.save(os.path.join(work, "cond.npy"), rng.standard_normal((1, 2048)).astype(np.float32))
        np.save(os.path.join(work, "x.npy"), rng.standard_normal((1, 100, length)).astype(np.float32))
        options = ["--threads", str(a.threads), "--backend", a.backend, "--repeat", str(a.repeat)]
        for side in ("ours", "ref"):
            res[side] = run_child(__file__, side, work, gguf, ckpt, options)
        diff = {k: float(np.abs(np.load(os.path.join(work, f"{k}_ours.npy")).astype(np.float64)
                                - np.load(os.path.join(work, f"{k}_ref.npy"))).max()) for k in ("pre", "step")}
        peak = {k: float(np.abs(np.load(os.path.join(work, f"{k}_ref.npy"))).max()) for k in ("pre", "step")}

    o, r = res["ours"], res["ref"]
    print(f"\nDiffusion decoder, full size (1024 ch, 10 layers, 16 heads), {a.codes} latents -> {length} frames, "
          f"{a.backend} ({a.threads} threads), GGUF {a.type}, fastest of {a.repeat}\n")
    print("| stage | ours (s) | PyTorch (s) | speed-up | max abs diff (peak) |")
    print("|---|---|---|---|---|")
    print(f"| timestep_independent | {o['timestep_independent_s']:.3f} | {r['timestep_independent_s']:.3f} | "
          f"{r['timestep_independent_s'] / o['timestep_independent_s']:.2f}x | {diff['pre']:.2e} ({peak['pre']:.1f}) |")
    print(f"| step (cond + cond-free) | {o['step_s']:.3f} | {r['step_s']:.3f} | {r['step_s'] / o['step_s']:.2f}x | "
          f"{diff['step']:.2e} ({peak['step']:.1f}) |")
    print(f"| peak RSS (MB) | {o['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | | |")
    print(f"\nours: weights {o['weights_mb']:.0f} MB, step graph {o['graph_nodes']} nodes, compute buffer "
          f"{o['graph_mb']:.0f} MB")


if __name__ == "__main__":
    main()
