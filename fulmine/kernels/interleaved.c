/* Row-interleaved layouts, built once at load, and the int8-activation row kernels of Q4_0, Q4_1,
 * Q8_0 and Q5_0 in them (Q4_K's and Q6_K's: interleaved_k.c). G weight rows' blocks lie side by side (G = 16 where the CPU has 512-bit integer dot
 * products, else 8), so one vector dot product multiplies four weights of each of the G rows by the
 * same four activations (a broadcast), and a block ends as one vector holding the G rows' sums: no
 * horizontal sums, each weight unpacked once for every activation row. (llama.cpp's repacked
 * Q4_0x8 and ik_llama.cpp's _R8 types rest on the same idea.)
 *
 * An interleaved block (block b of rows G g .. G g + G - 1) holds the same bytes as the G blocks,
 * field by field of the base block, each field interleaved in units: fp16 scales in units of 2
 * bytes (G scales: one load), quants in units of 4 bytes (a chunk of 4 G bytes: lane j holds four
 * bytes of row j). A group of G rows is row_bytes * G bytes, so a matrix keeps its size and its row
 * offsets (shards start at multiples of G rows). Q5_0 and the K-quants have only G = 16 layouts.
 *
 * Numerics, the same for every ISA, both G and every row count: per row and block the integer dot
 * product is exact, then acc = fma(float(sum), d * dx, acc) and, for a type with a minimum (Q4_1;
 * Q4_0's is -8 d, Q5_0's -16 d), acc = fma(m, xsum, acc). The scalar kernel uses fmaf, so it gives the SIMD
 * kernels' bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* a field of the base block: `bytes` long, interleaved in units of `unit` bytes */
typedef struct {
    int bytes, unit;
} Field;

static const Field Q4_0_FIELDS[] = {{2, 2}, {16, 4}, {0, 0}};
static const Field Q4_1_FIELDS[] = {{2, 2}, {2, 2}, {16, 4}, {0, 0}};
static const Field Q8_0_FIELDS[] = {{2, 2}, {32, 4}, {0, 0}};
static const Field Q5_0_FIELDS[] = {{2, 2}, {4, 4}, {16, 4}, {0, 0}};
static const Field Q4_K_FIELDS[] = {{2, 2}, {2, 2}, {12, 4}, {128, 4}, {0, 0}}; /* kernels: interleaved_k.c */
static const Field Q6_K_FIELDS[] = {{128, 4}, {64, 4}, {16, 4}, {2, 2}, {0, 0}};

static const Field *fields(int base) {
    switch (base) {
    case T_Q4_0: return Q4_0_FIELDS;
    case T_Q4_1: return Q4_1_FIELDS;
    case T_Q8_0: return Q8_0_FIELDS;
    case T_Q5_0: return Q5_0_FIELDS;
    case T_Q4_K: return Q4_K_FIELDS;
    case T_Q6_K: return Q6_K_FIELDS;
    default: return NULL;
    }
}

long prefetch_ahead = -1; /* one group: what the first machine measured best */

static int group_rows(int type) { return type & T_X16 ? 16 : 8; }

typedef struct {
    const Field *layout;
    const uint8_t *w;
    uint8_t *out, *aside; /* aside: in place, a group's worth of scratch per chunk */
    int G, bytes;
    int64_t groups, nb;
    size_t rb;
} InterleaveJob;

/* groups [groups * chunk / nchunks, ...) of G rows; each unit a fixed-size copy (a move, not a call).
 * In place (w == out): a group's rows are copied aside first, as its interleaved bytes overwrite them. */
static void interleave_task(void *ctx, int chunk, int nchunks) {
    const InterleaveJob *j = (const InterleaveJob *)ctx;
    uint8_t *aside = j->aside ? j->aside + (size_t)chunk * j->G * j->rb : NULL;
    for (int64_t g = j->groups * chunk / nchunks; g < j->groups * (chunk + 1) / nchunks; g++) {
        uint8_t *out = j->out + (size_t)g * j->G * j->rb;
        const uint8_t *rows = j->w + (size_t)g * j->G * j->rb;
        if (aside) rows = memcpy(aside, rows, (size_t)j->G * j->rb);
        for (int64_t b = 0; b < j->nb; b++) {
            const uint8_t *src = rows + (size_t)b * j->bytes;
            size_t off = 0;
            for (const Field *f = j->layout; f->bytes; off += (size_t)f->bytes, f++)
                for (int c = 0; c < f->bytes; c += f->unit)
                    for (int r = 0; r < j->G; r++, out += f->unit) {
                        const uint8_t *from = src + (size_t)r * j->rb + off + c;
                        if (f->unit == 4)
                            memcpy(out, from, 4);
                        else
                            memcpy(out, from, 2);
                    }
        }
    }
}

