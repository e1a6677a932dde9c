"""tortoise-ggml's fused CPU kernels (conv_time_major.c, attend_cache.c, relpos_softmax.c, q8_matmul.c,
group_norm.c, spectral_conv.c), as ggml custom ops on a pyggml Context.

    from tortoise_ggml import kernels
    if kernels.usable(backend, channels):
        y = kernels.conv1d(ctx, x, w, b, dilation=3, pad=3, leaky_slope=0.1)

The library is built with the package (CMakeLists.txt, GCC or Clang). Where it is missing, or for a backend that
cannot run custom ops (anything but the CPU), the models build the same computation from plain ggml ops.
"""
from __future__ import annotations

import glob
import os

import cffi

from pyggml import Context, ShapeError, Tensor
from pyggml.raw import ffi as ggml_ffi

_ffi = cffi.FFI()
_ffi.cdef("""
struct tg_conv_params { int32_t taps; int32_t dilation; int32_t pad; int32_t hop; int32_t leaky; float slope; };
void tg_conv1d(void * dst, int ith, int nth, void * userdata);
void tg_lvc_gated(void * dst, int ith, int nth, void * userdata);
struct tg_attend_params { float scale; };
void tg_attend_partial(void * dst, int ith, int nth, void * userdata);
void tg_attend_merge(void * dst, int ith, int nth, void * userdata);
struct tg_relpos_params { float scale; int32_t n; };
void tg_relpos_softmax(void * dst, int ith, int nth, void * userdata);
void tg_relpos_softmax_inplace(void * dst, void * a, void * b, int ith, int nth, void * userdata);
int tg_vector_width(void);
struct tg_q8_params { int32_t taps; int32_t bias; int32_t residual; };
void tg_im2col(void * dst, int ith, int nth, void * userdata);
void tg_q8_pack(void * dst, int ith, int nth, void * userdata);
void tg_q8_matmul(void * dst, int ith, int nth, void * userdata);
int tg_q8_matmul_available(void);
size_t tg_q8_packed_bytes(int64_t k);
void tg_f32_matmul(void * dst, int ith, int nth, void * userdata);
int tg_f32_matmul_available(void);
struct tg_group_norm_params { int32_t groups; int32_t silu; float eps; };
void tg_group_norm(void * dst, int ith, int nth, void * userdata);
struct tg_spectral_params { int32_t n; int32_t taps; int32_t dilation; int32_t pad; int32_t leaky_in; float slope_in;
                            int32_t leaky_out; float slope_out; int32_t bias; int32_t residual;
                            int32_t winograd; };
void tg_spectral_conv(void * dst, int ith, int nth, void * userdata);
""")


def _load():
    import tortoise_ggml
    for d in tortoise_ggml.__path__:
        for path in sorted(glob.glob(os.path.join(d, "libtortoise-kernels.*"))):
            return _ffi.dlopen(path)
    return None


_lib = _load()
# the params of every op made so far: custom ops keep a pointer to them, so they live as long as the module
_params: dict[tuple, object] = {}


def available() -> bool:
    return _lib is not None


def vector_width() -> int:
    return int(_lib.tg_vector_width()) if _lib is not None else 0


def usable(backend, *channel_counts: int) -> bool:
    """Whether ``backend`` can run these kernels on tensors with these channel counts (multiples of the vector
    width the library was built with)."""
    w = vector_width()
    return backend.kind == "cpu" and w > 0 and all(c % w == 0 for c in channel_counts)


def choose(fused: bool | None, can_run: bool, refusal: str) -> bool:
    """A model's ``fused`` argument resolved: None means wherever the kernels can run; True where they cannot
    raises ValueError(refusal)."""
    if fused and not can_run:
        raise ValueError(refusal)
    return can_run if fused is None else bool(fused)


def choose_for(fused: bool | None, backend) -> bool:
    """``choose`` for a model whose kernels need only a CPU backend and the library."""
    return choose(fused, usable(backend), f"tortoise-ggml's CPU kernels cannot run on the {backend.kind} backend "
                                          f"(kernels {'built' if available() else 'missing'})")


# position chunks per step across all rows (a batch-1 step: 16, each thread takes whole chunks in order)
ATTEND_SPLIT = 16


