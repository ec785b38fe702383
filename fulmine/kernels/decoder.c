/* The decoder for a few tokens in one call (decode rows, speculative verification, short chunks):
 * every layer's norms, products (matmul.c), RoPE, KV-cache writes and attention over the paged cache. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

static void wsum_scalar(float *o, const float *w, const float *base, const int64_t *offs, int n, int D);

#ifdef FULMINE_X86
AVX2 static float dot_avx2(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* eight vectors -> one vector of their eight horizontal sums (lane i: the sum of v[i]) */
AVX2 static inline __m256 hsum8x8(const __m256 v[8]) {
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
    for (; i < n; i++) {
        if (!half) {
            out[i] = dot_avx2(q, (const float *)base + offs[i], D) * scale;
            continue;
        }
        const uint16_t *k = (const uint16_t *)base + offs[i];
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * _cvtsh_ss(k[d]);
        out[i] = s * scale;
    }
}

/* the output row stays in registers (up to 64 floats at a time) across every position */
AVX2 INLINE void wsum_rows(float *o, const float *w, const void *base, const int64_t *offs, int n, int D, int half) {
    if (D % 8) {
        if (!half) {
            wsum_scalar(o, w, (const float *)base, offs, n, D);
            return;
        }
        memset(o, 0, sizeof(float) * D);
        for (int i = 0; i < n; i++)
            for (int d = 0; d < D; d++) o[d] += w[i] * _cvtsh_ss(((const uint16_t *)base)[offs[i] + d]);
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

AVX2 static void scores_avx2(const float *q, const float *base, const int64_t *offs, int n, int D, float scale, float *out) {
    scores_rows(q, base, offs, n, D, scale, out, 0);
}

AVX2 static void wsum_avx2(float *o, const float *w, const float *base, const int64_t *offs, int n, int D) {
    wsum_rows(o, w, base, offs, n, D, 0);
}

AVX2 static void scores_half_avx2(const float *q, const uint16_t *base, const int64_t *offs, int n, int D, float scale,
                                  float *out) {
    scores_rows(q, base, offs, n, D, scale, out, 1);
}

AVX2 static void wsum_half_avx2(float *o, const float *w, const uint16_t *base, const int64_t *offs, int n, int D) {
    wsum_rows(o, w, base, offs, n, D, 1);
}

/* float32 rows -> float16, rounded to nearest even (as PyTorch's .to(float16)) */
AVX2 static void to_half_avx2(uint16_t *dst, const float *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
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
#endif

static float dot_scalar(const float *a, const float *b, int n) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_scalar(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

/* Attention over gathered cache rows: out[i] = scale * q . base[offs[i] ..], and o = sum_i w[i] * base[offs[i] ..] */
static void scores_scalar(const float *q, const float *base, const int64_t *offs, int n, int D, float scale, float *out) {
    for (int i = 0; i < n; i++) out[i] = dot_scalar(q, base + offs[i], D) * scale;
}

static void wsum_scalar(float *o, const float *w, const float *base, const int64_t *offs, int n, int D) {
    memset(o, 0, sizeof(float) * D);
    for (int i = 0; i < n; i++) axpy_scalar(o, w[i], base + offs[i], D);
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

static void scores_half_scalar(const float *q, const uint16_t *base, const int64_t *offs, int n, int D, float scale,
                               float *out) {
    for (int i = 0; i < n; i++) {
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * fulmine_half_to_float(base[offs[i] + d]);
        out[i] = s * scale;
    }
}

static void wsum_half_scalar(float *o, const float *w, const uint16_t *base, const int64_t *offs, int n, int D) {
    memset(o, 0, sizeof(float) * D);
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) o[d] += w[i] * fulmine_half_to_float(base[offs[i] + d]);
}

static void softmax_scalar(float *s, int n) {
    float mx = -INFINITY, sum = 0.f;
    for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    for (int i = 0; i < n; i++) sum += s[i] = expf(s[i] - mx);
    for (int i = 0; i < n; i++) s[i] /= sum;
}

/* Block dequantizers of the types above (one block; float types: one value) */

/* the gated activation a = act(g) * u over n values: SiLU (Llama) or tanh GELU (Gemma 3) */
static float gelu_tanh(float x) { return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); }
static void glu_scalar(float *a, const float *g, const float *u, int n, int gelu) {
    for (int i = 0; i < n; i++) a[i] = (gelu ? gelu_tanh(g[i]) : g[i] / (1.f + expf(-g[i]))) * u[i];
}
#ifdef FULMINE_X86
/* with exp256 (quant.h), which takes x <= 0: sigmoid(x) from e^-|x|, tanh(z) = sign(z) (1 - e) / (1 + e)
 * with e = e^-2|z| */
AVX2 static void glu_avx2(float *a, const float *g, const float *u, int n, int gelu) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i), v;
        if (gelu) {
            __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
            __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign, z)));
            __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
            t = _mm256_or_ps(t, _mm256_and_ps(sign, z)); /* z's sign (t >= 0) */
            v = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
        } else {
            __m256 e = exp256(_mm256_or_ps(x, sign)); /* e^-|x| */
            __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
            __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
            v = _mm256_mul_ps(x, _mm256_blendv_ps(s, _mm256_mul_ps(e, s), negative));
        }
        _mm256_storeu_ps(a + i, _mm256_mul_ps(v, _mm256_loadu_ps(u + i)));
    }
    glu_scalar(a + i, g + i, u + i, n - i, gelu);
}
#endif

