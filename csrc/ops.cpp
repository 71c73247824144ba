// The cl_fast_C op layer: every op's schema (the one TORCH_LIBRARY block of the tree), its input
// check (declared in ops.h, called first by every device implementation) and its Meta kernel
// (output shapes and dtypes only, so torch.compile / FakeTensor trace the ops). The device
// kernels register per dispatch key, one file per family: csrc/cpu/<family>.cpp (CPU) and
// csrc/cuda/<family>.cu (CUDA, where built). A new device or family is one file plus its
// TORCH_LIBRARY_IMPL block.
//
// Interface (DESIGN.md, "backend interface"): scale is a 0-d fp32 tensor on the inputs' device
// (1/temperature, or clip's logit_scale), read by the kernels on their device: no host sync.
// Losses / lse / upstream gradients are fp32; gradients come back in the input dtype; dscale is
// 0-d fp32.
#include <Python.h>

#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

// `import cl_fast._C` loads this library, which runs every TORCH_LIBRARY registration of it.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace cl_fast {
namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A 2-D float32 / float16 / bfloat16 matrix of at least min_rows rows and one column.
void check_features(const at::Tensor& x, const char* name, int64_t min_rows) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D (N, D) tensor, got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.size(0) >= min_rows, name, " must have at least ", min_rows, " row(s) (N >= ", min_rows,
                    "), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, name, " must have at least one feature column (D >= 1), got shape ", x.sizes());
}

void check_same_device(const at::Tensor& x, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(x.device() == like.device(), name, " must be on the same device as ", like_name, ": expected ",
                    like.device(), ", got ", x.device());
}

// The second feature matrix of a pair: same shape, dtype and device as the first.
void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the same (N, D) shape as ", a_name, ": expected ",
                    a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), b_name, " must have the same dtype as ", a_name,
                   ": expected ", a.scalar_type(), ", got ", b.scalar_type());
  check_same_device(b, b_name, a, a_name);
}

// A 0-d fp32 tensor on like's device. Its value is checked only on the CPU (no device sync):
// finite, and > 0 where `positive`.
void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& like, bool positive) {
  TORCH_CHECK_VALUE(t.dim() == 0, name, " must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the inputs' device ", like.device(), ", got ",
                    t.device());
  if (t.device().is_cpu()) {
    const float value = t.item<float>();
    TORCH_CHECK_VALUE(std::isfinite(value) && (!positive || value > 0.f), name, " must be finite",
                      positive ? " and > 0" : "", ", got ", value);
  }
}

void check_scale(const at::Tensor& scale, const at::Tensor& like) {
  check_scalar(scale, "scale (1/temperature or logit_scale)", like, /*positive=*/true);
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

constexpr const char* kQuery = "q (query / image features)";
constexpr const char* kKey = "k (key / text features)";

void check_scores(const at::Tensor& scores, double inv_eps) {
  check_features(scores, "scores", 1);
  TORCH_CHECK_VALUE(std::isfinite(inv_eps) && inv_eps > 0.0, "inv_eps (1/epsilon) must be finite and > 0, got ",
                    inv_eps);
}

void check_prototype_scaling(const at::Tensor& f, const at::Tensor& scores) {
  check_row_vector(f, "f (the per-prototype log scaling)", scores.size(1), scores);
}

}  // namespace

float cpu_scalar(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 0 && t.scalar_type() == at::kFloat,
              "cl_fast::cpu_scalar takes a 0-d float32 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  return t.item<float>();
}

// ---- the checks (ops.h) ---------------------------------------------------------------------

void check_ntxent_fwd(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& scale) {
  check_features(z1, "z1", 1);
  check_same(z1, "z1", z2, "z2");
  check_scale(scale, z1);
}

void check_ntxent_bwd(const at::Tensor& grad, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& scale,
                      const at::Tensor& lse) {
  check_ntxent_fwd(z1, z2, scale);
  check_row_vector(grad, "grad (upstream gradient of the 2N per-row losses)", 2 * z1.size(0), z1);
  check_row_vector(lse, "lse (from ntxent_fwd)", 2 * z1.size(0), z1);
}

void check_cross_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, bool /*both*/,
                     bool /*normalize*/) {
  check_features(q, kQuery, 1);
  check_same(q, kQuery, k, kKey);
  check_scale(scale, q);
}

