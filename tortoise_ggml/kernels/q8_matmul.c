// Products of Q8_0 weights with time-major activations for the diffusion decoder's trunk, run as ggml custom ops.
//
// ggml's CPU path for a Q8_0 weight (tinyBLAS_Q0) dots one weight row with one activation column per 32-block:
// sign fix-ups, a 256-bit dot, a conversion and a scaled add for every 32 multiply-adds, so on a CPU without AMX
// it runs barely faster than F32. Here the output rows are the vector lanes: each thread repacks a panel of 16 or
// 32 weight rows so that one 64-byte load holds 4 consecutive weights of 16 rows, and each 4-byte group of an
// activation column is broadcast into VPDPBUSD against it, so 64 multiply-adds retire per instruction and the
// per-block scaling is paid once per 16 rows x 32 weights. The activations are quantized exactly as
// quantize_row_q8_0 does (amax/127 per 32-block, scale rounded to F16, round to nearest even), and each block adds
// float(integer dot) * (d_w * d_x), in block order: ggml's terms, summed in another order (ggml keeps 8 partial
// sums per block and adds them at the end), so the results agree to float rounding, not bit for bit.
//
// VPDPBUSD multiplies unsigned by signed bytes: the panel holds w + 128 (unsigned), and each packed activation
// block carries -128 * sum(q), which starts its integer accumulator, so the sum is exactly sum(w * q).
//
// Layouts (ggml ne order, time-major: the channels of one frame adjacent):
//   x       F32 ne (C, T, B), nb[0] == 4
//   columns the product's operand for frame t is x's frames t - pad .. t - pad + taps - 1 flattened channel-major
//           (element c*taps + j is x[t - pad + j][c], zero outside [0, T)): ggml_im2col's order, so a Conv1d weight
//           flattened as torch stores it, (C_out, C_in*K), multiplies it unchanged; pad = (taps - 1) / 2
//   packed  I8 ne (tg_q8_packed_bytes(K), T, B): per column q[K] (int8), d[K/32] (float), corr[K/32] (int32)
//   weight  Q8_0 ne (K, M), M a multiple of 16, K of 32; bias F32 ne (M); residual F32 ne (M, T, B) contiguous
//
// tg_im2col:     dst F32 ne (C*taps, T, B) = the columns
// tg_q8_pack:    dst I8 packed = the columns, quantized
// tg_q8_matmul:  dst F32 ne (M, T, B) = weight @ columns (+ bias) (+ residual)
// tg_f32_matmul: the same for an F32 (or F16, widened while packing) weight ne (K, M) and F32 columns
//                ne (K, T, B) (x itself, or tg_im2col's), or batched: weights ne (K, M, H, B) times columns ne (K, N, H, B) -> ne (M, N, H, B) (attention):
//                the panel holds 32 rows per k, each column value is broadcast into 2 x 12 FMA accumulators, and
//                the whole contraction stays in registers (tinyBLAS's 4x6 tiles reread both operands from L2
//                once K passes ~1000, as the k3 convolutions' 3072 do)
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TG_Q8 1
#define TG_Q8_ROWS 32  // weight rows per panel: 2 x 16 lanes
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// AVX2 (no VNNI): 8 rows per panel, products by VPMADDUBSW on |w| and sign(w)*x (see tile8)
#include <immintrin.h>
#define TG_Q8 1
#define TG_Q8_AVX2 1
#define TG_Q8_ROWS 8
#endif
#if defined(__AVX512F__)
#define TG_F32 1
#define TG_F32_ROWS 32
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TG_F32 1
#define TG_F32_AVX2 1
#define TG_F32_ROWS 16  // 2 x 8 lanes
#endif

#include "ggml.h"

#define QK 32
#define GEMV_MAX_COLUMNS 4  // columns multiplied in place (more: repacked panels)

struct tg_q8_params {
    int32_t taps;      // tg_im2col, tg_q8_pack
    int32_t bias;      // tg_q8_matmul: src[2] is the bias
    int32_t residual;  // tg_q8_matmul: the next source is the residual
};

int tg_q8_matmul_available(void) {
#ifdef TG_Q8
    return 1;
#else
    return 0;
#endif
}

size_t tg_q8_packed_bytes(int64_t k) { return (size_t) k + (size_t) (k / QK) * 8; }

// per-thread scratch (a panel, a column); out of memory inside a graph has no way back but abort
static void * scratch(size_t bytes) {
    void * p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {  // the kernels link only ggml's headers: no ggml_abort
        fprintf(stderr, "tortoise-ggml kernels: out of memory for %zu bytes of scratch\n", bytes);
        abort();
    }
    return p;
}

