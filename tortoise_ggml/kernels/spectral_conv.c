// Spectral (FFT, overlap-save) convolution for HiFi-GAN's long dilated 'same' convolutions, as one ggml custom op
// (tg_spectral_conv): blocks of the input to the frequency domain, one complex C_out x C_in product per
// frequency, back to time-major samples with the epilogue, a group of blocks at a time per thread.
//
// Why: a k-tap convolution of C channels costs k*C^2 multiply-adds per sample. HiFi-GAN's residual blocks have
// k = 3, 7, 11; at N-point blocks the frequency domain costs ~4*(N/2)/(N-k+1)*C^2 (2.8 C^2 at k = 11, N = 32)
// plus O(C log N) for the transforms, so the k = 7 and 11 convolutions (85% of the decoder's work) take 2.5-3.5x
// fewer operations than the best direct kernel can do, with float32 rounding of the same order (an FFT's error
// grows with log N, a dot product's with its length).
//
// The method. A convolution of dilation d is d independent undilated ones, one per output phase (t mod d), on the
// input's samples of that phase. Each phase's outputs are cut into blocks of L = N - k + 1; block q's output
// s in [qL, qL + L) reads the N inputs u[m] = x[d*(qL + m) + phase - pad], m < N, and
// y[l] = sum_j w[j] u[l + j] = IDFT(DFT(u) . conj(DFT(w)))[l] for l < L (no wrap-around). Two real blocks go
// through one complex FFT (one as the real part, the next as the imaginary part) and are separated by symmetry.
// A real block's spectrum has N/2 + 1 bins, two of them real (0 and N/2): they share one slot, so a spectrum is
// N/2 complex slots, and the product per slot is complex (slot 0: two real products).
//
// Layouts (ggml ne order):
//   x         ne (C_in, T, B), time-major, nb[0] == 4 (channels adjacent)
//   spectrum  (a thread's buffer) slot f, block g: C_in real parts, then C_in imaginary parts (slot 0: bin 0's
//             real parts, then bin N/2's)
//   weight    ne (2*C_out, C_in, N/2): slot f, input i: C_out real parts, then C_out imaginary parts of
//             conj(DFT_N(w[o][i][:])) / (2N) (slot 0: bin 0, then bin N/2, both real); the 1/(2N) undoes the
//             unnormalised inverse and the pairing's factor 2
//   product   (a thread's buffer) as the spectrum, C_out wide
//   y         ne (C_out, T, B) = act_out(bias + conv(act_in(x))) (+ residual ne (C_out, T, B))
// Blocks run batch entry, block, phase: g = (b*per_phase + q)*d + phase, padded to an even count, so that a
// thread's run of blocks reads and writes one stretch of samples (all its phases) rather than every d-th sample.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

#include "simd.h"

#define MAX_N 64

struct tg_spectral_params {
    int32_t n;          // FFT size, a power of 2 <= MAX_N
    int32_t taps;
    int32_t dilation;
    int32_t pad;
    int32_t leaky_in;   // leaky ReLU on the input as it is read
    float slope_in;
    int32_t leaky_out;  // leaky ReLU on bias + convolution (before any residual)
    float slope_out;
    int32_t bias;       // src[2] is the bias
    int32_t residual;   // the next source is a residual to add
    int32_t winograd;   // 3 taps by Winograd F(4,3) instead of the FFT (n = 6 points, see winograd_pair)
};

// blocks per phase for T outputs
static int64_t per_phase(const struct tg_spectral_params * p, int64_t t) {
    const int64_t len = p->n - p->taps + 1;
    const int64_t outputs = (t + p->dilation - 1) / p->dilation;
    return (outputs + len - 1) / len;
}

static int64_t spectral_blocks(int32_t n, int32_t taps, int32_t dilation, int64_t t, int64_t batch) {
    const struct tg_spectral_params p = {n, taps, dilation, 0, 0, 0.0f, 0, 0.0f, 0, 0, 0};
    const int64_t blocks = batch * dilation * per_phase(&p, t);
    return blocks + (blocks & 1);
}

// the block's batch entry, first input sample (of the padded signal's phase), and first output sample
struct block {
    int64_t b, phase, q;
};

static int block_of(const struct tg_spectral_params * p, int64_t t, int64_t batch, int64_t g, struct block * out) {
    const int64_t pp = per_phase(p, t);
    if (g >= batch * p->dilation * pp) {
        return 0;  // the padding block of an odd count
    }
    out->phase = g % p->dilation;
    out->q = (g / p->dilation) % pp;
    out->b = g / (pp * p->dilation);
    return 1;
}

