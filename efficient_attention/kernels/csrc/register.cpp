// Operator schemas (TORCH_LIBRARY) and their CPU implementations; the Python side
// (efficient_attention/kernels/_cpu_ops.py) adds the fake impls and autograd.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/landmark_attention.h"
#include "cpu/linear_attention.h"
#include "cpu/sparse_attention.h"

namespace {

constexpr int64_t kWindowBlock = 64;

ea::RowRule window_rule(int64_t group, int64_t left, int64_t right, bool causal, int64_t q_offset) {
  TORCH_CHECK(group > 0 && left >= 0 && right >= 0, "invalid window (group ", group, ", left ", left, ", right ",
              right, ")");
  ea::RowRule r;
  r.group = group;
  r.left = std::min(left, ea::kUnbounded);
  r.right = std::min(right, ea::kUnbounded);
  r.causal = causal;
  r.offset = q_offset;
  return r;
}

ea::RowRule block_rule(bool causal, int64_t T, int64_t S) {
  ea::RowRule r;  // unbounded band; causal: j <= i + S - T
  r.causal = causal;
  r.right = causal ? 0 : ea::kUnbounded;
  r.offset = S - T;
  return r;
}

std::tuple<at::Tensor, at::Tensor> sliding_window_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& kpm, int64_t group,
                                                      int64_t left, int64_t right, bool causal, int64_t q_offset,
                                                      double scale) {
  const auto rule = window_rule(group, left, right, causal, q_offset);
  const auto plan = ea::window_plan(rule, q.size(2), k.size(2), kWindowBlock);
  return ea::attention_forward(q, k, v, kpm, rule, plan, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliding_window_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& kpm,
    int64_t group, int64_t left, int64_t right, bool causal, int64_t q_offset, double scale) {
  const auto rule = window_rule(group, left, right, causal, q_offset);
  const auto plan = ea::window_plan(rule, q.size(2), k.size(2), kWindowBlock);
  return ea::attention_backward(grad_out, grad_lse, q, k, v, out, lse, kpm, rule, plan, scale);
}

at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

ea::Plan block_mask_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_idx,
                         const at::Tensor& row_cnt, const c10::optional<at::Tensor>& row_tile,
                         const c10::optional<at::Tensor>& tiles, int64_t block_size, const ea::RowRule& rule) {
  TORCH_CHECK(block_size > 0, "block_size must be positive");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q, k must be 4-D (B, H, N, d)");
  TORCH_CHECK(row_idx.size(0) == 1 || row_idx.size(0) == q.size(1), "block mask heads must be 1 or ", q.size(1));
  return ea::mask_plan(row_idx, row_cnt, opt(row_tile), opt(tiles), rule, q.size(2), k.size(2), block_size);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& row_idx, const at::Tensor& row_cnt,
                                                    const c10::optional<at::Tensor>& row_tile,
                                                    const c10::optional<at::Tensor>& tiles, int64_t block_size,
                                                    bool causal, const c10::optional<at::Tensor>& kpm, double scale) {
  const auto rule = block_rule(causal, q.size(2), k.size(2));
  const auto plan = block_mask_plan(q, k, row_idx, row_cnt, row_tile, tiles, block_size, rule);
  return ea::attention_forward(q, k, v, kpm, rule, plan, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& row_idx,
    const at::Tensor& row_cnt, const c10::optional<at::Tensor>& row_tile, const c10::optional<at::Tensor>& tiles,
    int64_t block_size, bool causal, const c10::optional<at::Tensor>& kpm, double scale) {
  const auto rule = block_rule(causal, q.size(2), k.size(2));
  const auto plan = block_mask_plan(q, k, row_idx, row_cnt, row_tile, tiles, block_size, rule);
  return ea::attention_backward(grad_out, grad_lse, q, k, v, out, lse, kpm, rule, plan, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_causal_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& log_decay,
    const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& z0, bool normalize, int64_t chunk,
    const c10::optional<at::Tensor>& cos_sin, int64_t act) {
  return ea::linear_causal_forward(q, k, v, opt(log_decay), opt(h0), opt(z0), opt(cos_sin), act, normalize, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_causal_bwd(
    const c10::optional<at::Tensor>& grad_num, const c10::optional<at::Tensor>& grad_den,
    const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_z, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& log_decay, const at::Tensor& states,
    bool normalize, int64_t chunk, const c10::optional<at::Tensor>& cos_sin, int64_t act) {
  return ea::linear_causal_backward(opt(grad_num), opt(grad_den), opt(grad_h), opt(grad_z), q, k, v, opt(log_decay),
                                    states, opt(cos_sin), act, normalize, chunk);
}

std::tuple<at::Tensor, at::Tensor> landmark_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& kpm, int64_t block_size,
                                                double scale) {
  return ea::landmark_forward(q, k, v, opt(kpm), block_size, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_bwd(const at::Tensor& grad_out,
                                                            const c10::optional<at::Tensor>& grad_lse,
                                                            const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& out,
                                                            const at::Tensor& lse,
                                                            const c10::optional<at::Tensor>& kpm, int64_t block_size,
                                                            double scale) {
  return ea::landmark_backward(grad_out, opt(grad_lse), q, k, v, out, lse, opt(kpm), block_size, scale);
}

}  // namespace

TORCH_LIBRARY(efficient_attention, m) {
  m.def(
      "sliding_window_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, int group, int left, int right, "
      "bool causal, int q_offset, float scale) -> (Tensor, Tensor)");
  m.def(
      "sliding_window_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, int group, int left, int right, bool causal, int q_offset, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor row_idx, Tensor row_cnt, Tensor? row_tile, "
      "Tensor? tiles, int block_size, bool causal, Tensor? key_padding_mask, float scale) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor row_idx, Tensor row_cnt, Tensor? row_tile, Tensor? tiles, int block_size, bool causal, "
      "Tensor? key_padding_mask, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_causal_fwd(Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? h0, Tensor? z0, bool normalize, "
      "int chunk, Tensor? cos_sin=None, int act=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_causal_bwd(Tensor? grad_num, Tensor? grad_den, Tensor? grad_h, Tensor? grad_z, Tensor q, Tensor k, "
      "Tensor v, Tensor? log_decay, Tensor states, bool normalize, int chunk, Tensor? cos_sin=None, int act=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "landmark_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, int block_size, float scale) "
      "-> (Tensor, Tensor)");
  m.def(
      "landmark_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, int block_size, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efficient_attention, CPU, m) {
  m.impl("sliding_window_fwd", &sliding_window_fwd);
  m.impl("sliding_window_bwd", &sliding_window_bwd);
  m.impl("block_sparse_fwd", &block_sparse_fwd);
  m.impl("block_sparse_bwd", &block_sparse_bwd);
  m.impl("linear_causal_fwd", &linear_causal_fwd);
  m.impl("linear_causal_bwd", &linear_causal_bwd);
  m.impl("landmark_fwd", &landmark_fwd);
  m.impl("landmark_bwd", &landmark_bwd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "efficient-attention C++ CPU kernels (ops under torch.ops.efficient_attention)";
  m.def("brgemm_available", &ea::brgemm_available, "whether fp32 GEMMs can use oneDNN brgemm");
  m.def("use_brgemm", &ea::use_brgemm, "whether fp32 GEMMs currently use oneDNN brgemm");
  m.def("set_use_brgemm", &ea::set_use_brgemm, "switch the fp32 GEMM between brgemm and plain loops");
}
