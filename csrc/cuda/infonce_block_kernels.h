#pragma once
// Plain launch interface of the InfoNCE block-piece CUDA kernels (rows against one slice of
// columns, the pieces of the distributed losses; semantics in csrc/ops.cpp and
// cl_fast/reference.py infonce_block_*): parameter structs of raw pointers, no torch types.
// csrc/cuda/infonce_block.cu (the torch registration) fills them; csrc/cuda/infonce_block_kernels.cu
// holds the kernels and these launchers.
//
// S_ij = s rows_i . cols_j (features as given, fp32 accumulation). Row i leaves out column
// i + diag and, with pairs, column diag + (i + m/2) mod m (its positive); offsets outside [0, c)
// leave out nothing.
#include <cuda_runtime.h>

#include <cstdint>

#include "infonce_kernels.h"  // Dtype

namespace cl_fast::cuda {

struct InfonceBlockProblem {
  const void* rows = nullptr;  // (m, dim), contiguous, `dtype`
  const void* cols = nullptr;  // (c, dim), same dtype
  int64_t m = 0;
  int64_t c = 0;
  int dim = 0;
  Dtype dtype = Dtype::kFloat32;
  int64_t diag = 0;
  bool pairs = false;            // m even
  const float* scale = nullptr;  // 0-d fp32 on the device
  // Splits of the streamed items: `splits` CTAs share one row block's columns (forward, drows) and
  // (backward) `col_splits` CTAs share one column block's rows (dcols), each writing a partial to
  // `workspace` (infonce_block_{fwd,bwd}_workspace floats), merged in a fixed order. 1: no
  // workspace. split_cols / split_rows (streamed items per split) are set by the launchers.
  int splits = 1;
  int col_splits = 1;
  float* workspace = nullptr;
  // Workspace of m + c floats (rows, then cols): each row's power-of-two factor, 1 unless its max |x|
  // is >= 2^40 (then 2^-(e-1) with 2^e <= max |x| < 2^(e+1)); the score tiles multiply such rows
  // by it, so no dot product of the tiles leaves fp32's range (S = s 2^(e_i-1) 2^(e_j-1) dot').
  // Filled by the launchers (forward and backward).
  float* down = nullptr;
  int64_t split_cols = 0;
  int64_t split_rows = 0;
};

// lse (m) fp32: lse_i = log sum over the columns row i keeps of exp(S_ij); -inf when none is kept.
struct InfonceBlockFwdParams : InfonceBlockProblem {
  float* lse = nullptr;
};

// grad (m), lse (m): the upstream gradient and the MERGED log-sum-exp of every row (over all
// slices). dS_ij = grad_i exp(S_ij - lse_i) on the kept columns (0 for rows whose lse is not
// finite). Writes drows (m, dim) = s dS cols, dcols (c, dim) = s dS^T rows (fp32) and dscale
// (0-d fp32) = sum_ij dS_ij rows_i . cols_j; dscale_partials is a workspace of
// infonce_block_dscale_partials(m, splits) floats.
struct InfonceBlockBwdParams : InfonceBlockProblem {
  const float* grad = nullptr;
  const float* lse = nullptr;
  float* drows = nullptr;
  float* dcols = nullptr;
  float* dscale = nullptr;
  float* dscale_partials = nullptr;
};

// Rows (forward, drows) or columns (dcols) per CTA; output features per CTA of the backward.
constexpr int kInfonceBlockItems = 64;
constexpr int kInfonceBlockSlice = 128;
constexpr int kInfonceBlockTile = 64;  // streamed items per tile
// The largest feature dimension the backward's grid holds (blockIdx.y walks slices of 128).
constexpr int64_t kInfonceBlockMaxDim = int64_t{65535} * kInfonceBlockSlice;

inline int64_t infonce_block_row_blocks(int64_t m) { return (m + kInfonceBlockItems - 1) / kInfonceBlockItems; }

// Splits of `streamed` items for `ctas` CTAs without them: enough for two CTAs per SM, at most one
// per streamed tile and max_splits; none left empty.
inline int infonce_block_splits(int64_t ctas, int64_t streamed, int64_t max_splits, int sm_count) {
  const int64_t tiles = (streamed + kInfonceBlockTile - 1) / kInfonceBlockTile;
  if (ctas <= 0 || tiles <= 1 || sm_count <= 0) return 1;
  int64_t splits = (2 * int64_t{sm_count} + ctas - 1) / ctas;
  splits = splits < tiles ? splits : tiles;
  splits = splits < max_splits ? splits : max_splits;
  splits = splits < 65535 ? splits : 65535;
  if (splits <= 1) return 1;
  const int64_t per = (tiles + splits - 1) / splits;
  return static_cast<int>((tiles + per - 1) / per);
}
// Forward: CTAs = row blocks; workspace: (max, sum) per split and row.
inline int infonce_block_fwd_splits(int64_t m, int64_t c, int sm_count) {
  return infonce_block_splits(infonce_block_row_blocks(m), c, 65535, sm_count);
}
inline int64_t infonce_block_fwd_workspace(int64_t m, int splits) { return splits > 1 ? 2 * splits * m : 0; }
// Backward, drows (items = m stationary rows, c streamed columns) or dcols (items = c, streamed =
// m): CTAs = item blocks x feature slices; workspace: one partial output (items, dim) per split, at
// most 64 MB. The two kernels run one after the other and share the workspace.
inline int infonce_block_bwd_splits(int64_t items, int64_t streamed, int64_t dim, int sm_count) {
  const int64_t slices = (dim + kInfonceBlockSlice - 1) / kInfonceBlockSlice;
  const int64_t per_split = items * dim > 0 ? items * dim : 1;
  const int64_t max_splits = (int64_t{16} << 20) / per_split;
  return infonce_block_splits(infonce_block_row_blocks(items) * slices, streamed, max_splits, sm_count);
}
inline int64_t infonce_block_bwd_workspace(int64_t m, int64_t c, int64_t dim, int splits, int col_splits) {
  const int64_t rows_part = splits > 1 ? splits * m * dim : 0;
  const int64_t cols_part = col_splits > 1 ? col_splits * c * dim : 0;
  return rows_part > cols_part ? rows_part : cols_part;
}
inline int64_t infonce_block_dscale_partials(int64_t m, int splits) { return splits * infonce_block_row_blocks(m); }

// Enqueue on `stream`; return the launch status (cudaSuccess when all launches were accepted).
cudaError_t infonce_block_forward(const InfonceBlockFwdParams& params, cudaStream_t stream);
cudaError_t infonce_block_backward(const InfonceBlockBwdParams& params, cudaStream_t stream);

}  // namespace cl_fast::cuda
