// GroupNorm on time-major data with everything the diffusion decoder does after it, as one ggml custom op.
//
// The reference's ResBlock runs GroupNorm32, the affine weight and bias, the timestep's (1 + scale) and shift, and
// SiLU as five passes over the activations; as plain ggml ops on time-major data the norm also needs a transpose
// there and back. Here one thread takes one (group, batch entry) at a time: its channels' runs of every frame
// (a few tens of KB, kept in L2) are read for the mean, again for the variance (two passes, as torch and ggml
// compute it, not E[x^2] - E[x]^2), and a third time to write the result.
//
//   x     F32 ne (C, T, B), nb[0] == 4
//   gamma, beta F32 ne (C)
//   emb   F32 ne (2C, B) (optional): scale | shift per batch entry, as torch.chunk(emb_out, 2, dim=1) splits it
//   dst   F32 ne (C, T, B) contiguous = act(((x - mean) * rstd * gamma + beta) * (1 + scale) + shift)
//         act = SiLU (params.silu) or identity
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"

#include "simd.h"

struct tg_group_norm_params {
    int32_t groups;
    int32_t silu;
    float eps;
};

void tg_group_norm(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_group_norm_params * p = userdata;
    const struct ggml_tensor * x = dst->src[0];
    const float * gamma = (const float *) dst->src[1]->data;
    const float * beta = (const float *) dst->src[2]->data;
    const struct ggml_tensor * emb = dst->src[3];
    const int64_t c = x->ne[0], t_len = x->ne[1], batch = x->ne[2], cg = c / p->groups;
    const int vec = cg % VW == 0;
    float * a = malloc(2 * cg * sizeof(float));
    if (!a) {  // the kernels link only ggml's headers: no ggml_abort
        fprintf(stderr, "tortoise-ggml group_norm: out of memory\n");
        abort();
    }
    float * off = a + cg;
    for (int64_t item = ith; item < batch * p->groups; item += nth) {
        const int64_t b = item / p->groups, c0 = (item % p->groups) * cg;
        const char * xb = (const char *) x->data + b * x->nb[2] + c0 * sizeof(float);
        float * yb = (float *) dst->data + b * c * t_len + c0;
        double sum = 0.0;
        for (int64_t t = 0; t < t_len; t++) {
            const float * f = (const float *) (xb + t * x->nb[1]);
            float s = 0.0f;
            if (vec) {
                vf acc = {0};
                for (int64_t i = 0; i < cg; i += VW) acc += vload(f + i);
                s = hsum(acc);
            } else {
                for (int64_t i = 0; i < cg; i++) s += f[i];
            }
            sum += s;
        }
        const double count = (double) cg * t_len;
        const float mean = (float) (sum / count);
        double var = 0.0;
        for (int64_t t = 0; t < t_len; t++) {
            const float * f = (const float *) (xb + t * x->nb[1]);
            float s = 0.0f;
            if (vec) {
                vf acc = {0};
                for (int64_t i = 0; i < cg; i += VW) {
                    const vf d = vload(f + i) - mean;
                    acc += d * d;
                }
                s = hsum(acc);
            } else {
                for (int64_t i = 0; i < cg; i++) s += (f[i] - mean) * (f[i] - mean);
            }
            var += s;
        }
        const float rstd = 1.0f / sqrtf((float) (var / count) + p->eps);
        // y = (x - mean) * a + off per channel
        for (int64_t i = 0; i < cg; i++) {
            float scale = 1.0f, shift = 0.0f;
            if (emb) {
                const float * e = (const float *) ((const char *) emb->data + b * emb->nb[1]);
                scale += e[c0 + i];
                shift = e[c + c0 + i];
            }
            a[i] = rstd * gamma[c0 + i] * scale;
            off[i] = beta[c0 + i] * scale + shift;
        }
        for (int64_t t = 0; t < t_len; t++) {
            const float * f = (const float *) (xb + t * x->nb[1]);
            float * y = yb + t * c;
            if (vec) {
                for (int64_t i = 0; i < cg; i += VW) {
                    vf v = (vload(f + i) - mean) * vload(a + i) + vload(off + i);
                    if (p->silu) v = v * v_sigmoid(v);
                    vstore(y + i, v);
                }
            } else {
                for (int64_t i = 0; i < cg; i++) {
                    float v = (f[i] - mean) * a[i] + off[i];
                    y[i] = p->silu ? v / (1.0f + expf(-v)) : v;
                }
            }
        }
    }
    free(a);
}
