// InfoNCE block pieces on CPU: rows (M, D) against one slice of columns (C, D), the building
// block of the distributed losses (cl_fast/distributed.py). Semantics: PLAN / cl_fast/reference.py
// infonce_block_lse / infonce_block_grad:
//   S_ij = s <rows_i, cols_j> (features as given, fp32 accumulation); row i leaves out
//   j == i + diag and, with pairs, j == diag + (i + M/2) mod M (offsets outside [0, C): nothing).
//   forward  lse_i = log sum_{j kept} exp(S_ij)   (-inf when nothing is kept; NaN propagates)
//   backward W_ij = g_i exp(S_ij - lse_i) on the kept j (lse = the MERGED lse over every slice;
//            rows with lse_i = -inf or g_i = 0 give W = 0), drows = s W cols, dcols = s W^T rows,
//            dscale = sum W_ij <rows_i, cols_j> = sum W_ij S_ij / s.
//
// Layout. Rows are cut into blocks of bm <= 256 rows, columns into blocks of bn <= 256 (equal
// sizes, depending on M and C only). A tile (I, J): C = R_I C_J^T by tile_gemm (MKL sgemm), then
// per row a vectorised pass over the tile row. Nothing of size M x C is ever formed: per-thread
// scratch is one bm x bn tile; fp16 / bf16 inputs get fp32 copies (O((M + C) D)).
//
// Forward: row blocks in parallel; each streams the column blocks in order with a running row
// max m_i and sum l_i (online log-sum-exp: l <- l exp(m_old - m_new) + sum_j exp(S_ij - m_new)),
// so any finite |S| works. Excluded columns: only in tiles that hold one (at most two per row);
// their C entries are set to -inf before the row pass (S = -inf: out of the max, exp = 0, and a
// NaN there does not leak, as in the reference's masked_fill).
//
// Huge features. Features are not normalised: a dot of two rows with max |x| above 2^50 could
// leave fp32's range even where S = s <r, c> is an fp32 number (small s). Such rows (either side)
// enter the logits GEMM scaled by an exact power of two 2^-e (cpu_vec.h's rule, as infonce.cpp
// does for its norms), and S_ij = C'_ij (s 2^e_i) 2^f_j; every other row keeps its bits, and the
// backward's GEMMs use the features as given (W <= |g| there, no overflow short of the result's).
//
// Backward and determinism: no atomics; every output element is written by one thread at a
// time in an order fixed by the schedule, so repeated calls with the same thread count are
// bitwise identical. drows needs the tiles of a row block, dcols those of a column block:
//   partial (default): T = min(threads, row blocks) fixed chunks of row blocks, each with its
//            own C x D dcols buffer (chunk 0 writes dcols itself), summed in chunk order: one S
//            GEMM per tile and (T - 1) C D extra floats, used while T - 1 <= 8.
//   rounds:  infonce.cpp's cross schedule (beyond 9 threads, or CL_FAST_BLOCK_BWD=rounds): row
//            and column blocks in G = max(16, 2 threads) groups, round r runs the group pairs
//            (A, A + r mod G) in parallel: each tile once, no extra memory, G barriers.
// Measured, M = C = 4096, D = 128 fp32, backward, CPU seconds (process time, best of 3-4; the
// 2-core AMD EPYC dev box, -mavx2, MKL sgemm, loaded by other jobs, so wall times were noisy):
//   2 threads: partial 0.19-0.21, rounds 0.22-0.28 (G = 4..16), a column-stationary second pass
//              (row blocks for drows, then column blocks recomputing the S tiles for dcols; 4
//              GEMMs per tile instead of 3) 0.27;
//   1 thread:  partial 0.18-0.21, rounds 0.16-0.20, column-stationary 0.21-0.23.
// So the column-stationary pass (the only schedule independent of the thread count) was
// dropped: partial beats it by ~25%; rounds does the same work as partial, but its barriers cost
// on a busy machine. 3 GEMMs of 2 M C D flops at MKL's ~80 GFLOP/s per core are 0.16 s.
#include "cpu_vec.h"

#include "tile_gemm.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace cl_fast::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kMaxBlock = 256;

// Block size for n rows: at most 256, smaller for small n so that there are ~16 blocks to share
// out; equal sizes. Depends on n only (never on the thread count).
int64_t block_size(int64_t n) {
  const int64_t target = std::min<int64_t>(kMaxBlock, std::max<int64_t>(16, (n + 15) / 16));
  const int64_t blocks = std::max<int64_t>(1, (n + target - 1) / target);
  return std::max<int64_t>(1, (n + blocks - 1) / blocks);
}

