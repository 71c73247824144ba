// Warp-per-row CUDA kernels: MoCo forward (split over the queue, merged per row), the MoCo
// enqueue, BYOL forward/backward, and the passes of SwAV's log-domain Sinkhorn. CUDA cores
// only; each launch is deterministic (fixed reduction orders, no atomics). Rows up to
// kRowwiseMaxDim features live in registers; longer rows take the *_any kernels (streamed).
#include "rowwise.cuh"
#include "rowwise_kernels.h"

#include <cmath>
#include <type_traits>

namespace cl_fast::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr float kMaxFloor = -1e30f;  // running-max start: exp(m - m') is 0 or 1, never NaN

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock); }

// ---- MoCo ---------------------------------------------------------------------------------------
// One warp per (query row, split): online log-sum-exp over the split's queue rows with
// l_ij = (s u_i) . w_j; when need_grad also O_i = sum_j exp(l_ij - m_i) w_j (flash-decoding).
template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) moco_partial_kernel(const __grid_constant__ MocoParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  const int split = blockIdx.y;
  const int64_t per_split = (p.queue_rows + p.splits - 1) / p.splits;
  const int64_t j_lo = split * per_split;
  const int64_t j_hi = j_lo + per_split < p.queue_rows ? j_lo + per_split : p.queue_rows;
  float u[kPerLane], o[kPerLane], w[kPerLane];
  load_row(u, p.q, p.dtype, i, p.dim, lane);
  const float su = *p.scale * inv_clamped(warp_norm(u));
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    u[t] *= su;
    o[t] = 0.f;
  }
  float m = kMaxFloor, l = 0.f;
  for (int64_t j = j_lo; j < j_hi; ++j) {
    load_row(w, p.queue, p.queue_dtype, j, p.dim, lane);
    const float logit = warp_dot(u, w);
    float keep = 1.f, weight;
    if (logit > m) {
      keep = __expf(m - logit);
      weight = 1.f;
      m = logit;
    } else {
      weight = __expf(logit - m);  // NaN logits make l (and the loss) NaN
    }
    l = l * keep + weight;
    if (p.need_grad) {
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) o[t] = fmaf(o[t], keep, weight * w[t]);
    }
  }
  const int64_t slot = static_cast<int64_t>(split) * p.n + i;
  if (lane == 0) {
    p.part_m[slot] = m;
    p.part_l[slot] = l;
  }
  if (p.need_grad) {
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int d = lane + 32 * t;
      if (d < p.dim) p.part_o[slot * p.dim + d] = o[t];
    }
  }
}

// Row i's positive logit l0 merged with its per-split statistics (the recurrence is the one in
// moco_merge_kernel's comment): writes the row's loss, returns m, L_neg and L for the gradient.
struct MocoRowStats {
  float m, l_neg, total;
};

__device__ __forceinline__ MocoRowStats moco_merge_stats(const MocoParams& p, int64_t i, float l0, int lane) {
  float m_neg = kMaxFloor;
  for (int sp = 0; sp < p.splits; ++sp) m_neg = fmaxf(m_neg, p.part_m[static_cast<int64_t>(sp) * p.n + i]);
  const float m = fmaxf(l0, m_neg);
  float l_neg = 0.f;
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t slot = static_cast<int64_t>(sp) * p.n + i;
    l_neg += p.part_l[slot] * __expf(p.part_m[slot] - m);
  }
  const float total = __expf(l0 - m) + l_neg;
  if (lane == 0) p.loss[i] = l0 >= m_neg ? log1pf(l_neg) : (m - l0) + logf(total);
  return {m, l_neg, total};
}

