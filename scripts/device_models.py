#!/usr/bin/env python3
"""Random-weight GGUF models that travel to the device machine as skeletons, and are rebuilt there without torch.

A converted model is tens of MB of random numbers (the small test model: 58 MB in f32), too much for the device
tool's 64 MiB with the wheels; the numbers themselves need not travel. A skeleton (NAME.gguf.skel) keeps what the
converter wrote except the large tensors' data: the GGUF header verbatim (metadata, tensor names, types, shapes,
offsets), every tensor of at most --verbatim-bytes (4 KiB) verbatim (norms, biases, mel norms, CLVP's
temperature...), and for each larger tensor its mean and standard deviation. ``unpack`` writes the same file
layout back, drawing each large tensor from a seeded normal distribution with that mean and deviation (q8_0
blocks: uniform int8 codes with a scale giving that deviation), so the weights are random like the oracle's,
though not the same numbers. The device check compares our CUDA backend with our CPU backend on one such file, so
that is all it needs.

    python scripts/device_models.py pack MODEL.gguf [--stats-from MODEL-f32.gguf] -o MODEL.gguf.skel
    python scripts/device_models.py unpack MODEL.gguf.skel -o MODEL.gguf [--seed 0]

Needs numpy (pack also gguf). Both work on any size: a full-size skeleton is a few hundred KB.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

import numpy as np

MAGIC = b"TGSKEL01"
# ggml type ids (ggml.h enum ggml_type)
F32, F16, Q8_0, BF16 = 0, 1, 8, 30
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
UNIFORM_INT8_STD = float(np.sqrt((255.0 ** 2 - 1) / 12))   # std of integers uniform on [-127, 127]


def _as_f32(t) -> np.ndarray | None:
    """A tensor's values as float32 (None for types this script does not read)."""
    raw = np.asarray(t.data)
    tt = int(t.tensor_type)
    if tt == F32:
        return raw.astype(np.float32, copy=False).ravel()
    if tt == F16:
        return raw.view(np.float16).astype(np.float32).ravel()
    if tt == BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).ravel()
    if tt == Q8_0:
        blocks = raw.view(np.uint8).reshape(-1).view(Q8_0_BLOCK)
        return (blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)).ravel()
    return None


def pack(path: str, out: str, stats_from: str | None = None, verbatim_bytes: int = 4096) -> dict:
    import gguf
    reader = gguf.GGUFReader(path)
    twin = {t.name: t for t in gguf.GGUFReader(stats_from).tensors} if stats_from else {}
    tensors = sorted(reader.tensors, key=lambda t: t.data_offset)
    data_start = tensors[0].data_offset if tensors else os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(data_start)
    blobs, table = [], []
    for t in tensors:
        entry = {"name": t.name, "type": int(t.tensor_type), "offset": int(t.data_offset), "n_bytes": int(t.n_bytes)}
        if t.n_bytes <= verbatim_bytes:
            entry["mode"] = "verbatim"
            blobs.append(np.asarray(t.data).tobytes())
            assert len(blobs[-1]) == t.n_bytes, t.name
        else:
            values = _as_f32(twin.get(t.name, t))
            if values is None or entry["type"] not in (F32, F16, BF16, Q8_0):
                raise SystemExit(f"{path}: {t.name} has ggml type {entry['type']}, which unpack cannot draw")
            entry.update(mode="normal", mean=float(values.mean(dtype=np.float64)),
                         std=float(values.std(dtype=np.float64)))
        table.append(entry)
    meta = {"source": os.path.basename(path), "file_bytes": os.path.getsize(path), "header_bytes": len(header),
            "tensors": table}
    js = json.dumps(meta).encode()
    with open(out + ".tmp", "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(js)) + js + header)
        for b in blobs:
            f.write(b)
    os.replace(out + ".tmp", out)
    return meta


def _draw(entry: dict, rng: np.random.Generator) -> bytes:
    n_bytes, tt = entry["n_bytes"], entry["type"]
    mean, std = entry["mean"], entry["std"]
    if tt == Q8_0:
        blocks = np.empty(n_bytes // Q8_0_BLOCK.itemsize, Q8_0_BLOCK)
        blocks["qs"] = rng.integers(-127, 128, blocks["qs"].shape, dtype=np.int8)
        blocks["d"] = np.float16(max(std, 1e-8) / UNIFORM_INT8_STD)
        return blocks.tobytes()
    n = n_bytes // {F32: 4, F16: 2, BF16: 2}[tt]
    values = rng.standard_normal(n, dtype=np.float32)
    values *= np.float32(std)
    values += np.float32(mean)
    if tt == F16:
        return values.astype(np.float16).tobytes()
    if tt == BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return values.tobytes()


def unpack(path: str, out: str, seed: int = 0) -> dict:
    with open(path, "rb") as f:
        if f.read(8) != MAGIC:
            raise SystemExit(f"{path}: not a tortoise-ggml model skeleton")
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))
        header = f.read(meta["header_bytes"])
        tmp = out + ".tmp"
        with open(tmp, "wb") as o:
            o.write(header)
            for i, entry in enumerate(meta["tensors"]):
                o.seek(entry["offset"])
                if entry["mode"] == "verbatim":
                    o.write(f.read(entry["n_bytes"]))
                else:
                    o.write(_draw(entry, np.random.default_rng([seed, i])))
            o.truncate(meta["file_bytes"])
    os.replace(tmp, out)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="GGUF -> skeleton")
    p.add_argument("gguf")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--stats-from", help="read the large tensors' mean and deviation from this file instead "
                                        "(the f32 conversion of the same checkpoints)")
    p.add_argument("--verbatim-bytes", type=int, default=4096,
                   help="tensors of at most this many bytes travel as they are (default: vectors of <= 1024 floats)")
    u = sub.add_parser("unpack", help="skeleton -> GGUF with seeded random large tensors")
    u.add_argument("skel")
    u.add_argument("-o", "--out", required=True)
    u.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.cmd == "pack":
        meta = pack(a.gguf, a.out, a.stats_from, a.verbatim_bytes)
        drawn = [t for t in meta["tensors"] if t["mode"] == "normal"]
        print(f"{a.out}: {os.path.getsize(a.out):,} bytes for {meta['file_bytes']:,} ({len(drawn)} of "
              f"{len(meta['tensors'])} tensors drawn on unpack)", file=sys.stderr)
    else:
        meta = unpack(a.skel, a.out, a.seed)
        print(f"{a.out}: {meta['file_bytes']:,} bytes from {a.skel} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