// One side of the tiles in fp32: `raw` as given (the backward's GEMM operands), `dot` the rows
// the logits GEMM reads (raw, or a copy with the large rows scaled by 2^-e_i), mult_i = 2^e_i.
struct Operand {
  at::Tensor raw, dot;
  std::vector<float> mult;
  bool scaled = false;
  const float* raw_p() const { return raw.data_ptr<float>(); }
  const float* dot_p() const { return dot.data_ptr<float>(); }
};

Operand prepare(const at::Tensor& x) {
  Operand op;
  op.raw = x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat);
  const int64_t n = op.raw.size(0), d = op.raw.size(1);
  std::vector<int> exps(n, 0);
  const float* p = op.raw.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) exps[i] = row_scale_exponent(max_abs(p + i * d, d));
  });
  op.mult.assign(n, 1.f);
  op.scaled = std::any_of(exps.begin(), exps.end(), [](int e) { return e != 0; });
  op.dot = op.raw;
  if (op.scaled) {
    op.dot = op.raw.clone();
    float* out = op.dot.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      if (exps[i] != 0) {
        scale_row_pow2(out + i * d, out + i * d, d, exps[i]);
        op.mult[i] = std::ldexp(1.f, exps[i]);
      }
    }
  }
  return op;
}

// The excluded columns of global row i, as offsets into the column block [j0, j0 + n): up to
// two, -1 where none. `active` is false when diag lies so far out that no row excludes anything
// (this also keeps i + diag from overflowing).
struct Exclusion {
  int64_t m, c, diag;
  bool pairs, active;
  Exclusion(int64_t m_, int64_t c_, int64_t diag_, bool pairs_)
      : m(m_), c(c_), diag(diag_), pairs(pairs_), active(diag_ < c_ && diag_ > -m_) {}
  // Writes the offsets of row i's excluded columns inside [j0, j0 + n) to out; returns how many.
  int find(int64_t i, int64_t j0, int64_t n, int64_t out[2]) const {
    if (!active) return 0;
    int k = 0;
    const int64_t self = i + diag - j0;
    if (self >= 0 && self < n) out[k++] = self;
    if (pairs) {
      const int64_t pos = diag + (i + m / 2) % m - j0;
      if (pos >= 0 && pos < n && (k == 0 || out[0] != pos)) out[k++] = pos;
    }
    return k;
  }
};


// Per-call constants shared by the tiles.
struct Problem {
  int64_t m, c, d, bm, bn;
  float s;
  const Operand* rows;
  const Operand* cols;
  Exclusion ex;
  int64_t row_blocks() const { return (m + bm - 1) / bm; }
  int64_t col_blocks() const { return (c + bn - 1) / bn; }
};

struct Scratch {
  std::vector<float> tile, pack;
  Scratch(const Problem& p) : tile(p.bm * p.bn) {
    if (!tile_gemm_uses_blas()) pack.resize(p.d * ((p.bn + 2 * kVec - 1) / (2 * kVec) * 2 * kVec));
  }
};

// C = R_I C_J^T (the scaled operands) into w.tile, row stride n; returns (i0, mb, j0, n).
inline void logits_gemm(const Problem& p, int64_t i0, int64_t mb, int64_t j0, int64_t n, Scratch& w) {
  gemm_nt(mb, n, p.d, p.rows->dot_p() + i0 * p.d, p.d, p.cols->dot_p() + j0 * p.d, p.d, w.tile.data(), n,
          w.pack.data());
}

// ---- forward -----------------------------------------------------------------------------

// One row of a tile: S = C (s 2^e_i) [2^f_j] written over C, returns max_j S (NaN-propagating,
// ragged lanes -inf).
template <bool kColScaled>
inline float logits_row(float* ci, int64_t n, float si, const float* col_mult) {
  const Vec vs(si), neg_inf(-kInf);
  Vec mx = neg_inf;
  for (int64_t j = 0; j < n; j += kVec) {
    const int64_t count = std::min(kVec, n - j);
    Vec logit = load(ci + j, count) * vs;
    if (kColScaled) logit = logit * load(col_mult + j, count);
    store(logit, ci + j, count);
    if (count < kVec) logit = Vec::set(neg_inf, logit, count);
    mx = at::vec::maximum(mx, logit);
  }
  return hmax(mx);
}

