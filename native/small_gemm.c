/* small_gemm: libxsmm's JIT-generated kernels behind cblas_sgemm's arguments.
 *
 * phi_rnn's compiled kernels call one float32 GEMM dispatcher (phi_rnn/blas.py). When
 * libxsmm is the backend and MKL would run a product on one thread (inside phi_rnn's
 * per-thread blocks), the dispatcher offers the product to phi_xsmm_sgemm here, which runs
 * it and returns 1, or returns 0 and leaves it to MKL. On the products of a training step
 * (25-1250 rows, 65-512 columns, K 65-1250; one thread each) libxsmm's kernels beat MKL's
 * generic code path on AMD CPUs (bench/README.md).
 *
 * libxsmm takes a product when all of these hold:
 *   - row-major, alpha 1, beta 0 or 1, B not transposed (libxsmm 1.17 cannot transpose
 *     the operand that B becomes in its column-major terms);
 *   - B is at most 8 MiB: libxsmm's kernels do not block for the caches and stream B once
 *     per block of C's rows, which made a 52 MB weight gradient run at a quarter of MKL's
 *     rate while B <= 5 MB ran at or above it;
 *   - libxsmm has a kernel for the shape.
 * Row-major C = op(A) B is column-major C^T = B^T op(A)^T: libxsmm gets (N, M, K) with
 * B as its first operand and A as its second (transposed there when A is).
 */
#include <stdlib.h>
#include <libxsmm.h>

enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111 };
#define MAX_STREAMED_BYTES (8u << 20)

/* Called once by phi_rnn.blas before the first product. */
void phi_xsmm_init(void) {
    /* libxsmm_init puts OMP_PROC_BIND=TRUE into the environment when no binding is set;
     * the OpenMP runtime, loaded later, would then pin every thread to the main thread's
     * first CPU's place. Thread placement is phi_rnn.affinity's: take it out again. */
    int bind_was_set = getenv("OMP_PROC_BIND") != NULL;
    libxsmm_init();
    if (!bind_was_set)
        unsetenv("OMP_PROC_BIND");
}

/* The instruction set libxsmm generates code for on this CPU ("cpx", "hsw", ...). */
const char *phi_xsmm_target(void) { return libxsmm_get_target_arch(); }

/* The libxsmm this library was built with ("1.17-0", ...). */
const char *phi_xsmm_version(void) { return LIBXSMM_VERSION; }

/* C = alpha op(A) B + beta C through libxsmm; 1 when it ran, 0 when the product is not one
 * libxsmm takes (then nothing was touched). */
int phi_xsmm_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                   const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (layout != CBLAS_ROW_MAJOR || trans_b != CBLAS_NO_TRANS || alpha != 1.0f
        || (beta != 0.0f && beta != 1.0f) || (size_t)n * k * sizeof(float) > MAX_STREAMED_BYTES)
        return 0;
    int flags = (trans_a != CBLAS_NO_TRANS ? LIBXSMM_GEMM_FLAG_TRANS_B : 0)
              | (beta == 0.0f ? LIBXSMM_GEMM_FLAG_BETA_0 : 0);
    /* column-major (N, M, K): first operand B (ld ldb), second A (ld lda), C (ld ldc) */
    libxsmm_smmfunction kernel = libxsmm_smmdispatch(n, m, k, &ldb, &lda, &ldc, &alpha, &beta, &flags, 0);
    if (!kernel)
        return 0;
    kernel(b, a, c);
    return 1;
}