// One warp per row: merge the splits with the positive. m_neg = max_s m_s, m = max(l0, m_neg),
// L_neg = sum_s l_s e^(m_s - m), L = e^(l0 - m) + L_neg; loss = log1p(L_neg) when the positive
// is the max, else (m - l0) + log L (never lse - l0 formed by cancellation); P0 - 1 = -L_neg / L.
template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) moco_merge_kernel(const __grid_constant__ MocoParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  float u[kPerLane], v[kPerLane];
  load_row(u, p.q, p.dtype, i, p.dim, lane);
  load_row(v, p.k, p.dtype, i, p.dim, lane);
  const float r = inv_clamped(warp_norm(u)), rv = inv_clamped(warp_norm(v));
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    u[t] *= r;
    v[t] *= rv;
  }
  const float s = *p.scale;
  const float l0 = s * warp_dot(u, v);
  const MocoRowStats stats = moco_merge_stats(p, i, l0, lane);
  if (!p.need_grad) return;
  const float m = stats.m, l_neg = stats.l_neg, total = stats.total;
  float d[kPerLane];
  const float pos_coef = -l_neg / total;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) d[t] = pos_coef * v[t];
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t slot = static_cast<int64_t>(sp) * p.n + i;
    const float weight = __expf(p.part_m[slot] - m) / total;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int dd = lane + 32 * t;
      if (dd < p.dim) d[t] = fmaf(weight, p.part_o[slot * p.dim + dd], d[t]);
    }
  }
  const float ci = warp_dot(u, d);
  const bool project = r < 1.f / kNormEps;  // ||q_i|| > eps; else n(q) = q / eps is linear
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int dd = lane + 32 * t;
    if (dd < p.dim) p.e[i * p.dim + dd] = project ? r * (d[t] - u[t] * ci) : r * d[t];
  }
  if (lane == 0) p.c[i] = ci;
}

// One warp per key row: the old ptr is read by every warp; the ptr itself moves in a second
// launch (stream order), so no warp sees it half-updated.
template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) queue_write_kernel(const __grid_constant__ QueueUpdateParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= p.batch) return;
  const int64_t raw = p.ptr_is_int64 ? *static_cast<const int64_t*>(p.ptr) : *static_cast<const int32_t*>(p.ptr);
  const int64_t start = ((raw % p.queue_rows) + p.queue_rows) % p.queue_rows;
  const int64_t row = (start + b) % p.queue_rows;
  float x[kPerLane];
  load_row(x, p.keys, p.keys_dtype, b, p.dim, lane);
  const float r = inv_clamped(warp_norm(x));
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < p.dim) store_elem(p.queue, p.queue_dtype, row * p.dim + d, x[t] * r);
  }
}

__global__ void queue_advance_kernel(const __grid_constant__ QueueUpdateParams p) {
  if (threadIdx.x != 0) return;
  if (p.ptr_is_int64) {
    int64_t* ptr = static_cast<int64_t*>(p.ptr);
    *ptr = (((*ptr % p.queue_rows) + p.queue_rows) % p.queue_rows + p.batch) % p.queue_rows;
  } else {
    int32_t* ptr = static_cast<int32_t*>(p.ptr);
    const int64_t start = ((*ptr % p.queue_rows) + p.queue_rows) % p.queue_rows;
    *ptr = static_cast<int32_t>((start + p.batch) % p.queue_rows);
  }
}

// ---- BYOL ---------------------------------------------------------------------------------------
// loss = 2 omc, omc = 1 - cos on the normalised rows u = r_p p, v = r_z z (r = 1 / max(||.||, eps),
// the norms taken on rows scaled by their max |x|, so no finite row overflows). Where both norms
// exceed eps, omc = ||u - v||^2 / 2 (no cancellation for nearly aligned rows: 1 - u.v keeps only
// fp32's absolute precision ~1e-7 of a loss ~1e-4); where one is clamped (||u|| < 1), 1 - u.v.
// The branch is warp-uniform (one row per warp).
template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) byol_fwd_kernel(const __grid_constant__ ByolParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  float x[kPerLane], y[kPerLane];
  load_row(x, p.p, p.dtype, i, p.dim, lane);
  load_row(y, p.z, p.dtype, i, p.dim, lane);
  const float np = warp_norm(x), nz = warp_norm(y);
  const float rp = inv_clamped(np), rz = inv_clamped(nz);
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    x[t] *= rp;
    y[t] *= rz;
  }
  float omc;
  if (np > kNormEps && nz > kNormEps) {
    float acc = 0.f;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const float d = x[t] - y[t];
      acc = fmaf(d, d, acc);
    }
    omc = 0.5f * warp_sum(acc);
  } else {
    omc = 1.f - warp_dot(x, y);  // NaN rows land here (NaN > eps is false) and stay NaN
  }
  if (lane == 0) {
    p.loss[i] = 2.f * omc;
    p.stats[3 * i] = np;
    p.stats[3 * i + 1] = nz;
    p.stats[3 * i + 2] = omc;
  }
}

