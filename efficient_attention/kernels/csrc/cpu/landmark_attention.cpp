// Landmark attention (see landmark_attention.h), FlashAttention-2 style over the items of a query block.
//
// Forward: one task per (batch, head, query block c).  Each earlier key block b gives one item per query row: its
// tokens' scores (the landmark column and padded keys out) make the inner softmax a, A_b = a V_b, and the landmark's
// score t_b is the item's logit (-inf when the landmark is padded: the block is hidden); the own block's keys are
// ordinary items, causal (a landmark column there is only visible from the landmark itself, which the causal band
// already says).  One online softmax over all of them.
// Backward: one task per (batch, head) (it owns dk, dv), recomputing a and the item weights P_b = e^{t_b - lse}
// per block; with dp = dO V_b^T, E_b = sum_j a_j dp_j and delta = rowsum(dO o O) - dlse:
//   ds_j = P_b a_j (dp_j - E_b) on tokens, ds_L = P_b (E_b - delta) on the landmark, dV_b += (P_b a)^T dO;
//   own block: w = e^{s - lse}, ds = w (dp - delta), dV += w^T dO;   dQ = ds K scale, dK = ds^T Q scale.
#include "landmark_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_tiles.h"
#include "micro.h"

namespace ea {

namespace {

// Query rows [i0, i1) of landmark block c: positions p = i + off.
struct QueryBlock {
  int64_t i0, i1;
};

inline QueryBlock rows_of(int64_t c, int64_t bs, int64_t off, int64_t T) {
  return {std::max<int64_t>(0, c * bs - off), std::min(T, (c + 1) * bs - off)};
}

// The inner softmax of one row of an earlier block's scores x (bs values; scaled and masked in place to a, the
// landmark column and padded tokens 0).  Returns the landmark's logit t (-inf when it is padded).
template <typename T>
T inner_softmax(T* x, int64_t bs, const bool* pad, T scale) {
  const T t = pad && pad[bs - 1] ? -std::numeric_limits<T>::infinity() : x[bs - 1] * scale;
  const T m = mask_scale_max(x, bs, 0, bs - 2, pad, scale);  // tokens only; the rest -inf
  if (m == -std::numeric_limits<T>::infinity()) {
    std::fill(x, x + bs, T(0));  // every token padded: A_b = 0 (the item still counts, with t)
    return t;
  }
  const T inv = T(1) / exp_sum(x, bs, m);
  for (int64_t j = 0; j < bs; ++j) x[j] *= inv;
  return t;
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& kt_all, const at::Tensor& v, const bool* pad, int64_t bs,
                    T scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), S = v.size(2), Dv = v.size(3);
  const int64_t off = S - Tq, c_first = off / bs, nqb = (S - 1) / bs - c_first + 1;
  const T *Q = q.data_ptr<T>(), *KT = kt_all.data_ptr<T>(), *V = v.data_ptr<T>();
  T *O = out.data_ptr<T>(), *LSE = lse.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(bs * bs), acc(bs * Dv), a_v(bs * Dv), m(bs), l(bs), t(bs);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = c_first + task % nqb, bh = task / nqb, b_ = bh / H;
      const auto [i0, i1] = rows_of(c, bs, off, Tq);
      const int64_t r = i1 - i0;
      const T* q_blk = Q + (bh * Tq + i0) * D;
      const T* kt = KT + bh * D * S;
      const T* v_bh = V + bh * S * Dv;
      const bool* pad_b = pad ? pad + b_ * S : nullptr;
      start_rows(acc.data(), m.data(), l.data(), r, Dv);
      for (int64_t kb = 0; kb < c; ++kb) {  // earlier blocks: one item each
        const int64_t j0 = kb * bs;
        gemm(r, bs, D, q_blk, D, kt + j0, S, s.data(), bs, false);
        for (int64_t x = 0; x < r; ++x) t[x] = inner_softmax(s.data() + x * bs, bs, pad_b ? pad_b + j0 : nullptr, scale);
        gemm(r, Dv, bs, s.data(), bs, v_bh + j0 * Dv, Dv, a_v.data(), Dv, false);  // A_b per row
        for (int64_t x = 0; x < r; ++x) {
          if (t[x] == ninf) continue;
          const T m_new = std::max(m[x], t[x]);
          const T alpha = m[x] == ninf ? T(0) : std::exp(m[x] - m_new), w = std::exp(t[x] - m_new);
          T* ar = acc.data() + x * Dv;
          const T* av = a_v.data() + x * Dv;
          for (int64_t e = 0; e < Dv; ++e) ar[e] = ar[e] * alpha + w * av[e];
          l[x] = l[x] * alpha + w;
          m[x] = m_new;
        }
      }
      const int64_t j0 = c * bs, n = std::min(S, j0 + bs) - j0;  // the own block, causal
      gemm(r, n, D, q_blk, D, kt + j0, S, s.data(), n, false);
      for (int64_t x = 0; x < r; ++x) {
        T* sr = s.data() + x * n;
        const int64_t p = i0 + x + off;
        const T mt = mask_scale_max(sr, n, 0, p - j0, pad_b ? pad_b + j0 : nullptr, scale);
        online_softmax_row(sr, n, mt, m[x], l[x], acc.data() + x * Dv, Dv);
      }
      gemm(r, Dv, n, s.data(), n, v_bh + j0 * Dv, Dv, acc.data(), Dv, true);
      finish_rows(acc.data(), m.data(), l.data(), r, Dv, O + (bh * Tq + i0) * Dv, LSE + bh * Tq + i0);
    }
    gemm_release();
  });
}

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& delta, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& kt_all, const at::Tensor& vt_all, const at::Tensor& lse, const bool* pad,
                     int64_t bs, T scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), S = k.size(2), Dv = dv.size(3);
  const int64_t off = S - Tq, c_first = off / bs, c_last = (S - 1) / bs;
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *KT = kt_all.data_ptr<T>(), *VT = vt_all.data_ptr<T>();
  const T *DO = dout.data_ptr<T>(), *LSE = lse.data_ptr<T>(), *DELTA = delta.data_ptr<T>();
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // dK^T, dV^T accumulate as (D, S) (attention_tiles.h)
    std::vector<T> s(bs * bs), dp(bs * bs), qt(D * bs), dot(Dv * bs), dq_acc(bs * D), dkt(D * S), dvt(Dv * S);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b_ = bh / H;
      const bool* pad_b = pad ? pad + b_ * S : nullptr;
      const T* kt = KT + bh * D * S;
      const T* vt = VT + bh * Dv * S;
      std::fill(dkt.begin(), dkt.end(), T(0));
      std::fill(dvt.begin(), dvt.end(), T(0));
      for (int64_t c = c_first; c <= c_last; ++c) {
        const auto [i0, i1] = rows_of(c, bs, off, Tq);
        const int64_t r = i1 - i0;
        const T* q_blk = Q + (bh * Tq + i0) * D;
        const T* do_blk = DO + (bh * Tq + i0) * Dv;
        const T* lse_blk = LSE + bh * Tq + i0;
        const T* delta_blk = DELTA + bh * Tq + i0;
        transpose_query_block(q_blk, do_blk, r, D, Dv, qt.data(), dot.data());
        std::fill(dq_acc.begin(), dq_acc.begin() + r * D, T(0));
        for (int64_t kb = 0; kb <= c; ++kb) {
          const int64_t j0 = kb * bs, n = std::min(S, j0 + bs) - j0;
          gemm(r, n, D, q_blk, D, kt + j0, S, s.data(), n, false);        // scores
          gemm(r, n, Dv, do_blk, Dv, vt + j0, S, dp.data(), n, false);    // dP = dO V^T
          for (int64_t x = 0; x < r; ++x) {
            T* sr = s.data() + x * n;  // becomes the weights W
            T* dpr = dp.data() + x * n;  // becomes ds
            const T lr = lse_blk[x], dr = delta_blk[x];
            if (lr == ninf) {  // the row sees nothing
              std::fill(sr, sr + n, T(0));
              std::fill(dpr, dpr + n, T(0));
              continue;
            }
            if (kb == c) {  // own block: w = e^{s - lse} on the causal band, ds = w (dp - delta)
              probs(sr, n, 0, i0 + x + off - j0, pad_b ? pad_b + j0 : nullptr, scale, lr);
              for (int64_t j = 0; j < n; ++j) dpr[j] = sr[j] * (dpr[j] - dr);
              continue;
            }
            const T tl = inner_softmax(sr, bs, pad_b ? pad_b + j0 : nullptr, scale);
            const T P = tl == ninf ? T(0) : std::exp(tl - lr);
            T E = T(0);
            for (int64_t j = 0; j < bs; ++j) E += sr[j] * dpr[j];
            for (int64_t j = 0; j < bs; ++j) {
              sr[j] *= P;                            // W = P a (0 on the landmark column)
              dpr[j] = sr[j] * (dpr[j] - E);         // tokens
            }
            dpr[bs - 1] = P * (E - dr);              // the landmark's logit
          }
          accumulate_tile(r, n, D, Dv, dot.data(), qt.data(), s.data(), dp.data(), K + (bh * S + j0) * D, j0,
                          dvt.data(), dkt.data(), S, dq_acc.data());
        }
        T* dq_blk = DQ + (bh * Tq + i0) * D;
        for (int64_t x = 0; x < r * D; ++x) dq_blk[x] = dq_acc[x] * scale;
      }
      store_key_grads(dkt.data(), dvt.data(), S, S, D, Dv, scale, DK + bh * S * D, DV + bh * S * Dv);
    }
    gemm_release();
  });
}

