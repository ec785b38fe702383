/* fulmine's CPU kernels, Python bindings: matrix products on weights kept in their checkpoint's
 * block format (GGUF Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; float16; float32), the whole
 * decoder in one call per step, and sampling. cpu.h lists the files and what each holds.
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
 * quantized to int8 with its own scale (per 256 values for the K-quants), and blocks multiply as integers (AVX2 maddubs, or AVX-512
 * VNNI dpbusd), about 3x fewer instructions per weight. Both modes equal (to rounding) a float32
 * product of the dequantized weight with the activations as given (exact) or as quantized (fast),
 * which is how larger batches compute it (fulmine/layers/quantized.py). Float16 and float32 weights
 * always multiply in float32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>

#include "cpu.h"

/* ---------------------------------------------------------------------------------------------
 * Python bindings. Pointers arrive as integers (tensor.data_ptr()); shapes are checked by the
 * Python callers (fulmine/kernels/__init__.py, layers/quantized.py, layers/linear.py, the executors).
 */
#define PTR(v) ((void *)(uintptr_t)(v))

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    int R, type, exact;
    long long K, N, ldy = -1;
    if (!PyArg_ParseTuple(args, "KiLKiLKp|L", &x, &R, &K, &w, &type, &N, &y, &exact, &ldy)) return NULL;
    if (ldy < 0) ldy = N;
    const QType *qt = qtype(type);
    if (!qt || K % qt->block || (qt->block > 1 && K % 32) || (qt->rows > 1 && N % qt->rows))
        return PyErr_Format(PyExc_ValueError, "bad weight type %d / K %lld", type, K);
    if (exact && qt->rows > 1) return PyErr_Format(PyExc_ValueError, "%s has no exact kernel", qt->name);
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
    Mat m = mat1(PTR(w), type, N, K);
    Py_BEGIN_ALLOW_THREADS;
    dequantize(m, PTR(out), bf16);
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

static PyObject *py_embed(PyObject *self, PyObject *args) {
    unsigned long long w, ids, out;
    int type, T;
    long long K;
    if (!PyArg_ParseTuple(args, "KiLKiK", &w, &type, &K, &ids, &T, &out)) return NULL;
    if (!qtype(type) || K % qtype(type)->block) return PyErr_Format(PyExc_ValueError, "bad weight type %d", type);
    const int64_t *id = (const int64_t *)PTR(ids);
    for (int t = 0; t < T; t++) dequant_row((const uint8_t *)PTR(w), type, id[t], K, (float *)PTR(out) + (size_t)t * K);
    Py_RETURN_NONE;
}

