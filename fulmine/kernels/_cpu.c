/* fulmine's CPU kernels: matrix products on weights kept in their checkpoint's block format
 * (GGUF Q8_0, Q4_0, Q4_1; float16; float32), and the whole decoder for a few tokens in one call.
 *
 * Plain C with no torch dependency, so it builds with the package (setup.py) on any compiler and
 * works with any torch: Python hands in raw pointers (tensor.data_ptr()). AVX2/FMA/F16C paths are
 * chosen at import when the CPU has them (function-level target attributes: the module itself is
 * built for the baseline ISA), a portable scalar path otherwise. Work is split over a small pool of
 * spinning pthreads (the caller is thread 0); the GIL is released while kernels run.
 *
 * Numerics, two modes. Exact: float32 activations times the dequantized weight, d * sum(q * x) +
 * m * sum(x) per block (Q4_1; Q4_0 is m = -8 d), equal to a dequantized reference up to float
 * rounding. Fast (the default, what llama.cpp does): each 32-value block of an activation row is
 * quantized to int8 with its own scale, and blocks multiply as integers (AVX2 maddubs, or AVX-512
 * VNNI dpbusd), about 3x fewer instructions per weight. Both modes equal (to rounding) a float32
 * product of the dequantized weight with the activations as given (exact) or as quantized (fast),
 * which is how larger batches compute it (fulmine/layers/quantized.py). Float16 and float32 weights
 * always multiply in float32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

#ifdef FULMINE_X86
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

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

/* ---------------------------------------------------------------------------------------------
 * Thread pool. A job is split into chunks that threads claim one at a time; the claim counter
 * carries the job's generation, so a worker that wakes late cannot take a chunk of a newer job,
 * and the caller (which works too) waits only for chunks that were claimed. A worker that the OS
 * has not scheduled (another process, torch's own spinning threads) costs parallelism, never a
 * stall. Idle workers spin briefly, then sleep on a condition variable.
 */
#define MAX_THREADS 64
#define SPIN_ITERS 4096 /* ~50-100 us: long enough between the phases of one call, short enough not to
                         * steal a core from torch's own threads between calls */

typedef void (*task_fn)(void *ctx, int chunk, int nchunks);

static struct {
    int nth;
    pthread_t threads[MAX_THREADS];
    task_fn fn;
    void *ctx;
    int nchunks;
    _Atomic uint64_t claim; /* generation << 32 | next chunk */
    atomic_int done;
    atomic_uint gen;
    atomic_int sleepers;
    atomic_int stop;
    unsigned start_gen; /* the generation workers start from: read before they exist */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {.nth = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void run_chunks(unsigned g, task_fn fn, void *ctx, int n) {
    for (;;) {
        uint64_t v = atomic_load(&pool.claim);
        if ((unsigned)(v >> 32) != g || (int)(uint32_t)v >= n) return;
        if (!atomic_compare_exchange_weak(&pool.claim, &v, v + 1)) continue;
        fn(ctx, (int)(uint32_t)v, n);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    unsigned seen = pool.start_gen;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load(&pool.gen)) == seen) {
            if (++spins < SPIN_ITERS) {
                CPU_RELAX();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mu);
            break;
        }
        seen = g;
        if (atomic_load(&pool.stop)) return NULL;
        /* fn, ctx and nchunks belong to generation g if a claim for g succeeds (see run_chunks) */
        run_chunks(g, pool.fn, pool.ctx, pool.nchunks);
    }
}

