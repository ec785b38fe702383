/* One layer's attention for the fused decoder: queries over the paged KV cache (float32 or float16),
 * scores, softmax and the weighted sum of values, and the cache writes.
 *
 * The work is split by (KV head, token, a share of the heads on that KV head): the heads sharing a
 * KV head read each key and value once between them (four at a time with 512-bit vectors). Every
 * query row is reduced in one fixed order whatever the batch, the chunk or the split:
 *   score i = scale * q.k_i, eight partial sums (d mod 8) reduced pairwise, for the positions in
 *     whole groups of eight from the first attended one; each later one by one vector and hsum256;
 *   softmax over the row; out[d] = fma chain over positions in order.
 * The 512-bit kernels compute exactly those operations (two keys' eight partial sums in one
 * vector; the weighted sum per element), so a row's values are the same bits on either path. */
#include <math.h>
#include <string.h>

#include "cpu.h"

static float load1(const void *base, int64_t e, int half) {
    return half ? fulmine_half_to_float(((const uint16_t *)base)[e]) : ((const float *)base)[e];
}

static void scores_scalar(const float *q, const void *base, const int64_t *offs, int n, int D, float scale,
                          float *out, int half) {
    for (int i = 0; i < n; i++) {
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * load1(base, offs[i] + d, half);
        out[i] = s * scale;
    }
}

static void wsum_scalar(float *o, const float *w, const void *base, const int64_t *offs, int n, int D, int half) {
    memset(o, 0, sizeof(float) * D);
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) o[d] += w[i] * load1(base, offs[i] + d, half);
}

static void softmax_scalar(float *s, int n) {
    float mx = -INFINITY, sum = 0.f;
    for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    for (int i = 0; i < n; i++) sum += s[i] = expf(s[i] - mx);
    for (int i = 0; i < n; i++) s[i] /= sum;
}

static uint16_t float_to_half(float f) { /* round to nearest even; overflow to inf, NaN kept */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, m = x & 0x7fffff;
    if (e == 0xff) return (uint16_t)(sign | 0x7c00 | (m ? 0x200 : 0));
    int exp = (int)e - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) { /* subnormal or zero */
        if (exp < -10) return (uint16_t)sign;
        m |= 0x800000;
        int shift = 14 - exp;
        uint32_t half = m >> shift, rest = m & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)exp << 10) | (m >> 13), rest = m & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++; /* may carry into the exponent: right */
    return (uint16_t)(sign | half);
}

static void to_half_scalar(uint16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = float_to_half(src[i]);
}


/* the heads [h0, h1) of one token, all on one KV head: their scores, softmax and weighted sums */
typedef struct {
    const float *q; /* the first head's query; heads D apart */
    float *o;       /* the first head's output */
    const void *k, *v; /* the caches, offset to this KV head */
    const int64_t *offs; /* the attended positions' element offsets */
    int n, D, nheads, half;
    float scale;
    float *scores; /* nheads rows of n */
} Heads;

static void heads_scalar(const Heads *a) {
    for (int h = 0; h < a->nheads; h++) {
        float *s = a->scores + (size_t)h * a->n;
        scores_scalar(a->q + (size_t)h * a->D, a->k, a->offs, a->n, a->D, a->scale, s, a->half);
        softmax_scalar(s, a->n);
        wsum_scalar(a->o + (size_t)h * a->D, s, a->v, a->offs, a->n, a->D, a->half);
    }
}

#ifdef FULMINE_X86
/* eight vectors -> one vector of their eight horizontal sums (lane i: the sum of v[i], pairwise) */
AVX2 INLINE __m256 hsum8x8(const __m256 v[8]) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* per 128-bit half: sums of 0-3, 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* eight values of a cache row from element e on: float32, or float16 widened by F16C */
AVX2 INLINE __m256 load8(const void *base, int64_t e, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + e)))
                : _mm256_loadu_ps((const float *)base + e);
}

/* one score alone (positions past the last whole eight): one vector of partial sums, hsum256 */
AVX2 INLINE float score1(const float *q, const void *base, int64_t off, int D, float scale, int half) {
    __m256 acc = _mm256_setzero_ps();
    int d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(base, off + d, half), acc);
    float s = hsum256(acc);
    for (; d < D; d++) s += q[d] * load1(base, off + d, half);
    return s * scale;
}

/* eight positions at a time: eight accumulators, one per key row, reduced together (no horizontal
 * sum per position). One body for both cache types: `half` is a constant at each call. */
