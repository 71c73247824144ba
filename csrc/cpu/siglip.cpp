// SigLIP's sigmoid loss on the CPU (OpenCLIP SigLipLoss), fused: no N x N tensor.
//
// Features as given, scale s > 0 and bias b from 0-d fp32 tensors (read on the host: CPU tensors).
//   l_ij = s x_i . y_j + b,   z_ij = +1 if i == j else -1,
//   row_loss_i = sum_j softplus(-z_ij l_ij),   softplus(t) = max(t, 0) + log1p(exp(-|t|))
// (the stable form: exp never overflows, log1p keeps the relative precision of tiny terms).
// Backward, upstream g_i per row: d softplus(-z l) / dl = -z sigmoid(-z l), so
//   G_ij = g_i sigmoid(l_ij)        (j != i)
//   G_ii = -g_i sigmoid(-l_ii)
//   dx_i = s sum_j G_ij y_j,  dy_j = s sum_i G_ij x_i,  ds = sum_ij G_ij x_i . y_j,  db = sum_ij G_ij.
// Forward: one row-stationary pass over (kTile x kTile) logits tiles, each the tile product of
// tile_gemm.h on fp32 copies of the rows. Backward: a row pass (dx and the per-block partials of
// ds, db) and a column pass (dy) that recomputes the tiles: every output row block is owned by one
// thread, so no atomics and a result independent of the thread count.
#include "cpu_vec.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "tile_gemm.h"

namespace cl_fast::cpu {
namespace {

constexpr int64_t kTile = 64;

int64_t pack_floats(int64_t dim) { return dim * (kTile + 2 * kVec); }

inline Vec abs_vec(const Vec& v) { return v.abs(); }

// softplus(t) elementwise over n floats (in place), stable for any finite t.
void softplus_inplace(float* t, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const Vec v = Vec::loadu(t + j);
    const Vec e = exp_fast(Vec(0.f) - abs_vec(v));
    (at::vec::maximum(v, Vec(0.f)) + e.log1p()).store(t + j);
  }
  for (; j < n; ++j) t[j] = std::max(t[j], 0.f) + std::log1p(std::exp(-std::fabs(t[j])));
}

// sigmoid(t) elementwise over n floats (in place): e / (1 + e) for t < 0, 1 / (1 + e) else, e = exp(-|t|).
void sigmoid_inplace(float* t, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    const Vec v = Vec::loadu(t + j);
    const Vec e = exp_fast(Vec(0.f) - abs_vec(v));
    const Vec inv = Vec(1.f) / (Vec(1.f) + e);
    Vec::blendv(inv, e * inv, v < Vec(0.f)).store(t + j);
  }
  for (; j < n; ++j) {
    const float e = std::exp(-std::fabs(t[j]));
    t[j] = t[j] < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
  }
}

// tile[r][c] = s * dot(x_{i0+r}, y_{j0+c}) + b, an (m x n) tile with leading dimension kTile;
// `dots` (if not null) keeps the raw dot products.
void logits_tile(const float* x, const float* y, int64_t dim, int64_t i0, int64_t m, int64_t j0, int64_t n,
                 float s, float b, float* tile, float* dots, float* pack) {
  gemm_nt(m, n, dim, x + i0 * dim, dim, y + j0 * dim, dim, dots, kTile, pack);
  for (int64_t r = 0; r < m; ++r) {
    at::vec::map([s, b](Vec d) { return at::vec::fmadd(d, Vec(s), Vec(b)); }, tile + r * kTile, dots + r * kTile, n);
  }
}

// The G tile (see the header) from the logits tile, in place; rows are i0.., columns j0...
void grad_tile(float* tile, int64_t i0, int64_t m, int64_t j0, int64_t n, const float* g) {
  // sigmoid(l) off the diagonal, -sigmoid(-l) = sigmoid(l) - 1 on it: compute sigmoid(-l) there
  // first so that the positive's term keeps its relative precision when l >> 0.
  for (int64_t r = 0; r < m; ++r) {
    const int64_t c = i0 + r - j0;
    if (c >= 0 && c < n) tile[r * kTile + c] = -tile[r * kTile + c];
  }
  for (int64_t r = 0; r < m; ++r) sigmoid_inplace(tile + r * kTile, n);
  for (int64_t r = 0; r < m; ++r) {
    const int64_t c = i0 + r - j0;
    if (c >= 0 && c < n) tile[r * kTile + c] = -tile[r * kTile + c];
    const float gi = g[i0 + r];
    at::vec::map([gi](Vec v) { return v * Vec(gi); }, tile + r * kTile, tile + r * kTile, n);
  }
}

