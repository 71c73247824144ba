// MoCo on the CPU: the InfoNCE loss of queries against their key and a (K, D) key queue, and the
// ring-buffer enqueue. Math (SPEC.md, moco_loss):
//   u_i = n(q_i), v_i = n(k_i), w_j = queue_j (as stored), s = 1/T
//   l_i0 = s u_i.v_i, l_ij = s u_i.w_j, lse_i = log(exp(l_i0) + sum_j exp(l_ij)), loss_i = lse_i - l_i0
// Gradient (only into q): with P_ij = exp(l_ij - lse_i), P_i0 likewise, upstream g_i,
//   dL/du_i = s g_i d_i,   d_i = (P_i0 - 1) v_i + o_i,   o_i = sum_j P_ij w_j
//   dL/ds   = sum_i g_i c_i,  c_i = u_i.d_i
//   dL/dq_i = s g_i e_i,   e_i = r_i (d_i - u_i c_i)  (= r_i d_i when ||q_i|| <= eps)
// g_i is a per-row scalar, so e and c do not depend on it: the forward accumulates o_i next to
// the log-sum-exp (the P @ W product of flash attention) and returns e (N, D) and c (N,); the
// backward is then an O(N D) scaling (cl_fast/moco.py). The N x (1 + K) logits never exist:
// each task holds one (rows x tile) block of logits.
//
// Work split: tasks = (row block of up to kRowBlock queries) x (contiguous K range, a "split").
// Each task runs an online log-sum-exp over its K range, tile by tile:
//   S = (s U_blk) W_tile^T (tile_gemm: single-threaded sgemm), m' = max(m, rowmax S), P = exp(S - m'),
//   l = l exp(m - m') + rowsum P, O = O exp(m - m') + P W_tile
// and leaves (m, l, O) per row and split; a row pass merges the splits with the positive.
#include "cpu_vec.h"

#include "tile_gemm.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace cl_fast::cpu {
namespace {

constexpr float kNormEps = 1e-12f;
// Start of the running max: finite, so exp(m - m') stays 0 or 1 instead of exp(-inf + inf).
constexpr float kMaxFloor = -1e30f;
constexpr int64_t kRowBlock = 128;  // queries per task (S tile rows)
constexpr int64_t kKeyTile = 256;   // queue rows per tile (S tile columns)

float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b); }

// fp32 copy of x (N, D) with every row normalised in place; inv_norm[i] = 1 / max(||x_i||, eps).
// Overflow-free for any finite row (cpu_vec.h): a large row is first scaled by 2^-e (exact, in
// the copy), so r' = 1 / ||x 2^-e|| is an ordinary number and n(x) = (x 2^-e) r'; the true
// 1 / ||x|| = r' 2^-e (may be subnormal only for ||x|| beyond 2^126).
at::Tensor normalized_rows(const at::Tensor& x, at::Tensor* inv_norm) {
  at::Tensor out = x.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const int64_t rows = out.size(0), dim = out.size(1);
  float* data = out.data_ptr<float>();
  float* inv = inv_norm ? inv_norm->data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = data + i * dim;
      const int e = row_scale_exponent(max_abs(row, dim));
      if (e != 0) scale_row_pow2(row, row, dim, e);
      const float r = 1.f / std::max(std::sqrt(dot(row, row, dim)), kNormEps);
      at::vec::map([r](Vec x) { return x * Vec(r); }, row, row, dim);
      if (inv) inv[i] = e != 0 ? std::ldexp(r, -e) : r;
    }
  });
  return out;
}

