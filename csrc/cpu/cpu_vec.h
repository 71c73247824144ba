#pragma once
// at::vec for this extension's CPU kernels. Include it FIRST in every csrc/cpu/*.cpp that
// vectorises: ATen compiles its own kernels once per CPU_CAPABILITY with that macro set, but an
// extension gets the scalar fallback of Vectorized<float> unless it sets the capability itself.
// setup.py builds with -mavx2 -mfma (or -march=native with CL_FAST_NATIVE=1); the macro follows
// the compiler's target. The inline namespace at::vec::CPU_CAPABILITY keeps these inline
// functions apart from libtorch's own copies.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace cl_fast::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

inline float hsum(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < kVec; ++i) total += lanes[i];
  return total;
}

// exp(x) for the logits minus a shift (x <= ~0), vectorised: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, Cephes' expf polynomial for e^r (~1 ulp), times 2^n from the
// exponent bits. ATen's exp_u20 is as fast but 20 ulp: its ~2e-6 relative error of every term
// showed as an absolute error of ~2e-6 in lse, i.e. >1e-4 relative on a nearly-solved loss
// (loss = lse - S_pos ~ 1e-3); Sleef's u10 exp is slower. Below ln(FLT_MIN) the result is 0
// (no denormals); NaN stays NaN, so a NaN row poisons exactly the sums it enters, like the
// reference.
inline Vec exp_fast(const Vec& x) {
  const Vec lowest(-87.33654f);  // ln(FLT_MIN)
  const Vec underflow = x < lowest;  // false for NaN
  const Vec xc = Vec::blendv(x, lowest, underflow);
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fnmadd(n, Vec(0.693359375f), xc);  // ln2 = 0.693359375 - 2.12194440e-4
  r = at::vec::fnmadd(n, Vec(-2.12194440e-4f), r);
  Vec p = at::vec::fmadd(Vec(1.9875691500e-4f), r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + Vec(1.f));
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec exponent = (at::vec::convert_to_int_of_same_size(n) + IVec(127)) << IVec(23);
  return Vec::blendv(p * at::vec::cast<float>(exponent), Vec(0.f), underflow);
}

// a * b + c with ONE rounding on every target: at::vec::fmadd is the fused instruction on AVX2 /
// AVX-512, while the DEFAULT (scalar) Vectorized computes a * b + c with two roundings.
inline Vec fma_exact(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  alignas(64) float x[kVec], y[kVec], z[kVec];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t l = 0; l < kVec; ++l) x[l] = std::fma(x[l], y[l], z[l]);
  return Vec::loadu(x);
#endif
}

// Max over the lanes; NaN if any lane is NaN.
inline float hmax(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < kVec; ++l) {
    if (std::isnan(lanes[l])) return lanes[l];
    m = std::max(m, lanes[l]);
  }
  return m;
}

// The first `count` lanes at p (count <= kVec): a full vector, or a ragged tail (zero-filled on load).
inline Vec load(const float* p, int64_t count) { return count == kVec ? Vec::loadu(p) : Vec::loadu(p, count); }

inline void store(const Vec& v, float* p, int64_t count) {
  if (count == kVec) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  if (j < n) {
    const int64_t rest = n - j;
    acc = at::vec::fmadd(Vec::loadu(a + j, rest), Vec::loadu(b + j, rest), acc);
  }
  return hsum(acc);
}

}  // namespace cl_fast::cpu

namespace cl_fast::cpu {

// ---- row norms without overflow --------------------------------------------------------------
//
// A row is "large" when its max |x| exceeds 2^50: then sum x^2 (or a dot of two such rows, up to
// D * 2^100) could leave fp32's range (2^128) for a large D, and sqrt(sum x^2) overflows to inf
// from |x| ~ 2e19 on. Large rows are scaled by 2^-e (e = the exponent of max |x|, so the scaled
// max lies in [1, 2)), as torch.linalg.vector_norm does: a power of two scales exactly, so every
// row not large keeps its bits and ordinary inputs give the results they gave before. Small rows
// are never scaled: a row with ||x|| below 1e-12 is clamped by the normalisation anyway, and its
// squares stay normal floats down to |x| ~ 1e-19 (norm 1e-19 sqrt(D) << 1e-12).
constexpr float kLargeRowMax = 1125899906842624.f;  // 2^50

// max_j |x_j|; NaN if any x_j is NaN.
inline float max_abs(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc = at::vec::maximum(acc, Vec::loadu(x + j).abs());
  if (j < n) acc = at::vec::maximum(acc, Vec::loadu(x + j, n - j).abs());  // zero-filled tail
  alignas(64) float lanes[kVec];
  acc.store(lanes);
  float m = 0.f;
  for (int64_t l = 0; l < kVec; ++l) m = (std::isnan(lanes[l]) || lanes[l] > m) ? lanes[l] : m;
  return m;
}

// The exponent e by which a row with this max |x| is scaled (x 2^-e), 0 for a row that is not
// large (or not finite: inf / NaN rows keep their values and so give inf / NaN results).
inline int row_scale_exponent(float row_max_abs) {
  return (row_max_abs > kLargeRowMax && std::isfinite(row_max_abs)) ? std::ilogb(row_max_abs) : 0;
}

// y = x 2^-e (exact), in place allowed.
inline void scale_row_pow2(const float* x, float* y, int64_t n, int e) {
  const Vec factor(std::ldexp(1.f, -e));
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(x + j) * factor).store(y + j);
  if (j < n) (Vec::loadu(x + j, n - j) * factor).store(y + j, n - j);
}

// ||x||_2 without overflow for any finite x (inf only where the norm itself exceeds FLT_MAX).
inline float row_norm(const float* x, int64_t n) {
  const int e = row_scale_exponent(max_abs(x, n));
  if (e == 0) return std::sqrt(dot(x, x, n));
  const Vec factor(std::ldexp(1.f, -e));
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const Vec v = Vec::loadu(x + j) * factor;
    acc = at::vec::fmadd(v, v, acc);
  }
  if (j < n) {
    const Vec v = Vec::loadu(x + j, n - j) * factor;
    acc = at::vec::fmadd(v, v, acc);
  }
  return std::ldexp(std::sqrt(hsum(acc)), e);
}

}  // namespace cl_fast::cpu
