// Row-wise L2 normalisation on CPU: y_i = x_i / max(||x_i||_2, 1e-12), fp32 compute, x's dtype out.
// (The CUDA twin is csrc/cuda/normalize.cu.)
#include "cpu_vec.h"

#include "infonce_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace cl_fast::cpu {

at::Tensor l2_normalize(const at::Tensor& x_in) {
  const int64_t n = x_in.size(0), d = x_in.size(1);
  const at::Tensor x = x_in.scalar_type() == at::kFloat ? x_in.contiguous() : x_in.contiguous().to(at::kFloat);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * d;
      float* yi = yp + i * d;
      const float norm = std::sqrt(dot(xi, xi, d));
      const Vec inv(1.f / (norm > 1e-12f || std::isnan(norm) ? norm : 1e-12f));
      for (int64_t j = 0; j < d; j += kVec) {
        const int64_t count = std::min(kVec, d - j);
        (Vec::loadu(xi + j, count) * inv).store(yi + j, count);
      }
    }
  });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace cl_fast::cpu
