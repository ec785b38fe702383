/* Kernels for the block types of real-world GGUF files beyond Q8_0 / Q4_0 / Q4_1: Q5_0 and Q5_1
 * (32 weights a block, a fifth bit per weight), and the K-quants Q4_K, Q5_K, Q6_K (256-weight
 * super-blocks of 32- or 16-weight sub-blocks with their own 6- or 8-bit scales), as llama.cpp's
 * Q4_K_M files mix them. Their table entries (KQUANT_TYPES) join _cpu.c's table of types.
 *
 * Every type is read as 32-weight sub-blocks, each the size of one block of the fast mode's int8
 * activations: a sub-block's weights are small integers u (unsigned, or signed for Q6_K) with a
 * scale per 16 weights and an offset per sub-block, so a product is integer dot products of u with
 * the activations' int8 values, scaled, plus offset x (the activation block's sum). Exact mode
 * dequantizes one block to float32 and dots it with the float activations.
 *
 * Per type: the scalar dequantizer (the reference every other path is tested against, with gguf's
 * own dequantizer above it), a scalar fast kernel, and AVX2 and AVX-512 VNNI fast kernels (256-bit
 * vectors: this CPU runs 512-bit ones as two halves).
 */
#include <math.h>
#include <string.h>

#include "quant.h"

static float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return fulmine_half_to_float(h);
}

/* ---------------------------------------------------------------------------------------------
 * Block layouts and scalar dequantizers (ggml's layouts, as GGUF stores them).
 */
enum { Q5_0_BYTES = 22, Q5_1_BYTES = 24, Q4_K_BYTES = 144, Q5_K_BYTES = 176, Q6_K_BYTES = 210 };

/* Q5_0: d f16 | qh u32 (bit i: the fifth bit of weight i) | qs[16] (weight i < 16: low nibble of qs[i],
 * weight i + 16: its high nibble); w = d * (u - 16). Q5_1: d f16 | m f16 | qh | qs; w = d * u + m. */
static void unpack_q5(const uint8_t *qh_p, const uint8_t *qs, uint8_t *u) {
    uint32_t qh;
    memcpy(&qh, qh_p, 4);
    for (int i = 0; i < 16; i++) {
        u[i] = (uint8_t)((qs[i] & 0x0f) | (((qh >> i) & 1) << 4));
        u[i + 16] = (uint8_t)((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
    }
}

static void dequant_q5_0(const uint8_t *blk, float *out) {
    uint8_t u[32];
    unpack_q5(blk + 2, blk + 6, u);
    float d = h2f(blk);
    for (int i = 0; i < 32; i++) out[i] = d * (float)((int)u[i] - 16);
}

static void dequant_q5_1(const uint8_t *blk, float *out) {
    uint8_t u[32];
    unpack_q5(blk + 4, blk + 8, u);
    float d = h2f(blk), m = h2f(blk + 2);
    for (int i = 0; i < 32; i++) out[i] = d * (float)u[i] + m;
}

/* Q4_K: d f16 | dmin f16 | scales[12] (8 six-bit scales and mins) | qs[128]. Sub-block j (32 weights):
 * u = low (j even) or high (j odd) nibbles of qs[32 * (j / 2) ..], w = d * sc[j] * u - dmin * mn[j].
 * Q5_K: d | dmin | scales[12] | qh[32] (bit j of qh[l]: the fifth bit of weight l of sub-block j) | qs[128]. */
static void scales_k4(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            sc[j] = q[j] & 63;
            mn[j] = q[j + 4] & 63;
        } else {
            sc[j] = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
            mn[j] = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
        }
    }
}

static void unpack_k(const uint8_t *blk, int j, int five, uint8_t *u) {
    const uint8_t *qs = blk + (five ? 48 : 16) + 32 * (j / 2), *qh = blk + 16;
    for (int l = 0; l < 32; l++) {
        u[l] = (uint8_t)(j & 1 ? qs[l] >> 4 : qs[l] & 0x0f);
        if (five) u[l] |= (uint8_t)(((qh[l] >> j) & 1) << 4);
    }
}

