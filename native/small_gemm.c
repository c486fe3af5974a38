/* small_gemm: cblas_sgemm's signature, run by libxsmm's JIT-generated kernels.
 *
 * phi_rnn's compiled kernels call one float32 GEMM symbol (phi_rnn/blas.py binds it to
 * phi_sgemm here, or straight to MKL's cblas_sgemm when this library is not built). On
 * the products of a training step (25-1250 rows, 65-512 columns, K 65-1250; one thread
 * each) libxsmm's kernels run at 114-117 GFLOP/s per core on the Zen4 development machine
 * against MKL's 80-101: MKL takes its generic code path on AMD CPUs.
 *
 * A call goes to libxsmm when all of these hold, else to MKL unchanged:
 *   - the backend is libxsmm (phi_gemm_set_backend), and MKL would run the call on one
 *     thread (inside phi_rnn's per-thread blocks; MKL keeps the products it threads);
 *   - row-major, alpha 1, beta 0 or 1, B not transposed (libxsmm 1.17 cannot transpose
 *     the operand that B becomes in its column-major terms);
 *   - B is at most 8 MiB: libxsmm's kernels do not block for the caches and stream B once
 *     per block of C's rows; a weight gradient of the 3 x 512, batch 128 config (B 52 MB)
 *     ran at 28 GFLOP/s against MKL's 101 (1 thread), while B <= 5 MB ran at 109-117;
 *   - libxsmm has a kernel for the shape.
 * Row-major C = op(A) B is column-major C^T = B^T op(A)^T: libxsmm gets (N, M, K) with
 * B as its first operand and A as its second (transposed there when A is).
 */
#include <stdlib.h>
#include <libxsmm.h>

enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111 };
#define MAX_STREAMED_BYTES (8u << 20)

typedef void (*cblas_sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);
typedef int (*max_threads_fn)(void);

static cblas_sgemm_fn mkl_sgemm;
static max_threads_fn mkl_max_threads;
static int use_libxsmm;

/* Called once by phi_rnn.blas with MKL's cblas_sgemm and mkl_get_max_threads. */
void phi_gemm_init(cblas_sgemm_fn sgemm, max_threads_fn max_threads) {
    /* libxsmm_init puts OMP_PROC_BIND=TRUE into the environment when no binding is set;
     * the OpenMP runtime, loaded later, would then pin every thread to the main thread's
     * first CPU's place. Thread placement is phi_rnn.affinity's: take it out again. */
    int bind_was_set = getenv("OMP_PROC_BIND") != NULL;
    libxsmm_init();
    if (!bind_was_set)
        unsetenv("OMP_PROC_BIND");
    mkl_sgemm = sgemm;
    mkl_max_threads = max_threads;
}

void phi_gemm_set_backend(int libxsmm) { use_libxsmm = libxsmm; }

/* The instruction set libxsmm generates code for on this CPU ("cpx", "hsw", ...). */
const char *phi_gemm_target(void) { return libxsmm_get_target_arch(); }

/* Counting the calls that go to libxsmm and to MKL (for the tests; off by default: a
 * counter shared by the threads would move between cores on every call). */
static int counting;
static unsigned long long calls[2];
void phi_gemm_count_calls(int on) { counting = on; calls[0] = calls[1] = 0; }
void phi_gemm_calls(unsigned long long *out) { out[0] = calls[0]; out[1] = calls[1]; }

static libxsmm_smmfunction small_kernel(int layout, int trans_a, int trans_b, int m, int n, int k,
                                        float alpha, int lda, int ldb, float beta, int ldc) {
    if (!use_libxsmm || layout != CBLAS_ROW_MAJOR || trans_b != CBLAS_NO_TRANS || alpha != 1.0f
        || (beta != 0.0f && beta != 1.0f) || (size_t)n * k * sizeof(float) > MAX_STREAMED_BYTES
        || mkl_max_threads() != 1)
        return 0;
    int flags = (trans_a != CBLAS_NO_TRANS ? LIBXSMM_GEMM_FLAG_TRANS_B : 0)
              | (beta == 0.0f ? LIBXSMM_GEMM_FLAG_BETA_0 : 0);
    /* column-major (N, M, K): first operand B (ld ldb), second A (ld lda), C (ld ldc) */
    return libxsmm_smmdispatch(n, m, k, &ldb, &lda, &ldc, &alpha, &beta, &flags, 0);
}

void phi_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
               const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    libxsmm_smmfunction kernel = small_kernel(layout, trans_a, trans_b, m, n, k, alpha, lda, ldb,
                                              beta, ldc);
    if (kernel) {
        kernel(b, a, c);
    } else {
        mkl_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    if (counting)
        __atomic_fetch_add(&calls[kernel ? 0 : 1], 1, __ATOMIC_RELAXED);
}
