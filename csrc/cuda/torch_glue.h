#pragma once
// What the CUDA registration files share: the op checks (csrc/ops.h), device guard and stream,
// dtype mapping and launch-status checks. Torch types stop here; kernels get raw pointers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../ops.h"

#include "infonce_kernels.h"
#include "rowwise_kernels.h"

namespace cl_fast::cuda {

inline Dtype dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "cl_fast CUDA kernels take float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "cl_fast ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

inline void check_on_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), name, " must be a CUDA tensor for the cuda kernels, got ", x.device());
}

// fp32 scale pointer of a 0-d tensor (the checks made it fp32, 0-d and on the inputs' device).
inline const float* scale_ptr(const at::Tensor& scale) { return scale.data_ptr<float>(); }

}  // namespace cl_fast::cuda