static void dequant_k(const uint8_t *blk, float *out, int five) {
    uint8_t sc[8], mn[8], u[32];
    scales_k4(blk + 4, sc, mn);
    float d = h2f(blk), dmin = h2f(blk + 2);
    for (int j = 0; j < 8; j++) {
        unpack_k(blk, j, five, u);
        for (int l = 0; l < 32; l++) out[32 * j + l] = d * sc[j] * (float)u[l] - dmin * mn[j];
    }
}
static void dequant_q4_k(const uint8_t *blk, float *out) { dequant_k(blk, out, 0); }
static void dequant_q5_k(const uint8_t *blk, float *out) { dequant_k(blk, out, 1); }

/* Q6_K: ql[128] | qh[64] | scales[16] int8 | d f16. Half n (128 weights) reads ql[64 n ..], qh[32 n ..];
 * its sub-block t (32 weights): u = (t & 1 ? ql[l + 32] : ql[l]) nibble (low for t < 2) | 2 bits of
 * qh[l] at 2t, as bits 4-5; w = d * scales[8 n + 2 t + (l >= 16)] * (u - 32). */
static void unpack_q6_k(const uint8_t *blk, int j, int8_t *w) {
    int n = j / 4, t = j % 4;
    const uint8_t *ql = blk + 64 * n + (t & 1 ? 32 : 0), *qh = blk + 128 + 32 * n;
    for (int l = 0; l < 32; l++) {
        int nib = t < 2 ? ql[l] & 0x0f : ql[l] >> 4;
        w[l] = (int8_t)((nib | (((qh[l] >> (2 * t)) & 3) << 4)) - 32);
    }
}

static void dequant_q6_k(const uint8_t *blk, float *out) {
    const int8_t *sc = (const int8_t *)(blk + 192);
    float d = h2f(blk + 208);
    int8_t w[32];
    for (int j = 0; j < 8; j++) {
        unpack_q6_k(blk, j, w);
        const int8_t *s = sc + 8 * (j / 4) + 2 * (j % 4);
        for (int l = 0; l < 32; l++) out[32 * j + l] = d * s[l >= 16] * (float)w[l];
    }
}

/* ---------------------------------------------------------------------------------------------
 * Scalar fast kernels: per 32-weight sub-block, integer dot products per 16 weights, then
 * dx * (scale_lo * dot_lo + scale_hi * dot_hi) + offset * xsum.
 */
typedef struct {
    int8_t w[32];   /* weights as integers (u, or u - 32 for Q6_K) */
    float s[2];     /* scale of weights 0-15, 16-31 */
    float m;        /* offset of every weight */
} Sub;

static void sub_of(int type, const uint8_t *blk, int j, Sub *o) {
    uint8_t u[32], sc[8], mn[8];
    switch (type) {
    case T_Q5_0:
    case T_Q5_1: {
        int m1 = type == T_Q5_1;
        unpack_q5(blk + (m1 ? 4 : 2), blk + (m1 ? 8 : 6), u);
        float d = h2f(blk);
        for (int l = 0; l < 32; l++) o->w[l] = (int8_t)u[l];
        o->s[0] = o->s[1] = d;
        o->m = m1 ? h2f(blk + 2) : -16.f * d;
        return;
    }
    case T_Q4_K:
    case T_Q5_K: {
        scales_k4(blk + 4, sc, mn);
        unpack_k(blk, j, type == T_Q5_K, u);
        for (int l = 0; l < 32; l++) o->w[l] = (int8_t)u[l];
        o->s[0] = o->s[1] = h2f(blk) * sc[j];
        o->m = -h2f(blk + 2) * mn[j];
        return;
    }
    case T_Q6_K: {
        const int8_t *s = (const int8_t *)(blk + 192) + 8 * (j / 4) + 2 * (j % 4);
        float d = h2f(blk + 208);
        unpack_q6_k(blk, j, o->w);
        o->s[0] = d * s[0];
        o->s[1] = d * s[1];
        o->m = 0.f;
        return;
    }
    }
}

