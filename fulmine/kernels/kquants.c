/* Kernels for the block types of real-world GGUF files beyond Q8_0 / Q4_0 / Q4_1: Q5_0 and Q5_1
 * (32 weights a block, a fifth bit per weight), and the K-quants Q4_K, Q5_K, Q6_K (256-weight
 * super-blocks of 32- or 16-weight sub-blocks with their own 6- or 8-bit scales), as llama.cpp's
 * Q4_K_M files mix them. Their table entries (KQUANT_TYPES) join matmul.c's table of types.
 *
 * Fast mode. Q5_0 / Q5_1 read the activations quantized per 32 values, like Q4_0: integer dot
 * products of the 5-bit weights with the int8 activations, scaled, plus offset x block sum. The
 * K-quants read them quantized per 256 values (one scale per super-block, as llama.cpp's Q8_K):
 * each sub-block's integer dot product is multiplied by its integer scale and summed in int32 over
 * the whole super-block, then converted and scaled once; the sub-blocks' minimums (Q4_K, Q5_K) or
 * the offset 32 (Q6_K) come from the activations' int16 sums per 16 values. Exact mode dequantizes
 * one block to float32 and dots it with the float activations.
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
void scales_k4(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
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
 * Scalar fast kernels. Q5_0 / Q5_1: per 32-weight block, an integer dot product, then
 * dx * scale * dot + offset * xsum.
 */
static void fast_q5_scalar(int has_min, const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {
    int64_t nb = K / 32;
    size_t bsz = has_min ? Q5_1_BYTES : Q5_0_BYTES;
    float acc[MAX_RG] = {0.f};
    uint8_t u[32];
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bsz;
        unpack_q5(blk + (has_min ? 4 : 2), blk + (has_min ? 8 : 6), u);
        float d = h2f(blk), m = has_min ? h2f(blk + 2) : -16.f * d;
        for (int r = 0; r < R; r++) {
            const int8_t *xq = a->qx + r * K + b * 32;
            int dot = 0;
            for (int l = 0; l < 32; l++) dot += u[l] * xq[l];
            acc[r] += a->dx[r * nb + b] * d * (float)dot + m * a->xsum[r * nb + b];
        }
    }
    for (int r = 0; r < R; r++) out[r] = acc[r];
}

/* Exact mode, any type: each block dequantized to float32, dotted with each activation row. */
static void exact_scalar(void (*deq)(const uint8_t *, float *), int block, int bytes, const uint8_t *w, const float *x,
                         int R, int64_t K, float *out) {
    float tmp[256], acc[MAX_RG] = {0.f};
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

/* The per-256 activation format (QAct.kq, kd, ksum): one scale per 256 values, int16 sums per 16. */
void quantize_row_k_scalar(const float *x, int64_t K, int8_t *q, float *d, int16_t *sums) {
    for (int64_t b = 0; b < K / 256; b++) {
        const float *xb = x + b * 256;
        float amax = 0.f;
        for (int i = 0; i < 256; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        float id = amax > 0.f ? 127.f / amax : 0.f;
        d[b] = amax / 127.f;
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int i = 16 * g; i < 16 * g + 16; i++) sum += q[b * 256 + i] = (int8_t)lrintf(xb[i] * id);
            sums[b * 16 + g] = (int16_t)sum;
        }
    }
}

/* K-quants, fast mode, scalar: per super-block sum_j scale_j * dot(u_j, q_j) in integers, then
 * d * kd * (that) - (minimum or offset terms from the 16-value sums) */
