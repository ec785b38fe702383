/* The table of weight types, the ISA chosen at import, and y = x @ W^T split over output rows;
 * dequantization to float32 or bfloat16 for the GEMM path (fulmine/layers/quantized.py). */
#include <stdlib.h>
#include <string.h>

#include "cpu.h"


/* float32 -> bfloat16, rounding to nearest even (torch's rounding) */
static void to_bf16_scalar(const float *x, uint16_t *out, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, 4);
        out[k] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    }
}

#ifdef FULMINE_X86
AVX2 static void to_bf16_avx2(const float *x, uint16_t *out, int64_t n) {
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m256i a = _mm256_castps_si256(_mm256_loadu_ps(x + k)), b = _mm256_castps_si256(_mm256_loadu_ps(x + k + 8));
        a = _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(a, 16), one))), 16);
        b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(b, 16), one))), 16);
        /* packus works per 128-bit lane: put the halves back in order */
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
        _mm256_storeu_si256((__m256i *)(out + k), packed);
    }
    to_bf16_scalar(x + k, out + k, n - k);
}
#endif

/* The table of weight types the kernels read: block size, bytes, dequantizer, row kernels per ISA
 * and numerics mode; blocks32.c's and kquants.c's entries, joined at import. */
#define MAX_TYPES 24
static QType TYPES[MAX_TYPES];
static int NUM_TYPES = 0;