// the columns [first, last) of the flattened index n = t + T*b
static void split(int64_t n, int ith, int nth, int64_t * first, int64_t * last) {
    const int64_t per = (n + nth - 1) / nth;
    *first = per * ith < n ? per * ith : n;
    *last = *first + per < n ? *first + per : n;
}

// column n of x's im2col into col[C*taps] (for taps == 1 the frame itself is returned, nothing copied)
static const float * gather(const struct ggml_tensor * x, int taps, int64_t n, float * col) {
    const int64_t c = x->ne[0], t_len = x->ne[1], t = n % t_len, b = n / t_len;
    const char * base = (const char *) x->data + b * x->nb[2];
    if (taps == 1) {
        return (const float *) (base + t * x->nb[1]);
    }
    const int pad = (taps - 1) / 2;
    for (int j = 0; j < taps; j++) {
        const int64_t s = t - pad + j;
        if (s < 0 || s >= t_len) {
            for (int64_t i = 0; i < c; i++) col[i * taps + j] = 0.0f;
        } else {
            const float * f = (const float *) (base + s * x->nb[1]);
            for (int64_t i = 0; i < c; i++) col[i * taps + j] = f[i];
        }
    }
    return col;
}

void tg_im2col(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct ggml_tensor * x = dst->src[0];
    const int taps = ((const struct tg_q8_params *) userdata)->taps;
    const int64_t k = x->ne[0] * taps;
    int64_t first, last;
    split(x->ne[1] * x->ne[2], ith, nth, &first, &last);
    for (int64_t n = first; n < last; n++) {
        float * col = (float *) ((char *) dst->data + n * dst->nb[1]);
        const float * src = gather(x, taps, n, col);
        if (src != col) memcpy(col, src, k * sizeof(float));
    }
}

#if defined(TG_Q8) && !defined(TG_Q8_AVX2)
// quantize_row_q8_0's arithmetic for one 32-block, the scale rounded through F16 as block_q8_0 stores it
static void quantize_block(const float * v, int8_t * q, float * d, int32_t * corr) {
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *d = _cvtsh_ss(_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m512 m = _mm512_set1_ps(id);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, m), _MM_FROUND_TO_NEAREST_INT));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, m), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128((__m128i *) q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *) (q + 16), _mm512_cvtsepi32_epi8(qb));
    // the sum of the stored (saturated) bytes: they differ from qa, qb only for non-finite input
    const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
    const __m512i sa = _mm512_min_epi32(_mm512_max_epi32(qa, lo), hi);
    const __m512i sb = _mm512_min_epi32(_mm512_max_epi32(qb, lo), hi);
    *corr = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(sa, sb));
}
#elif defined(TG_Q8_AVX2)
// quantize_row_q8_0's AVX2 arithmetic for one 32-block (max |v| by halves, scale through F16, multiply by 127/max,
// round to nearest even, pack with saturation)
static void quantize_block(const float * v, int8_t * q, float * d, int32_t * corr) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 x[4];
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        x[i] = _mm256_loadu_ps(v + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, x[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *d = _cvtsh_ss(_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256 mul = _mm256_set1_ps(id);
    __m256i qi[4];
    for (int i = 0; i < 4; i++) {
        qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x[i], mul), _MM_FROUND_TO_NEAREST_INT));
    }
    const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) sum = _mm256_add_epi32(sum, _mm256_min_epi32(_mm256_max_epi32(qi[i], lo), hi));
    const __m256i p01 = _mm256_packs_epi32(qi[0], qi[1]), p23 = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *) q, bytes);
    __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *corr = -128 * _mm_cvtsi128_si32(s4);  // unused by the AVX2 product; kept so the packed layout is one
}
#endif

void tg_q8_pack(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
#ifdef TG_Q8
    const struct ggml_tensor * x = dst->src[0];
    const int taps = ((const struct tg_q8_params *) userdata)->taps;
    const int64_t k = x->ne[0] * taps, nb = k / QK;
    float * col = taps > 1 ? scratch(k * sizeof(float)) : NULL;
    int64_t first, last;
    split(x->ne[1] * x->ne[2], ith, nth, &first, &last);
    for (int64_t n = first; n < last; n++) {
        int8_t * q = (int8_t *) ((char *) dst->data + n * dst->nb[1]);
        float * d = (float *) (q + k);
        int32_t * corr = (int32_t *) (d + nb);
        const float * v = gather(x, taps, n, col);
        for (int64_t i = 0; i < nb; i++) quantize_block(v + i * QK, q + i * QK, d + i, corr + i);
    }
    free(col);
#else
    (void) dst, (void) ith, (void) nth, (void) userdata;
#endif
}

