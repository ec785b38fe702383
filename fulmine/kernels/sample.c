/* fulmine's CPU sampler: logit bias, repetition/presence/frequency penalties, temperature, top-k,
 * top-p and min-p over a batch of logit rows (modified in place), one token per row; part of the
 * _cpu extension (its Python binding is py_sample, listed in _cpu.c's methods).
 *
 * No sort of the vocabulary. Per row: a max pass; for top-k, a bucketed count of how far each logit
 * lies below the max, then a sort of the one bucket where the k-th largest falls; one exp pass
 * (AVX2 when the CPU has it) that also sums the mass; for top-p, the same bucketing by mass; a final
 * walk in token-id order draws by inverse CDF. The kept set and its probabilities are the PyTorch
 * path's (fulmine/sampling/sampler.py): top-k on the logits, top-p on the top-k distribution, min-p
 * relative to the most likely token, renormalized; ties at a cut are all kept.
 *
 * With a draft token per row, the same pass verifies it (speculative decoding): accepted when the
 * row's draw is the draft, which is accepting it with its probability under that distribution and
 * else drawing from the rest, renormalized (see sample_row).
 *
 * The uniform numbers of each row come from a 64-bit key, hashed by splitmix64: for a seeded
 * request the key is a function of its seed and the index of the token it draws (Python computes
 * it), so its tokens never depend on the batch, on a rerun of a failed step, or on a preemption.
 */
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SAMPLE_X86 1
#endif

#define NUM_BUCKETS 512
#define BUCKETS_PER_UNIT 8.0f /* bucket width: 1/8 of a (temperature-scaled) logit */

typedef struct {
    float x;
    int32_t id;
} Cand;

static uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static int by_value_desc(const void *a, const void *b) {
    const Cand *p = a, *q = b;
    if (p->x != q->x) return p->x > q->x ? -1 : 1;
    return p->id - q->id;
}

static int bucket_of(float below_max) { /* below_max >= 0: how far under the max, in scaled units */
    float b = below_max * BUCKETS_PER_UNIT;
    return b < (float)(NUM_BUCKETS - 1) ? (int)b : NUM_BUCKETS - 1;
}

/* e[i] = exp((x[i] - m) * inv_t) where x[i] >= lo, else 0; returns the sum */
static double exp_pass_scalar(const float *x, int V, float m, float inv_t, float lo, float *e) {
    double z = 0.0;
    for (int i = 0; i < V; i++) {
        float v = x[i] >= lo ? expf((x[i] - m) * inv_t) : 0.0f;
        e[i] = v;
        z += v;
    }
    return z;
}

#ifdef SAMPLE_X86
#define SAMPLE_AVX2 AVX2 /* quant.h: avx2, fma, f16c */


SAMPLE_AVX2 static double exp_pass_avx2(const float *x, int V, float m, float inv_t, float lo, float *e) {
    __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t), vlo = _mm256_set1_ps(lo);
    __m256d z0 = _mm256_setzero_pd(), z1 = _mm256_setzero_pd();
    int i = 0;
    for (; i + 8 <= V; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        __m256 v = _mm256_and_ps(exp256(_mm256_mul_ps(_mm256_sub_ps(xv, vm), vt)), _mm256_cmp_ps(xv, vlo, _CMP_GE_OQ));
        _mm256_storeu_ps(e + i, v);
        z0 = _mm256_add_pd(z0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        z1 = _mm256_add_pd(z1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(z0, z1));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + exp_pass_scalar(x + i, V - i, m, inv_t, lo, e + i);
}

SAMPLE_AVX2 static float max_avx2(const float *x, int V) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= V; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i)); /* NaN lanes are skipped */
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, vm);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < V; i++) m = x[i] > m ? x[i] : m;
    return m;
}
#endif

static int use_avx2 = -1;

