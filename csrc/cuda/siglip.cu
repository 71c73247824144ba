// CUDA implementations of the SigLIP ops: siglip_fwd (per-row sigmoid loss) and siglip_bwd
// (dx, dy, dscale, dbias), on the InfoNCE kernels' cross layout (infonce_kernels.cuh, siglip
// mode): row_loss_i = sum_j softplus(-z_ij (s x_i . y_j + b)), z = +1 on the diagonal, else -1.
// Checks from csrc/ops.h first; scale and bias stay on the device.
#include "torch_glue.h"

#include <tuple>

namespace cl_fast::cuda {
namespace {

void fill_siglip(InfonceProblem& p, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& bias) {
  TORCH_CHECK_VALUE(x.size(1) <= (int64_t{1} << 30), "feature dimension D=", x.size(1), " is too large");
  p.first = x.data_ptr();
  p.second = y.data_ptr();
  p.n = x.size(0);
  p.dim = static_cast<int>(x.size(1));
  p.dtype = dtype_of(x);
  p.cross = true;
  p.normalize = false;
  p.siglip = true;
  p.scale = scale_ptr(scale);
  p.bias = bias.data_ptr<float>();
}

at::Tensor siglip_fwd_cuda(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale,
                           const at::Tensor& bias) {
  cl_fast::check_siglip_fwd(x_in, y_in, scale, bias);
  check_on_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  at::Tensor row_loss = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  InfonceFwdParams p;
  fill_siglip(p, x, y, scale, bias);
  p.loss_first = row_loss.data_ptr<float>();
  check_launch(infonce_forward(p, current_stream()), "siglip_fwd");
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_cuda(const at::Tensor& grad_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& y_in,
                                                                           const at::Tensor& scale,
                                                                           const at::Tensor& bias) {
  cl_fast::check_siglip_bwd(grad_in, x_in, y_in, scale, bias);
  check_on_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), grad = grad_in.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x), dy = at::empty_like(y);
  at::Tensor dscale = at::zeros({}, f32), dbias = at::zeros({}, f32);
  const int64_t blocks = infonce_dscale_partials(x.size(0));
  at::Tensor partials = at::empty({2, blocks}, f32);
  InfonceBwdParams p;
  fill_siglip(p, x, y, scale, bias);
  p.grad_first = grad.data_ptr<float>();  // the y half has no losses of its own: grad_second null
  p.dx_first = dx.data_ptr();
  p.dx_second = dy.data_ptr();
  p.dscale = dscale.data_ptr<float>();
  p.dbias = dbias.data_ptr<float>();
  p.dscale_partials = partials.data_ptr<float>();
  p.dbias_partials = p.dscale_partials + blocks;
  check_launch(infonce_backward(p, current_stream()), "siglip_bwd");
  return {dx, dy, dscale, dbias};
}

}  // namespace
}  // namespace cl_fast::cuda

TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) {
  m.impl("siglip_fwd", &cl_fast::cuda::siglip_fwd_cuda);
  m.impl("siglip_bwd", &cl_fast::cuda::siglip_bwd_cuda);
}
