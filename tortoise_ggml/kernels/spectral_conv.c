// Spectral (FFT, overlap-save) convolution for HiFi-GAN's long dilated 'same' convolutions, as three ggml custom
// ops: tg_spectrum (blocks of the input to the frequency domain), tg_spectral_matmul (one complex C_out x C_in
// product per frequency) and tg_unspectrum (back to time-major samples, with the epilogue).
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
//   spectrum  ne (2*C_in, blocks, N/2): slot f, block g: C_in real parts, then C_in imaginary parts
//             (slot 0: bin 0's real parts, then bin N/2's)
//   weight    ne (2*C_out, C_in, N/2): slot f, input i: C_out real parts, then C_out imaginary parts of
//             conj(DFT_N(w[o][i][:])) / (2N) (slot 0: bin 0, then bin N/2, both real); the 1/(2N) undoes the
//             unnormalised inverse and the pairing's factor 2
//   product   ne (2*C_out, blocks, N/2), as the spectrum
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
    int32_t leaky_in;   // tg_spectrum: leaky ReLU on the input as it is read
    float slope_in;
    int32_t leaky_out;  // tg_unspectrum: leaky ReLU on bias + convolution (before any residual)
    float slope_out;
    int32_t bias;       // tg_unspectrum: src[1] is the bias
    int32_t residual;   // tg_unspectrum: the next source is a residual to add
};

// blocks per phase for T outputs
static int64_t per_phase(const struct tg_spectral_params * p, int64_t t) {
    const int64_t len = p->n - p->taps + 1;
    const int64_t outputs = (t + p->dilation - 1) / p->dilation;
    return (outputs + len - 1) / len;
}

int64_t tg_spectral_blocks(int32_t n, int32_t taps, int32_t dilation, int64_t t, int64_t batch) {
    const struct tg_spectral_params p = {n, taps, dilation, 0, 0, 0.0f, 0, 0.0f, 0, 0};
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
        dst[bit_reverse(m, n)] = v;
    }
}

// spectrum: dst ne (2*C_in, blocks, N/2) from x ne (C_in, T, B)
void tg_spectrum(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_spectral_params * p = (const struct tg_spectral_params *) userdata;
    const struct ggml_tensor * x = dst->src[0];
    const int n = p->n, c_in = (int) x->ne[0];
    const int64_t t = x->ne[1], blocks = dst->ne[1];
    const int64_t groups = c_in / VW, units = blocks / 2 * groups;  // (pair of blocks, channel group)
    float c[MAX_N / 2], s[MAX_N / 2];
    twiddles(n, c, s);
    vf re[MAX_N], im[MAX_N];
    const size_t slot_stride = dst->nb[2] / sizeof(float), block_stride = dst->nb[1] / sizeof(float);
    float * out = (float *) dst->data;
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        const int64_t g0 = u / groups * 2;
        const int ch = (int) (u % groups) * VW;
        gather(x, p, t, g0, ch, re);
        gather(x, p, t, g0 + 1, ch, im);
        fft(re, im, n, c, s, -1.0f);
        // Z = A + iB for the two real blocks' spectra A, B: 2A[f] = Z[f] + conj(Z[n-f]), 2B[f] = -i(Z[f] -
        // conj(Z[n-f])); slot f < n/2 holds bin f (slot 0: bins 0 and n/2, both real)
        float * a = out + g0 * block_stride;
        float * b = a + block_stride;
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

// 16 registers (AVX2): 12 accumulators, the two weight vectors and a broadcast; 32: twice the channels
#if VREGS <= 16
#define CMB 1
#else
#define CMB 2
#endif
#define CNT 6
DEFINE_CTILE(ctile_complex, CMB, CNT, 0)
DEFINE_CTILE(ctile_pair, CMB, CNT, 1)

// product: dst ne (2*C_out, blocks, N/2) = weight ne (2*C_out, C_in, N/2) x spectrum ne (2*C_in, blocks, N/2)
void tg_spectral_matmul(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor * w = dst->src[0];
    const struct ggml_tensor * x = dst->src[1];
    const int c_out = (int) dst->ne[0] / 2, c_in = (int) x->ne[0] / 2;
    const int64_t blocks = dst->ne[1], slots = dst->ne[2];
    const int step = CMB * VW;
    // output channels per unit: their weights (2 x C_in x chunk floats) within ~16 KB of L1, reused over all tiles
    int chunk = step;
    while (chunk + step <= c_out && c_out % (chunk + step) == 0 &&
           (int64_t) (chunk + step) * c_in * 2 * (int64_t) sizeof(float) <= 16 * 1024) {
        chunk += step;
    }
    const int64_t chunks = c_out / chunk, tiles = (blocks + CNT - 1) / CNT;
    const int64_t units = slots * chunks * tiles;  // tile fastest
    // a short last tile runs on zero-filled copies
    float * xpad = NULL;
    float * ypad = NULL;
    if (blocks % CNT) {
        xpad = (float *) malloc(sizeof(float) * CNT * 2 * (size_t) c_in);
        ypad = (float *) malloc(sizeof(float) * CNT * 2 * (size_t) c_out);
        if (!xpad || !ypad) {
            abort();  // a few KB: nothing sensible is left to do
        }
    }
    const size_t xstr = x->nb[1] / sizeof(float), ystr = dst->nb[1] / sizeof(float);
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        const int64_t f = u / (chunks * tiles);
        const int o0 = (int) ((u / tiles) % chunks) * chunk;
        const int64_t g0 = (u % tiles) * CNT;
        const int nt = (int) (g0 + CNT <= blocks ? CNT : blocks - g0);
        const float * wf = (const float *) ((const char *) w->data + f * w->nb[2]);
        const float * xs = (const float *) ((const char *) x->data + f * x->nb[2]) + g0 * xstr;
        float * ys = (float *) ((char *) dst->data + f * dst->nb[2]) + g0 * ystr;
        size_t xs_stride = xstr, ys_stride = ystr;
        if (nt < CNT) {
            memset(xpad, 0, sizeof(float) * CNT * 2 * c_in);
            for (int n = 0; n < nt; n++) memcpy(xpad + n * 2 * c_in, xs + n * xstr, sizeof(float) * 2 * c_in);
            xs = xpad;
            xs_stride = 2 * c_in;
        }
        float * yt = nt < CNT ? ypad : ys;
        if (nt < CNT) {
            ys_stride = 2 * c_out;
        }
        for (int o = o0; o < o0 + chunk; o += step) {
            (f == 0 ? ctile_pair : ctile_complex)(xs, xs_stride, c_in, wf, c_out, o, yt, ys_stride);
        }
        if (nt < CNT) {
            for (int n = 0; n < nt; n++) {
                memcpy(ys + n * ystr + o0, ypad + n * 2 * c_out + o0, sizeof(float) * chunk);
                memcpy(ys + n * ystr + c_out + o0, ypad + n * 2 * c_out + c_out + o0, sizeof(float) * chunk);
            }
        }
    }
    free(xpad);
    free(ypad);
}

