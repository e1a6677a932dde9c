"""Autoregressive model: ours (ggml, CPU) against tortoise-tts 3.0.0's UnifiedVoice (PyTorch, CPU), on the same
full-size random weights, in the same run. Prints a markdown table of milliseconds and ratios (ours / PyTorch).

    python benchmarks/bench_autoregressive.py [--threads 2] [--types f32,f16,q8_0] [--batches 1,16]

A type "q8_0-plain" loads the q8_0 file without the CPU's repacked matmul layout (AMX), to show what it brings.

Measured:
  * prefill: the shared prefix [cond | text | start_mel] at batch 1 (the reference's first cached forward; ours
    GPT2InferenceModel.start with the KV cache and decode graph already made).
  * decode step at batch N: one new token per row against the KV cache. The reference step is
    ar.inference_model with past_key_values, as HF generate calls it; ours is decode(), logits included, with a KV
    cache sized for --max-new tokens as inference_speech sizes it.
  * latent pass: UnifiedVoice.forward(return_latent=True) over 108 codes (about 5 s of speech), batch 1.
Every model runs each stage once per round, rounds interleaved; the table shows each one's fastest time, the
estimate least disturbed by other processes on the machine.

The checkpoint (tests/reference/oracle.py save_all, ~1.7 GB) and its f32/f16/q8_0 conversions are cached in
--cache (default ~/.cache/tortoise-ggml/bench_ar).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

N_CODES = 108


def prepare(cache: str, types: list[str]) -> dict[str, str]:
    from reference import oracle

    from tortoise_ggml.convert import convert
    ckpt = os.path.join(cache, "ckpt_full")
    if not os.path.isfile(os.path.join(ckpt, "autoregressive.pth")):
        print(f"writing the full-size random checkpoint to {ckpt}", file=sys.stderr)
        oracle.save_all("full", ckpt, names=["autoregressive"])
    paths = {}
    for t in types:
        paths[t] = os.path.join(cache, f"ar-full-{t}.gguf")
        if not os.path.isfile(paths[t]):
            print(f"converting to {paths[t]}", file=sys.stderr)
            convert(ckpt, paths[t], type=t, components=["autoregressive"])
    return {"ckpt": ckpt, **paths}


class Reference:
    """tortoise-tts's UnifiedVoice, driven as api.py drives it."""

    label = "PyTorch"

    def __init__(self, ckpt: str, inp: dict):
        import torch
        from reference import oracle
        self.torch, self.oracle = torch, oracle
        self.ar = oracle.load("autoregressive", "full", ckpt)
        self.cond, self.text, self.mel = inp["ar_cond_latent"], inp["text_tokens"], inp["mel_codes"]

    def decode(self, batch: int, steps: int):
        """(prefill seconds, [step seconds])"""
        _, times, t_prefill, _ = self.oracle.ar_decode_steps(self.ar, self.cond, self.text, batch=batch,
                                                              n_steps=steps)
        return t_prefill, times

    def latent(self) -> float:
        tl = self.torch.tensor([self.text.shape[1]])
        wl = self.torch.tensor([self.mel.shape[1] * self.ar.mel_length_compression])
        with self.torch.no_grad():
            t0 = time.perf_counter()
            self.ar(self.cond, self.text, tl, self.mel.clone(), wl, return_latent=True, clip_inputs=False)
            return time.perf_counter() - t0


