/* What fulmine's matrix kernels share: GGML type ids, the fast mode's activation format, the row
 * kernel signatures, and QType, one entry of the table of block types (matmul.c joins
 * blocks32.c's and kquants.c's entries).
 *
 * A row kernel computes out[r] = dot(one weight row, activation row r) for r < R (R <= MAX_RG), the
 * activation rows K values apart: each weight block is unpacked once and dotted with every row. A
 * row's value never depends on R (the same operations in the same order per row; the integer sums
 * are exact), so a row computes the same bits alone, batched, in a prefill or a verified draft. Exact kernels read float32 activations; fast kernels read them
 * quantized to int8 per block of 32 (QAct), as llama.cpp's Q8 does.
 */
#ifndef FULMINE_QUANT_H
#define FULMINE_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* GGML type ids, as GGUF stores them */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14
};
/* fulmine's own: a base type with 8 or 16 rows interleaved (interleaved.c), e.g. T_Q4_1 | T_X16 */
enum { T_X8 = 0x100, T_X16 = 0x200 };

/* The fast mode's activations, in two formats (a product computes the ones its weight types read):
 * - per 32 (the 32-weight block types): qx[r * K + k] int8, dx[r * nb + b] the scale of 32-block b
 *   (x ~ dx * q), xsum[r * nb + b] = dx * sum(q) over the block; nb = K / 32;
 * - per 256 (the K-quants, as llama.cpp's Q8_K): kq[r * K + k] int8, kd[r * nk + b] the scale of
 *   256-block b, ksum[r * K / 16 + i] the int16 sum of kq over 16-value group i; nk = K / 256.
 *   One scale per super-block lets a K-quant sum its sub-blocks' scaled integer dot products in int32. */
typedef struct {
    const int8_t *qx;
    const float *dx, *xsum;
    const int8_t *kq;
    const float *kd;
    const int16_t *ksum;
} QAct;

/* kquants.c: Q4_K / Q5_K's 12 scale bytes -> the 8 six-bit scales and the 8 minimums */
void scales_k4(const uint8_t *q, uint8_t *sc, uint8_t *mn);
/* kquants.c: x row [K] (K % 256 == 0) -> the per-256 format */
void quantize_row_k_scalar(const float *x, int64_t K, int8_t *q, float *d, int16_t *sums);
void quantize_row_k_avx2(const float *x, int64_t K, int8_t *q, float *d, int16_t *sums);

/* xsum[r * nb + b]: the float sum of block b of activation row r (the exact kernels of types with a
 * per-block offset use it; NULL for the others) */
typedef void (*row_fn)(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out);
typedef void (*qrow_fn)(const uint8_t *w, const QAct *a, int R, int64_t K, float *out);

enum { ISA_SCALAR, ISA_AVX2, ISA_VNNI, N_ISA };

typedef struct {
    int type;
    const char *name;
    int block;                                        /* weights per block */
    int bytes;                                        /* bytes per block */
    void (*dequant)(const uint8_t *blk, float *out); /* one block -> `block` floats */
    row_fn exact[N_ISA];                              /* NULL: the one of the ISA before */
    qrow_fn fast[N_ISA];                              /* NULL: the one of the ISA before; none: exact only */
    int exact_needs_xsum;                             /* the exact kernel reads float block sums */
    int act256;                                       /* the fast kernel reads the per-256 activations */
    int rows;                                         /* interleaved types: 8 or 16 rows a kernel call covers (0: one) */
    int base;                                         /* an interleaved type's base type */
} QType;

/* kquants.c: Q5_0, Q5_1, Q4_K, Q5_K, Q6_K */
extern const QType KQUANT_TYPES[];
extern const int NUM_KQUANT_TYPES;

/* interleaved.c: Q4_0, Q4_1 and Q8_0 with G = 8 or 16 rows interleaved, Q5_0 with 16. A kernel of such a type
 * reads a group of G weight rows and writes out[r * G + j] for row j of the group and activation row r. */
extern const QType INTERLEAVED_TYPES[];
extern const int NUM_INTERLEAVED_TYPES;
/* interleaved_k.c: Q4_K and Q6_K with 16 rows interleaved */
extern const QType INTERLEAVED_K_TYPES[];
extern const int NUM_INTERLEAVED_K_TYPES;
/* W[N, K] of type base -> its layout with G rows interleaved in out (same size); -1 if base has
 * none or N % G */
int interleave_rows(int base, int G, const uint8_t *w, int64_t N, int64_t K, uint8_t *out);
/* the base block of lane (row) `lane` of an interleaved block */
void interleaved_unpack(int type, const uint8_t *in, int lane, uint8_t *blk);

float fulmine_half_to_float(uint16_t h);

#define MAX_RG 8 /* activation rows per row-kernel call */

/* R (1..MAX_RG) as a compile-time row count: FN(RG, args...) is inlined with its per-row accumulators
 * in registers. Every SIMD row kernel is written for RG and reached through this switch. */
#define SWITCH_RG(R, FN, ...)                                                                              \
    switch (R) {                                                                                           \
    case 1: FN(1, __VA_ARGS__); break;                                                                     \
    case 2: FN(2, __VA_ARGS__); break;                                                                     \
    case 3: FN(3, __VA_ARGS__); break;                                                                     \
    case 4: FN(4, __VA_ARGS__); break;                                                                     \
    case 5: FN(5, __VA_ARGS__); break;                                                                     \
    case 6: FN(6, __VA_ARGS__); break;                                                                     \
    case 7: FN(7, __VA_ARGS__); break;                                                                     \
    default: FN(8, __VA_ARGS__); break;                                                                    \
    }

#if defined(__x86_64__) || defined(_M_X64)
#define FULMINE_X86 1
#include <immintrin.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
/* 512-bit kernels: where the 16-row interleaved layouts are used (interleave_group() == 16) */
#define ZMM __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))
/* MAX_RG zeroed accumulators */
#define ZEROS_PS                                                                                           \
    {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),                  \
     _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}
#define ZEROS_SI                                                                                           \
    {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),       \
     _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline float half_avx2(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* e^x for x <= 0 (below -87: e^-87); Cephes' expf, relative error ~2e-7 */
AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* int8 dot products summed per 4 lanes into int32: u8 u times s8 s (AVX2: maddubs + madd; the
 * pairwise int16 sums cannot saturate for |u| <= 63) */
#define DOT_AVX2(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
#define DOT_VNNI(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
#endif

#endif
