#pragma once
// Warp-per-row helpers of the O(N D)-per-row kernels (moco, byol, queue update, sinkhorn): rows
// held in registers, lane l owning features l, l + 32, ...; elements read through a run-time
// dtype (warp-uniform branch), computed in fp32.
#include "common.cuh"
#include "infonce_kernels.h"

#include <type_traits>

namespace cl_fast::cuda {

__device__ __forceinline__ float load_elem(const void* base, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case Dtype::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_elem(void* base, Dtype dtype, int64_t i, float v) {
  switch (dtype) {
    case Dtype::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    case Dtype::kBFloat16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// x[i] = row[lane + 32 i] (0 past dim).
template <int kPerLane>
__device__ __forceinline__ void load_row(float (&x)[kPerLane], const void* base, Dtype dtype, int64_t row, int dim,
                                         int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < dim ? load_elem(base, dtype, row * dim + d) : 0.f;
  }
}

template <int kPerLane>
__device__ __forceinline__ float warp_dot(const float (&a)[kPerLane], const float (&b)[kPerLane]) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc = fmaf(a[i], b[i], acc);
  return warp_sum(acc);
}

// ||x||_2 without overflow or underflow for any finite row (scaled by max |x| first); NaN rows NaN.
template <int kPerLane>
__device__ __forceinline__ float warp_norm(const float (&x)[kPerLane]) {
  float amax = 0.f;
  bool nan = false;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    amax = fmaxf(amax, fabsf(x[i]));
    nan = nan || isnan(x[i]);
  }
  amax = warp_max(amax);
  if (__any_sync(0xffffffffu, nan)) return NAN;
  if (amax == 0.f || isinf(amax)) return amax;
  const float inv = 1.f / amax;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const float v = x[i] * inv;
    acc = fmaf(v, v, acc);
  }
  return amax * sqrtf(warp_sum(acc));
}

// 1 / max(norm, eps), NaN kept.
__device__ __forceinline__ float inv_clamped(float norm) {
  return 1.f / (isnan(norm) || norm > kNormEps ? norm : kNormEps);
}

// Launches kernel<kPerLane> for the smallest kPerLane in {4, 8, 16, 32} with 32 kPerLane >= dim.
// Returns false when dim > 1024.
template <typename Launch>
bool with_lanes(int dim, const Launch& launch) {
  if (dim <= 128) {
    launch(std::integral_constant<int, 4>{});
  } else if (dim <= 256) {
    launch(std::integral_constant<int, 8>{});
  } else if (dim <= 512) {
    launch(std::integral_constant<int, 16>{});
  } else if (dim <= 1024) {
    launch(std::integral_constant<int, 32>{});
  } else {
    return false;
  }
  return true;
}

}  // namespace cl_fast::cuda
