// CUDA implementations of the InfoNCE block pieces (infonce_block_fwd / infonce_block_bwd: rows
// against one slice of columns, for the distributed losses): input checks from csrc/ops.h first,
// then the kernels of infonce_block_kernels.cu on the current stream. No host sync: the scale stays
// on the device.
#include "torch_glue.h"

#include "infonce_block_kernels.h"

#include <tuple>

namespace cl_fast::cuda {
namespace {

// fp32 outputs on the inputs' device
at::TensorOptions block_fp32(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

void fill_block_problem(InfonceBlockProblem& p, const at::Tensor& rows, const at::Tensor& cols,
                        const at::Tensor& scale, int64_t diag, bool pairs) {
  const int64_t dim = rows.size(1);
  TORCH_CHECK_VALUE(dim <= kInfonceBlockMaxDim, "feature dimension D=", dim,
                    " is too large for the CUDA block kernels (at most ", kInfonceBlockMaxDim, ")");
  p.rows = rows.data_ptr();
  p.cols = cols.data_ptr();
  p.m = rows.size(0);
  p.c = cols.size(0);
  p.dim = static_cast<int>(dim);
  p.dtype = dtype_of(rows);
  p.diag = diag;
  p.pairs = pairs;
  p.scale = scale_ptr(scale);
}

// The rows' and columns' power-of-two factors (InfonceBlockProblem::down), m + c floats.
at::Tensor down_workspace(InfonceBlockProblem& p, const at::Tensor& rows) {
  at::Tensor down = at::empty({p.m + p.c}, block_fp32(rows));
  p.down = down.data_ptr<float>();
  return down;
}

// Streaming multiprocessors of the current device (a host query, no stream work, no sync).
int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return count;  // 0: no column splits
}

at::Tensor infonce_block_fwd_cuda(const at::Tensor& rows_in, const at::Tensor& cols_in, const at::Tensor& scale,
                                  int64_t diag, bool pairs) {
  cl_fast::check_infonce_block_fwd(rows_in, cols_in, scale, diag, pairs);
  check_on_cuda(rows_in, "rows");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  at::Tensor lse = at::empty({rows.size(0)}, block_fp32(rows));
  InfonceBlockFwdParams p;
  fill_block_problem(p, rows, cols, scale, diag, pairs);
  const at::Tensor down = down_workspace(p, rows);
  p.splits = infonce_block_fwd_splits(p.m, p.c, sm_count());
  at::Tensor workspace = at::empty({infonce_block_fwd_workspace(p.m, p.splits)}, block_fp32(rows));
  p.workspace = p.splits > 1 ? workspace.data_ptr<float>() : nullptr;
  p.lse = lse.data_ptr<float>();
  check_launch(infonce_block_forward(p, current_stream()), "infonce_block_fwd");
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_block_bwd_cuda(const at::Tensor& grad_in,
                                                                      const at::Tensor& rows_in,
                                                                      const at::Tensor& cols_in,
                                                                      const at::Tensor& scale,
                                                                      const at::Tensor& lse_in, int64_t diag,
                                                                      bool pairs) {
  cl_fast::check_infonce_block_bwd(grad_in, rows_in, cols_in, scale, lse_in, diag, pairs);
  check_on_cuda(rows_in, "rows");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  // every element of drows, dcols and dscale is written by the kernels
  at::Tensor drows = at::empty(rows.sizes(), block_fp32(rows)), dcols = at::empty(cols.sizes(), block_fp32(rows));
  at::Tensor dscale = at::empty({}, block_fp32(rows));
  InfonceBlockBwdParams p;
  fill_block_problem(p, rows, cols, scale, diag, pairs);
  const at::Tensor down = down_workspace(p, rows);
  const int sms = sm_count();
  p.splits = infonce_block_bwd_splits(p.m, p.c, p.dim, sms);
  p.col_splits = infonce_block_bwd_splits(p.c, p.m, p.dim, sms);
  at::Tensor workspace =
      at::empty({infonce_block_bwd_workspace(p.m, p.c, p.dim, p.splits, p.col_splits)}, block_fp32(rows));
  at::Tensor partials = at::empty({infonce_block_dscale_partials(p.m, p.splits)}, block_fp32(rows));
  p.workspace = p.splits > 1 || p.col_splits > 1 ? workspace.data_ptr<float>() : nullptr;
  p.grad = grad.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.drows = drows.data_ptr<float>();
  p.dcols = dcols.data_ptr<float>();
  p.dscale = dscale.data_ptr<float>();
  p.dscale_partials = partials.data_ptr<float>();
  check_launch(infonce_block_backward(p, current_stream()), "infonce_block_bwd");
  return {drows, dcols, dscale};
}

}  // namespace
}  // namespace cl_fast::cuda

TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) {
  m.impl("infonce_block_fwd", &cl_fast::cuda::infonce_block_fwd_cuda);
  m.impl("infonce_block_bwd", &cl_fast::cuda::infonce_block_bwd_cuda);
}