#if defined(__AVX512F__)
// one output column of a tile (16*ni rows): + bias, + residual, stored
static inline __attribute__((always_inline)) void store_column(const int ni, __m512 a0, __m512 a1, float * out,
                                                                const float * bias, const float * res) {
    for (int i = 0; i < ni; i++) {
        __m512 v = i ? a1 : a0;
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * i));
        if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + 16 * i));
        _mm512_storeu_ps(out + 16 * i, v);
    }
}
#endif

#if defined(TG_Q8) && !defined(TG_Q8_AVX2)
#define NR 6  // activation columns per tile: with 2 row groups, 12 integer + 12 float accumulators

typedef struct {
    uint16_t d;
    int8_t qs[QK];
} block_q8;

// rows [r0, r0 + 16*ni) of the Q8_0 weight into the panel: wq[((b*8 + g)*ni + i)*64 + l*4 + e] = w[r0 + 16i + l]
// [b*32 + g*4 + e] + 128, wd[(b*ni + i)*16 + l] = the scale of that row's block b. A decode step repacks every
// weight once per product, so this is an in-register transpose of 16 rows x 8 dwords per block (AVX2's 8x8
// transpose, run on rows l and l + 8 in the two halves of each register): scalar moves took twice as long as the
// product itself, gathers longer still.
static void pack_panel(const struct ggml_tensor * w, int64_t r0, int ni, int64_t nb, uint8_t * wq, float * wd) {
    const __m512i flip = _mm512_set1_epi32((int32_t) 0x80808080u);
    const __m512i lo128 = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    const __m512i hi128 = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int i = 0; i < ni; i++) {
        const block_q8 * rows[16];
        for (int l = 0; l < 16; l++) {
            rows[l] = (const block_q8 *) ((const char *) w->data + (r0 + 16 * i + l) * w->nb[1]);
        }
        for (int64_t b = 0; b < nb; b++) {
            uint16_t d[16];
            __m512i a[8], t[8], u[8];
            for (int l = 0; l < 16; l++) d[l] = rows[l][b].d;
            _mm512_storeu_ps(wd + (b * ni + i) * 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) d)));
            for (int p = 0; p < 8; p++) {
                a[p] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) rows[p][b].qs)),
                                          _mm256_loadu_si256((const __m256i *) rows[p + 8][b].qs), 1);
            }
            for (int p = 0; p < 4; p++) {
                t[2 * p] = _mm512_unpacklo_epi32(a[2 * p], a[2 * p + 1]);
                t[2 * p + 1] = _mm512_unpackhi_epi32(a[2 * p], a[2 * p + 1]);
            }
            for (int h = 0; h < 2; h++) {  // rows 0-3 (h = 0) and 4-7 of each half
                u[4 * h + 0] = _mm512_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);
                u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);
                u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
                u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
            }
            uint8_t * out = wq + (b * 8 * ni + i) * 64;
            for (int g = 0; g < 4; g++) {
                const __m512i c0 = _mm512_permutex2var_epi64(u[g], lo128, u[g + 4]);  // dword g of all 16 rows
                const __m512i c1 = _mm512_permutex2var_epi64(u[g], hi128, u[g + 4]);  // dword g + 4
                _mm512_store_si512(out + (g * ni) * 64, _mm512_xor_si512(c0, flip));
                _mm512_store_si512(out + ((g + 4) * ni) * 64, _mm512_xor_si512(c1, flip));
            }
        }
    }
}

// out[j*ldd + 16i + l] (16*ni rows x nr columns) = sum over blocks of float(idot) * d_w * d_x (+ bias) (+ res)
static inline __attribute__((always_inline)) void tile(const int ni, const int nr, const uint8_t * wq,
                                                        const float * wd, int64_t nb, const uint8_t * xc,
                                                        size_t xs, int64_t k, float * out, size_t ldd,
                                                        const float * bias, const float * res) {
    __m512 fa[2][NR];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < NR; j++) fa[i][j] = _mm512_setzero_ps();
    const float * xd[NR];
    const int32_t * xcorr[NR];
    for (int j = 0; j < nr; j++) {
        xd[j] = (const float *) (xc + j * xs + k);
        xcorr[j] = (const int32_t *) (xd[j] + nb);
    }
    for (int64_t b = 0; b < nb; b++) {
        __m512i ia[2][NR];
        for (int j = 0; j < nr; j++) {
            ia[0][j] = ia[1][j] = _mm512_set1_epi32(xcorr[j][b]);
        }
        const uint8_t * wb = wq + b * 8 * ni * 64;
        const uint8_t * xb = xc + b * QK;
        _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++) {
            const __m512i w0 = _mm512_loadu_si512(wb + (g * ni) * 64);
            const __m512i w1 = ni > 1 ? _mm512_loadu_si512(wb + (g * ni + 1) * 64) : w0;
            _Pragma("GCC unroll 6") for (int j = 0; j < nr; j++) {
                int32_t xv;
                memcpy(&xv, xb + j * xs + g * 4, 4);
                const __m512i xq = _mm512_set1_epi32(xv);
                ia[0][j] = _mm512_dpbusd_epi32(ia[0][j], w0, xq);
                if (ni > 1) ia[1][j] = _mm512_dpbusd_epi32(ia[1][j], w1, xq);
            }
        }
        for (int i = 0; i < ni; i++) {
            const __m512 dw = _mm512_loadu_ps(wd + (b * ni + i) * 16);
            for (int j = 0; j < nr; j++) {
                const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(xd[j][b]));
                fa[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[i][j]), s, fa[i][j]);
            }
        }
    }
    for (int j = 0; j < nr; j++) store_column(ni, fa[0][j], fa[1][j], out + j * ldd, bias, res ? res + j * ldd : NULL);
}

