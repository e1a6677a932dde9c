"""End to end: tortoise-tts 3.0.0's own, unmodified ``tortoise.api.TextToSpeech`` vs ours on the same full-size
random weights, text and voice latents, each side in its own process, in one run.

    python benchmarks/bench_e2e.py [--threads 2] [--samples 16] [--codes 100] [--types q8_0,f16]

tortoise-tts reads its checkpoints through huggingface_hub; they are handed to it as an offline Hugging Face cache
(``HF_HUB_OFFLINE=1``, ``models_dir`` = that cache) holding the random checkpoints, so its code runs unchanged
(``kv_cache=True``, as do_tts.py runs it; ``enable_redaction=False``, which would fetch wav2vec2). Its stages are
timed by wrapping its model methods from outside.

Rows: tortoise-tts's ultra_fast settings (``--samples`` AR samples x ``--codes`` codes, 30 p-sampler steps, no
cond-free) on both sides; then ours with the few-step samplers (10 ddim steps with cond-free, 10 dpm++2m steps).
Random weights never emit the stop token, so both sides always generate exactly ``--codes`` codes per sample
(``max_mel_tokens``): equal work. 100 codes are 4.64 s of audio.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from _common import TESTS, add_child_args, peak_rss_mb, run_child

TEXT = "Tortoise is a text to speech program built with priorities on multi-voice capabilities and realism."
COMPONENTS = ["autoregressive", "diffusion", "clvp", "vocoder"]
HF_REPO = "models--Manmay--tortoise-tts"  # tortoise/api.py get_model_path: hf_hub_download("Manmay/tortoise-tts")


def _checkpoints(types):
    """The full-size random checkpoints (tortoise-tts's classes), and one GGUF per type, cached."""
    sys.path.insert(0, TESTS)
    from reference import oracle, shim

    from tortoise_ggml.convert import convert
    cache = os.path.join(shim.cache_dir(), "bench_e2e")
    ckpt = os.path.join(cache, "ckpt_full")
    missing = [c for c in COMPONENTS if not os.path.isfile(os.path.join(ckpt, oracle.FILES[c]))]
    if missing:
        oracle.save_all("full", ckpt, names=missing)
    ggufs = {}
    for t in types:
        ggufs[t] = os.path.join(cache, f"tortoise-full-{t}.gguf")
        if not os.path.isfile(ggufs[t]):
            convert(ckpt, ggufs[t], type=t, components=COMPONENTS)
    return ckpt, ggufs


def _hf_cache(ckpt: str, root: str) -> str:
    """An offline Hugging Face cache in ``root`` whose Manmay/tortoise-tts snapshot links to ``ckpt``'s files."""
    snap = os.path.join(root, HF_REPO, "snapshots", "0" * 40)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(root, HF_REPO, "refs"), exist_ok=True)
    with open(os.path.join(root, HF_REPO, "refs", "main"), "w") as f:
        f.write("0" * 40)
    for name in os.listdir(ckpt):
        if name.endswith(".pth") and not os.path.exists(os.path.join(snap, name)):
            os.symlink(os.path.join(ckpt, name), os.path.join(snap, name))
    return root