AVX2 INLINE void scores_rows(const float *q, const void *base, const int64_t *offs, int n, int D, float scale,
                             float *out, int half) {
    int i = 0;
    if (D % 8 == 0) {
        __m256 vs = _mm256_set1_ps(scale);
        for (; i + 8 <= n; i += 8) {
            __m256 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                __m256 qd = _mm256_loadu_ps(q + d);
                for (int r = 0; r < 8; r++) acc[r] = _mm256_fmadd_ps(qd, load8(base, offs[i + r] + d, half), acc[r]);
            }
            _mm256_storeu_ps(out + i, _mm256_mul_ps(hsum8x8(acc), vs));
        }
    }
    for (; i < n; i++) out[i] = score1(q, base, offs[i], D, scale, half);
}

/* the output row stays in registers (up to 64 floats at a time) across every position */
AVX2 INLINE void wsum_rows(float *o, const float *w, const void *base, const int64_t *offs, int n, int D, int half) {
    if (D % 8) {
        wsum_scalar(o, w, base, offs, n, D, half);
        return;
    }
    for (int d0 = 0; d0 < D; d0 += 64) {
        int lanes = (D - d0 < 64 ? D - d0 : 64) / 8;
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (int i = 0; i < n; i++) {
            __m256 wi = _mm256_set1_ps(w[i]);
            for (int u = 0; u < lanes; u++) acc[u] = _mm256_fmadd_ps(wi, load8(base, offs[i] + d0 + 8 * u, half), acc[u]);
        }
        for (int u = 0; u < lanes; u++) _mm256_storeu_ps(o + d0 + 8 * u, acc[u]);
    }
}

/* scores -> probabilities in place: exp(s - max) / sum, eight at a time */
AVX2 static void softmax_avx2(float *s, int n) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + i));
    float lanes[8], mx = -INFINITY;
    _mm256_storeu_ps(lanes, vm);
    for (int j = 0; j < 8; j++) mx = lanes[j] > mx ? lanes[j] : mx;
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    __m256 vmx = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vmx));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum256(acc);
    for (; i < n; i++) sum += s[i] = expf(s[i] - mx);
    __m256 inv = _mm256_set1_ps(1.f / sum);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), inv));
    for (; i < n; i++) s[i] *= 1.f / sum;
}

AVX2 INLINE void heads_rows(const Heads *a, int h, int half) {
    float *s = a->scores + (size_t)h * a->n;
    scores_rows(a->q + (size_t)h * a->D, a->k, a->offs, a->n, a->D, a->scale, s, half);
    softmax_avx2(s, a->n);
    wsum_rows(a->o + (size_t)h * a->D, s, a->v, a->offs, a->n, a->D, half);
}

AVX2 static void heads_avx2(const Heads *a) {
    for (int h = 0; h < a->nheads; h++)
        if (a->half)
            heads_rows(a, h, 1);
        else
            heads_rows(a, h, 0);
}

/* float32 rows -> float16, rounded to nearest even (as PyTorch's .to(float16)) */
AVX2 static void to_half_avx2(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

/* ---- 512-bit: up to ZH heads at once; a vector holds eight partial sums of two keys ---- */
#define ZH 4
#define ZMAX_D 256

/* elements [e0, e0 + 8) and [e1, e1 + 8) as one vector: lanes 0-7, 8-15 */
ZMM INLINE __m512 load_pair(const void *base, int64_t e0, int64_t e1, int half) {
    if (half) {
        const uint16_t *b = (const uint16_t *)base;
        __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b + e0))),
                                            _mm_loadu_si128((const __m128i *)(b + e1)), 1);
        return _mm512_cvtph_ps(h);
    }
    const float *b = (const float *)base;
    __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(b + e0)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_loadu_ps(b + e1)), 1));
}

ZMM INLINE __m256 upper_half(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* scores of NH heads (queries q, D apart); qq: each query with every eight values written twice */
ZMM INLINE void scores_zmm(const int NH, const float *q, const float *qq, const void *base, const int64_t *offs, int n, int D,
                           float scale, float *out, int half) {
    __m256 vs = _mm256_set1_ps(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512 acc[ZH][4];
        for (int h = 0; h < NH; h++)
            for (int p = 0; p < 4; p++) acc[h][p] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            __m512 k[4];
            for (int p = 0; p < 4; p++) k[p] = load_pair(base, offs[i + 2 * p] + d, offs[i + 2 * p + 1] + d, half);
            for (int h = 0; h < NH; h++) {
                __m512 qd = _mm512_loadu_ps(qq + (size_t)h * 2 * D + 2 * d);
                for (int p = 0; p < 4; p++) acc[h][p] = _mm512_fmadd_ps(qd, k[p], acc[h][p]);
            }
        }
        for (int h = 0; h < NH; h++) {
            __m256 v[8];
            for (int p = 0; p < 4; p++) v[2 * p] = _mm512_castps512_ps256(acc[h][p]), v[2 * p + 1] = upper_half(acc[h][p]);
            _mm256_storeu_ps(out + (size_t)h * n + i, _mm256_mul_ps(hsum8x8(v), vs));
        }
    }
    for (; i < n; i++)
        for (int h = 0; h < NH; h++) out[(size_t)h * n + i] = score1(q + (size_t)h * D, base, offs[i], D, scale, half);
}