// With v - cos u = (v - u) + omc u (any u, v): dp = -2 g r_p ((v - u) + omc_p u), omc_p = 1 where
// ||p|| <= eps (n(p) = p / eps is linear); dz likewise with p and z swapped. u and v are formed
// first (r_p r_z alone can underflow for large rows).
template <int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) byol_bwd_kernel(const __grid_constant__ ByolParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  float x[kPerLane], y[kPerLane];
  load_row(x, p.p, p.dtype, i, p.dim, lane);
  load_row(y, p.z, p.dtype, i, p.dim, lane);
  const float np = p.stats[3 * i], nz = p.stats[3 * i + 1], omc = p.stats[3 * i + 2], g = p.grad[i];
  const float rp = inv_clamped(np), rz = inv_clamped(nz);
  const float cp = -2.f * g * rp, wp = np > kNormEps ? omc : 1.f;
  const float cz = -2.f * g * rz, wz = nz > kNormEps ? omc : 1.f;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    x[t] *= rp;  // u
    y[t] *= rz;  // v
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < p.dim) store_elem(p.dp, p.dtype, i * p.dim + d, cp * fmaf(wp, x[t], y[t] - x[t]));
  }
  if (p.dz == nullptr) return;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < p.dim) store_elem(p.dz, p.dtype, i * p.dim + d, cz * fmaf(wz, y[t], x[t] - y[t]));
  }
}

// ---- rows longer than a warp's registers (D > kRowwiseMaxDim) -----------------------------------
// The same math with the row streamed from memory (L1/L2) on every pass; each lane reads and
// writes only its own features d = lane, lane + 32, ..., so the scratch rows need no barrier.

// ||row|| without overflow: max |x| first, then the scaled sum of squares; NaN rows NaN.
__device__ __forceinline__ float warp_norm_any(const void* base, Dtype dtype, int64_t row, int dim, int lane) {
  float amax = 0.f;
  bool nan = false;
  for (int d = lane; d < dim; d += 32) {
    const float v = load_elem(base, dtype, row * dim + d);
    amax = fmaxf(amax, fabsf(v));
    nan = nan || isnan(v);
  }
  amax = warp_max(amax);
  if (__any_sync(0xffffffffu, nan)) return NAN;
  if (amax == 0.f || isinf(amax)) return amax;
  const float inv = 1.f / amax;
  float acc = 0.f;
  for (int d = lane; d < dim; d += 32) {
    const float v = load_elem(base, dtype, row * dim + d) * inv;
    acc = fmaf(v, v, acc);
  }
  return amax * sqrtf(warp_sum(acc));
}

__device__ __forceinline__ float warp_dot_any(const void* a, Dtype a_dtype, int64_t a_row, const void* b,
                                              Dtype b_dtype, int64_t b_row, int dim, int lane) {
  float acc = 0.f;
  for (int d = lane; d < dim; d += 32) {
    acc = fmaf(load_elem(a, a_dtype, a_row * dim + d), load_elem(b, b_dtype, b_row * dim + d), acc);
  }
  return warp_sum(acc);
}

// moco_partial_kernel with O kept in its part_o slot (read-modify-write by the owning lane).
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1) moco_partial_any_kernel(const __grid_constant__ MocoParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  const int split = blockIdx.y;
  const int64_t per_split = (p.queue_rows + p.splits - 1) / p.splits;
  const int64_t j_lo = split * per_split;
  const int64_t j_hi = j_lo + per_split < p.queue_rows ? j_lo + per_split : p.queue_rows;
  const float su = *p.scale * inv_clamped(warp_norm_any(p.q, p.dtype, i, p.dim, lane));
  const int64_t slot = static_cast<int64_t>(split) * p.n + i;
  float* o = p.need_grad ? p.part_o + slot * p.dim : nullptr;
  if (o != nullptr) {
    for (int d = lane; d < p.dim; d += 32) o[d] = 0.f;
  }
  float m = kMaxFloor, l = 0.f;
  for (int64_t j = j_lo; j < j_hi; ++j) {
    const float logit = su * warp_dot_any(p.q, p.dtype, i, p.queue, p.queue_dtype, j, p.dim, lane);
    float keep = 1.f, weight;
    if (logit > m) {
      keep = __expf(m - logit);
      weight = 1.f;
      m = logit;
    } else {
      weight = __expf(logit - m);
    }
    l = l * keep + weight;
    if (o != nullptr) {
      for (int d = lane; d < p.dim; d += 32) {
        o[d] = fmaf(o[d], keep, weight * load_elem(p.queue, p.queue_dtype, j * p.dim + d));
      }
    }
  }
  if (lane == 0) {
    p.part_m[slot] = m;
    p.part_l[slot] = l;
  }
}

