"""UnivNet vocoder benchmark: ours (ggml) vs the PyTorch reference (tortoise-tts 3.0.0) at the full (api.py) size on
the same random weights, mel and noise.

    python benchmarks/bench_vocoder.py [--threads 2] [--seconds 5 30] [--type f32] [--repeat 2]

Each side runs in its own child process (ours without torch imported), so each peak RSS is that side's alone: the
runtime, the weights and the run. Each child first vocodes 1 s of audio (warm-up), then times ``--repeat`` runs on
the target length and reports the fastest. Prints a markdown table; ``max |diff|`` compares the two waveforms.
The random checkpoint and its GGUF are cached under ~/.cache/tortoise-ggml/bench_vocoder.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from _common import TESTS, add_child_args, child_backend, full_size_model, peak_rss_mb, run_child, timed_runs

SAMPLE_RATE, HOP = 24000, 256


def _child(a) -> None:
    """Time one side on the inputs in a.workdir; print one JSON line, save the waveform."""
    mel = np.load(os.path.join(a.workdir, "mel.npy"))
    z = np.load(os.path.join(a.workdir, "z.npy"))
    warm_frames = SAMPLE_RATE // HOP
    out = {}
    if a.child == "ours":
        from tortoise_ggml.models.vocoder import UnivNetGenerator
        from tortoise_ggml.weights.model_file import ModelFile
        be = child_backend(a)
        voc = UnivNetGenerator(ModelFile(a.gguf, be, components=["vocoder"]), be)
        out["weights_mb"] = voc.model_file.nbytes / 2**20

        def run(m, zz):
            return voc.inference(m, zz)
    else:
        sys.path.insert(0, TESTS)
        import torch
        from reference import oracle
        torch.set_num_threads(a.threads)
        ref = oracle.load("vocoder", "full", ckpt=a.ckpt)

        def run(m, zz):
            return oracle.vocoder_run(ref, torch.from_numpy(m), torch.from_numpy(zz)).numpy()[:, 0]
    out["rss_loaded_mb"] = peak_rss_mb()
    run(mel[:, :, :warm_frames], z[:, :, :warm_frames + 10])
    wav, times, cpu = timed_runs(lambda: run(mel, z), a.repeat)
    best = int(np.argmin(times))
    out["time_s"], out["cpu_s"] = times[best], cpu[best]
    out["times"] = times
    out["peak_rss_mb"] = peak_rss_mb()
    if a.child == "ours":
        out["graph_mb"] = voc.backend.allocator.size / 2**20
        out["graph_nodes"] = voc.last_graph_nodes
    np.save(os.path.join(a.workdir, f"wav_{a.child}.npy"), wav)
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, nargs="+", default=[5, 30])
    ap.add_argument("--type", default="f32", help="GGUF type (the vocoder's conv weights stay F32 in every type)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    add_child_args(ap)
    a = ap.parse_args()
    if a.child:
        return _child(a)

    ckpt, ggufs = full_size_model("vocoder", [a.type])
    gguf = ggufs[a.type]
    rows = []
    for seconds in a.seconds:
        frames = int(round(seconds * SAMPLE_RATE / HOP))
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as work:
            np.save(os.path.join(work, "mel.npy"), (rng.standard_normal((1, 100, frames)) * 2 - 5).astype(np.float32))
            np.save(os.path.join(work, "z.npy"), rng.standard_normal((1, 64, frames + 10)).astype(np.float32))
            res = {}
            options = ["--threads", str(a.threads), "--backend", a.backend, "--repeat", str(a.repeat)]
            for side in ("ours", "ref"):
                res[side] = run_child(__file__, side, work, gguf, ckpt, options, label=f"{seconds:g} s")
            diff = float(np.abs(np.load(os.path.join(work, "wav_ours.npy")) -
                                np.load(os.path.join(work, "wav_ref.npy"))).max())
        rows.append((seconds, frames, res, diff))

    from pyggml.raw import lib
    print(f"\nUnivNet vocoder, full size, {a.backend} {a.threads} threads, GGUF {a.type}, ggml llamafile sgemm "
          f"{'on' if lib.ggml_cpu_has_llamafile() else 'off'}; best of {a.repeat} after a 1 s warm-up; peak RSS per "
          f"process (runtime + weights + run); CPU s = process CPU time (robust on a busy machine); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| audio | mel frames | ours (s) | PyTorch (s) | ours / PyTorch | ours CPU s | PyTorch CPU s "
          "| ours peak RSS (MB) | PyTorch peak RSS (MB) | ours graph memory (MB) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seconds, frames, res, diff in rows:
        o, r = res["ours"], res["ref"]
        print(f"| {seconds:g} s | {frames} | {o['time_s']:.2f} | {r['time_s']:.2f} | {o['time_s'] / r['time_s']:.2f} "
              f"| {o['cpu_s']:.2f} | {r['cpu_s']:.2f} | {o['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} "
              f"| {o['graph_mb']:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