inline float exp_sum_row(const float* si, int64_t n, float shift) {
  const Vec neg_shift(-shift);
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const int64_t count = std::min(kVec, n - j);
    Vec e = exp_fast(load(si + j, count) + neg_shift);
    if (count < kVec) e = Vec::set(Vec(0.f), e, count);
    acc = acc + e;
  }
  return hsum(acc);
}

template <bool kColScaled>
void forward_block(const Problem& p, int64_t i0, int64_t mb, float* lse, Scratch& w) {
  std::vector<float> run_max(mb, -kInf);
  std::vector<double> run_sum(mb, 0.0);
  const float* col_mult = p.cols->mult.data();
  const float* row_mult = p.rows->mult.data();
  for (int64_t j0 = 0; j0 < p.c; j0 += p.bn) {
    const int64_t n = std::min(p.bn, p.c - j0);
    logits_gemm(p, i0, mb, j0, n, w);
    for (int64_t ii = 0; ii < mb; ++ii) {
      const float old_max = run_max[ii];
      if (std::isnan(old_max)) continue;  // a NaN row stays NaN
      float* ci = w.tile.data() + ii * n;
      int64_t excluded[2];
      const int k = p.ex.find(i0 + ii, j0, n, excluded);
      for (int e = 0; e < k; ++e) ci[excluded[e]] = -kInf;
      const float tile_max = logits_row<kColScaled>(ci, n, p.s * row_mult[i0 + ii], col_mult + j0);
      if (std::isnan(tile_max)) {
        run_max[ii] = tile_max;
        continue;
      }
      const float new_max = std::max(old_max, tile_max);
      if (new_max == -kInf || new_max == kInf) {  // nothing kept yet / an infinite logit: lse = +inf
        run_max[ii] = new_max;
        continue;
      }
      if (new_max > old_max) run_sum[ii] *= std::exp(static_cast<double>(old_max) - new_max);
      run_max[ii] = new_max;
      run_sum[ii] += exp_sum_row(ci, n, new_max);
    }
  }
  for (int64_t ii = 0; ii < mb; ++ii) {
    const float mx = run_max[ii];
    lse[i0 + ii] = std::isfinite(mx) ? static_cast<float>(mx + std::log(run_sum[ii])) : mx;
  }
}

// ---- backward ------------------------------------------------------------------------------

// One row of a tile: W = coef exp(S - lse) written over C (0 on the ragged lanes and, kMasked,
// where S = -inf: the excluded columns); returns its sum W S (the dscale part, times s).
template <bool kColScaled, bool kMasked>
inline float weights_row(float* ci, int64_t n, float si, const float* col_mult, float coef, float lse) {
  const Vec vs(si), vcoef(coef), neg_lse(-lse), neg_inf(-kInf), zero(0.f);
  Vec dscale(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const int64_t count = std::min(kVec, n - j);
    Vec logit = load(ci + j, count) * vs;
    if (kColScaled) logit = logit * load(col_mult + j, count);
    Vec weight = exp_fast(logit + neg_lse) * vcoef;
    if (count < kVec) weight = Vec::set(zero, weight, count);
    store(weight, ci + j, count);
    Vec term = weight * logit;
    if (kMasked) term = Vec::blendv(term, zero, logit == neg_inf);
    if (count < kVec) term = Vec::set(zero, term, count);
    dscale = dscale + term;
  }
  return hsum(dscale);
}

struct BwdState {
  const float* coef;  // g_i, or 0 where lse_i = -inf or g_i = 0
  const float* lse;
  float* drows;       // (M, D), accumulated unscaled (times s at the end)
  float* dcols;       // (C, D), likewise
  double* dscale;     // per row block
};