const QType *qtype(int type) {
    for (int i = 0; i < NUM_TYPES; i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

size_t row_bytes(int type, int64_t K) {
    const QType *t = qtype(type);
    return t ? (size_t)(K / t->block) * (size_t)t->bytes : 0;
}

static struct {
    int level; /* ISA_SCALAR, ISA_AVX2 or ISA_VNNI: the row kernels used (forceable, for the tests) */
    int group; /* rows per group of the interleaved layouts: 16 where the 512-bit kernels run */
    void (*quantize_row)(const float *, int64_t, int8_t *, float *, float *);
    void (*quantize_row_k)(const float *, int64_t, int8_t *, float *, int16_t *);
    void (*to_bf16)(const float *, uint16_t *, int64_t);
    const char *isa;
} K_ = {ISA_SCALAR, 8, quantize_row_scalar, quantize_row_k_scalar, to_bf16_scalar, "scalar"};

void kernels_init(void) {
    for (int i = 0; i < NUM_BASE_TYPES; i++) TYPES[NUM_TYPES++] = BASE_TYPES[i];
    for (int i = 0; i < NUM_KQUANT_TYPES && NUM_TYPES < MAX_TYPES; i++) TYPES[NUM_TYPES++] = KQUANT_TYPES[i];
    for (int i = 0; i < NUM_INTERLEAVED_TYPES && NUM_TYPES < MAX_TYPES; i++) TYPES[NUM_TYPES++] = INTERLEAVED_TYPES[i];
    for (int i = 0; i < NUM_INTERLEAVED_K_TYPES && NUM_TYPES < MAX_TYPES; i++) TYPES[NUM_TYPES++] = INTERLEAVED_K_TYPES[i];
#ifdef FULMINE_X86
    __builtin_cpu_init();
    if (getenv("FULMINE_KERNELS_SCALAR") == NULL && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        K_.level = ISA_AVX2;
        K_.quantize_row = quantize_row_avx2;
        K_.quantize_row_k = quantize_row_k_avx2;
        K_.to_bf16 = to_bf16_avx2;
        K_.isa = "avx2";
        if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
            getenv("FULMINE_KERNELS_AVX2") == NULL) {
            K_.level = ISA_VNNI;
            K_.isa = "avx2+avx512vnni";
            if (__builtin_cpu_supports("avx512bw")) K_.group = 16;
        }
    }
#endif
}

/* the best kernel of the chosen ISA level or below (NULL: the type has no kernel of that mode) */
static qrow_fn qrow_kernel(int type) {
    const QType *t = qtype(type);
    for (int level = K_.level; t && level >= 0; level--)
        if (t->fast[level]) return t->fast[level];
    return NULL;
}

static row_fn row_kernel(int type) {
    const QType *t = qtype(type);
    for (int level = K_.level; t && level >= 0; level--)
        if (t->exact[level]) return t->exact[level];
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * y[R, N] = x[R, K] @ W[N, K]^T, split over output rows.
 */
Mat mat1(const uint8_t *data, int type, int64_t N, int64_t K) {
    Mat m = {1, {data}, {type}, {N}, N, K};
    return m;
}

typedef struct {
    const float *x;
    int R;
    Mat w;
    float *y;
    int64_t ldy;
    const float *xsum;
    const QAct *qa; /* fast mode: quantized activations; NULL: exact */
} MatmulJob;

#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 4
#endif

static void matmul_task(void *ctx, int chunk, int nchunks) {
    MatmulJob *j = (MatmulJob *)ctx;
    int64_t N = j->w.N, K = j->w.K;
    int64_t per = ((N + nchunks - 1) / nchunks + 15) / 16 * 16; /* whole groups of interleaved rows */
    int64_t n0 = per * chunk, n1 = n0 + per < N ? n0 + per : N;
    int64_t nb = K / 32;
    float out[MAX_RG * 16];
    for (int p = 0, start = 0; p < j->w.nparts; start = (int)j->w.end[p], p++) {
        int64_t lo = n0 > start ? n0 : start, hi = n1 < j->w.end[p] ? n1 : j->w.end[p];
        if (lo >= hi) continue;
        size_t rb = row_bytes(j->w.type[p], K);
        row_fn fn = row_kernel(j->w.type[p]);
        qrow_fn qfn = qrow_kernel(j->w.type[p]);
        int step = qtype(j->w.type[p])->rows > 1 ? qtype(j->w.type[p])->rows : 1; /* rows a kernel call covers */
        const uint8_t *base = j->w.data[p] - (size_t)start * rb, *end = base + (size_t)hi * rb;
        for (int64_t n = lo; n < hi; n += step) {
            const uint8_t *row = base + (size_t)n * rb;
            /* weights stream from memory once per token: ask for the rows PREFETCH_ROWS ahead now, so
             * their lines arrive while this row is computed (the hardware prefetcher alone left the
             * decode at a quarter of the memory bandwidth) */
            for (const uint8_t *ahead = row + PREFETCH_ROWS * rb, *stop = ahead + rb; step == 1 && ahead < stop && ahead < end; ahead += 64)
                __builtin_prefetch(ahead, 0, 3);
            for (int r0 = 0; r0 < j->R; r0 += MAX_RG) {
                int rg = j->R - r0 < MAX_RG ? j->R - r0 : MAX_RG;
                if (j->qa) {
                    const QAct *qa = j->qa;
                    QAct a = {qa->qx + (size_t)r0 * K, qa->dx + (size_t)r0 * nb, qa->xsum + (size_t)r0 * nb,
                              qa->kq + (size_t)r0 * K, qa->kd + (size_t)r0 * (K / 256), qa->ksum + (size_t)r0 * (K / 16)};
                    qfn(row, &a, rg, K, out);
                } else {
                    fn(row, j->x + (size_t)r0 * K, rg, K, j->xsum ? j->xsum + (size_t)r0 * nb : NULL, out);
                }
                for (int r = 0; r < rg; r++)
                    for (int i = 0; i < step; i++) j->y[(size_t)(r0 + r) * j->ldy + n + i] = out[r * step + i];
            }
        }
    }
}

int scratch_alloc(Scratch *s, size_t R, size_t K) {
    size_t nb = K / 32 + 1, nk = K / 256 + 1, ng = K / 16 + 1;
    s->xsum = malloc(sizeof(float) * R * (2 * nb + nk) + sizeof(int16_t) * R * ng + 2 * R * K + 64);
    if (!s->xsum) return -1;
    s->dx = s->xsum + R * nb;
    s->kd = s->dx + R * nb;
    s->ksum = (int16_t *)(s->kd + R * nk);
    s->qx = (int8_t *)(s->ksum + R * ng);
    s->kq = s->qx + R * K;
    return 0;
}

void matmul(const float *x, int R, Mat w, float *y, int64_t ldy, const Scratch *s, int exact) {
    int64_t nb = w.K / 32;
    float *xsum = s->xsum;
    int fast = !exact, needs_xsum = 0, per32 = 0, per256 = 0;
    for (int p = 0; p < w.nparts; p++) fast = fast || qtype(w.type[p])->rows > 1; /* interleaved: int8 kernels only */
    for (int p = 0; p < w.nparts; p++) {
        fast = fast && qrow_kernel(w.type[p]) != NULL; /* every part has an int8 kernel */
        needs_xsum = needs_xsum || qtype(w.type[p])->exact_needs_xsum;
        per256 = per256 || qtype(w.type[p])->act256;
        per32 = per32 || !qtype(w.type[p])->act256;
    }
    if (fast) {
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * w.K;
            if (per32) K_.quantize_row(xr, w.K, s->qx + (size_t)r * w.K, s->dx + r * nb, xsum + r * nb);
            if (per256) K_.quantize_row_k(xr, w.K, s->kq + (size_t)r * w.K, s->kd + r * (w.K / 256), s->ksum + r * (w.K / 16));
        }
        QAct qa = {s->qx, s->dx, xsum, s->kq, s->kd, s->ksum};
        MatmulJob job = {x, R, w, y, ldy, xsum, &qa};
        pool_run(matmul_task, &job, pool_chunks(w.N / 16));
        return;
    }
    if (needs_xsum) {
        for (int r = 0; r < R; r++)
            for (int64_t b = 0; b < nb; b++) {
                const float *xb = x + (size_t)r * w.K + b * 32;
                float s = 0.f;
                for (int i = 0; i < 32; i++) s += xb[i];
                xsum[r * nb + b] = s;
            }
    }
    MatmulJob job = {x, R, w, y, ldy, xsum, NULL};
    pool_run(matmul_task, &job, pool_chunks(w.N / 16));
}

/* ---------------------------------------------------------------------------------------------
 * Dequantization: W[N, K] -> float32, split over rows.
 */
void dequant_row(const uint8_t *base, int type, int64_t n, int64_t K, float *out) {
    const QType *t = qtype(type);
    size_t rb = row_bytes(type, K);
    if (type == T_F32) {
        memcpy(out, base + (size_t)n * rb, (size_t)K * 4);
        return;
    }
    if (t->rows > 1) { /* interleaved: the lane of row n in its group's blocks, unpacked to base blocks */
        const QType *b = qtype(t->base);
        const int G = t->rows;
        const uint8_t *group = base + (size_t)(n / G) * G * rb;
        uint8_t blk[256]; /* the largest block (Q6_K: 210 bytes) */
        for (int64_t i = 0; i < K / t->block; i++) {
            interleaved_unpack(type, group + (size_t)i * G * t->bytes, (int)(n % G), blk);
            b->dequant(blk, out + i * t->block);
        }
        return;
    }
    const uint8_t *w = base + (size_t)n * rb;
    for (int64_t b = 0; b < K / t->block; b++) t->dequant(w + b * t->bytes, out + b * t->block);
}

typedef struct {
    Mat w;
    void *out;
    int bf16; /* out is bfloat16 (round to nearest even) instead of float32 */
} DequantJob;

static void dequant_task(void *ctx, int chunk, int nchunks) {
    DequantJob *j = (DequantJob *)ctx;
    int64_t K = j->w.K, per = (j->w.N + nchunks - 1) / nchunks, n0 = per * chunk;
    int64_t n1 = n0 + per < j->w.N ? n0 + per : j->w.N;
    float *row = j->bf16 ? malloc(sizeof(float) * K) : NULL;
    for (int64_t n = n0; n < n1; n++) {
        if (!j->bf16) {
            dequant_row(j->w.data[0], j->w.type[0], n, K, (float *)j->out + n * K);
            continue;
        }
        dequant_row(j->w.data[0], j->w.type[0], n, K, row);
        K_.to_bf16(row, (uint16_t *)j->out + n * K, K);
    }
    free(row);
}


void dequantize(Mat w, void *out, int bf16) {
    DequantJob job = {w, out, bf16};
    pool_run(dequant_task, &job, pool_chunks(w.N / 16));
}

int kernels_level(void) { return K_.level; }
const char *kernels_isa(void) { return K_.isa; }
int num_types(void) { return NUM_TYPES; }
const QType *type_at(int i) { return &TYPES[i]; }
int has_fast_kernel(int type) { return qrow_kernel(type) != NULL; }
int interleave_group(void) { return K_.group; }