static PyObject *py_interleave(PyObject *self, PyObject *args) {
    unsigned long long w, out;
    int type, G;
    long long N, K;
    if (!PyArg_ParseTuple(args, "KiLLKi", &w, &type, &N, &K, &out, &G)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = interleave_rows(type, G, PTR(w), N, K, PTR(out));
    Py_END_ALLOW_THREADS;
    if (rc == -2) return PyErr_NoMemory();
    if (rc)
        return PyErr_Format(PyExc_ValueError, "type %d has no layout of %d rows interleaved for %lld rows", type, G, N);
    return PyLong_FromLong(type | (G == 16 ? T_X16 : T_X8));
}

static PyObject *py_decoder_forward(PyObject *self, PyObject *args) {
    unsigned long long h, layers, final_norm, pos, seq, tables;
    int T, L, max_blocks, H, nh, nkv, D, I, bs, gelu, E, top_k, norm_top_k, expert_I;
    float eps, scale;
    int exact;
    if (!PyArg_ParseTuple(args, "KiiKKKKKi(iiiiiiiiiii)ffp", &h, &T, &L, &layers, &final_norm, &pos, &seq,
                          &tables, &max_blocks, &H, &nh, &nkv, &D, &I, &bs, &gelu, &E, &top_k, &norm_top_k, &expert_I,
                          &eps, &scale, &exact))
        return NULL;
    if (E < 0 || E > 4096 || (E && (top_k < 1 || top_k > E || expert_I < 1)))
        return PyErr_Format(PyExc_ValueError, "experts: %d of %d chosen", top_k, E);
    int dims[11] = {H, nh, nkv, D, I, bs, gelu, E, top_k, norm_top_k, expert_I};
    const int32_t *positions = (const int32_t *)PTR(pos);
    for (int t = 0; t < T; t++) /* a position outside the block table would write outside the cache */
        if (positions[t] < 0 || positions[t] >= (int64_t)max_blocks * bs)
            return PyErr_Format(PyExc_ValueError, "token %d: position %d outside its block table (%d positions)", t,
                                positions[t], max_blocks * bs);
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

static PyObject *py_set_prefetch(PyObject *self, PyObject *args) {
    long ahead;
    if (!PyArg_ParseTuple(args, "l", &ahead)) return NULL;
    if (ahead < -8 || ahead > (1 << 20) || (ahead > 0 && ahead % 64))
        return PyErr_Format(PyExc_ValueError, "prefetch distance %ld: -8 to 8 groups, or bytes (whole cache lines)", ahead);
    prefetch_ahead = ahead;
    Py_RETURN_NONE;
}

static PyObject *py_info(PyObject *self, PyObject *args) {
    PyObject *types = PyDict_New();
    for (int i = 0; types && i < num_types(); i++) {
        const QType *t = type_at(i);
        PyObject *entry = Py_BuildValue("{s:s,s:i,s:i,s:O,s:i}", "name", t->name, "block", t->block, "bytes", t->bytes,
                                        "fast", has_fast_kernel(t->type) ? Py_True : Py_False, "base",
                                        t->rows > 1 ? t->base : t->type);
        PyObject *key = PyLong_FromLong(t->type);
        if (!entry || !key || PyDict_SetItem(types, key, entry)) types = NULL;
        Py_XDECREF(entry);
        Py_XDECREF(key);
    }
    if (!types) return NULL;
#define LAYER_NAME(name) #name,
    static const char *const layer_names[L_FIELDS] = {LAYER_FIELDS(LAYER_NAME)};
#undef LAYER_NAME
    PyObject *fields = PyTuple_New(L_FIELDS);
    for (int i = 0; fields && i < L_FIELDS; i++) {
        PyObject *name = PyUnicode_FromString(layer_names[i]);
        if (!name) {
            Py_CLEAR(fields);
            break;
        }
        PyTuple_SET_ITEM(fields, i, name);
    }
    if (!fields) {
        Py_DECREF(types);
        return NULL;
    }
    PyObject *out = Py_BuildValue("{s:s,s:i,s:N,s:i,s:N}", "isa", kernels_isa(), "threads", pool_threads(), "layer_fields",
                                  fields, "interleave", interleave_group(), "types", types);
    return out;
}

PyObject *py_sample(PyObject *self, PyObject *args); /* sample.c */

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "matmul(x, R, K, w, type, N, y, exact[, ldy]): y[R,N] = x[R,K] @ W[N,K]^T, y's rows ldy apart"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(w, type, N, K, out, bf16=False): W -> float32 or bfloat16 [N, K]"},
    {"interleave", py_interleave, METH_VARARGS, "interleave(w, type, N, K, out, G): W with G rows interleaved into out (out may be w: in place); its type id"},
    {"embed", py_embed, METH_VARARGS, "embed(w, type, K, ids, T, out): rows ids of W as float32"},
    {"decoder_forward", py_decoder_forward, METH_VARARGS, "the whole decoder over T tokens, in place"},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): the kernels' thread count"},
    {"set_prefetch", py_set_prefetch, METH_VARARGS, "set_prefetch(ahead): how far ahead the interleaved kernels prefetch (bytes; < 0: row groups; 0: off)"},
    {"info", py_info, METH_NOARGS, "{'isa', 'threads', 'layer_fields' (the decoder's layer row, by name), 'interleave', 'types'}"},
    {"sample", py_sample, METH_VARARGS,
     "sample(logits, R, V, temperature, top_k, top_p, min_p, keys, drafts, out, accepted[, bias_off, bias_ids, "
     "bias_vals, hist_off, hist_ids, out_start, rep, pres, freq, mask_rows, masks, mask_words]): a token per row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "fulmine's CPU kernels", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
    kernels_init();
    return PyModule_Create(&module);
}
