// BYOL's regression loss on the CPU: loss_i = 2 - 2 cos(p_i, z_i) = 2 omc_i, omc = 1 - cos.
// With r = 1 / max(||.||, eps), u = r_p p, v = r_z z:
//   omc_i = ||u_i - v_i||^2 / 2   where both norms exceed eps (then ||u|| = ||v|| = 1): no
//           cancellation for nearly aligned rows, where 1 - u.v would lose the relative precision
//           (fp32's absolute error ~1e-7 is all of a loss ~1e-4);
//   omc_i = 1 - u_i.v_i           where a norm is clamped (n(x) = x / eps, ||u|| < 1, so u.v <= ||u||
//           and it cancels only for a norm within rounding of eps).
// Forward: the norms (one pass), then omc (a second pass over the rows, still in cache) -> loss_i
// and the per-row stats (||p_i||, ||z_i||, omc_i) kept for the backward (3 fp32 per row).
// Backward with upstream g_i, using v - cos u = (v - u) + omc u (true for any u, v):
//   dp_i = -2 g_i r_p ((v_i - u_i) + omc_p u_i)   omc_p = omc_i, or 1 when ||p_i|| <= eps (n(p) = p / eps
//                                                 is linear: dp = -2 g r_p v)
//   dz_i = -2 g_i r_z ((u_i - v_i) + omc_z v_i)   (likewise), only when z requires grad.
#include "cpu_vec.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace cl_fast::cpu {
namespace {

constexpr float kNormEps = 1e-12f;

// Element conversions. fp16 goes through c10's software conversion: the Half(float) constructor
// uses F16C when cpu_vec.h selects AVX2, and the build does not pass -mf16c.
inline float to_f32(float x) { return x; }
inline float to_f32(double x) { return static_cast<float>(x); }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return c10::detail::fp16_ieee_to_fp32_value(x.x); }
inline void from_f32(float x, float* dst) { *dst = x; }
inline void from_f32(float x, double* dst) { *dst = x; }
inline void from_f32(float x, c10::BFloat16* dst) { *dst = c10::BFloat16(x); }
inline void from_f32(float x, c10::Half* dst) {
  *dst = c10::Half(c10::detail::fp16_ieee_from_fp32_value(x), c10::Half::from_bits());
}

// One row in fp32: the row itself for fp32 inputs, else converted into `buffer`.
template <typename scalar_t>
const float* row_f32(const scalar_t* row, int64_t dim, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t j = 0; j < dim; ++j) buffer[j] = to_f32(row[j]);
    return buffer;
  }
}

// A large row (max |x| > 2^50, cpu_vec.h) scaled by 2^-e into `buffer` (exact), so that its
// norm and dot products stay in fp32's range for any finite input; *e = 0 leaves it as it is.
// cos and n(x) do not change; the gradient of a scaled row is scaled by 2^-e back.
const float* in_range_row(const float* row, int64_t dim, float* buffer, int* e) {
  *e = row_scale_exponent(max_abs(row, dim));
  if (*e == 0) return row;
  scale_row_pow2(row, buffer, dim, *e);
  return buffer;
}

// sum_j (a_j sa - b_j sb)^2: the squared distance of the normalised rows, no cancellation.
inline float scaled_dist2(const float* a, float sa, const float* b, float sb, int64_t dim) {
  const Vec fa(sa), fb(sb);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= dim; j += kVec) {
    const Vec d = Vec::loadu(a + j) * fa - Vec::loadu(b + j) * fb;
    acc = at::vec::fmadd(d, d, acc);
  }
  if (j < dim) {  // zero-filled tail: d = 0 there
    const Vec d = Vec::loadu(a + j, dim - j) * fa - Vec::loadu(b + j, dim - j) * fb;
    acc = at::vec::fmadd(d, d, acc);
  }
  return hsum(acc);
}

template <typename scalar_t>
void store_row(const float* src, scalar_t* dst, int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) from_f32(src[j], dst + j);
}

// One row's gradient, x the row differentiated and y the other: out = c ((n(y) - n(x)) + w n(x)),
// n(x) = r_x x, n(y) = r_y y formed first (r_x r_y alone can underflow). (n(y) - n(x)) is small for
// aligned rows and carries the gradient, w n(x) is its O(1 - cos) correction. A row scaled by
// 2^-e (in_range_row) gets d/dx = 2^-e d/dx'.
void row_grad(const float* x, const float* y, float rx, float ry, float c, float w, int e, float* out, int64_t dim) {
  at::vec::map2([c, w, rx, ry](Vec xx, Vec yy) {
    const Vec u = xx * Vec(rx), v = yy * Vec(ry);
    return ((v - u) + u * Vec(w)) * Vec(c);
  }, out, x, y, dim);
  if (e != 0) scale_row_pow2(out, out, dim, e);
}