// One task: `rows` query rows against queue rows [k_lo, k_hi). U points at the first of them,
// already scaled (s u_i), so a tile product is the logits themselves. Writes m, l per row and,
// when need_grad, O (rows x D, leading dimension D) for this split.
void lse_over_queue_range(const float* U, const at::Tensor& queue, int64_t dim, bool need_grad,
                          int64_t rows, int64_t k_lo, int64_t k_hi, float* m, float* l, float* O) {
  const bool queue_fp32 = queue.scalar_type() == at::kFloat;
  std::vector<float> S(rows * kKeyTile);
  // scratch of the at::vec tile product (used only where no BLAS sgemm is found)
  std::vector<float> pack(tile_gemm_uses_blas() ? 0 : dim * (kKeyTile + 16));
  at::Tensor W_buf = queue_fp32 ? at::Tensor() : at::empty({kKeyTile, dim}, queue.options().dtype(at::kFloat));
  std::fill(m, m + rows, kMaxFloor);
  std::fill(l, l + rows, 0.f);
  if (need_grad) std::fill(O, O + rows * dim, 0.f);
  std::vector<float> alpha(rows);
  TileGemmThreadGuard single_threaded_blas;

  for (int64_t start = k_lo; start < k_hi; start += kKeyTile) {
    const int64_t cols = std::min(kKeyTile, k_hi - start);
    const float* W;
    if (queue_fp32) {
      W = queue.data_ptr<float>() + start * dim;
    } else {  // fp16 / bf16 queue: this tile in fp32
      W_buf.narrow(0, 0, cols).copy_(queue.narrow(0, start, cols));
      W = W_buf.data_ptr<float>();
    }
    gemm_nt(rows, cols, dim, U, dim, W, dim, S.data(), cols, pack.data());  // S = (s u_i) . w_j
    bool rescale = false;
    for (int64_t i = 0; i < rows; ++i) {
      float* srow = S.data() + i * cols;
      Vec vmax(kMaxFloor);
      int64_t j = 0;
      for (; j + kVec <= cols; j += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(srow + j));
      float tile_max = kMaxFloor;
      {
        alignas(64) float lanes[kVec];
        vmax.store(lanes);
        for (int64_t t = 0; t < kVec; ++t) tile_max = nan_max(tile_max, lanes[t]);
      }
      for (; j < cols; ++j) tile_max = nan_max(tile_max, srow[j]);
      const float m_new = nan_max(m[i], tile_max);
      const Vec vm(m_new);
      Vec vsum(0.f);
      j = 0;
      for (; j + kVec <= cols; j += kVec) {
        const Vec p = exp_fast(Vec::loadu(srow + j) - vm);
        p.store(srow + j);
        vsum = vsum + p;
      }
      if (j < cols) {
        const int64_t rest = cols - j;
        const Vec p = exp_fast(Vec::loadu(srow + j, rest) - vm);
        p.store(srow + j, rest);
        vsum = vsum + Vec::set(Vec(0.f), p, rest);
      }
      alpha[i] = std::exp(m[i] - m_new);
      rescale = rescale || alpha[i] != 1.f;
      l[i] = l[i] * alpha[i] + hsum(vsum);
      m[i] = m_new;
    }
    if (need_grad) {
      if (rescale) {
        for (int64_t i = 0; i < rows; ++i) {
          if (alpha[i] == 1.f) continue;
          const float a = alpha[i];
          at::vec::map([a](Vec x) { return x * Vec(a); }, O + i * dim, O + i * dim, dim);
        }
      }
      gemm_nn_acc(rows, dim, cols, S.data(), cols, W, dim, O, dim);  // O += P W_tile
    }
  }
}

int64_t choose_splits(int64_t row_blocks, int64_t K, int64_t requested) {
  const int64_t tiles = (K + kKeyTile - 1) / kKeyTile;
  if (requested > 0) return std::min(requested, tiles);
  // enough tasks to keep every thread busy (two per thread for balance), never an empty split
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min(tiles, (want + row_blocks - 1) / row_blocks));
}