class Ours:
    def __init__(self, path: str, inp: dict, threads: int, max_new: int, kv_type: str, type: str,
                 backend: str = "cpu"):
        import pyggml as pg
        from tortoise_ggml.models.autoregressive import UnifiedVoice
        from tortoise_ggml.weights.model_file import ModelFile
        self.label = f"ours {type}"
        self.be = pg.Backend("cpu", threads=threads) if backend == "cpu" else pg.Backend(backend)
        self.mf = ModelFile(path, self.be, components=["autoregressive"], repack=not type.endswith("-plain"))
        self.layout = "AMX" if self.mf.matmul_buffer is not None else ""
        self.uv = UnifiedVoice(self.mf, self.be, kv_cache_type=kv_type)
        self.cond, self.text, self.mel = (inp[k].numpy() for k in ("ar_cond_latent", "text_tokens", "mel_codes"))
        self.max_new = max_new
        self.uv.compute_prefix(self.cond, self.text)

    def decode(self, batch: int, steps: int):
        im = self.uv.inference_model
        im.start(self.uv.start_mel_token, batch, self.max_new)       # first use: cache and decode graph built
        im.decode(np.arange(batch))                                 # and checked
        t0 = time.perf_counter()
        im.start(self.uv.start_mel_token, batch, self.max_new)
        t_prefill = time.perf_counter() - t0
        times = []
        for k in range(steps):
            t0 = time.perf_counter()
            im.decode(np.arange(batch) + 100 * k)
            times.append(time.perf_counter() - t0)
        im.release()                                                # KV caches of every model would not fit
        return t_prefill, times

    def latent(self) -> float:
        t0 = time.perf_counter()
        self.uv.forward(self.cond, self.text, [self.text.shape[1]], self.mel,
                        [self.mel.shape[1] * self.uv.mel_length_compression], return_latent=True, clip_inputs=False)
        return time.perf_counter() - t0


def measure(models: list, batches: list[int], steps: int, rounds: int) -> dict:
    """Rounds interleave the models, so load from other processes hits them alike; each keeps its minimum."""
    res = {m.label: {} for m in models}

    def keep(m, key, seconds):
        res[m.label][key] = min(res[m.label].get(key, np.inf), 1e3 * seconds)

    for _ in range(rounds):
        for b in batches:
            for m in models:
                t_prefill, times = m.decode(b, steps + 1)
                keep(m, "prefill", t_prefill)
                keep(m, f"decode_b{b}", min(times[1:]))
        for m in models:
            keep(m, "latent", m.latent())
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "tortoise-ggml", "bench_ar"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda"], help="our side's backend")
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=3, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=500, help="KV cache room, as inference_speech sizes it")
    ap.add_argument("--kv", default="f32", choices=["f32", "f16"], help="our KV cache type")
    a = ap.parse_args()
    os.environ["ORACLE_THREADS"] = str(a.threads)           # read when the oracle is imported
    types = [t for t in a.types.split(",") if t]
    batches = [int(b) for b in a.batches.split(",") if b]

    import torch
    from reference import oracle
    paths = prepare(a.cache, sorted({t.split("-")[0] for t in types}))
    inp = oracle.make_inputs("full", n_codes=N_CODES)
    prefix = inp["text_tokens"].shape[1] + 4
    load0 = os.getloadavg()[0]
    models = [Reference(paths["ckpt"], inp)]
    models += [Ours(paths[t.split("-")[0]], inp, a.threads, a.max_new, a.kv, t, a.backend) for t in types]
    layouts = {m.label[5:]: m.layout for m in models[1:]}
    res = measure(models, batches, a.steps, a.rounds)
    load1 = os.getloadavg()[0]
    ref, ours = res["PyTorch"], {t: res[f"ours {t}"] for t in types}

    print(f"\nUnifiedVoice full size (30 layers, 1024 wide), ours on {a.backend}, {a.threads} threads (torch "
          f"{torch.__version__}: {torch.get_num_threads()}), prefix {prefix} tokens, KV cache {a.kv} sized for "
          f"{a.max_new} new tokens; best of {a.rounds} interleaved rounds; load average {load0:.1f} -> "
          f"{load1:.1f}\n")
    rows = [("prefill b1", "prefill")] + [(f"decode step b{b}", f"decode_b{b}") for b in batches] + \
           [(f"latent pass b1 ({N_CODES} codes)", "latent")]
    head = "| stage | PyTorch ms | " + " | ".join(f"ours {t}{' (' + layouts[t] + ')' if layouts[t] else ''} ms "
                                                 "(ratio)" for t in types) + " |"
    print(head)
    print("|" + "---|" * (2 + len(types)))
    for label, key in rows:
        cells = [f"{ours[t][key]:.1f} ({ours[t][key] / ref[key]:.2f}x)" for t in types]
        print(f"| {label} | {ref[key]:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
