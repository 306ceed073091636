// Blocked sparse attention on the CPU: the shared core of the sliding-window and
// block-sparse ops.  A "plan" lists, for every (head, query block), the key tiles
// [j0, j1) the block can see; a "row rule" gives each query its visible key
// interval [lo(i), hi(i)] (the LocalWindow band rule); key padding is a (B, S) bool.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ea {

constexpr int64_t kUnbounded = int64_t(1) << 40;

// Query i (absolute position p = i + offset) sees key j iff lo(i) <= j <= hi(i):
//   lo = g*floor(p/g) - left,  hi = g*floor(p/g) + g - 1 + right  (hi = min(hi, p) if causal).
struct RowRule {
  int64_t group = 1, left = kUnbounded, right = kUnbounded, offset = 0;
  bool causal = false;
  inline int64_t base(int64_t i) const {
    const int64_t p = i + offset;
    const int64_t q = p >= 0 ? p / group : -((-p + group - 1) / group);
    return q * group;
  }
  inline int64_t lo(int64_t i) const { return base(i) - left; }
  inline int64_t hi(int64_t i) const {
    const int64_t h = base(i) + group - 1 + right;
    return causal ? std::min(h, i + offset) : h;
  }
};

struct Plan {
  int64_t block_q = 64;            // queries per block
  int64_t heads = 1;               // 1 (shared by all heads) or H
  int64_t n_qblocks = 0;
  std::vector<int64_t> ptr;        // (heads * n_qblocks + 1) offsets into tiles
  std::vector<int64_t> tiles;      // pairs j0, j1
  std::vector<int64_t> tile_mask;  // per tile: -1, or the block-mask tile (token mask) of its one layout block
  at::Tensor masks;                // uint8 (P, block_q, block_q) token masks of a block mask's partial blocks
  // Token mask row of plan tile t for query row r of its query block (nullptr: no token mask).
  inline const uint8_t* mask_row(int64_t t, int64_t r) const {
    const int64_t m = tile_mask.empty() ? -1 : tile_mask[t];
    if (m < 0) return nullptr;
    return masks.data_ptr<uint8_t>() + (m * block_q + r) * block_q + tiles[2 * t] % block_q;
  }
  inline int64_t begin(int64_t h, int64_t qb) const { return ptr[(heads == 1 ? 0 : h) * n_qblocks + qb]; }
  inline int64_t end(int64_t h, int64_t qb) const { return ptr[(heads == 1 ? 0 : h) * n_qblocks + qb + 1]; }
};

// Append [a, b) cut into tiles of at most max_tile keys.
void push_tiles(Plan& plan, int64_t a, int64_t b, int64_t max_tile);

Plan window_plan(const RowRule& rule, int64_t T, int64_t S, int64_t block_q);
// From a block mask's row table: idx (Hm, nq, nk) int32 kept key blocks first ascending, cnt (Hm, nq) int32,
// tile (Hm, nq, nk) int32 (-1 none) or undefined, masks (P, bs, bs) uint8 or undefined.  Runs of kept blocks
// without a token mask are merged into contiguous key ranges; a block with one is its own tile.
Plan mask_plan(const at::Tensor& idx, const at::Tensor& cnt, const at::Tensor& tile, const at::Tensor& masks,
               const RowRule& rule, int64_t T, int64_t S, int64_t block_size);

// out (B, H, T, dv) in q's dtype, lse (B, H, T) fp32 (fp64 for fp64 inputs) (-inf where a query sees nothing).
std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& kpm,
    const RowRule& rule, const Plan& plan, double scale);

// (dq, dk, dv); grad_lse may be undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& kpm,
    const RowRule& rule, const Plan& plan, double scale);

bool brgemm_available();
void set_use_brgemm(bool on);
bool use_brgemm();

}  // namespace ea