// (loss (N,), stats (N, 3) = [||p||, ||z||, omc = 1 - cos]), fp32.
std::tuple<at::Tensor, at::Tensor> byol_fwd(const at::Tensor& p_in, const at::Tensor& z_in) {
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t N = p.size(0), D = p.size(1);
  const auto f32 = p.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32);
  at::Tensor stats = at::empty({N, 3}, f32);
  float* loss_data = loss.data_ptr<float>();
  float* stat = stats.data_ptr<float>();
  AT_DISPATCH_SWITCH(p.scalar_type(), "byol_fwd", AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
    const scalar_t* p_data = p.data_ptr<scalar_t>();
    const scalar_t* z_data = z.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> pbuf(D), zbuf(D);
      for (int64_t i = begin; i < end; ++i) {
        int ep, ez;
        const float* pr = in_range_row(row_f32(p_data + i * D, D, pbuf.data()), D, pbuf.data(), &ep);
        const float* zr = in_range_row(row_f32(z_data + i * D, D, zbuf.data()), D, zbuf.data(), &ez);
        const float np = std::sqrt(dot(pr, pr, D)), nz = std::sqrt(dot(zr, zr, D));
        const float rp = 1.f / std::max(np, kNormEps), rz = 1.f / std::max(nz, kNormEps);
        // a scaled row (max |x| > 2^50) is never clamped; its u (and so omc) is the unscaled row's
        const bool unclamped = (ep != 0 || np > kNormEps) && (ez != 0 || nz > kNormEps);
        const float omc = unclamped ? 0.5f * scaled_dist2(pr, rp, zr, rz, D)
                                    : 1.f - dot(pr, zr, D) / (std::max(np, kNormEps) * std::max(nz, kNormEps));
        stat[3 * i] = std::ldexp(np, ep);  // the true norms (inf only beyond FLT_MAX)
        stat[3 * i + 1] = std::ldexp(nz, ez);
        stat[3 * i + 2] = omc;
        loss_data[i] = 2.f * omc;
      }
    });
  }));
  return {loss, stats};
}

// (dp, dz) in the inputs' dtype; dz is (0, D) unless need_dz.
std::tuple<at::Tensor, at::Tensor> byol_bwd(const at::Tensor& grad, const at::Tensor& p_in, const at::Tensor& z_in,
                                            const at::Tensor& stats, bool need_dz) {
  const at::Tensor p = p_in.contiguous(), z = z_in.contiguous();
  const int64_t N = p.size(0), D = p.size(1);
  const at::Tensor g = grad.contiguous(), st = stats.contiguous();
  at::Tensor dp = at::empty_like(p);
  at::Tensor dz = need_dz ? at::empty_like(z) : at::empty({0, D}, z.options());
  const float* g_data = g.data_ptr<float>();
  const float* stat = st.data_ptr<float>();
  AT_DISPATCH_SWITCH(p.scalar_type(), "byol_bwd", AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
    const scalar_t* p_data = p.data_ptr<scalar_t>();
    const scalar_t* z_data = z.data_ptr<scalar_t>();
    scalar_t* dp_data = dp.data_ptr<scalar_t>();
    scalar_t* dz_data = need_dz ? dz.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> pbuf(D), zbuf(D), out(D);
      for (int64_t i = begin; i < end; ++i) {
        int ep, ez;
        const float* pr = in_range_row(row_f32(p_data + i * D, D, pbuf.data()), D, pbuf.data(), &ep);
        const float* zr = in_range_row(row_f32(z_data + i * D, D, zbuf.data()), D, zbuf.data(), &ez);
        // norms of the rows as scaled (a scaled row's norm recomputed, as the forward had it)
        const float np = ep == 0 ? stat[3 * i] : std::sqrt(dot(pr, pr, D));
        const float nz = ez == 0 ? stat[3 * i + 1] : std::sqrt(dot(zr, zr, D));
        const float omc = stat[3 * i + 2];
        const float rp = 1.f / std::max(np, kNormEps), rz = 1.f / std::max(nz, kNormEps);
        // dp = -2 g r_p ((v - u) + omc_p u), omc_p = 1 where ||p|| <= eps; dz likewise
        row_grad(pr, zr, rp, rz, -2.f * g_data[i] * rp, (ep != 0 || np > kNormEps) ? omc : 1.f, ep, out.data(), D);
        store_row(out.data(), dp_data + i * D, D);
        if (need_dz) {
          row_grad(zr, pr, rz, rp, -2.f * g_data[i] * rz, (ez != 0 || nz > kNormEps) ? omc : 1.f, ez, out.data(), D);
          store_row(out.data(), dz_data + i * D, D);
        }
      }
    });
  }));
  return {dp, dz};
}

}  // namespace
}  // namespace cl_fast::cpu

// ---- registration: the cl_fast_C BYOL ops on CPU tensors (schemas and checks: csrc/ops.cpp) ----
namespace cl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> byol_fwd_cpu(const at::Tensor& p, const at::Tensor& z) {
  check_byol_fwd(p, z);
  return cpu::byol_fwd(p, z);
}

std::tuple<at::Tensor, at::Tensor> byol_bwd_cpu(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z,
                                                const at::Tensor& stats, bool need_dz) {
  check_byol_bwd(grad, p, z, stats, need_dz);
  return cpu::byol_bwd(grad, p, z, stats, need_dz);
}

}  // namespace
}  // namespace cl_fast

TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("byol_fwd", &cl_fast::byol_fwd_cpu);
  m.impl("byol_bwd", &cl_fast::byol_bwd_cpu);
}
