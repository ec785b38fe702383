/* Q4_K and Q6_K with 16 rows interleaved (the layouts: interleaved.c; Q4_K's fields d, dmin, the 12
 * scale bytes and the 128 quant bytes in units of 2, 2, 4, 4 bytes; Q6_K's ql, qh, scales, d in units
 * of 4, 4, 4, 2), and their int8-activation kernels, which read the per-256 activations (quant.h:
 * kq, kd, ksum).
 *
 * Per super-block and row: sub-block j's 32 weights against its 32 activations is an exact int32 dot
 * product s_j (eight 4-byte chunks); isum = sum_j sc_j * s_j and msum = sum_j mn_j * (the activations'
 * sum over sub-block j) are exact in int32; then acc = fma(float(isum), d * kd, acc) and
 * acc = fma(-float(msum), dmin * kd, acc). The scalar kernel does the same with fmaf: the same bits
 * on every path and for every row count. Only the 512-bit kernels are SIMD: CPUs without them keep the
 * K-quants in their own layout (matmul.c's interleave_group is 8 there, and no 8-row K-quant layout exists).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu.h"

enum { Q4_KX16_BYTES = 16 * 144, Q6_KX16_BYTES = 16 * 210 };

/* out[r * 16 + j] = dot(row j of the group, activation row r) */
static void q4_kx16_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {
    const int64_t nk = K / 256;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 16; j++) {
            float acc = 0.f;
            for (int64_t kb = 0; kb < nk; kb++) {
                uint8_t blk[144];
                interleaved_unpack(T_Q4_K | T_X16, w + kb * Q4_KX16_BYTES, j, blk);
                uint8_t sc[8], mn[8];
                int isum = 0, msum = 0;
                scales_k4(blk + 4, sc, mn);
                const int8_t *x = a->kq + r * K + kb * 256;
                const int16_t *bs = a->ksum + r * (K / 16) + kb * 16;
                for (int s = 0; s < 8; s++) {
                    const uint8_t *qs = blk + 16 + 32 * (s / 2);
                    int dot = 0;
                    for (int l = 0; l < 32; l++) dot += (s & 1 ? qs[l] >> 4 : qs[l] & 0x0f) * x[32 * s + l];
                    isum += sc[s] * dot;
                    msum += mn[s] * (bs[2 * s] + bs[2 * s + 1]);
                }
                uint16_t h;
                float d, dmin, dk = a->kd[r * nk + kb];
                memcpy(&h, blk, 2);
                d = fulmine_half_to_float(h);
                memcpy(&h, blk + 2, 2);
                dmin = fulmine_half_to_float(h);
                acc = fmaf((float)isum, d * dk, acc);
                acc = fmaf(-(float)msum, dmin * dk, acc);
            }
            out[r * 16 + j] = acc;
        }
}

/* Q6_K: per 16 weights g, s_g = dot(u, x) with u in 0..63 the stored value (weight = d * sc_g * (u - 32));
 * isum = sum_g sc_g * s_g - 32 * sum_g sc_g * (the activations' sum over g), exact in int32; then
 * acc = fma(float(isum), d * kd, acc). */
static void q6_kx16_scalar(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) {
    const int64_t nk = K / 256;
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 16; j++) {
            float acc = 0.f;
            for (int64_t kb = 0; kb < nk; kb++) {
                uint8_t blk[210];
                interleaved_unpack(T_Q6_K | T_X16, w + kb * Q6_KX16_BYTES, j, blk);
                const int8_t *x = a->kq + r * K + kb * 256, *sc = (const int8_t *)(blk + 192);
                const int16_t *bs = a->ksum + r * (K / 16) + kb * 16;
                int isum = 0, msum = 0;
                for (int g = 0; g < 16; g++) {
                    int n = g / 8, t = (g % 8) / 2, dot = 0;
                    for (int i = 0; i < 16; i++) {
                        int l = 16 * (g % 2) + i;
                        uint8_t ql = blk[64 * n + l + (t & 1 ? 32 : 0)], qh = blk[128 + 32 * n + l];
                        int u = (t < 2 ? ql & 0x0f : ql >> 4) | (((qh >> (2 * t)) & 3) << 4);
                        dot += u * x[128 * n + 32 * t + l];
                    }
                    isum += sc[g] * dot;
                    msum += sc[g] * bs[g];
                }
                uint16_t h;
                memcpy(&h, blk + 208, 2);
                acc = fmaf((float)(isum - 32 * msum), fulmine_half_to_float(h) * a->kd[r * nk + kb], acc);
            }
            out[r * 16 + j] = acc;
        }
}

#ifdef FULMINE_X86