static void fast_k_scalar(int type, int bytes, const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {
    int64_t nk = K / 256;
    uint8_t sc[8], mn[8], u[32];
    int8_t sw[32];
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t kb = 0; kb < nk; kb++) {
            const uint8_t *blk = w + kb * bytes;
            const int8_t *q = a->kq + r * K + kb * 256;
            const int16_t *bs = a->ksum + r * (K / 16) + kb * 16;
            float dk = a->kd[r * nk + kb];
            int isum = 0, offset = 0;
            if (type == T_Q6_K) {
                const int8_t *scales = (const int8_t *)(blk + 192);
                for (int j = 0; j < 8; j++) {
                    unpack_q6_k(blk, j, sw);
                    for (int l = 0; l < 32; l++) isum += scales[2 * j + (l >= 16)] * (sw[l] + 32) * q[32 * j + l];
                }
                for (int g = 0; g < 16; g++) offset += scales[g] * bs[g]; /* the scales are in activation order */
                acc += h2f(blk + 208) * dk * (float)(isum - 32 * offset);
            } else {
                scales_k4(blk + 4, sc, mn);
                for (int j = 0; j < 8; j++) {
                    unpack_k(blk, j, type == T_Q5_K, u);
                    int dot = 0;
                    for (int l = 0; l < 32; l++) dot += u[l] * q[32 * j + l];
                    isum += sc[j] * dot;
                    offset += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
                }
                acc += h2f(blk) * dk * (float)isum - h2f(blk + 2) * dk * (float)offset;
            }
        }
        out[r] = acc;
    }
}

#define SCALAR_KERNELS(NAME, TYPE, BLOCK, BYTES)                                                              \
    static void fast_##NAME##_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        if (BLOCK == 256)                                                                                     \
            fast_k_scalar(TYPE, BYTES, w, a, R, K, out);                                                      \
        else                                                                                                  \
            fast_q5_scalar(TYPE == T_Q5_1, w, a, R, K, out);                                                  \
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

/* Q4_K / Q5_K's 12 scale bytes -> bytes 0-7: the 8 six-bit scales, bytes 8-15: the 8 minimums (the
 * layout of scales_k4, as 32-bit words: scales 0-3 and minimums 0-3 are the low 6 bits of words 0 and 1;
 * scales and minimums 4-7 are the low and high nibbles of word 2, with the top 2 bits of words 0 and 1
 * above them) */
AVX2 static inline __m128i scales_mins_k4(const uint8_t *q) {
    uint32_t w0, w1, w2;
    memcpy(&w0, q, 4);
    memcpy(&w1, q + 4, 4);
    memcpy(&w2, q + 8, 4);
    const uint32_t six = 0x3f3f3f3f, nibble = 0x0f0f0f0f, two = 0x03030303;
    uint32_t sc_lo = w0 & six, mn_lo = w1 & six;
    uint32_t sc_hi = (w2 & nibble) | (((w0 >> 6) & two) << 4);
    uint32_t mn_hi = ((w2 >> 4) & nibble) | (((w1 >> 6) & two) << 4);
    return _mm_setr_epi32((int)sc_lo, (int)sc_hi, (int)mn_lo, (int)mn_hi);
}

/* bit i of x -> byte i all ones (i < 32) */
AVX2 static inline __m256i bits_to_bytes(uint32_t x) {
    const __m256i shuffle = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                             3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuffle), bit);
    return _mm256_cmpeq_epi8(bytes, bit);
}

void quantize_row_k_avx2(const float *x, int64_t K, int8_t *q, float *d, int16_t *sums) __attribute__((target("avx2,fma,f16c")));
void quantize_row_k_avx2(const float *x, int64_t K, int8_t *q, float *d, int16_t *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / 256; b++) {
        const float *xb = x + b * 256;
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < 256; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        d[b] = amax / 127.f;
        for (int c = 0; c < 256; c += 32) {
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + c), id));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + c + 8), id));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + c + 16), id));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + c + 24), id));
            __m256i s01 = _mm256_add_epi32(i0, i1), s23 = _mm256_add_epi32(i2, i3);
            sums[b * 16 + c / 16] = (int16_t)hsum256(_mm256_cvtepi32_ps(s01));
            sums[b * 16 + c / 16 + 1] = (int16_t)hsum256(_mm256_cvtepi32_ps(s23));
            __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(q + b * 256 + c), _mm256_permutevar8x32_epi32(packed, perm));
        }
    }
}