// moco_merge_kernel with d formed in e's row (the scratch), then projected in place.
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1) moco_merge_any_kernel(const __grid_constant__ MocoParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  const float r = inv_clamped(warp_norm_any(p.q, p.dtype, i, p.dim, lane));
  const float rv = inv_clamped(warp_norm_any(p.k, p.dtype, i, p.dim, lane));
  const float s = *p.scale;
  const float l0 = s * (warp_dot_any(p.q, p.dtype, i, p.k, p.dtype, i, p.dim, lane) * r * rv);
  const MocoRowStats stats = moco_merge_stats(p, i, l0, lane);
  if (!p.need_grad) return;
  const float m = stats.m, l_neg = stats.l_neg, total = stats.total;
  float* e = p.e + i * p.dim;
  const float pos_coef = -l_neg / total;
  for (int d = lane; d < p.dim; d += 32) e[d] = pos_coef * rv * load_elem(p.k, p.dtype, i * p.dim + d);
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t slot = static_cast<int64_t>(sp) * p.n + i;
    const float weight = __expf(p.part_m[slot] - m) / total;
    for (int d = lane; d < p.dim; d += 32) e[d] = fmaf(weight, p.part_o[slot * p.dim + d], e[d]);
  }
  float acc = 0.f;
  for (int d = lane; d < p.dim; d += 32) acc = fmaf(r * load_elem(p.q, p.dtype, i * p.dim + d), e[d], acc);
  const float ci = warp_sum(acc);
  const bool project = r < 1.f / kNormEps;
  for (int d = lane; d < p.dim; d += 32) {
    const float u = r * load_elem(p.q, p.dtype, i * p.dim + d);
    e[d] = project ? r * (e[d] - u * ci) : r * e[d];
  }
  if (lane == 0) p.c[i] = ci;
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1) queue_write_any_kernel(const __grid_constant__ QueueUpdateParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= p.batch) return;
  const int64_t raw = p.ptr_is_int64 ? *static_cast<const int64_t*>(p.ptr) : *static_cast<const int32_t*>(p.ptr);
  const int64_t row = (((raw % p.queue_rows) + p.queue_rows) % p.queue_rows + b) % p.queue_rows;
  const float r = inv_clamped(warp_norm_any(p.keys, p.keys_dtype, b, p.dim, lane));
  for (int d = lane; d < p.dim; d += 32) {
    store_elem(p.queue, p.queue_dtype, row * p.dim + d, load_elem(p.keys, p.keys_dtype, b * p.dim + d) * r);
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1) byol_fwd_any_kernel(const __grid_constant__ ByolParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  const float np = warp_norm_any(p.p, p.dtype, i, p.dim, lane), nz = warp_norm_any(p.z, p.dtype, i, p.dim, lane);
  const float rp = inv_clamped(np), rz = inv_clamped(nz);
  const bool unclamped = np > kNormEps && nz > kNormEps;  // warp-uniform; false for NaN rows
  float acc = 0.f;  // on the normalised factors u_d = r_p p_d, v_d = r_z z_d: no overflow
  for (int d = lane; d < p.dim; d += 32) {
    const float u = rp * load_elem(p.p, p.dtype, i * p.dim + d), v = rz * load_elem(p.z, p.dtype, i * p.dim + d);
    acc = unclamped ? fmaf(u - v, u - v, acc) : fmaf(u, v, acc);
  }
  const float sum = warp_sum(acc);
  const float omc = unclamped ? 0.5f * sum : 1.f - sum;  // ||u - v||^2 / 2, or 1 - u.v
  if (lane == 0) {
    p.loss[i] = 2.f * omc;
    p.stats[3 * i] = np;
    p.stats[3 * i + 1] = nz;
    p.stats[3 * i + 2] = omc;
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32, 1) byol_bwd_any_kernel(const __grid_constant__ ByolParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (i >= p.n) return;
  const float np = p.stats[3 * i], nz = p.stats[3 * i + 1], omc = p.stats[3 * i + 2], g = p.grad[i];
  const float rp = inv_clamped(np), rz = inv_clamped(nz);
  const float cp = -2.f * g * rp, wp = np > kNormEps ? omc : 1.f;
  const float cz = -2.f * g * rz, wz = nz > kNormEps ? omc : 1.f;
  for (int d = lane; d < p.dim; d += 32) {
    const float u = rp * load_elem(p.p, p.dtype, i * p.dim + d), v = rz * load_elem(p.z, p.dtype, i * p.dim + d);
    store_elem(p.dp, p.dtype, i * p.dim + d, cp * fmaf(wp, u, v - u));
    if (p.dz != nullptr) store_elem(p.dz, p.dtype, i * p.dim + d, cz * fmaf(wz, v, u - v));
  }
}

// ---- Sinkhorn -----------------------------------------------------------------------------------
// x = score * inv_eps rounded to fp32 before f or g is added (no fma): f was computed from the
// rounded x, and x + f must cancel exactly where it should.
__device__ __forceinline__ float logit(const SinkhornParams& p, int64_t b, int64_t k) {
  return __fmul_rn(load_elem(p.scores, p.dtype, b * p.cols + k), p.inv_eps);
}

// Online (max, sum exp(. - max)) update with one exp per value.
__device__ __forceinline__ void lse_push(float& m, float& sum, float v) {
  if (v > m) {
    sum = sum * __expf(m - v) + 1.f;
    m = v;
  } else {
    sum += __expf(v - m);  // NaN values make the sum NaN
  }
}
__device__ __forceinline__ void lse_merge(float& m, float& sum, float m2, float sum2) {
  const float mm = fmaxf(m, m2);
  const float shift = mm == -INFINITY ? 0.f : mm;
  sum = sum * __expf(m - shift) + sum2 * __expf(m2 - shift);
  m = mm;
}

// One warp per row: g_b = -lse_k (x_bk + f_k).
__global__ void __launch_bounds__(kWarpsPerBlock * 32) sinkhorn_row_kernel(const __grid_constant__ SinkhornParams p,
                                                                          const float* f, float* g) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= p.rows) return;
  float m = -INFINITY, sum = 0.f;
  for (int64_t k = lane; k < p.cols; k += 32) lse_push(m, sum, __fadd_rn(logit(p, b, k), f ? f[k] : 0.f));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, sum, offset);
    lse_merge(m, sum, m2, s2);
  }
  if (lane == 0) g[b] = -((m == -INFINITY ? 0.f : m) + logf(sum));
}