#define TILE_CASE(NI, N) \
    case N: tile(NI, N, wq, wd, nb, xc, xs, k, out, ldd, bias, res); break;

static void tiles(int ni, int nr, const uint8_t * wq, const float * wd, int64_t nb, const uint8_t * xc, size_t xs,
                  int64_t k, float * out, size_t ldd, const float * bias, const float * res) {
    if (ni == 2) {
        switch (nr) { TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 3) TILE_CASE(2, 4) TILE_CASE(2, 5) TILE_CASE(2, 6) }
    } else {
        switch (nr) { TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3) TILE_CASE(1, 4) TILE_CASE(1, 5) TILE_CASE(1, 6) }
    }
}

// the panel of rows [r0, r0 + 32) (16 where M ends first) and every column tile against it
static void q8_rows(const struct ggml_tensor * w, int64_t r0, int64_t m, int64_t nb, uint8_t * wq, float * wd,
                    const uint8_t * xc, size_t xs, int64_t n, int64_t k, float * dst, size_t ldd, const float * bias,
                    const float * res) {
    const int ni = r0 + 32 <= m ? 2 : 1;
    pack_panel(w, r0, ni, nb, wq, wd);
    for (int64_t c0 = 0; c0 < n; c0 += NR) {
        const int nr = n - c0 < NR ? (int) (n - c0) : NR;
        tiles(ni, nr, wq, wd, nb, xc + c0 * xs, xs, k, dst + c0 * ldd, ldd, bias, res ? res + c0 * ldd : NULL);
    }
}
#endif

#ifdef TG_Q8_AVX2
#define NR8 4  // activation columns per tile: 4 integer + 4 float accumulators, the weights, their magnitudes

typedef struct {
    uint16_t d;
    int8_t qs[QK];
} block_q8;

// rows [r0, r0 + 8) of the Q8_0 weight into the panel: wq[(b*8 + g)*32 + l*4 + e] = w[r0 + l][b*32 + g*4 + e]
// (signed), wd[b*8 + l] = the scale of row l's block b; the 8 x 8 dwords of a block transposed in registers
static void pack_panel8(const struct ggml_tensor * w, int64_t r0, int64_t nb, uint8_t * wq, float * wd) {
    const block_q8 * rows[8];
    for (int l = 0; l < 8; l++) rows[l] = (const block_q8 *) ((const char *) w->data + (r0 + l) * w->nb[1]);
    for (int64_t b = 0; b < nb; b++) {
        uint16_t d[8];
        __m256i a[8], t[8], u[8];
        for (int l = 0; l < 8; l++) {
            d[l] = rows[l][b].d;
            a[l] = _mm256_loadu_si256((const __m256i *) rows[l][b].qs);
        }
        _mm256_storeu_ps(wd + b * 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) d)));
        for (int p = 0; p < 4; p++) {
            t[2 * p] = _mm256_unpacklo_epi32(a[2 * p], a[2 * p + 1]);
            t[2 * p + 1] = _mm256_unpackhi_epi32(a[2 * p], a[2 * p + 1]);
        }
        for (int h = 0; h < 2; h++) {  // rows 0-3 (h = 0) and 4-7
            u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);  // dwords 0 | 4
            u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);  // 1 | 5
            u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);  // 2 | 6
            u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);  // 3 | 7
        }
        uint8_t * out = wq + b * 8 * 32;
        for (int g = 0; g < 4; g++) {
            _mm256_store_si256((__m256i *) (out + g * 32), _mm256_permute2x128_si256(u[g], u[g + 4], 0x20));
            _mm256_store_si256((__m256i *) (out + (g + 4) * 32), _mm256_permute2x128_si256(u[g], u[g + 4], 0x31));
        }
    }
}

