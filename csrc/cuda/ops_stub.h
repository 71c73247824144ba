#pragma once
// Declarations of the op input checks that csrc/ops.h provides (PLAN.md: one check_<op> per op,
// taking exactly the op's arguments, defined in csrc/ops.cpp). Used only while csrc/ops.h is
// absent from the tree (the registration files include ops.h when it exists).
#include <ATen/ATen.h>

#include <optional>

namespace cl_fast {

void check_ntxent_fwd(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& scale);
void check_ntxent_bwd(const at::Tensor& grad, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& scale,
                      const at::Tensor& lse);
void check_cross_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, bool both, bool normalize);
void check_cross_bwd(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse, bool both,
                     bool normalize);
void check_moco_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, const at::Tensor& scale,
                    bool need_grad, int64_t splits);
void check_moco_queue_update_(const at::Tensor& queue, const at::Tensor& keys, const at::Tensor& ptr);
void check_byol_fwd(const at::Tensor& p, const at::Tensor& z);
void check_byol_bwd(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z, const at::Tensor& stats,
                    bool need_dz);
void check_sinkhorn(const at::Tensor& scores, double inv_eps, int64_t iterations);
void check_sinkhorn_col_lse(const at::Tensor& scores, double inv_eps, const std::optional<at::Tensor>& f);
void check_sinkhorn_assign(const at::Tensor& scores, double inv_eps, const at::Tensor& f);
void check_siglip_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias);
void check_siglip_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                      const at::Tensor& bias);

}  // namespace cl_fast