ZMM static inline __m512i bcast4(const void *p) { /* four bytes in every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

ZMM static inline __attribute__((always_inline)) void q4_kx16_rg(const int RG, const uint8_t *w, const QAct *a,
                                                                 int64_t K, float *out) {
    const int64_t nk = K / 256;
    const __m512i low = _mm512_set1_epi8(0x0f), six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15),
                  two = _mm512_set1_epi32(3);
    __m512 acc[MAX_RG];
    for (int r = 0; r < RG; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < nk; kb++) {
        const uint8_t *blk = w + kb * Q4_KX16_BYTES, *qs = blk + 256;
        if (prefetch_ahead)
            for (size_t o = 0, at = prefetch_offset(nk * Q4_KX16_BYTES); o < Q4_KX16_BYTES; o += 64) __builtin_prefetch(blk + at + o, 0, 3);
        /* the 16 rows' six-bit scales and minimums of each sub-block, as int32 lanes; the minimums
         * also as int16 pairs (m, m), to meet the activations' pairs of sums per 16 */
        __m512i w0 = _mm512_loadu_si512((const void *)(blk + 64)), w1 = _mm512_loadu_si512((const void *)(blk + 128)),
                w2 = _mm512_loadu_si512((const void *)(blk + 192));
        __m512i sc[8], mn2[8];
        for (int j = 0; j < 4; j++) {
            sc[j] = _mm512_and_si512(_mm512_srli_epi32(w0, 8 * j), six);
            __m512i m = _mm512_and_si512(_mm512_srli_epi32(w1, 8 * j), six);
            mn2[j] = _mm512_or_si512(m, _mm512_slli_epi32(m, 16));
            __m512i hs = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 8 * j + 6), two), 4);
            __m512i hm = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 8 * j + 6), two), 4);
            sc[4 + j] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 8 * j), four), hs);
            m = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 8 * j + 4), four), hm);
            mn2[4 + j] = _mm512_or_si512(m, _mm512_slli_epi32(m, 16));
        }
        __m512i isum[MAX_RG], msum[MAX_RG];
        for (int r = 0; r < RG; r++) isum[r] = msum[r] = _mm512_setzero_si512();
        for (int p = 0; p < 4; p++) { /* sub-blocks 2p (low nibbles) and 2p + 1 (high) */
            __m512i lo[8], hi[8];
            for (int t = 0; t < 8; t++) {
                __m512i v = _mm512_loadu_si512((const void *)(qs + 64 * (8 * p + t)));
                lo[t] = _mm512_and_si512(v, low);
                hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int r = 0; r < RG; r++) {
                const int8_t *x = a->kq + r * K + kb * 256 + 64 * p;
                __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
                for (int t = 0; t < 8; t++) {
                    s0 = _mm512_dpbusd_epi32(s0, lo[t], bcast4(x + 4 * t));
                    s1 = _mm512_dpbusd_epi32(s1, hi[t], bcast4(x + 32 + 4 * t));
                }
                isum[r] = _mm512_add_epi32(isum[r], _mm512_add_epi32(_mm512_mullo_epi32(s0, sc[2 * p]),
                                                                     _mm512_mullo_epi32(s1, sc[2 * p + 1])));
            }
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
        for (int r = 0; r < RG; r++) {
            const int16_t *bs = a->ksum + r * (K / 16) + kb * 16;
            for (int j = 0; j < 8; j++) msum[r] = _mm512_add_epi32(msum[r], _mm512_madd_epi16(mn2[j], bcast4(bs + 2 * j)));
            __m512 dk = _mm512_set1_ps(a->kd[r * nk + kb]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, dk), acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum[r]), _mm512_mul_ps(dmin, dk), acc[r]);
        }
    }
    for (int r = 0; r < RG; r++) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

/* The interleaved Q6_K group: ql in 32 chunks of 64 bytes (0..2047), qh in 16 (2048..3071), scales in
 * 4 (3072..3327), d (3328..3359). For half n and bytes l = 4L..4L+3: ql chunks A = 16n + L and B = A + 8,
 * qh chunk H = 8n + L; sub-block t's values: t = 0: A low | H bits 0-1, 1: B low | bits 2-3, 2: A high
 * | bits 4-5, 3: B high | bits 6-7 (as bits 4-5 of the value). */