/* the attention's vector kernels, of the ISA matmul.c chose */
static struct {
    void (*scores)(const float *, const float *, const int64_t *, int, int, float, float *);
    void (*wsum)(float *, const float *, const float *, const int64_t *, int, int);
    void (*softmax)(float *, int);
    void (*scores_half)(const float *, const uint16_t *, const int64_t *, int, int, float, float *);
    void (*wsum_half)(float *, const float *, const uint16_t *, const int64_t *, int, int);
    void (*to_half)(uint16_t *, const float *, int);
    void (*glu)(float *, const float *, const float *, int, int);
    int level;
} ATT = {scores_scalar, wsum_scalar, softmax_scalar, scores_half_scalar, wsum_half_scalar, to_half_scalar, glu_scalar, -1};

static void choose_attention_kernels(void) {
    if (ATT.level == kernels_level()) return;
    ATT.level = kernels_level();
#ifdef FULMINE_X86
    if (ATT.level >= ISA_AVX2) {
        ATT.scores = scores_avx2;
        ATT.wsum = wsum_avx2;
        ATT.softmax = softmax_avx2;
        ATT.scores_half = scores_half_avx2;
        ATT.wsum_half = wsum_half_avx2;
        ATT.to_half = to_half_avx2;
        ATT.glu = glu_avx2;
    }
#endif
}

/* ---------------------------------------------------------------------------------------------
 * The decoder for a few tokens (decode rows, speculative verification, short prompts): the
 * Llama block (RMSNorm, GQA with RoPE, optional qkv bias, q/k norm and sliding window, SwiGLU)
 * over the paged KV cache, layer after layer in one call. Gemma 3's block is the same with two
 * more norms, on the attention's and the MLP's outputs before they join the residual stream
 * (L_ATTN_OUT_NORM, L_FFN_OUT_NORM; 0 for Llama-style layers), and GeGLU (tanh GELU) for SwiGLU.
 */
typedef struct {
    int T, H, nh, nkv, D, I, bs, max_blocks;
    float eps, scale;
    const int64_t *layer;
    const int32_t *pos, *seq, *tables;
    const float *q;   /* [T, nh * D] queries after RoPE */
    float *out;       /* [T, nh * D] */
    float *scores;    /* per thread: max_ctx floats */
    int max_ctx;
} AttnJob;

static void attention_task(void *ctx, int chunk, int nchunks) {
    AttnJob *j = (AttnJob *)ctx;
    const float *kc = (const float *)(intptr_t)j->layer[L_K_CACHE], *vc = (const float *)(intptr_t)j->layer[L_V_CACHE];
    int window = (int)j->layer[L_WINDOW], D = j->D, group = j->nh / j->nkv, half = (int)j->layer[L_KV_HALF];
    /* per chunk: a score row and the context's row offsets into the cache */
    float *scores = j->scores + (size_t)chunk * j->max_ctx * 3;
    int64_t *offs = (int64_t *)(scores + j->max_ctx);
    /* a contiguous range of (token, head) tasks: the heads sharing a KV head run one after another
     * on one thread, the second and later finding its keys and values in that core's cache */
    int ntasks = j->T * j->nh, first = (int)((int64_t)ntasks * chunk / nchunks);
    int last = (int)((int64_t)ntasks * (chunk + 1) / nchunks);
    for (int task = first; task < last; task++) {
        int t = task / j->nh, h = task % j->nh, g = h / group, p = j->pos[t];
        const int32_t *table = j->tables + (size_t)j->seq[t] * j->max_blocks;
        int lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, n = p - lo + 1;
        if (task == first || h % group == 0) { /* the previous task had the same token and KV head otherwise */
            int b = lo / j->bs, r = lo % j->bs; /* block and slot of position c, walked without dividing */
            for (int c = lo; c <= p; c++) {
                offs[c - lo] = (((int64_t)table[b] * j->bs + r) * j->nkv + g) * D;
                if (++r == j->bs) r = 0, b++;
            }
        }
        const float *q = j->q + ((size_t)t * j->nh + h) * D;
        float *o = j->out + ((size_t)t * j->nh + h) * D;
        if (half) {
            ATT.scores_half(q, (const uint16_t *)kc, offs, n, D, j->scale, scores);
            ATT.softmax(scores, n);
            ATT.wsum_half(o, scores, (const uint16_t *)vc, offs, n, D);
        } else {
            ATT.scores(q, kc, offs, n, D, j->scale, scores);
            ATT.softmax(scores, n);
            ATT.wsum(o, scores, vc, offs, n, D);
        }
    }
}

