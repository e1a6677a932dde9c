// The diffusion decoder's attention weights in one pass, as a ggml custom op: softmax over the keys of
// scale * q.k + the relative position bias, read straight from the per-distance table, never laid out as an
// (n, n, heads) mask (building that mask and reading it back cost as much as the softmax itself).
//
//   scores ne (K, Q, H, B) F32 contiguous: q.k for K >= n keys (keys past n are padding) and Q queries
//   table  ne (2n-1, H)    F32 contiguous: the bias of key j for query i is table[j - i + n - 1, h]
//   dst    ne (K, Q, H, B) F32: the weights, 0 for the padding keys
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ggml.h"
#include "simd.h"

struct tg_relpos_params {
    float scale;
    int32_t n;
};

// each row's scores are read before its weights are written at the same places: dst may be scores itself
static void relpos_softmax(const struct ggml_tensor * scores, const struct ggml_tensor * table,
                           struct ggml_tensor * dst, int ith, int nth, const struct tg_relpos_params * p) {
    const int64_t nk = scores->ne[0], nq = scores->ne[1], heads = scores->ne[2];
    const int64_t n = p->n;
    const int64_t rows = nq * heads * scores->ne[3];
    const int64_t r0 = rows * ith / nth, r1 = rows * (ith + 1) / nth;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t i = r % nq, h = (r / nq) % heads;
        const float * s = (const float *) scores->data + r * nk;
        const float * bias = (const float *) ((const char *) table->data + h * table->nb[1]) + (n - 1 - i);
        float * y = (float *) dst->data + r * nk;
        vf mv = vsplat(-INFINITY);
        int64_t k = 0;
        for (; k + VW <= n; k += VW) {
            const vf v = vload(s + k) * p->scale + vload(bias + k);
            vstore(y + k, v);
            mv = vselect(v > mv, v, mv);
        }
        float m = hmax(mv);
        for (; k < n; k++) {
            y[k] = s[k] * p->scale + bias[k];
            m = y[k] > m ? y[k] : m;
        }
        vf sv = (vf){0};
        for (k = 0; k + VW <= n; k += VW) {
            const vf e = v_exp(vload(y + k) - m);
            vstore(y + k, e);
            sv += e;
        }
        float sum = hsum(sv);
        for (; k < n; k++) {
            y[k] = expf(y[k] - m);
            sum += y[k];
        }
        const float inv = 1.0f / sum;
        for (k = 0; k + VW <= n; k += VW) {
            vstore(y + k, vload(y + k) * inv);
        }
        for (; k < n; k++) {
            y[k] *= inv;
        }
        memset(y + n, 0, (size_t) (nk - n) * sizeof(float));
    }
}

void tg_relpos_softmax(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    relpos_softmax(dst->src[0], dst->src[1], dst, ith, nth, (const struct tg_relpos_params *) userdata);
}

// ggml_map_custom2_inplace's form: the weights overwrite the scores (a graph buffer of their size saved)
void tg_relpos_softmax_inplace(struct ggml_tensor * dst, const struct ggml_tensor * scores,
                               const struct ggml_tensor * table, int ith, int nth, void * userdata) {
    relpos_softmax(scores, table, dst, ith, nth, (const struct tg_relpos_params *) userdata);
}
