/* The decoder in one call per step (decode rows, speculative verification, prompt chunks): every
 * layer's norms, products (matmul.c), RoPE, KV-cache writes and attention (attention.c), MLP or
 * mixture of experts. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

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

/* the gated activation of the ISA matmul.c chose */
static void (*glu)(float *, const float *, const float *, int, int) = glu_scalar;

static void choose_glu(void) {
    glu = glu_scalar;
#ifdef FULMINE_X86
    if (kernels_level() >= ISA_AVX2) glu = glu_avx2;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * The decoder for the tokens of a step (decode rows, speculative verification, prompt chunks): the
 * Llama block (RMSNorm, GQA with RoPE, optional qkv bias, q/k norm and sliding window, SwiGLU)
 * over the paged KV cache, layer after layer in one call. Gemma 3's block is the same with two
 * more norms, on the attention's and the MLP's outputs before they join the residual stream
 * (L_ATTN_OUT_NORM, L_FFN_OUT_NORM; 0 for Llama-style layers), and GeGLU (tanh GELU) for SwiGLU.
 */
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
        glu(j->act + (size_t)t * j->I, g, g + j->I, j->I, j->gelu);
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

/* A mixture of experts' buffers and shape: routes per token, then the tokens of each expert */
typedef struct {
    int E, k, norm, I, H, gelu, exact;
    float *logits;  /* [T, E] the router's, then its softmax */
    int *ids;       /* [T, k] each token's experts, best first */
    float *weights; /* [T, k] and their weights */
    int *tokens;    /* [T] the tokens of one expert */
    float *xe, *gu, *act, *ye; /* [T, H], [T, 2I], [T, I], [T, H]: one expert's rows */
} Moe;

/* softmax over each token's router logits, its k best experts (ties: the lower id) and their weights,
 * renormalized to sum to 1 when m->norm */
static void moe_route(Moe *m, int T) {
    for (int t = 0; t < T; t++) {
        float *p = m->logits + (size_t)t * m->E, top = p[0], sum = 0.f;
        for (int e = 1; e < m->E; e++) top = p[e] > top ? p[e] : top;
        for (int e = 0; e < m->E; e++) sum += p[e] = expf(p[e] - top);
        for (int e = 0; e < m->E; e++) p[e] /= sum;
        int *ids = m->ids + (size_t)t * m->k;
        float *w = m->weights + (size_t)t * m->k, chosen = 0.f;
        for (int j = 0; j < m->k; j++) {
            int best = -1;
            for (int e = 0; e < m->E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ids[i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ids[j] = best, w[j] = p[best], chosen += p[best];
        }
        for (int j = 0; m->norm && j < m->k; j++) w[j] /= chosen;
    }
}

/* out[T, H] = the experts' weighted sum over xn[T, H]: expert by expert in ascending id, each over the
 * tokens that chose it (its rows read once), so every token adds its experts' outputs in one order */
static void moe_forward(Moe *m, const int64_t *ly, const float *xn, float *out, int T, const Scratch *sc) {
    int H = m->H, I = m->I;
    Mat router = layer_mat(ly, L_ROUTER, L_ROUTER_TYPE, m->E, H);
    matmul(xn, T, router, m->logits, m->E, sc, 1); /* float32 activations: the scores pick the experts */
    moe_route(m, T);
    memset(out, 0, sizeof(float) * (size_t)T * H);
    const uint8_t *gate_up = (const uint8_t *)(intptr_t)ly[L_GATE], *down = (const uint8_t *)(intptr_t)ly[L_DOWN];
    for (int e = 0; e < m->E; e++) {
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < m->k; j++)
                if (m->ids[(size_t)t * m->k + j] == e) {
                    m->tokens[n] = t * m->k + j; /* token and slot */
                    memcpy(m->xe + (size_t)n++ * H, xn + (size_t)t * H, sizeof(float) * H);
                }
        if (!n) continue;
        Mat gu = mat1(gate_up + (size_t)e * ly[L_GATE_UP_STRIDE], (int)ly[L_GATE_TYPE], 2 * (int64_t)I, H);
        matmul(m->xe, n, gu, m->gu, 2 * I, sc, m->exact);
        GluJob gj = {m->act, m->gu, n, I, m->gelu};
        pool_run(glu_task, &gj, n < pool_threads() ? n : pool_threads());
        Mat dn = mat1(down + (size_t)e * ly[L_DOWN_STRIDE], (int)ly[L_DOWN_TYPE], H, I);
        matmul(m->act, n, dn, m->ye, H, sc, m->exact);
        for (int i = 0; i < n; i++) {
            int t = m->tokens[i] / m->k;
            float w = m->weights[m->tokens[i]], *o = out + (size_t)t * H, *y = m->ye + (size_t)i * H;
            for (int c = 0; c < H; c++) o[c] += w * y[c];
        }
    }
}

/* h: [T, H] embeddings in, final normed hidden states out. Returns 0, or -1 on allocation failure. */
int decoder_forward(float *h, int T, int L, const int64_t *layers, const float *final_norm, const int32_t *pos,
                           const int32_t *seq, const int32_t *tables, int max_blocks, const int *dims, float eps,
                           float scale, int exact) {
    choose_glu();
    int H = dims[0], nh = dims[1], nkv = dims[2], D = dims[3], I = dims[4], bs = dims[5], gelu = dims[6];
    int E = dims[7], Ie = dims[10];
    int qkv_n = (nh + 2 * nkv) * D;
    const int64_t qkv_rows[3] = {(int64_t)nh * D, (int64_t)nkv * D, (int64_t)nkv * D}, gate_up_rows[2] = {I, I};
    int kmax = H > I ? H : I;
    if (nh * D > kmax) kmax = nh * D;
    if (E && Ie > kmax) kmax = Ie;
    int Imax = E && Ie > I ? Ie : I;
    /* every layer's attention: the same shape and cache type, its own cache, window and queries */
    Attention at = {T, nh, nkv, D, bs, max_blocks, 0, (int)layers[L_KV_HALF], scale, NULL, NULL, pos, seq, tables, NULL, NULL};
    size_t n_x = (size_t)T * H, n_qkv = (size_t)T * qkv_n, n_att = (size_t)T * nh * D, n_gu = (size_t)T * 2 * Imax;
    size_t n_act = (size_t)T * Imax, n_scores = attention_scratch(&at);
    /* a mixture of experts': router logits, weights, and one expert's rows (its input, output, the sum) */
    size_t n_moe = E ? (size_t)T * E + (size_t)T * dims[8] + 3 * n_x : 0;
    float *buf = malloc(sizeof(float) * (n_x + n_qkv + n_att + n_gu + n_act + n_scores + (size_t)T * kmax + n_moe));
    int *ibuf = E ? malloc(sizeof(int) * ((size_t)T * dims[8] + T)) : NULL;
    Scratch sc;
    if (!buf || (E && !ibuf) || scratch_alloc(&sc, T, kmax)) {
        free(buf);
        free(ibuf);
        return -1;
    }
    float *xn = buf, *qkv = xn + n_x, *att = qkv + n_qkv, *gu = att + n_att, *act = gu + n_gu;
    float *scores = act + n_act, *tmp = scores + n_scores, *moe_buf = tmp + (size_t)T * kmax;
    Moe moe = {E, dims[8], dims[9], Ie, H, gelu, exact, moe_buf, ibuf, NULL, NULL, NULL, gu, act, NULL};
    if (E) {
        moe.weights = moe_buf + (size_t)T * E, moe.xe = moe.weights + (size_t)T * dims[8];
        moe.ye = moe.xe + n_x, moe.tokens = ibuf + (size_t)T * dims[8];
    }
    float *moe_out = E ? moe.ye + n_x : NULL;
    for (int l = 0; l < L; l++) {
        const int64_t *ly = layers + (size_t)l * L_FIELDS;
        const float *qkv_bias = (const float *)(intptr_t)ly[L_QKV_BIAS];
        const float *q_norm = (const float *)(intptr_t)ly[L_Q_NORM], *k_norm = (const float *)(intptr_t)ly[L_K_NORM];
        const float *o_bias = (const float *)(intptr_t)ly[L_O_BIAS];
        int qk_whole = (int)ly[L_QK_NORM_WHOLE];
        const float *cos = (const float *)(intptr_t)ly[L_COS], *sin = (const float *)(intptr_t)ly[L_SIN];
        void *kc = (void *)(intptr_t)ly[L_K_CACHE], *vc = (void *)(intptr_t)ly[L_V_CACHE];
        for (int t = 0; t < T; t++) rms_norm(h + (size_t)t * H, (const float *)(intptr_t)ly[L_IN_NORM], xn + (size_t)t * H, H, eps);
        matmul(xn, T, layer_parts(ly, L_Q, 3, qkv_rows, H), qkv, qkv_n, &sc, exact);
        for (int t = 0; t < T; t++) {
            float *row = qkv + (size_t)t * qkv_n;
            if (qkv_bias)
                for (int i = 0; i < qkv_n; i++) row[i] += qkv_bias[i];
            if (qk_whole && q_norm && k_norm) { /* OLMoE: over all of q's heads, all of k's */
                memcpy(tmp, row, sizeof(float) * nh * D);
                rms_norm(tmp, q_norm, row, nh * D, eps);
                memcpy(tmp, row + (size_t)nh * D, sizeof(float) * nkv * D);
                rms_norm(tmp, k_norm, row + (size_t)nh * D, nkv * D, eps);
            }
            for (int hd = 0; hd < nh + nkv; hd++) {
                float *v = row + (size_t)hd * D;
                const float *nw = qk_whole ? NULL : hd < nh ? q_norm : k_norm;
                if (nw) {
                    memcpy(tmp, v, sizeof(float) * D);
                    rms_norm(tmp, nw, v, D, eps);
                }
                rope(v, cos + (size_t)pos[t] * (D / 2), sin + (size_t)pos[t] * (D / 2), D);
            }
            const int32_t *table = tables + (size_t)seq[t] * max_blocks;
            int64_t slot = (int64_t)table[pos[t] / bs] * bs + pos[t] % bs;
            kv_store(kc, at.half, slot * nkv * D, row + (size_t)nh * D, nkv * D);
            kv_store(vc, at.half, slot * nkv * D, row + (size_t)(nh + nkv) * D, nkv * D);
        }
        for (int t = 0; t < T; t++) memcpy(att + (size_t)t * nh * D, qkv + (size_t)t * qkv_n, sizeof(float) * nh * D);
        /* queries are copied out so the attention reads them densely; the output goes to qkv, free now
         * ([T, nh*D] fits in [T, qkv_n]) */
        at.k_cache = kc, at.v_cache = vc, at.window = (int)ly[L_WINDOW], at.q = att, at.out = qkv;
        attention(&at, scores);
        matmul(qkv, T, layer_mat(ly, L_O, L_O_TYPE, H, (int64_t)nh * D), xn, H, &sc, exact);
        if (o_bias)
            for (size_t i = 0; i < n_x; i++) xn[i] += o_bias[i % H];
        norm_rows(xn, (const float *)(intptr_t)ly[L_ATTN_OUT_NORM], T, H, eps, tmp);
        for (size_t i = 0; i < n_x; i++) h[i] += xn[i];
        for (int t = 0; t < T; t++)
            rms_norm(h + (size_t)t * H, (const float *)(intptr_t)ly[L_PRE_MLP_NORM], xn + (size_t)t * H, H, eps);
        if (ly[L_ROUTER]) {
            moe_forward(&moe, ly, xn, moe_out, T, &sc);
            memcpy(xn, moe_out, sizeof(float) * n_x);
        } else {
            matmul(xn, T, layer_parts(ly, L_GATE, 2, gate_up_rows, H), gu, 2 * I, &sc, exact);
            GluJob gj = {act, gu, T, I, gelu};
            pool_run(glu_task, &gj, T < pool_threads() ? T : pool_threads());
            matmul(act, T, layer_mat(ly, L_DOWN, L_DOWN_TYPE, H, I), xn, H, &sc, exact);
        }
        norm_rows(xn, (const float *)(intptr_t)ly[L_FFN_OUT_NORM], T, H, eps, tmp);
        for (size_t i = 0; i < n_x; i++) h[i] += xn[i];
    }
    for (int t = 0; t < T; t++) {
        memcpy(tmp, h + (size_t)t * H, sizeof(float) * H);
        rms_norm(tmp, final_norm, h + (size_t)t * H, H, eps);
    }
    free(buf);
    free(ibuf);
    free(sc.xsum);
    return 0;
}
