#!/usr/bin/env python3
"""Stage timings of tortoise-ggml on one or more backends, from GGUF files alone (no torch, no reference).

    python scripts/device_bench.py --gguf M.gguf [--gguf M2.gguf] [--backends cpu,cuda] [--json OUT.json]
                                   [--repeat 5] [--deadline SECONDS] [--threads N]

benchmarks/bench_*.py compare ours with PyTorch on full-size random weights that tortoise-tts's classes make under
torch; the device machine has no torch in the offline venv, so scripts/device_check.sh times the same stages here
on the model files it carries (skeletons rebuilt by scripts/device_models.py): the small random model, and the
full-size one when scripts/fetch_device_deps.sh --full-size made it. Each stage is called through its numpy entry
point (inputs in, numpy out: device round trips included), once untimed (graph build, allocation, CUDA kernel
loading), then --repeat times; the table shows the median and the fastest (ms).

Stages, as benchmarks/bench_*.py sizes them: AR prefill (text of 80 tokens) and decode steps at batch 1 and 16
(KV cache f32 and f16, sized for 500 new tokens), the AR latent pass over 108 codes (~5 s of speech), CLVP scoring
16 candidates of 500 codes, the diffusion decoder's timestep_independent and one cond + cond-free step at 470
frames, UnivNet and HiFi-GAN (when the file has it) for 5 s of audio, the random-latent generators.
--deadline: stop starting new stages after that many seconds (their rows say "skipped: deadline").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(fn, repeat: int) -> dict:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": len(times)}


def stages(models: dict, mf, rng: np.random.Generator):
    """(name, callable) for every stage the file's components allow."""
    out = []
    ar = models.get("autoregressive")
    if ar is not None:
        text = rng.integers(0, 255, (1, 80)).astype(np.int32)
        cond = rng.standard_normal((1, ar.model_dim)).astype(np.float32)
        codes = rng.integers(0, 8192, (1, 108)).astype(np.int32)
        from tortoise_ggml.models.autoregressive import UnifiedVoice
        for kv in ("f32", "f16"):
            uv = UnifiedVoice(mf, ar.backend, kv_cache_type=kv)
            uv.compute_prefix(cond, text)
            im = uv.inference_model
            for batch in (1, 16):
                def start(im=im, uv=uv, batch=batch):
                    im.start(uv.start_mel_token, batch, 500)

                state = {"k": 0}

                def step(im=im, batch=batch, state=state, start=start):
                    if state["k"] >= 400:
                        start()
                        state["k"] = 0
                    im.decode(np.arange(batch) + state["k"])
                    state["k"] += 1

                def prepare(start=start, state=state):
                    start()
                    state["k"] = 0
                if kv == "f32":
                    out.append((f"AR prefill 80 tokens (b{batch} cache)", start, None))
                out.append((f"AR decode step b{batch} (kv {kv})", step, prepare))
            out.append(("release", im.release, None))   # the next cache would not fit beside it at full size
        # the host's share of a sampled decode step: HF-identical sampling in numpy on (16, vocab) logits (api.py's
        # settings), with a decode that returns at once; 50 steps per call
        from tortoise_ggml.utils import sampling
        logits16 = rng.standard_normal((16, ar.number_mel_codes)).astype(np.float32)
        ids16 = np.ones((16, 90), np.int64)
        out.append(("AR host sampling x50 steps b16 (numpy)", lambda: sampling.generate(
            lambda toks: logits16, logits16, ids16, max_new_tokens=50, eos_token_id=None, pad_token_id=None,
            do_sample=True, temperature=0.8, top_k=50, top_p=0.8, repetition_penalty=2.0, rng=0), None))
        out.append(("AR latent pass 108 codes", lambda: ar.forward(
            cond, text, [text.shape[1]], codes, [codes.shape[1] * ar.mel_length_compression], return_latent=True,
            clip_inputs=False), None))
    clvp = models.get("clvp")
    if clvp is not None:
        ctext = rng.integers(0, 255, (1, 90)).astype(np.int32)
        cand = rng.integers(0, 8192, (16, 500)).astype(np.int32)
        out.append(("CLVP 16 x 500 codes", lambda: clvp.forward(ctext, cand), None))
    diff = models.get("diffusion")
    if diff is not None:
        lat = rng.standard_normal((1, 108, diff.in_latent_channels)).astype(np.float32)
        dcond = rng.standard_normal((1, 2 * diff.model_channels)).astype(np.float32)
        length = 470
        pre = diff.timestep_independent(lat, dcond, length)
        x = rng.standard_normal((2, diff.in_channels, length)).astype(np.float32)
        out.append(("diffusion timestep_independent", lambda: diff.timestep_independent(lat, dcond, length), None))
        out.append(("diffusion step 470 frames (cond + cond-free)", lambda: diff.forward(
            x, [500, 500], precomputed_aligned_embeddings=np.concatenate([pre, pre]),
            conditioning_free=np.array([False, True])), None))
    voc = models.get("vocoder")
    if voc is not None:
        mel = (rng.standard_normal((1, voc.mel_channel, 470)) * 2 - 5).astype(np.float32)
        z = rng.standard_normal((1, voc.noise_dim, 480)).astype(np.float32)
        out.append(("UnivNet 5 s", lambda: voc.inference(mel, z), None))
    hifi = models.get("hifi_decoder")
    if hifi is not None:
        hlat = rng.standard_normal((1, 108, hifi.in_channels)).astype(np.float32)
        g = rng.standard_normal((1, hifi.cond_channels)).astype(np.float32)
        out.append(("HiFi-GAN 5 s (108 latents)", lambda: hifi.inference(hlat, g), None))
    for name in ("rlg_auto", "rlg_diffusion"):
        m = models.get(name)
        if m is not None:
            noise = rng.standard_normal((1, m.channels)).astype(np.float32)
            out.append((f"{name} latent", lambda m=m, noise=noise: m.forward(noise), None))
    return out