int interleave_rows(int base, int G, const uint8_t *w, int64_t N, int64_t K, uint8_t *out) {
    const Field *layout = fields(base);
    const QType *t = qtype(base);
    if (!layout || !t || (G != 8 && G != 16) || N % G || K % t->block) return -1;
    InterleaveJob job = {layout, w, out, NULL, G, t->bytes, N / G, K / t->block, row_bytes(base, K)};
    int chunks = pool_chunks(N / G);
    if (w == out && !(job.aside = malloc((size_t)chunks * G * job.rb))) return -2;
    pool_run(interleave_task, &job, chunks);
    free(job.aside);
    return 0;
}

void interleaved_unpack(int type, const uint8_t *in, int lane, uint8_t *blk) {
    int G = group_rows(type);
    size_t off = 0;
    for (const Field *f = fields(type & ~(T_X8 | T_X16)); f->bytes; off += (size_t)f->bytes, f++)
        for (int c = 0; c < f->bytes; c += f->unit, in += G * f->unit) memcpy(blk + off + c, in + lane * f->unit, (size_t)f->unit);
}

static inline float half_at(const uint8_t *p, int j) {
    uint16_t h;
    memcpy(&h, p + 2 * j, 2);
    return fulmine_half_to_float(h);
}

/* out[r * G + j] = dot(row j of the group, activation row r) */
static void interleaved_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out, int base, int G) {
    const int64_t nb = K / 32;
    const int q5 = base == T_Q5_0;
    const size_t bsz = (size_t)G * (base == T_Q8_0 ? 34 : base == T_Q4_1 ? 20 : q5 ? 22 : 18);
    const int qoff = G * (base == T_Q4_1 || q5 ? 4 : 2) + (q5 ? 2 * G : 0);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < G; j++) {
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + b * bsz, *q = blk + qoff;
                const int8_t *x = a->qx + r * K + b * 32;
                float d = half_at(blk, j), dx = a->dx[r * nb + b];
                uint32_t qh = 0; /* Q5_0: bit e, the fifth bit of weight e */
                if (q5) memcpy(&qh, blk + 2 * G + 4 * j, 4);
                int s = 0;
                for (int g = 0; g < (base == T_Q8_0 ? 8 : 4); g++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t byte = q[g * 4 * G + j * 4 + t];
                        if (base == T_Q8_0) {
                            s += (int8_t)byte * x[4 * g + t];
                        } else {
                            int e = 4 * g + t, lo = byte & 0x0f, hi = byte >> 4;
                            if (q5) lo |= (int)((qh >> e) & 1) << 4, hi |= (int)((qh >> (e + 16)) & 1) << 4;
                            s += lo * x[e] + hi * x[16 + e];
                        }
                    }
                acc = fmaf((float)s, d * dx, acc);
                if (base != T_Q8_0) {
                    float m = base == T_Q4_1 ? half_at(blk + 2 * G, j) : (q5 ? -16.f : -8.f) * d;
                    acc = fmaf(m, a->xsum[r * nb + b], acc);
                }
            }
            out[r * G + j] = acc;
        }
}
#define SCALAR(NAME, BASE, G)                                                                                  \
    static void NAME##_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {                 \
        interleaved_scalar(w, a, R, K, out, BASE, G);                                                          \
    }
SCALAR(q4_0x8, T_Q4_0, 8)
SCALAR(q4_1x8, T_Q4_1, 8)
SCALAR(q8_0x8, T_Q8_0, 8)
SCALAR(q4_0x16, T_Q4_0, 16)
SCALAR(q4_1x16, T_Q4_1, 16)
SCALAR(q8_0x16, T_Q8_0, 16)
SCALAR(q5_0x16, T_Q5_0, 16)