class _Stages:
    """Seconds per stage, from wrapping callables with timers."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, obj, name: str, stage: str):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        setattr(obj, name, timed)


def _settings(a, sampler: str):
    if sampler == "p":
        return dict(num_autoregressive_samples=a.samples, diffusion_iterations=30, cond_free=False)
    return dict(num_autoregressive_samples=a.samples, diffusion_iterations=10, cond_free=True, sampler=sampler)


def _child(a) -> None:
    lat = np.load(os.path.join(a.workdir, "voice.npz"))
    common = dict(temperature=.8, length_penalty=1.0, repetition_penalty=2.0, top_p=.8, cond_free_k=2.0,
                  diffusion_temperature=1.0, max_mel_tokens=a.codes, k=1, verbose=False)
    stages = _Stages()
    t0 = time.perf_counter()
    if a.child == "ours":
        from tortoise_ggml.api import TextToSpeech
        tts = TextToSpeech(a.gguf, threads=a.threads, autoregressive_batch_size=a.batch)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        wav, stats = tts.tts(TEXT, conditioning_latents=(lat["autoregressive"], lat["diffusion"]), seed=0,
                             return_stats=True, **common, **_settings(a, a.tag))
        total = time.perf_counter() - t0
        seconds = {"autoregressive": stats["autoregressive_s"], "clvp": stats["clvp_s"],
                   "latents": stats["latents_s"], "diffusion": stats["diffusion_s"], "vocoder": stats["vocoder_s"]}
    else:
        os.environ["HF_HUB_OFFLINE"] = "1"
        sys.path.insert(0, TESTS)
        from reference import shim
        shim.install()
        import torch
        torch.set_num_threads(a.threads)
        import tortoise.api as api
        tts = api.TextToSpeech(autoregressive_batch_size=a.batch, models_dir=a.ckpt, enable_redaction=False,
                               kv_cache=True)
        load_s = time.perf_counter() - t0
        stages.wrap(tts.autoregressive, "inference_speech", "autoregressive")
        stages.wrap(tts.clvp, "forward", "clvp")
        stages.wrap(tts.autoregressive, "forward", "latents")
        stages.wrap(api, "do_spectrogram_diffusion", "diffusion")
        stages.wrap(tts.vocoder, "inference", "vocoder")
        torch.manual_seed(0)
        latents = (torch.from_numpy(lat["autoregressive"]), torch.from_numpy(lat["diffusion"]))
        t0 = time.perf_counter()
        with torch.no_grad():
            wav = tts.tts(TEXT, conditioning_latents=latents, **common, **_settings(a, "p")).numpy()
        total = time.perf_counter() - t0
        seconds = stages.seconds
    res = {"load_s": load_s, "total_s": total, "stages": seconds, "audio_s": wav.shape[-1] / 24000,
           "peak_rss_mb": peak_rss_mb()}
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16, help="AR samples (ultra_fast: 16)")
    ap.add_argument("--batch", type=int, default=16, help="AR rows decoded together, both sides")
    ap.add_argument("--codes", type=int, default=100, help="codes per sample (100: 4.64 s of audio)")
    ap.add_argument("--types", default="q8_0,f16", help="our GGUF types, comma-separated")
    ap.add_argument("--samplers", default="ddim,dpm++2m", help="our few-step rows (10 steps, cond-free)")
    ap.add_argument("--skip-reference", action="store_true", help="ours only")
    add_child_args(ap)
    a = ap.parse_args()
    if a.child:
        return _child(a)

    types = [t for t in a.types.split(",") if t]
    ckpt, ggufs = _checkpoints(types)
    rng = np.random.default_rng(0)
    options = ["--threads", str(a.threads), "--samples", str(a.samples), "--batch", str(a.batch),
               "--codes", str(a.codes)]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        np.savez(os.path.join(work, "voice.npz"), autoregressive=rng.standard_normal((1, 1024)).astype(np.float32),
                 diffusion=rng.standard_normal((1, 2048)).astype(np.float32))
        if not a.skip_reference:
            hf = _hf_cache(ckpt, os.path.join(work, "hf"))
            rows.append(("tortoise-tts 3.0.0 (PyTorch f32)", "ultra_fast: 30 p steps",
                         run_child(__file__, "ref", work, None, hf, options, label="tortoise-tts")))
        for t in types:
            rows.append((f"ours {t}", "ultra_fast: 30 p steps",
                         run_child(__file__, "ours", work, ggufs[t], ckpt, options, tag="p", label=t)))
        for sampler in [s for s in a.samplers.split(",") if s]:
            t = types[0]
            rows.append((f"ours {t}", f"10 {sampler} steps, cond-free",
                         run_child(__file__, "ours", work, ggufs[t], ckpt, options, tag=sampler, label=t)))

    ref = rows[0][2]["total_s"] if not a.skip_reference else None
    print(f"\nEnd to end, full-size random weights, {a.samples} samples x {a.codes} codes "
          f"({rows[0][2]['audio_s']:.2f} s of audio), {a.threads} threads\n")
    stages = ["autoregressive", "clvp", "latents", "diffusion", "vocoder"]
    print("| side | sampler | " + " | ".join(stages) + " | total (s) | vs tortoise-tts | peak RSS (MB) |")
    print("|---|---|" + "---|" * len(stages) + "---|---|---|")
    for name, what, r in rows:
        ratio = f"{r['total_s'] / ref:.2f}x" if ref else ""
        cells = " | ".join(f"{r['stages'].get(s, 0.0):.1f}" for s in stages)
        print(f"| {name} | {what} | {cells} | {r['total_s']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    print("\nload (s): " + ", ".join(f"{name} ({what}) {r['load_s']:.1f}" for name, what, r in rows))


if __name__ == "__main__":
    main()
