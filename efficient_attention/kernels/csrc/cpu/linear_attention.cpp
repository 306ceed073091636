// Causal chunked linear attention (see linear_attention.h).  One task per (batch, head): the state stays in the
// cache while its thread walks the chunks, so nothing of size (chunks x state) is built but the saved states.
//
// Chunk n holds positions [i0, i0 + c); G_r (r < c) is the decay summed over positions i0 .. i0 + r and gl = G_{c-1}.
// With S_n the state entering the chunk (m x w, its last column z when normalizing) and V1 = [v, 1]:
//   O   = (Q K^T o D) V1 + (e^{G} o Q) S_n           D_rj = e^{G_r - G_j} for j <= r, else 0
//   S_{n+1} = e^{gl} S_n + (e^{gl - G} o K)^T V1
// and the backward, with dS the gradient of S_{n+1} (from the chunks after n and the final state):
//   dA  = (dO V1^T) o D,   dQ = dA K + (e^{G} o dO) S_n^T,   dK = dA^T Q + (e^{gl - G} o V1) dS^T,
//   dV1 = (Q K^T o D)^T dO + (e^{gl - G} o K) dS,   dS_n = e^{gl} dS + Q^T (e^{G} o dO).
// Every exponent is <= 0 when the log decays are.  GEMMs are row-major (micro.h): transposed operands are copied
// into small per-thread buffers first.
//
// Fused cosFormer features (cos_sin given): q and k hold d0 raw channels and the features, m = 2 d0 of them, are
// made per chunk in a buffer, [act(x) cos t, act(x) sin t] for position t (act: relu, or 1 + elu); the backward
// folds the features' gradients back through them, so no (T, 2 d0) tensor is ever allocated.
#include "linear_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "micro.h"

namespace ea {

namespace {

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// One chunk's decays: G (inclusive cumulative sum), e^{G}, e^{gl - G} and the c x c matrix D (row r, column j:
// e^{G_r - G_j} for j <= r, else 0).  Without decay: G = 0, the exponentials 1, D the causal 0/1 mask.
template <typename T>
struct ChunkDecay {
  std::vector<T> G, eg, egl, D;
  T e_total = T(1);
  explicit ChunkDecay(int64_t C) : G(C), eg(C), egl(C), D(C * C) {}

