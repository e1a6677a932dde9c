"""Streaming speech (api_fast's path): ours (ggml) at the full size on random weights, and the HiFi-GAN decoder
against PyTorch's (tortoise-tts 3.0.0's HifiganGenerator) on the same weights and latents, in one run.

    python benchmarks/bench_stream.py [--threads 2] [--type q8_0] [--codes 215] [--repeat 2]

Measured (ours: TextToSpeech.tts_stream, greedy-free sampling at api_fast's settings, a random voice latent):
  * first audio: seconds from the tts_stream call to its first chunk (60 codes, decoded and crossfaded);
  * RTF: the whole stream's wall time over the seconds of audio it yields (``--codes`` codes: 215 is ~10 s; the
    random-weight model rarely emits the stop code, so the length is the cap);
  * HiFi-GAN per second of audio: one decode of all the utterance's latents (HifiganGenerator.inference), ours and
    PyTorch's, and the streaming decodes: ours (only new audio each chunk) against api_fast's scheme (every chunk
    decodes all latents so far, here with PyTorch's decoder at the same chunk points);
  * peak RSS of each side's process (ours: runtime, weights, KV cache, graphs; PyTorch: the decoder alone).
Each side runs in a child process of its own (ours without torch imported) after a short warm-up; times are the
fastest of ``--repeat`` runs. Checkpoints come from tests/reference/oracle.py via _common.full_size_model (cached).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from _common import TESTS, add_child_args, full_size_model, peak_rss_mb, run_child, timed_runs

TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs far away into the deep green forest, "
        "where nobody will ever find it again.")
SAMPLE_RATE = 24000


def _chunk_points(n: int, chunk: int, first: int = 60) -> list[int]:
    """The latent counts at which api_fast's tts_stream decodes (the final repeat dropped)."""
    points, pending = [], 0
    for i in range(1, n + 1):
        pending += 1
        if pending >= max(chunk, first):
            points.append(i)
            pending, first = 0, 0
    if not points or points[-1] != n:
        points.append(n)
    return points


