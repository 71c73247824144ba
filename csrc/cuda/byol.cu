// CUDA implementations of the BYOL ops: byol_fwd (loss and per-row stats [||p||, ||z||, 1 - cos])
// and byol_bwd. Checks from csrc/ops.h first.
#include "torch_glue.h"

#include <tuple>

namespace cl_fast::cuda {
namespace {

ByolParams byol_params(const at::Tensor& p, const at::Tensor& z) {
  ByolParams params;
  params.p = p.data_ptr();
  params.z = z.data_ptr();
  params.dtype = dtype_of(p);
  params.n = p.size(0);
  params.dim = static_cast<int>(p.size(1));
  return params;
}

std::tuple<at::Tensor, at::Tensor> byol_fwd_cuda(const at::Tensor& p_in, const at::Tensor& z_in) {
  cl_fast::check_byol_fwd(p_in, z_in);
  check_on_cuda(p_in, "p");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const auto f32 = p.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.size(0)}, f32), stats = at::empty({p.size(0), 3}, f32);
  ByolParams params = byol_params(p, z);
  params.loss = loss.data_ptr<float>();
  params.stats = stats.data_ptr<float>();
  check_launch(byol_forward(params, current_stream()), "byol_fwd");
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> byol_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& p_in,
                                                 const at::Tensor& z_in, const at::Tensor& stats_in, bool need_dz) {
  cl_fast::check_byol_bwd(grad_in, p_in, z_in, stats_in, need_dz);
  check_on_cuda(p_in, "p");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), stats = stats_in.contiguous();
  at::Tensor dp = at::empty_like(p);
  at::Tensor dz = need_dz ? at::empty_like(z) : at::empty({0, z.size(1)}, z.options());
  ByolParams params = byol_params(p, z);
  params.stats = const_cast<float*>(stats.data_ptr<float>());  // read only in the backward
  params.grad = grad.data_ptr<float>();
  params.dp = dp.data_ptr();
  params.dz = need_dz ? dz.data_ptr() : nullptr;
  check_launch(byol_backward(params, current_stream()), "byol_bwd");
  return {dp, dz};
}

}  // namespace
}  // namespace cl_fast::cuda

TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) {
  m.impl("byol_fwd", &cl_fast::cuda::byol_fwd_cuda);
  m.impl("byol_bwd", &cl_fast::cuda::byol_bwd_cuda);
}