// Tile (row block rb, column block cb): W into w.tile, its dscale part added to st.dscale[rb],
// then drows_I += W C_J and dcols_out (the rows of column block cb) += W^T R_I.
template <bool kColScaled>
void grad_tile(const Problem& p, int64_t rb, int64_t cb, const BwdState& st, float* dcols_out, Scratch& w) {
  const int64_t i0 = rb * p.bm, mb = std::min(p.bm, p.m - i0);
  const int64_t j0 = cb * p.bn, n = std::min(p.bn, p.c - j0);
  logits_gemm(p, i0, mb, j0, n, w);
  const float* col_mult = p.cols->mult.data() + j0;
  const float* row_mult = p.rows->mult.data();
  float dscale = 0.f;
  bool any = false;
  for (int64_t ii = 0; ii < mb; ++ii) {
    const int64_t i = i0 + ii;
    float* ci = w.tile.data() + ii * n;
    if (st.coef[i] == 0.f) {
      std::memset(ci, 0, n * sizeof(float));
      continue;
    }
    any = true;
    int64_t excluded[2];
    const int k = p.ex.find(i, j0, n, excluded);
    const float si = p.s * row_mult[i];
    if (k == 0) {
      dscale += weights_row<kColScaled, false>(ci, n, si, col_mult, st.coef[i], st.lse[i]);
    } else {
      for (int e = 0; e < k; ++e) ci[excluded[e]] = -kInf;
      dscale += weights_row<kColScaled, true>(ci, n, si, col_mult, st.coef[i], st.lse[i]);
    }
  }
  if (!any) return;  // every row of the block contributes nothing
  st.dscale[rb] += dscale;
  gemm_nn_acc(mb, p.d, n, w.tile.data(), n, p.cols->raw_p() + j0 * p.d, p.d, st.drows + i0 * p.d, p.d);
  gemm_tn_acc(n, p.d, mb, w.tile.data(), n, p.rows->raw_p() + i0 * p.d, p.d, dcols_out, p.d);
}

// The extra memory `partial` may take: (chunks - 1) C D floats up to kPartialBudget C D (8 x
// the dcols output), i.e. up to 9 threads; beyond, `rounds` (no extra memory) runs.
constexpr int64_t kPartialBudget = 8;

enum class BwdSchedule { kRounds, kPartial };

// CL_FAST_BLOCK_BWD=rounds|partial forces one (read per call: tests run both); else partial
// when its buffers fit the budget.
BwdSchedule bwd_schedule(int64_t chunks) {
  const char* env = std::getenv("CL_FAST_BLOCK_BWD");
  if (env != nullptr && std::strcmp(env, "rounds") == 0) return BwdSchedule::kRounds;
  if (env != nullptr && std::strcmp(env, "partial") == 0) return BwdSchedule::kPartial;
  return chunks - 1 <= kPartialBudget ? BwdSchedule::kPartial : BwdSchedule::kRounds;
}

// Group g of n blocks in G groups: [bound(g), bound(g + 1)).
inline int64_t group_bound(int64_t g, int64_t blocks, int64_t groups) { return g * blocks / groups; }

template <bool kColScaled>
void backward(const Problem& p, const BwdState& st) {
  const int64_t rbs = p.row_blocks(), cbs = p.col_blocks();
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min(threads, rbs);
  if (bwd_schedule(chunks) == BwdSchedule::kRounds) {
    const int64_t groups = std::max<int64_t>(1, std::min({std::max<int64_t>(16, 2 * threads), rbs, cbs}));
    for (int64_t r = 0; r < groups; ++r) {
      at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        TileGemmThreadGuard single_threaded_blas;
        Scratch w(p);
        for (int64_t a = begin; a < end; ++a) {
          const int64_t b = (a + r) % groups;
          for (int64_t rb = group_bound(a, rbs, groups); rb < group_bound(a + 1, rbs, groups); ++rb) {
            for (int64_t cb = group_bound(b, cbs, groups); cb < group_bound(b + 1, cbs, groups); ++cb) {
              grad_tile<kColScaled>(p, rb, cb, st, st.dcols + cb * p.bn * p.d, w);
            }
          }
        }
      });
    }
    return;
  }
  // partial: chunk t = row blocks [bound(t), bound(t + 1)), its dcols into buffer t (chunk 0:
  // dcols itself), then dcols += buffer 1, 2, ... in that order.
  const int64_t cd = p.c * p.d;
  std::vector<float> partial((chunks - 1) * cd, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    TileGemmThreadGuard single_threaded_blas;
    Scratch w(p);
    for (int64_t t = begin; t < end; ++t) {
      float* out = t == 0 ? st.dcols : partial.data() + (t - 1) * cd;
      for (int64_t rb = group_bound(t, rbs, chunks); rb < group_bound(t + 1, rbs, chunks); ++rb) {
        for (int64_t cb = 0; cb < cbs; ++cb) grad_tile<kColScaled>(p, rb, cb, st, out + cb * p.bn * p.d, w);
      }
    }
  });
  at::parallel_for(0, cd, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = 1; t < chunks; ++t) {
      const float* src = partial.data() + (t - 1) * cd;
      for (int64_t e = begin; e < end; ++e) st.dcols[e] += src[e];
    }
  });
}