// Block (32, 16): thread (tx, ty) folds rows ty, ty + 16, ... of column 32 blockIdx.x + tx; the
// 16 partials of a column are merged in a fixed order. Coalesced: a warp reads 32 adjacent columns.
constexpr int kColRowsPerPass = 16;
__global__ void __launch_bounds__(32 * kColRowsPerPass) sinkhorn_col_kernel(const __grid_constant__ SinkhornParams p,
                                                                            const float* g, float* col_max,
                                                                            float* col_sum) {
  __shared__ float part_m[kColRowsPerPass][33], part_s[kColRowsPerPass][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x / 32;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  float m = -INFINITY, sum = 0.f;
  if (k < p.cols) {
    for (int64_t b = ty; b < p.rows; b += kColRowsPerPass) lse_push(m, sum, __fadd_rn(logit(p, b, k), g ? g[b] : 0.f));
  }
  part_m[ty][tx] = m;
  part_s[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && k < p.cols) {
    for (int r = 1; r < kColRowsPerPass; ++r) lse_merge(m, sum, part_m[r][tx], part_s[r][tx]);
    bool bad = isnan(sum) || m == INFINITY;
    col_max[k] = bad ? NAN : m;
    col_sum[k] = sum;
  }
}

__global__ void sinkhorn_f_kernel(int64_t cols, const float* col_max, const float* col_sum, float* f) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < cols) f[k] = -((col_max[k] == -INFINITY ? 0.f : col_max[k]) + logf(col_sum[k]));
}

