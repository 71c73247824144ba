#pragma once
// Plain launch interface of the InfoNCE CUDA kernels (nt_xent, info_nce, clip_loss): parameter
// structs of raw pointers, no torch types. csrc/cuda/infonce.cu (the torch registration) fills
// them; csrc/cuda/infonce_kernels.cu holds the kernels (infonce_kernels.cuh) and these launchers.
//
// Both families run on the STACKED rows X = cat(first, second), 2n rows of `dim` features:
// nt_xent: first = z1, second = z2; every row is scored against all 2n rows except itself.
// cross (info_nce / clip): first = q, second = k; a q row is scored against the n k rows and a
// k row against the n q rows. In both, the positive of row R is its partner R +- n.
#include <cuda_runtime.h>

#include <cstdint>

namespace cl_fast::cuda {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct InfonceProblem {
  const void* first = nullptr;   // (n, dim), contiguous, `dtype`
  const void* second = nullptr;  // (n, dim), same dtype
  int64_t n = 0;
  int dim = 0;
  Dtype dtype = Dtype::kFloat32;
  bool cross = false;            // false: nt_xent, true: info_nce / clip
  bool normalize = true;         // rows normalised inside (nt_xent always)
  const float* scale = nullptr;  // 0-d fp32 on the device: s = 1/temperature or logit_scale
  // Workspace (4n) fp32 (normalize only): inv_norm[R] = 1 / max(||f_R x_R||, eps) and
  // row_factor[R] = f_R = inv_norm + 2n, an exact power of two: 1 for rows with max |x| < 2^40,
  // else 2^-(e-1) with 2^e <= max |x| < 2^(e+1), so the scaled row's max lies in [2, 4). The kernels
  // multiply a scaled row's features by f_R before any dot product (raw dots of such rows can
  // overflow fp32), and r_R = f_R inv_norm[R] is the true inverse norm.
  float* inv_norm = nullptr;
  float* row_factor = nullptr;
  // SigLIP (first = x, second = y, cross = true, normalize = false): logits s x_i . y_j + b with
  // the sigmoid loss instead of the softmax; bias is a 0-d fp32 device tensor.
  bool siglip = false;
  const float* bias = nullptr;
};

// Forward: per stacked row R, loss_R = log(1 + neg_R / pos_R) (>= 0), lse_R = S_pos + loss_R.
// Rows of the second half are stored only when loss_second / lse_second are non-null
// (cross with both=False computes no column direction).
struct InfonceFwdParams : InfonceProblem {
  float* loss_first = nullptr;
  float* loss_second = nullptr;
  float* lse_first = nullptr;
  float* lse_second = nullptr;
};

// Backward with upstream per-row gradients (grad_second null: the second half's losses are not
// used, i.e. cross with both=False). Writes dx_first, dx_second (input dtype) and dscale (0-d
// fp32, dL/ds); dscale_partials is a workspace of infonce_dscale_partials(n) floats.
struct InfonceBwdParams : InfonceProblem {
  const float* grad_first = nullptr;
  const float* grad_second = nullptr;
  const float* lse_first = nullptr;
  const float* lse_second = nullptr;
  void* dx_first = nullptr;
  void* dx_second = nullptr;
  float* dscale = nullptr;
  float* dscale_partials = nullptr;
  float* dbias = nullptr;           // SigLIP: dL/db (0-d fp32)
  float* dbias_partials = nullptr;  // SigLIP: infonce_dscale_partials(n) floats
};

// Rows of each half per CTA (a CTA owns 32 rows of `first` and their 32 partners in `second`).
constexpr int kInfonceHalfRows = 32;
inline int64_t infonce_dscale_partials(int64_t n) { return (n + kInfonceHalfRows - 1) / kInfonceHalfRows; }

// SigLIP forward: loss_first[i] = sum_j softplus(-z_ij (s x_i . y_j + b)), z = +1 on the diagonal
// else -1. Backward: grad_first (n) per row, grad_second null; writes dx, dy, dscale, dbias.
// Both run through infonce_forward / infonce_backward with siglip = true.

// Enqueue on `stream`; return the launch status (cudaSuccess when all launches were accepted).
cudaError_t infonce_forward(const InfonceFwdParams& params, cudaStream_t stream);
cudaError_t infonce_backward(const InfonceBwdParams& params, cudaStream_t stream);

}  // namespace cl_fast::cuda
