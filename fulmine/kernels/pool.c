/* The kernels' thread pool: spinning pthreads that claim chunks of a job; the caller is thread 0. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "cpu.h"

#ifdef FULMINE_X86
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

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

int pool_start(int nth) {
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
void pool_run(task_fn fn, void *ctx, int nchunks) {
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
int pool_chunks(int64_t work) {
    int64_t n = (int64_t)pool.nth * 4;
    return (int)(work < n ? (work > 0 ? work : 1) : n);
}

int pool_threads(void) { return pool.nth; }