#ifdef FULMINE_X86
/* the weights prefetch_ahead on (weights stream from memory once per step: spread over the blocks,
 * the requests overlap the arithmetic; past the matrix's end they are no-ops) */
#define PREFETCH_NEXT_GROUP(blk, group_bytes, bsz)                                                            \
    if (prefetch_ahead)                                                                                       \
        for (size_t o_ = 0, at_ = prefetch_offset(group_bytes); o_ < (size_t)(bsz); o_ += 64)                 \
    __builtin_prefetch((blk) + at_ + o_, 0, 3)
/* four activation bytes in every 32-bit lane */
AVX2 static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* acc + u8 u times s8 s summed per 4 lanes (exact) */
#define DOTACC_AVX2(acc, u, s) _mm256_add_epi32(acc, DOT_AVX2(u, s))
#define DOTACC_VNNI(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)

#define X8_KERNELS(SUFFIX, TARGET, DOTACC)                                                                     \
    TARGET static inline __attribute__((always_inline)) void q4x8_##SUFFIX##_rg(                               \
        const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out, const int q41) {                  \
        const int64_t nb = K / 32;                                                                             \
        const size_t bsz = q41 ? 160 : 144;                                                                    \
        const __m256i low = _mm256_set1_epi8(0x0f);                                                            \
        __m256 acc[MAX_RG] = ZEROS_PS;                                                                         \
        for (int64_t b = 0; b < nb; b++) {                                                                     \
            const uint8_t *blk = w + b * bsz, *q = blk + (q41 ? 32 : 16);                                      \
            PREFETCH_NEXT_GROUP(blk, nb * bsz, bsz);                                                           \
            __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));                                 \
            __m256 m = q41 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)))                     \
                           : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));                                           \
            __m256i lo[4], hi[4];                                                                              \
            for (int g = 0; g < 4; g++) {                                                                      \
                __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * g));                                 \
                lo[g] = _mm256_and_si256(v, low);                                                              \
                hi[g] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                                        \
            }                                                                                                  \
            for (int r = 0; r < RG; r++) {                                                                     \
                const int8_t *x = a->qx + r * K + b * 32;                                                      \
                __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();                              \
                for (int g = 0; g < 4; g++) {                                                                  \
                    s0 = DOTACC(s0, lo[g], bcast4(x + 4 * g));                                                 \
                    s1 = DOTACC(s1, hi[g], bcast4(x + 16 + 4 * g));                                            \
                }                                                                                              \
                __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));                                       \
                acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(d, _mm256_set1_ps(a->dx[r * nb + b])), acc[r]);      \
                acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(a->xsum[r * nb + b]), acc[r]);                      \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < RG; r++) _mm256_storeu_ps(out + 8 * r, acc[r]);                                    \
    }                                                                                                          \
    TARGET static inline __attribute__((always_inline)) void q8x8_##SUFFIX##_rg(                               \
        const int RG, const uint8_t *w, const QAct *a, int64_t K, float *out) {                                \
        const int64_t nb = K / 32;                                                                             \
        __m256 acc[MAX_RG] = ZEROS_PS;                                                                         \
        for (int64_t b = 0; b < nb; b++) {                                                                     \
            const uint8_t *blk = w + b * 272;                                                                  \
            PREFETCH_NEXT_GROUP(blk, nb * 272, 272);                                                           \
            __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));                                 \
            __m256i v[8], u[8];                                                                                \
            for (int g = 0; g < 8; g++) {                                                                      \
                v[g] = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * g));                               \
                u[g] = _mm256_sign_epi8(v[g], v[g]); /* |w|; the activations take w's sign */                  \
            }                                                                                                  \
            for (int r = 0; r < RG; r++) {                                                                     \
                const int8_t *x = a->qx + r * K + b * 32;                                                      \
                __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();                              \
                for (int g = 0; g < 8; g += 2) {                                                               \
                    s0 = DOTACC(s0, u[g], _mm256_sign_epi8(bcast4(x + 4 * g), v[g]));                          \
                    s1 = DOTACC(s1, u[g + 1], _mm256_sign_epi8(bcast4(x + 4 * g + 4), v[g + 1]));              \
                }                                                                                              \
                __m256 p = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));                                       \
                acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(d, _mm256_set1_ps(a->dx[r * nb + b])), acc[r]);      \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < RG; r++) _mm256_storeu_ps(out + 8 * r, acc[r]);                                    \
    }                                                                                                          \
    TARGET static void q4_0x8_##SUFFIX(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, q4x8_##SUFFIX##_rg, w, a, K, out, 0)                                                      \
    }                                                                                                          \
    TARGET static void q4_1x8_##SUFFIX(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, q4x8_##SUFFIX##_rg, w, a, K, out, 1)                                                      \
    }                                                                                                          \
    TARGET static void q8_0x8_##SUFFIX(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {        \
        SWITCH_RG(R, q8x8_##SUFFIX##_rg, w, a, K, out)                                                         \
    }

