// Fused CPU kernels for UnivNet's small-channel convolutions, run as ggml custom ops (ggml_custom_4d).
//
// UnivNet's residual stacks convolve 32 channels with 3 taps over every audio sample. As im2col + sgemm that is a
// product with a 96-long contraction: tinyBLAS then spends as much time on horizontal sums and tile setup as on
// multiply-adds, and the windows must be copied out first. Here the output channels are the vector lanes: each
// input sample is broadcast once and multiplied into C_out/VW accumulator vectors for a tile of output samples, so
// nothing is reduced horizontally, the windows are read where they lie (overlapping, dilated, zero outside the
// input), and the epilogue (bias, leaky ReLU, or the gated residual) runs while the tile is in L1.
//
// Layouts (ggml ne order, time-major audio: the channels of one sample are adjacent):
//   x      ne (C_in, T, B), nb[0] == 4
//   weight ne (C_out, C_in*K [, L, B]): element (j*C_in + i)*C_out + o, tap j, input i, output o, contiguous
//          within each of the L kernels per batch entry (one per hop-long segment, for the location-variable
//          convolution), which may lie apart (views of a wider tensor)
//   bias   ne (C_out [, 1, L, B]), contiguous per kernel
//   output sample t reads x[t - pad + j*dilation], zero outside [0, T).
//
// tg_conv1d:      dst ne (C_out, T, B) = act(bias + conv(x)), act = leaky ReLU (slope) or identity
// tg_lvc_gated:   dst ne (C, T, B) = residual + sigmoid(g) * tanh(f), (g, f) = the two halves of the 2C outputs
//                 of the location-variable convolution (segment l = t / hop uses kernel l), residual ne (C, T, B)
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

#include "simd.h"

// accumulator vectors a tile keeps in registers
#define ACC (VREGS * 3 / 4)

struct tg_conv_params {
    int32_t taps;
    int32_t dilation;
    int32_t pad;
    int32_t hop;      // tg_lvc_gated: samples per kernel segment
    int32_t leaky;    // tg_conv1d: apply leaky ReLU to the output
    float slope;
};