static void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* rows of x normalized in place by w (nothing when w is NULL) */
static void norm_rows(float *x, const float *w, int T, int H, float eps, float *tmp) {
    for (int t = 0; w && t < T; t++) {
        memcpy(tmp, x + (size_t)t * H, sizeof(float) * H);
        rms_norm(tmp, w, x + (size_t)t * H, H, eps);
    }
}

/* the MLP's gated activation for rows [T * chunk / nchunks, ...) */
typedef struct {
    float *act;
    const float *gu;
    int T, I, gelu;
} GluJob;

static void glu_task(void *ctx, int chunk, int nchunks) {
    GluJob *j = (GluJob *)ctx;
    for (int t = j->T * chunk / nchunks; t < j->T * (chunk + 1) / nchunks; t++) {
        const float *g = j->gu + (size_t)t * 2 * j->I;
        ATT.glu(j->act + (size_t)t * j->I, g, g + j->I, j->I, j->gelu);
    }
}

static void rope(float *x, const float *cos, const float *sin, int D) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

static Mat layer_mat(const int64_t *l, int ptr, int type, int64_t N, int64_t K) {
    return mat1((const uint8_t *)(intptr_t)l[ptr], (int)l[type], N, K);
}

/* a merged matrix from its parts' (pointer, type) fields, consecutive in the layer table */
static Mat layer_parts(const int64_t *l, int first, int nparts, const int64_t *rows, int64_t K) {
    Mat m = {nparts, {NULL}, {0}, {0}, 0, K};
    for (int p = 0; p < nparts; p++) {
        m.data[p] = (const uint8_t *)(intptr_t)l[first + 2 * p];
        m.type[p] = (int)l[first + 2 * p + 1];
        m.N += rows[p];
        m.end[p] = m.N;
    }
    return m;
}

