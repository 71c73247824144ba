// The one binding file: defines the cl_fast_C ops (torch.ops.cl_fast_C.*), checks every input up
// front, and registers the CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda, when built with
// CUDA) and Meta kernels (shapes only, so torch.compile / FakeTensor trace the ops).
//
// Interface (DESIGN.md): scale is 1/temperature or clip's logit_scale, a Python float > 0;
// losses / lse / grad inputs are fp32; gradients come back in the input dtype; dscale is 0-d fp32.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/infonce_cpu.h"

#ifdef CL_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "cuda/normalize.h"
#endif

// `import cl_fast._C` loads this library, which runs the TORCH_LIBRARY registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace cl_fast {
namespace {

// ---- input checks (ValueError for shapes / values / devices, TypeError for dtypes) ----------

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A (N, D) feature matrix: 2-D, float32 / float16 / bfloat16, at least min_rows rows, D >= 1.
void check_features(const at::Tensor& x, const char* name, int64_t min_rows) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D (N, D) tensor, got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) >= min_rows, name, " must have at least ", min_rows, " row(s) (N >= ", min_rows,
                    "), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, name, " must have at least one feature column (D >= 1), got shape ", x.sizes());
}

// The second feature matrix of a pair: same shape, dtype and device as the first.
void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the same (N, D) shape as ", a_name, ": expected ",
                    a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), b_name, " must have the same dtype as ", a_name,
                   ": expected ", a.scalar_type(), ", got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, " must be on the same device as ", a_name, ": expected ",
                    a.device(), ", got ", b.device());
}

void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0,
                    "scale (1/temperature or logit_scale) must be finite and > 0, got ", scale);
}

// A per-row fp32 vector of length n on like's device (upstream grads, stored lse).
void check_row_vector(const at::Tensor& v, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == n, name, " must be a 1-D tensor of shape (", n, ",), got shape ",
                    v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat, name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == like.device(), name, " must be on ", like.device(), ", got ", v.device());
}

// A column-direction vector: (N,) when both, else ignored and (0,) expected (the forward's output).
void check_col_vector(const at::Tensor& v, const char* name, int64_t n, const at::Tensor& like, bool both) {
  if (both) {
    check_row_vector(v, name, n, like);
  } else {
    TORCH_CHECK_VALUE(v.dim() == 1 && (v.size(0) == 0 || v.size(0) == n), name,
                      " must be a 1-D tensor of shape (0,) (or (", n, ",), ignored) when both=False, got shape ",
                      v.sizes());
  }
}

void check_ntxent(const at::Tensor& z1, const at::Tensor& z2, double scale) {
  check_features(z1, "z1", 1);
  check_same(z1, "z1", z2, "z2");
  check_scale(scale);
}

void check_cross(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_features(q, "q (query / image features)", 1);
  check_same(q, "q (query / image features)", k, "k (key / text features)");
  check_scale(scale);
}

void check_device_type(const at::Tensor& x, const char* name, c10::DeviceType type) {
  TORCH_CHECK_VALUE(x.device().type() == type, name, " must be a ", c10::DeviceTypeName(type), " tensor, got ",
                    x.device());
}