// acc[n][m] over NT output samples x MB vectors of output channels starting at channel o0; sample n's tap j input
// i is xb[n*xs + j*tap_step + i]. Stores the sums to out[n*ldo + o0 + m*VW].
#define DEFINE_TILE(MB, NT)                                                                                       \
    static void tile_##MB(const float * xb, ptrdiff_t xs, ptrdiff_t tap_step, int c_in, int taps,                 \
                          const float * w, int c_out, int o0, float * out, int ldo) {                             \
        vf acc[NT][MB];                                                                                           \
        for (int n = 0; n < NT; n++)                                                                              \
            for (int m = 0; m < MB; m++) acc[n][m] = (vf){0};                                                     \
        for (int j = 0; j < taps; j++) {                                                                          \
            const float * xj = xb + j * tap_step;                                                                 \
            const float * wj = w + (size_t) j * c_in * c_out + o0;                                                \
            for (int i = 0; i < c_in; i++) {                                                                      \
                vf a[MB];                                                                                         \
                _Pragma("GCC unroll 8")                                                                           \
                for (int m = 0; m < MB; m++) a[m] = vload(wj + (size_t) i * c_out + m * VW);                      \
                _Pragma("GCC unroll 32")                                                                          \
                for (int n = 0; n < NT; n++) {                                                                    \
                    const vf b = vsplat(xj[n * xs + i]);                                                          \
                    _Pragma("GCC unroll 8")                                                                       \
                    for (int m = 0; m < MB; m++) acc[n][m] += a[m] * b;                                           \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int n = 0; n < NT; n++)                                                                              \
            for (int m = 0; m < MB; m++) vstore(out + (size_t) n * ldo + o0 + m * VW, acc[n][m]);                 \
    }

#define NT1 (ACC / 1)
#define NT2 (ACC / 2)
#define NT4 (ACC / 4)
DEFINE_TILE(1, NT1)
DEFINE_TILE(2, NT2)
DEFINE_TILE(4, NT4)

// the widest channel block (vectors) that divides C_out/VW, and the tile width (samples) that goes with it. With 16
// vector registers (AVX2) a block of 4 leaves 3 samples and no register for the weights: the compiler then reads
// every weight from memory for every multiply-add (15 loads per 12 FMAs, load-bound at ~50% of peak); a block of
// 2 keeps the weights in registers for 6 samples (8 loads per 12 FMAs): 1.35x faster on HiFi-GAN.
static int block_vectors(int c_out) {
    const int v = c_out / VW;
#if VREGS <= 16
    return v % 2 == 0 ? 2 : 1;
#else
    return v % 4 == 0 ? 4 : v % 2 == 0 ? 2 : 1;
#endif
}

static int tile_samples(int mb) { return mb == 4 ? NT4 : mb == 2 ? NT2 : NT1; }

// Raw sums for samples t0 .. t0+nt-1 (nt <= the tile width) of batch entry b, output channels [o0, o1), into
// out[n*c_out + o]. Windows inside the input are read in place; a tile touching the padding or shorter than the
// tile width reads a zero-filled copy (local: tile width + span samples).
static void tile_sums(const struct ggml_tensor * x, int64_t b, int64_t t0, int nt, const struct tg_conv_params * p,
                      const float * w, int c_out, int o0, int o1, float * out, float * local) {
    const int c_in = (int) x->ne[0];
    const int64_t t_in = x->ne[1];
    const ptrdiff_t xs = (ptrdiff_t) (x->nb[1] / sizeof(float));
    const int mb = block_vectors(c_out);
    const int nt_max = tile_samples(mb);
    const int64_t span = (int64_t) (p->taps - 1) * p->dilation;
    const int64_t first = t0 - p->pad;
    const float * xbatch = (const float *) ((const char *) x->data + b * x->nb[2]);
    const float * xb;
    ptrdiff_t ls;
    if (nt == nt_max && first >= 0 && first + nt - 1 + span < t_in) {
        xb = xbatch + first * xs;
        ls = xs;
    } else {
        const int64_t len = nt_max + span;
        memset(local, 0, (size_t) len * c_in * sizeof(float));
        for (int64_t s = 0; s < len; s++) {
            const int64_t src = first + s;
            if (src >= 0 && src < t_in && s < nt + span) {
                memcpy(local + s * c_in, xbatch + src * xs, (size_t) c_in * sizeof(float));
            }
        }
        xb = local;
        ls = c_in;
    }
    for (int o = o0; o < o1; o += mb * VW) {
        switch (mb) {
            case 4: tile_4(xb, ls, ls * p->dilation, c_in, p->taps, w, c_out, o, out, c_out); break;
            case 2: tile_2(xb, ls, ls * p->dilation, c_in, p->taps, w, c_out, o, out, c_out); break;
            default: tile_1(xb, ls, ls * p->dilation, c_in, p->taps, w, c_out, o, out, c_out); break;
        }
    }
}

// per-thread scratch: one tile of sums and one zero-padded input window
static float * scratch(const struct ggml_tensor * x, const struct tg_conv_params * p, int c_out, float ** local) {
    const int nt = tile_samples(block_vectors(c_out));
    const size_t sums = (size_t) nt * c_out;
    const size_t window = (size_t) (nt + (int64_t) (p->taps - 1) * p->dilation) * x->ne[0];
    float * buf = (float *) malloc((sums + window) * sizeof(float));
    if (!buf) {
        abort();  // a few KB: nothing sensible is left to do
    }
    *local = buf + sums;
    return buf;
}

// output channels per work unit: whole weight blocks of up to ~32 KB, so that a thread sweeping a unit's tiles
// reads its weights from L1 (a wide convolution, such as the kernel predictor's 24576 outputs, would otherwise
// stream its whole weight matrix from memory for every tile)
static int channel_chunk(int c_out, int c_in, int taps) {
    const int step = block_vectors(c_out) * VW;
    const int64_t per_channel = (int64_t) c_in * taps * (int64_t) sizeof(float);
    int chunk = step;
    while (chunk + step <= c_out && (chunk + step) * per_channel <= 32 * 1024 && c_out % (chunk + step) == 0) {
        chunk += step;
    }
    return chunk;
}

void tg_conv1d(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_conv_params * p = (const struct tg_conv_params *) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const float * w = (const float *) dst->src[1]->data;
    const float * bias = dst->src[2] ? (const float *) dst->src[2]->data : NULL;
    const int c_out = (int) dst->ne[0];
    const int64_t t_out = dst->ne[1];
    const int nt_max = tile_samples(block_vectors(c_out));
    const int64_t tiles = (t_out + nt_max - 1) / nt_max;
    const int chunk = channel_chunk(c_out, (int) x->ne[0], p->taps);
    const int64_t chunks = c_out / chunk;
    const int64_t units = tiles * chunks * dst->ne[2];  // (batch entry, channel chunk, tile), tile fastest
    const int64_t u0 = units * ith / nth, u1 = units * (ith + 1) / nth;
    float * local;
    float * sums = scratch(x, p, c_out, &local);
    for (int64_t u = u0; u < u1; u++) {
        const int64_t b = u / (tiles * chunks);
        const int o0 = (int) ((u / tiles) % chunks) * chunk, o1 = o0 + chunk;
        const int64_t t0 = (u % tiles) * nt_max;
        const int nt = (int) (t0 + nt_max <= t_out ? nt_max : t_out - t0);
        tile_sums(x, b, t0, nt, p, w, c_out, o0, o1, sums, local);
        for (int n = 0; n < nt; n++) {
            float * y = (float *) ((char *) dst->data + b * dst->nb[2] + (t0 + n) * dst->nb[1]);
            for (int o = o0; o < o1; o += VW) {
                vf v = vload(sums + (size_t) n * c_out + o);
                if (bias) {
                    v += vload(bias + o);
                }
                if (p->leaky) {
                    v = vselect(v < vsplat(0.0f), v * p->slope, v);
                }
                vstore(y + o, v);
            }
        }
    }
    free(sums);
}

void tg_lvc_gated(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_conv_params * p = (const struct tg_conv_params *) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const struct ggml_tensor * kernel = dst->src[1];
    const struct ggml_tensor * bias = dst->src[2];
    const struct ggml_tensor * res = dst->src[3];
    const int c = (int) dst->ne[0], c_out = 2 * c;
    const int64_t segments = kernel->ne[2];
    const int hop = p->hop;
    const int nt_max = tile_samples(block_vectors(c_out));
    const int64_t per_segment = (hop + nt_max - 1) / nt_max;
    const int64_t units = per_segment * segments * dst->ne[2];
    const int64_t u0 = units * ith / nth, u1 = units * (ith + 1) / nth;
    float * local;
    float * sums = scratch(x, p, c_out, &local);
    for (int64_t u = u0; u < u1; u++) {
        const int64_t b = u / (per_segment * segments);
        const int64_t l = (u / per_segment) % segments;
        const int64_t t0 = l * hop + (u % per_segment) * nt_max;
        const int nt = (int) (t0 + nt_max <= (l + 1) * hop ? nt_max : (l + 1) * hop - t0);
        const float * w = (const float *) ((const char *) kernel->data + b * kernel->nb[3] + l * kernel->nb[2]);
        const float * bl = (const float *) ((const char *) bias->data + b * bias->nb[3] + l * bias->nb[2]);
        tile_sums(x, b, t0, nt, p, w, c_out, 0, c_out, sums, local);
        for (int n = 0; n < nt; n++) {
            const size_t off_r = b * res->nb[2] + (t0 + n) * res->nb[1];
            const float * r = (const float *) ((const char *) res->data + off_r);
            float * y = (float *) ((char *) dst->data + b * dst->nb[2] + (t0 + n) * dst->nb[1]);
            const float * s = sums + (size_t) n * c_out;
            for (int o = 0; o < c; o += VW) {
                const vf g = vload(s + o) + vload(bl + o);
                const vf f = vload(s + c + o) + vload(bl + c + o);
                vstore(y + o, vload(r + o) + v_sigmoid(g) * v_tanh(f));
            }
        }
    }
    free(sums);
}

// the channel multiple both kernels need (C_out, and C for the gated one): the vector width they were built with
int tg_vector_width(void) { return VW; }