def attend_cache_fits(head_dim: int, heads: int) -> bool:
    """Whether ``attend_cache`` takes heads of this size and number (whole vectors, at most 16 per head)."""
    w = vector_width()
    return w > 0 and head_dim % w == 0 and head_dim // w <= 16 and heads >= 1


def _userdata(struct: str, **fields) -> int:
    """The address of a ``struct`` with these fields, made once per distinct value and kept for the module's
    lifetime: a custom op holds on to the pointer."""
    key = (struct, *sorted(fields.items()))
    if key not in _params:
        _params[key] = _ffi.new(f"struct {struct} *", fields)
    return int(_ffi.cast("uintptr_t", _params[key]))


def _conv_params(taps: int, dilation: int, pad: int, hop: int = 0, leaky_slope: float | None = None) -> int:
    return _userdata("tg_conv_params", taps=taps, dilation=dilation, pad=pad, hop=hop,
                     leaky=leaky_slope is not None, slope=leaky_slope or 0.0)


def _fn(name: str, kind: str = "ggml_custom_op_t"):
    return ggml_ffi.cast(kind, int(_ffi.cast("uintptr_t", getattr(_lib, name))))


def _check_input(x: Tensor, c_in: int, what: str) -> None:
    if x.type.name != "F32" or x.nb[0] != 4 or x.ne[0] != c_in or x.ne[3] != 1:
        raise ShapeError(f"{what}: input must be F32 time-major ne ({c_in}, T, B) with adjacent channels, got {x!r}")


def conv1d(ctx: Context, x: Tensor, w: Tensor, b: Tensor | None, taps: int, dilation: int = 1, pad: int = 0,
           leaky_slope: float | None = None) -> Tensor:
    """Stride-1 convolution of time-major x ne (C_in, T, B), zero padded by ``pad`` on the left (and whatever the
    taps need on the right, for T outputs): ne (C_out, T, B) = leaky_relu(b + conv(x)) (no activation when
    ``leaky_slope`` is None). w: contiguous ne (C_out, C_in*taps), element (j*C_in + i)*C_out + o."""
    c_out, c_in = w.ne[0], x.ne[0]
    if w.ne[1] != c_in * taps or not w.is_contiguous or w.type.name != "F32" or w.ne[2] != 1 or w.ne[3] != 1:
        raise ShapeError(f"conv1d: weight must be contiguous F32 ne (C_out, {c_in}*{taps}) for input {x!r}, "
                         f"got {w!r}")
    _check_input(x, c_in, "conv1d")
    if b is not None and (b.ne[0] != c_out or not b.is_contiguous):
        raise ShapeError(f"conv1d: bias must be contiguous ne ({c_out},), got {b!r}")
    args = [x, w] + ([b] if b is not None else [])
    return ctx.custom(_fn("tg_conv1d"), args, (c_out, x.ne[1], x.ne[2]),
                      userdata=_conv_params(taps, dilation, pad, 0, leaky_slope))