/* the weighted sums of NH heads over LANES * 16 of their values from d0 on */
ZMM INLINE void wsum_part(const int NH, const int LANES, float *o, const float *w, const void *base,
                          const int64_t *offs, int n, int D, int d0, int half) {
    __m512 acc[ZH][4];
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < LANES; u++) acc[h][u] = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        __m512 v[4];
        for (int u = 0; u < LANES; u++)
            v[u] = half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offs[i] + d0 + 16 * u)))
                        : _mm512_loadu_ps((const float *)base + offs[i] + d0 + 16 * u);
        for (int h = 0; h < NH; h++) {
            __m512 wi = _mm512_set1_ps(w[(size_t)h * n + i]);
            for (int u = 0; u < LANES; u++) acc[h][u] = _mm512_fmadd_ps(wi, v[u], acc[h][u]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < LANES; u++) _mm512_storeu_ps(o + (size_t)h * D + d0 + 16 * u, acc[h][u]);
}

/* the weighted sums of NH heads, 64 values of each at a time (D a multiple of 16) */
ZMM INLINE void wsum_zmm(const int NH, float *o, const float *w, const void *base, const int64_t *offs, int n, int D,
                         int half) {
    int d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) wsum_part(NH, 4, o, w, base, offs, n, D, d0, half);
    switch ((D - d0) / 16) {
    case 3: wsum_part(NH, 3, o, w, base, offs, n, D, d0, half); break;
    case 2: wsum_part(NH, 2, o, w, base, offs, n, D, d0, half); break;
    case 1: wsum_part(NH, 1, o, w, base, offs, n, D, d0, half); break;
    }
}

ZMM INLINE void heads_tile(const int NH, const Heads *a, int h0, int half) {
    float qq[ZH * 2 * ZMAX_D];
    int D = a->D, n = a->n;
    for (int h = 0; h < NH; h++)
        for (int d = 0; d < D; d += 8) {
            memcpy(qq + (size_t)h * 2 * D + 2 * d, a->q + (size_t)(h0 + h) * D + d, sizeof(float) * 8);
            memcpy(qq + (size_t)h * 2 * D + 2 * d + 8, a->q + (size_t)(h0 + h) * D + d, sizeof(float) * 8);
        }
    float *s = a->scores + (size_t)h0 * n;
    scores_zmm(NH, a->q + (size_t)h0 * D, qq, a->k, a->offs, n, D, a->scale, s, half);
    for (int h = 0; h < NH; h++) softmax_avx2(s + (size_t)h * n, n);
    wsum_zmm(NH, a->o + (size_t)h0 * D, s, a->v, a->offs, n, D, half);
}

ZMM static void heads_zmm(const Heads *a) {
    if (a->D % 16 || a->D > ZMAX_D) {
        heads_avx2(a);
        return;
    }
    for (int h0 = 0; h0 < a->nheads; h0 += ZH) {
        int nh = a->nheads - h0 < ZH ? a->nheads - h0 : ZH;
        /* the head count and the cache type as constants: the accumulators stay in registers */
        if (a->half) {
            switch (nh) {
            case 1: heads_tile(1, a, h0, 1); break;
            case 2: heads_tile(2, a, h0, 1); break;
            case 3: heads_tile(3, a, h0, 1); break;
            default: heads_tile(4, a, h0, 1); break;
            }
        } else {
            switch (nh) {
            case 1: heads_tile(1, a, h0, 0); break;
            case 2: heads_tile(2, a, h0, 0); break;
            case 3: heads_tile(3, a, h0, 0); break;
            default: heads_tile(4, a, h0, 0); break;
            }
        }
    }
}
#endif

