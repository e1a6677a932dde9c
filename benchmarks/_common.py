"""Shared by the benchmarks: full-size random checkpoints and their GGUF conversions (cached), and peak memory."""
from __future__ import annotations

import os
import resource
import sys

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