static void pool_stop(void) {
    if (pool.nth <= 1) return;
    atomic_store(&pool.stop, 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; i < pool.nth; i++) pthread_join(pool.threads[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.nth = 1;
}

static int pool_start(int nth) {
    if (nth < 1) nth = 1;
    if (nth > MAX_THREADS) nth = MAX_THREADS;
    if (nth == pool.nth) return 0;
    pool_stop();
    pool.start_gen = atomic_load(&pool.gen);
    for (int i = 1; i < nth; i++) {
        if (pthread_create(&pool.threads[i], NULL, worker_main, NULL) != 0) {
            pool.nth = i;
            pool_stop();
            return -1;
        }
        pool.nth = i + 1;
    }
    return 0;
}

/* Runs fn(ctx, chunk, nchunks) for every chunk in [0, nchunks) across the pool; returns when all are done. */
static void pool_run(task_fn fn, void *ctx, int nchunks) {
    if (pool.nth == 1 || nchunks == 1) {
        for (int c = 0; c < nchunks; c++) fn(ctx, c, nchunks);
        return;
    }
    unsigned g = atomic_load(&pool.gen) + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nchunks = nchunks;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.claim, (uint64_t)g << 32);
    atomic_store(&pool.gen, g);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_chunks(g, fn, ctx, nchunks);
    while (atomic_load(&pool.done) < nchunks) CPU_RELAX();
}

/* chunks per job: a few per thread, so a slow thread's share is picked up by the others */
static int pool_chunks(int64_t work) {
    int64_t n = (int64_t)pool.nth * 4;
    return (int)(work < n ? (work > 0 ? work : 1) : n);
}

/* ---------------------------------------------------------------------------------------------
 * Row kernels (row_fn, qrow_fn: quant.h) of the float types and Q8_0 / Q4_0 / Q4_1.
 */

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
static void quantize_row_scalar(const float *x, int64_t K, int8_t *q, float *dx, float *xsum) {
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

static void wsum_scalar(float *o, const float *w, const float *base, const int64_t *offs, int n, int D);

/* float32 -> bfloat16, rounding to nearest even (torch's rounding) */
static void to_bf16_scalar(const float *x, uint16_t *out, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, 4);
        out[k] = (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
    }
}

#ifdef FULMINE_X86
/* Each kernel is written for a compile-time row count RG (1..4) and inlined (SWITCH_RG, quant.h),
 * so the per-row accumulators live in registers. */
#define ROW_WRAPPER(name, FN, ...)                                                                         \
    AVX2 static void name(const uint8_t *w, const float *x, int R, int64_t K, const float *xsum, float *out) { \
        SWITCH_RG(R, FN, w, x, K, xsum, out, ##__VA_ARGS__)                                               \
    }

AVX2 static inline __attribute__((always_inline)) void row_f32_avx2_rg(const int RG, const uint8_t *w8, const float *x,
                                                                       int64_t K, const float *xsum, float *out) {
    (void)xsum;
    const float *w = (const float *)w8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv = _mm256_loadu_ps(w + k);
        for (int r = 0; r < RG; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[r]);
    }
    for (int r = 0; r < RG; r++) {
        float s = hsum256(acc[r]);
        for (int64_t t = k; t < K; t++) s += w[t] * x[r * K + t];
        out[r] = s;
    }
}
ROW_WRAPPER(row_f32_avx2, row_f32_avx2_rg)

AVX2 static inline __attribute__((always_inline)) void row_f16_avx2_rg(const int RG, const uint8_t *w8, const float *x,
                                                                       int64_t K, const float *xsum, float *out) {
    (void)xsum;
    const uint16_t *w = (const uint16_t *)w8;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + k)));
        for (int r = 0; r < RG; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[r]);
    }
    for (int r = 0; r < RG; r++) {
        float s = hsum256(acc[r]);
        for (int64_t t = k; t < K; t++) s += _cvtsh_ss(w[t]) * x[r * K + t];
        out[r] = s;
    }
}
ROW_WRAPPER(row_f16_avx2, row_f16_avx2_rg)

AVX2 static inline __attribute__((always_inline)) void row_q8_0_avx2_rg(const int RG, const uint8_t *w, const float *x,
                                                                        int64_t K, const float *xsum, float *out) {
    (void)xsum;
    int64_t nb = K / 32;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
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
            const float *xb = x + r * K + b * 32;
            __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), t);
            t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), t);
            t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), t);
            acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
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
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float macc[4] = {0.f, 0.f, 0.f, 0.f};
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
            const float *xb = x + r * K + b * 32;
            __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
            t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), t);
            t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), t);
            t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), t);
            acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
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
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        float macc[4] = {0.f, 0.f, 0.f, 0.f};                                                                \
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
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
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

AVX2 static void quantize_row_avx2(const float *x, int64_t K, int8_t *q, float *dx, float *xsum) {
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

AVX2 static float dot_avx2(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX2 static void scores_avx2(const float *q, const float *base, const int64_t *offs, int n, int D, float scale, float *out) {
    if (D % 16) {
        for (int i = 0; i < n; i++) out[i] = dot_avx2(q, base + offs[i], D) * scale;
        return;
    }
    for (int i = 0; i < n; i++) {
        const float *k = base + offs[i];
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(k + d + 8), a1);
        }
        out[i] = hsum256(_mm256_add_ps(a0, a1)) * scale;
    }
}