def run(path: str, backend_name: str, threads: int, repeat: int, deadline: float, t_start: float) -> dict:
    import pyggml as pg
    from tortoise_ggml.weights.model_file import ModelFile
    from tortoise_ggml.weights.registry import REGISTRY
    be = pg.Backend(backend_name, threads=threads) if backend_name == "cpu" else pg.Backend(backend_name)
    t0 = time.perf_counter()
    mf = ModelFile(path, be)
    res = {"load_s": time.perf_counter() - t0, "weights_mib": mf.nbytes / 2**20, "stages": {}}
    models = {}
    for e in REGISTRY.values():
        if e.model is not None and e.name in mf.components:
            try:
                models[e.attribute] = e.model_class()(mf, be, component=e.name)
            except (ImportError, NotImplementedError) as exc:
                res["stages"][e.name] = {"skipped": f"no model: {exc}"}
    for name, fn, prepare in stages(models, mf, np.random.default_rng(0)):
        if name == "release":
            fn()
            continue
        if time.perf_counter() - t_start > deadline:
            res["stages"][name] = {"skipped": "deadline"}
            continue
        try:
            if prepare is not None:
                prepare()
            res["stages"][name] = _timed(fn, repeat)
        except Exception as exc:  # a stage the backend refuses: report it, go on
            res["stages"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"  {os.path.basename(path)} {backend_name}: {name}: {res['stages'][name]}", file=sys.stderr, flush=True)
    return res


def table(results: dict) -> str:
    lines = []
    for path, per_backend in results.items():
        names = list(dict.fromkeys(n for r in per_backend.values() for n in r["stages"]))
        backends = list(per_backend)
        lines.append(f"\n{os.path.basename(path)}: " + ", ".join(
            f"{b} weights {r['weights_mib']:.0f} MiB, loaded in {r['load_s']:.2f} s" for b, r in per_backend.items()))
        lines.append("| stage | " + " | ".join(f"{b} median (min) ms" for b in backends) +
                     (" | cpu / cuda |" if {"cpu", "cuda"} <= set(backends) else " |"))
        lines.append("|---" * (len(backends) + 1 + ({"cpu", "cuda"} <= set(backends))) + "|")
        for n in names:
            cells, med = [], {}
            for b in backends:
                s = per_backend[b]["stages"].get(n, {})
                if "median_ms" in s:
                    med[b] = s["median_ms"]
                    cells.append(f"{s['median_ms']:.2f} ({s['min_ms']:.2f})")
                else:
                    cells.append(s.get("skipped") or (s.get("error", "-")[:60]))
            ratio = [f"{med['cpu'] / med['cuda']:.1f}x" if {"cpu", "cuda"} <= set(med) else ""] \
                if {"cpu", "cuda"} <= set(backends) else []
            lines.append(f"| {n} | " + " | ".join(cells + ratio) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", action="append", required=True)
    ap.add_argument("--backends", default="cpu,cuda")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=float("inf"))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import pyggml as pg
    t_start = time.perf_counter()
    backends = [b for b in a.backends.split(",") if b]
    results = {path: {} for path in a.gguf}
    for b in backends:   # one backend over every file, then the next: the deadline cuts the last-named backend
        if b == "cuda" and not pg.cuda_available():
            print(f"device_bench: no cuda row ({'no CUDA device' if pg.HAS_CUDA else 'a build without CUDA'})",
                  file=sys.stderr)
            continue
        for path in a.gguf:
            # the CPU on full-size weights: seconds per call, so fewer calls
            repeat = min(a.repeat, 2) if b == "cpu" and os.path.getsize(path) > 2**29 else a.repeat
            results[path][b] = run(path, b, a.threads, repeat, a.deadline, t_start)
    text = table(results)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "repeat": a.repeat, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