/* h: [T, H] embeddings in, final normed hidden states out. Returns 0, or -1 on allocation failure. */
int decoder_forward(float *h, int T, int L, const int64_t *layers, const float *final_norm, const int32_t *pos,
                           const int32_t *seq, const int32_t *tables, int max_blocks, const int *dims, float eps,
                           float scale, int exact) {
    choose_attention_kernels();
    int H = dims[0], nh = dims[1], nkv = dims[2], D = dims[3], I = dims[4], bs = dims[5], gelu = dims[6];
    int qkv_n = (nh + 2 * nkv) * D, max_ctx = 0;
    const int64_t qkv_rows[3] = {(int64_t)nh * D, (int64_t)nkv * D, (int64_t)nkv * D}, gate_up_rows[2] = {I, I};
    for (int t = 0; t < T; t++) max_ctx = pos[t] + 1 > max_ctx ? pos[t] + 1 : max_ctx;
    int kmax = H > I ? H : I;
    if (nh * D > kmax) kmax = nh * D;
    size_t n_x = (size_t)T * H, n_qkv = (size_t)T * qkv_n, n_att = (size_t)T * nh * D, n_gu = (size_t)T * 2 * I;
    int n_chunks_att = pool_chunks((int64_t)T * nh);
    size_t n_act = (size_t)T * I, n_scores = (size_t)n_chunks_att * max_ctx * 3; /* scores + int64 offsets */
    float *buf = malloc(sizeof(float) * (n_x + n_qkv + n_att + n_gu + n_act + n_scores + (size_t)T * kmax));
    Scratch sc;
    if (!buf || scratch_alloc(&sc, T, kmax)) {
        free(buf);
        return -1;
    }
    float *xn = buf, *qkv = xn + n_x, *att = qkv + n_qkv, *gu = att + n_att, *act = gu + n_gu;
    float *scores = act + n_act, *tmp = scores + n_scores;
    for (int l = 0; l < L; l++) {
        const int64_t *ly = layers + (size_t)l * L_FIELDS;
        const float *qkv_bias = (const float *)(intptr_t)ly[L_QKV_BIAS];
        const float *q_norm = (const float *)(intptr_t)ly[L_Q_NORM], *k_norm = (const float *)(intptr_t)ly[L_K_NORM];
        const float *o_bias = (const float *)(intptr_t)ly[L_O_BIAS];
        const float *cos = (const float *)(intptr_t)ly[L_COS], *sin = (const float *)(intptr_t)ly[L_SIN];
        float *kc = (float *)(intptr_t)ly[L_K_CACHE], *vc = (float *)(intptr_t)ly[L_V_CACHE];
        for (int t = 0; t < T; t++) rms_norm(h + (size_t)t * H, (const float *)(intptr_t)ly[L_IN_NORM], xn + (size_t)t * H, H, eps);
        matmul(xn, T, layer_parts(ly, L_Q, 3, qkv_rows, H), qkv, qkv_n, &sc, exact);
        for (int t = 0; t < T; t++) {
            float *row = qkv + (size_t)t * qkv_n;
            if (qkv_bias)
                for (int i = 0; i < qkv_n; i++) row[i] += qkv_bias[i];
            for (int hd = 0; hd < nh + nkv; hd++) {
                float *v = row + (size_t)hd * D;
                const float *nw = hd < nh ? q_norm : k_norm;
                if (nw) {
                    memcpy(tmp, v, sizeof(float) * D);
                    rms_norm(tmp, nw, v, D, eps);
                }
                rope(v, cos + (size_t)pos[t] * (D / 2), sin + (size_t)pos[t] * (D / 2), D);
            }
            const int32_t *table = tables + (size_t)seq[t] * max_blocks;
            int64_t slot = (int64_t)table[pos[t] / bs] * bs + pos[t] % bs;
            if (ly[L_KV_HALF]) { /* the cache holds float16: each value written rounded, as PyTorch rounds */
                ATT.to_half((uint16_t *)kc + slot * nkv * D, row + (size_t)nh * D, nkv * D);
                ATT.to_half((uint16_t *)vc + slot * nkv * D, row + (size_t)(nh + nkv) * D, nkv * D);
            } else {
                memcpy(kc + slot * nkv * D, row + (size_t)nh * D, sizeof(float) * nkv * D);
                memcpy(vc + slot * nkv * D, row + (size_t)(nh + nkv) * D, sizeof(float) * nkv * D);
            }
        }
        for (int t = 0; t < T; t++) memcpy(att + (size_t)t * nh * D, qkv + (size_t)t * qkv_n, sizeof(float) * nh * D);
        /* queries are copied out so the attention job reads them densely; the output goes to tmp rows */
        AttnJob aj = {T, H, nh, nkv, D, I, bs, max_blocks, eps, scale, ly, pos, seq, tables, att, qkv, scores, max_ctx};
        /* qkv is free now: reuse it for the attention output ([T, nh*D] fits in [T, qkv_n]) */
        pool_run(attention_task, &aj, n_chunks_att);
        matmul(qkv, T, layer_mat(ly, L_O, L_O_TYPE, H, (int64_t)nh * D), xn, H, &sc, exact);
        if (o_bias)
            for (size_t i = 0; i < n_x; i++) xn[i] += o_bias[i % H];
        norm_rows(xn, (const float *)(intptr_t)ly[L_ATTN_OUT_NORM], T, H, eps, tmp);
        for (size_t i = 0; i < n_x; i++) h[i] += xn[i];
        for (int t = 0; t < T; t++)
            rms_norm(h + (size_t)t * H, (const float *)(intptr_t)ly[L_POST_NORM], xn + (size_t)t * H, H, eps);
        matmul(xn, T, layer_parts(ly, L_GATE, 2, gate_up_rows, H), gu, 2 * I, &sc, exact);
        GluJob gj = {act, gu, T, I, gelu};
        pool_run(glu_task, &gj, T < pool_threads() ? T : pool_threads());
        matmul(act, T, layer_mat(ly, L_DOWN, L_DOWN_TYPE, H, I), xn, H, &sc, exact);
        norm_rows(xn, (const float *)(intptr_t)ly[L_FFN_OUT_NORM], T, H, eps, tmp);
        for (size_t i = 0; i < n_x; i++) h[i] += xn[i];
    }
    for (int t = 0; t < T; t++) {
        memcpy(tmp, h + (size_t)t * H, sizeof(float) * H);
        rms_norm(tmp, final_norm, h + (size_t)t * H, H, eps);
    }
    free(buf);
    free(sc.xsum);
    return 0;
}