void scale_in_place(float* x, int64_t n, float s) {
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    const Vec vs(s);
    int64_t j = begin;
    for (; j + kVec <= end; j += kVec) (Vec::loadu(x + j) * vs).store(x + j);
    for (; j < end; ++j) x[j] *= s;
  });
}

}  // namespace

at::Tensor infonce_block_fwd(const at::Tensor& rows_in, const at::Tensor& cols_in, double scale, int64_t diag,
                             bool pairs) {
  const int64_t m = rows_in.size(0), c = cols_in.size(0), d = rows_in.size(1);
  at::Tensor lse = at::full({m}, -kInf, at::TensorOptions().dtype(at::kFloat));
  if (m == 0 || c == 0) return lse;
  const Operand rows = prepare(rows_in), cols = prepare(cols_in);
  const Problem p{m, c, d, block_size(m), std::min(c, kMaxBlock), static_cast<float>(scale), &rows, &cols,
                  Exclusion(m, c, diag, pairs)};
  float* out = lse.data_ptr<float>();
  at::parallel_for(0, p.row_blocks(), 1, [&](int64_t begin, int64_t end) {
    TileGemmThreadGuard single_threaded_blas;
    Scratch w(p);
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t i0 = rb * p.bm, mb = std::min(p.bm, m - i0);
      cols.scaled ? forward_block<true>(p, i0, mb, out, w) : forward_block<false>(p, i0, mb, out, w);
    }
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_block_bwd(const at::Tensor& grad_in, const at::Tensor& rows_in,
                                                                 const at::Tensor& cols_in, double scale,
                                                                 const at::Tensor& lse_in, int64_t diag, bool pairs) {
  const int64_t m = rows_in.size(0), c = cols_in.size(0), d = rows_in.size(1);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor drows = at::zeros({m, d}, f32), dcols = at::zeros({c, d}, f32);
  if (m == 0 || c == 0) return {drows, dcols, at::zeros({}, f32)};
  const Operand rows = prepare(rows_in), cols = prepare(cols_in);
  const at::Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const float* g = grad.data_ptr<float>();
  const float* l = lse.data_ptr<float>();
  std::vector<float> coef(m);
  for (int64_t i = 0; i < m; ++i) coef[i] = (l[i] == -kInf) ? 0.f : g[i];
  const float s = static_cast<float>(scale);
  // s is folded into the outputs at the end, not into the sums.
  const Problem p{m, c, d, block_size(m), block_size(c), s, &rows, &cols, Exclusion(m, c, diag, pairs)};
  std::vector<double> dscale_block(p.row_blocks(), 0.0);
  const BwdState st{coef.data(), l, drows.data_ptr<float>(), dcols.data_ptr<float>(), dscale_block.data()};
  cols.scaled ? backward<true>(p, st) : backward<false>(p, st);
  scale_in_place(st.drows, m * d, s);
  scale_in_place(st.dcols, c * d, s);
  double total = 0.0;
  for (double part : dscale_block) total += part;
  // sum W S / s past FLT_MAX (huge features, tiny s) is an fp32 inf, not a conversion error
  const double value = total / scale;
  const float dscale = std::fabs(value) <= std::numeric_limits<float>::max() || std::isnan(value)
                           ? static_cast<float>(value)
                           : std::copysign(kInf, static_cast<float>(value > 0 ? 1 : -1));
  return {drows, dcols, at::scalar_tensor(dscale, f32)};
}

}  // namespace cl_fast::cpu

// ---- registration (schemas, checks and Meta kernels: csrc/ops.cpp) ----------------------------
namespace cl_fast {
namespace {

at::Tensor infonce_block_fwd_cpu(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& scale,
                                 int64_t diag, bool pairs) {
  check_infonce_block_fwd(rows, cols, scale, diag, pairs);
  return cpu::infonce_block_fwd(rows, cols, cpu_scalar(scale), diag, pairs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_block_bwd_cpu(const at::Tensor& grad, const at::Tensor& rows,
                                                                     const at::Tensor& cols, const at::Tensor& scale,
                                                                     const at::Tensor& lse, int64_t diag, bool pairs) {
  check_infonce_block_bwd(grad, rows, cols, scale, lse, diag, pairs);
  return cpu::infonce_block_bwd(grad, rows, cols, cpu_scalar(scale), lse, diag, pairs);
}

}  // namespace
}  // namespace cl_fast

TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("infonce_block_fwd", &cl_fast::infonce_block_fwd_cpu);
  m.impl("infonce_block_bwd", &cl_fast::infonce_block_bwd_cpu);
}