/* the output row stays in registers (up to 64 floats at a time) across every position */
AVX2 static void wsum_avx2(float *o, const float *w, const float *base, const int64_t *offs, int n, int D) {
    if (D % 8) {
        wsum_scalar(o, w, base, offs, n, D);
        return;
    }
    for (int d0 = 0; d0 < D; d0 += 64) {
        int lanes = (D - d0 < 64 ? D - d0 : 64) / 8;
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (int i = 0; i < n; i++) {
            const float *v = base + offs[i] + d0;
            __m256 wi = _mm256_set1_ps(w[i]);
            for (int u = 0; u < lanes; u++) acc[u] = _mm256_fmadd_ps(wi, _mm256_loadu_ps(v + 8 * u), acc[u]);
        }
        for (int u = 0; u < lanes; u++) _mm256_storeu_ps(o + d0 + 8 * u, acc[u]);
    }
}

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

/* Block dequantizers of the types above (one block; float types: one value) */
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

/* The table of weight types the kernels read: block size, bytes, dequantizer, row kernels per ISA
 * and numerics mode. kquants.c adds the 5-bit and K-quant types at import. */
#define MAX_TYPES 16
static QType TYPES[MAX_TYPES] = {
    {T_F32, "F32", 1, 4, deq_f32, ISAS(row_f32_scalar, row_f32_avx2, NULL), {NULL, NULL, NULL}, 0, 0},
    {T_F16, "F16", 1, 2, deq_f16, ISAS(row_f16_scalar, row_f16_avx2, NULL), {NULL, NULL, NULL}, 0, 0},
    {T_Q8_0, "Q8_0", 32, 34, deq_q8_0, ISAS(row_q8_0_scalar, row_q8_0_avx2, NULL),
     ISAS(qrow_q8_0_scalar, qrow_q8_0_avx2, qrow_q8_0_vnni), 0, 0},
    {T_Q4_0, "Q4_0", 32, 18, deq_q4_0, ISAS(row_q4_0_scalar, row_q4_0_avx2, NULL),
     ISAS(qrow_q4_0_scalar, qrow_q4_0_avx2, qrow_q4_0_vnni), 1, 0},
    {T_Q4_1, "Q4_1", 32, 20, deq_q4_1, ISAS(row_q4_1_scalar, row_q4_1_avx2, NULL),
     ISAS(qrow_q4_1_scalar, qrow_q4_1_avx2, qrow_q4_1_vnni), 1, 0},
};
static int NUM_TYPES = 5;