AVX2 static inline void exact_avx2(void (*deq)(const uint8_t *, float *), int block, int bytes, const uint8_t *w,
                                   const float *x, int R, int64_t K, float *out) {
    float tmp[256] __attribute__((aligned(32)));
    __m256 acc[MAX_RG] = ZEROS_PS;
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

/* acc + the int16 pairs of a times b summed into int32 lanes (AVX-512 VNNI: one vpdpwssd) */
#define MADD_AVX2(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define MADD_VNNI(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)

#define KQUANT_KERNELS(SUF, TARGET, DOT, MADD)                                                                     \
    TARGET INLINE void q5_##SUF##_rg(const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out,     \
                                     const int has_min) {                                                    \
        const int64_t nb = K / 32;                                                                           \
        const size_t bsz = has_min ? Q5_1_BYTES : Q5_0_BYTES;                                                \
        const __m256i low = _mm256_set1_epi8(0x0f), fifth = _mm256_set1_epi8(0x10);                        \
        __m256 acc[MAX_RG] = ZEROS_PS; \
        float macc[MAX_RG] = {0.f};                                                                \
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
        const int64_t nk = K / 256;                                                                          \
        const size_t bsz = five ? Q5_K_BYTES : Q4_K_BYTES;                                                   \
        const __m256i low = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);                             \
        __m256 acc[MAX_RG] = ZEROS_PS; \
        __m256 macc[MAX_RG] = ZEROS_PS; \
        for (int64_t kb = 0; kb < nk; kb++) {                                                                \
            const uint8_t *blk = w + kb * bsz, *qs = blk + (five ? 48 : 16);                                 \
            /* the 8 scales as int16, twice (one per 128-bit lane); the 8 minimums each twice in a row, to  \
             * pair with the activations' sums per 16 */                                                     \
            __m128i sm = scales_mins_k4(blk + 4);                                                            \
            __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));                               \
            __m128i mn16 = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));                                         \
            __m256i mins = _mm256_set_m128i(_mm_unpackhi_epi16(mn16, mn16), _mm_unpacklo_epi16(mn16, mn16)); \
            __m256i hv = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();   \
            __m256i isum[MAX_RG] = ZEROS_SI;                                                      \
            _Pragma("GCC unroll 4") for (int p = 0; p < 4; p++) {                                            \
                __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));                             \
                __m256i lo = _mm256_and_si256(q, low), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low); \
                if (five) {                                                                                  \
                    __m256i b0 = _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * p)), one);     \
                    __m256i b1 = _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * p + 1)), one); \
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));                                      \
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));                                      \
                }                                                                                            \
                __m256i s0 = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(((4 * p + 1) << 8) | (4 * p)))); \
                __m256i s1 = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(((4 * p + 3) << 8) | (4 * p + 2)))); \
                for (int r = 0; r < RG; r++) {                                                               \
                    const int8_t *xq = a->kq + r * K + kb * 256 + 64 * p;                                    \
                    __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);                                   \
                    __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 32));                            \
                    isum[r] = MADD(isum[r], _mm256_maddubs_epi16(lo, x0), s0);                               \
                    if (RG <= 2) /* two chains of int32 sums: one alone waits on each add's latency */      \
                        isum[r + 2] = MADD(isum[r + 2], _mm256_maddubs_epi16(hi, x1), s1);                   \
                    else                                                                                     \
                        isum[r] = MADD(isum[r], _mm256_maddubs_epi16(hi, x1), s1);                           \
                }                                                                                            \
            }                                                                                                \
            float d = half_avx2(blk), dmin = half_avx2(blk + 2);                                             \
            if (RG <= 2)                                                                                     \
                for (int r = 0; r < RG; r++) isum[r] = _mm256_add_epi32(isum[r], isum[r + 2]);               \
            for (int r = 0; r < RG; r++) {                                                                   \
                __m256i bs = _mm256_loadu_si256((const __m256i *)(a->ksum + r * (K / 16) + kb * 16));       \
                float dk = a->kd[r * nk + kb];                                                               \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_set1_ps(d * dk), acc[r]);       \
                macc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins)),                   \
                                          _mm256_set1_ps(dmin * dk), macc[r]);                               \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < RG; r++) out[r] = hsum256(_mm256_sub_ps(acc[r], macc[r]));                      \
    }                                                                                                        \
    TARGET INLINE void q6_k_##SUF##_rg(const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out) { \
        const int64_t nk = K / 256;                                                                          \
        const __m256i low = _mm256_set1_epi8(0x0f), three = _mm256_set1_epi8(3);                           \
        __m256 acc[MAX_RG] = ZEROS_PS; \
        for (int64_t kb = 0; kb < nk; kb++) {                                                                \
            const uint8_t *blk = w + kb * Q6_K_BYTES;                                                        \
            const int8_t *scales = (const int8_t *)(blk + 192);                                              \
            __m256i isum[MAX_RG] = ZEROS_SI;                                                      \
            /* the 16 scales as int16: 0-7 in the low 128 bits, 8-15 in the high */                          \
            const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)scales));             \
            _Pragma("GCC unroll 2") for (int n = 0; n < 2; n++) {                                            \
                __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n));                          \
                __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * n + 32));                     \
                __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * n));                     \
                __m256i sn = n ? _mm256_permute2x128_si256(s16, s16, 0x11) : _mm256_permute2x128_si256(s16, s16, 0x00); \
                _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {                                        \
                    __m256i src = t & 1 ? ql1 : ql0;                                                         \
                    __m256i nib = t < 2 ? _mm256_and_si256(src, low)                                         \
                                        : _mm256_and_si256(_mm256_srli_epi16(src, 4), low);                  \
                    __m256i hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t)), three);  \
                    __m256i u = _mm256_or_si256(nib, _mm256_slli_epi16(hb, 4));                              \
                    /* scale 8n + 2t for weights 0-15 (the low 128 bits), 8n + 2t + 1 for 16-31 */           \
                    __m256i pick = _mm256_set_m128i(_mm_set1_epi16((short)(((4 * t + 3) << 8) | (4 * t + 2))),  \
                                                    _mm_set1_epi16((short)(((4 * t + 1) << 8) | (4 * t))));     \
                    __m256i sv = _mm256_shuffle_epi8(sn, pick);                                              \
                    for (int r = 0; r < RG; r++) {                                                           \
                        const int8_t *xq = a->kq + r * K + kb * 256 + 128 * n + 32 * t;                      \
                        __m256i x = _mm256_loadu_si256((const __m256i *)xq);                                 \
                        if (RG <= 2 && (t & 1)) /* two chains of int32 sums, as above */                     \
                            isum[r + 2] = MADD(isum[r + 2], _mm256_maddubs_epi16(u, x), sv);                 \
                        else                                                                                 \
                            isum[r] = MADD(isum[r], _mm256_maddubs_epi16(u, x), sv);                         \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
            if (RG <= 2)                                                                                     \
                for (int r = 0; r < RG; r++) isum[r] = _mm256_add_epi32(isum[r], isum[r + 2]);               \
            float d = half_avx2(blk + 208);                                                                  \
            for (int r = 0; r < RG; r++) {                                                                   \
                /* sum(scale * (u - 32) * x) = isum - 32 * sum over 16-groups of scale * (sum of x) */      \
                __m256i bs = _mm256_loadu_si256((const __m256i *)(a->ksum + r * (K / 16) + kb * 16));       \
                __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(bs, s16), 5);                              \
                __m256 dd = _mm256_set1_ps(d * a->kd[r * nk + kb]);                                         \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum[r], off)), dd, acc[r]);   \
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