/* the kernels of the ISA matmul.c chose (512-bit ones with the 16-row interleaved layouts) */
static struct {
    void (*heads)(const Heads *);
    void (*to_half)(uint16_t *, const float *, int);
    int level;
} ATT = {heads_scalar, to_half_scalar, -1};

static void choose_kernels(void) {
    if (ATT.level == kernels_level()) return;
    ATT.level = kernels_level();
    ATT.heads = heads_scalar;
    ATT.to_half = to_half_scalar;
#ifdef FULMINE_X86
    if (ATT.level >= ISA_AVX2) {
        ATT.heads = heads_avx2;
        ATT.to_half = to_half_avx2;
    }
    if (ATT.level == ISA_VNNI && interleave_group() == 16) ATT.heads = heads_zmm;
#endif
}

void kv_store(void *cache, int half, int64_t offset, const float *src, int n) {
    choose_kernels();
    if (half)
        ATT.to_half((uint16_t *)cache + offset, src, n);
    else
        memcpy((float *)cache + offset, src, sizeof(float) * n);
}

/* units of work: (KV head, token, share of its heads), the shares as few as keep every thread busy */
static int head_shares(const Attention *a) {
    int group = a->nh / a->nkv, units = a->T * a->nkv, want = 4 * pool_threads();
    int shares = 1;
    while (shares < group && units * shares < want) shares++;
    return shares;
}

static int attention_chunks(const Attention *a) { return pool_chunks((int64_t)a->T * a->nkv * head_shares(a)); }

static int max_context(const Attention *a) {
    int max_ctx = 0;
    for (int t = 0; t < a->T; t++) max_ctx = a->pos[t] + 1 > max_ctx ? a->pos[t] + 1 : max_ctx;
    return max_ctx;
}

/* per chunk: a score row per head of a KV head, and the positions' offsets (int64) */
static size_t chunk_floats(const Attention *a, int max_ctx) { return (size_t)max_ctx * (a->nh / a->nkv + 2); }

size_t attention_scratch(const Attention *a) { return (size_t)attention_chunks(a) * chunk_floats(a, max_context(a)); }

typedef struct {
    const Attention *a;
    float *scratch;
    int max_ctx, shares;
} AttnJob;

static void attention_task(void *ctx, int chunk, int nchunks) {
    const AttnJob *j = (const AttnJob *)ctx;
    const Attention *a = j->a;
    int D = a->D, group = a->nh / a->nkv, T = a->T, elem = a->half ? 2 : 4;
    float *scores = j->scratch + (size_t)chunk * chunk_floats(a, j->max_ctx);
    int64_t *offs = (int64_t *)(scores + (size_t)j->max_ctx * group);
    int64_t units = (int64_t)T * a->nkv * j->shares;
    int64_t first = units * chunk / nchunks, last = units * (chunk + 1) / nchunks;
    int offs_seq = -1, offs_lo = 0, offs_end = 0; /* offs holds positions [offs_lo, offs_end) of offs_seq */
    for (int64_t u = first; u < last; u++) {
        int share = (int)(u % j->shares), t = (int)(u / j->shares % T), g = (int)(u / j->shares / T);
        int p = a->pos[t], s = a->seq[t], lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
        if (s != offs_seq || lo != offs_lo || p >= offs_end) { /* the context's rows, for KV head 0 */
            int from = s == offs_seq && lo == offs_lo ? offs_end : lo; /* a prompt's next token: extend */
            const int32_t *table = a->tables + (size_t)s * a->max_blocks;
            int b = from / a->bs, r = from % a->bs; /* block and slot of position c, walked without dividing */
            for (int c = from; c <= p; c++) {
                offs[c - lo] = ((int64_t)table[b] * a->bs + r) * a->nkv * D;
                if (++r == a->bs) r = 0, b++;
            }
            offs_seq = s, offs_lo = lo, offs_end = p + 1;
        }
        int h0 = g * group + share * group / j->shares, h1 = g * group + (share + 1) * group / j->shares;
        Heads heads = {
            a->q + ((size_t)t * a->nh + h0) * D,
            a->out + ((size_t)t * a->nh + h0) * D,
            (const char *)a->k_cache + (size_t)g * D * elem,
            (const char *)a->v_cache + (size_t)g * D * elem,
            offs,
            p - lo + 1,
            D,
            h1 - h0,
            a->half,
            a->scale,
            scores,
        };
        ATT.heads(&heads);
    }
}

void attention(const Attention *a, float *scratch) {
    choose_kernels();
    AttnJob j = {a, scratch, max_context(a), head_shares(a)};
    pool_run(attention_task, &j, attention_chunks(a));
}