// twiddles e^{-2 pi i k / n}, k < n/2, computed in double
static void twiddles(int n, float * c, float * s) {
    for (int k = 0; k < n / 2; k++) {
        const double a = -2.0 * M_PI * (double) k / (double) n;
        c[k] = (float) cos(a);
        s[k] = (float) sin(a);
    }
}

static int bit_reverse(int m, int n) {
    int r = 0;
    for (int b = 1; b < n; b <<= 1) {
        r = (r << 1) | (m & 1);
        m >>= 1;
    }
    return r;
}

// in-place radix-2 FFT of n vectors of VW complex values (already in bit-reversed order); sign -1 forward (the
// twiddles as given), +1 inverse (conjugated), unnormalised
static void fft(vf * re, vf * im, int n, const float * c, const float * s, float sign) {
    for (int len = 2; len <= n; len <<= 1) {
        const int half = len / 2, step = n / len;
        for (int k = 0; k < half; k++) {
            const vf wr = vsplat(c[k * step]), wi = vsplat(sign < 0 ? s[k * step] : -s[k * step]);
            for (int start = 0; start < n; start += len) {
                const int a = start + k, b = a + half;
                const vf tr = re[b] * wr - im[b] * wi;
                const vf ti = re[b] * wi + im[b] * wr;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
            }
        }
    }
}

static vf leaky(vf v, float slope) { return vselect(v < vsplat(0.0f), v * slope, v); }

// one output sample (bias already added): leaky ReLU, residual, stored
static inline void emit(struct ggml_tensor * dst, const struct tg_spectral_params * p, const struct ggml_tensor * res,
                        const struct block * blk, int64_t to, int ch, vf o) {
    if (p->leaky_out) {
        o = leaky(o, p->slope_out);
    }
    if (res) {
        o += vload((const float *) ((const char *) res->data + blk->b * res->nb[2] + to * res->nb[1]) + ch);
    }
    vstore((float *) ((char *) dst->data + blk->b * dst->nb[2] + to * dst->nb[1]) + ch, o);
}


// the input samples of block g for channels [c, c + VW), bit-reversed, into re (imag = 0 ones are the caller's)
static void gather(const struct ggml_tensor * x, const struct tg_spectral_params * p, int64_t t, int64_t g,
                   int c, vf * dst) {
    struct block blk;
    const int n = p->n;
    if (!block_of(p, t, x->ne[2], g, &blk)) {
        for (int m = 0; m < n; m++) dst[m] = (vf){0};
        return;
    }
    const int64_t len = n - p->taps + 1;
    const int64_t t_in = x->ne[1];
    const char * base = (const char *) x->data + blk.b * x->nb[2];
    for (int m = 0; m < n; m++) {
        const int64_t src = p->dilation * (blk.q * len + m) + blk.phase - p->pad;
        vf v = (vf){0};
        if (src >= 0 && src < t_in) {
            v = vload((const float *) (base + src * x->nb[1]) + c);
            if (p->leaky_in) {
                v = leaky(v, p->slope_in);
            }
        }
        dst[p->winograd ? m : bit_reverse(m, n)] = v;
    }
}

// The spectra of blocks g0 and g0 + 1 (global indices) into spec: slot f of local block l at
// spec[f*slot_stride + l*2*C_in], l = l0 and l0 + 1; every channel group
static void forward_pair(const struct ggml_tensor * x, const struct tg_spectral_params * p, int64_t g0, float * spec,
                         size_t slot_stride, int64_t l0, const float * c, const float * s) {
    const int n = p->n, c_in = (int) x->ne[0];
    const int64_t t = x->ne[1];
    vf re[MAX_N], im[MAX_N];
    float * a = spec + l0 * 2 * c_in;
    float * b = a + 2 * c_in;
    for (int ch = 0; ch < c_in; ch += VW) {
        gather(x, p, t, g0, ch, re);
        gather(x, p, t, g0 + 1, ch, im);
        fft(re, im, n, c, s, -1.0f);
        // Z = A + iB for the two real blocks' spectra A, B: 2A[f] = Z[f] + conj(Z[n-f]), 2B[f] = -i(Z[f] -
        // conj(Z[n-f])); slot f < n/2 holds bin f (slot 0: bins 0 and n/2, both real)
        for (int f = 0; f < n / 2; f++) {
            const int r = (n - f) % n;
            vf ar, ai, br, bi;
            if (f == 0) {
                ar = 2.0f * re[0];
                ai = 2.0f * re[n / 2];  // bin n/2 of A
                br = 2.0f * im[0];
                bi = 2.0f * im[n / 2];
            } else {
                ar = re[f] + re[r];
                ai = im[f] - im[r];
                br = im[f] + im[r];
                bi = re[r] - re[f];
            }
            float * af = a + f * slot_stride;
            float * bf = b + f * slot_stride;
            vstore(af + ch, ar);
            vstore(af + c_in + ch, ai);
            vstore(bf + ch, br);
            vstore(bf + c_in + ch, bi);
        }
    }
}