X8_KERNELS(avx2, AVX2, DOTACC_AVX2)
X8_KERNELS(vnni, VNNI, DOTACC_VNNI)

/* G = 16: the same kernels on 512-bit vectors (AVX-512 has no byte sign: Q8_0's activations are
 * negated under a mask where the weight is negative) */
ZMM static inline __m512i bcast4_zmm(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* kind: T_Q4_0, T_Q4_1, or T_Q5_0 (Q4_0's nibbles with a fifth bit from qh, bit e of a row's 32 for
 * weight e, each chunk's four bits spread to its four bytes by a 16-entry table lookup; minimum -16 d) */
ZMM static inline __attribute__((always_inline)) void q4x16_rg(const int RG, const uint8_t *w, const QAct *a,
                                                               int64_t K, float *out, const int kind) {
    const int64_t nb = K / 32;
    const int q41 = kind == T_Q4_1, q5 = kind == T_Q5_0;
    const size_t bsz = q41 ? 320 : q5 ? 352 : 288;
    const __m512i low = _mm512_set1_epi8(0x0f);
    /* entry i: bit b of i as bit 4 of byte b */
    const __m512i spread = _mm512_setr_epi32(0x0, 0x10, 0x1000, 0x1010, 0x100000, 0x100010, 0x101000, 0x101010,
                                             0x10000000, 0x10000010, 0x10001000, 0x10001010, 0x10100000,
                                             0x10100010, 0x10101000, 0x10101010);
    __m512 acc[MAX_RG];
    for (int r = 0; r < RG; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bsz, *q = blk + (q41 ? 64 : q5 ? 96 : 32);
        PREFETCH_NEXT_GROUP(blk, nb * bsz, bsz);
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 m = q41 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
                       : _mm512_mul_ps(d, _mm512_set1_ps(q5 ? -16.f : -8.f));
        __m512i qh = q5 ? _mm512_loadu_si512((const void *)(blk + 32)) : _mm512_setzero_si512();
        __m512i lo[4], hi[4];
        for (int g = 0; g < 4; g++) {
            __m512i v = _mm512_loadu_si512((const void *)(q + 64 * g));
            lo[g] = _mm512_and_si512(v, low);
            hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            if (q5) { /* vpermd reads the low 4 bits of each index */
                lo[g] = _mm512_or_si512(lo[g], _mm512_permutexvar_epi32(_mm512_srli_epi32(qh, 4 * g), spread));
                hi[g] = _mm512_or_si512(hi[g], _mm512_permutexvar_epi32(_mm512_srli_epi32(qh, 16 + 4 * g), spread));
            }
        }
        for (int r = 0; r < RG; r++) {
            const int8_t *x = a->qx + r * K + b * 32;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int g = 0; g < 4; g++) {
                s0 = _mm512_dpbusd_epi32(s0, lo[g], bcast4_zmm(x + 4 * g));
                s1 = _mm512_dpbusd_epi32(s1, hi[g], bcast4_zmm(x + 16 + 4 * g));
            }
            __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(a->dx[r * nb + b])), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a->xsum[r * nb + b]), acc[r]);
        }
    }
    for (int r = 0; r < RG; r++) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

