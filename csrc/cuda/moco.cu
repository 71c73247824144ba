// CUDA implementations of the MoCo ops: moco_fwd (loss of the queries against their key and the
// queue, with the per-row gradient factors e, c) and moco_queue_update_ (ring-buffer enqueue, the
// pointer read and advanced on the device). Checks from csrc/ops.h first.
#include "torch_glue.h"

#include <algorithm>
#include <tuple>

namespace cl_fast::cuda {
namespace {

// Enough (row, split) warps to fill the device twice over, at least 64 queue rows per split, and
// (with need_grad) the fp32 partial sums O (splits x n x dim) within 64 MB.
int choose_splits(int64_t n, int64_t dim, int64_t queue_rows, bool need_grad, int64_t requested, int device) {
  if (requested > 0) return static_cast<int>(std::min<int64_t>({requested, queue_rows, 65535}));
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 132;
  const int64_t want_warps = int64_t{64} * sms;  // 2 x 32 warps per SM
  int64_t splits = std::min<int64_t>({(want_warps + n - 1) / n, (queue_rows + 63) / 64, 4096});
  if (need_grad) splits = std::min<int64_t>(splits, (int64_t{16} << 20) / std::max<int64_t>(n * dim, 1));
  return static_cast<int>(std::max<int64_t>(1, splits));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moco_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& queue_in, const at::Tensor& scale,
                                                             bool need_grad, int64_t splits) {
  cl_fast::check_moco_fwd(q_in, k_in, queue_in, scale, need_grad, splits);
  check_on_cuda(q_in, "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), queue = queue_in.contiguous();
  const int64_t n = q.size(0), dim = q.size(1), queue_rows = queue.size(0);
  const auto f32 = q.options().dtype(at::kFloat);
  MocoParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.queue = queue.data_ptr();
  p.dtype = dtype_of(q);
  p.queue_dtype = dtype_of(queue);
  p.n = n;
  p.queue_rows = queue_rows;
  p.dim = static_cast<int>(dim);
  p.scale = scale_ptr(scale);
  p.need_grad = need_grad;
  p.splits = choose_splits(std::max<int64_t>(n, 1), dim, queue_rows, need_grad, splits, q.get_device());
  at::Tensor part_m = at::empty({p.splits, n}, f32), part_l = at::empty({p.splits, n}, f32);
  at::Tensor part_o = at::empty({need_grad ? p.splits : 0, n, dim}, f32);
  at::Tensor loss = at::empty({n}, f32);
  at::Tensor e = at::empty({need_grad ? n : 0, dim}, f32), c = at::empty({need_grad ? n : 0}, f32);
  p.part_m = part_m.data_ptr<float>();
  p.part_l = part_l.data_ptr<float>();
  p.part_o = need_grad ? part_o.data_ptr<float>() : nullptr;
  p.loss = loss.data_ptr<float>();
  p.e = need_grad ? e.data_ptr<float>() : nullptr;
  p.c = need_grad ? c.data_ptr<float>() : nullptr;
  check_launch(moco_forward(p, current_stream()), "moco_fwd");
  return {loss, e, c};
}

void moco_queue_update_cuda(at::Tensor& queue, const at::Tensor& keys_in, at::Tensor& ptr) {
  cl_fast::check_moco_queue_update_(queue, keys_in, ptr);
  check_on_cuda(queue, "queue");
  TORCH_CHECK_VALUE(ptr.device() == queue.device(), "ptr must be a 0-d integer tensor on the queue's device (",
                    queue.device(), ") for the CUDA kernel, got ", ptr.device());
  TORCH_CHECK_TYPE(ptr.scalar_type() == at::kLong || ptr.scalar_type() == at::kInt,
                   "ptr must be int64 or int32, got ", ptr.scalar_type());
  TORCH_CHECK_VALUE(queue.is_contiguous(), "queue must be contiguous (it is updated in place)");
  const c10::cuda::CUDAGuard guard(queue.device());
  const at::Tensor keys = keys_in.contiguous();
  QueueUpdateParams p;
  p.queue = queue.data_ptr();
  p.queue_dtype = dtype_of(queue);
  p.queue_rows = queue.size(0);
  p.keys = keys.data_ptr();
  p.keys_dtype = dtype_of(keys);
  p.batch = keys.size(0);
  p.dim = static_cast<int>(keys.size(1));
  p.ptr = ptr.data_ptr();
  p.ptr_is_int64 = ptr.scalar_type() == at::kLong;
  check_launch(moco_queue_update(p, current_stream()), "moco_queue_update_");
}

}  // namespace
}  // namespace cl_fast::cuda

TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) {
  m.impl("moco_fwd", &cl_fast::cuda::moco_fwd_cuda);
  m.impl("moco_queue_update_", &cl_fast::cuda::moco_queue_update_cuda);
}
