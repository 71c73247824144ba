#pragma once
// Plain launch interface of the warp-per-row CUDA kernels: MoCo (loss against a key queue, and
// the ring-buffer enqueue), BYOL, and SwAV's log-domain Sinkhorn. Raw pointers, no torch types;
// csrc/cuda/{moco,byol,sinkhorn}.cu fill the structs, rowwise_kernels.cu holds the kernels.
#include "infonce_kernels.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace cl_fast::cuda {

constexpr int kRowwiseMaxDim = 1024;  // rows up to this live in one warp's registers (longer: streamed)

// MoCo, SPEC moco_loss: u = n(q), v = n(k), w_j = queue_j as stored, logits s u.v, s u.w_j.
// Outputs (fp32): loss (n), and when need_grad e (n, dim), c (n) with
// d_i = (P_i0 - 1) v_i + sum_j P_ij w_j, c_i = u_i . d_i, e_i = r_i (d_i - u_i c_i).
// Workspace: part_m, part_l (splits * n), part_o (splits * n * dim when need_grad).
struct MocoParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* queue = nullptr;
  Dtype dtype = Dtype::kFloat32;        // q, k
  Dtype queue_dtype = Dtype::kFloat32;
  int64_t n = 0, queue_rows = 0;
  int dim = 0;
  const float* scale = nullptr;  // device 0-d
  bool need_grad = false;
  int splits = 1;                // contiguous ranges of the queue, merged per row afterwards
  float* part_m = nullptr;
  float* part_l = nullptr;
  float* part_o = nullptr;
  float* loss = nullptr;
  float* e = nullptr;
  float* c = nullptr;
};

// queue[(ptr + b) % K] = n(keys_b) (queue dtype); then ptr = (ptr + B) % K. ptr is a 0-d int64 or
// int32 device tensor, read and written on the device.
struct QueueUpdateParams {
  void* queue = nullptr;
  Dtype queue_dtype = Dtype::kFloat32;
  int64_t queue_rows = 0;
  const void* keys = nullptr;
  Dtype keys_dtype = Dtype::kFloat32;
  int64_t batch = 0;
  int dim = 0;
  void* ptr = nullptr;
  bool ptr_is_int64 = true;
};

// BYOL: loss_i = 2 - 2 cos(p_i, z_i) = 2 omc_i; stats (n, 3) = [||p||, ||z||, omc = 1 - cos] (omc
// as ||u - v||^2 / 2 where no norm is clamped: no cancellation). Backward writes dp and,
// when dz != nullptr, dz (input dtype).
struct ByolParams {
  const void* p = nullptr;
  const void* z = nullptr;
  Dtype dtype = Dtype::kFloat32;
  int64_t n = 0;
  int dim = 0;
  float* loss = nullptr;
  float* stats = nullptr;  // forward out, backward in
  const float* grad = nullptr;
  void* dp = nullptr;
  void* dz = nullptr;
};

// Sinkhorn on x = scores * inv_eps (b rows, k columns), log-domain scalings f (k), g (b).
struct SinkhornParams {
  const void* scores = nullptr;
  Dtype dtype = Dtype::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  float inv_eps = 1.f;
};

cudaError_t moco_forward(const MocoParams& params, cudaStream_t stream);
cudaError_t moco_queue_update(const QueueUpdateParams& params, cudaStream_t stream);
cudaError_t byol_forward(const ByolParams& params, cudaStream_t stream);
cudaError_t byol_backward(const ByolParams& params, cudaStream_t stream);
// g_b = -lse_k (x_bk + f_k) (f null: f = 0).
cudaError_t sinkhorn_row_lse(const SinkhornParams& params, const float* f, float* g, cudaStream_t stream);
// Per column: col_max = max_b (x_bk + g_b), col_sum = sum_b exp(x_bk + g_b - col_max) (g null: g = 0);
// a column holding NaN or +inf gets col_max NaN.
cudaError_t sinkhorn_col_lse(const SinkhornParams& params, const float* g, float* col_max, float* col_sum,
                             cudaStream_t stream);
// f_k = -(col_max_k + log col_sum_k) (col_max -inf counts as 0).
cudaError_t sinkhorn_prototype_step(int64_t cols, const float* col_max, const float* col_sum, float* f,
                                    cudaStream_t stream);
// out[b, :] = softmax_k(x_b + f) (fp32).
cudaError_t sinkhorn_assign(const SinkhornParams& params, const float* f, float* out, cudaStream_t stream);

}  // namespace cl_fast::cuda