ZMM static inline __attribute__((always_inline)) void q8x16_rg(const int RG, const uint8_t *w, const QAct *a,
                                                               int64_t K, float *out) {
    const int64_t nb = K / 32;
    __m512 acc[MAX_RG];
    for (int r = 0; r < RG; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 544;
        PREFETCH_NEXT_GROUP(blk, nb * 544, 544);
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512i u[8];
        __mmask64 neg[8];
        for (int g = 0; g < 8; g++) {
            __m512i v = _mm512_loadu_si512((const void *)(blk + 32 + 64 * g));
            u[g] = _mm512_abs_epi8(v);
            neg[g] = _mm512_movepi8_mask(v);
        }
        for (int r = 0; r < RG; r++) {
            const int8_t *x = a->qx + r * K + b * 32;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int g = 0; g < 8; g += 2) {
                __m512i x0 = bcast4_zmm(x + 4 * g), x1 = bcast4_zmm(x + 4 * g + 4);
                s0 = _mm512_dpbusd_epi32(s0, u[g], _mm512_mask_sub_epi8(x0, neg[g], _mm512_setzero_si512(), x0));
                s1 = _mm512_dpbusd_epi32(s1, u[g + 1], _mm512_mask_sub_epi8(x1, neg[g + 1], _mm512_setzero_si512(), x1));
            }
            __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(a->dx[r * nb + b])), acc[r]);
        }
    }
    for (int r = 0; r < RG; r++) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

ZMM static void q4_0x16_zmm(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { SWITCH_RG(R, q4x16_rg, w, a, K, out, T_Q4_0) }
ZMM static void q4_1x16_zmm(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { SWITCH_RG(R, q4x16_rg, w, a, K, out, T_Q4_1) }
ZMM static void q8_0x16_zmm(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { SWITCH_RG(R, q8x16_rg, w, a, K, out) }

ZMM static void q5_0x16_zmm(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { SWITCH_RG(R, q4x16_rg, w, a, K, out, T_Q5_0) }

#define X8_ISAS(NAME) {NAME##_scalar, NAME##_avx2, NAME##_vnni}
#define X16_ISAS(NAME) {NAME##_scalar, NULL, NAME##_zmm}
#else
#define X8_ISAS(NAME) {NAME##_scalar, NULL, NULL}
#define X16_ISAS(NAME) {NAME##_scalar, NULL, NULL}
#endif

/* int8-activation kernels only: a model is interleaved only when it runs the fast mode. The 16-row
 * layouts are chosen only where the 512-bit kernels run (matmul.c: interleave_group) */
const QType INTERLEAVED_TYPES[] = {
    {T_Q4_0 | T_X8, "Q4_0x8", 32, 18, NULL, {NULL, NULL, NULL}, X8_ISAS(q4_0x8), 1, 0, 8, T_Q4_0},
    {T_Q4_1 | T_X8, "Q4_1x8", 32, 20, NULL, {NULL, NULL, NULL}, X8_ISAS(q4_1x8), 1, 0, 8, T_Q4_1},
    {T_Q8_0 | T_X8, "Q8_0x8", 32, 34, NULL, {NULL, NULL, NULL}, X8_ISAS(q8_0x8), 0, 0, 8, T_Q8_0},
    {T_Q4_0 | T_X16, "Q4_0x16", 32, 18, NULL, {NULL, NULL, NULL}, X16_ISAS(q4_0x16), 1, 0, 16, T_Q4_0},
    {T_Q4_1 | T_X16, "Q4_1x16", 32, 20, NULL, {NULL, NULL, NULL}, X16_ISAS(q4_1x16), 1, 0, 16, T_Q4_1},
    {T_Q8_0 | T_X16, "Q8_0x16", 32, 34, NULL, {NULL, NULL, NULL}, X16_ISAS(q8_0x16), 0, 0, 16, T_Q8_0},
    {T_Q5_0 | T_X16, "Q5_0x16", 32, 22, NULL, {NULL, NULL, NULL}, X16_ISAS(q5_0x16), 0, 0, 16, T_Q5_0},
};
const int NUM_INTERLEAVED_TYPES = sizeof(INTERLEAVED_TYPES) / sizeof(INTERLEAVED_TYPES[0]);
