// FlashAttention-2 style blocked attention over a sparse plan (see sparse_attention.h).
// Forward: one task per (batch, head, query block); online softmax over the block's key
// tiles; masked tiles are never visited.  Backward: one task per (batch, head) (it owns
// that head's dk/dv), recomputing the probabilities from the saved log-sum-exp and using
// D = rowsum(dO * O) - dlse.
#include "sparse_attention.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <cmath>
#include <limits>

#include "attention_tiles.h"
#include "micro.h"

namespace ea {

namespace {
std::atomic<int> g_brgemm{-1};  // -1 unknown, 0 off, 1 on

bool probe_brgemm() {
  try {
    float a = 1.0f, b = 2.0f, c = 0.0f;
    at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
    at::native::cpublas::brgemm_release(false);
    return c == 2.0f;
  } catch (...) {
    return false;
  }
}

constexpr int64_t kMaxTile = 256;

}  // namespace

bool brgemm_available() {
  static const bool ok = probe_brgemm();
  return ok;
}
bool use_brgemm() {
  int s = g_brgemm.load(std::memory_order_relaxed);
  if (s < 0) {
    s = brgemm_available() ? 1 : 0;
    g_brgemm.store(s);
  }
  return s == 1;
}
void set_use_brgemm(bool on) { g_brgemm.store(on && brgemm_available() ? 1 : 0); }

void push_tiles(Plan& plan, int64_t a, int64_t b, int64_t max_tile) {
  for (int64_t j = a; j < b; j += max_tile) {
    plan.tiles.push_back(j);
    plan.tiles.push_back(std::min(b, j + max_tile));
  }
}

Plan window_plan(const RowRule& rule, int64_t T, int64_t S, int64_t block_q) {
  Plan plan;
  plan.block_q = block_q;
  plan.heads = 1;
  plan.n_qblocks = (T + block_q - 1) / block_q;
  plan.ptr.reserve(plan.n_qblocks + 1);
  plan.ptr.push_back(0);
  for (int64_t qb = 0; qb < plan.n_qblocks; ++qb) {
    const int64_t i0 = qb * block_q, i1 = std::min(T, i0 + block_q);
    // lo and hi are non-decreasing in i: the block needs [lo(i0), hi(i1 - 1)]
    const int64_t a = std::max<int64_t>(0, rule.lo(i0)), b = std::min<int64_t>(S, rule.hi(i1 - 1) + 1);
    push_tiles(plan, a, b, kMaxTile);
    plan.ptr.push_back(static_cast<int64_t>(plan.tiles.size() / 2));
  }
  return plan;
}

Plan mask_plan(const at::Tensor& idx_in, const at::Tensor& cnt_in, const at::Tensor& tile_in,
               const at::Tensor& masks, const RowRule& rule, int64_t T, int64_t S, int64_t bs) {
  TORCH_CHECK(idx_in.dim() == 3 && cnt_in.dim() == 2, "block tables must be idx (H, nq, nk) and cnt (H, nq)");
  const int64_t nq = (T + bs - 1) / bs, nk = (S + bs - 1) / bs;
  TORCH_CHECK(idx_in.size(1) == nq && idx_in.size(2) == nk, "block tables must have shape (H or 1, ", nq, ", ", nk,
              "), got ", idx_in.sizes());
  const at::Tensor idx = idx_in.to(at::kCPU, at::kInt).contiguous(), cnt = cnt_in.to(at::kCPU, at::kInt).contiguous();
  const bool has_tiles = tile_in.defined();
  const at::Tensor tile = has_tiles ? tile_in.to(at::kCPU, at::kInt).contiguous() : at::Tensor();
  const int32_t* I = idx.data_ptr<int32_t>();
  const int32_t* C = cnt.data_ptr<int32_t>();
  const int32_t* M = has_tiles ? tile.data_ptr<int32_t>() : nullptr;
  Plan plan;
  plan.block_q = bs;
  plan.heads = idx.size(0);
  plan.n_qblocks = nq;
  if (has_tiles) {
    TORCH_CHECK(masks.defined() && masks.dim() == 3 && masks.size(1) == bs && masks.size(2) == bs,
                "tiles must be (P, ", bs, ", ", bs, ")");
    plan.masks = masks.to(at::kCPU, at::kByte).contiguous();
  }
  plan.ptr.reserve(plan.heads * nq + 1);
  plan.ptr.push_back(0);
  const int64_t max_tile = std::max(bs, (kMaxTile / bs) * bs);
  auto push = [&](int64_t a, int64_t b, int64_t m) {
    if (a >= b) return;
    if (m >= 0) {  // one layout block with a token mask
      plan.tiles.push_back(a);
      plan.tiles.push_back(b);
      plan.tile_mask.push_back(m);
      return;
    }
    const size_t before = plan.tiles.size() / 2;
    push_tiles(plan, a, b, max_tile);
    if (has_tiles) plan.tile_mask.resize(plan.tile_mask.size() + plan.tiles.size() / 2 - before, -1);
  };
  for (int64_t h = 0; h < plan.heads; ++h) {
    for (int64_t qb = 0; qb < nq; ++qb) {
      const int64_t row = h * nq + qb, n = C[row];
      const int32_t* cols = I + row * nk;
      const int32_t* tl = M ? M + row * nk : nullptr;
      const int64_t i0 = qb * bs, i1 = std::min(T, i0 + bs);
      const int64_t lo = std::max<int64_t>(0, rule.lo(i0)), hi = std::min<int64_t>(S, rule.hi(i1 - 1) + 1);
      for (int64_t e = 0; e < n;) {
        const int64_t kb = cols[e];
        if (tl && tl[e] >= 0) {  // partial block: its own tile
          push(std::max(lo, kb * bs), std::min(hi, std::min(S, (kb + 1) * bs)), tl[e]);
          ++e;
          continue;
        }
        int64_t f = e + 1;  // a run of consecutive full blocks -> contiguous keys
        while (f < n && cols[f] == cols[f - 1] + 1 && !(tl && tl[f] >= 0)) ++f;
        push(std::max(lo, kb * bs), std::min(hi, std::min(S, (cols[f - 1] + 1) * bs)), -1);
        e = f;
      }
      plan.ptr.push_back(static_cast<int64_t>(plan.tiles.size() / 2));
    }
  }
  return plan;
}

namespace {

// Scores of the keys a block mask's token mask hides become -inf (then exp gives exactly 0).
template <typename T>
inline void apply_token_mask(T* x, int64_t n, const uint8_t* keep) {
  if (!keep) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] : ninf;
}

// Leading dimension of the transposed (d, S) operands: padded off powers of two, whose 4 KiB
// aliasing would make the rows of a GEMM tile collide in the L1/L2 cache sets.
inline int64_t padded_ld(int64_t S) { return ((S + 15) / 16) * 16 + 16; }

// x (B, H, S, d) -> (B, H, d, ld) with ld = padded_ld(S)
at::Tensor transposed_padded(const at::Tensor& x) {
  const int64_t S = x.size(2), ld = padded_ld(S);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(3), ld}, x.options());
  out.narrow(-1, 0, S).copy_(x.transpose(-1, -2));
  return out;
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* pad,
                    const RowRule& rule, const Plan& plan, T scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  const at::Tensor kt = transposed_padded(k);  // (B, H, D, ldS): keys as GEMM columns
  const int64_t ldS = kt.size(-1);
  const T* Q = q.data_ptr<T>();
  const T* KT = kt.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  T* LSE = lse.data_ptr<T>();
  const int64_t BQ = plan.block_q, NQB = plan.n_qblocks;
  at::parallel_for(0, B * H * NQB, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(BQ * kMaxTile), acc(BQ * Dv), m(BQ), l(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % NQB, bh = task / NQB, h = bh % H, b = bh / H;
      const int64_t i0 = qb * BQ, M = std::min(Tq, i0 + BQ) - i0;
      const T* q_blk = Q + (bh * Tq + i0) * D;
      const T* kt_bh = KT + bh * D * ldS;
      const T* v_bh = V + bh * S * Dv;
      const bool* pad_b = pad ? pad + b * S : nullptr;
      start_rows(acc.data(), m.data(), l.data(), M, Dv);
      for (int64_t t = plan.begin(h, qb); t < plan.end(h, qb); ++t) {
        const int64_t j0 = plan.tiles[2 * t], j1 = plan.tiles[2 * t + 1], n = j1 - j0;
        gemm(M, n, D, q_blk, D, kt_bh + j0, ldS, s.data(), n, false);
        for (int64_t r = 0; r < M; ++r) {
          T* sr = s.data() + r * n;
          const int64_t i = i0 + r;
          apply_token_mask(sr, n, plan.mask_row(t, r));
          const T mt = mask_scale_max(sr, n, rule.lo(i) - j0, rule.hi(i) - j0, pad_b ? pad_b + j0 : nullptr, scale);
          online_softmax_row(sr, n, mt, m[r], l[r], acc.data() + r * Dv, Dv);
        }
        gemm(M, Dv, n, s.data(), n, v_bh + j0 * Dv, Dv, acc.data(), Dv, true);
      }
      finish_rows(acc.data(), m.data(), l.data(), M, Dv, O + (bh * Tq + i0) * Dv, LSE + bh * Tq + i0);
    }
    gemm_release();
  });
}

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& delta, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const bool* pad, const RowRule& rule, const Plan& plan,
                     T scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  const at::Tensor kt = transposed_padded(k);  // (B, H, D, ldS)
  const at::Tensor vt = transposed_padded(v);  // (B, H, Dv, ldS)
  const int64_t ldS = kt.size(-1);
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *KT = kt.data_ptr<T>(), *VT = vt.data_ptr<T>();
  const T* DO = dout.data_ptr<T>();
  const T* LSE = lse.data_ptr<T>();
  const T* DELTA = delta.data_ptr<T>();
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  const int64_t BQ = plan.block_q, NQB = plan.n_qblocks;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // dK^T, dV^T accumulate as (D, S) so every GEMM reads its operands as stored: the only
    // transposes are Q^T and dO^T, once per query block (not per key tile).
    std::vector<T> p(BQ * kMaxTile), dp(BQ * kMaxTile), dq_acc(BQ * D), qt(D * BQ), dot(Dv * BQ);
    std::vector<T> dkt(D * ldS), dvt(Dv * ldS);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % H, b = bh / H;
      const bool* pad_b = pad ? pad + b * S : nullptr;
      std::fill(dkt.begin(), dkt.end(), T(0));
      std::fill(dvt.begin(), dvt.end(), T(0));
      for (int64_t qb = 0; qb < NQB; ++qb) {
        if (plan.begin(h, qb) == plan.end(h, qb)) continue;
        const int64_t i0 = qb * BQ, M = std::min(Tq, i0 + BQ) - i0;
        const T* q_blk = Q + (bh * Tq + i0) * D;
        const T* do_blk = DO + (bh * Tq + i0) * Dv;
        const T* lse_blk = LSE + bh * Tq + i0;
        const T* delta_blk = DELTA + bh * Tq + i0;
        transpose_query_block(q_blk, do_blk, M, D, Dv, qt.data(), dot.data());
        std::fill(dq_acc.begin(), dq_acc.begin() + M * D, T(0));
        for (int64_t t = plan.begin(h, qb); t < plan.end(h, qb); ++t) {
          const int64_t j0 = plan.tiles[2 * t], j1 = plan.tiles[2 * t + 1], n = j1 - j0;
          gemm(M, n, D, q_blk, D, KT + bh * D * ldS + j0, ldS, p.data(), n, false);          // S = Q K^T
          gemm(M, n, Dv, do_blk, Dv, VT + bh * Dv * ldS + j0, ldS, dp.data(), n, false);     // dP = dO V^T
          for (int64_t r = 0; r < M; ++r) {
            T* pr = p.data() + r * n;
            T* dpr = dp.data() + r * n;
            const int64_t i = i0 + r;
            const T lr = lse_blk[r];
            apply_token_mask(pr, n, plan.mask_row(t, r));
            if (lr == -std::numeric_limits<T>::infinity()) {
              std::fill(pr, pr + n, T(0));
            } else {
              probs(pr, n, rule.lo(i) - j0, rule.hi(i) - j0, pad_b ? pad_b + j0 : nullptr, scale, lr);
            }
            const T dr = delta_blk[r];
            for (int64_t j = 0; j < n; ++j) dpr[j] = pr[j] * (dpr[j] - dr);            // dS (w.r.t. scaled scores)
          }
          accumulate_tile(M, n, D, Dv, dot.data(), qt.data(), p.data(), dp.data(), K + (bh * S + j0) * D, j0,
                          dvt.data(), dkt.data(), ldS, dq_acc.data());
        }
        T* dq_blk = DQ + (bh * Tq + i0) * D;
        for (int64_t x = 0; x < M * D; ++x) dq_blk[x] = dq_acc[x] * scale;
      }
      store_key_grads(dkt.data(), dvt.data(), ldS, S, D, Dv, scale, DK + bh * S * D, DV + bh * S * Dv);
    }
    gemm_release();
  });
}

