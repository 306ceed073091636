#include "micro.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define EA_CLONES
#endif

namespace ea {

bool use_brgemm();

namespace {

template <typename T>
inline void gemm_loops(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!add) std::fill(c, c + N, T(0));
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = A[i * lda + kk];
      const T* b = B + kk * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// exp(x) for x <= 88 as plain arithmetic the compiler vectorises: x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 polynomial (rel. error ~2e-7), 2^n through the exponent bits.
inline float exp_approx(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace

EA_CLONES void gemm_f32_loops(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool add) {
  gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, add);
}

void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  if (use_brgemm()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
  } else {
    gemm_f32_loops(M, N, K, A, lda, B, ldb, C, ldc, add);
  }
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool add) {
  gemm_loops(M, N, K, A, lda, B, ldb, C, ldc, add);
}

void gemm_release() {
  if (use_brgemm()) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
}

EA_CLONES float mask_scale_max(float* x, int64_t n, int64_t a, int64_t b, const bool* pad, float scale) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = ninf;
  if (pad) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = j >= a && j <= b && !pad[j];
      const float y = keep ? x[j] * scale : ninf;
      x[j] = y;
      m = y > m ? y : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = j >= a && j <= b;
      const float y = keep ? x[j] * scale : ninf;
      x[j] = y;
      m = y > m ? y : m;
    }
  }
  return m;
}

double mask_scale_max(double* x, int64_t n, int64_t a, int64_t b, const bool* pad, double scale) {
  const double ninf = -std::numeric_limits<double>::infinity();
  double m = ninf;
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = j >= a && j <= b && !(pad && pad[j]);
    x[j] = keep ? x[j] * scale : ninf;
    m = std::max(m, x[j]);
  }
  return m;
}

EA_CLONES float exp_sum(float* x, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(x[j] - m);
    x[j] = e;
    s += e;
  }
  return s;
}

double exp_sum(double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - m);
    s += x[j];
  }
  return s;
}

EA_CLONES void probs(float* x, int64_t n, int64_t a, int64_t b, const bool* pad, float scale, float lse) {
  if (pad) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = j >= a && j <= b && !pad[j];
      const float e = exp_approx(x[j] * scale - lse);
      x[j] = keep ? e : 0.0f;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const bool keep = j >= a && j <= b;
      const float e = exp_approx(x[j] * scale - lse);
      x[j] = keep ? e : 0.0f;
    }
  }
}

void probs(double* x, int64_t n, int64_t a, int64_t b, const bool* pad, double scale, double lse) {
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = j >= a && j <= b && !(pad && pad[j]);
    x[j] = keep ? std::exp(x[j] * scale - lse) : 0.0;
  }
}

EA_CLONES void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float y = x[j];
    x[j] = y > 88.0f ? std::numeric_limits<float>::infinity() : exp_approx(y);
  }
}

void exp_inplace(double* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j]);
}

}  // namespace ea
