// Single-query attention over a KV cache (one decode step), run as two ggml custom ops (ggml_custom_4d).
//
// ggml's CPU flash attention handles one cached position at a time: a dot-product call, a scalar exp and a
// multiply-add call per position and head, ~50 ns each, several times what reading the position's key and value
// costs. Here each unit scores its positions for all heads with vector dot products, takes the softmax over them
// with a vector exp, then sums the values: the same math, bound by reading K and V.
//
// The work is split by position (flash decoding): tg_attend_partial gives each (row, chunk of the valid positions)
// its own softmax partials, tg_attend_merge rescales and adds them. A cached position holds all heads side by side
// (4 KB at GPT-2's width, one page), so a unit reads whole positions in order; the split by heads this replaced
// had both threads of a batch-1 step read half of every page, which ran at half the bandwidth of one thread
// (measured: 30 layers at 300 positions, 7.2 ms on 2 threads vs 3.9 ms on one).
//
//   q    ne (D, 1, H, R)  F32, D a multiple of the vector width, rows of D floats contiguous
//   k, v ne (D, N, H, R)  F32 (views of the cache: any strides, rows of D floats contiguous)
//   mask ne (N, 1)        F16, 0 for the positions to attend to, -inf for the others (shared by rows and heads)
//   shared ne (1,)        I32 (optional): the first ``shared`` positions hold the same keys and values in every row
//                         (the prompt every sample starts from) and are read from row 0, so a batch-16 step reads
//                         them from memory once rather than 16 times
//   part ne (D + 2, H, P, R) F32: per row, chunk and head the unnormalised sum of values, the score maximum and
//                         the sum of exp(score - maximum) over the chunk's positions (chunk p of the P' used,
//                         P' = min(P, ceil(threads / R)): the valid positions [count*p/P', count*(p+1)/P'))
//   dst  ne (D, H, 1, R)  F32: softmax(scale * q.k + mask) . v, heads side by side per row, as flash attention
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "simd.h"

struct tg_attend_params {
    float scale;
};