at::Tensor pad_mask(const c10::optional<at::Tensor>& kpm, int64_t B, int64_t S) {
  if (!kpm.has_value() || !kpm->defined()) return at::Tensor();
  TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == B && kpm->size(1) == S, "key_padding_mask must be (", B, ", ", S,
              "), got ", kpm->sizes());
  return kpm->to(at::kCPU, at::kBool).contiguous();
}

at::ScalarType compute_type(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
              "CPU sparse attention supports float32, float64, bfloat16 and float16, got ", t);
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, N, d)");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "q, k, v batch sizes differ");
  TORCH_CHECK(k.size(1) == q.size(1) && v.size(1) == q.size(1), "k, v must have q's head count (repeat GQA heads first)");
  TORCH_CHECK(k.size(3) == q.size(3), "q and k head dims differ");
  TORCH_CHECK(v.size(2) == k.size(2), "k and v lengths differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const c10::optional<at::Tensor>& kpm,
                                                     const RowRule& rule, const Plan& plan, double scale) {
  check_qkv(q_in, k_in, v_in);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous(), v = v_in.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), S = k.size(2);
  TORCH_CHECK(plan.heads == 1 || plan.heads == H, "plan heads mismatch");
  at::Tensor out = at::empty({B, H, T, v.size(3)}, q.options());
  at::Tensor lse = at::empty({B, H, T}, q.options());  // fp32 (fp64 for fp64 inputs)
  const at::Tensor pad = pad_mask(kpm, B, S);
  const bool* pad_ptr = pad.defined() ? pad.data_ptr<bool>() : nullptr;
  if (ct == at::kDouble)
    forward_kernel<double>(q, k, v, pad_ptr, rule, plan, scale, out, lse);
  else
    forward_kernel<float>(q, k, v, pad_ptr, rule, plan, static_cast<float>(scale), out, lse);
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const c10::optional<at::Tensor>& kpm, const RowRule& rule, const Plan& plan, double scale) {
  check_qkv(q_in, k_in, v_in);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(ct).contiguous(), k = k_in.to(ct).contiguous(), v = v_in.to(ct).contiguous();
  const at::Tensor dout = grad_out.to(ct).contiguous();
  const at::Tensor lse = lse_in.to(ct).contiguous();
  const int64_t B = q.size(0), S = k.size(2);
  // D_i = sum_c dO_ic O_ic - dlse_i   (in the compute type)
  at::Tensor delta = (dout * out_in.to(ct)).sum(-1);
  if (grad_lse.has_value() && grad_lse->defined()) delta = delta - grad_lse->to(ct);
  delta = delta.contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const at::Tensor pad = pad_mask(kpm, B, S);
  const bool* pad_ptr = pad.defined() ? pad.data_ptr<bool>() : nullptr;
  if (ct == at::kDouble)
    backward_kernel<double>(dout, delta, q, k, v, lse, pad_ptr, rule, plan, scale, dq, dk, dv);
  else
    backward_kernel<float>(dout, delta, q, k, v, lse, pad_ptr, rule, plan, static_cast<float>(scale), dq, dk, dv);
  const auto st = q_in.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

}  // namespace ea
