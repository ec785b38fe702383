/* Row kernels (row_fn, qrow_fn: quant.h) of the float types and of Q8_0 / Q4_0 / Q4_1, the
 * per-32 activation format's quantizer, and their entries of the table of types (BASE_TYPES). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"

float fulmine_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load_half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return fulmine_half_to_float(h);
}

static void qrow_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out, int type) {
    int64_t nb = K / 32;
    size_t bsz = type == T_Q8_0 ? 34 : type == T_Q4_1 ? 20 : 18;
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * bsz;
            const int8_t *xq = a->qx + r * K + b * 32;
            float d = load_half(blk), dx = a->dx[r * nb + b];
            int s = 0;
            if (type == T_Q8_0) {
                for (int i = 0; i < 32; i++) s += ((const int8_t *)(blk + 2))[i] * xq[i];
                acc += d * dx * (float)s;
            } else {
                const uint8_t *qs = blk + (type == T_Q4_1 ? 4 : 2);
                float m = type == T_Q4_1 ? load_half(blk + 2) : -8.f * d;
                for (int i = 0; i < 16; i++) s += (qs[i] & 0x0f) * xq[i] + (qs[i] >> 4) * xq[i + 16];
                acc += d * dx * (float)s + m * a->xsum[r * nb + b];
            }
        }
        out[r] = acc;
    }
}
static void qrow_q8_0_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { qrow_scalar(w, a, R, K, out, T_Q8_0); }
static void qrow_q4_0_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { qrow_scalar(w, a, R, K, out, T_Q4_0); }
static void qrow_q4_1_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { qrow_scalar(w, a, R, K, out, T_Q4_1); }

/* x row [K] -> int8 blocks q with scales dx (x ~ dx * q) and xsum = dx * sum(q), the block sum of
 * the quantized values, so a product equals the dequantized activations times the weight. */
void quantize_row_scalar(const float *x, int64_t K, int8_t *q, float *dx, float *xsum) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int i = 0; i < 32; i++) {
            float v = fabsf(xb[i]);
            amax = v > amax ? v : amax;
        }
        float id = amax > 0.f ? 127.f / amax : 0.f;
        int s = 0;
        for (int i = 0; i < 32; i++) s += q[b * 32 + i] = (int8_t)lrintf(xb[i] * id);
        dx[b] = amax / 127.f;
        xsum[b] = dx[b] * (float)s;
    }
}

static void row_f32_scalar(const uint8_t *w8, const float *x, int R, int64_t K, const float *xsum, float *out) {
    (void)xsum;
    const float *w = (const float *)w8;
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; k++) acc += w[k] * x[r * K + k];
        out[r] = acc;
    }
}

static void row_f16_scalar(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out) {
    (void)xsum;
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; k++) acc += load_half(w + 2 * k) * x[r * K + k];
        out[r] = acc;
    }
}

static void row_q8_0_scalar(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out) {
    (void)xsum;
    int64_t nb = K / 32;
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * 34;
            const int8_t *q = (const int8_t *)(blk + 2);
            const float *xb = x + r * K + b * 32;
            float s = 0.f;
            for (int i = 0; i < 32; i++) s += q[i] * xb[i];
            acc += load_half(blk) * s;
        }
        out[r] = acc;
    }
}

static void row_q4_scalar(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out,
                          int is_q4_1) {
    int64_t nb = K / 32;
    size_t bsz = is_q4_1 ? 20 : 18;
    for (int r = 0; r < R; r++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * bsz;
            const uint8_t *qs = blk + (is_q4_1 ? 4 : 2);
            const float *xb = x + r * K + b * 32;
            float d = load_half(blk), m = is_q4_1 ? load_half(blk + 2) : -8.f * d;
            float s = 0.f;
            for (int i = 0; i < 16; i++) s += (qs[i] & 0x0f) * xb[i] + (qs[i] >> 4) * xb[i + 16];
            acc += d * s + m * xsum[r * nb + b];
        }
        out[r] = acc;
    }
}

static void row_q4_0_scalar(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out) {
    row_q4_scalar(w, x, R, K, xsum, out, 0);
}

static void row_q4_1_scalar(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out) {
    row_q4_scalar(w, x, R, K, xsum, out, 1);
}


#ifdef FULMINE_X86
/* Each kernel is written for a compile-time row count RG (1..MAX_RG) and inlined (SWITCH_RG, quant.h),
 * so the per-row accumulators live in registers. */
