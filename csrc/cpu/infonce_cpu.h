#pragma once
// CPU launchers of the fused InfoNCE-family kernels: DESIGN.md's backend interface.
// Inputs are validated by csrc/ops.cpp's checks before these run (shapes, dtypes, devices, scale);
// the registration at the end of infonce.cpp reads the 0-d CPU scale tensor into `scale`.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace cl_fast::cpu {

// nt_xent over M = 2N rows: per-row loss (2N,) and log-sum-exp (2N,), fp32.
std::tuple<at::Tensor, at::Tensor> ntxent_fwd(const at::Tensor& z1, const at::Tensor& z2, double scale);

// Gradients of sum_i grad_i * loss_i: dz1, dz2 (input dtype) and dscale (0-d fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd(const at::Tensor& grad, const at::Tensor& z1,
                                                          const at::Tensor& z2, double scale,
                                                          const at::Tensor& lse);

// info_nce (both=false: q->k only) / symmetric info_nce and clip (both=true):
// row_loss (N,), col_loss (N,) or (0,), row_lse (N,), col_lse (N,) or (0,), fp32.
// normalize = false: the features as given (S = s q_i . k_j, OpenCLIP's ClipLoss).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                     double scale, bool both, bool normalize);

// Gradients of sum_i grad_row_i row_loss_i + grad_col_i col_loss_i: dq, dk (input dtype), dscale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                         const at::Tensor& q, const at::Tensor& k, double scale,
                                                         const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                         bool both, bool normalize);

}  // namespace cl_fast::cpu
