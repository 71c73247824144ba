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

// exp with ~20 ulp (ATen's exp_u20: rel. error ~2e-6, far below the 1e-4 target). Arguments here
// are logits minus a shift, so <= 0; below ln(FLT_MIN) the result is 0. NaN stays NaN, so a NaN
// input row poisons exactly the sums it enters, like the reference.
inline Vec exp_fast(const Vec& x) {
  return Vec::blendv(x.exp_u20(), x, x.isnan());
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