// out[j*ldd + l] (8 rows x nr columns) = sum over blocks of float(idot) * d_w * d_x (+ bias) (+ res). The integer
// dot of 4 weights and 4 activations per lane: VPMADDUBSW(|w|, sign(w) * x) (pairs of products <= 2 * 127^2, no
// saturation: both sides are within [-127, 127]), VPMADDWD by ones to 32 bits
static inline __attribute__((always_inline)) void tile8(const int nr, const uint8_t * wq, const float * wd,
                                                         int64_t nb, const uint8_t * xc, size_t xs, int64_t k,
                                                         float * out, size_t ldd, const float * bias,
                                                         const float * res) {
    __m256 fa[NR8];
    const float * xd[NR8];
    for (int j = 0; j < NR8; j++) fa[j] = _mm256_setzero_ps();
    for (int j = 0; j < nr; j++) xd[j] = (const float *) (xc + j * xs + k);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        __m256i ia[NR8];
        for (int j = 0; j < nr; j++) ia[j] = _mm256_setzero_si256();
        const uint8_t * wb = wq + b * 8 * 32;
        const uint8_t * xb = xc + b * QK;
        _Pragma("GCC unroll 2") for (int g = 0; g < 8; g++) {
            const __m256i wv = _mm256_load_si256((const __m256i *) (wb + g * 32));
            const __m256i aw = _mm256_sign_epi8(wv, wv);
            _Pragma("GCC unroll 4") for (int j = 0; j < nr; j++) {
                int32_t xv;
                memcpy(&xv, xb + j * xs + g * 4, 4);
                const __m256i sx = _mm256_sign_epi8(_mm256_set1_epi32(xv), wv);
                ia[j] = _mm256_add_epi32(ia[j], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
            }
        }
        const __m256 dw = _mm256_loadu_ps(wd + b * 8);
        for (int j = 0; j < nr; j++) {
            const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(xd[j][b]));
            fa[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[j]), sc, fa[j]);
        }
    }
    for (int j = 0; j < nr; j++) {
        __m256 v = fa[j];
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
        if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(res + j * ldd));
        _mm256_storeu_ps(out + j * ldd, v);
    }
}

#define TILE8_CASE(N) \
    case N: tile8(N, wq, wd, nb, xc + c0 * xs, xs, k, dst + c0 * ldd, ldd, bias, res ? res + c0 * ldd : NULL); break;

static void q8_rows(const struct ggml_tensor * w, int64_t r0, int64_t m, int64_t nb, uint8_t * wq, float * wd,
                    const uint8_t * xc, size_t xs, int64_t n, int64_t k, float * dst, size_t ldd, const float * bias,
                    const float * res) {
    (void) m;
    pack_panel8(w, r0, nb, wq, wd);
    for (int64_t c0 = 0; c0 < n; c0 += NR8) {
        switch (n - c0 < NR8 ? (int) (n - c0) : NR8) { TILE8_CASE(1) TILE8_CASE(2) TILE8_CASE(3) TILE8_CASE(4) }
    }
}
#endif

#ifdef TG_Q8
// A few activation columns (a decode step of 1-4 rows) read each weight once, so repacking a panel costs more
// than the product: here each row's blocks are dotted in place against every column, one 256-bit integer dot
// and one scaled add per 32-block (ggml's vec_dot_q8_0_q8_0 arithmetic, so one column gets ggml's sums: 8 float
// lanes per row, added as hsum_float_8 adds them; simd.h's hsum adds in another order). ggml reaches it through its mul_mat, whose per-row calls, with one accumulator chain each, ran a decode
// step's 400 MB of weights at ~24 GB/s on 2 Zen 4 threads; this loop at 30-36 (the machine reads ~34).
static inline __m256i dot_i8(__m256i ax, __m256i sy) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// dst[c*ldd + r] for rows [r0, r1) and the nc packed columns (q[K], d[K/32] each, xs bytes apart) = w[r] . x_c
// (+ bias) (+ res): each weight block is loaded once for all the columns
static inline __attribute__((always_inline)) void q8_rows_in_place(
        const int nc, const struct ggml_tensor * w, int64_t r0, int64_t r1, int64_t nb, const int8_t * xc, size_t xs,
        int64_t k, float * dst, size_t ldd, const float * bias, const float * res) {
    for (int64_t r = r0; r < r1; r++) {
        const block_q8 * row = (const block_q8 *) ((const char *) w->data + r * w->nb[1]);
        __m256 acc[GEMV_MAX_COLUMNS];
        for (int c = 0; c < nc; c++) acc[c] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *) row[b].qs);
            const __m256i aw = _mm256_sign_epi8(wv, wv);
            const float dw = _cvtsh_ss(row[b].d);
            for (int c = 0; c < nc; c++) {
                const int8_t * xq = xc + c * xs;
                const __m256i xv = _mm256_loadu_si256((const __m256i *) (xq + b * QK));
                const __m256i idot = dot_i8(aw, _mm256_sign_epi8(xv, wv));
                const __m256 d = _mm256_set1_ps(dw * ((const float *) (xq + k))[b]);
                acc[c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(idot), acc[c]);
            }
        }
        for (int c = 0; c < nc; c++) {
            float v = hsum8(acc[c]);
            if (bias) v += bias[r];
            if (res) v += res[c * ldd + r];
            dst[c * ldd + r] = v;
        }
    }
}