// One warp per row: out[b, k] = exp(y_bk - lse_b), y = x + f; two reads of the row (the second
// from L1/L2).
__global__ void __launch_bounds__(kWarpsPerBlock * 32) sinkhorn_assign_kernel(const __grid_constant__ SinkhornParams p,
                                                                             const float* f, float* out) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (b >= p.rows) return;
  float m = -INFINITY, sum = 0.f;
  for (int64_t k = lane; k < p.cols; k += 32) lse_push(m, sum, __fadd_rn(logit(p, b, k), f[k]));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, sum, offset);
    lse_merge(m, sum, m2, s2);
  }
  const bool bad = isnan(sum) || m == INFINITY;
  const float shift = m == -INFINITY ? 0.f : m, inv_sum = 1.f / sum;
  for (int64_t k = lane; k < p.cols; k += 32) {
    out[b * p.cols + k] = bad ? NAN : __expf(__fadd_rn(logit(p, b, k), f[k]) - shift) * inv_sum;
  }
}

}  // namespace

cudaError_t moco_forward(const MocoParams& p, cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  const dim3 partial_grid(row_blocks(p.n), static_cast<unsigned>(p.splits));
  const bool ok = with_lanes(p.dim, [&](auto lanes) {
    constexpr int kPerLane = decltype(lanes)::value;
    moco_partial_kernel<kPerLane><<<partial_grid, kWarpsPerBlock * 32, 0, stream>>>(p);
    moco_merge_kernel<kPerLane><<<row_blocks(p.n), kWarpsPerBlock * 32, 0, stream>>>(p);
  });
  if (!ok) {
    moco_partial_any_kernel<<<partial_grid, kWarpsPerBlock * 32, 0, stream>>>(p);
    moco_merge_any_kernel<<<row_blocks(p.n), kWarpsPerBlock * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t moco_queue_update(const QueueUpdateParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  const bool ok = with_lanes(p.dim, [&](auto lanes) {
    constexpr int kPerLane = decltype(lanes)::value;
    queue_write_kernel<kPerLane><<<row_blocks(p.batch), kWarpsPerBlock * 32, 0, stream>>>(p);
  });
  if (!ok) queue_write_any_kernel<<<row_blocks(p.batch), kWarpsPerBlock * 32, 0, stream>>>(p);
  queue_advance_kernel<<<1, 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t byol_forward(const ByolParams& p, cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  const bool ok = with_lanes(p.dim, [&](auto lanes) {
    byol_fwd_kernel<decltype(lanes)::value><<<row_blocks(p.n), kWarpsPerBlock * 32, 0, stream>>>(p);
  });
  if (!ok) byol_fwd_any_kernel<<<row_blocks(p.n), kWarpsPerBlock * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t byol_backward(const ByolParams& p, cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  const bool ok = with_lanes(p.dim, [&](auto lanes) {
    byol_bwd_kernel<decltype(lanes)::value><<<row_blocks(p.n), kWarpsPerBlock * 32, 0, stream>>>(p);
  });
  if (!ok) byol_bwd_any_kernel<<<row_blocks(p.n), kWarpsPerBlock * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t sinkhorn_row_lse(const SinkhornParams& p, const float* f, float* g, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  sinkhorn_row_kernel<<<row_blocks(p.rows), kWarpsPerBlock * 32, 0, stream>>>(p, f, g);
  return cudaGetLastError();
}

cudaError_t sinkhorn_col_lse(const SinkhornParams& p, const float* g, float* col_max, float* col_sum,
                             cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  sinkhorn_col_kernel<<<static_cast<unsigned>((p.cols + 31) / 32), 32 * kColRowsPerPass, 0, stream>>>(p, g, col_max,
                                                                                                     col_sum);
  return cudaGetLastError();
}

cudaError_t sinkhorn_prototype_step(int64_t cols, const float* col_max, const float* col_sum, float* f,
                                    cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  sinkhorn_f_kernel<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(cols, col_max, col_sum, f);
  return cudaGetLastError();
}

cudaError_t sinkhorn_assign(const SinkhornParams& p, const float* f, float* out, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  sinkhorn_assign_kernel<<<row_blocks(p.rows), kWarpsPerBlock * 32, 0, stream>>>(p, f, out);
  return cudaGetLastError();
}

}  // namespace cl_fast::cuda
