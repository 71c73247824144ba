// CUDA implementations of the Sinkhorn ops (SwAV), in the log domain (SPEC: finite for any finite
// scores): sinkhorn (all iterations), sinkhorn_col_lse and sinkhorn_assign (the distributed
// path's per-step kernels). Checks from csrc/ops.h first. x = scores / eps; f (K), g (B):
//   f = -lse_b x_bk; then iterations - 1 times g_b = -lse_k (x_bk + f_k), f_k = -lse_b (x_bk + g_b);
//   out[b, :] = softmax_k(x_b + f).
#include "torch_glue.h"

#include <optional>
#include <tuple>

namespace cl_fast::cuda {
namespace {

SinkhornParams sinkhorn_params(const at::Tensor& scores, double inv_eps) {
  SinkhornParams p;
  p.scores = scores.data_ptr();
  p.dtype = dtype_of(scores);
  p.rows = scores.size(0);
  p.cols = scores.size(1);
  p.inv_eps = static_cast<float>(inv_eps);
  return p;
}

at::Tensor sinkhorn_cuda(const at::Tensor& scores_in, double inv_eps, int64_t iterations) {
  cl_fast::check_sinkhorn(scores_in, inv_eps, iterations);
  check_on_cuda(scores_in, "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const SinkhornParams p = sinkhorn_params(scores, inv_eps);
  const auto f32 = scores.options().dtype(at::kFloat);
  at::Tensor f = at::empty({p.cols}, f32), g = at::empty({p.rows}, f32);
  at::Tensor col_max = at::empty({p.cols}, f32), col_sum = at::empty({p.cols}, f32);
  at::Tensor out = at::empty({p.rows, p.cols}, f32);
  const cudaStream_t stream = current_stream();
  float* fp = f.data_ptr<float>();
  check_launch(sinkhorn_col_lse(p, nullptr, col_max.data_ptr<float>(), col_sum.data_ptr<float>(), stream), "sinkhorn");
  check_launch(sinkhorn_prototype_step(p.cols, col_max.data_ptr<float>(), col_sum.data_ptr<float>(), fp, stream),
               "sinkhorn");
  for (int64_t t = 1; t < iterations; ++t) {
    check_launch(sinkhorn_row_lse(p, fp, g.data_ptr<float>(), stream), "sinkhorn");
    check_launch(sinkhorn_col_lse(p, g.data_ptr<float>(), col_max.data_ptr<float>(), col_sum.data_ptr<float>(), stream),
                 "sinkhorn");
    check_launch(sinkhorn_prototype_step(p.cols, col_max.data_ptr<float>(), col_sum.data_ptr<float>(), fp, stream),
                 "sinkhorn");
  }
  check_launch(sinkhorn_assign(p, fp, out.data_ptr<float>(), stream), "sinkhorn");
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_col_lse_cuda(const at::Tensor& scores_in, double inv_eps,
                                                         const std::optional<at::Tensor>& f_in) {
  cl_fast::check_sinkhorn_col_lse(scores_in, inv_eps, f_in);
  check_on_cuda(scores_in, "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const SinkhornParams p = sinkhorn_params(scores, inv_eps);
  const auto f32 = scores.options().dtype(at::kFloat);
  at::Tensor col_max = at::empty({p.cols}, f32), col_sum = at::empty({p.cols}, f32);
  const cudaStream_t stream = current_stream();
  at::Tensor g;
  if (f_in.has_value()) {  // g_b = -lse_k (x_bk + f_k) first
    const at::Tensor f = f_in->contiguous();
    g = at::empty({p.rows}, f32);
    check_launch(sinkhorn_row_lse(p, f.data_ptr<float>(), g.data_ptr<float>(), stream), "sinkhorn_col_lse");
  }
  check_launch(sinkhorn_col_lse(p, g.defined() ? g.data_ptr<float>() : nullptr, col_max.data_ptr<float>(),
                                col_sum.data_ptr<float>(), stream),
               "sinkhorn_col_lse");
  return {col_max, col_sum};
}

at::Tensor sinkhorn_assign_cuda(const at::Tensor& scores_in, double inv_eps, const at::Tensor& f_in) {
  cl_fast::check_sinkhorn_assign(scores_in, inv_eps, f_in);
  check_on_cuda(scores_in, "scores");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous(), f = f_in.contiguous();
  const SinkhornParams p = sinkhorn_params(scores, inv_eps);
  at::Tensor out = at::empty({p.rows, p.cols}, scores.options().dtype(at::kFloat));
  check_launch(sinkhorn_assign(p, f.data_ptr<float>(), out.data_ptr<float>(), current_stream()), "sinkhorn_assign");
  return out;
}

}  // namespace
}  // namespace cl_fast::cuda

TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) {
  m.impl("sinkhorn", &cl_fast::cuda::sinkhorn_cuda);
  m.impl("sinkhorn_col_lse", &cl_fast::cuda::sinkhorn_col_lse_cuda);
  m.impl("sinkhorn_assign", &cl_fast::cuda::sinkhorn_assign_cuda);
}