#define IN_PLACE_CASE(N) \
    case N: q8_rows_in_place(N, w, r0, r1, nb, xc, xs, k, dst, ldd, bias, res); break;

static void q8_in_place(int nc, const struct ggml_tensor * w, int64_t r0, int64_t r1, int64_t nb, const int8_t * xc,
                        size_t xs, int64_t k, float * dst, size_t ldd, const float * bias, const float * res) {
    switch (nc) { IN_PLACE_CASE(1) IN_PLACE_CASE(2) IN_PLACE_CASE(3) IN_PLACE_CASE(4) }
}
#endif

void tg_q8_matmul(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
#ifdef TG_Q8
    const struct tg_q8_params * p = userdata;
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * xp = dst->src[1];
    const struct ggml_tensor * bt = p->bias ? dst->src[2] : NULL;
    const struct ggml_tensor * rt = p->residual ? dst->src[2 + (p->bias != 0)] : NULL;
    const int64_t k = w->ne[0], m = w->ne[1], nb = k / QK, n = xp->ne[1] * xp->ne[2];
    const size_t xs = xp->nb[1], ldd = m;
    if (n <= GEMV_MAX_COLUMNS) {  // contiguous row ranges, one per thread, read in place
        int64_t r0, r1;
        split(m, ith, nth, &r0, &r1);
        q8_in_place((int) n, w, r0, r1, nb, (const int8_t *) xp->data, xs, k, (float *) dst->data, ldd,
                    bt ? (const float *) bt->data : NULL, rt ? (const float *) rt->data : NULL);
        return;
    }
    // row tiles of TG_Q8_ROWS (AVX-512: a last one of 16 where M is an odd multiple of 16), dealt round robin to
    // the threads
    const int64_t n_tiles = (m + TG_Q8_ROWS - 1) / TG_Q8_ROWS;
    uint8_t * wq = NULL;
    float * wd = NULL;
    for (int64_t rt_i = ith; rt_i < n_tiles; rt_i += nth) {
        const int64_t r0 = rt_i * TG_Q8_ROWS;
        if (!wq) {
            wq = scratch((size_t) nb * QK * TG_Q8_ROWS);
            wd = scratch((size_t) nb * TG_Q8_ROWS * sizeof(float));
        }
        q8_rows(w, r0, m, nb, wq, wd, (const uint8_t *) xp->data, xs, n, k, (float *) dst->data + r0, ldd,
                bt ? (const float *) bt->data + r0 : NULL, rt ? (const float *) rt->data + r0 : NULL);
    }
    free(wq);
    free(wd);
#else
    (void) dst, (void) ith, (void) nth, (void) userdata;
#endif
}

#if defined(__AVX512F__)
#define NRF 12  // columns per F32 tile: 2 x 12 accumulators

static inline __attribute__((always_inline)) void tile_f32(const int ni, const int nr, const float * wp, int64_t k,
                                                            const float * xc, size_t xs, float * out, size_t ldd,
                                                            const float * bias, const float * res) {
    __m512 acc[2][NRF];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < NRF; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        const __m512 w0 = _mm512_load_ps(wp + kk * 16 * ni);
        const __m512 w1 = ni > 1 ? _mm512_load_ps(wp + kk * 16 * ni + 16) : w0;
        _Pragma("GCC unroll 12") for (int j = 0; j < nr; j++) {
            const __m512 xv = _mm512_set1_ps(xc[j * xs + kk]);
            acc[0][j] = _mm512_fmadd_ps(w0, xv, acc[0][j]);
            if (ni > 1) acc[1][j] = _mm512_fmadd_ps(w1, xv, acc[1][j]);
        }
    }
    for (int j = 0; j < nr; j++) {
        store_column(ni, acc[0][j], acc[1][j], out + j * ldd, bias, res ? res + j * ldd : NULL);
    }
}

