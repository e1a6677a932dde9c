// Single-query attention over a KV cache (one decode step), run as a ggml custom op (ggml_custom_4d).
//
// ggml's CPU flash attention handles one cached position at a time: a dot-product call, a scalar exp and a
// multiply-add call per position and head, ~50 ns each, several times what reading the position's key and value
// costs. Here each (row, head) scores all valid positions with vector dot products, takes the softmax over them
// with a vector exp, then sums the values: the same math, bound by reading K and V.
//
//   q    ne (D, 1, H, R)  F32, D a multiple of the vector width, rows of D floats contiguous
//   k, v ne (D, N, H, R)  F32 (views of the cache: any strides, rows of D floats contiguous)
//   mask ne (N, 1)        F16, 0 for the positions to attend to, -inf for the others (shared by rows and heads)
//   shared ne (1,)        I32 (optional): the first ``shared`` positions hold the same keys and values in every row
//                         (the prompt every sample starts from) and are read from row 0, so a batch-16 step reads
//                         them from memory once rather than 16 times
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

void tg_attend_cache(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_attend_params * p = (const struct tg_attend_params *) userdata;
    const struct ggml_tensor * q = dst->src[0];
    const struct ggml_tensor * k = dst->src[1];
    const struct ggml_tensor * v = dst->src[2];
    const struct ggml_tensor * mask = dst->src[3];
    const int64_t shared = dst->src[4] ? *(const int32_t *) dst->src[4]->data : 0;
    const int d = (int) q->ne[0], heads = (int) q->ne[2], rows = (int) q->ne[3];
    const int64_t n = k->ne[1];
    const int dv = d / VW;
    // Work units: a row's heads, or a group of them when there are fewer rows than threads. A unit walks the
    // cache position by position: a cached position holds all heads side by side, so each step reads its keys
    // (and then values) as one contiguous run, where a head-by-head walk would touch a new page per position.
    const int groups = rows >= nth ? 1 : (nth + rows - 1) / rows < heads ? (nth + rows - 1) / rows : heads;
    const int64_t units = (int64_t) rows * groups;
    const int64_t u0 = units * ith / nth, u1 = units * (ith + 1) / nth;
    if (u0 >= u1) {
        return;
    }
    const int hmax = (heads + groups - 1) / groups;

    // the valid positions and their mask values, then per head of a unit: the query, scores, and output sums
    const size_t bytes = (size_t) n * (sizeof(int64_t) + sizeof(float)) + (size_t) hmax * n * sizeof(float)
                       + (size_t) hmax * (2 * d + 1) * sizeof(float);
    int64_t * pos = (int64_t *) malloc(bytes);
    if (!pos) {
        abort();
    }
    float * bias = (float *) (pos + n);
    float * s = bias + n;                          // [hmax][n]
    float * qs = s + (size_t) hmax * n;            // [hmax][d], scaled queries
    float * acc = qs + (size_t) hmax * d;          // [hmax][d]
    float * mx = acc + (size_t) hmax * d;          // [hmax]
    int64_t count = 0;
    const uint16_t * mp = (const uint16_t *) mask->data;
    for (int64_t i = 0; i < n; i++) {
        const float m = half_to_float(mp[i]);
        if (m != -INFINITY) {
            pos[count] = i;
            bias[count++] = m;
        }
    }

    for (int64_t u = u0; u < u1; u++) {
        const int64_t r = u / groups, g = u % groups;
        const int h0 = (int) (g * heads / groups), h1 = (int) ((g + 1) * heads / groups), nh = h1 - h0;
        for (int h = 0; h < nh; h++) {
            const float * qp = (const float *) ((const char *) q->data + r * q->nb[3] + (h0 + h) * q->nb[2]);
            for (int j = 0; j < dv; j++) {
                vstore(qs + h * d + j * VW, vload(qp + j * VW) * p->scale);
                vstore(acc + h * d + j * VW, (vf){0});
            }
            mx[h] = -INFINITY;
        }
        // scores
        const char * kb = (const char *) k->data + r * k->nb[3] + h0 * k->nb[2];
        const char * kb0 = (const char *) k->data + h0 * k->nb[2];
        for (int64_t c = 0; c < count; c++) {
            const char * kp = (pos[c] < shared ? kb0 : kb) + pos[c] * k->nb[1];
            for (int h = 0; h < nh; h++) {
                const float * kh = (const float *) (kp + h * k->nb[2]);
                const float * qh = qs + h * d;
                vf a = vload(qh) * vload(kh);
                for (int j = 1; j < dv; j++) {
                    a += vload(qh + j * VW) * vload(kh + j * VW);
                }
                const float sc = hsum(a) + bias[c];
                s[h * n + c] = sc;
                mx[h] = sc > mx[h] ? sc : mx[h];
            }
        }
        // softmax weights (unnormalised) and their sums
        float sums[64];  // heads per unit: at most 64 (kernels.attend_cache checks)
        for (int h = 0; h < nh; h++) {
            float * sh = s + h * n;
            float sum = 0.0f;
            int64_t c = 0;
            for (; c + VW <= count; c += VW) {
                const vf e = v_exp(vload(sh + c) - mx[h]);
                vstore(sh + c, e);
                sum += hsum(e);
            }
            for (; c < count; c++) {
                sh[c] = expf(sh[c] - mx[h]);
                sum += sh[c];
            }
            sums[h] = sum;
        }
        // weighted values
        const char * vb = (const char *) v->data + r * v->nb[3] + h0 * v->nb[2];
        const char * vb0 = (const char *) v->data + h0 * v->nb[2];
        for (int64_t c = 0; c < count; c++) {
            const char * vp = (pos[c] < shared ? vb0 : vb) + pos[c] * v->nb[1];
            for (int h = 0; h < nh; h++) {
                const float * vh = (const float *) (vp + h * v->nb[2]);
                const vf w = vsplat(s[h * n + c]);
                float * ah = acc + h * d;
                for (int j = 0; j < dv; j++) {
                    vstore(ah + j * VW, vload(ah + j * VW) + w * vload(vh + j * VW));
                }
            }
        }
        for (int h = 0; h < nh; h++) {
            float * out = (float *) ((char *) dst->data + r * dst->nb[3] + (h0 + h) * dst->nb[1]);
            const float inv = count ? 1.0f / sums[h] : 0.0f;
            for (int j = 0; j < dv; j++) {
                vstore(out + j * VW, vload(acc + h * d + j * VW) * inv);
            }
        }
    }
    free(pos);
}