// Blocks g0 and g0 + 1 back to samples from their products (as forward_pair lays spectra out, 2*C_out wide), with
// bias, leaky ReLU and residual, into dst
static void inverse_pair(struct ggml_tensor * dst, const struct tg_spectral_params * p, const float * bias,
                         const struct ggml_tensor * res, int64_t g0, const float * prod, size_t slot_stride,
                         int64_t l0, const float * c, const float * s) {
    const int n = p->n, c_out = (int) dst->ne[0];
    const int64_t t = dst->ne[1], batch = dst->ne[2], len = n - p->taps + 1;
    vf re[MAX_N], im[MAX_N];
    const float * a = prod + l0 * 2 * c_out;
    const float * b = a + 2 * c_out;
    struct block blk[2];
    const int present[2] = {block_of(p, t, batch, g0, &blk[0]), block_of(p, t, batch, g0 + 1, &blk[1])};
    for (int ch = 0; ch < c_out; ch += VW) {
        // Z[f] = A[f] + iB[f] over all n bins (A, B Hermitian), bit-reversed for the FFT
        for (int f = 0; f < n / 2; f++) {
            const float * af = a + f * slot_stride;
            const float * bf = b + f * slot_stride;
            const vf ar = vload(af + ch), ai = vload(af + c_out + ch);
            const vf br = vload(bf + ch), bi = vload(bf + c_out + ch);
            if (f == 0) {  // bins 0 and n/2: real
                re[0] = ar;
                im[0] = br;
                re[bit_reverse(n / 2, n)] = ai;
                im[bit_reverse(n / 2, n)] = bi;
            } else {
                const int rf = bit_reverse(f, n), rr = bit_reverse(n - f, n);
                re[rf] = ar - bi;
                im[rf] = ai + br;
                re[rr] = ar + bi;
                im[rr] = br - ai;
            }
        }
        fft(re, im, n, c, s, 1.0f);
        const vf bv = bias ? vload(bias + ch) : (vf){0};
        for (int k = 0; k < 2; k++) {
            if (!present[k]) {
                continue;
            }
            const vf * v = k ? im : re;
            for (int64_t l = 0; l < len; l++) {
                const int64_t to = p->dilation * (blk[k].q * len + l) + blk[k].phase;
                if (to >= t) {
                    break;
                }
                emit(dst, p, res, &blk[k], to, ch, v[l] + bv);
            }
        }
    }
}