static inline float half_to_float(uint16_t h) {
    // IEEE binary16 -> binary32 (the mask holds only 0 and -inf, but convert properly)
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        float f = (float) man * 5.9604644775390625e-8f;  // 2^-24
        memcpy(&bits, &f, sizeof(bits));
        bits |= sign;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

// Row r's cached keys (or values) at position ``at``, all heads: the shared prompt positions from row 0
static inline const char * cached(const struct ggml_tensor * t, int64_t r, int64_t at, int64_t shared) {
    return (const char *) t->data + (at < shared ? 0 : r * t->nb[3]) + at * t->nb[1];
}

// Chunks per row: as few as keep every thread busy (each has a per-chunk cost, and a chunk of fewer positions than
// a vector takes its exps one by one), at most the partials' room. Both ops run in one graph, with the same nth.
static inline int64_t used_chunks(int64_t rows, int64_t room, int nth) {
    const int64_t want = (nth + rows - 1) / rows;
    return want < room ? want : room;
}

void tg_attend_partial(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_attend_params * p = (const struct tg_attend_params *) userdata;
    const struct ggml_tensor * q = dst->src[0];
    const struct ggml_tensor * k = dst->src[1];
    const struct ggml_tensor * v = dst->src[2];
    const struct ggml_tensor * mask = dst->src[3];
    const int64_t shared = dst->src[4] ? *(const int32_t *) dst->src[4]->data : 0;
    const int d = (int) q->ne[0], heads = (int) q->ne[2], rows = (int) q->ne[3];
    const int64_t n = k->ne[1], chunks = used_chunks(rows, dst->ne[2], nth);
    const int dv = d / VW;
    const int64_t units = (int64_t) rows * chunks;
    const int64_t u0 = units * ith / nth, u1 = units * (ith + 1) / nth;
    if (u0 >= u1) {
        return;
    }

    // the valid positions and their mask values, then per head: the query, scores, and output sums
    int64_t count = 0;
    const uint16_t * mp = (const uint16_t *) mask->data;
    for (int64_t i = 0; i < n; i++) {
        count += half_to_float(mp[i]) != -INFINITY;
    }
    const int64_t span = (count + chunks - 1) / chunks;  // the most positions a chunk holds
    const size_t bytes = (size_t) count * (sizeof(int64_t) + sizeof(float)) + (size_t) heads * span * sizeof(float)
                       + (size_t) heads * (2 * d + 1) * sizeof(float) + sizeof(int64_t);
    int64_t * pos = (int64_t *) malloc(bytes);
    if (!pos) {
        abort();
    }
    float * bias = (float *) (pos + count);
    float * s = bias + count;                      // [heads][span]
    float * qs = s + (size_t) heads * span;        // [heads][d], scaled queries
    float * acc = qs + (size_t) heads * d;         // [heads][d]
    float * mx = acc + (size_t) heads * d;         // [heads]
    for (int64_t i = 0, c = 0; i < n; i++) {
        const float m = half_to_float(mp[i]);
        if (m != -INFINITY) {
            pos[c] = i;
            bias[c++] = m;
        }
    }

    for (int64_t u = u0; u < u1; u++) {
        const int64_t r = u / chunks, ch = u % chunks;
        const int64_t c0 = count * ch / chunks, c1 = count * (ch + 1) / chunks, len = c1 - c0;
        for (int h = 0; h < heads; h++) {
            const float * qp = (const float *) ((const char *) q->data + r * q->nb[3] + h * q->nb[2]);
            for (int j = 0; j < dv; j++) {
                vstore(qs + h * d + j * VW, vload(qp + j * VW) * p->scale);
                vstore(acc + h * d + j * VW, (vf){0});
            }
            mx[h] = -INFINITY;
        }
        // scores
        for (int64_t c = 0; c < len; c++) {
            const char * kp = cached(k, r, pos[c0 + c], shared);
            for (int h = 0; h < heads; h++) {
                const float * kh = (const float *) (kp + h * k->nb[2]);
                const float * qh = qs + h * d;
                vf a = vload(qh) * vload(kh);
                for (int j = 1; j < dv; j++) {
                    a += vload(qh + j * VW) * vload(kh + j * VW);
                }
                const float sc = hsum(a) + bias[c0 + c];
                s[h * span + c] = sc;
                mx[h] = sc > mx[h] ? sc : mx[h];
            }
        }
        // softmax weights (unnormalised), then the weighted values
        float * out = (float *) ((char *) dst->data + r * dst->nb[3] + ch * dst->nb[2]);
        for (int h = 0; h < heads; h++) {
            float * sh = s + h * span;
            float sum = 0.0f;
            int64_t c = 0;
            for (; c + VW <= len; c += VW) {
                const vf e = v_exp(vload(sh + c) - mx[h]);
                vstore(sh + c, e);
                sum += hsum(e);
            }
            for (; c < len; c++) {
                sh[c] = expf(sh[c] - mx[h]);
                sum += sh[c];
            }
            float * oh = (float *) ((char *) out + h * dst->nb[1]);
            oh[d] = mx[h];
            oh[d + 1] = sum;
        }
        for (int64_t c = 0; c < len; c++) {
            const char * vp = cached(v, r, pos[c0 + c], shared);
            for (int h = 0; h < heads; h++) {
                const float * vh = (const float *) (vp + h * v->nb[2]);
                const vf w = vsplat(s[h * span + c]);
                float * ah = acc + h * d;
                for (int j = 0; j < dv; j++) {
                    vstore(ah + j * VW, vload(ah + j * VW) + w * vload(vh + j * VW));
                }
            }
        }
        for (int h = 0; h < heads; h++) {
            float * oh = (float *) ((char *) out + h * dst->nb[1]);
            for (int j = 0; j < dv; j++) {
                vstore(oh + j * VW, vload(acc + h * d + j * VW));
            }
        }
    }
    free(pos);
}

void tg_attend_merge(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * part = dst->src[0];
    const int d = (int) dst->ne[0], heads = (int) dst->ne[1], rows = (int) dst->ne[3];
    const int64_t chunks = used_chunks(rows, part->ne[2], nth);
    const int dv = d / VW;
    const int64_t units = (int64_t) rows * heads;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        const int64_t r = u / heads, h = u % heads;
        const char * base = (const char *) part->data + r * part->nb[3] + h * part->nb[1];
        float m = -INFINITY;
        for (int64_t c = 0; c < chunks; c++) {
            const float * pc = (const float *) (base + c * part->nb[2]);
            m = pc[d] > m ? pc[d] : m;
        }
        vf acc[16] = {{0}};  // d <= 16 vectors (kernels.attend_cache_fits)
        float sum = 0.0f;
        if (m != -INFINITY) {  // else no position is valid: the output is 0, as flash attention gives
            for (int64_t c = 0; c < chunks; c++) {
                const float * pc = (const float *) (base + c * part->nb[2]);
                if (pc[d] == -INFINITY) {
                    continue;  // an empty chunk
                }
                const float w = expf(pc[d] - m);
                sum += w * pc[d + 1];
                for (int j = 0; j < dv; j++) {
                    acc[j] += vsplat(w) * vload(pc + j * VW);
                }
            }
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        float * out = (float *) ((char *) dst->data + r * dst->nb[3] + h * dst->nb[1]);
        for (int j = 0; j < dv; j++) {
            vstore(out + j * VW, acc[j] * inv);
        }
    }
}