#define ROW_WRAPPER(name, FN, ...)                                                                         \
    AVX2 static void name(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out) { \
        SWITCH_RG(R, FN, w, x, K, xsum, out, ##__VA_ARGS__)                                               \
    }

/* float32 or float16 weights (half: a compile-time constant), float32 accumulation */
AVX2 static inline __attribute__((always_inline)) void row_float_avx2_rg(const int RG, const uint8_t *w8, const float *x,
                                                                         int64_t K, const float *xsum, float *out,
                                                                         const int half) {
    (void)xsum;
    const float *w32 = (const float *)w8;
    const uint16_t *w16 = (const uint16_t *)w8;
    __m256 acc[MAX_RG] = ZEROS_PS;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv = half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w16 + k))) : _mm256_loadu_ps(w32 + k);
        for (int r = 0; r < RG; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[r]);
    }
    for (int r = 0; r < RG; r++) {
        float s = hsum256(acc[r]);
        for (int64_t t = k; t < K; t++) s += (half ? _cvtsh_ss(w16[t]) : w32[t]) * x[r * K + t];
        out[r] = s;
    }
}
ROW_WRAPPER(row_f32_avx2, row_float_avx2_rg, 0)
ROW_WRAPPER(row_f16_avx2, row_float_avx2_rg, 1)

/* the 32 weights of a block (as four vectors of 8 floats) times 32 activations, in 8 lanes */
AVX2 static inline __attribute__((always_inline)) __m256 dot32_avx2(__m256 w0, __m256 w1, __m256 w2, __m256 w3,
                                                                    const float *xb) {
    __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
    t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), t);
    t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), t);
    return _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), t);
}

AVX2 static inline __attribute__((always_inline)) void row_q8_0_avx2_rg(const int RG, const uint8_t *w, const float *x,
                                                                        int64_t K, const float *xsum, float *out) {
    (void)xsum;
    int64_t nb = K / 32;
    __m256 acc[MAX_RG] = ZEROS_PS;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 34;
        __m128i q0 = _mm_loadu_si128((const __m128i *)(blk + 2));
        __m128i q1 = _mm_loadu_si128((const __m128i *)(blk + 18));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)));
        __m256 d = _mm256_set1_ps(half_avx2(blk));
        for (int r = 0; r < RG; r++) {
            acc[r] = _mm256_fmadd_ps(dot32_avx2(w0, w1, w2, w3, x + r * K + b * 32), d, acc[r]);
        }
    }
    for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]);
}
ROW_WRAPPER(row_q8_0_avx2, row_q8_0_avx2_rg)

AVX2 static inline __attribute__((always_inline)) void row_q4_avx2_rg(const int RG, const uint8_t *w, const float *x,
                                                                      int64_t K, const float *xsum, float *out,
                                                                      const int is_q4_1) {
    int64_t nb = K / 32;
    const size_t bsz = is_q4_1 ? 20 : 18;
    const __m128i low = _mm_set1_epi8(0x0f);
    __m256 acc[MAX_RG] = ZEROS_PS;
    float macc[MAX_RG] = {0.f};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bsz;
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + (is_q4_1 ? 4 : 2)));
        __m128i lo = _mm_and_si128(q, low), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        float df = half_avx2(blk), m = is_q4_1 ? half_avx2(blk + 2) : -8.f * df;
        __m256 d = _mm256_set1_ps(df);
        for (int r = 0; r < RG; r++) {
            acc[r] = _mm256_fmadd_ps(dot32_avx2(w0, w1, w2, w3, x + r * K + b * 32), d, acc[r]);
            macc[r] += m * xsum[r * nb + b];
        }
    }
    for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]) + macc[r];
}

ROW_WRAPPER(row_q4_0_avx2, row_q4_avx2_rg, 0)

ROW_WRAPPER(row_q4_1_avx2, row_q4_avx2_rg, 1)

/* The fast mode's block kernels, once with AVX2 (maddubs + madd) and once with AVX-512 VNNI
 * (dpbusd on 256-bit vectors): u8 weights times s8 activations, summed to int32 per 4 lanes. */