// 16 rows of 16 floats -> 16 columns (AVX-512's 16x16 transpose: unpack, unpack, two 128-bit shuffles)
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int h = 0; h < 2; h++) {
        for (int i = 0; i < 4; i++) {
            t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
            t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
        }
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    }
}

// rows [r0, r0 + 16*ni) of an F32 or F16 weight (F16 widened exactly) into the panel: wp[kk*16*ni + 16*i + l] =
// w[r0 + 16*i + l][kk], 16x16 blocks transposed in registers (a decode step repacks every weight per product)
static void pack_panel_f32(const struct ggml_tensor * w, const char * wb, int64_t r0, int ni, int64_t k, float * wp) {
    const int f16 = w->type == GGML_TYPE_F16;
    for (int i = 0; i < ni; i++) {
        const char * rows = wb + (r0 + 16 * i) * w->nb[1];
        int64_t kk = 0;
        for (; kk + 16 <= k; kk += 16) {
            __m512 r[16];
            for (int l = 0; l < 16; l++) {
                const char * row = rows + l * w->nb[1];
                r[l] = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) ((const uint16_t *) row + kk)))
                           : _mm512_loadu_ps((const float *) row + kk);
            }
            transpose16(r);
            for (int j = 0; j < 16; j++) _mm512_store_ps(wp + (kk + j) * 16 * ni + 16 * i, r[j]);
        }
        for (; kk < k; kk++) {
            for (int l = 0; l < 16; l++) {
                const char * row = rows + l * w->nb[1];
                wp[kk * 16 * ni + 16 * i + l] = f16 ? _cvtsh_ss(((const uint16_t *) row)[kk]) : ((const float *) row)[kk];
            }
        }
    }
}

#define TILE_F32_CASE(NI, N) \
    case N: tile_f32(NI, N, wp, k, xc, xs, out, ldd, bias, res); break;
#define TILE_F32_CASES(NI) \
    TILE_F32_CASE(NI, 1) TILE_F32_CASE(NI, 2) TILE_F32_CASE(NI, 3) TILE_F32_CASE(NI, 4) TILE_F32_CASE(NI, 5) \
    TILE_F32_CASE(NI, 6) TILE_F32_CASE(NI, 7) TILE_F32_CASE(NI, 8) TILE_F32_CASE(NI, 9) TILE_F32_CASE(NI, 10) \
    TILE_F32_CASE(NI, 11) TILE_F32_CASE(NI, 12)

static void tiles_f32(int ni, int nr, const float * wp, int64_t k, const float * xc, size_t xs, float * out,
                      size_t ldd, const float * bias, const float * res) {
    if (ni == 2) {
        switch (nr) { TILE_F32_CASES(2) }
    } else {
        switch (nr) { TILE_F32_CASES(1) }
    }
}

// the panel of rows [r0, r0 + 32) (16 where M ends first) and every column tile against it
static void f32_rows(const struct ggml_tensor * w, const char * wb, int64_t r0, int64_t m, int64_t k, float * wp,
                     const float * xb, size_t xs, int64_t n, float * db, size_t ldd, const float * bias,
                     const float * res) {
    const int ni = r0 + 32 <= m ? 2 : 1;
    pack_panel_f32(w, wb, r0, ni, k, wp);
    for (int64_t c0 = 0; c0 < n; c0 += NRF) {
        const int nr = n - c0 < NRF ? (int) (n - c0) : NRF;
        tiles_f32(ni, nr, wp, k, xb + c0 * xs, xs, db + c0 * ldd, ldd, bias, res ? res + c0 * ldd : NULL);
    }
}
#elif defined(TG_F32_AVX2)
#define NRF8 6  // columns per tile: 2 x 6 accumulators, the 2 weight vectors, a broadcast

// rows [r0, r0 + 16) of an F32 or F16 weight into the panel: wp[kk*16 + l] = w[r0 + l][kk], 8x8 blocks
// transposed in registers
static inline void transpose8(__m256 r[8]) {
    __m256 t[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) {
        r[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
        r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xee);
        r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x20);
        t[4 + i] = _mm256_permute2f128_ps(r[i], r[4 + i], 0x31);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
}

