"""Speech server benchmark: requests/min and latency percentiles (total and time to first byte) at 1/4/8 concurrent
clients against ``python -m tortoise_ggml.server`` running as a child process.

    python benchmarks/bench_server.py                                  # full-size random q8_0 model (built, cached)
    python benchmarks/bench_server.py --model tortoise.gguf --concurrency 1 4 8 --requests 3
    python benchmarks/bench_server.py --size small --preset ultra_fast --num-autoregressive-samples 1 \
        --diffusion-iterations 2 --max-mel-tokens 20 --parts 2               # a smoke run in seconds

Without --model, random checkpoints of every component at --size (tortoise-tts's own classes, as the tests) are
converted with --type and cached under ~/.cache/tortoise-ggml/bench_server. Each client sends --requests requests
one after the other (after one warm-up request); the server's queue is as long as the most clients, so nothing is
refused (a 429 would be counted). TTFB is the time to the first body byte: with --parts > 1 the first part's audio
arrives before the rest is spoken. Prints a markdown table and the server's peak RSS.
"""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from _common import TESTS

DEFAULT_TEXT = "Tortoise is a text to speech program built with priorities on multi-voice capabilities and realism."


def build_model(size: str, type_: str) -> str:
    """Random checkpoints of every component at ``size`` and their GGUF, made once into the user cache."""
    sys.path.insert(0, TESTS)
    from reference import oracle, shim

    from tortoise_ggml.convert import convert
    cache = os.path.join(shim.cache_dir(), "bench_server")
    ckpt = os.path.join(cache, f"ckpt_{size}")
    if not all(os.path.isfile(os.path.join(ckpt, f)) for f in oracle.FILES.values()):
        oracle.save_all(size, ckpt)
    gguf = os.path.join(cache, f"tortoise-{size}-{type_}.gguf")
    if not os.path.isfile(gguf):
        convert(ckpt, gguf, type=type_)
    return gguf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_kb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return float("nan")


def one_request(client, body) -> dict:
    t0 = time.perf_counter()
    ttfb = None
    n = 0
    with client.stream("POST", "/v1/audio/speech", json=body) as r:
        for chunk in r.iter_raw():
            if ttfb is None and chunk:
                ttfb = time.perf_counter() - t0
            n += len(chunk)
        status = r.status_code
    return {"status": status, "latency": time.perf_counter() - t0, "ttfb": ttfb, "bytes": n}


def run_level(url: str, clients: int, requests: int, body: dict) -> dict:
    import httpx
    results, errors = [], []

    def worker():
        with httpx.Client(base_url=url, timeout=3600) as c:
            for _ in range(requests):
                try:
                    results.append(one_request(c, body))
                except Exception as e:  # noqa: BLE001 - reported, not fatal
                    errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ttfb = np.array([r["ttfb"] for r in ok if r["ttfb"] is not None]) if ok else np.array([np.nan])
    audio_s = sum(r["bytes"] for r in ok) / 2 / 24000            # pcm: 2 bytes a sample at 24 kHz
    return {"clients": clients, "requests": len(results) + len(errors), "ok": len(ok),
            "rejected": sum(r["status"] == 429 for r in results),
            "other": sum(r["status"] not in (200, 429) for r in results) + len(errors),
            "per_min": round(60 * len(ok) / wall, 2), "wall": round(wall, 3),
            "p50": round(float(np.percentile(lat, 50)), 3), "p95": round(float(np.percentile(lat, 95)), 3),
            "ttfb50": round(float(np.percentile(ttfb, 50)), 3), "ttfb95": round(float(np.percentile(ttfb, 95)), 3),
            "xrt": round(audio_s / wall, 3), "errors": errors[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF to serve (default: build random checkpoints at --size, --type)")
    ap.add_argument("--size", default="full", choices=["small", "full"], help="model size to build (default full)")
    ap.add_argument("--type", default="q8_0", choices=["f32", "f16", "q8_0"], help="storage type to build")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    ap.add_argument("--threads", type=int, default=None, help="the server's CPU threads (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--parts", type=int, default=1, help="speak --text this many times, split at '|'")
    ap.add_argument("--preset", default="ultra_fast")
    ap.add_argument("--num-autoregressive-samples", type=int, default=None)
    ap.add_argument("--diffusion-iterations", type=int, default=None)
    ap.add_argument("--max-mel-tokens", type=int, default=None)
    a = ap.parse_args()

    import httpx
    model = a.model or build_model(a.size, a.type)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tortoise_ggml.server", "--model", model, "--port", str(port), "--device", a.device,
           "--max-queue", str(max(a.concurrency)), "--log-level", "warning"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the server did not come up in 10 minutes")
            time.sleep(0.2)
        body = {"model": "tortoise", "voice": "random", "input": " | ".join([a.text] * a.parts),
                "response_format": "pcm", "preset": a.preset, "seed": 0}
        for key in ("num_autoregressive_samples", "diffusion_iterations", "max_mel_tokens"):
            if getattr(a, key) is not None:
                body[key] = getattr(a, key)
        print(f"model {os.path.basename(model)}, {a.parts} part(s) of {len(a.text)} chars, preset {a.preset}, "
              + ", ".join(f"{k} {body[k]}" for k in ("num_autoregressive_samples", "diffusion_iterations",
                                                     "max_mel_tokens") if k in body), file=sys.stderr, flush=True)
        with httpx.Client(base_url=url, timeout=3600) as c:     # warm-up: graphs built, caches filled
            warm = one_request(c, body)
        if warm["status"] != 200:
            sys.exit(f"the warm-up request failed with {warm['status']}")
        rows = []
        for n in a.concurrency:
            res = run_level(url, n, a.requests, body)
            print(f"  {n} clients: {res}", file=sys.stderr, flush=True)
            rows.append(res)
        peak = vm_kb(server.pid, "VmHWM") / 1024
    finally:
        server.terminate()
        server.wait(120)

    print("| clients | requests | ok | 429 | req/min | latency p50 (s) | p95 (s) | TTFB p50 (s) | p95 (s) "
          "| audio s / wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['rejected']} | {r['per_min']:.1f} "
              f"| {r['p50']:.2f} | {r['p95']:.2f} | {r['ttfb50']:.2f} | {r['ttfb95']:.2f} | {r['xrt']:.2f} |")
    print(f"server peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