void check_cross_bwd(const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse, bool both,
                     bool normalize) {
  check_cross_fwd(q, k, scale, both, normalize);
  const int64_t n = q.size(0);
  check_row_vector(grad_row, "grad_row (upstream gradient of the N row losses)", n, q);
  check_row_vector(row_lse, "row_lse (from cross_fwd)", n, q);
  check_col_vector(grad_col, "grad_col (upstream gradient of the N column losses)", n, q, both);
  check_col_vector(col_lse, "col_lse (from cross_fwd)", n, q, both);
}

void check_infonce_block_fwd(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& scale, int64_t /*diag*/,
                             bool pairs) {
  check_features(rows, "rows", 0);
  check_features(cols, "cols", 0);
  TORCH_CHECK_VALUE(cols.size(1) == rows.size(1), "cols must have D=", rows.size(1), " columns (rows'), got shape ",
                    cols.sizes());
  TORCH_CHECK_TYPE(cols.scalar_type() == rows.scalar_type(), "cols must have the same dtype as rows: expected ",
                   rows.scalar_type(), ", got ", cols.scalar_type());
  check_same_device(cols, "cols", rows, "rows");
  TORCH_CHECK_VALUE(!pairs || rows.size(0) % 2 == 0,
                    "rows must have an even number of rows when pairs=True (the two views), got shape ", rows.sizes());
  check_scale(scale, rows);
}

void check_infonce_block_bwd(const at::Tensor& grad, const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& scale, const at::Tensor& lse, int64_t diag, bool pairs) {
  check_infonce_block_fwd(rows, cols, scale, diag, pairs);
  check_row_vector(grad, "grad (upstream gradient of the rows' log-sum-exp)", rows.size(0), rows);
  check_row_vector(lse, "lse (the rows' log-sum-exp over every column slice)", rows.size(0), rows);
}

void check_moco_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, const at::Tensor& scale,
                    bool /*need_grad*/, int64_t splits) {
  check_features(q, "q", 1);
  check_same(q, "q", k, "k");
  check_features(queue, "queue", 1);
  TORCH_CHECK_VALUE(queue.size(1) == q.size(1), "queue must hold keys of D=", q.size(1), " (q's), got shape ",
                    queue.sizes());
  check_same_device(queue, "queue", q, "q");
  check_scale(scale, q);
  TORCH_CHECK_VALUE(splits >= 0, "splits must be >= 0 (0: chosen by the kernel), got ", splits);
}

void check_moco_queue_update_(const at::Tensor& queue, const at::Tensor& keys, const at::Tensor& ptr) {
  check_features(queue, "queue", 1);
  TORCH_CHECK_VALUE(queue.is_contiguous(), "queue must be contiguous (rows are written in place)");
  check_features(keys, "keys", 0);
  TORCH_CHECK_VALUE(keys.size(1) == queue.size(1), "keys must have D=", queue.size(1),
                    " columns (the queue's), got shape ", keys.sizes());
  check_same_device(keys, "keys", queue, "queue");
  TORCH_CHECK_VALUE(keys.size(0) <= queue.size(0), "keys has B=", keys.size(0), " rows but the queue holds only K=",
                    queue.size(0), "; need B <= K");
  TORCH_CHECK_VALUE(ptr.dim() == 0, "ptr must be a 0-d tensor, got shape ", ptr.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(ptr.scalar_type(), /*includeBool=*/false), "ptr must be an integer tensor, got ",
                   ptr.scalar_type());
  check_same_device(ptr, "ptr", queue, "queue");
}

void check_byol_fwd(const at::Tensor& p, const at::Tensor& z) {
  check_features(p, "p", 1);
  check_same(p, "p", z, "z");
}

void check_byol_bwd(const at::Tensor& grad, const at::Tensor& p, const at::Tensor& z, const at::Tensor& stats,
                    bool /*need_dz*/) {
  check_byol_fwd(p, z);
  check_row_vector(grad, "grad (upstream gradient of the N per-row losses)", p.size(0), p);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == p.size(0) && stats.size(1) == 3,
                    "stats (from byol_fwd) must have shape (", p.size(0), ", 3), got ", stats.sizes());
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, "stats (from byol_fwd) must be float32, got ",
                   stats.scalar_type());
  check_same_device(stats, "stats", p, "p");
}