  void set(const T* g, int64_t c) {
    const T ninf = -std::numeric_limits<T>::infinity();
    if (!g) {
      std::fill(eg.begin(), eg.begin() + c, T(1));
      std::fill(egl.begin(), egl.begin() + c, T(1));
      for (int64_t r = 0; r < c; ++r)
        for (int64_t j = 0; j < c; ++j) D[r * c + j] = j <= r ? T(1) : T(0);
      e_total = T(1);
      return;
    }
    T run = T(0);
    for (int64_t r = 0; r < c; ++r) G[r] = run += g[r];
    const T gl = G[c - 1];
    for (int64_t r = 0; r < c; ++r) {
      eg[r] = G[r];
      egl[r] = gl - G[r];
      for (int64_t j = 0; j < c; ++j) D[r * c + j] = j <= r ? G[r] - G[j] : ninf;
    }
    exp_inplace(eg.data(), c);
    exp_inplace(egl.data(), c);
    exp_inplace(D.data(), c * c);
    e_total = eg[c - 1];
  }
};

// rows x cols block: x[r][:] *= s[r]
template <typename T>
void scale_rows(T* x, int64_t rows, int64_t cols, int64_t ld, const T* s) {
  for (int64_t r = 0; r < rows; ++r) {
    const T f = s[r];
    T* xr = x + r * ld;
    for (int64_t c = 0; c < cols; ++c) xr[c] *= f;
  }
}

template <typename T>
void multiply(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= y[i];
}

// x (c x m, row stride m) with row r scaled by s[r], in buf; x itself when s is null (no decay)
template <typename T>
const T* scaled_rows(const T* x, int64_t c, int64_t m, const T* s, T* buf) {
  if (!s) return x;
  std::copy(x, x + c * m, buf);
  scale_rows(buf, c, m, m, s);
  return buf;
}

// v1 (c x w) = [v, 1] for c rows of v (row stride d); the ones column only when normalizing (w = d + 1)
template <typename T>
void values_with_ones(const T* v, int64_t c, int64_t d, bool normalize, T* v1) {
  const int64_t w = d + (normalize ? 1 : 0);
  for (int64_t r = 0; r < c; ++r) {
    std::copy(v + r * d, v + (r + 1) * d, v1 + r * w);
    if (normalize) v1[r * w + d] = T(1);
  }
}

// x (c x c) *= D^T, i.e. x[j][i] *= D[i][j]
template <typename T>
void multiply_transposed(T* x, const T* D, int64_t c) {
  for (int64_t j = 0; j < c; ++j)
    for (int64_t i = 0; i < c; ++i) x[j * c + i] *= D[i * c + j];
}

// The features of c rows x (c x d0, row stride d0) at positions with cos/sin rows cs (c x 2): out (c x 2 d0).
template <typename T>
void make_features(const T* x, const T* cs, int64_t c, int64_t d0, int64_t act, T* out) {
  for (int64_t r = 0; r < c; ++r) {
    const T* xr = x + r * d0;
    T* o = out + r * 2 * d0;
    const T co = cs[2 * r], si = cs[2 * r + 1];
    for (int64_t j = 0; j < d0; ++j) {
      const T v = xr[j];
      const T a = act == 0 ? (v > T(0) ? v : T(0)) : (v > T(0) ? v + T(1) : std::exp(v));
      o[j] = a * co;
      o[d0 + j] = a * si;
    }
  }
}

// The gradient at x of make_features for the features' gradient g (c x 2 d0): dx (c x d0, row stride d0).
template <typename T>
void fold_features(const T* g, const T* x, const T* cs, int64_t c, int64_t d0, int64_t act, T* dx) {
  for (int64_t r = 0; r < c; ++r) {
    const T* gr = g + r * 2 * d0;
    const T* xr = x + r * d0;
    T* o = dx + r * d0;
    const T co = cs[2 * r], si = cs[2 * r + 1];
    for (int64_t j = 0; j < d0; ++j) {
      const T v = xr[j];
      const T da = act == 0 ? (v > T(0) ? T(1) : T(0)) : (v > T(0) ? T(1) : std::exp(v));
      o[j] = da * (gr[j] * co + gr[d0 + j] * si);
    }
  }
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
                    const at::Tensor& h0, const at::Tensor& z0, const at::Tensor& cos_sin, int64_t act, bool normalize,
                    int64_t C, at::Tensor& num, at::Tensor& den, at::Tensor& states, at::Tensor& hf, at::Tensor& zf) {
  const int64_t BH = q.size(0) * q.size(1), L = q.size(2), d0 = q.size(3), d = v.size(3);
  const T* CS = cos_sin.defined() ? cos_sin.data_ptr<T>() : nullptr;
  const int64_t m = CS ? 2 * d0 : d0;
  const int64_t w = d + (normalize ? 1 : 0), N = (L + C - 1) / C;
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  const T* Gd = log_decay.defined() ? log_decay.data_ptr<T>() : nullptr;
  const T* H0 = h0.defined() ? h0.data_ptr<T>() : nullptr;
  const T* Z0 = z0.defined() ? z0.data_ptr<T>() : nullptr;
  T *NUM = num.data_ptr<T>(), *DEN = normalize ? den.data_ptr<T>() : nullptr, *ST = states.data_ptr<T>();
  T *HF = hf.data_ptr<T>(), *ZF = normalize ? zf.data_ptr<T>() : nullptr;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    ChunkDecay<T> dec(C);
    std::vector<T> S(m * w), kt(m * C), a(C * C), v1(C * w), o(C * w), qd(C * m);
    std::vector<T> qf(CS ? C * m : 0), kf(CS ? C * m : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t r = 0; r < m; ++r) {  // S_0 = [H_0, z_0]
        for (int64_t c = 0; c < d; ++c) S[r * w + c] = H0 ? H0[(bh * m + r) * d + c] : T(0);
        if (normalize) S[r * w + d] = Z0 ? Z0[bh * m + r] : T(0);
      }
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i0 = n * C, c = std::min(C, L - i0);
        const T* q_c = Q + (bh * L + i0) * d0;
        const T* k_c = K + (bh * L + i0) * d0;
        const T* v_c = V + (bh * L + i0) * d;
        if (CS) {
          make_features(q_c, CS + 2 * i0, c, d0, act, qf.data());
          make_features(k_c, CS + 2 * i0, c, d0, act, kf.data());
          q_c = qf.data();
          k_c = kf.data();
        }
        dec.set(Gd ? Gd + bh * L + i0 : nullptr, c);
        transpose(S.data(), m, w, w, ST + ((bh * N + n) * w) * m, m);  // saved: S_n^T
        transpose(k_c, c, m, m, kt.data(), c);
        values_with_ones(v_c, c, d, normalize, v1.data());
        gemm(c, c, m, q_c, m, kt.data(), c, a.data(), c, false);  // Q K^T
        multiply(a.data(), dec.D.data(), c * c);
        gemm(c, w, c, a.data(), c, v1.data(), w, o.data(), w, false);
        const T* qs = scaled_rows(q_c, c, m, Gd ? dec.eg.data() : nullptr, qd.data());  // e^{G} o Q
        gemm(c, w, m, qs, m, S.data(), w, o.data(), w, true);
        for (int64_t r = 0; r < c; ++r) {
          std::copy(o.data() + r * w, o.data() + r * w + d, NUM + (bh * L + i0 + r) * d);
          if (normalize) DEN[bh * L + i0 + r] = o[r * w + d];
        }
        if (Gd) {  // S = e^{gl} S + (e^{gl - G} o K)^T V1
          for (int64_t x = 0; x < m * w; ++x) S[x] *= dec.e_total;
          for (int64_t r = 0; r < m; ++r) multiply(kt.data() + r * c, dec.egl.data(), c);
        }
        gemm(m, w, c, kt.data(), c, v1.data(), w, S.data(), w, true);
      }
      for (int64_t r = 0; r < m; ++r) {
        std::copy(S.data() + r * w, S.data() + r * w + d, HF + (bh * m + r) * d);
        if (normalize) ZF[bh * m + r] = S[r * w + d];
      }
    }
    gemm_release();
  });
}

