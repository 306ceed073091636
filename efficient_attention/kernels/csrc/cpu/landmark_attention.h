// Landmark attention on the CPU (the "cpp" backend of efficient_attention's landmark op): the fixed-period layout
// (position j is a landmark iff j % bs == bs - 1), block by block with O(N) memory, forward and backward.
//
// A query at position p in block c attends its own block causally (the landmark of block c only to itself) and
// each earlier block b as one softmax item with logit s(L_b) and value A_b, the block's own softmax average of its
// tokens' values (kernels/landmark.py has the math and the PyTorch path these kernels are tested against).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ea {

// q (B, H, T, d) (the last T of the S positions), k, v (B, H, S, d / dv) with q's head count, kpm (B, S) bool or
// undefined.  Returns out (B, H, T, dv) in q's dtype and lse (B, H, T) fp32 (fp64 for fp64) (-inf: nothing seen).
std::tuple<at::Tensor, at::Tensor> landmark_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& kpm, int64_t block_size, double scale);

// (dq, dk, dv) for grad_out and grad_lse (undefined: zero) from the forward's inputs, out and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_backward(const at::Tensor& grad_out,
                                                                 const at::Tensor& grad_lse, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 const at::Tensor& kpm, int64_t block_size,
                                                                 double scale);

}  // namespace ea