static void fast_scalar(int type, int block, int bytes, const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {
    int64_t nb = K / 32;
    int subs = block / 32;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    Sub sb;
    for (int64_t kb = 0; kb < K / block; kb++) {
        for (int j = 0; j < subs; j++) {
            sub_of(type, w + kb * bytes, j, &sb);
            int64_t b = kb * subs + j;
            for (int r = 0; r < R; r++) {
                const int8_t *xq = a->qx + r * K + b * 32;
                int lo = 0, hi = 0;
                for (int l = 0; l < 16; l++) lo += sb.w[l] * xq[l];
                for (int l = 16; l < 32; l++) hi += sb.w[l] * xq[l];
                acc[r] += a->dx[r * nb + b] * (sb.s[0] * (float)lo + sb.s[1] * (float)hi) + sb.m * a->xsum[r * nb + b];
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* Exact mode, any type: each block dequantized to float32, dotted with each activation row. */
static void exact_scalar(void (*deq)(const uint8_t *, float *), int block, int bytes, const uint8_t *w, const float *x,
                         int R, int64_t K, float *out) {
    float tmp[256], acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t kb = 0; kb < K / block; kb++) {
        deq(w + kb * bytes, tmp);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * K + kb * block;
            float s = 0.f;
            for (int l = 0; l < block; l++) s += tmp[l] * xb[l];
            acc[r] += s;
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

#define SCALAR_KERNELS(NAME, TYPE, BLOCK, BYTES)                                                              \
    static void fast_##NAME##_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        fast_scalar(TYPE, BLOCK, BYTES, w, a, R, K, out);                                                     \
    }                                                                                                         \
    static void exact_##NAME##_scalar(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum,  \
                                      float *out) {                                                           \
        (void)xsum;                                                                                           \
        exact_scalar(dequant_##NAME, BLOCK, BYTES, w, x, R, K, out);                                          \
    }
SCALAR_KERNELS(q5_0, T_Q5_0, 32, Q5_0_BYTES)
SCALAR_KERNELS(q5_1, T_Q5_1, 32, Q5_1_BYTES)
SCALAR_KERNELS(q4_k, T_Q4_K, 256, Q4_K_BYTES)
SCALAR_KERNELS(q5_k, T_Q5_K, 256, Q5_K_BYTES)
SCALAR_KERNELS(q6_k, T_Q6_K, 256, Q6_K_BYTES)

#ifdef FULMINE_X86
/* ---------------------------------------------------------------------------------------------
 * SIMD kernels. Per sub-block: the 32 weights as bytes in one 256-bit vector, one dot product per
 * activation row (DOT: 8 int32 lanes, lanes 0-3 = weights 0-15, 4-7 = weights 16-31), scaled.
 */

/* bit i of x -> byte i all ones (i < 32) */
AVX2 static inline __m256i bits_to_bytes(uint32_t x) {
    const __m256i shuffle = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                             3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuffle), bit);
    return _mm256_cmpeq_epi8(bytes, bit);
}

AVX2 static inline void exact_avx2(void (*deq)(const uint8_t *, float *), int block, int bytes, const uint8_t *w,
                                   const float *x, int R, int64_t K, float *out) {
    float tmp[256] __attribute__((aligned(32)));
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t kb = 0; kb < K / block; kb++) {
        deq(w + kb * bytes, tmp);
        for (int r = 0; r < R; r++) {
            const float *xb = x + r * K + kb * block;
            for (int l = 0; l < block; l += 8)
                acc[r] = _mm256_fmadd_ps(_mm256_load_ps(tmp + l), _mm256_loadu_ps(xb + l), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum256(acc[r]);
}

#define EXACT_AVX2(NAME, BLOCK, BYTES)                                                                       \
    AVX2 static void exact_##NAME##_avx2(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, \
                                         float *out) {                                                       \
        (void)xsum;                                                                                          \
        exact_avx2(dequant_##NAME, BLOCK, BYTES, w, x, R, K, out);                                           \
    }
EXACT_AVX2(q5_0, 32, Q5_0_BYTES)
EXACT_AVX2(q5_1, 32, Q5_1_BYTES)
EXACT_AVX2(q4_k, 256, Q4_K_BYTES)
EXACT_AVX2(q5_k, 256, Q5_K_BYTES)
EXACT_AVX2(q6_k, 256, Q6_K_BYTES)

/* acc[r] += DOT(u, x block b of row r) * scale * dx, macc[r] += m * xsum (u: unsigned bytes) */
#define ACC_UNSIGNED(DOT, u, scale, m, b)                                                                   \
    for (int r = 0; r < RG; r++) {                                                                           \
        __m256i xq = _mm256_loadu_si256((const __m256i *)(a->qx + r * K + (b) * 32));                      \
        __m256 p = _mm256_cvtepi32_ps(DOT(u, xq));                                                           \
        acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps((scale) * a->dx[r * nb + (b)]), acc[r]);                 \
        macc[r] += (m) * a->xsum[r * nb + (b)];                                                              \
    }

#define KQUANT_KERNELS(SUF, TARGET, DOT)                                                                     \
    TARGET INLINE void q5_##SUF##_rg(const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out,     \
                                     const int has_min) {                                                    \
        const int64_t nb = K / 32;                                                                           \
        const size_t bsz = has_min ? Q5_1_BYTES : Q5_0_BYTES;                                                \
        const __m256i low = _mm256_set1_epi8(0x0f), fifth = _mm256_set1_epi8(0x10);                        \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        float macc[4] = {0.f, 0.f, 0.f, 0.f};                                                                \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            const uint8_t *blk = w + b * bsz;                                                                \
            uint32_t qh;                                                                                     \
            memcpy(&qh, blk + (has_min ? 4 : 2), 4);                                                         \
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + (has_min ? 8 : 6)));                        \
            __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);                   \
            u = _mm256_or_si256(u, _mm256_and_si256(bits_to_bytes(qh), fifth));                             \
            float d = half_avx2(blk), m = has_min ? half_avx2(blk + 2) : -16.f * d;                          \
            ACC_UNSIGNED(DOT, u, d, m, b)                                                                    \
        }                                                                                                    \
        for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]) + macc[r];                                    \
    }                                                                                                        \
    TARGET INLINE void qk_##SUF##_rg(const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out,     \
                                     const int five) {                                                       \
        const int64_t nb = K / 32;                                                                           \
        const size_t bsz = five ? Q5_K_BYTES : Q4_K_BYTES;                                                   \
        const __m256i low = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);                             \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        float macc[4] = {0.f, 0.f, 0.f, 0.f};                                                                \
        uint8_t sc[8], mn[8];                                                                                \
        for (int64_t kb = 0; kb < K / 256; kb++) {                                                           \
            const uint8_t *blk = w + kb * bsz, *qs = blk + (five ? 48 : 16);                                 \
            scales_k4(blk + 4, sc, mn);                                                                      \
            float d = half_avx2(blk), dmin = half_avx2(blk + 2);                                             \
            __m256i hv = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();   \
            for (int p = 0; p < 4; p++) {                                                                    \
                __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));                             \
                __m256i lo = _mm256_and_si256(q, low), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low); \
                if (five) {                                                                                  \
                    __m256i b0 = _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * p)), one);     \
                    __m256i b1 = _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * p + 1)), one); \
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));                                      \
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));                                      \
                }                                                                                            \
                int j = 2 * p;                                                                               \
                ACC_UNSIGNED(DOT, lo, d * sc[j], -dmin * mn[j], kb * 8 + j)                                  \
                ACC_UNSIGNED(DOT, hi, d * sc[j + 1], -dmin * mn[j + 1], kb * 8 + j + 1)                      \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]) + macc[r];                                    \
    }                                                                                                        \
    TARGET INLINE void q6_k_##SUF##_rg(const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out) { \
        const int64_t nb = K / 32;                                                                           \
        const __m256i low = _mm256_set1_epi8(0x0f), three = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32); \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        for (int64_t kb = 0; kb < K / 256; kb++) {                                                           \
            const uint8_t *blk = w + kb * Q6_K_BYTES;                                                        \
            const int8_t *scales = (const int8_t *)(blk + 192);                                              \
            float d = half_avx2(blk + 208);                                                                  \
            for (int n = 0; n < 2; n++) {                                                                    \
                __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n));                          \
                __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n + 32));                     \
                __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * n));                     \
                for (int t = 0; t < 4; t++) {                                                                \
                    __m256i src = t & 1 ? ql1 : ql0;                                                         \
                    __m256i nib = t < 2 ? _mm256_and_si256(src, low)                                         \
                                        : _mm256_and_si256(_mm256_srli_epi16(src, 4), low);                  \
                    __m256i hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t)), three);  \
                    __m256i ws = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_slli_epi16(hb, 4)), bias);     \
                    __m256i aw = _mm256_sign_epi8(ws, ws);                                                   \
                    const int8_t *s = scales + 8 * n + 2 * t;                                                \
                    __m256 scale = _mm256_setr_ps(d * s[0], d * s[0], d * s[0], d * s[0], d * s[1], d * s[1], \
                                                  d * s[1], d * s[1]);                                       \
                    int64_t b = kb * 8 + 4 * n + t;                                                          \
                    for (int r = 0; r < RG; r++) {                                                           \
                        __m256i xq = _mm256_loadu_si256((const __m256i *)(a->qx + r * K + b * 32));         \
                        __m256 p = _mm256_cvtepi32_ps(DOT(aw, _mm256_sign_epi8(xq, ws)));                    \
                        __m256 sd = _mm256_mul_ps(scale, _mm256_set1_ps(a->dx[r * nb + b]));                 \
                        acc[r] = _mm256_fmadd_ps(p, sd, acc[r]);                                             \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]);                                               \
    }                                                                                                        \
    TARGET static void fast_q5_0_##SUF(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, q5_##SUF##_rg, w, a, K, out, 0)                                                         \
    }                                                                                                        \
    TARGET static void fast_q5_1_##SUF(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, q5_##SUF##_rg, w, a, K, out, 1)                                                         \
    }                                                                                                        \
    TARGET static void fast_q4_k_##SUF(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, qk_##SUF##_rg, w, a, K, out, 0)                                                         \
    }                                                                                                        \
    TARGET static void fast_q5_k_##SUF(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, qk_##SUF##_rg, w, a, K, out, 1)                                                         \
    }                                                                                                        \
    TARGET static void fast_q6_k_##SUF(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, q6_k_##SUF##_rg, w, a, K, out)                                                          \
    }