def lvc_gated(ctx: Context, x: Tensor, kernel: Tensor, bias: Tensor, residual: Tensor, taps: int, hop: int) -> Tensor:
    """UnivNet's location-variable convolution and gated residual in one op: segment l (samples [l*hop,
    (l+1)*hop)) of time-major x ne (C_in, L*hop, B) is convolved with kernel[l] (zero padded (taps-1)/2 at both
    ends of the whole input), its 2C outputs split into gate g and filter f, and the result is
    residual + sigmoid(g) * tanh(f), ne (C, L*hop, B).
    kernel: ne (2C, C_in*taps, L, B), element (j*C_in + i)*2C + o, contiguous within each segment's kernel
    (the L kernels may be a strided view); bias: ne (2C, 1, L, B), contiguous within each segment's."""
    c_in, length, batch = x.ne[0], x.ne[1], x.ne[2]
    c_out, segments = kernel.ne[0], kernel.ne[2]
    _check_input(x, c_in, "lvc_gated")
    if (kernel.ne[1] != c_in * taps or kernel.ne[3] != batch or c_out % 2 or kernel.type.name != "F32"
            or kernel.nb[0] != 4 or kernel.nb[1] != 4 * c_out):
        raise ShapeError(f"lvc_gated: kernel must be F32 ne (2C, {c_in}*{taps}, L, {batch}) with adjacent rows, "
                         f"got {kernel!r}")
    if segments * hop != length:
        raise ShapeError(f"lvc_gated: {segments} kernels of hop {hop} do not cover {length} samples")
    if bias.ne != (c_out, 1, segments, batch) or bias.nb[0] != 4 or bias.type.name != "F32":
        raise ShapeError(f"lvc_gated: bias must be F32 ne ({c_out}, 1, {segments}, {batch}), got {bias!r}")
    if residual.ne[:3] != (c_out // 2, length, batch) or residual.nb[0] != 4:
        raise ShapeError(f"lvc_gated: residual must be ne ({c_out // 2}, {length}, {batch}), got {residual!r}")
    return ctx.custom(_fn("tg_lvc_gated"), [x, kernel, bias, residual], (c_out // 2, length, batch),
                      userdata=_conv_params(taps, 1, (taps - 1) // 2, hop))


def attend_cache(ctx: Context, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                 shared: Tensor | None = None) -> Tensor:
    """One decode step's attention: softmax(scale q.k + mask) v for q ne (D, 1, H, R) over the cached keys and
    values k, v ne (D, N, H, R) (F32 views of a KV cache; rows of D floats contiguous), mask F16 ne (N, 1) shared
    by all rows and heads (0 to attend, -inf to skip). Returns ne (D, H, 1, R), as ggml_flash_attn_ext.
    ``shared``: I32 ne (1,), the count of leading positions whose keys and values are the same in every row (a
    prompt broadcast to all samples): those are read from row 0 only."""
    d, tq, h, r = q.ne
    w = vector_width()
    if tq != 1 or q.type.name != "F32" or q.nb[0] != 4 or not attend_cache_fits(d, h):
        raise ShapeError(f"attend_cache: q must be F32 ne (D, 1, H, R) with D a multiple of {w} (at most "
                         f"{16 * w}), got {q!r}")
    for name, t in (("k", k), ("v", v)):
        if t.type.name != "F32" or t.nb[0] != 4 or (t.ne[0], t.ne[2], t.ne[3]) != (d, h, r):
            raise ShapeError(f"attend_cache: {name} must be F32 ne ({d}, N, {h}, {r}), got {t!r}")
    if k.ne[1] != v.ne[1] or mask.type.name != "F16" or mask.ne != (k.ne[1], 1, 1, 1) or not mask.is_contiguous:
        raise ShapeError(f"attend_cache: mask must be F16 ne ({k.ne[1]}, 1) for keys {k!r} and values {v!r}, "
                         f"got {mask!r}")
    if shared is not None and (shared.type.name != "I32" or shared.ne != (1, 1, 1, 1)):
        raise ShapeError(f"attend_cache: shared must be I32 ne (1,), got {shared!r}")
    # the valid positions of each row in chunks that the threads share (whole positions each: see attend_cache.c)
    chunks = max(1, ATTEND_SPLIT // r)
    part = ctx.custom(_fn("tg_attend_partial"), [q, k, v, mask] + ([shared] if shared is not None else []),
                      (d + 2, h, chunks, r), userdata=_userdata("tg_attend_params", scale=float(scale)))
    return ctx.custom(_fn("tg_attend_merge"), [part], (d, h, 1, r))


def relpos_softmax(ctx: Context, scores: Tensor, table: Tensor, n: int, scale: float, inplace: bool = False
                   ) -> Tensor:
    """Attention weights softmax(scale * scores + relative position bias) over the first n keys, 0 for the keys
    after them (padding): scores F32 contiguous ne (K >= n keys, n queries, H, B); table F32 contiguous
    ne (2n-1, H), the bias of key j for query i being table[j - i + n - 1, h] (RelativePositionBias.per_distance).
    The same as soft_max_ext with RelativePositionBias.forward's mask, without building the mask. ``inplace``: the
    weights overwrite ``scores`` (which nothing else may read later), saving a buffer of their size."""
    nk, nq, h, _ = scores.ne
    if scores.type.name != "F32" or not scores.is_contiguous or nq != n or nk < n:
        raise ShapeError(f"relpos_softmax: scores must be contiguous F32 ne (K >= {n}, {n}, H, B), got {scores!r}")
    if table.type.name != "F32" or not table.is_contiguous or table.ne[:3] != (2 * n - 1, h, 1):
        raise ShapeError(f"relpos_softmax: table must be contiguous F32 ne ({2 * n - 1}, {h}), got {table!r}")
    ud = _userdata("tg_relpos_params", scale=float(scale), n=int(n))
    if inplace:  # the weights overwrite the scores
        return ctx.custom2_inplace(_fn("tg_relpos_softmax_inplace", "ggml_custom2_op_t"), scores, table, ud)
    return ctx.custom(_fn("tg_relpos_softmax"), [scores, table], scores.ne, userdata=ud)


def _need(built: bool, what: str, isa: str) -> None:
    if not built:
        raise ShapeError(f"{what}: the kernels library was built without {isa} (kernels.*_fits tells where the "
                         "op can run)")


def _check_time_major(x: Tensor, what: str) -> None:
    if x.type.name != "F32" or x.nb[0] != 4 or x.ne[3] != 1:
        raise ShapeError(f"{what}: input must be F32 time-major ne (C, T, B) with adjacent channels, got {x!r}")


def _taps(taps: int, what: str) -> int:
    if taps < 1 or taps % 2 == 0:
        raise ShapeError(f"{what}: taps must be odd and positive (zero padding (taps-1)/2 each side), got {taps}")
    return int(taps)


def im2col(ctx: Context, x: Tensor, taps: int) -> Tensor:
    """The columns of a stride-1 convolution padded (taps-1)/2 each side, from time-major x ne (C, T, B):
    ne (C*taps, T, B), element c*taps + j of column t being x[t - pad + j][c] (ggml_im2col's order, so a Conv1d
    weight flattened as torch stores it multiplies them unchanged). Made straight from time-major data: ggml's
    im2col reads channel-major data."""
    _check_time_major(x, "im2col")
    taps = _taps(taps, "im2col")
    return ctx.custom(_fn("tg_im2col"), [x], (x.ne[0] * taps, x.ne[1], x.ne[2]),
                      userdata=_userdata("tg_q8_params", taps=taps, bias=0, residual=0))


def q8_matmul_fits(w: Tensor) -> bool:
    """Whether q8_matmul takes weight ``w`` (on a backend where ``usable`` holds): a plain Q8_0 matrix (not in a
    repacked layout) with a multiple of 16 rows, and the kernels built for AVX-512 VNNI or AVX2."""
    return (_lib is not None and bool(_lib.tg_q8_matmul_available()) and w.type.name == "Q8_0"
            and w.matmul_layout is None and w.ne[1] % 16 == 0 and w.ne[0] % 32 == 0 and w.ne[2] == 1
            and w.ne[3] == 1 and w.is_contiguous)


def f32_matmul_fits(w: Tensor) -> bool:
    """Whether f32_matmul takes weight ``w`` (on a backend where ``usable`` holds): contiguous F32 or F16 matrices
    (one, or a batch over ne[2], ne[3]) with a multiple of 16 rows, and the kernels built for AVX-512 or AVX2."""
    return (_lib is not None and bool(_lib.tg_f32_matmul_available()) and w.type.name in ("F32", "F16")
            and w.ne[1] % 16 == 0 and w.is_contiguous)


def _epilogue(m: int, n: tuple, bias: Tensor | None, residual: Tensor | None, what: str) -> list:
    if bias is not None and (bias.type.name != "F32" or bias.ne[:1] != (m,) or not bias.is_contiguous):
        raise ShapeError(f"{what}: bias must be contiguous F32 ne ({m},), got {bias!r}")
    if residual is not None and (residual.type.name != "F32" or residual.ne != (m, *n, 1)
                                 or not residual.is_contiguous):
        raise ShapeError(f"{what}: residual must be contiguous F32 ne ({m}, {n[0]}, {n[1]}), got {residual!r}")
    return [t for t in (bias, residual) if t is not None]


def f32_matmul(ctx: Context, w: Tensor, cols: Tensor, bias: Tensor | None = None,
               residual: Tensor | None = None) -> Tensor:
    """w @ cols (+ bias) (+ residual) for an F32 or F16 weight ne (K, M) (F16 widened exactly; the products in F32)
    and contiguous F32 columns ne (K, T, B) (time-major data, or im2col's): F32 ne (M, T, B). Or a batch, as
    mul_mat: weights ne (K, M, H, B) and columns ne (K, N, H, B) -> ne (M, N, H, B) (no bias or residual)."""
    _need(_lib is not None and bool(_lib.tg_f32_matmul_available()), "f32_matmul", "AVX-512 or AVX2")
    k, m = w.ne[0], w.ne[1]
    batched = w.ne[2] * w.ne[3] > 1
    if w.type.name not in ("F32", "F16") or m % 16 or not w.is_contiguous:
        raise ShapeError(f"f32_matmul: weight must be contiguous F32 or F16 ne (K, M[, H, B]), M a multiple of 16, "
                         f"got {w!r}")
    if (cols.type.name != "F32" or cols.ne[0] != k or not cols.is_contiguous
            or (cols.ne[3] != 1 if not batched else cols.ne[2:] != w.ne[2:])):
        want = f"({k}, N, {w.ne[2]}, {w.ne[3]})" if batched else f"({k}, T, B)"
        raise ShapeError(f"f32_matmul: columns must be contiguous F32 ne {want}, got {cols!r}")
    if batched and (bias is not None or residual is not None):
        raise ShapeError("f32_matmul: a batch of products takes no bias or residual")
    args = [w, cols] + _epilogue(m, (cols.ne[1], cols.ne[2]), bias, residual, "f32_matmul")
    return ctx.custom(_fn("tg_f32_matmul"), args, (m, *cols.ne[1:]),
                      userdata=_userdata("tg_q8_params", taps=1, bias=int(bias is not None),
                                         residual=int(residual is not None)))


def q8_pack(ctx: Context, x: Tensor, taps: int = 1) -> Tensor:
    """im2col(x, taps) quantized for q8_matmul (exactly as ggml quantizes activations for a Q8_0 product):
    I8 ne (bytes per column, T, B)."""
    _need(_lib is not None and bool(_lib.tg_q8_matmul_available()), "q8_pack", "AVX-512 VNNI or AVX2")
    _check_time_major(x, "q8_pack")
    taps = _taps(taps, "q8_pack")
    k = x.ne[0] * taps
    if k % 32:
        raise ShapeError(f"q8_pack: {x.ne[0]} channels x {taps} taps is not a multiple of 32, got {x!r}")
    return ctx.custom(_fn("tg_q8_pack"), [x], (int(_lib.tg_q8_packed_bytes(k)), x.ne[1], x.ne[2]), type="i8",
                      userdata=_userdata("tg_q8_params", taps=taps, bias=0, residual=0))


def q8_matmul(ctx: Context, w: Tensor, packed: Tensor, k: int, bias: Tensor | None = None,
              residual: Tensor | None = None) -> Tensor:
    """w @ columns (+ bias) (+ residual) for a Q8_0 weight ne (K, M) and columns packed by q8_pack (K = ``k``
    values each): F32 ne (M, T, B), time-major. ``residual``: F32 ne (M, T, B)."""
    _need(_lib is not None and bool(_lib.tg_q8_matmul_available()), "q8_matmul", "AVX-512 VNNI or AVX2")
    m = w.ne[1]
    if w.type.name != "Q8_0" or w.ne[0] != k or m % 16 or w.matmul_layout is not None or not w.is_contiguous:
        raise ShapeError(f"q8_matmul: weight must be a plain contiguous Q8_0 matrix ne ({k}, M), M a multiple of 16, "
                         f"got {w!r}")
    if (packed.type.name != "I8" or packed.ne[0] != int(_lib.tg_q8_packed_bytes(k)) or not packed.is_contiguous
            or packed.ne[3] != 1):
        raise ShapeError(f"q8_matmul: columns must come from q8_pack with {k} values each, got {packed!r}")
    args = [w, packed] + _epilogue(m, (packed.ne[1], packed.ne[2]), bias, residual, "q8_matmul")
    return ctx.custom(_fn("tg_q8_matmul"), args, (m, packed.ne[1], packed.ne[2]),
                      userdata=_userdata("tg_q8_params", taps=1, bias=int(bias is not None),
                                         residual=int(residual is not None)))


def group_norm(ctx: Context, x: Tensor, gamma: Tensor, beta: Tensor, groups: int, eps: float,
               emb: Tensor | None = None, silu: bool = False) -> Tensor:
    """torch GroupNorm with its affine weight and bias on time-major x ne (C, T, B), then (with ``emb`` ne (2C, B),
    scale | shift) ``* (1 + scale) + shift``, then SiLU if ``silu``: ne (C, T, B)."""
    _check_time_major(x, "group_norm")
    c = x.ne[0]
    if groups < 1 or c % groups:
        raise ShapeError(f"group_norm: {c} channels do not split into {groups} groups")
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.type.name != "F32" or v.ne[:2] != (c, 1) or not v.is_contiguous:
            raise ShapeError(f"group_norm: {name} must be contiguous F32 ne ({c},), got {v!r}")
    args = [x, gamma, beta]
    if emb is not None:
        if emb.type.name != "F32" or emb.ne[:2] != (2 * c, x.ne[2]) or emb.nb[0] != 4:
            raise ShapeError(f"group_norm: emb must be F32 ne ({2 * c}, {x.ne[2]}), got {emb!r}")
        args.append(emb)
    return ctx.custom(_fn("tg_group_norm"), args, x.ne[:3],
                      userdata=_userdata("tg_group_norm_params", groups=int(groups), silu=int(bool(silu)),
                                         eps=float(eps)))


# ------------------------------------------------------------------------------------------------------------------
# spectral convolution (spectral_conv.c)
# ------------------------------------------------------------------------------------------------------------------
SPECTRAL_SIZE = 32  # FFT points per block: 2.8 C^2 per sample at 11 taps (direct: 11 C^2), 2.4 at 7
SPECTRAL_MAX_SIZE = 64  # spectral_conv.c's MAX_N: its per-thread FFT buffers


def spectral_weights(w, n: int = SPECTRAL_SIZE):
    """A Conv1d weight (C_out, C_in, taps) in spectral_conv1d's layout: float32 (n/2, C_in, 2*C_out), slot f
    holding the real then imaginary parts of conj(DFT_n(w)) / (2n) at bin f (slot 0: bins 0 and n/2), computed in
    float64."""
    import numpy as np
    w = np.asarray(w, dtype=np.float64)
    c_out, c_in, taps = w.shape
    if not 1 <= taps <= n:
        raise ShapeError(f"spectral_weights: {taps} taps do not fit {n}-point blocks")
    spec = np.conj(np.fft.rfft(w, n, axis=2)) / (2 * n)            # (C_out, C_in, n/2 + 1)
    out = np.empty((n // 2, c_in, 2, c_out), dtype=np.float64)
    out[:, :, 0] = spec[:, :, :n // 2].real.transpose(2, 1, 0)
    out[:, :, 1] = spec[:, :, :n // 2].imag.transpose(2, 1, 0)
    out[0, :, 1] = spec[:, :, n // 2].real.T                        # slot 0: bin n/2 in the imaginary place
    return out.reshape(n // 2, c_in, 2 * c_out).astype(np.float32)


def spectral_conv1d(ctx: Context, x: Tensor, w: Tensor, bias: Tensor | None, taps: int, dilation: int = 1,
                    n: int = SPECTRAL_SIZE, leaky_in: float | None = None, leaky_out: float | None = None,
                    residual: Tensor | None = None) -> Tensor:
    """The 'same' convolution (stride 1, zero padding dilation*(taps-1)/2 each side) of time-major x ne (C_in, T,
    B) by FFT: ne (C_out, T, B) = leaky_out(bias + conv(leaky_in(x))) (+ residual), each leaky ReLU (given its
    slope) optional. w: ``spectral_weights`` of the Conv1d weight, F32 ne (2*C_out, C_in, n/2). One op: each
    thread takes groups of blocks through their spectra, one complex product per frequency and the inverse with
    the epilogue, in buffers of its own (the spectra never reach memory)."""
    if not 4 <= n <= SPECTRAL_MAX_SIZE or n & (n - 1) or not 1 <= taps <= n // 2 or taps % 2 == 0:
        raise ShapeError(f"spectral_conv1d: {n}-point blocks (a power of 2 up to {SPECTRAL_MAX_SIZE}) take odd taps "
                         f"<= {n // 2}, got {taps} taps")
    return _transformed_conv(ctx, x, w, bias, taps, dilation, n, False, leaky_in, leaky_out, residual,
                             "spectral_conv1d")


def winograd_weights(w):
    """A 3-tap Conv1d weight (C_out, C_in, 3) in winograd_conv1d's layout: float32 (3, C_in, 2*C_out), slot s
    holding points 2s and 2s + 1 of G g (F(4,3)'s weight transform), computed in float64."""
    import numpy as np
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 3 or w.shape[2] != 3:
        raise ShapeError(f"winograd_weights: want a 3-tap weight (C_out, C_in, 3), got shape {w.shape}")
    g = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
    u = np.einsum("pj,oij->pio", g, w)                              # (6, C_in, C_out)
    return u.reshape(3, 2, w.shape[1], w.shape[0]).transpose(0, 2, 1, 3).reshape(3, w.shape[1], -1).astype(
        np.float32)


def winograd_conv1d(ctx: Context, x: Tensor, w: Tensor, bias: Tensor | None, dilation: int = 1,
                    leaky_in: float | None = None, leaky_out: float | None = None,
                    residual: Tensor | None = None) -> Tensor:
    """spectral_conv1d for 3 taps by Winograd F(4,3) (6 products per 4 outputs instead of 12): w from
    ``winograd_weights``, F32 ne (2*C_out, C_in, 3)."""
    return _transformed_conv(ctx, x, w, bias, 3, dilation, 6, True, leaky_in, leaky_out, residual,
                             "winograd_conv1d")


def _transformed_conv(ctx, x, w, bias, taps, dilation, n, winograd, leaky_in, leaky_out, residual, what):
    c_in, length, batch = x.ne[0], x.ne[1], x.ne[2]
    _check_input(x, c_in, what)
    c_out = w.ne[0] // 2
    if w.type.name != "F32" or not w.is_contiguous or w.ne[:3] != (2 * c_out, c_in, n // 2) or w.ne[3] != 1:
        raise ShapeError(f"{what}: weight must be contiguous F32 ne (2*C_out, {c_in}, {n // 2}), got {w!r}")
    if bias is not None and (bias.type.name != "F32" or bias.ne[:1] != (c_out,) or not bias.is_contiguous):
        raise ShapeError(f"{what}: bias must be contiguous F32 ne ({c_out},), got {bias!r}")
    if residual is not None and (residual.type.name != "F32" or residual.ne[:3] != (c_out, length, batch)
                                 or residual.nb[0] != 4):
        raise ShapeError(f"{what}: residual must be F32 ne ({c_out}, {length}, {batch}), got {residual!r}")
    if dilation < 1:
        raise ShapeError(f"{what}: dilation must be >= 1, got {dilation}")
    ud = _userdata("tg_spectral_params", n=int(n), taps=int(taps), dilation=int(dilation),
                   pad=int(dilation * (taps - 1) // 2), leaky_in=leaky_in is not None, slope_in=leaky_in or 0.0,
                   leaky_out=leaky_out is not None, slope_out=leaky_out or 0.0, bias=bias is not None,
                   residual=residual is not None, winograd=int(winograd))
    args = [x, w] + [t for t in (bias, residual) if t is not None]
    return ctx.custom(_fn("tg_spectral_conv"), args, (c_out, length, batch), userdata=ud)


__all__ = ["available", "usable", "vector_width", "choose", "choose_for", "attend_cache_fits", "conv1d", "lvc_gated",
           "attend_cache", "relpos_softmax", "im2col", "q8_matmul_fits", "f32_matmul_fits", "f32_matmul", "q8_pack",
           "q8_matmul", "group_norm", "SPECTRAL_SIZE", "spectral_weights", "spectral_conv1d",
           "winograd_weights", "winograd_conv1d"]