void check_sinkhorn(const at::Tensor& scores, double inv_eps, int64_t iterations) {
  check_scores(scores, inv_eps);
  TORCH_CHECK_VALUE(iterations >= 1, "iterations must be >= 1 for the fused kernel, got ", iterations);
}

void check_sinkhorn_col_lse(const at::Tensor& scores, double inv_eps, const std::optional<at::Tensor>& f) {
  check_scores(scores, inv_eps);
  if (f.has_value()) check_prototype_scaling(*f, scores);
}

void check_sinkhorn_assign(const at::Tensor& scores, double inv_eps, const at::Tensor& f) {
  check_scores(scores, inv_eps);
  check_prototype_scaling(f, scores);
}

void check_siglip_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias) {
  check_features(x, "x (image features)", 1);
  check_same(x, "x (image features)", y, "y (text features)");
  check_scale(scale, x);
  check_scalar(bias, "bias (logit_bias)", x, /*positive=*/false);
}

void check_siglip_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                      const at::Tensor& bias) {
  check_siglip_fwd(x, y, scale, bias);
  check_row_vector(grad, "grad (upstream gradient of the N row losses)", x.size(0), x);
}

// ---- Meta kernels (output shapes and dtypes only) -------------------------------------------
// Shapes may be symbolic here (torch.compile), so only ranks and dtypes are checked; the device
// implementations run the full checks. Values are never read (a Meta tensor has none).
namespace {

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

void check_meta_scalar(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 0, name, " must be a 0-d tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the inputs' device ", like.device(), ", got ",
                    t.device());
}

at::TensorOptions fp32_like(const at::Tensor& x) { return x.options().dtype(at::kFloat); }
at::Tensor fp32_vector(const c10::SymInt& n, const at::Tensor& like) { return at::empty_symint({n}, fp32_like(like)); }
at::Tensor fp32_scalar(const at::Tensor& like) { return at::empty({}, fp32_like(like)); }
at::Tensor contiguous_like(const at::Tensor& x) { return at::empty_like(x, at::MemoryFormat::Contiguous); }

