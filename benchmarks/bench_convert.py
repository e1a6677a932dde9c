"""Convert the full-size random checkpoints to GGUF per type and load them back; prints a table.

    python benchmarks/bench_convert.py [--ckpt DIR] [--out DIR] [--types f32,f16,q8_0] [--no-reference]

Full-size checkpoints (api.py configs, random weights, ~4.2 GB) come from tests/reference/oracle.py save_all and are
cached in its default dir (reused when complete). Every measured step runs in its own child process, so "peak RSS"
is that process's ru_maxrss: conversion (python -m tortoise_ggml.convert), loading the GGUF into a CPU backend
(ModelFile), and, for comparison, loading the .pth checkpoints into tortoise-tts's classes the way api.py does.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

LOAD_GGUF = """
import sys, time
t0 = time.perf_counter()
import pyggml as pg
from tortoise_ggml.weights.model_file import ModelFile
be = pg.Backend("cpu", threads=2)
t1 = time.perf_counter()
mf = ModelFile(sys.argv[1], be)
print("RESULT", time.perf_counter() - t1, mf.nbytes)
"""

# what filling that much fresh memory costs on this machine, whatever the source: the floor for any loader
FILL_BASELINE = """
import sys, time
import numpy as np
n = int(sys.argv[1])
t0 = time.perf_counter()
a = np.empty(n, np.uint8)
a.fill(1)
print("RESULT", time.perf_counter() - t0, n)
"""

LOAD_REFERENCE = """
import sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[2])
from reference import oracle
t0 = time.perf_counter()
models = [oracle.load(name, "full", sys.argv[1]) for name in oracle.FILES]
# post_init_gpt2_config registers some modules twice: count each storage once
n = sum({t.data_ptr(): t.numel() * t.element_size() for m in models for t in m.state_dict().values()}.values())
print("RESULT", time.perf_counter() - t0, n)
"""


def run_child(cmd):
    """(wall seconds, peak RSS in MB, stdout) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = "", ""
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, out


def result(out):
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1].split()
    return float(line[1]), int(line[2])


def ensure_checkpoints(ckpt):
    from reference import oracle
    # save_all writes config.json last; a cache from before a component existed (hifidecoder.pth) lacks its file
    missing = [n for n, f in oracle.FILES.items() if not os.path.isfile(os.path.join(ckpt, f))]
    if os.path.isfile(os.path.join(ckpt, "config.json")) and not missing:
        return
    print(f"writing full-size random checkpoints to {ckpt} (a few minutes) ...", flush=True)
    # each component's weights come from its own seeded build: the missing ones alone can be added
    oracle.save_all("full", ckpt, seed=0, names=missing if os.path.isfile(os.path.join(ckpt, "config.json")) else None)


def main():
    from reference import oracle  # noqa: F401  (sets REF_HOME)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="full-size checkpoints dir (default: the oracle's cache)")
    ap.add_argument("--out", default=None, help="where the GGUF files go (kept for other benchmarks)")
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--no-reference", action="store_true", help="skip loading the .pth files with tortoise-tts")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args()
    ckpt = a.ckpt or oracle.default_ckpt_dir("full")
    out_dir = a.out or os.path.join(os.environ["REF_HOME"], "gguf_full")
    os.makedirs(out_dir, exist_ok=True)
    ensure_checkpoints(ckpt)
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".pth"))

    rows = []
    for t in a.types.split(","):
        path = os.path.join(out_dir, f"tortoise-full-{t}.gguf")
        conv_s, conv_rss, _ = run_child([sys.executable, "-m", "tortoise_ggml.convert", ckpt, "-o", path, "--type", t,
                                         "-q"])
        load_wall, load_rss, out = run_child([sys.executable, "-c", LOAD_GGUF, path])
        load_s, buf = result(out)
        rows.append({"what": f"convert + ModelFile ({t})", "convert_s": conv_s, "convert_peak_rss_mb": conv_rss,
                     "file_mb": os.path.getsize(path) / 1e6, "load_s": load_s, "load_peak_rss_mb": load_rss,
                     "weights_mb": buf / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    if rows:
        fill_s, n = result(run_child([sys.executable, "-c", FILL_BASELINE, str(int(rows[0]["weights_mb"] * 1e6))])[2])
        rows.append({"what": "baseline: fill as many fresh bytes (numpy)", "convert_s": None,
                     "convert_peak_rss_mb": None, "file_mb": None, "load_s": fill_s, "load_peak_rss_mb": None,
                     "weights_mb": n / 1e6})
    if not a.no_reference:
        _, rss, out = run_child([sys.executable, "-c", LOAD_REFERENCE, ckpt, os.path.join(ROOT, "tests")])
        load_s, n = result(out)
        rows.append({"what": "reference: torch.load + tortoise classes (api.py way)", "convert_s": None,
                     "convert_peak_rss_mb": None, "file_mb": ckpt_bytes / 1e6, "load_s": load_s,
                     "load_peak_rss_mb": rss, "weights_mb": n / 1e6})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nfull-size random checkpoints: {ckpt} ({ckpt_bytes / 1e9:.2f} GB .pth); CPU backend, "
          f"{os.cpu_count()} cores")
    hdr = (f"{'':52s} {'convert s':>9s} {'conv RSS MB':>11s} {'file MB':>9s} {'load s':>7s} {'load RSS MB':>11s} "
           f"{'weights MB':>10s}")
    print(hdr)
    print("-" * len(hdr))

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0].lstrip(">")))
    for r in rows:
        print(f"{r['what']:52s} {fmt(r['convert_s'], '>9.1f')} {fmt(r['convert_peak_rss_mb'], '>11.0f')} "
              f"{fmt(r['file_mb'], '>9.0f')} {r['load_s']:>7.2f} {fmt(r['load_peak_rss_mb'], '>11.0f')} "
              f"{r['weights_mb']:>10.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
