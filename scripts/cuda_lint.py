#!/usr/bin/env python3
"""Which nodes of our graphs would ggml's CUDA backend refuse? Answered on a machine without a GPU.

    python scripts/cuda_lint.py MODEL.gguf [MODEL2.gguf ...]

Runs every stage (the calls tests/test_cuda_stages.py makes) on the CPU backend with the plain ggml ops the models
build for a GPU (no fused CPU kernels, no repacked weights), and checks each node of every computed graph against
ggml_backend_cuda_device_supports_op's rules of the pinned ggml (ggml/src/ggml-cuda/ggml-cuda.cu, 0.20.2; flash
attention: fattn.cu ggml_cuda_get_best_fattn_kernel), for the ops the models use. pyggml's Backend.compute asks the
real supports_op on the device and raises GGMLError for a refused node, so a refusal found here is a device run
that would fail. Prints one line per distinct refusal (op, the rule, the shapes, the stage) and exits 1 if any.
The rules are a transcription: the device's supports_op stays the authority.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import pyggml as pg  # noqa: E402
from pyggml.raw import ffi, lib  # noqa: E402

FA_HEAD_SIZES = {40, 64, 72, 80, 96, 112, 128, 256}
T = {name: getattr(lib, f"GGML_TYPE_{name.upper()}") for name in ("f32", "f16", "bf16", "i32", "i64", "q8_0")}
UNARY_OK = {getattr(lib, f"GGML_UNARY_OP_{n}") for n in (
    "ABS", "SGN", "NEG", "STEP", "GELU", "SILU", "RELU", "SIGMOID", "HARDSIGMOID", "HARDSWISH", "GELU_ERF",
    "GELU_QUICK", "TANH", "EXP", "ELU", "FLOOR", "CEIL", "ROUND", "TRUNC") if hasattr(lib, f"GGML_UNARY_OP_{n}")}
GLU_OK = {getattr(lib, f"GGML_GLU_OP_{n}") for n in ("REGLU", "GEGLU", "SWIGLU", "GEGLU_ERF", "GEGLU_QUICK")
          if hasattr(lib, f"GGML_GLU_OP_{n}")}


def _s(c) -> str:
    return ffi.string(c).decode()


def _desc(p) -> str:
    src = ", ".join(f"{_s(lib.ggml_type_name(s.type))}{tuple(s.ne)}"
                    + ("" if lib.ggml_is_contiguous(s) else " non-contiguous") for s in p.src if s != ffi.NULL)
    return f"-> {_s(lib.ggml_type_name(p.type))}{tuple(p.ne)} from [{src}]"


def refusal(p) -> str | None:
    """Why CUDA would refuse node ``p`` (a struct ggml_tensor *), or None."""
    op, s0, s1 = p.op, p.src[0], p.src[1]
    if op == lib.GGML_OP_UNARY:
        u = lib.ggml_get_unary_op(p)
        if u not in UNARY_OK:
            return f"unary {_s(lib.ggml_unary_op_name(u))} has no CUDA kernel"
        return None if lib.ggml_is_contiguous(s0) else "unary op on a non-contiguous source"
    if op == lib.GGML_OP_GLU:
        if lib.ggml_get_glu_op(p) not in GLU_OK:
            return "this GLU has no CUDA kernel"
        return None if lib.ggml_is_contiguous_1(s0) else "GLU on a source not contiguous in dims 1..3"
    if op in (lib.GGML_OP_MUL_MAT, lib.GGML_OP_MUL_MAT_ID):
        if s0.nb[0] != lib.ggml_element_size(s0) or s1.nb[0] != lib.ggml_element_size(s1):
            return "mul_mat operand with strided elements (nb[0] != element size)"
        if s1.type == T["f16"] and s0.type != T["f16"]:
            return "mul_mat of F16 activations by non-F16 weights"
        return None
    if op == lib.GGML_OP_FLASH_ATTN_EXT:
        k, v, mask = p.src[1], p.src[2], p.src[3]
        if k.ne[0] not in FA_HEAD_SIZES or v.ne[0] != k.ne[0]:
            return f"flash attention head size {k.ne[0]} (CUDA kernels: {sorted(FA_HEAD_SIZES)})"
        if k.type != v.type:
            return "flash attention with K and V of different types (needs GGML_CUDA_FA_ALL_QUANTS)"
        if k.type not in (T["f32"], T["f16"], T["bf16"], T["q8_0"], lib.GGML_TYPE_Q4_0):
            return "flash attention K/V type"
        if mask != ffi.NULL and mask.ne[2] != 1:
            return "flash attention mask with ne[2] != 1"
        return None
    if op == lib.GGML_OP_GET_ROWS:
        return None if s0.type in (T["f32"], T["f16"], T["bf16"], T["i32"], T["q8_0"]) else "get_rows source type"
    if op == lib.GGML_OP_SET_ROWS:
        ok = (p.type in (T["f32"], T["f16"], T["bf16"], T["q8_0"]) and s0.type == T["f32"]) or \
             (p.type == T["f16"] and s0.type == T["f16"])
        return None if ok and s1.type in (T["i32"], T["i64"]) else "set_rows types"
    if op == lib.GGML_OP_CPY:
        fl = (T["f32"], T["f16"], T["bf16"])
        if (s0.type in fl and s1.type in fl) or (s0.type, s1.type) in {(T["f32"], T["q8_0"]), (T["q8_0"], T["f32"]),
                                                                       (T["f32"], T["i32"]), (T["i32"], T["f32"]),
                                                                       (T["i32"], T["i32"])}:
            return None
        return None if s0.type == s1.type and lib.ggml_is_contiguous(s0) and lib.ggml_is_contiguous(s1) else "cpy types"
    if op == lib.GGML_OP_REPEAT:
        return None if s0.type in (T["f32"], T["f16"]) else "repeat of a type other than F32/F16"
    if op == lib.GGML_OP_CONCAT:
        return None if s0.type == s1.type == p.type and not lib.ggml_is_quantized(s0.type) else "concat types"
    if op == lib.GGML_OP_CONV_TRANSPOSE_1D:
        return None if s0.type == s1.type == T["f32"] else "conv_transpose_1d needs F32 operands"
    if op in (lib.GGML_OP_NORM, lib.GGML_OP_RMS_NORM, lib.GGML_OP_L2_NORM):
        return None if lib.ggml_is_contiguous_rows(s0) else "norm of a source without contiguous rows"
    if op in (lib.GGML_OP_ROPE, lib.GGML_OP_ROPE_BACK):
        ok = s0.nb[0] == lib.ggml_type_size(s0.type) and lib.ggml_is_contiguous_2(s0)
        return None if ok else "rope of a source with strided elements or not contiguous in dims 2..3"
    if op in (lib.GGML_OP_IM2COL,):
        return None if lib.ggml_is_contiguous(s0) and lib.ggml_is_contiguous(s1) else "im2col of non-contiguous input"
    if op in (lib.GGML_OP_SUM_ROWS, lib.GGML_OP_MEAN, lib.GGML_OP_GROUP_NORM):
        return None if lib.ggml_is_contiguous(s0) else "sum_rows/mean/group_norm of a non-contiguous source"
    if op == lib.GGML_OP_ACC:
        return None if lib.ggml_is_contiguous(s0) and lib.ggml_is_contiguous(s1) else "acc of non-contiguous sources"
    if op in (lib.GGML_OP_ADD, lib.GGML_OP_SUB, lib.GGML_OP_MUL, lib.GGML_OP_DIV):
        fl = (T["f32"], T["f16"])
        return None if s0.type in fl and s1.type in fl and p.type in fl else "binary op on types other than F32/F16"
    if op in (lib.GGML_OP_CUSTOM, lib.GGML_OP_MAP_CUSTOM1, lib.GGML_OP_MAP_CUSTOM2, lib.GGML_OP_MAP_CUSTOM3) \
            if hasattr(lib, "GGML_OP_MAP_CUSTOM1") else op == lib.GGML_OP_CUSTOM:
        return "custom op (CPU only)"
    known = {getattr(lib, f"GGML_OP_{n}") for n in (
        "NONE", "RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE", "SCALE", "SQR", "SQRT", "SIN", "COS", "CLAMP", "LOG",
        "CONT", "SOFT_MAX", "PAD", "PAD_REFLECT_1D", "TIMESTEP_EMBEDDING", "LEAKY_RELU", "ARANGE", "UPSCALE",
        "DIAG_MASK_INF", "ARGMAX", "DUP", "SUM", "ADD1") if hasattr(lib, f"GGML_OP_{n}")}
    if op in known:
        return None
    return f"op {_s(lib.ggml_op_name(op))} not in this lint's table (check ggml-cuda.cu supports_op)"


class Recorder:
    def __init__(self):
        self.stage = "?"
        self.found = defaultdict(set)   # (op, why) -> {(shapes, stage)}
        self.nodes = 0
        orig = pg.Backend.compute
        rec = self

        def compute(backend, graph, *args, **kwargs):
            g = getattr(graph, "_ptr", None) or graph.ptr
            for i in range(lib.ggml_graph_n_nodes(g)):
                p = lib.ggml_graph_node(g, i)
                rec.nodes += 1
                why = refusal(p)
                if why:
                    rec.found[(_s(lib.ggml_op_desc(p)), why)].add((_desc(p), rec.stage))
            return orig(backend, graph, *args, **kwargs)

        pg.Backend.compute = compute


def run_stages(path: str, rec: Recorder) -> None:
    from tortoise_ggml.api import do_spectrogram_diffusion, load_discrete_vocoder_diffuser
    from tortoise_ggml.weights.model_file import ModelFile
    from tortoise_ggml.weights.registry import REGISTRY
    be = pg.Backend("cpu", threads=2)
    mf = ModelFile(path, be, repack=False)
    m = {}
    for e in REGISTRY.values():
        if e.model is None or e.name not in mf.components:
            continue
        try:
            cls = e.model_class()
        except (ImportError, NotImplementedError):
            continue
        kw = {"fused": False} if "fused" in cls.__init__.__code__.co_varnames else {}
        m[e.attribute] = cls(mf, be, component=e.name, **kw)
    rng = np.random.default_rng(0)
    text = rng.integers(0, 255, (1, 24)).astype(np.int32)

    def stage(name):
        rec.stage = f"{os.path.basename(path)}: {name}"

    if "autoregressive" in m:
        ar = m["autoregressive"]
        ar.inference_model.fused_attention = False
        stage("ar.get_conditioning")
        cond = ar.get_conditioning((rng.standard_normal((1, 2, 80, 120)) * 2 - 5).astype(np.float32))
        stage("ar.forward")
        codes = rng.integers(0, 8192, (2, 40)).astype(np.int32)
        ar.forward(np.repeat(cond, 2, 0), np.repeat(text, 2, 0), [24, 24], codes, [40 * 1024] * 2)
        ar.forward(np.repeat(cond, 2, 0), np.repeat(text, 2, 0), [24, 24], codes, [40 * 1024] * 2,
                   return_latent=True)
        for kv in ("f32", "f16"):
            from tortoise_ggml.models.autoregressive import UnifiedVoice
            uv = UnifiedVoice(mf, be, kv_cache_type=kv, fused=False)
            uv.inference_model.fused_attention = False
            stage(f"ar prefill + decode (kv {kv})")
            uv.compute_prefix(cond, text)
            lg = uv.inference_model.start(uv.start_mel_token, 3, 8)
            for _ in range(3):
                lg = uv.inference_model.decode(lg.argmax(1))
            uv.inference_model.release()
    if "clvp" in m:
        stage("clvp")
        m["clvp"].forward(text, rng.integers(0, 8192, (4, 60)), return_latents=True)
    if "diffusion" in m:
        d = m["diffusion"]
        stage("diffusion.get_conditioning")
        dc = d.get_conditioning((rng.standard_normal((1, d.in_channels, 160)) * 2 - 5).astype(np.float32))
        lat = rng.standard_normal((1, 20, d.in_latent_channels)).astype(np.float32)
        stage("diffusion sampler (timestep_independent, steps)")
        do_spectrogram_diffusion(d, load_discrete_vocoder_diffuser(desired_diffusion_steps=2, cond_free=True,
                                                                   cond_free_k=2.0), lat, dc, rng=0)
    if "vocoder" in m:
        v = m["vocoder"]
        stage("vocoder")
        v.inference((rng.standard_normal((1, v.mel_channel, 48)) * 2 - 5).astype(np.float32), seed=0)
    for name in ("rlg_auto", "rlg_diffusion"):
        if name in m:
            stage(name)
            m[name].forward(rng.standard_normal((2, m[name].channels)).astype(np.float32))
    if "hifi_decoder" in m:
        h = m["hifi_decoder"]
        stage("hifigan")
        h.inference(rng.standard_normal((1, 12, h.in_channels)).astype(np.float32),
                    rng.standard_normal((1, h.cond_channels)).astype(np.float32))


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    rec = Recorder()
    for p in paths:
        run_stages(p, rec)
    print(f"cuda_lint: {rec.nodes} graph nodes checked over {len(paths)} file(s)")
    for (op, why), where in sorted(rec.found.items()):
        stages = sorted({s for _, s in where})
        print(f"REFUSED {op}: {why}\n    e.g. {sorted(where)[0][0]}\n    in {'; '.join(stages)}")
    if not rec.found:
        print("cuda_lint: no node the CUDA backend would refuse")
    return 1 if rec.found else 0


if __name__ == "__main__":
    sys.exit(main())
