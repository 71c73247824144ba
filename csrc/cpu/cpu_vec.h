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

#include <cstdint>

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