template <typename T>
void backward_kernel(const at::Tensor& g_num, const at::Tensor& g_den, const at::Tensor& g_h, const at::Tensor& g_z,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
                     const at::Tensor& states, const at::Tensor& cos_sin, int64_t act, bool normalize, int64_t C,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dh0, at::Tensor& dz0) {
  const int64_t BH = q.size(0) * q.size(1), L = q.size(2), d0 = q.size(3), d = v.size(3);
  const T* CS = cos_sin.defined() ? cos_sin.data_ptr<T>() : nullptr;
  const int64_t m = CS ? 2 * d0 : d0;
  const int64_t w = d + (normalize ? 1 : 0), N = (L + C - 1) / C;
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>(), *ST = states.data_ptr<T>();
  const T* Gd = log_decay.defined() ? log_decay.data_ptr<T>() : nullptr;
  const T* GN = g_num.defined() ? g_num.data_ptr<T>() : nullptr;
  const T* GD = normalize && g_den.defined() ? g_den.data_ptr<T>() : nullptr;
  const T* GH = g_h.defined() ? g_h.data_ptr<T>() : nullptr;
  const T* GZ = normalize && g_z.defined() ? g_z.data_ptr<T>() : nullptr;
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  T *DH = dh0.data_ptr<T>(), *DZ = normalize ? dz0.data_ptr<T>() : nullptr;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    ChunkDecay<T> dec(C);
    std::vector<T> dS(m * w), dSt(w * m), qt(m * C), at(C * C), dat(C * C), da(C * C), v1(C * w), do1(C * w),
        do1t(w * C), dv1(C * w), kd(C * m);
    std::vector<T> qf(CS ? C * m : 0), kf(CS ? C * m : 0), dqf(CS ? C * m : 0), dkf(CS ? C * m : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t r = 0; r < m; ++r) {  // the gradient of the final state
        for (int64_t c = 0; c < d; ++c) dS[r * w + c] = GH ? GH[(bh * m + r) * d + c] : T(0);
        if (normalize) dS[r * w + d] = GZ ? GZ[bh * m + r] : T(0);
      }
      for (int64_t n = N - 1; n >= 0; --n) {
        const int64_t i0 = n * C, c = std::min(C, L - i0);
        const T* q_c = Q + (bh * L + i0) * d0;
        const T* k_c = K + (bh * L + i0) * d0;
        const T* v_c = V + (bh * L + i0) * d;
        T* dq_c = DQ + (bh * L + i0) * d0;
        T* dk_c = DK + (bh * L + i0) * d0;
        if (CS) {  // the features in buffers, their gradients too (folded into dq, dk at the chunk's end)
          make_features(q_c, CS + 2 * i0, c, d0, act, qf.data());
          make_features(k_c, CS + 2 * i0, c, d0, act, kf.data());
          q_c = qf.data();
          k_c = kf.data();
          dq_c = dqf.data();
          dk_c = dkf.data();
        }
        const T* st = ST + ((bh * N + n) * w) * m;  // S_n^T (w x m)
        dec.set(Gd ? Gd + bh * L + i0 : nullptr, c);
        values_with_ones(v_c, c, d, normalize, v1.data());
        for (int64_t r = 0; r < c; ++r) {  // dO1 = [d num, d den]
          T* dr = do1.data() + r * w;
          if (GN)
            std::copy(GN + (bh * L + i0 + r) * d, GN + (bh * L + i0 + r + 1) * d, dr);
          else
            std::fill(dr, dr + d, T(0));
          if (normalize) dr[d] = GD ? GD[bh * L + i0 + r] : T(0);
        }
        transpose(q_c, c, m, m, qt.data(), c);
        transpose(do1.data(), c, w, w, do1t.data(), c);
        gemm(c, c, m, k_c, m, qt.data(), c, at.data(), c, false);  // (Q K^T)^T
        multiply_transposed(at.data(), dec.D.data(), c);
        gemm(c, c, w, v1.data(), w, do1t.data(), c, dat.data(), c, false);  // (dO V1^T)^T
        multiply_transposed(dat.data(), dec.D.data(), c);                  // dA^T
        // dV1 = A^T dO + (e^{gl - G} o K) dS
        gemm(c, w, c, at.data(), c, do1.data(), w, dv1.data(), w, false);
        const T* ks = scaled_rows(k_c, c, m, Gd ? dec.egl.data() : nullptr, kd.data());  // e^{gl - G} o K
        gemm(c, w, m, ks, m, dS.data(), w, dv1.data(), w, true);
        for (int64_t r = 0; r < c; ++r) std::copy(dv1.data() + r * w, dv1.data() + r * w + d, DV + (bh * L + i0 + r) * d);
        // dK = dA^T Q + (e^{gl - G} o V1) dS^T
        gemm(c, m, c, dat.data(), c, q_c, m, dk_c, m, false);
        transpose(dS.data(), m, w, w, dSt.data(), m);
        if (Gd) scale_rows(v1.data(), c, w, w, dec.egl.data());
        gemm(c, m, w, v1.data(), w, dSt.data(), m, dk_c, m, true);
        // dQ = dA K + (e^{G} o dO) S_n^T
        transpose(dat.data(), c, c, c, da.data(), c);
        gemm(c, m, c, da.data(), c, k_c, m, dq_c, m, false);
        if (Gd) scale_rows(do1.data(), c, w, w, dec.eg.data());
        gemm(c, m, w, do1.data(), w, st, m, dq_c, m, true);
        // dS_n = e^{gl} dS + Q^T (e^{G} o dO)
        if (Gd)
          for (int64_t x = 0; x < m * w; ++x) dS[x] *= dec.e_total;
        gemm(m, w, c, qt.data(), c, do1.data(), w, dS.data(), w, true);
        if (CS) {
          fold_features(dqf.data(), Q + (bh * L + i0) * d0, CS + 2 * i0, c, d0, act, DQ + (bh * L + i0) * d0);
          fold_features(dkf.data(), K + (bh * L + i0) * d0, CS + 2 * i0, c, d0, act, DK + (bh * L + i0) * d0);
        }
      }
      for (int64_t r = 0; r < m; ++r) {
        std::copy(dS.data() + r * w, dS.data() + r * w + d, DH + (bh * m + r) * d);
        if (normalize) DZ[bh * m + r] = dS[r * w + d];
      }
    }
    gemm_release();
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_decay,
                  const at::Tensor& cos_sin, int64_t act, int64_t chunk) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, T, dim)");
  TORCH_CHECK(q.sizes() == k.sizes(), "causal linear attention needs q and k of one shape, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), "v ", v.sizes(),
              " must be (B, H, T, d) with q's B, H, T");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the CPU linear attention kernel takes float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(chunk > 0, "chunk must be positive, got ", chunk);
  if (log_decay.defined())
    TORCH_CHECK(log_decay.dim() == 3 && log_decay.size(0) == q.size(0) && log_decay.size(1) == q.size(1) &&
                    log_decay.size(2) == q.size(2),
                "log_decay must be (B, H, T), got ", log_decay.sizes());
  if (cos_sin.defined())
    TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(0) == q.size(2) && cos_sin.size(1) == 2,
                "cos_sin must be (T, 2) = (", q.size(2), ", 2), got ", cos_sin.sizes());
  TORCH_CHECK(act == 0 || act == 1, "act must be 0 (relu) or 1 (1 + elu), got ", act);
}

