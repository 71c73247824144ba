// CUDA implementations of the InfoNCE ops (nt_xent, info_nce / clip_loss): input checks from
// csrc/ops.h first, then the kernels of infonce_kernels.cu on the current stream. No host sync:
// the scale stays on the device.
#include "torch_glue.h"

#include <tuple>

namespace cl_fast::cuda {
namespace {

at::TensorOptions fp32(const at::Tensor& like) { return like.options().dtype(at::kFloat); }

void fill_problem(InfonceProblem& p, const at::Tensor& first, const at::Tensor& second, const at::Tensor& scale,
                  bool cross, bool normalize, at::Tensor& inv_norm_workspace) {
  const int64_t dim = first.size(1);
  TORCH_CHECK_VALUE(dim <= (int64_t{1} << 30), "feature dimension D=", dim, " is too large for the CUDA kernels");
  p.first = first.data_ptr();
  p.second = second.data_ptr();
  p.n = first.size(0);
  p.dim = static_cast<int>(dim);
  p.dtype = dtype_of(first);
  p.cross = cross;
  p.normalize = normalize;
  p.scale = scale_ptr(scale);
  inv_norm_workspace = at::empty({normalize ? 4 * p.n : 0}, fp32(first));  // inv_norm, row_factor
  p.inv_norm = normalize ? inv_norm_workspace.data_ptr<float>() : nullptr;
  p.row_factor = normalize ? p.inv_norm + 2 * p.n : nullptr;
}

std::tuple<at::Tensor, at::Tensor> ntxent_fwd_cuda(const at::Tensor& z1_in, const at::Tensor& z2_in,
                                                   const at::Tensor& scale) {
  cl_fast::check_ntxent_fwd(z1_in, z2_in, scale);
  check_on_cuda(z1_in, "z1");
  const c10::cuda::CUDAGuard guard(z1_in.device());
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const int64_t n = z1.size(0);
  at::Tensor loss = at::empty({2 * n}, fp32(z1)), lse = at::empty({2 * n}, fp32(z1)), inv_norm;
  InfonceFwdParams p;
  fill_problem(p, z1, z2, scale, /*cross=*/false, /*normalize=*/true, inv_norm);
  p.loss_first = loss.data_ptr<float>();
  p.loss_second = p.loss_first + n;
  p.lse_first = lse.data_ptr<float>();
  p.lse_second = p.lse_first + n;
  check_launch(infonce_forward(p, current_stream()), "ntxent_fwd");
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& z1_in,
                                                               const at::Tensor& z2_in, const at::Tensor& scale,
                                                               const at::Tensor& lse_in) {
  cl_fast::check_ntxent_bwd(grad_in, z1_in, z2_in, scale, lse_in);
  check_on_cuda(z1_in, "z1");
  const c10::cuda::CUDAGuard guard(z1_in.device());
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const int64_t n = z1.size(0);
  at::Tensor dz1 = at::empty_like(z1), dz2 = at::empty_like(z2), dscale = at::zeros({}, fp32(z1)), inv_norm;
  at::Tensor partials = at::empty({infonce_dscale_partials(n)}, fp32(z1));
  InfonceBwdParams p;
  fill_problem(p, z1, z2, scale, /*cross=*/false, /*normalize=*/true, inv_norm);
  p.grad_first = grad.data_ptr<float>();
  p.grad_second = p.grad_first + n;
  p.lse_first = lse.data_ptr<float>();
  p.lse_second = p.lse_first + n;
  p.dx_first = dz1.data_ptr();
  p.dx_second = dz2.data_ptr();
  p.dscale = dscale.data_ptr<float>();
  p.dscale_partials = partials.data_ptr<float>();
  check_launch(infonce_backward(p, current_stream()), "ntxent_bwd");
  return {dz1, dz2, dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd_cuda(const at::Tensor& q_in,
                                                                          const at::Tensor& k_in,
                                                                          const at::Tensor& scale, bool both,
                                                                          bool normalize) {
  cl_fast::check_cross_fwd(q_in, k_in, scale, both, normalize);
  check_on_cuda(q_in, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const int64_t n = q.size(0), cols = both ? n : 0;
  at::Tensor row_loss = at::empty({n}, fp32(q)), row_lse = at::empty({n}, fp32(q));
  at::Tensor col_loss = at::empty({cols}, fp32(q)), col_lse = at::empty({cols}, fp32(q)), inv_norm;
  InfonceFwdParams p;
  fill_problem(p, q, k, scale, /*cross=*/true, normalize, inv_norm);
  p.loss_first = row_loss.data_ptr<float>();
  p.lse_first = row_lse.data_ptr<float>();
  p.loss_second = both ? col_loss.data_ptr<float>() : nullptr;
  p.lse_second = both ? col_lse.data_ptr<float>() : nullptr;
  check_launch(infonce_forward(p, current_stream()), "cross_fwd");
  return {row_loss, col_loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd_cuda(const at::Tensor& grad_row_in,
                                                              const at::Tensor& grad_col_in, const at::Tensor& q_in,
                                                              const at::Tensor& k_in, const at::Tensor& scale,
                                                              const at::Tensor& row_lse_in,
                                                              const at::Tensor& col_lse_in, bool both,
                                                              bool normalize) {
  cl_fast::check_cross_bwd(grad_row_in, grad_col_in, q_in, k_in, scale, row_lse_in, col_lse_in, both, normalize);
  check_on_cuda(q_in, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  const at::Tensor grad_row = grad_row_in.contiguous(), row_lse = row_lse_in.contiguous();
  const at::Tensor grad_col = grad_col_in.contiguous(), col_lse = col_lse_in.contiguous();
  const int64_t n = q.size(0);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dscale = at::zeros({}, fp32(q)), inv_norm;
  at::Tensor partials = at::empty({infonce_dscale_partials(n)}, fp32(q));
  InfonceBwdParams p;
  fill_problem(p, q, k, scale, /*cross=*/true, normalize, inv_norm);
  p.grad_first = grad_row.data_ptr<float>();
  p.lse_first = row_lse.data_ptr<float>();
  p.grad_second = both ? grad_col.data_ptr<float>() : nullptr;  // no column losses: g = 0 there
  p.lse_second = both ? col_lse.data_ptr<float>() : nullptr;
  p.dx_first = dq.data_ptr();
  p.dx_second = dk.data_ptr();
  p.dscale = dscale.data_ptr<float>();
  p.dscale_partials = partials.data_ptr<float>();
  check_launch(infonce_backward(p, current_stream()), "cross_bwd");
  return {dq, dk, dscale};
}

}  // namespace
}  // namespace cl_fast::cuda

TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) {
  m.impl("ntxent_fwd", &cl_fast::cuda::ntxent_fwd_cuda);
  m.impl("ntxent_bwd", &cl_fast::cuda::ntxent_bwd_cuda);
  m.impl("cross_fwd", &cl_fast::cuda::cross_fwd_cuda);
  m.impl("cross_bwd", &cl_fast::cuda::cross_bwd_cuda);
}
