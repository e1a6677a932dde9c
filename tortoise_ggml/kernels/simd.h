// SIMD helpers shared by tortoise-ggml's CPU kernels: GCC/Clang vector extensions, as wide as the target's vectors
// (-march=native builds: AVX-512 16 floats, AVX 8, NEON and others 4).
#pragma once

#include <stdint.h>

#if defined(__AVX512F__)
#define VW 16
#define VREGS 32
#elif defined(__AVX__)
#define VW 8
#define VREGS 16
#elif defined(__aarch64__)
#define VW 4
#define VREGS 32
#else
#define VW 4
#define VREGS 16
#endif

typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));
typedef float vf_u __attribute__((vector_size(VW * sizeof(float)), aligned(4)));

static inline vf vload(const float * p) { return *(const vf_u *) p; }
static inline void vstore(float * p, vf v) { *(vf_u *) p = v; }
static inline vf vsplat(float s) { return s - (vf){0}; }  // s - 0 is exact (signs of zero too): a broadcast
static inline vf vselect(vi mask, vf a, vf b) { return (vf) ((mask & (vi) a) | (~mask & (vi) b)); }

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) {
        s += v[i];
    }
    return s;
}

static inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < VW; i++) {
        m = v[i] > m ? v[i] : m;
    }
    return m;
}

// exp with ~1 ulp error: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (Cephes' polynomial); 0 below -87.
static inline vf v_exp(vf x) {
    const vi tiny = x < vsplat(-87.0f);
    x = vselect(x > vsplat(88.0f), vsplat(88.0f), x);
    x = vselect(tiny, vsplat(-87.0f), x);
    const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return vselect(tiny, vsplat(0.0f), p * (vf) e);
}

static inline vf v_sigmoid(vf x) { return 1.0f / (1.0f + v_exp(-x)); }
// tanh(x) = 2 sigmoid(2x) - 1: absolute error ~1e-7, all that matters where it scales a residual update
static inline vf v_tanh(vf x) { return 2.0f / (1.0f + v_exp(-2.0f * x)) - 1.0f; }