KQUANT_KERNELS(avx2, AVX2, DOT_AVX2)
KQUANT_KERNELS(vnni, VNNI, DOT_VNNI)

#define SIMD(NAME) {exact_##NAME##_scalar, exact_##NAME##_avx2, NULL}, {fast_##NAME##_scalar, fast_##NAME##_avx2, fast_##NAME##_vnni}
#else
#define SIMD(NAME) {exact_##NAME##_scalar, NULL, NULL}, {fast_##NAME##_scalar, NULL, NULL}
#endif

const QType KQUANT_TYPES[] = {
    {T_Q5_0, "Q5_0", 32, Q5_0_BYTES, dequant_q5_0, SIMD(q5_0), 0},
    {T_Q5_1, "Q5_1", 32, Q5_1_BYTES, dequant_q5_1, SIMD(q5_1), 0},
    {T_Q4_K, "Q4_K", 256, Q4_K_BYTES, dequant_q4_k, SIMD(q4_k), 0},
    {T_Q5_K, "Q5_K", 256, Q5_K_BYTES, dequant_q5_k, SIMD(q5_k), 0},
    {T_Q6_K, "Q6_K", 256, Q6_K_BYTES, dequant_q6_k, SIMD(q6_k), 0},
};
const int NUM_KQUANT_TYPES = sizeof(KQUANT_TYPES) / sizeof(KQUANT_TYPES[0]);