def _child(a) -> None:
    out = {}
    if a.child == "ours":
        from tortoise_ggml.api import TextToSpeech
        tts = TextToSpeech(a.gguf, device=a.backend, threads=a.threads)
        out["weights_mb"] = tts.model_file.nbytes / 2**20
        out["rss_loaded_mb"] = peak_rss_mb()
        voice = np.load(os.path.join(a.workdir, "voice.npy"))[:, :tts.autoregressive.model_dim]
        # warm-up: graphs, first-touch of the weights
        for _ in tts.tts_stream("Hi.", conditioning_latents=voice, max_mel_tokens=70, seed=0):
            pass
        runs = []
        for r in range(a.repeat):
            t0 = time.perf_counter()
            stream = tts.tts_stream(TEXT, conditioning_latents=voice, max_mel_tokens=a.codes, seed=r,
                                    stream_chunk_size=a.chunk)
            chunks = list(stream)
            wall = time.perf_counter() - t0
            runs.append(dict(stream.stats, wall_s=wall, codes=len(stream.codes),
                             samples=int(sum(c.shape[0] for c in chunks))))
            latents = stream.latents
        best = min(runs, key=lambda s: s["wall_s"] / max(s["audio_s"], 1e-9))
        out.update(best)
        out["rtf"] = best["wall_s"] / best["audio_s"]
        np.save(os.path.join(a.workdir, "latents.npy"), latents)
        wav, times, cpu = timed_runs(lambda: tts.hifi_decoder.inference(latents[None], voice), a.repeat)
        out["hifigan_oneshot_s"], out["hifigan_oneshot_cpu_s"] = min(times), min(cpu)
        out["oneshot_audio_s"] = wav.shape[-1] / SAMPLE_RATE
        np.save(os.path.join(a.workdir, "wav_ours.npy"), wav)
    else:
        sys.path.insert(0, TESTS)
        import torch
        from reference import oracle
        torch.set_num_threads(a.threads)
        ref = oracle.load("hifigan", a.size, ckpt=a.ckpt)
        out["rss_loaded_mb"] = peak_rss_mb()
        latents = torch.from_numpy(np.load(os.path.join(a.workdir, "latents.npy")))[None]
        voice = torch.from_numpy(np.load(os.path.join(a.workdir, "voice.npy"))[:, :latents.shape[-1]].copy())

        def run(n):
            return oracle.hifigan_inference(ref, latents[:, :n], voice).numpy()

        run(60)  # warm-up (oneDNN primitives)
        n = latents.shape[1]
        wav, times, cpu = timed_runs(lambda: run(n), a.repeat)
        out["hifigan_oneshot_s"], out["hifigan_oneshot_cpu_s"] = min(times), min(cpu)
        out["oneshot_audio_s"] = wav.shape[-1] / SAMPLE_RATE
        np.save(os.path.join(a.workdir, "wav_ref.npy"), wav)
        # api_fast's stream: every chunk decodes all the latents so far
        t0 = time.perf_counter()
        for p in _chunk_points(n, a.chunk):
            run(p)
        out["hifigan_stream_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out), flush=True)


def _gguf(a) -> tuple[str, str]:
    """A folder with the full-size autoregressive.pth and hifidecoder.pth (each made once by _common), and its
    conversion to ``a.type`` (cached beside them). ``--size small``: the test config, in a temporary folder (a
    quick check of this script)."""
    from reference import oracle, shim

    from tortoise_ggml.convert import convert
    if a.size == "small":
        import atexit
        import shutil
        both = tempfile.mkdtemp(prefix="bench_stream_small_")
        atexit.register(shutil.rmtree, both, True)
        oracle.save_all("small", both, names=["autoregressive", "hifigan"])
        return both, convert(both, os.path.join(both, "small.gguf"), type=a.type,
                             components=["autoregressive", "hifigan"])
    ar_ckpt, _ = full_size_model("autoregressive", [])
    hifi_ckpt, _ = full_size_model("hifigan", [])
    cache = os.path.join(shim.cache_dir(), "bench_stream")
    both = os.path.join(cache, "ckpt_full_ar_hifigan")
    os.makedirs(both, exist_ok=True)
    for src, name in ((ar_ckpt, "autoregressive.pth"), (hifi_ckpt, "hifidecoder.pth"), (hifi_ckpt, "config.json")):
        dst = os.path.join(both, name)
        if not os.path.exists(dst):
            os.symlink(os.path.join(src, name), dst)
    gguf = os.path.join(cache, f"ar-hifigan-full-{a.type}.gguf")
    if not os.path.isfile(gguf):
        convert(both, gguf, type=a.type, components=["autoregressive", "hifigan"])
    return hifi_ckpt, gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--type", default="q8_0", help="GGUF type of the AR's weight matrices (HiFi-GAN stays F32)")
    ap.add_argument("--codes", type=int, default=215, help="codes to generate (215: ~10 s of audio)")
    ap.add_argument("--chunk", type=int, default=40, help="stream_chunk_size")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", default="full", choices=["full", "small"], help=argparse.SUPPRESS)
    add_child_args(ap)
    a = ap.parse_args()
    if a.child:
        return _child(a)
    sys.path.insert(0, TESTS)
    ckpt, gguf = _gguf(a)
    options = ["--threads", str(a.threads), "--backend", a.backend, "--repeat", str(a.repeat), "--codes",
               str(a.codes), "--chunk", str(a.chunk), "--size", a.size]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        np.save(os.path.join(work, "voice.npy"), np.random.default_rng(0).standard_normal((1, 1024), np.float32))
        res = {side: run_child(__file__, side, work, gguf, ckpt, options) for side in ("ours", "ref")}
        diff = float(np.abs(np.load(os.path.join(work, "wav_ours.npy")) -
                            np.load(os.path.join(work, "wav_ref.npy"))).max())
    o, r = res["ours"], res["ref"]
    audio = o["oneshot_audio_s"]
    print(f"\nStreaming (api_fast path), {a.size} size, {a.backend} {a.threads} threads, AR {a.type}, HiFi-GAN F32; "
          f"{o['codes']} codes, stream_chunk_size {a.chunk}; best of {a.repeat} after a warm-up; load average "
          f"{load:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs\n")
    print("| measure | ours | PyTorch | ours / PyTorch |")
    print("|---|---|---|---|")
    print(f"| first audio (s) | {o['first_chunk_s']:.2f} | | |")
    print(f"| RTF (stream wall / audio, {o['audio_s']:.1f} s yielded) | {o['rtf']:.2f} | | |")
    print(f"| AR seconds per audio second (stream) | {o['autoregressive_s'] / o['audio_s']:.2f} | | |")
    print(f"| HiFi-GAN one decode of {audio:.1f} s: s per audio s | {o['hifigan_oneshot_s'] / audio:.3f} "
          f"| {r['hifigan_oneshot_s'] / audio:.3f} | {o['hifigan_oneshot_s'] / r['hifigan_oneshot_s']:.2f} |")
    print(f"| same, CPU s per audio s | {o['hifigan_oneshot_cpu_s'] / audio:.3f} "
          f"| {r['hifigan_oneshot_cpu_s'] / audio:.3f} | "
          f"{o['hifigan_oneshot_cpu_s'] / r['hifigan_oneshot_cpu_s']:.2f} |")
    print(f"| HiFi-GAN in the stream: s per audio s (ours: new audio only; PyTorch: api_fast's decode-all) "
          f"| {o['hifigan_s'] / o['audio_s']:.3f} | {r['hifigan_stream_s'] / audio:.3f} "
          f"| {(o['hifigan_s'] / o['audio_s']) / (r['hifigan_stream_s'] / audio):.2f} |")
    print(f"| peak RSS (MB) | {o['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} (decoder only) | |")
    print(f"| weights in the file (MB) | {o['weights_mb']:.0f} | | |")
    print(f"\nmax |ours - PyTorch| over the one-shot decode: {diff:.1e}")


if __name__ == "__main__":
    main()
