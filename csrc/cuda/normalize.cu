// Row-wise L2 normalisation: y_i = x_i / max(||x_i||_2, 1e-12), fp32 accumulation.
// One warp per row up to kWarpRowMaxCols columns (8 rows per 256-thread block), one block per
// row beyond. Two sweeps over the row (sum of squares, then scale); the second one hits L1/L2.
// 16-byte vector loads and stores when both pointers are 16-byte aligned and the row length is
// a multiple of the vector (4 fp32 or 8 fp16/bf16 elements).
#include "normalize.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr float kEps = 1e-12f;
constexpr int kBlockThreads = 256;
constexpr int64_t kWarpRowMaxCols = 1024;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of squares of one row, strided over `threads` threads starting at `lane`.
template <typename T, bool kVector>
__device__ __forceinline__ float row_sum_squares(const T* __restrict__ row, int64_t cols, int lane, int threads) {
  float acc = 0.f;
  if constexpr (kVector) {
    constexpr int kPer = 16 / sizeof(T);
    const uint4* chunks = reinterpret_cast<const uint4*>(row);
    for (int64_t c = lane; c < cols / kPer; c += threads) {
      const uint4 chunk = __ldg(chunks + c);
      const T* e = reinterpret_cast<const T*>(&chunk);
#pragma unroll
      for (int t = 0; t < kPer; ++t) {
        const float f = to_float(e[t]);
        acc = fmaf(f, f, acc);
      }
    }
  } else {
    for (int64_t c = lane; c < cols; c += threads) {
      const float f = to_float(row[c]);
      acc = fmaf(f, f, acc);
    }
  }
  return acc;
}

template <typename T, bool kVector>
__device__ __forceinline__ void scale_row(const T* __restrict__ row, T* __restrict__ out, int64_t cols, float inv,
                                          int lane, int threads) {
  if constexpr (kVector) {
    constexpr int kPer = 16 / sizeof(T);
    const uint4* chunks = reinterpret_cast<const uint4*>(row);
    uint4* out_chunks = reinterpret_cast<uint4*>(out);
    for (int64_t c = lane; c < cols / kPer; c += threads) {
      const uint4 chunk = __ldg(chunks + c);
      const T* e = reinterpret_cast<const T*>(&chunk);
      uint4 result;
      T* r = reinterpret_cast<T*>(&result);
#pragma unroll
      for (int t = 0; t < kPer; ++t) r[t] = from_float<T>(to_float(e[t]) * inv);
      out_chunks[c] = result;
    }
  } else {
    for (int64_t c = lane; c < cols; c += threads) out[c] = from_float<T>(to_float(row[c]) * inv);
  }
}

__device__ __forceinline__ float inverse_norm(float sum_squares) {
  const float norm = sqrtf(sum_squares);
  return 1.f / ((norm > kEps || isnan(norm)) ? norm : kEps);  // NaN rows stay NaN
}

// One warp per row, kBlockThreads / 32 rows per block, grid-stride over rows.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kBlockThreads) l2_normalize_warp_rows(const T* __restrict__ x, T* __restrict__ y,
                                                                         int64_t rows, int64_t cols) {
  constexpr int kRowsPerBlock = kBlockThreads / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const T* in = x + row * cols;
    const float inv = inverse_norm(warp_sum(row_sum_squares<T, kVector>(in, cols, lane, 32)));
    scale_row<T, kVector>(in, y + row * cols, cols, inv, lane, 32);
  }
}

// One block per row (long rows), grid-stride over rows.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kBlockThreads) l2_normalize_block_rows(const T* __restrict__ x, T* __restrict__ y,
                                                                          int64_t rows, int64_t cols) {
  __shared__ float partial[kBlockThreads / 32];
  __shared__ float inv_shared;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* in = x + row * cols;
    const float part = warp_sum(row_sum_squares<T, kVector>(in, cols, threadIdx.x, kBlockThreads));
    if (lane == 0) partial[warp] = part;
    __syncthreads();
    if (warp == 0) {
      float total = lane < kBlockThreads / 32 ? partial[lane] : 0.f;
      total = warp_sum(total);
      if (lane == 0) inv_shared = inverse_norm(total);
    }
    __syncthreads();
    scale_row<T, kVector>(in, y + row * cols, cols, inv_shared, threadIdx.x, kBlockThreads);
    __syncthreads();  // partial / inv_shared are reused by the next row
  }
}

template <typename T>
cudaError_t launch(const void* x_raw, void* y_raw, int64_t rows, int64_t cols, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_raw);
  T* y = static_cast<T*>(y_raw);
  constexpr int64_t kPer = 16 / sizeof(T);
  const bool vector = cols % kPer == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(y) % 16 == 0;
  constexpr int64_t kMaxBlocks = 65535 * 8;
  if (cols <= kWarpRowMaxCols) {
    const int64_t rows_per_block = kBlockThreads / 32;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, kMaxBlocks));
    if (vector) {
      l2_normalize_warp_rows<T, true><<<blocks, kBlockThreads, 0, stream>>>(x, y, rows, cols);
    } else {
      l2_normalize_warp_rows<T, false><<<blocks, kBlockThreads, 0, stream>>>(x, y, rows, cols);
    }
  } else {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, kMaxBlocks));
    if (vector) {
      l2_normalize_block_rows<T, true><<<blocks, kBlockThreads, 0, stream>>>(x, y, rows, cols);
    } else {
      l2_normalize_block_rows<T, false><<<blocks, kBlockThreads, 0, stream>>>(x, y, rows, cols);
    }
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" int cl_fast_l2_normalize_cuda(const void* x, void* y, int64_t rows, int64_t cols, int dtype, void* stream) {
  if (rows <= 0 || cols <= 0) return static_cast<int>(cudaSuccess);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CL_FAST_FLOAT32: return static_cast<int>(launch<float>(x, y, rows, cols, s));
    case CL_FAST_FLOAT16: return static_cast<int>(launch<__half>(x, y, rows, cols, s));
    case CL_FAST_BFLOAT16: return static_cast<int>(launch<__nv_bfloat16>(x, y, rows, cols, s));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
