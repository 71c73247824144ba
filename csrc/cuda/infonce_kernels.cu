// Launchers of the InfoNCE CUDA kernels (infonce_kernels.cuh): one instantiation per
// (dtype, nt_xent | cross), dynamic shared memory raised past 48 KB where needed.
#include "infonce_kernels.cuh"

namespace cl_fast::cuda {
namespace {

// Dynamic shared memory per block: within sm_80's opt-in limit (163 KB; sm_90: 227 KB).
constexpr size_t kMaxSmemPerBlock = 166912;
template <typename Element>
constexpr bool smem_fits() {
  return InfonceTraits<Element, true, true>::bwd_smem_bytes() <= kMaxSmemPerBlock &&
         InfonceTraits<Element, true>::bwd_smem_bytes() <= kMaxSmemPerBlock &&
         InfonceTraits<Element, false>::bwd_smem_bytes() <= kMaxSmemPerBlock &&
         InfonceTraits<Element, true>::fwd_smem_bytes() <= kMaxSmemPerBlock;
}
static_assert(smem_fits<float>() && smem_fits<__half>() && smem_fits<__nv_bfloat16>(),
              "InfoNCE tiles exceed the per-block shared memory of sm_80");

cudaError_t launch_inv_norm(const InfonceProblem& p, cudaStream_t stream) {
  if (!p.normalize) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((2 * p.n + 7) / 8);
  switch (p.dtype) {
    case Dtype::kFloat32: row_inv_norm_kernel<float><<<blocks, 256, 0, stream>>>(p); break;
    case Dtype::kFloat16: row_inv_norm_kernel<__half><<<blocks, 256, 0, stream>>>(p); break;
    case Dtype::kBFloat16: row_inv_norm_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

template <typename Element, bool kCross, bool kSiglip>
cudaError_t forward_impl(const InfonceFwdParams& p, cudaStream_t stream) {
  using Traits = InfonceTraits<Element, kCross, kSiglip>;
  const size_t smem = Traits::fwd_smem_bytes();
  auto kernel = infonce_fwd_kernel<Traits>;
  static std::atomic<unsigned long long> smem_set{0};
  cudaError_t status = allow_smem(kernel, smem, smem_set);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(infonce_dscale_partials(p.n)));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, bool kCross, bool kSiglip>
cudaError_t backward_impl(const InfonceBwdParams& p, cudaStream_t stream) {
  using Traits = InfonceTraits<Element, kCross, kSiglip>;
  const size_t smem = Traits::bwd_smem_bytes();
  auto kernel = infonce_bwd_kernel<Traits>;
  static std::atomic<unsigned long long> smem_set{0};
  cudaError_t status = allow_smem(kernel, smem, smem_set);
  if (status != cudaSuccess) return status;
  const int64_t blocks = infonce_dscale_partials(p.n);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((p.dim + Traits::kSlice - 1) / Traits::kSlice));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  dscale_finalize_kernel<<<1, 256, 0, stream>>>(p.dscale_partials, blocks, p.scale, !kSiglip, p.dscale);
  if (kSiglip) dscale_finalize_kernel<<<1, 256, 0, stream>>>(p.dbias_partials, blocks, p.scale, false, p.dbias);
  return cudaGetLastError();
}

template <template <typename> class Impl, typename Params>
cudaError_t dispatch(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case Dtype::kFloat32: return Impl<float>::run(p, stream);
    case Dtype::kFloat16: return Impl<__half>::run(p, stream);
    case Dtype::kBFloat16: return Impl<__nv_bfloat16>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

// nt_xent, cross (info_nce / clip), SigLIP
template <typename Element>
struct Forward {
  static cudaError_t run(const InfonceFwdParams& p, cudaStream_t stream) {
    if (p.siglip) return forward_impl<Element, true, true>(p, stream);
    return p.cross ? forward_impl<Element, true, false>(p, stream) : forward_impl<Element, false, false>(p, stream);
  }
};
template <typename Element>
struct Backward {
  static cudaError_t run(const InfonceBwdParams& p, cudaStream_t stream) {
    if (p.siglip) return backward_impl<Element, true, true>(p, stream);
    return p.cross ? backward_impl<Element, true, false>(p, stream) : backward_impl<Element, false, false>(p, stream);
  }
};

}  // namespace

cudaError_t infonce_forward(const InfonceFwdParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.dim <= 0) return cudaSuccess;
  cudaError_t status = launch_inv_norm(p, stream);
  if (status != cudaSuccess) return status;
  return dispatch<Forward>(p, stream);
}

cudaError_t infonce_backward(const InfonceBwdParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.dim <= 0) return cudaSuccess;
  cudaError_t status = launch_inv_norm(p, stream);
  if (status != cudaSuccess) return status;
  return dispatch<Backward>(p, stream);
}

}  // namespace cl_fast::cuda