#define QROW_KERNELS(SUFFIX, TARGET, DOT)                                                                    \
    TARGET static inline __attribute__((always_inline)) void qrow_q4_##SUFFIX##_rg(                           \
        const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out, const int is_q4_1) {              \
        int64_t nb = K / 32;                                                                                 \
        const size_t bsz = is_q4_1 ? 20 : 18;                                                                \
        const __m256i low = _mm256_set1_epi8(0x0f);                                                          \
        __m256 acc[MAX_RG] = ZEROS_PS; \
        float macc[MAX_RG] = {0.f};                                                                \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            const uint8_t *blk = w + b * bsz;                                                                \
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + (is_q4_1 ? 4 : 2)));                        \
            __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);                  \
            float d = half_avx2(blk), m = is_q4_1 ? half_avx2(blk + 2) : -8.f * d;                           \
            for (int r = 0; r < RG; r++) {                                                                   \
                __m256i xq = _mm256_loadu_si256((const __m256i *)(a->qx + r * K + b * 32));                 \
                __m256 p = _mm256_cvtepi32_ps(DOT(wq, xq));                                                  \
                acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * a->dx[r * nb + b]), acc[r]);                  \
                macc[r] += m * a->xsum[r * nb + b];                                                          \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]) + macc[r];                                    \
    }                                                                                                        \
    TARGET static inline __attribute__((always_inline)) void qrow_q8_0_##SUFFIX##_rg(                         \
        const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out) {                              \
        int64_t nb = K / 32;                                                                                 \
        __m256 acc[MAX_RG] = ZEROS_PS; \
        for (int64_t b = 0; b < nb; b++) {                                                                   \
            const uint8_t *blk = w + b * 34;                                                                 \
            __m256i wq = _mm256_loadu_si256((const __m256i *)(blk + 2));                                    \
            __m256i aw = _mm256_sign_epi8(wq, wq);                                                           \
            float d = half_avx2(blk);                                                                        \
            for (int r = 0; r < RG; r++) {                                                                   \
                __m256i xq = _mm256_loadu_si256((const __m256i *)(a->qx + r * K + b * 32));                 \
                __m256 p = _mm256_cvtepi32_ps(DOT(aw, _mm256_sign_epi8(xq, wq)));                            \
                acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * a->dx[r * nb + b]), acc[r]);                  \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < RG; r++) out[r] = hsum256(acc[r]);                                               \
    }                                                                                                        \
    TARGET static void qrow_q4_0_##SUFFIX(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {     \
        SWITCH_RG(R, qrow_q4_##SUFFIX##_rg, w, a, K, out, 0)                                                  \
    }                                                                                                        \
    TARGET static void qrow_q4_1_##SUFFIX(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {     \
        SWITCH_RG(R, qrow_q4_##SUFFIX##_rg, w, a, K, out, 1)                                                  \
    }                                                                                                        \
    TARGET static void qrow_q8_0_##SUFFIX(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {     \
        SWITCH_RG(R, qrow_q8_0_##SUFFIX##_rg, w, a, K, out)                                                  \
    }

QROW_KERNELS(avx2, AVX2, DOT_AVX2)
QROW_KERNELS(vnni, VNNI, DOT_VNNI)

AVX2 void quantize_row_avx2(const float *x, int64_t K, int8_t *q, float *dx, float *xsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float id = amax > 0.f ? 127.f / amax : 0.f;
        dx[b] = amax / 127.f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
        __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        xsum[b] = dx[b] * hsum256(_mm256_cvtepi32_ps(isum));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * 32), _mm256_permutevar8x32_epi32(p, perm));
    }
}

#endif

static void deq_f32(const uint8_t *b, float *o) { memcpy(o, b, 4); }
static void deq_f16(const uint8_t *b, float *o) { o[0] = load_half(b); }
static void deq_q8_0(const uint8_t *b, float *o) {
    float d = load_half(b);
    for (int i = 0; i < 32; i++) o[i] = d * (float)((const int8_t *)(b + 2))[i];
}
static void deq_q4(const uint8_t *b, float *o, int q41) {
    const uint8_t *qs = b + (q41 ? 4 : 2);
    float d = load_half(b), m = q41 ? load_half(b + 2) : -8.f * d;
    for (int i = 0; i < 16; i++) {
        o[i] = d * (float)(qs[i] & 0x0f) + m;
        o[16 + i] = d * (float)(qs[i] >> 4) + m;
    }
}
static void deq_q4_0(const uint8_t *b, float *o) { deq_q4(b, o, 0); }
static void deq_q4_1(const uint8_t *b, float *o) { deq_q4(b, o, 1); }

#ifdef FULMINE_X86
#define ISAS(S, A, V) {S, A, V}
#else
#define ISAS(S, A, V) {S, NULL, NULL}
#endif

const QType BASE_TYPES[] = {
    {T_F32, "F32", 1, 4, deq_f32, ISAS(row_f32_scalar, row_f32_avx2, NULL), {NULL, NULL, NULL}, 0, 0},
    {T_F16, "F16", 1, 2, deq_f16, ISAS(row_f16_scalar, row_f16_avx2, NULL), {NULL, NULL, NULL}, 0, 0},
    {T_Q8_0, "Q8_0", 32, 34, deq_q8_0, ISAS(row_q8_0_scalar, row_q8_0_avx2, NULL),
     ISAS(qrow_q8_0_scalar, qrow_q8_0_avx2, qrow_q8_0_vnni), 0, 0},
    {T_Q4_0, "Q4_0", 32, 18, deq_q4_0, ISAS(row_q4_0_scalar, row_q4_0_avx2, NULL),
     ISAS(qrow_q4_0_scalar, qrow_q4_0_avx2, qrow_q4_0_vnni), 1, 0},
    {T_Q4_1, "Q4_1", 32, 20, deq_q4_1, ISAS(row_q4_1_scalar, row_q4_1_avx2, NULL),
     ISAS(qrow_q4_1_scalar, qrow_q4_1_avx2, qrow_q4_1_vnni), 1, 0},
};
const int NUM_BASE_TYPES = sizeof(BASE_TYPES) / sizeof(BASE_TYPES[0]);
