#pragma once
// The cl_fast_C op layer (csrc/ops.cpp): one input check per op, taking exactly the op's
// arguments (schemas in ops.cpp). Every device implementation (csrc/cpu/<family>.cpp,
// csrc/cuda/<family>.cu) calls its op's check first, then its kernels.
//
// The checks raise ValueError (shapes, values, devices) or TypeError (dtypes) naming the argument.
// `scale` (and siglip's `bias`) is a 0-d fp32 tensor on the inputs' device; its value is read
// (finite, > 0) only where it is a CPU tensor: a CUDA scale is never copied to the host (no sync).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace cl_fast {

void check_ntxent_fwd(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& scale);
void check_ntxent_bwd(const at::Tensor& grad, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& scale,
                      const at::Tensor& lse);
void check_cross_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, bool both, bool normalize);
void check_cross_bwd(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse, bool both,
                     bool normalize);
// InfoNCE block pieces (rows x a slice of columns, for the distributed losses): see ops.cpp.
void check_infonce_block_fwd(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& scale, int64_t diag,
                             bool pairs);
void check_infonce_block_bwd(const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& scale, const at::Tensor& lse, int64_t diag, bool pairs);
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

// The value of a checked 0-d fp32 CPU tensor (scale, bias): for the CPU kernels, which take it
// as a number. A host read of host memory: no device synchronisation.
float cpu_scalar(const at::Tensor& t);

}  // namespace cl_fast