std::tuple<at::Tensor, at::Tensor> ntxent_fwd_meta(const at::Tensor& z1, const at::Tensor& z2,
                                                   const at::Tensor& scale) {
  check_meta_pair(z1, "z1", z2, "z2");
  check_meta_scalar(scale, "scale", z1);
  const c10::SymInt rows = z1.sym_size(0) * 2;
  return {fp32_vector(rows, z1), fp32_vector(rows, z1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd_meta(const at::Tensor& /*grad*/, const at::Tensor& z1,
                                                               const at::Tensor& z2, const at::Tensor& scale,
                                                               const at::Tensor& /*lse*/) {
  check_meta_pair(z1, "z1", z2, "z2");
  check_meta_scalar(scale, "scale", z1);
  return {contiguous_like(z1), contiguous_like(z2), fp32_scalar(z1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd_meta(const at::Tensor& q, const at::Tensor& k,
                                                                          const at::Tensor& scale, bool both,
                                                                          bool /*normalize*/) {
  check_meta_pair(q, "q", k, "k");
  check_meta_scalar(scale, "scale", q);
  const c10::SymInt n = q.sym_size(0);
  const c10::SymInt cols = both ? n : c10::SymInt(0);
  return {fp32_vector(n, q), fp32_vector(cols, q), fp32_vector(n, q), fp32_vector(cols, q)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd_meta(const at::Tensor& /*grad_row*/,
                                                              const at::Tensor& /*grad_col*/, const at::Tensor& q,
                                                              const at::Tensor& k, const at::Tensor& scale,
                                                              const at::Tensor& /*row_lse*/,
                                                              const at::Tensor& /*col_lse*/, bool /*both*/,
                                                              bool /*normalize*/) {
  check_meta_pair(q, "q", k, "k");
  check_meta_scalar(scale, "scale", q);
  return {contiguous_like(q), contiguous_like(k), fp32_scalar(q)};
}

at::Tensor infonce_block_fwd_meta(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& scale,
                                  int64_t /*diag*/, bool /*pairs*/) {
  check_meta_pair(rows, "rows", cols, "cols");
  check_meta_scalar(scale, "scale", rows);
  return fp32_vector(rows.sym_size(0), rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_block_bwd_meta(const at::Tensor& /*grad*/,
                                                                      const at::Tensor& rows, const at::Tensor& cols,
                                                                      const at::Tensor& scale,
                                                                      const at::Tensor& /*lse*/, int64_t /*diag*/,
                                                                      bool /*pairs*/) {
  check_meta_pair(rows, "rows", cols, "cols");
  check_meta_scalar(scale, "scale", rows);
  return {at::empty_symint(rows.sym_sizes(), fp32_like(rows)), at::empty_symint(cols.sym_sizes(), fp32_like(cols)),
          fp32_scalar(rows)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moco_fwd_meta(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& queue, const at::Tensor& scale,
                                                             bool need_grad, int64_t /*splits*/) {
  check_meta_pair(q, "q", k, "k");
  check_meta_features(queue, "queue");
  check_meta_scalar(scale, "scale", q);
  const c10::SymInt n = q.sym_size(0);
  const c10::SymInt rows = need_grad ? n : c10::SymInt(0);
  return {fp32_vector(n, q), at::empty_symint({rows, q.sym_size(1)}, fp32_like(q)), fp32_vector(rows, q)};
}

void moco_queue_update_meta(at::Tensor& queue, const at::Tensor& keys, at::Tensor& /*ptr*/) {
  check_meta_features(queue, "queue");
  check_meta_features(keys, "keys");
}

std::tuple<at::Tensor, at::Tensor> byol_fwd_meta(const at::Tensor& p, const at::Tensor& z) {
  check_meta_pair(p, "p", z, "z");
  return {fp32_vector(p.sym_size(0), p), at::empty_symint({p.sym_size(0), 3}, fp32_like(p))};
}

std::tuple<at::Tensor, at::Tensor> byol_bwd_meta(const at::Tensor& /*grad*/, const at::Tensor& p, const at::Tensor& z,
                                                 const at::Tensor& /*stats*/, bool need_dz) {
  check_meta_pair(p, "p", z, "z");
  const c10::SymInt rows = need_dz ? z.sym_size(0) : c10::SymInt(0);
  return {contiguous_like(p), at::empty_symint({rows, z.sym_size(1)}, z.options())};
}

at::Tensor sinkhorn_meta(const at::Tensor& scores, double /*inv_eps*/, int64_t /*iterations*/) {
  check_meta_features(scores, "scores");
  return at::empty_symint(scores.sym_sizes(), fp32_like(scores));
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_col_lse_meta(const at::Tensor& scores, double /*inv_eps*/,
                                                         const std::optional<at::Tensor>& /*f*/) {
  check_meta_features(scores, "scores");
  return {fp32_vector(scores.sym_size(1), scores), fp32_vector(scores.sym_size(1), scores)};
}

at::Tensor sinkhorn_assign_meta(const at::Tensor& scores, double /*inv_eps*/, const at::Tensor& /*f*/) {
  check_meta_features(scores, "scores");
  return at::empty_symint(scores.sym_sizes(), fp32_like(scores));
}

at::Tensor siglip_fwd_meta(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias) {
  check_meta_pair(x, "x", y, "y");
  check_meta_scalar(scale, "scale", x);
  check_meta_scalar(bias, "bias", x);
  return fp32_vector(x.sym_size(0), x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd_meta(const at::Tensor& /*grad*/,
                                                                           const at::Tensor& x, const at::Tensor& y,
                                                                           const at::Tensor& scale,
                                                                           const at::Tensor& bias) {
  check_meta_pair(x, "x", y, "y");
  check_meta_scalar(scale, "scale", x);
  check_meta_scalar(bias, "bias", x);
  return {contiguous_like(x), contiguous_like(y), fp32_scalar(x), fp32_scalar(x)};
}

}  // namespace
}  // namespace cl_fast

// Every schema of the extension. Shapes: N rows, D features; loss / lse vectors fp32.
TORCH_LIBRARY(cl_fast_C, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // InfoNCE family: nt_xent over the 2N rows of cat(z1, z2); info_nce / clip over q x k.
  m.def("ntxent_fwd(Tensor z1, Tensor z2, Tensor scale) -> (Tensor loss, Tensor lse)", tags);
  m.def("ntxent_bwd(Tensor grad, Tensor z1, Tensor z2, Tensor scale, Tensor lse) "
        "-> (Tensor dz1, Tensor dz2, Tensor dscale)",
        tags);
  m.def("cross_fwd(Tensor q, Tensor k, Tensor scale, bool both, bool normalize) "
        "-> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)",
        tags);
  m.def("cross_bwd(Tensor grad_row, Tensor grad_col, Tensor q, Tensor k, Tensor scale, Tensor row_lse, "
        "Tensor col_lse, bool both, bool normalize) -> (Tensor dq, Tensor dk, Tensor dscale)",
        tags);
  // InfoNCE block pieces (the distributed losses; cl_fast/_ops/infonce.py): rows (M, D) against a
  // column slice (C, D), S = scale rows cols^T, row i's self / positive columns excluded (diag, pairs).
  m.def("infonce_block_fwd(Tensor rows, Tensor cols, Tensor scale, int diag, bool pairs) -> Tensor lse", tags);
  m.def("infonce_block_bwd(Tensor grad, Tensor rows, Tensor cols, Tensor scale, Tensor lse, int diag, bool pairs) "
        "-> (Tensor drows, Tensor dcols, Tensor dscale)",
        tags);
  // MoCo: loss against a (K, D) queue (e, c: the gradient direction, see cl_fast/_ops/moco.py);
  // the ring-buffer enqueue advances the 0-d integer ptr in place.
  m.def("moco_fwd(Tensor q, Tensor k, Tensor queue, Tensor scale, bool need_grad, int splits=0) "
        "-> (Tensor loss, Tensor e, Tensor c)",
        tags);
  m.def("moco_queue_update_(Tensor(a!) queue, Tensor keys, Tensor(b!) ptr) -> ()", tags);
  // BYOL: stats (N, 3) = [||p_i||, ||z_i||, omc_i = 1 - cos_i (computed without cancellation)] kept
  // for the backward; loss_i = 2 omc_i.
  m.def("byol_fwd(Tensor p, Tensor z) -> (Tensor loss, Tensor stats)", tags);
  m.def("byol_bwd(Tensor grad, Tensor p, Tensor z, Tensor stats, bool need_dz) -> (Tensor dp, Tensor dz)", tags);
  // SwAV Sinkhorn: inv_eps = 1 / epsilon; f is the per-prototype log scaling (K fp32).
  m.def("sinkhorn(Tensor scores, float inv_eps, int iterations) -> Tensor", tags);
  m.def("sinkhorn_col_lse(Tensor scores, float inv_eps, Tensor? f) -> (Tensor, Tensor)", tags);
  m.def("sinkhorn_assign(Tensor scores, float inv_eps, Tensor f) -> Tensor", tags);
  // SigLIP: row_loss_i = sum_j softplus(-z_ij (s x_i.y_j + b)), z_ij = +1 on the diagonal, else -1.
  m.def("siglip_fwd(Tensor x, Tensor y, Tensor scale, Tensor bias) -> Tensor row_loss", tags);
  m.def("siglip_bwd(Tensor grad, Tensor x, Tensor y, Tensor scale, Tensor bias) "
        "-> (Tensor dx, Tensor dy, Tensor dscale, Tensor dbias)",
        tags);
}

TORCH_LIBRARY_IMPL(cl_fast_C, Meta, m) {
  m.impl("ntxent_fwd", &cl_fast::ntxent_fwd_meta);
  m.impl("ntxent_bwd", &cl_fast::ntxent_bwd_meta);
  m.impl("cross_fwd", &cl_fast::cross_fwd_meta);
  m.impl("cross_bwd", &cl_fast::cross_bwd_meta);
  m.impl("infonce_block_fwd", &cl_fast::infonce_block_fwd_meta);
  m.impl("infonce_block_bwd", &cl_fast::infonce_block_bwd_meta);
  m.impl("moco_fwd", &cl_fast::moco_fwd_meta);
  m.impl("moco_queue_update_", &cl_fast::moco_queue_update_meta);
  m.impl("byol_fwd", &cl_fast::byol_fwd_meta);
  m.impl("byol_bwd", &cl_fast::byol_bwd_meta);
  m.impl("sinkhorn", &cl_fast::sinkhorn_meta);
  m.impl("sinkhorn_col_lse", &cl_fast::sinkhorn_col_lse_meta);
  m.impl("sinkhorn_assign", &cl_fast::sinkhorn_assign_meta);
  m.impl("siglip_fwd", &cl_fast::siglip_fwd_meta);
  m.impl("siglip_bwd", &cl_fast::siglip_bwd_meta);
}
