/* What the files of the CPU extension share beyond the block types (quant.h): the thread pool
 * (pool.c), the table of types and the matrix product (matmul.c), the decoder (decoder.c).
 *
 *   quant.h     type ids, activation formats, row kernel signatures, QType, SIMD helpers
 *   blocks32.c  F32, F16, Q8_0, Q4_0, Q4_1 row kernels; the per-32 activation quantizer
 *   kquants.c   Q5_0, Q5_1, Q4_K, Q5_K, Q6_K row kernels; the per-256 activation quantizer
 *   interleaved.c  the layouts with 8 or 16 rows interleaved (built at load); Q4_0, Q4_1, Q8_0, Q5_0 kernels
 *   interleaved_k.c  Q4_K and Q6_K kernels with 16 rows interleaved
 *   matmul.c    the table of types, the ISA chosen at import, y = x @ W^T, dequantization
 *   decoder.c   the whole decoder for a step's tokens over the paged KV cache
 *   attention.c its attention: scores, softmax and weighted sums over the cache, the cache writes
 *   pool.c      the thread pool every product and attention splits its work over
 *   sample.c    sampling (temperature, top-k/p, min-p, penalties, bias, draft verification)
 *   _cpu.c      the Python bindings
 */
#ifndef FULMINE_CPU_H
#define FULMINE_CPU_H

#include <stdint.h>

#include "quant.h"

/* pool.c: fn(ctx, chunk, nchunks) for every chunk in [0, nchunks), across the pool's threads */
typedef void (*task_fn)(void *ctx, int chunk, int nchunks);
void pool_run(task_fn fn, void *ctx, int nchunks);
int pool_chunks(int64_t work); /* chunks for `work` units: a few per thread */
int pool_start(int nth);       /* 0, or -1 if the threads could not be started */
int pool_threads(void);

/* interleaved.c: how far ahead of the block it reads an interleaved kernel asks for weights: > 0
 * that many bytes, < 0 that many row groups (the same block of a later group), 0 not at all (the
 * hardware prefetchers alone). The best differs by CPU: the engine measures it at startup. */
extern long prefetch_ahead;
static inline size_t prefetch_offset(size_t group_bytes) {
    return prefetch_ahead < 0 ? (size_t)(-prefetch_ahead) * group_bytes : (size_t)prefetch_ahead;
}

/* blocks32.c */
extern const QType BASE_TYPES[];
extern const int NUM_BASE_TYPES;
void quantize_row_scalar(const float *x, int64_t K, int8_t *q, float *dx, float *xsum);
void quantize_row_avx2(const float *x, int64_t K, int8_t *q, float *dx, float *xsum);

/* matmul.c. A weight matrix W[N, K]: up to MAX_PARTS row ranges, each in its own type (a merged
 * q/k/v whose v is Q6_K while q and k are Q4_K, as Q4_K_M files have it): part p holds rows
 * [end[p - 1], end[p]). */
#define MAX_PARTS 3
typedef struct {
    int nparts;
    const uint8_t *data[MAX_PARTS];
    int type[MAX_PARTS];
    int64_t end[MAX_PARTS];
    int64_t N, K;
} Mat;

/* Scratch for one product's activations in both formats (QAct): per 32, R * K / 32 floats each for
 * xsum and dx and R * K int8; per 256, R * K / 256 floats, R * K / 16 int16 and R * K int8. */
typedef struct {
    float *xsum, *dx, *kd;
    int8_t *qx, *kq;
    int16_t *ksum;
} Scratch;

void kernels_init(void);       /* the table of types, the ISA (once, at import) */
int kernels_level(void);       /* ISA_SCALAR, ISA_AVX2 or ISA_VNNI */
const char *kernels_isa(void); /* its name */
int num_types(void);
const QType *type_at(int i);
const QType *qtype(int type); /* NULL: not a type the kernels read */
size_t row_bytes(int type, int64_t K);
int has_fast_kernel(int type);
int interleave_group(void); /* rows the interleaved layouts of this CPU group: 16 with 512-bit kernels, else 8 */
Mat mat1(const uint8_t *data, int type, int64_t N, int64_t K);
int scratch_alloc(Scratch *s, size_t R, size_t K); /* 0, or -1; free(s->xsum) releases it */
/* y[R, N] (rows ldy apart) = x[R, K] @ W[N, K]^T; fast (int8 activations) unless exact */
void matmul(const float *x, int R, Mat w, float *y, int64_t ldy, const Scratch *s, int exact);
/* row n of W[N, K] (base: the matrix's first byte) -> float32 */
void dequant_row(const uint8_t *base, int type, int64_t n, int64_t K, float *out);
void dequantize(Mat w, void *out, int bf16); /* W -> float32 or bfloat16 [N, K], over the pool */

/* attention.c: one layer's attention for T tokens over the paged KV cache, and its cache writes */
typedef struct {
    int T, nh, nkv, D, bs, max_blocks, window, half; /* half: the cache holds float16, else float32 */
    float scale;
    const void *k_cache, *v_cache;
    const int32_t *pos, *seq, *tables; /* per token: position, sequence; per sequence: its block table */
    const float *q; /* [T, nh * D] queries after RoPE */
    float *out;     /* [T, nh * D] */
} Attention;
size_t attention_scratch(const Attention *a); /* floats of scratch that attention() needs */
void attention(const Attention *a, float *scratch);
/* n values into a cache at element `offset`, rounded to nearest even into float16 (as PyTorch rounds) */
void kv_store(void *cache, int half, int64_t offset, const float *src, int n);

/* decoder.c. One row of int64 per layer: pointers (0: absent), weight types, the window, the cache's
 * element type. A mixture-of-experts layer has a router (ROUTER, 0 in a dense layer); its GATE, UP and
 * DOWN are expert 0's, each next expert's GATE_UP_STRIDE and DOWN_STRIDE bytes further. The list is
 * the one source of the fields' order: the enum below and the names the bindings export
 * (info()["layer_fields"]), by which the Python side fills a row. */
#define LAYER_FIELDS(X)                                                                               \
    X(IN_NORM) X(Q) X(Q_TYPE) X(K) X(K_TYPE) X(V) X(V_TYPE) X(QKV_BIAS) X(Q_NORM) X(K_NORM) X(O) X(O_TYPE) \
    X(O_BIAS) X(PRE_MLP_NORM) X(GATE) X(GATE_TYPE) X(UP) X(UP_TYPE) X(DOWN) X(DOWN_TYPE) X(K_CACHE)         \
    X(V_CACHE) X(WINDOW) X(COS) X(SIN) X(ATTN_OUT_NORM) X(FFN_OUT_NORM) X(KV_HALF) X(QK_NORM_WHOLE)          \
    X(ROUTER) X(ROUTER_TYPE) X(GATE_UP_STRIDE) X(DOWN_STRIDE)
#define LAYER_ENUM(name) L_##name,
enum { LAYER_FIELDS(LAYER_ENUM) L_FIELDS };
#undef LAYER_ENUM
int decoder_forward(float *h, int T, int L, const int64_t *layers, const float *final_norm, const int32_t *pos,
                    const int32_t *seq, const int32_t *tables, int max_blocks, const int *dims, float eps, float scale,
                    int exact);

#endif