static void pack_panel_f32(const struct ggml_tensor * w, const char * wb, int64_t r0, int64_t k, float * wp) {
    const int f16 = w->type == GGML_TYPE_F16;
    for (int i = 0; i < 2; i++) {
        const char * rows = wb + (r0 + 8 * i) * w->nb[1];
        int64_t kk = 0;
        for (; kk + 8 <= k; kk += 8) {
            __m256 r[8];
            for (int l = 0; l < 8; l++) {
                const char * row = rows + l * w->nb[1];
                r[l] = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const uint16_t *) row + kk)))
                           : _mm256_loadu_ps((const float *) row + kk);
            }
            transpose8(r);
            for (int j = 0; j < 8; j++) _mm256_store_ps(wp + (kk + j) * 16 + 8 * i, r[j]);
        }
        for (; kk < k; kk++) {
            for (int l = 0; l < 8; l++) {
                const char * row = rows + l * w->nb[1];
                wp[kk * 16 + 8 * i + l] = f16 ? _cvtsh_ss(((const uint16_t *) row)[kk]) : ((const float *) row)[kk];
            }
        }
    }
}

static inline __attribute__((always_inline)) void tile_f32_8(const int nr, const float * wp, int64_t k,
                                                              const float * xc, size_t xs, float * out, size_t ldd,
                                                              const float * bias, const float * res) {
    __m256 acc[2][NRF8];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < NRF8; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        const __m256 w0 = _mm256_load_ps(wp + kk * 16), w1 = _mm256_load_ps(wp + kk * 16 + 8);
        _Pragma("GCC unroll 6") for (int j = 0; j < nr; j++) {
            const __m256 xv = _mm256_broadcast_ss(xc + j * xs + kk);
            acc[0][j] = _mm256_fmadd_ps(w0, xv, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(w1, xv, acc[1][j]);
        }
    }
    for (int j = 0; j < nr; j++) {
        for (int i = 0; i < 2; i++) {
            __m256 v = acc[i][j];
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * i));
            if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(res + j * ldd + 8 * i));
            _mm256_storeu_ps(out + j * ldd + 8 * i, v);
        }
    }
}

#define TILE_F32_8_CASE(N) \
    case N: tile_f32_8(N, wp, k, xb + c0 * xs, xs, db + c0 * ldd, ldd, bias, res ? res + c0 * ldd : NULL); break;

static void f32_rows(const struct ggml_tensor * w, const char * wb, int64_t r0, int64_t m, int64_t k, float * wp,
                     const float * xb, size_t xs, int64_t n, float * db, size_t ldd, const float * bias,
                     const float * res) {
    (void) m;
    pack_panel_f32(w, wb, r0, k, wp);
    for (int64_t c0 = 0; c0 < n; c0 += NRF8) {
        switch (n - c0 < NRF8 ? (int) (n - c0) : NRF8) {
            TILE_F32_8_CASE(1) TILE_F32_8_CASE(2) TILE_F32_8_CASE(3) TILE_F32_8_CASE(4) TILE_F32_8_CASE(5)
            TILE_F32_8_CASE(6)
        }
    }
}
#endif

int tg_f32_matmul_available(void) {
#ifdef TG_F32
    return 1;
#else
    return 0;
#endif
}

void tg_f32_matmul(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
#ifdef TG_F32
    const struct tg_q8_params * p = userdata;
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    const struct ggml_tensor * bt = p->bias ? dst->src[2] : NULL;
    const struct ggml_tensor * rt = p->residual ? dst->src[2 + (p->bias != 0)] : NULL;
    const int64_t k = w->ne[0], m = w->ne[1];
    // one weight for all columns (T*B of them), or a batch of products (attention's heads): weight and columns
    // indexed alike by ne[2], ne[3]
    const int64_t batches = w->ne[2] * w->ne[3];
    const int64_t n = batches > 1 ? x->ne[1] : x->ne[1] * x->ne[2] * x->ne[3];
    const size_t xs = x->nb[1] / sizeof(float), ldd = m;
    const int64_t n_tiles = (m + TG_F32_ROWS - 1) / TG_F32_ROWS;
    float * wp = NULL;
    for (int64_t job = ith; job < batches * n_tiles; job += nth) {
        const int64_t bi = job / n_tiles, b2 = bi % w->ne[2], b3 = bi / w->ne[2];
        const int64_t r0 = (job % n_tiles) * TG_F32_ROWS;
        const char * wb = (const char *) w->data + b2 * w->nb[2] + b3 * w->nb[3];
        const float * xb = (const float *) ((const char *) x->data + (batches > 1 ? b2 * x->nb[2] + b3 * x->nb[3] : 0));
        float * db = (float *) dst->data + bi * n * ldd;
        if (!wp) wp = scratch((size_t) k * TG_F32_ROWS * sizeof(float));
        f32_rows(w, wb, r0, m, k, wp, xb, xs, n, db + r0, ldd, bt ? (const float *) bt->data + r0 : NULL,
                 rt ? (const float *) rt->data + r0 : NULL);
    }
    free(wp);
#else
    (void) dst, (void) ith, (void) nth, (void) userdata;
#endif
}
