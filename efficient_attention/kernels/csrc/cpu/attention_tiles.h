// Pieces shared by the blocked attention kernels (sparse_attention.cpp, landmark_attention.cpp).  Forward: an online
// softmax per query row over tiles of keys.  Backward: one task owns a (batch, head)'s dK^T and dV^T, accumulated as
// (D, ldS) and (Dv, ldS) so every GEMM reads its operands as stored; the only transposes are a query block's Q^T and
// dO^T.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "micro.h"

namespace ea {

// M rows' online-softmax state before their first tile: accumulators 0, running maxima -inf, sums 0.
template <typename T>
inline void start_rows(T* acc, T* m, T* l, int64_t M, int64_t Dv) {
  std::fill(acc, acc + M * Dv, T(0));
  std::fill(m, m + M, -std::numeric_limits<T>::infinity());
  std::fill(l, l + M, T(0));
}

// One row's online-softmax step over a tile of scores sr (n values, already masked to -inf and scaled; mt their
// maximum): sr becomes e^{s - m} with the new running maximum m (all 0 while the row has seen nothing), and the
// row's accumulator (Dv values) and running sum l are rescaled to it.  The caller then adds sr V to the accumulator.
template <typename T>
inline void online_softmax_row(T* sr, int64_t n, T mt, T& m, T& l, T* acc_row, int64_t Dv) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const T m_new = std::max(m, mt);
  if (m_new == ninf) {  // nothing visible yet: this row contributes nothing
    std::fill(sr, sr + n, T(0));
    return;
  }
  const T sum = exp_sum(sr, n, m_new);
  const T alpha = m == ninf ? T(0) : std::exp(m - m_new);
  if (alpha != T(1))
    for (int64_t c = 0; c < Dv; ++c) acc_row[c] *= alpha;
  l = l * alpha + sum;
  m = m_new;
}

// M rows' results: out = acc / l (0 where l = 0) and lse = m + log l (-inf there).
template <typename T>
inline void finish_rows(const T* acc, const T* m, const T* l, int64_t M, int64_t Dv, T* out, T* lse) {
  for (int64_t r = 0; r < M; ++r) {
    const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
    for (int64_t c = 0; c < Dv; ++c) out[r * Dv + c] = acc[r * Dv + c] * inv;
    lse[r] = l[r] > T(0) ? m[r] + std::log(l[r]) : -std::numeric_limits<T>::infinity();
  }
}

// q_blk (M x D) and do_blk (M x Dv), row-major, transposed into qt (D x M) and dot (Dv x M).
template <typename T>
inline void transpose_query_block(const T* q_blk, const T* do_blk, int64_t M, int64_t D, int64_t Dv, T* qt, T* dot) {
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t c = 0; c < D; ++c) qt[c * M + r] = q_blk[r * D + c];
    for (int64_t c = 0; c < Dv; ++c) dot[c * M + r] = do_blk[r * Dv + c];
  }
}

// One key tile of n keys at column j0 for M query rows: dV^T += dO^T W, dK^T += Q^T dS, dQ += dS K (k_tile: the
// tile's keys, n x D row-major; W and dS: M x n).
template <typename T>
inline void accumulate_tile(int64_t M, int64_t n, int64_t D, int64_t Dv, const T* dot, const T* qt, const T* w,
                            const T* ds, const T* k_tile, int64_t j0, T* dvt, T* dkt, int64_t ldS, T* dq_acc) {
  gemm(Dv, n, M, dot, M, w, n, dvt + j0, ldS, true);
  gemm(D, n, M, qt, M, ds, n, dkt + j0, ldS, true);
  gemm(M, D, n, ds, n, k_tile, D, dq_acc, D, true);
}

// The accumulators back to row-major dK (S x D, times scale) and dV (S x Dv).
template <typename T>
inline void store_key_grads(const T* dkt, const T* dvt, int64_t ldS, int64_t S, int64_t D, int64_t Dv, T scale, T* dk,
                            T* dv) {
  for (int64_t j = 0; j < S; ++j) {
    for (int64_t c = 0; c < D; ++c) dk[j * D + c] = dkt[c * ldS + j] * scale;
    for (int64_t c = 0; c < Dv; ++c) dv[j * Dv + c] = dvt[c * ldS + j];
  }
}

}  // namespace ea