at::Tensor prepared(const at::Tensor& x, at::ScalarType t) { return x.defined() ? x.to(t).contiguous() : x; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_causal_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& log_decay_in,
    const at::Tensor& h0_in, const at::Tensor& z0_in, const at::Tensor& cos_sin_in, int64_t act, bool normalize,
    int64_t chunk) {
  check_inputs(q_in, k_in, v_in, log_decay_in, cos_sin_in, act, chunk);
  const auto t = q_in.scalar_type();
  const at::Tensor q = prepared(q_in, t), k = prepared(k_in, t), v = prepared(v_in, t);
  const at::Tensor g = prepared(log_decay_in, t), h0 = prepared(h0_in, t);
  const at::Tensor z0 = normalize ? prepared(z0_in, t) : at::Tensor(), cos_sin = prepared(cos_sin_in, t);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = v.size(3);
  const int64_t m = cos_sin.defined() ? 2 * q.size(3) : q.size(3);
  const int64_t N = (L + chunk - 1) / chunk, w = d + (normalize ? 1 : 0);
  if (h0.defined()) TORCH_CHECK(h0.sizes() == at::IntArrayRef({B, H, m, d}), "h0 must be (B, H, m, d)");
  if (z0.defined()) TORCH_CHECK(z0.sizes() == at::IntArrayRef({B, H, m}), "z0 must be (B, H, m)");
  at::Tensor num = at::empty({B, H, L, d}, q.options());
  at::Tensor den = at::empty(normalize ? at::IntArrayRef({B, H, L}) : at::IntArrayRef({0}), q.options());
  at::Tensor states = at::empty({B, H, N, w, m}, q.options());
  at::Tensor hf = at::empty({B, H, m, d}, q.options());
  at::Tensor zf = at::empty(normalize ? at::IntArrayRef({B, H, m}) : at::IntArrayRef({0}), q.options());
  if (t == at::kDouble)
    forward_kernel<double>(q, k, v, g, h0, z0, cos_sin, act, normalize, chunk, num, den, states, hf, zf);
  else
    forward_kernel<float>(q, k, v, g, h0, z0, cos_sin, act, normalize, chunk, num, den, states, hf, zf);
  return {num, den, states, hf, zf};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_causal_backward(
    const at::Tensor& grad_num, const at::Tensor& grad_den, const at::Tensor& grad_h, const at::Tensor& grad_z,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& log_decay_in,
    const at::Tensor& states_in, const at::Tensor& cos_sin_in, int64_t act, bool normalize, int64_t chunk) {
  check_inputs(q_in, k_in, v_in, log_decay_in, cos_sin_in, act, chunk);
  const auto t = q_in.scalar_type();
  const at::Tensor q = prepared(q_in, t), k = prepared(k_in, t), v = prepared(v_in, t);
  const at::Tensor g = prepared(log_decay_in, t), states = prepared(states_in, t), cos_sin = prepared(cos_sin_in, t);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = v.size(3);
  const int64_t m = cos_sin.defined() ? 2 * q.size(3) : q.size(3);
  const int64_t N = (L + chunk - 1) / chunk, w = d + (normalize ? 1 : 0);
  TORCH_CHECK(states.sizes() == at::IntArrayRef({B, H, N, w, m}), "states must be (B, H, N, w, m) = ",
              at::IntArrayRef({B, H, N, w, m}), ", got ", states.sizes());
  const at::Tensor gn = prepared(grad_num, t), gd = prepared(grad_den, t);
  const at::Tensor gh = prepared(grad_h, t), gz = prepared(grad_z, t);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dh0 = at::empty({B, H, m, d}, q.options());
  at::Tensor dz0 = at::empty(normalize ? at::IntArrayRef({B, H, m}) : at::IntArrayRef({0}), q.options());
  if (t == at::kDouble)
    backward_kernel<double>(gn, gd, gh, gz, q, k, v, g, states, cos_sin, act, normalize, chunk, dq, dk, dv, dh0, dz0);
  else
    backward_kernel<float>(gn, gd, gh, gz, q, k, v, g, states, cos_sin, act, normalize, chunk, dq, dk, dv, dh0, dz0);
  return {dq, dk, dv, dh0, dz0};
}

}  // namespace ea