static const QType *qtype(int type) {
    for (int i = 0; i < NUM_TYPES; i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

static size_t row_bytes(int type, int64_t K) {
    const QType *t = qtype(type);
    return t ? (size_t)(K / t->block) * (size_t)t->bytes : 0;
}

static struct {
    int level; /* ISA_SCALAR, ISA_AVX2 or ISA_VNNI: the row kernels used (forceable, for the tests) */
    void (*quantize_row)(const float *, int64_t, int8_t *, float *, float *);
    void (*quantize_row_k)(const float *, int64_t, int8_t *, float *, int16_t *);
    void (*scores)(const float *, const float *, const int64_t *, int, int, float, float *);
    void (*wsum)(float *, const float *, const float *, const int64_t *, int, int);
    void (*to_bf16)(const float *, uint16_t *, int64_t);
    const char *isa;
} K_ = {ISA_SCALAR, quantize_row_scalar, quantize_row_k_scalar, scores_scalar, wsum_scalar, to_bf16_scalar, "scalar"};

static void choose_isa(void) {
    for (int i = 0; i < NUM_KQUANT_TYPES && NUM_TYPES < MAX_TYPES; i++) TYPES[NUM_TYPES++] = KQUANT_TYPES[i];
#ifdef FULMINE_X86
    __builtin_cpu_init();
    if (getenv("FULMINE_KERNELS_SCALAR") == NULL && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        K_.level = ISA_AVX2;
        K_.quantize_row = quantize_row_avx2;
        K_.quantize_row_k = quantize_row_k_avx2;
        K_.scores = scores_avx2;
        K_.wsum = wsum_avx2;
        K_.to_bf16 = to_bf16_avx2;
        K_.isa = "avx2";
        if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
            getenv("FULMINE_KERNELS_AVX2") == NULL) {
            K_.level = ISA_VNNI;
            K_.isa = "avx2+avx512vnni";
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
/* A weight matrix W[N, K]: up to MAX_PARTS row ranges, each in its own type (a merged q/k/v whose v is
 * Q6_K while q and k are Q4_K, as Q4_K_M files have it): part p holds rows [end[p - 1], end[p]). */
#define MAX_PARTS 3
typedef struct {
    int nparts;
    const uint8_t *data[MAX_PARTS];
    int type[MAX_PARTS];
    int64_t end[MAX_PARTS];
    int64_t N, K;
} Mat;

static Mat mat1(const uint8_t *data, int type, int64_t N, int64_t K) {
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
    int64_t per = (N + nchunks - 1) / nchunks;
    int64_t n0 = per * chunk, n1 = n0 + per < N ? n0 + per : N;
    int64_t nb = K / 32;
    float out[4];
    for (int p = 0, start = 0; p < j->w.nparts; start = (int)j->w.end[p], p++) {
        int64_t lo = n0 > start ? n0 : start, hi = n1 < j->w.end[p] ? n1 : j->w.end[p];
        if (lo >= hi) continue;
        size_t rb = row_bytes(j->w.type[p], K);
        row_fn fn = row_kernel(j->w.type[p]);
        qrow_fn qfn = qrow_kernel(j->w.type[p]);
        const uint8_t *base = j->w.data[p] - (size_t)start * rb, *end = base + (size_t)hi * rb;
        for (int64_t n = lo; n < hi; n++) {
            const uint8_t *row = base + (size_t)n * rb;
            /* weights stream from memory once per token: ask for the rows PREFETCH_ROWS ahead now, so
             * their lines arrive while this row is computed (the hardware prefetcher alone left the
             * decode at a quarter of the memory bandwidth) */
            for (const uint8_t *ahead = row + PREFETCH_ROWS * rb, *stop = ahead + rb; ahead < stop && ahead < end; ahead += 64)
                __builtin_prefetch(ahead, 0, 3);
            for (int r0 = 0; r0 < j->R; r0 += 4) {
                int rg = j->R - r0 < 4 ? j->R - r0 : 4;
                if (j->qa) {
                    const QAct *qa = j->qa;
                    QAct a = {qa->qx + (size_t)r0 * K, qa->dx + (size_t)r0 * nb, qa->xsum + (size_t)r0 * nb,
                              qa->kq + (size_t)r0 * K, qa->kd + (size_t)r0 * (K / 256), qa->ksum + (size_t)r0 * (K / 16)};
                    qfn(row, &a, rg, K, out);
                } else {
                    fn(row, j->x + (size_t)r0 * K, rg, K, j->xsum ? j->xsum + (size_t)r0 * nb : NULL, out);
                }
                for (int r = 0; r < rg; r++) j->y[(size_t)(r0 + r) * j->ldy + n] = out[r];
            }
        }
    }
}

/* Scratch for one product's activations in both formats (QAct): per 32, R * K / 32 floats each for
 * xsum and dx and R * K int8; per 256, R * K / 256 floats, R * K / 16 int16 and R * K int8. */
typedef struct {
    float *xsum, *dx, *kd;
    int8_t *qx, *kq;
    int16_t *ksum;
} Scratch;

static int scratch_alloc(Scratch *s, size_t R, size_t K) {
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

static void matmul(const float *x, int R, Mat w, float *y, int64_t ldy, const Scratch *s, int exact) {
    int64_t nb = w.K / 32;
    float *xsum = s->xsum;
    int fast = !exact, needs_xsum = 0, per32 = 0, per256 = 0;
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
static void dequant_row(const uint8_t *w, int type, int64_t K, float *out) {
    const QType *t = qtype(type);
    if (type == T_F32) {
        memcpy(out, w, (size_t)K * 4);
        return;
    }
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
    size_t rb = row_bytes(j->w.type[0], K);
    float *row = j->bf16 ? malloc(sizeof(float) * K) : NULL;
    for (int64_t n = n0; n < n1; n++) {
        if (!j->bf16) {
            dequant_row(j->w.data[0] + (size_t)n * rb, j->w.type[0], K, (float *)j->out + n * K);
            continue;
        }
        dequant_row(j->w.data[0] + (size_t)n * rb, j->w.type[0], K, row);
        K_.to_bf16(row, (uint16_t *)j->out + n * K, K);
    }
    free(row);
}

/* ---------------------------------------------------------------------------------------------
 * The decoder for a few tokens (decode rows, speculative verification, short prompts): the
 * Llama block (RMSNorm, GQA with RoPE, optional qkv bias, q/k norm and sliding window, SwiGLU)
 * over the paged KV cache, layer after layer in one call. Gemma 3's block is the same with two
 * more norms, on the attention's and the MLP's outputs before they join the residual stream
 * (L_ATTN_OUT_NORM, L_FFN_OUT_NORM; 0 for Llama-style layers), and GeGLU (tanh GELU) for SwiGLU.
 */
enum {
    L_IN_NORM, L_Q, L_Q_TYPE, L_K, L_K_TYPE, L_V, L_V_TYPE, L_QKV_BIAS, L_Q_NORM, L_K_NORM, L_O, L_O_TYPE, L_O_BIAS,
    L_POST_NORM, L_GATE, L_GATE_TYPE, L_UP, L_UP_TYPE, L_DOWN, L_DOWN_TYPE, L_K_CACHE, L_V_CACHE, L_WINDOW, L_COS,
    L_SIN, L_ATTN_OUT_NORM, L_FFN_OUT_NORM, L_FIELDS
};

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
    int window = (int)j->layer[L_WINDOW], D = j->D, group = j->nh / j->nkv;
    /* per chunk: a score row and the context's row offsets into the cache */
    float *scores = j->scores + (size_t)chunk * j->max_ctx * 3;
    int64_t *offs = (int64_t *)(scores + j->max_ctx);
    for (int task = chunk; task < j->T * j->nh; task += nchunks) {
        int t = task / j->nh, h = task % j->nh, g = h / group, p = j->pos[t];
        const int32_t *table = j->tables + (size_t)j->seq[t] * j->max_blocks;
        int lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, n = p - lo + 1;
        for (int c = lo; c <= p; c++)
            offs[c - lo] = (((int64_t)table[c / j->bs] * j->bs + c % j->bs) * j->nkv + g) * D;
        K_.scores(j->q + ((size_t)t * j->nh + h) * D, kc, offs, n, D, j->scale, scores);
        float mx = -INFINITY, sum = 0.f;
        for (int i = 0; i < n; i++) mx = scores[i] > mx ? scores[i] : mx;
        for (int i = 0; i < n; i++) sum += scores[i] = expf(scores[i] - mx);
        for (int i = 0; i < n; i++) scores[i] /= sum;
        K_.wsum(j->out + ((size_t)t * j->nh + h) * D, scores, vc, offs, n, D);
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

static float gelu_tanh(float x) { return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); }

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
static int decoder_forward(float *h, int T, int L, const int64_t *layers, const float *final_norm, const int32_t *pos,
                           const int32_t *seq, const int32_t *tables, int max_blocks, const int *dims, float eps,
                           float scale, int exact) {
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
            memcpy(kc + slot * nkv * D, row + (size_t)nh * D, sizeof(float) * nkv * D);
            memcpy(vc + slot * nkv * D, row + (size_t)(nh + nkv) * D, sizeof(float) * nkv * D);
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
        for (int t = 0; t < T; t++) {
            const float *g = gu + (size_t)t * 2 * I, *u = g + I;
            float *a = act + (size_t)t * I;
            if (gelu)
                for (int i = 0; i < I; i++) a[i] = gelu_tanh(g[i]) * u[i];
            else
                for (int i = 0; i < I; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
        }
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

/* ---------------------------------------------------------------------------------------------
 * Python bindings. Pointers arrive as integers (tensor.data_ptr()); shapes are checked by the
 * Python wrapper (fulmine/kernels/cpu.py), which is the only caller.
 */
#define PTR(v) ((void *)(uintptr_t)(v))

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    int R, type, exact;
    long long K, N, ldy = -1;
    if (!PyArg_ParseTuple(args, "KiLKiLKp|L", &x, &R, &K, &w, &type, &N, &y, &exact, &ldy)) return NULL;
    if (ldy < 0) ldy = N;
    const QType *qt = qtype(type);
    if (!qt || K % qt->block || (qt->block > 1 && K % 32))
        return PyErr_Format(PyExc_ValueError, "bad weight type %d / K %lld", type, K);
    Scratch sc;
    if (scratch_alloc(&sc, R < 64 ? R : 64, K)) return PyErr_NoMemory();
    Mat m = mat1(PTR(w), type, N, K);
    Py_BEGIN_ALLOW_THREADS;
    for (int r0 = 0; r0 < R; r0 += 64) { /* bounded activation tile: stays in L2 */
        int rg = R - r0 < 64 ? R - r0 : 64;
        matmul((const float *)PTR(x) + (size_t)r0 * K, rg, m, (float *)PTR(y) + (size_t)r0 * ldy, ldy, &sc, exact);
    }
    Py_END_ALLOW_THREADS;
    free(sc.xsum);
    Py_RETURN_NONE;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    unsigned long long w, out;
    int type, bf16 = 0;
    long long N, K;
    if (!PyArg_ParseTuple(args, "KiLLK|p", &w, &type, &N, &K, &out, &bf16)) return NULL;
    if (!qtype(type) || K % qtype(type)->block) return PyErr_Format(PyExc_ValueError, "bad weight type %d", type);
    DequantJob job = {mat1(PTR(w), type, N, K), PTR(out), bf16};
    Py_BEGIN_ALLOW_THREADS;
    pool_run(dequant_task, &job, pool_chunks(N / 16));
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_embed(PyObject *self, PyObject *args) {
    unsigned long long w, ids, out;
    int type, T;
    long long K;
    if (!PyArg_ParseTuple(args, "KiLKiK", &w, &type, &K, &ids, &T, &out)) return NULL;
    if (!qtype(type) || K % qtype(type)->block) return PyErr_Format(PyExc_ValueError, "bad weight type %d", type);
    size_t rb = row_bytes(type, K);
    const int64_t *id = (const int64_t *)PTR(ids);
    for (int t = 0; t < T; t++) dequant_row((const uint8_t *)PTR(w) + (size_t)id[t] * rb, type, K, (float *)PTR(out) + (size_t)t * K);
    Py_RETURN_NONE;
}

static PyObject *py_decoder_forward(PyObject *self, PyObject *args) {
    unsigned long long h, layers, final_norm, pos, seq, tables;
    int T, L, max_blocks, H, nh, nkv, D, I, bs, gelu;
    float eps, scale;
    int exact;
    if (!PyArg_ParseTuple(args, "KiiKKKKKi(iiiiiii)ffp", &h, &T, &L, &layers, &final_norm, &pos, &seq, &tables,
                          &max_blocks, &H, &nh, &nkv, &D, &I, &bs, &gelu, &eps, &scale, &exact))
        return NULL;
    int dims[7] = {H, nh, nkv, D, I, bs, gelu};
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = decoder_forward((float *)PTR(h), T, L, (const int64_t *)PTR(layers), (const float *)PTR(final_norm),
                         (const int32_t *)PTR(pos), (const int32_t *)PTR(seq), (const int32_t *)PTR(tables),
                         max_blocks, dims, eps, scale, exact);
    Py_END_ALLOW_THREADS;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (pool_start(n)) return PyErr_Format(PyExc_RuntimeError, "could not start %d threads", n);
    Py_RETURN_NONE;
}

static PyObject *py_info(PyObject *self, PyObject *args) {
    PyObject *types = PyDict_New();
    for (int i = 0; types && i < NUM_TYPES; i++) {
        PyObject *entry = Py_BuildValue("{s:s,s:i,s:i,s:O}", "name", TYPES[i].name, "block", TYPES[i].block, "bytes",
                                        TYPES[i].bytes, "fast", qrow_kernel(TYPES[i].type) ? Py_True : Py_False);
        PyObject *key = PyLong_FromLong(TYPES[i].type);
        if (!entry || !key || PyDict_SetItem(types, key, entry)) types = NULL;
        Py_XDECREF(entry);
        Py_XDECREF(key);
    }
    if (!types) return NULL;
    PyObject *out = Py_BuildValue("{s:s,s:i,s:i,s:N}", "isa", K_.isa, "threads", pool.nth, "layer_fields",
                                  (int)L_FIELDS, "types", types);
    return out;
}

PyObject *py_sample(PyObject *self, PyObject *args); /* sample.c */

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "matmul(x, R, K, w, type, N, y, exact[, ldy]): y[R,N] = x[R,K] @ W[N,K]^T, y's rows ldy apart"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(w, type, N, K, out, bf16=False): W -> float32 or bfloat16 [N, K]"},
    {"embed", py_embed, METH_VARARGS, "embed(w, type, K, ids, T, out): rows ids of W as float32"},
    {"decoder_forward", py_decoder_forward, METH_VARARGS, "the whole decoder over T tokens, in place"},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): the kernels' thread count"},
    {"info", py_info, METH_NOARGS, "{'isa', 'threads', 'layer_fields'}"},
    {"sample", py_sample, METH_VARARGS,
     "sample(logits, R, V, temperature, top_k, top_p, min_p, keys, drafts, out, accepted[, bias_off, bias_ids, "
     "bias_vals, hist_off, hist_ids, out_start, rep, pres, freq]): a token per row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "fulmine's CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
    choose_isa();
    return PyModule_Create(&module);
}
