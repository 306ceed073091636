// Causal chunked linear attention on the CPU (the "cpp" backend of efficient_attention's linear_attention op).
//
// Per (batch, head), aligned queries and keys (T == S): a state H (m x d) and normaliser z (m) run over the
// positions, H_t = e^{g_t} H_{t-1} + k_t v_t^T, z_t = e^{g_t} z_{t-1} + k_t; num_t = q_t H_t, den_t = q_t . z_t.
// The positions are cut into chunks of C: inside a chunk the masked, decay-weighted C x C product, across chunks
// the state, carried in the cache by one thread that walks the head's chunks in order (the backward walks them
// backwards carrying dH).  z rides along as one more column of the state (v gets a column of ones).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace ea {

// q, k (B, H, T, m), v (B, H, T, d), log_decay (B, H, T) or undefined (no decay), h0 (B, H, m, d) and
// z0 (B, H, m) or undefined (zeros); fp32 or fp64, contiguous.  With cos_sin (T, 2) (cos, sin of each position)
// q and k are cosFormer's raw (B, H, T, d0) and the features m = 2 d0 are made in the kernel: [act(x) cos,
// act(x) sin], act = relu (act 0) or 1 + elu (act 1).  Returns
//   num (B, H, T, d), den (B, H, T) (empty unless normalize), the states entering the chunks, transposed,
//   (B, H, N, w, m) with w = d + normalize (saved for the backward), H_final (B, H, m, d), z_final (B, H, m)
//   (empty unless normalize).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_causal_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay, const at::Tensor& h0,
    const at::Tensor& z0, const at::Tensor& cos_sin, int64_t act, bool normalize, int64_t chunk);

// The gradients (dq, dk, dv, dH0, dz0 (empty unless normalize)) for grad_num (B, H, T, d), grad_den (B, H, T),
// grad_h (B, H, m, d), grad_z (B, H, m) (each may be undefined: zero), from the forward's inputs and states;
// dq, dk have q's shape (with cos_sin: the raw channels').
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_causal_backward(
    const at::Tensor& grad_num, const at::Tensor& grad_den, const at::Tensor& grad_h, const at::Tensor& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
    const at::Tensor& states, const at::Tensor& cos_sin, int64_t act, bool normalize, int64_t chunk);

}  // namespace ea
