// Micro-kernels of the CPU attention: small row-major GEMMs and the masked,
// vectorisable exponential.  fp32 GEMMs use oneDNN's brgemm ukernel through
// at::native::cpublas when the PyTorch build has it; otherwise (and for fp64)
// plain loops the compiler vectorises (x86: one clone per ISA via target_clones).
#pragma once

#include <cstdint>

namespace ea {

// C[M x N] (+)= A[M x K] * B[K x N], row-major with leading dimensions.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool add);
void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool add);
// Release per-thread GEMM state at the end of a parallel chunk.
void gemm_release();

// x[j] = keep(j) ? x[j] * scale : -inf for j in [0, n), keep(j) = a <= j <= b and !pad[j] (pad may be null).
// Returns the row maximum (-inf if nothing is kept).
float mask_scale_max(float* x, int64_t n, int64_t a, int64_t b, const bool* pad, float scale);
double mask_scale_max(double* x, int64_t n, int64_t a, int64_t b, const bool* pad, double scale);
// x[j] = exp(x[j] - m) (exactly 0 for x[j] = -inf); returns the sum.
float exp_sum(float* x, int64_t n, float m);
double exp_sum(double* x, int64_t n, double m);
// x[j] = keep(j) ? exp(x[j] * scale - lse) : 0   (probabilities recomputed in the backward).
void probs(float* x, int64_t n, int64_t a, int64_t b, const bool* pad, float scale, float lse);
void probs(double* x, int64_t n, int64_t a, int64_t b, const bool* pad, double scale, double lse);
// x[j] = exp(x[j]) for j in [0, n) (exactly 0 for x[j] <= -87 in fp32, -inf in fp64; fp32: rel. error ~2e-7).
void exp_inplace(float* x, int64_t n);
void exp_inplace(double* x, int64_t n);

}  // namespace ea
