"""Shared by the benchmarks: full-size random checkpoints and their GGUF conversions (cached), peak memory, and
running each side (ours, the PyTorch reference) in a child process of its own."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")


def peak_rss_mb() -> float:
    """Peak RSS of this process image. /proc's VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the
    forking parent, which has imported torch to build the checkpoint."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def full_size_model(component: str, types) -> tuple[str, dict[str, str]]:
    """The release-layout checkpoint of ``component`` at the api.py size with random weights (tortoise-tts's own
    classes), and its GGUF per storage type; both made once into the user cache."""
    sys.path.insert(0, TESTS)
    from reference import oracle, shim

    from tortoise_ggml.convert import convert
    cache = os.path.join(shim.cache_dir(), f"bench_{component}")
    ckpt = os.path.join(cache, "ckpt_full")
    if not os.path.isfile(os.path.join(ckpt, oracle.FILES[component])):
        oracle.save_all("full", ckpt, names=[component])
    ggufs = {}
    for t in types:
        ggufs[t] = os.path.join(cache, f"{component}-full-{t}.gguf")
        if not os.path.isfile(ggufs[t]):
            convert(ckpt, ggufs[t], type=t, components=[component])
    return ckpt, ggufs


# -- one process per side --------------------------------------------------------------------------------------
# A benchmark re-runs its own script with --child ours|ref, so that each side's peak RSS is its own (and ours runs
# without torch imported). The child reads its inputs from --workdir and prints one JSON line of results.
def add_child_args(ap: argparse.ArgumentParser) -> None:
    """The options a benchmark passes to its own children (hidden from --help)."""
    ap.add_argument("--child", choices=["ours", "ref"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)


def run_child(script: str, side: str, work: str, gguf: str | None, ckpt: str, options: list[str], tag: str = "",
              label: str = "") -> dict:
    """Run ``script`` as the ``side`` child with the benchmark's own ``options``; its JSON results."""
    cmd = [sys.executable, os.path.abspath(script), "--child", side, "--workdir", work, "--gguf", gguf or "",
           "--ckpt", ckpt, "--tag", tag, *options]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    name = " ".join(x for x in (label, side, tag) if x)
    if p.returncode != 0 or not lines:
        sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    res = json.loads(lines[-1])
    print(f"  {name}: {res}", file=sys.stderr, flush=True)
    return res


def timed_runs(fn, repeat: int):
    """``repeat`` calls of ``fn``: the last result, and each call's wall and process-CPU seconds."""
    out, times, cpu = None, [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return out, times, cpu


def child_backend(a):
    """The pyggml backend a child of ours computes on: ``a.backend`` with ``a.threads`` for the CPU."""
    import pyggml as pg
    return pg.Backend(a.backend, threads=a.threads) if a.backend == "cpu" else pg.Backend(a.backend)