at::Tensor siglip_fwd(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale,
                      const at::Tensor& bias) {
  check_siglip_fwd(x_in, y_in, scale, bias);
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), y = y_in.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  const float s = scale.item<float>(), b = bias.item<float>();  // CPU tensors: no device sync
  at::Tensor row_loss = at::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* out = row_loss.data_ptr<float>();
  const int64_t blocks = (N + kTile - 1) / kTile;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TileGemmThreadGuard guard;
    std::vector<float> tile(kTile * kTile), dots(kTile * kTile), pack(pack_floats(D));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kTile, m = std::min(kTile, N - i0);
      double sums[kTile] = {};
      for (int64_t j0 = 0; j0 < N; j0 += kTile) {
        const int64_t n = std::min(kTile, N - j0);
        logits_tile(xp, yp, D, i0, m, j0, n, s, b, tile.data(), dots.data(), pack.data());
        // softplus(-z l): negate the diagonal (the positives), then softplus of every entry.
        for (int64_t r = 0; r < m; ++r) {
          const int64_t c = i0 + r - j0;
          float* row = tile.data() + r * kTile;
          for (int64_t k = 0; k < n; ++k) row[k] = (k == c) ? -row[k] : row[k];
          softplus_inplace(row, n);
          float acc = 0.f;
          for (int64_t k = 0; k < n; ++k) acc += row[k];
          sums[r] += acc;
        }
      }
      for (int64_t r = 0; r < m; ++r) out[i0 + r] = static_cast<float>(sums[r]);
    }
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd(const at::Tensor& grad, const at::Tensor& x_in,
                                                                      const at::Tensor& y_in, const at::Tensor& scale,
                                                                      const at::Tensor& bias) {
  check_siglip_bwd(grad, x_in, y_in, scale, bias);
  const at::Tensor x = x_in.to(at::kFloat).contiguous(), y = y_in.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  const at::Tensor g = grad.contiguous();
  const float s = scale.item<float>(), b = bias.item<float>();
  at::Tensor dx = at::zeros({N, D}, x.options()), dy = at::zeros({N, D}, x.options());
  const int64_t blocks = (N + kTile - 1) / kTile;
  std::vector<double> ds_part(blocks, 0.0), db_part(blocks, 0.0);
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* dyp = dy.data_ptr<float>();
  // Row pass: dx_I = s sum_J G_IJ y_J, and the block's share of ds and db.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TileGemmThreadGuard guard;
    std::vector<float> tile(kTile * kTile), dots(kTile * kTile), pack(pack_floats(D));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kTile, m = std::min(kTile, N - i0);
      double ds = 0.0, db = 0.0;
      for (int64_t j0 = 0; j0 < N; j0 += kTile) {
        const int64_t n = std::min(kTile, N - j0);
        logits_tile(xp, yp, D, i0, m, j0, n, s, b, tile.data(), dots.data(), pack.data());
        grad_tile(tile.data(), i0, m, j0, n, gp);
        for (int64_t r = 0; r < m; ++r) {
          const float* gr = tile.data() + r * kTile;
          ds += dot(gr, dots.data() + r * kTile, n);
          float acc = 0.f;
          for (int64_t k = 0; k < n; ++k) acc += gr[k];
          db += acc;
        }
        gemm_nn_acc(m, D, n, tile.data(), kTile, yp + j0 * D, D, dxp + i0 * D, D);
      }
      at::vec::map([s](Vec v) { return v * Vec(s); }, dxp + i0 * D, dxp + i0 * D, m * D);
      ds_part[block] = ds;
      db_part[block] = db;
    }
  });
  // Column pass: dy_J = s sum_I G_IJ^T x_I (the tiles recomputed, column block owned by one thread).
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TileGemmThreadGuard guard;
    std::vector<float> tile(kTile * kTile), dots(kTile * kTile), pack(pack_floats(D));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j0 = block * kTile, n = std::min(kTile, N - j0);
      for (int64_t i0 = 0; i0 < N; i0 += kTile) {
        const int64_t m = std::min(kTile, N - i0);
        logits_tile(xp, yp, D, i0, m, j0, n, s, b, tile.data(), dots.data(), pack.data());
        grad_tile(tile.data(), i0, m, j0, n, gp);
        gemm_tn_acc(n, D, m, tile.data(), kTile, xp + i0 * D, D, dyp + j0 * D, D);
      }
      at::vec::map([s](Vec v) { return v * Vec(s); }, dyp + j0 * D, dyp + j0 * D, n * D);
    }
  });
  double ds = 0.0, db = 0.0;
  for (int64_t block = 0; block < blocks; ++block) {
    ds += ds_part[block];
    db += db_part[block];
  }
  const auto f32 = x.options();
  return {dx.to(x_in.scalar_type()), dy.to(y_in.scalar_type()), at::scalar_tensor(ds, f32),
          at::scalar_tensor(db, f32)};
}

}  // namespace
}  // namespace cl_fast::cpu

TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("siglip_fwd", &cl_fast::cpu::siglip_fwd);
  m.impl("siglip_bwd", &cl_fast::cpu::siglip_bwd);
}