at::ScalarType compute_type(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "CPU landmark attention supports float32, float64, bfloat16 and float16, got ", t);
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kpm, int64_t bs) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, N, d)");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1),
              "k, v must have q's batch and head counts (repeat grouped heads first)");
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(2) == k.size(2), "q, k, v shapes disagree: ", q.sizes(), k.sizes(),
              v.sizes());
  TORCH_CHECK(q.size(2) <= k.size(2) && q.size(2) > 0, "q must hold 1 to S positions (the last T of the S keys)");
  TORCH_CHECK(bs >= 2, "block_size must be >= 2, got ", bs);
  if (kpm.defined())
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == q.size(0) && kpm.size(1) == k.size(2), "key_padding_mask must be (",
                q.size(0), ", ", k.size(2), "), got ", kpm.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> landmark_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, const at::Tensor& kpm_in,
                                                    int64_t block_size, double scale) {
  check(q_in, k_in, v_in, kpm_in, block_size);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(ct).contiguous(), kt = k_in.to(ct).transpose(-1, -2).contiguous();
  const at::Tensor v = v_in.to(ct).contiguous();
  const at::Tensor kpm = kpm_in.defined() ? kpm_in.to(at::kCPU, at::kBool).contiguous() : at::Tensor();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const bool* pad = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  if (ct == at::kDouble)
    forward_kernel<double>(q, kt, v, pad, block_size, scale, out, lse);
  else
    forward_kernel<float>(q, kt, v, pad, block_size, static_cast<float>(scale), out, lse);
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_backward(const at::Tensor& grad_out,
                                                                 const at::Tensor& grad_lse, const at::Tensor& q_in,
                                                                 const at::Tensor& k_in, const at::Tensor& v_in,
                                                                 const at::Tensor& out, const at::Tensor& lse_in,
                                                                 const at::Tensor& kpm_in, int64_t block_size,
                                                                 double scale) {
  check(q_in, k_in, v_in, kpm_in, block_size);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous();
  const at::Tensor kt = k.transpose(-1, -2).contiguous(), vt = v_in.to(ct).transpose(-1, -2).contiguous();
  const at::Tensor dout = grad_out.to(ct).contiguous(), lse = lse_in.to(ct).contiguous();
  at::Tensor delta = (dout * out.to(ct)).sum(-1);  // D_i = sum_c dO_ic O_ic - dlse_i
  if (grad_lse.defined()) delta = delta - grad_lse.to(ct);
  delta = delta.contiguous();
  const at::Tensor kpm = kpm_in.defined() ? kpm_in.to(at::kCPU, at::kBool).contiguous() : at::Tensor();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);
  at::Tensor dv = at::empty({k.size(0), k.size(1), k.size(2), v_in.size(3)}, q.options());
  const bool* pad = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  if (ct == at::kDouble)
    backward_kernel<double>(dout, delta, q, k, kt, vt, lse, pad, block_size, scale, dq, dk, dv);
  else
    backward_kernel<float>(dout, delta, q, k, kt, vt, lse, pad, block_size, static_cast<float>(scale), dq, dk, dv);
  const auto st = q_in.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

}  // namespace ea