ZMM static inline __attribute__((always_inline)) void q6_kx16_rg(const int RG, const uint8_t *w, const QAct *a,
                                                                 int64_t K, float *out) {
    const int64_t nk = K / 256;
    const __m512i low = _mm512_set1_epi8(0x0f), top = _mm512_set1_epi8(0x30), lo16 = _mm512_set1_epi32(0xffff);
    __m512 acc[MAX_RG];
    for (int r = 0; r < RG; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < nk; kb++) {
        const uint8_t *blk = w + kb * Q6_KX16_BYTES, *ql = blk, *qh = blk + 2048;
        if (prefetch_ahead)
            for (size_t o = 0, at = prefetch_offset(nk * Q6_KX16_BYTES); o < Q6_KX16_BYTES; o += 64) __builtin_prefetch(blk + at + o, 0, 3);
        /* the 16 rows' int8 scale of each group of 16 as int32 lanes, and as int16 pairs (g, g + 1) */
        __m512i sc[16], pair[8];
        for (int c = 0; c < 4; c++) {
            __m512i v = _mm512_loadu_si512((const void *)(blk + 3072 + 64 * c));
            for (int i = 0; i < 4; i++) sc[4 * c + i] = _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24);
        }
        for (int g = 0; g < 16; g += 2)
            pair[g / 2] = _mm512_or_si512(_mm512_and_si512(sc[g], lo16), _mm512_slli_epi32(sc[g + 1], 16));
        __m512i isum[MAX_RG];
        for (int r = 0; r < RG; r++) {
            const int16_t *bs = a->ksum + r * (K / 16) + kb * 16;
            __m512i m = _mm512_setzero_si512();
            for (int g = 0; g < 16; g += 2) m = _mm512_add_epi32(m, _mm512_madd_epi16(pair[g / 2], bcast4(bs + g)));
            isum[r] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(m, 5)); /* -32 sum_g sc_g bsum_g */
        }
        for (int n = 0; n < 2; n++)
            for (int half = 0; half < 2; half++) { /* l in 16 half .. 16 half + 15: the groups (n, t, half) */
                __m512i u[4][4];
                for (int i = 0; i < 4; i++) {
                    int L = 4 * half + i;
                    __m512i A = _mm512_loadu_si512((const void *)(ql + 64 * (16 * n + L)));
                    __m512i B = _mm512_loadu_si512((const void *)(ql + 64 * (16 * n + 8 + L)));
                    __m512i H = _mm512_loadu_si512((const void *)(qh + 64 * (8 * n + L)));
                    u[0][i] = _mm512_or_si512(_mm512_and_si512(A, low), _mm512_and_si512(_mm512_slli_epi16(H, 4), top));
                    u[1][i] = _mm512_or_si512(_mm512_and_si512(B, low), _mm512_and_si512(_mm512_slli_epi16(H, 2), top));
                    u[2][i] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(A, 4), low), _mm512_and_si512(H, top));
                    u[3][i] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(B, 4), low),
                                              _mm512_and_si512(_mm512_srli_epi16(H, 2), top));
                }
                for (int r = 0; r < RG; r++) {
                    const int8_t *x = a->kq + r * K + kb * 256 + 128 * n + 16 * half;
                    for (int t = 0; t < 4; t++) {
                        __m512i s = _mm512_setzero_si512();
                        for (int i = 0; i < 4; i++) s = _mm512_dpbusd_epi32(s, u[t][i], bcast4(x + 32 * t + 4 * i));
                        isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(s, sc[8 * n + 2 * t + half]));
                    }
                }
            }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 3328)));
        for (int r = 0; r < RG; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), _mm512_mul_ps(d, _mm512_set1_ps(a->kd[r * nk + kb])), acc[r]);
    }
    for (int r = 0; r < RG; r++) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

ZMM static void q4_kx16_zmm(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { SWITCH_RG(R, q4_kx16_rg, w, a, K, out) }
ZMM static void q6_kx16_zmm(const uint8_t *w, const QAct *a, int R, int64_t K, float *out) { SWITCH_RG(R, q6_kx16_rg, w, a, K, out) }
#define ISAS(NAME) {NAME##_scalar, NULL, NAME##_zmm}
#else
#define ISAS(NAME) {NAME##_scalar, NULL, NULL}
#endif

const QType INTERLEAVED_K_TYPES[] = {
    {T_Q4_K | T_X16, "Q4_Kx16", 256, 144, NULL, {NULL, NULL, NULL}, ISAS(q4_kx16), 0, 1, 16, T_Q4_K},
    {T_Q6_K | T_X16, "Q6_Kx16", 256, 210, NULL, {NULL, NULL, NULL}, ISAS(q6_kx16), 0, 1, 16, T_Q6_K},
};
const int NUM_INTERLEAVED_K_TYPES = sizeof(INTERLEAVED_K_TYPES) / sizeof(INTERLEAVED_K_TYPES[0]);
