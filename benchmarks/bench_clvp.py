"""CLVP scoring benchmark: ours (ggml) vs the PyTorch reference (tortoise-tts 3.0.0) at the full (api.py) size on the
same random weights, text and candidate codes.

    python benchmarks/bench_clvp.py [--threads 2] [--candidates 16] [--codes 500] [--types f32 q8_0] [--repeat 1]

What api.py does per batch of autoregressive samples: score N candidates of codes padded to 500 against the text
(tests/reference/oracle.py SAMPLE_TEXT, with tts()'s trailing pad). Each side runs in its own child process (ours
without torch imported), so each peak RSS is that side's alone. Each child first scores 2 candidates of 50 codes
(warm-up), then times ``--repeat`` runs and reports the fastest. Prints a markdown table; ``max |diff|`` compares
the scores with the reference's, ``same best`` whether both pick the same candidate. ``CPU`` is the process's CPU
time for the timed run (all threads): on a shared machine it is steadier than wall time.
The random checkpoint and its GGUFs are cached under ~/.cache/tortoise-ggml/bench_clvp (about 1 GB each).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from _common import TESTS, add_child_args, child_backend, full_size_model, peak_rss_mb, run_child, timed_runs


def _child(a) -> None:
    """Time one side on the inputs in a.workdir; print one JSON line, save the scores."""
    text = np.load(os.path.join(a.workdir, "text.npy"))
    codes = np.load(os.path.join(a.workdir, "codes.npy"))
    out = {}
    if a.child == "ours":
        from tortoise_ggml.models.clvp import CLVP
        from tortoise_ggml.weights.model_file import ModelFile
        be = child_backend(a)
        clvp = CLVP(ModelFile(a.gguf, be, components=["clvp"]), be, max_batch=a.max_batch)
        out["weights_mb"] = clvp.model_file.nbytes / 2**20

        def run(t, c):
            return clvp.forward(t, c)
    else:
        sys.path.insert(0, TESTS)
        import torch
        from reference import oracle
        torch.set_num_threads(a.threads)
        ref = oracle.load("clvp", "full", ckpt=a.ckpt)

        def run(t, c):
            return oracle.clvp_scores(ref, torch.from_numpy(t), torch.from_numpy(c)).numpy()
    out["rss_loaded_mb"] = peak_rss_mb()
    run(text, codes[:2, :50])
    scores, times, cpu = timed_runs(lambda: run(text, codes), a.repeat)
    out["time_s"] = min(times)
    out["times"] = times
    out["cpu_s"] = min(cpu)
    out["peak_rss_mb"] = peak_rss_mb()
    if a.child == "ours":
        out["graph_mb"] = clvp.backend.allocator.size / 2**20
        out["graph_nodes"] = clvp.last_graph_nodes
    np.save(os.path.join(a.workdir, f"scores_{a.child}{a.tag}.npy"), scores)
    print(json.dumps(out), flush=True)


def _spawn(a, side, work, gguf, ckpt, tag=""):
    options = ["--threads", str(a.threads), "--backend", a.backend, "--repeat", str(a.repeat),
               "--max-batch", str(a.max_batch)]
    return run_child(__file__, side, work, gguf, ckpt, options, tag=tag)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--codes", type=int, default=500)
    ap.add_argument("--types", nargs="+", default=["f32"], choices=["f32", "f16", "q8_0"], help="GGUF types")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=16, help="candidates per graph (ours)")
    add_child_args(ap)
    a = ap.parse_args()
    if a.child:
        return _child(a)

    ckpt, ggufs = full_size_model("clvp", a.types)
    sys.path.insert(0, TESTS)
    from reference import oracle
    rng = np.random.default_rng(0)
    text = oracle.text_tokens_for().numpy()
    codes = rng.integers(0, 8192, (a.candidates, a.codes))
    with tempfile.TemporaryDirectory() as work:
        np.save(os.path.join(work, "text.npy"), text)
        np.save(os.path.join(work, "codes.npy"), codes)
        ref = _spawn(a, "ref", work, None, ckpt)
        want = np.load(os.path.join(work, "scores_ref.npy"))
        rows = []
        for t in a.types:
            res = _spawn(a, "ours", work, ggufs[t], ckpt, tag=t)
            got = np.load(os.path.join(work, f"scores_ours{t}.npy"))
            rows.append((t, res, float(np.abs(got - want).max()), int(np.argmax(got)) == int(np.argmax(want))))

    print(f"\nCLVP, full size, {a.candidates} candidates x {a.codes} codes, text of {text.shape[1]} tokens; "
          f"{a.backend} {a.threads} threads; best of {a.repeat} after a warm-up; peak RSS per process\n")
    print("| side | weights | wall (s) | speed-up (PyTorch / ours) | CPU (s) | peak RSS (MB) | graph memory (MB) "
          "| max abs diff | same best |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| PyTorch | f32 | {ref['time_s']:.2f} | 1.00 | {ref['cpu_s']:.1f} | {ref['peak_rss_mb']:.0f} | - | - | - |")
    for t, res, diff, same in rows:
        print(f"| ours | {t} | {res['time_s']:.2f} | {ref['time_s'] / res['time_s']:.2f}x | {res['cpu_s']:.1f} "
              f"| {res['peak_rss_mb']:.0f} | {res['graph_mb']:.0f} | {diff:.1e} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