// back to samples: dst ne (C_out, T, B) from the product ne (2*C_out, blocks, N/2) (src[0]), then (as the params
// say) the bias ne (C_out,) and a residual ne (C_out, T, B)
void tg_unspectrum(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const struct tg_spectral_params * p = (const struct tg_spectral_params *) userdata;
    const struct ggml_tensor * y = dst->src[0];
    const struct ggml_tensor * bias_t = p->bias ? dst->src[1] : NULL;
    const struct ggml_tensor * res = p->residual ? dst->src[1 + (p->bias != 0)] : NULL;
    const float * bias = bias_t ? (const float *) bias_t->data : NULL;
    const int n = p->n, c_out = (int) dst->ne[0];
    const int64_t t = dst->ne[1], batch = dst->ne[2], blocks = y->ne[1];
    const int64_t len = n - p->taps + 1;
    const int64_t groups = c_out / VW, units = blocks / 2 * groups;
    float c[MAX_N / 2], s[MAX_N / 2];
    twiddles(n, c, s);
    vf re[MAX_N], im[MAX_N];
    const size_t slot_stride = y->nb[2] / sizeof(float), block_stride = y->nb[1] / sizeof(float);
    for (int64_t u = units * ith / nth; u < units * (ith + 1) / nth; u++) {
        const int64_t g0 = u / groups * 2;
        const int ch = (int) (u % groups) * VW;
        const float * a = (const float *) y->data + g0 * block_stride;
        const float * b = a + block_stride;
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
        for (int k = 0; k < 2; k++) {
            struct block blk;
            if (!block_of(p, t, batch, g0 + k, &blk)) {
                continue;
            }
            const vf * v = k ? im : re;
            const vf bv = bias ? vload(bias + ch) : (vf){0};
            for (int64_t l = 0; l < len; l++) {
                const int64_t to = p->dilation * (blk.q * len + l) + blk.phase;
                if (to >= t) {
                    break;
                }
                vf o = v[l] + bv;
                if (p->leaky_out) {
                    o = leaky(o, p->slope_out);
                }
                if (res) {
                    o += vload((const float *) ((const char *) res->data + blk.b * res->nb[2] + to * res->nb[1]) + ch);
                }
                vstore((float *) ((char *) dst->data + blk.b * dst->nb[2] + to * dst->nb[1]) + ch, o);
            }
        }
    }
}