// (loss (N,), e (N, D) or (0, D), c (N,) or (0,)), all fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moco_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& queue, double scale_d,
                                                        bool need_grad, int64_t splits) {
  const int64_t N = q.size(0), D = q.size(1), K = queue.size(0);
  const float scale = static_cast<float>(scale_d);
  const auto f32 = q.options().dtype(at::kFloat);

  at::Tensor inv_q = at::empty({N}, f32);
  at::Tensor U = normalized_rows(q, &inv_q);
  at::Tensor V = normalized_rows(k, nullptr);
  at::Tensor U_scaled = U * scale;
  at::Tensor W = queue.contiguous();

  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t n_splits = choose_splits(row_blocks, K, splits);
  // contiguous K ranges, whole tiles each
  const int64_t tiles = (K + kKeyTile - 1) / kKeyTile;
  const int64_t tiles_per_split = (tiles + n_splits - 1) / n_splits;
  const int64_t used_splits = (tiles + tiles_per_split - 1) / tiles_per_split;

  at::Tensor part_m = at::empty({used_splits, N}, f32);
  at::Tensor part_l = at::empty({used_splits, N}, f32);
  at::Tensor part_o = need_grad ? at::empty({used_splits, N, D}, f32) : at::Tensor();

  at::parallel_for(0, row_blocks * used_splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / used_splits, split = task % used_splits;
      const int64_t row0 = block * kRowBlock, rows = std::min(kRowBlock, N - row0);
      const int64_t k_lo = split * tiles_per_split * kKeyTile;
      const int64_t k_hi = std::min(K, k_lo + tiles_per_split * kKeyTile);
      float* O = need_grad ? part_o.data_ptr<float>() + (split * N + row0) * D : nullptr;
      lse_over_queue_range(U_scaled.data_ptr<float>() + row0 * D, W, D, need_grad, rows, k_lo, k_hi,
                           part_m.data_ptr<float>() + split * N + row0,
                           part_l.data_ptr<float>() + split * N + row0, O);
    }
  });

  // Merge the splits with the positive. m_neg = max_s m_s, m = max(l0, m_neg),
  // L_neg = sum_s l_s exp(m_s - m), L = exp(l0 - m) + L_neg. The loss lse - l0 is formed without
  // cancelling against l0: log1p(L_neg) when the positive is the max (then the loss is small and
  // lse ~ l0), else (m - l0) + log L; likewise P0 - 1 = -L_neg / L.
  at::Tensor loss = at::empty({N}, f32);
  at::Tensor e = at::empty({need_grad ? N : 0, D}, f32);
  at::Tensor c = at::empty({need_grad ? N : 0}, f32);
  const float* pm = part_m.data_ptr<float>();
  const float* pl = part_l.data_ptr<float>();
  const float* po = need_grad ? part_o.data_ptr<float>() : nullptr;
  const float* u_data = U.data_ptr<float>();
  const float* v_data = V.data_ptr<float>();
  const float* inv = inv_q.data_ptr<float>();
  float* loss_data = loss.data_ptr<float>();
  float* e_data = need_grad ? e.data_ptr<float>() : nullptr;
  float* c_data = need_grad ? c.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> weight(used_splits);
    for (int64_t i = begin; i < end; ++i) {
      const float* u = u_data + i * D;
      const float* v = v_data + i * D;
      const float l0 = scale * dot(u, v, D);
      float m_neg = kMaxFloor;
      for (int64_t sp = 0; sp < used_splits; ++sp) m_neg = nan_max(m_neg, pm[sp * N + i]);
      const float m = nan_max(l0, m_neg);
      float L_neg = 0.f;
      for (int64_t sp = 0; sp < used_splits; ++sp) {
        weight[sp] = std::exp(pm[sp * N + i] - m);
        L_neg += pl[sp * N + i] * weight[sp];
      }
      const float L = std::exp(l0 - m) + L_neg;
      loss_data[i] = l0 >= m_neg ? std::log1p(L_neg) : (m - l0) + std::log(L);
      if (!need_grad) continue;
      // d = (P0 - 1) v + sum_s (exp(m_s - m) / L) O_s, written into e's row, then projected
      float* d = e_data + i * D;
      const float pos_coef = -L_neg / L;
      at::vec::map([pos_coef](Vec x) { return x * Vec(pos_coef); }, d, v, D);
      for (int64_t sp = 0; sp < used_splits; ++sp) {
        const float w = weight[sp] / L;
        at::vec::map2([w](Vec acc, Vec o) { return at::vec::fmadd(o, Vec(w), acc); }, d, d,
                      po + (sp * N + i) * D, D);
      }
      const float ci = dot(u, d, D);
      c_data[i] = ci;
      const float r = inv[i];
      if (r < 1.f / kNormEps) {  // ||q_i|| > eps: through the normalisation
        at::vec::map2([r, ci](Vec dd, Vec uu) { return (dd - uu * Vec(ci)) * Vec(r); }, d, d, u, D);
      } else {  // clamped norm: n(q) = q / eps is linear
        at::vec::map([r](Vec dd) { return dd * Vec(r); }, d, d, D);
      }
    }
  });
  return {loss, e, c};
}

// queue[(ptr + b) % K] = n(keys[b]) cast to queue's dtype; ptr <- (ptr + B) % K (ptr: 0-d int CPU tensor).
void moco_queue_update_(at::Tensor& queue, const at::Tensor& keys, at::Tensor& ptr) {
  const int64_t K = queue.size(0), B = keys.size(0);
  if (B == 0) return;
  const int64_t start = ((ptr.item<int64_t>() % K) + K) % K;
  at::Tensor rows = normalized_rows(keys, nullptr).to(queue.scalar_type());
  const int64_t first = std::min(B, K - start);  // rows that fit before the end, the rest wraps
  queue.narrow(0, start, first).copy_(rows.narrow(0, 0, first));
  if (first < B) queue.narrow(0, 0, B - first).copy_(rows.narrow(0, first, B - first));
  ptr.fill_((start + B) % K);
}

}  // namespace
}  // namespace cl_fast::cpu

// ---- registration: the cl_fast_C MoCo ops on CPU tensors (schemas and checks: csrc/ops.cpp) ----
namespace cl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moco_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& queue, const at::Tensor& scale,
                                                            bool need_grad, int64_t splits) {
  check_moco_fwd(q, k, queue, scale, need_grad, splits);
  return cpu::moco_fwd(q, k, queue, cpu_scalar(scale), need_grad, splits);
}

void moco_queue_update_cpu(at::Tensor& queue, const at::Tensor& keys, at::Tensor& ptr) {
  check_moco_queue_update_(queue, keys, ptr);
  cpu::moco_queue_update_(queue, keys, ptr);
}

}  // namespace
}  // namespace cl_fast

TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("moco_fwd", &cl_fast::moco_fwd_cpu);
  m.impl("moco_queue_update_", &cl_fast::moco_queue_update_cpu);
}