static float row_max(const float *x, int V) {
#ifdef SAMPLE_X86
    if (use_avx2) return max_avx2(x, V);
#endif
    float m = -INFINITY;
    for (int i = 0; i < V; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static double exp_pass(const float *x, int V, float m, float inv_t, float lo, float *e) {
#ifdef SAMPLE_X86
    if (use_avx2) return exp_pass_avx2(x, V, m, inv_t, lo, e);
#endif
    return exp_pass_scalar(x, V, m, inv_t, lo, e);
}

/* The k-th largest logit (k < V): count logits per bucket below the max, sort the one bucket where
 * the k-th falls. */
static float kth_largest(const float *x, int V, int k, float m, Cand *cand) {
    int count[NUM_BUCKETS] = {0};
    for (int i = 0; i < V; i++)
        if (x[i] == x[i]) count[bucket_of(m - x[i])]++;
    int b = 0, before = 0;
    while (b < NUM_BUCKETS - 1 && before + count[b] < k) before += count[b++];
    int n = 0;
    for (int i = 0; i < V; i++)
        if (x[i] == x[i] && bucket_of(m - x[i]) == b) cand[n++] = (Cand){x[i], i};
    if (n == 0) return -INFINITY; /* fewer than k comparable logits: keep them all */
    qsort(cand, n, sizeof(Cand), by_value_desc);
    int j = k - before - 1;
    return cand[j < n ? j : n - 1].x;
}

/* The smallest logit top-p keeps: tokens by probability, most likely first, while the mass before
 * them is below p * z (so the token that crosses p stays). */
static float top_p_floor(const float *x, const float *e, int V, float m, float inv_t, double target, Cand *cand) {
    double mass[NUM_BUCKETS] = {0};
    for (int i = 0; i < V; i++)
        if (e[i] > 0.0f) mass[bucket_of((m - x[i]) * inv_t)] += e[i];
    int b = 0;
    double before = 0.0;
    while (b < NUM_BUCKETS - 1 && before + mass[b] < target) before += mass[b++];
    int n = 0;
    for (int i = 0; i < V; i++)
        if (e[i] > 0.0f && bucket_of((m - x[i]) * inv_t) == b) cand[n++] = (Cand){x[i], i};
    if (n == 0) return -INFINITY;
    qsort(cand, n, sizeof(Cand), by_value_desc);
    int j = 0; /* the bucket's first token is kept: the mass before it is below the target */
    do before += e[cand[j++].id];
    while (j < n && before < target);
    return cand[j - 1].x;
}

/* What is added to a row's logits before the draw, PyTorch's order: a grammar's token mask (a row
 * with mask_row[r] >= 0 keeps only the tokens whose bit is set in masks[mask_row[r]], one bit per token
 * in words of 32; the others get -inf), logit bias, then the repetition
 * penalty over prompt and output tokens (x / rep if x > 0, else x * rep) and the frequency and
 * presence penalties over output tokens (x -= freq * count + pres). Rows are ranges of flat arrays;
 * a NULL pointer: nothing of that kind in the batch. */
typedef struct {
    const int32_t *bias_off, *bias_ids; /* row r's biases: [bias_off[r], bias_off[r + 1]) */
    const float *bias_vals;
    const int32_t *hist_off, *hist_ids, *out_start; /* row r: prompt then output ids; output from out_start[r] */
    const float *rep, *pres, *freq;
    const int32_t *mask_row; /* per row: its mask, or -1 */
    const uint32_t *masks;
    int mask_words;
} Adjust;

static void mask_row(float *x, int V, const uint32_t *bits, int words) {
    for (int w = 0; w * 32 < V; w++) {
        uint32_t b = w < words ? bits[w] : 0u;
        if (b == 0xffffffffu) continue;
        for (int i = 0, v = w * 32; i < 32 && v < V; i++, v++)
            if (!((b >> i) & 1u)) x[v] = -INFINITY;
    }
}

static void adjust_row(float *x, int V, const Adjust *a, int r, uint32_t *stamp, uint32_t *count) {
    if (a->mask_row && a->mask_row[r] >= 0)
        mask_row(x, V, a->masks + (size_t)a->mask_row[r] * a->mask_words, a->mask_words);
    if (a->bias_off)
        for (int i = a->bias_off[r]; i < a->bias_off[r + 1]; i++)
            if (a->bias_ids[i] >= 0 && a->bias_ids[i] < V) x[a->bias_ids[i]] += a->bias_vals[i];
    if (!a->hist_off) return;
    float rep = a->rep[r], pres = a->pres[r], freq = a->freq[r];
    if (rep == 1.0f && pres == 0.0f && freq == 0.0f) return;
    uint32_t counted = 2u * (uint32_t)r + 1u, applied = counted + 1u; /* stamps, unique to this row */
    const int32_t *ids = a->hist_ids;
    int h0 = a->hist_off[r], h1 = a->hist_off[r + 1], o0 = h0 + a->out_start[r];
    for (int i = o0; i < h1; i++) {
        int t = ids[i];
        if (t < 0 || t >= V) continue;
        if (stamp[t] != counted) stamp[t] = counted, count[t] = 0;
        count[t]++;
    }
    for (int i = h0; i < h1; i++) { /* each distinct token once */
        int t = ids[i];
        if (t < 0 || t >= V || stamp[t] == applied) continue;
        uint32_t c = stamp[t] == counted ? count[t] : 0;
        float v = x[t];
        if (!(v > -INFINITY)) continue; /* masked out (or NaN): stays out, whatever the penalty */
        if (rep != 1.0f) v = v > 0.0f ? v / rep : v * rep;
        if (c) v -= freq * (float)c + pres;
        x[t] = v > FLT_MAX ? FLT_MAX : v < -FLT_MAX ? -FLT_MAX : v; /* a tiny rep must not make inf */
        stamp[t] = applied;
    }
}

static double unit_of(uint64_t key) { return (double)(splitmix64(key) >> 11) * 0x1.0p-53; } /* [0, 1) */

/* One row: the token drawn; with a draft (>= 0), speculative verification: the draft is accepted
 * (*accepted = 1) when the row's own draw is the draft. For a proposer that proposes one token (n-gram
 * lookup, a draft model's greedy choice, a grammar's forced token) this is the rejection sampler
 * itself: accepted with probability p(draft), otherwise a draw from p without the draft. And the
 * draw is the one the row makes without a draft, so a seeded request's tokens do not depend on
 * whether it was drafted for. Greedy rows accept a draft equal to their argmax. */
static int64_t first_max(const float *x, int V, float m) {
    for (int i = 0; i < V; i++)
        if (x[i] == m) return i;
    return 0;
}

static int64_t sample_row(const float *x, int V, float t, int top_k, float top_p, float min_p, uint64_t key,
                          int64_t draft, float *e, Cand *cand, uint8_t *accepted) {
    float m = row_max(x, V);
    *accepted = 0;
    /* greedy; or nothing finite, or an infinite logit, which outweighs every other: the first maximal */
    if (t <= 0.0f || !(m > -INFINITY) || !(m < INFINITY)) {
        int64_t best = first_max(x, V, m);
        *accepted = best == draft;
        return best;
    }
    /* -inf logits (a grammar's mask) never enter the draw, however the exp pass rounds them */
    float inv_t = 1.0f / t, lo = -FLT_MAX;
    if (top_k > 0 && top_k < V) {
        float kth = kth_largest(x, V, top_k, m, cand);
        lo = kth > lo ? kth : lo;
    }
    double z = exp_pass(x, V, m, inv_t, lo, e);
    if (!(z > 0.0 && z < INFINITY)) { /* NaN logits, or a temperature so small that exp overflows */
        int64_t best = first_max(x, V, m);
        *accepted = best == draft;
        return best;
    }
    float floor = lo;
    if (top_p < 1.0f) {
        /* a relative 1e-6 of slack: mass that reaches top_p up to float rounding has reached it */
        float p_floor = top_p_floor(x, e, V, m, inv_t, (double)top_p * z * (1.0 - 1e-6), cand);
        floor = p_floor > floor ? p_floor : floor;
    }
    if (min_p > 0.0f) { /* p_i < min_p * p_max  <=>  x_i < m + t * ln(min_p) */
        float m_floor = m + t * logf(min_p);
        floor = m_floor > floor ? m_floor : floor;
    }
    if (floor > lo) { /* the kept set shrank: its mass */
        z = 0.0;
        for (int i = 0; i < V; i++)
            if (x[i] >= floor) z += e[i];
    }
    double target = unit_of(key) * z, acc = 0.0;
    int64_t last = -1, token = -1;
    for (int i = 0; i < V && token < 0; i++) {
        if (x[i] >= floor && e[i] > 0.0f) {
            acc += e[i];
            last = i;
            if (acc > target) token = i;
        }
    }
    if (token < 0) token = last >= 0 ? last : first_max(x, V, m); /* rounding left the target just past the sum */
    *accepted = token == draft;
    return token;
}

#define PTR(v) ((void *)(uintptr_t)(v))

PyObject *py_sample(PyObject *self, PyObject *args) {
    unsigned long long logits, temperature, top_k, top_p, min_p, keys, drafts, out, accepted;
    unsigned long long bias_off = 0, bias_ids = 0, bias_vals = 0, hist_off = 0, hist_ids = 0, out_start = 0;
    unsigned long long rep = 0, pres = 0, freq = 0, mask_rows = 0, masks = 0;
    int R, V, mask_words = 0;
    if (!PyArg_ParseTuple(args, "KiiKKKKKKKK|KKKKKKKKKKKi", &logits, &R, &V, &temperature, &top_k, &top_p, &min_p,
                          &keys, &drafts, &out, &accepted, &bias_off, &bias_ids, &bias_vals, &hist_off, &hist_ids,
                          &out_start, &rep, &pres, &freq, &mask_rows, &masks, &mask_words))
        return NULL;
    Adjust adj = {PTR(bias_off), PTR(bias_ids), PTR(bias_vals), PTR(hist_off), PTR(hist_ids), PTR(out_start),
                  PTR(rep), PTR(pres), PTR(freq), PTR(mask_rows), PTR(masks), mask_words};
    if (mask_rows && (masks == 0 || mask_words < 0)) return PyErr_Format(PyExc_ValueError, "mask rows without masks");
    if (R < 0 || V < 1) return PyErr_Format(PyExc_ValueError, "bad shape [%d, %d]", R, V);
#ifdef SAMPLE_X86
    if (use_avx2 < 0) {
        __builtin_cpu_init();
        use_avx2 = getenv("FULMINE_KERNELS_SCALAR") == NULL && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
#else
    use_avx2 = 0;
#endif
    float *e = malloc((size_t)V * sizeof(float));
    Cand *cand = malloc((size_t)V * sizeof(Cand));
    uint32_t *stamp = adj.hist_off ? calloc((size_t)V * 2, sizeof(uint32_t)) : NULL; /* then the counts */
    if (e == NULL || cand == NULL || (adj.hist_off && stamp == NULL)) {
        free(e);
        free(cand);
        free(stamp);
        return PyErr_NoMemory();
    }
    float *x = PTR(logits);
    const float *t = PTR(temperature), *p = PTR(top_p), *mp = PTR(min_p);
    const int32_t *k = PTR(top_k);
    const uint64_t *key = PTR(keys);
    const int64_t *draft = PTR(drafts);
    int64_t *token = PTR(out);
    uint8_t *ok = PTR(accepted);
    Py_BEGIN_ALLOW_THREADS;
    for (int r = 0; r < R; r++) {
        adjust_row(x + (size_t)r * V, V, &adj, r, stamp, stamp + V);
        token[r] = sample_row(x + (size_t)r * V, V, t[r], k[r], p[r], mp[r], key[r], draft[r], e, cand, ok + r);
    }
    Py_END_ALLOW_THREADS;
    free(e);
    free(cand);
    free(stamp);
    Py_RETURN_NONE;
}