// ---- CPU ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ntxent_fwd_cpu(const at::Tensor& z1, const at::Tensor& z2, double scale) {
  check_ntxent(z1, z2, scale);
  check_device_type(z1, "z1", c10::DeviceType::CPU);
  return cpu::ntxent_fwd(z1, z2, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd_cpu(const at::Tensor& grad, const at::Tensor& z1,
                                                              const at::Tensor& z2, double scale,
                                                              const at::Tensor& lse) {
  check_ntxent(z1, z2, scale);
  check_device_type(z1, "z1", c10::DeviceType::CPU);
  check_row_vector(grad, "grad (upstream gradient of the 2N per-row losses)", 2 * z1.size(0), z1);
  check_row_vector(lse, "lse (from ntxent_fwd)", 2 * z1.size(0), z1);
  return cpu::ntxent_bwd(grad, z1, z2, scale, lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                         double scale, bool both, bool normalize) {
  check_cross(q, k, scale);
  check_device_type(q, "q", c10::DeviceType::CPU);
  return cpu::cross_fwd(q, k, scale, both, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd_cpu(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                             const at::Tensor& q, const at::Tensor& k, double scale,
                                                             const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                             bool both, bool normalize) {
  check_cross(q, k, scale);
  check_device_type(q, "q", c10::DeviceType::CPU);
  const int64_t n = q.size(0);
  check_row_vector(grad_row, "grad_row (upstream gradient of the N row losses)", n, q);
  check_row_vector(row_lse, "row_lse (from cross_fwd)", n, q);
  check_col_vector(grad_col, "grad_col (upstream gradient of the N column losses)", n, q, both);
  check_col_vector(col_lse, "col_lse (from cross_fwd)", n, q, both);
  return cpu::cross_bwd(grad_row, grad_col, q, k, scale, row_lse, col_lse, both, normalize);
}

void check_normalize_input(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be a 2-D (N, D) tensor, got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
}

at::Tensor l2_normalize_cpu(const at::Tensor& x) {
  check_normalize_input(x);
  return cpu::l2_normalize(x);
}

// ---- CUDA -----------------------------------------------------------------------------------

#ifdef CL_FAST_WITH_CUDA
at::Tensor l2_normalize_cuda(const at::Tensor& x) {
  check_normalize_input(x);
  check_device_type(x, "x", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int dtype = input.scalar_type() == at::kFloat  ? CL_FAST_FLOAT32
                    : input.scalar_type() == at::kHalf ? CL_FAST_FLOAT16
                                                       : CL_FAST_BFLOAT16;
  const int status = cl_fast_l2_normalize_cuda(input.data_ptr(), out.data_ptr(), input.size(0), input.size(1), dtype,
                                               c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "cl_fast l2_normalize CUDA kernel failed to launch: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return out;
}
#endif

// ---- Meta (output shapes and dtypes only) ---------------------------------------------------
// Shapes may be symbolic here (torch.compile), so only ranks and dtypes are checked; the real
// kernels check the sizes.

void check_meta_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D (N, D) tensor, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
}

void check_meta_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  check_meta_features(a, a_name);
  check_meta_features(b, b_name);
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), b_name, " must have the same dtype as ", a_name,
                   ": expected ", a.scalar_type(), ", got ", b.scalar_type());
}

at::TensorOptions fp32_like(const at::Tensor& x) { return x.options().dtype(at::kFloat); }

std::tuple<at::Tensor, at::Tensor> ntxent_fwd_meta(const at::Tensor& z1, const at::Tensor& z2, double scale) {
  check_meta_pair(z1, "z1", z2, "z2");
  check_scale(scale);
  const c10::SymInt rows = z1.sym_size(0) * 2;
  return {at::empty_symint({rows}, fp32_like(z1)), at::empty_symint({rows}, fp32_like(z1))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd_meta(const at::Tensor& grad, const at::Tensor& z1,
                                                               const at::Tensor& z2, double scale,
                                                               const at::Tensor& lse) {
  check_meta_pair(z1, "z1", z2, "z2");
  check_scale(scale);
  return {at::empty_like(z1, at::MemoryFormat::Contiguous), at::empty_like(z2, at::MemoryFormat::Contiguous),
          at::empty({}, fp32_like(z1))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd_meta(const at::Tensor& q, const at::Tensor& k,
                                                                          double scale, bool both, bool normalize) {
  check_meta_pair(q, "q", k, "k");
  check_scale(scale);
  const c10::SymInt n = q.sym_size(0);
  const c10::SymInt cols = both ? n : c10::SymInt(0);
  return {at::empty_symint({n}, fp32_like(q)), at::empty_symint({cols}, fp32_like(q)),
          at::empty_symint({n}, fp32_like(q)), at::empty_symint({cols}, fp32_like(q))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd_meta(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                              const at::Tensor& q, const at::Tensor& k, double scale,
                                                              const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                              bool both, bool normalize) {
  check_meta_pair(q, "q", k, "k");
  check_scale(scale);
  return {at::empty_like(q, at::MemoryFormat::Contiguous), at::empty_like(k, at::MemoryFormat::Contiguous),
          at::empty({}, fp32_like(q))};
}

at::Tensor l2_normalize_meta(const at::Tensor& x) {
  check_meta_features(x, "x");
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace cl_fast

TORCH_LIBRARY(cl_fast_C, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("ntxent_fwd(Tensor z1, Tensor z2, float scale) -> (Tensor loss, Tensor lse)", tags);
  m.def("ntxent_bwd(Tensor grad, Tensor z1, Tensor z2, float scale, Tensor lse) "
        "-> (Tensor dz1, Tensor dz2, Tensor dscale)",
        tags);
  m.def("cross_fwd(Tensor q, Tensor k, float scale, bool both, bool normalize=True) "
        "-> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)",
        tags);
  m.def("cross_bwd(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, float scale, Tensor row_lse, "
        "Tensor col_lse, bool both, bool normalize=True) -> (Tensor dq, Tensor dk, Tensor dscale)",
        tags);
  m.def("l2_normalize(Tensor x) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("ntxent_fwd", &cl_fast::ntxent_fwd_cpu);
  m.impl("ntxent_bwd", &cl_fast::ntxent_bwd_cpu);
  m.impl("cross_fwd", &cl_fast::cross_fwd_cpu);
  m.impl("cross_bwd", &cl_fast::cross_bwd_cpu);
  m.impl("l2_normalize", &cl_fast::l2_normalize_cpu);
}

TORCH_LIBRARY_IMPL(cl_fast_C, Meta, m) {
  m.impl("ntxent_fwd", &cl_fast::ntxent_fwd_meta);
  m.impl("ntxent_bwd", &cl_fast::ntxent_bwd_meta);
  m.impl("cross_fwd", &cl_fast::cross_fwd_meta);
  m.impl("cross_bwd", &cl_fast::cross_bwd_meta);
  m.impl("l2_normalize", &cl_fast::l2_normalize_meta);
}

#ifdef CL_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(cl_fast_C, CUDA, m) { m.impl("l2_normalize", &cl_fast::l2_normalize_cuda); }
#endif