// Winograd F(4,3) (Lavin & Gray's points 0, +-1, +-2, inf): 4 outputs of a 3-tap correlation from 6 inputs d by
// 6 products, y = A^T [(G g) . (B^T d)], 1.5 multiply-adds per output and channel pair instead of 3. The 6
// transformed values of a block are 3 slots of 2 real products each (slot s: points 2s and 2s + 1), so the
// frequency-domain product's paired-real tile runs them. The transforms' coefficients are small integers (B^T,
// A^T) and G's 1/4, 1/6, 1/12, 1/24 sit in the weights: float32 rounding a few times the direct sum's.
static void winograd_forward(const vf * d, vf * v) {
    v[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    v[1] = -4.0f * (d[1] + d[2]) + d[3] + d[4];
    v[2] = 4.0f * (d[1] - d[2]) - d[3] + d[4];
    v[3] = 2.0f * (d[3] - d[1]) - d[2] + d[4];
    v[4] = 2.0f * (d[1] - d[3]) - d[2] + d[4];
    v[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

static void winograd_inverse(const vf * m, vf * y) {
    const vf a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], e = m[3] - m[4];
    y[0] = m[0] + a + c;
    y[1] = b + 2.0f * e;
    y[2] = a + 4.0f * c;
    y[3] = b + 8.0f * e + m[5];
}

// the transforms of blocks g0 and g0 + 1 into spec (slot s of local block l: points 2s, 2s + 1 side by side)
static void winograd_forward_pair(const struct ggml_tensor * x, const struct tg_spectral_params * p, int64_t g0,
                                  float * spec, size_t slot_stride, int64_t l0) {
    const int c_in = (int) x->ne[0];
    vf d[6], v[6];
    for (int k = 0; k < 2; k++) {
        float * a = spec + (l0 + k) * 2 * c_in;
        for (int ch = 0; ch < c_in; ch += VW) {
            gather(x, p, x->ne[1], g0 + k, ch, d);
            winograd_forward(d, v);
            for (int sl = 0; sl < 3; sl++) {
                vstore(a + sl * slot_stride + ch, v[2 * sl]);
                vstore(a + sl * slot_stride + c_in + ch, v[2 * sl + 1]);
            }
        }
    }
}

static void winograd_inverse_pair(struct ggml_tensor * dst, const struct tg_spectral_params * p, const float * bias,
                                  const struct ggml_tensor * res, int64_t g0, const float * prod, size_t slot_stride,
                                  int64_t l0) {
    const int c_out = (int) dst->ne[0];
    const int64_t t = dst->ne[1];
    vf m[6], y[4];
    for (int k = 0; k < 2; k++) {
        struct block blk;
        if (!block_of(p, t, dst->ne[2], g0 + k, &blk)) {
            continue;
        }
        const float * a = prod + (l0 + k) * 2 * c_out;
        for (int ch = 0; ch < c_out; ch += VW) {
            for (int sl = 0; sl < 3; sl++) {
                m[2 * sl] = vload(a + sl * slot_stride + ch);
                m[2 * sl + 1] = vload(a + sl * slot_stride + c_out + ch);
            }
            winograd_inverse(m, y);
            const vf bv = bias ? vload(bias + ch) : (vf){0};
            for (int l = 0; l < 4; l++) {
                const int64_t to = p->dilation * (blk.q * 4 + l) + blk.phase;
                if (to >= t) {
                    break;
                }
                emit(dst, p, res, &blk, to, ch, y[l] + bv);
            }
        }
    }
}

// The product of slot f for NT blocks x MB vectors of complex output channels at o0: acc += W x (slot 0, `pair`:
// real parts by the bin-0 weights, imaginary by the bin-n/2 ones).
#define DEFINE_CTILE(NAME, MB, NT, PAIR)                                                                          \
    static void NAME(const float * xs, size_t x_stride, int c_in, const float * w, int c_out, int o0, float * ys, \
                     size_t y_stride) {                                                                           \
        vf accr[NT][MB], acci[NT][MB];                                                                            \
        for (int n = 0; n < NT; n++)                                                                              \
            for (int m = 0; m < MB; m++) accr[n][m] = acci[n][m] = (vf){0};                                       \
        for (int i = 0; i < c_in; i++) {                                                                          \
            const float * wi = w + (size_t) i * 2 * c_out + o0;                                                   \
            vf wr[MB], wm[MB];                                                                                    \
            for (int m = 0; m < MB; m++) {                                                                        \
                wr[m] = vload(wi + m * VW);                                                                       \
                wm[m] = vload(wi + c_out + m * VW);                                                               \
            }                                                                                                     \
            _Pragma("GCC unroll 16")                                                                              \
            for (int n = 0; n < NT; n++) {                                                                        \
                const vf xr = vsplat(xs[n * x_stride + i]), xi = vsplat(xs[n * x_stride + c_in + i]);             \
                for (int m = 0; m < MB; m++) {                                                                    \
                    accr[n][m] += wr[m] * xr;                                                                     \
                    if (PAIR) {                                                                                   \
                        acci[n][m] += wm[m] * xi;                                                                 \
                    } else {                                                                                      \
                        acci[n][m] += wm[m] * xr;                                                                 \
                        accr[n][m] -= wm[m] * xi;                                                                 \
                        acci[n][m] += wr[m] * xi;                                                                 \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        for (int n = 0; n < NT; n++)                                                                              \
            for (int m = 0; m < MB; m++) {                                                                        \
                vstore(ys + n * y_stride + o0 + m * VW, accr[n][m]);                                              \
                vstore(ys + n * y_stride + c_out + o0 + m * VW, acci[n][m]);                                      \
            }                                                                                                     \
    }

// 16 registers (AVX2): 12 accumulators, the two weight vectors and a broadcast; 32: twice the channels, and a
// one-vector tile for the last VW output channels where C_out is an odd multiple of VW
#if VREGS <= 16
#define CMB 1
#else
#define CMB 2
#endif
#define CNT 6
DEFINE_CTILE(ctile_complex, CMB, CNT, 0)
DEFINE_CTILE(ctile_pair, CMB, CNT, 1)
#if CMB > 1
DEFINE_CTILE(ctile_complex1, 1, CNT, 0)
DEFINE_CTILE(ctile_pair1, 1, CNT, 1)
#endif

// blocks per group: their spectra (G x N/2 x 2*C floats) within ~256 KB of L2, and at least 24 so that the
// weights, read once per group from L3, cost little against the group's products; a multiple of the tile
static int64_t group_blocks(int c) {
    int64_t g = 2048 / c;
    g = g < 24 ? 24 : g;
    return (g + CNT - 1) / CNT * CNT;
}

// dst ne (C_out, T, B) = act_out(bias + conv(act_in(x))) (+ residual): src[0] x ne (C_in, T, B), src[1] the
// weight's spectra ne (2*C_out, C_in, N/2), then (as the params say) the bias ne (C_out,) and a residual ne (C_out,
// T, B). Each thread takes whole groups of blocks through all three steps in its own buffers: the spectra of a
// long signal (~1.5x its size, twice) never leave the caches.
void tg_spectral_conv(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_spectral_params * p = (const struct tg_spectral_params *) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const struct ggml_tensor * w = dst->src[1];
    const struct ggml_tensor * bias_t = p->bias ? dst->src[2] : NULL;
    const struct ggml_tensor * res = p->residual ? dst->src[2 + (p->bias != 0)] : NULL;
    const float * bias = bias_t ? (const float *) bias_t->data : NULL;
    const int n = p->n, slots = n / 2, c_in = (int) x->ne[0], c_out = (int) dst->ne[0];  // winograd: 6 points
    const int64_t blocks = spectral_blocks(n, p->taps, p->dilation, x->ne[1], x->ne[2]);
    const int64_t per_group = group_blocks(c_in > c_out ? c_in : c_out);
    const int64_t groups = (blocks + per_group - 1) / per_group;
    const int64_t u0 = groups * ith / nth, u1 = groups * (ith + 1) / nth;
    if (u0 == u1) {
        return;
    }
    const size_t xs_stride = (size_t) per_group * 2 * c_in, ys_stride = (size_t) per_group * 2 * c_out;
    float * spec = (float *) malloc(sizeof(float) * slots * (xs_stride + ys_stride));
    if (!spec) {
        abort();  // a few hundred KB: nothing sensible is left to do
    }
    float * prod = spec + slots * xs_stride;
    float c[MAX_N / 2], s[MAX_N / 2];
    twiddles(n, c, s);
    for (int64_t u = u0; u < u1; u++) {
        const int64_t g_first = u * per_group;
        const int64_t count = blocks - g_first < per_group ? blocks - g_first : per_group;  // even
        const int64_t padded = (count + CNT - 1) / CNT * CNT;
        for (int64_t l = 0; l < count; l += 2) {
            if (p->winograd) {
                winograd_forward_pair(x, p, g_first + l, spec, xs_stride, l);
            } else {
                forward_pair(x, p, g_first + l, spec, xs_stride, l, c, s);
            }
        }
        for (int f = 0; f < slots; f++) {  // the tail of the last tile: zero blocks
            memset(spec + f * xs_stride + count * 2 * c_in, 0, sizeof(float) * (padded - count) * 2 * c_in);
        }
        for (int f = 0; f < slots; f++) {
            const float * wf = (const float *) ((const char *) w->data + f * w->nb[2]);
            const float * xf = spec + f * xs_stride;
            float * yf = prod + f * ys_stride;
            const int paired = f == 0 || p->winograd;
            for (int o = 0; o < c_out; o += CMB * VW) {
                void (*tile)(const float *, size_t, int, const float *, int, int, float *, size_t) =
                    paired ? ctile_pair : ctile_complex;
#if CMB > 1
                if (o + CMB * VW > c_out) {
                    tile = paired ? ctile_pair1 : ctile_complex1;
                }
#endif
                for (int64_t l = 0; l < padded; l += CNT) {
                    tile(xf + l * 2 * c_in, 2 * c_in, c_in, wf, c_out, o, yf + l * 2 * c_out, 2 * c_out);
                }
            }
        }
        for (int64_t l = 0; l < count; l += 2) {
            if (p->winograd) {
                winograd_inverse_pair(dst, p, bias, res, g_first + l, prod, ys_stride, l);
            } else {
                inverse_pair(dst, p, bias, res, g_first + l, prod, ys_stride, l, c, s);
            }
        }
    }
    free(spec);
}