KQUANT_KERNELS(avx2, AVX2, DOT_AVX2, MADD_AVX2)
KQUANT_KERNELS(vnni, VNNI, DOT_VNNI, MADD_VNNI)

#define SIMD(NAME) {exact_##NAME##_scalar, exact_##NAME##_avx2, NULL}, {fast_##NAME##_scalar, fast_##NAME##_avx2, fast_##NAME##_vnni}
#else
#define SIMD(NAME) {exact_##NAME##_scalar, NULL, NULL}, {fast_##NAME##_scalar, NULL, NULL}
#endif

const QType KQUANT_TYPES[] = {
    {T_Q5_0, "Q5_0", 32, Q5_0_BYTES, dequant_q5_0, SIMD(q5_0), 0, 0},
    {T_Q5_1, "Q5_1", 32, Q5_1_BYTES, dequant_q5_1, SIMD(q5_1), 0, 0},
    {T_Q4_K, "Q4_K", 256, Q4_K_BYTES, dequant_q4_k, SIMD(q4_k), 0, 1},
    {T_Q5_K, "Q5_K", 256, Q5_K_BYTES, dequant_q5_k, SIMD(q5_k), 0, 1},
    {T_Q6_K, "Q6_K", 256, Q6_K_BYTES, dequant_q6_k, SIMD(q6_k), 0, 1},
};
const int NUM_KQUANT_TYPES = sizeof(KQUANT_TYPES) / sizeof(KQUANT_TYPES[0]);
