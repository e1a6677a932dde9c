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
#endif

#include "ggml.h"

#define QK 32

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

#ifdef TG_Q8
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

#ifdef TG_Q8
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
    // row tiles of 32 (a last one of 16 where M is an odd multiple of 16), dealt round robin to the threads
    const int64_t n_tiles = (m + 31) / 32;
    uint8_t * wq = NULL;
    float * wd = NULL;
    for (int64_t rt_i = ith; rt_i < n_tiles; rt_i += nth) {
        const int64_t r0 = rt_i * 32;
        const int ni = r0 + 32 <= m ? 2 : 1;
        if (!wq) {
            wq = scratch((size_t) nb * 8 * 2 * 64);
            wd = scratch((size_t) nb * 2 * 16 * sizeof(float));
        }
        pack_panel(w, r0, ni, nb, wq, wd);
        const float * bias = bt ? (const float *) bt->data + r0 : NULL;
        for (int64_t c0 = 0; c0 < n; c0 += NR) {
            const int nr = n - c0 < NR ? (int) (n - c0) : NR;
            float * out = (float *) dst->data + c0 * ldd + r0;
            const float * res = rt ? (const float *) rt->data + c0 * ldd + r0 : NULL;
            tiles(ni, nr, wq, wd, nb, (const uint8_t *) xp->data + c0 * xs, xs, k, out, ldd, bias, res);
        }
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
#endif

int tg_f32_matmul_available(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

void tg_f32_matmul(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
#if defined(__AVX512F__)
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
    const int64_t n_tiles = (m + 31) / 32;
    float * wp = NULL;
    for (int64_t job = ith; job < batches * n_tiles; job += nth) {
        const int64_t bi = job / n_tiles, b2 = bi % w->ne[2], b3 = bi / w->ne[2];
        const int64_t r0 = (job % n_tiles) * 32;
        const int ni = r0 + 32 <= m ? 2 : 1;
        const char * wb = (const char *) w->data + b2 * w->nb[2] + b3 * w->nb[3];
        const float * xb = (const float *) ((const char *) x->data + (batches > 1 ? b2 * x->nb[2] + b3 * x->nb[3] : 0));
        float * db = (float *) dst->data + bi * n * ldd;
        if (!wp) wp = scratch((size_t) k * 32 * sizeof(float));
        pack_panel_f32(w, wb, r0, ni, k, wp);
        const float * bias = bt ? (const float *) bt->data + r0 : NULL;
        for (int64_t c0 = 0; c0 < n; c0 += NRF) {
            const int nr = n - c0 < NRF ? (int) (n - c0) : NRF;
            float * out = db + c0 * ldd + r0;
            const float * res = rt ? (const float *) rt->data + c0 * ldd + r0 : NULL;
            tiles_f32(ni, nr, wp, k, xb + c0 * xs, xs, out, ldd, bias, res);
        }
    }
    free(wp);
#else
    (void) dst, (void) ith, (void) nth, (void) userdata;
#endif
}
