// Fused InfoNCE-family losses on CPU: nt_xent (symmetric, M = 2N rows) and the cross losses
// info_nce / clip_loss (N x N). The math is DESIGN.md's; this file is how it is laid out on CPU.
//
// Normalisation is fused: r_i = 1 / max(||z_i||, eps) in fp32, S_ij = s * (z_i . z_j) * r_i * r_j,
// the dot from an fp32 tile product of the RAW rows (bf16/fp16 inputs: of an fp32 copy). A row
// with max |z| > 2^50 is first scaled by a power of two (a copy, only then; kernel_rows), so norms
// and dots never overflow for finite input. normalize = false (cross losses only, OpenCLIP's
// ClipLoss): r = 1, the features as given.
//
// Tiles. Rows are cut into blocks of bs <= kMaxBlockRows rows (equal sizes, each half of the
// nt_xent input on its own, so no tile straddles z1/z2). Per tile (I, J):
//   C = Z_I Z_J^T              (tile_gemm: MKL sgemm per tile, see tile_gemm.cpp)
//   forward  E = exp(S - c)    row sums into block I, column sums into block J
//   backward W' = W r_i r_j    W = E (a_i + a_j); dscale += sum W' C (= sum W S / s)
//            acc_I += W' Z_J, acc_J += W'^T Z_I      (acc_i = r_i * dL/du_i / s)
// then per row: the positive pair's terms and the chain rule through the normalisation
//   dz_i = s (acc_i - r_i^2 z_i (z_i . acc_i))   (||z_i|| > eps; else s acc_i / (r_i eps)).
// The only state kept between the passes is lse (fp32 per row). Extra memory: per-thread tile
// scratch (bs^2 floats); for fp32 inputs the gradient accumulates in the output itself, for
// bf16/fp16 an fp32 copy of the inputs and an fp32 accumulator (O(M D)). Never an M x M tensor.
//
// Races and determinism. Every pass walks "rounds" of work items; no block appears in two items
// of a round; items run in parallel (at::parallel_for), rounds one after the other. Blocks are
// gathered into G groups (G = 16 up to 8 threads): nt_xent's round 0 is the triangle inside each
// group, then the circle method's G-1 rounds of G/2 disjoint group pairs cover the rest of the
// upper triangle once. Cross: round r = the group pairs (A, A + r mod G). So each block's sums
// and gradient rows are written by one thread at a time, in an order fixed by the schedule
// alone: no per-thread copies of the accumulators, and results bitwise identical for 1..8
// threads (G grows beyond, changing the summation order at the 1e-7 level).
//
// Shift. Fixed c bounding every |S| while 2c <= 80 (E_ij >= e^-2c stays a normal float; one exp
// per entry serves rows and columns): c = s when normalising, c = s max||q|| max||k|| for the
// features as given. Beyond (normalising: s > 40, T < 0.025) a max pass first gives row (and
// column) maxima m, then E^row = exp(S - m_i), E^col = exp(S - m_j): two exps per entry; its
// backward makes one more pass for the normalisers Z_i (lse_normalisers).
//
// Saturated rows: the positive is kept out of the tile sums, loss = log1p(neg / pos) and the
// positive's gradient weight is minus the negatives' probability mass (see "tile bodies").
//
// Measured (2-core AMD EPYC dev box, -mavx2 build, torch 2.13 CPU + MKL, 2 threads), nt_xent
// forward + backward, fp32, 2N = 16384, D = 128: 0.85-0.9 s wall on an idle machine (1.7 s CPU;
// the 4 M^2 D flops at MKL's ~80 GFLOP/s per core are 0.86 s), peak extra memory ~1.5 MB beyond
// the 8 MB of returned gradients; eager PyTorch 6.5-10 s, torch.compile 5.8 s on the same box.
// Profile: MKL sgemm ~91% of the time (of it ~14% MKL's own operand packing), exp and the
// row/column sums ~9%. 2N = 65536: 27 s CPU (~14 s wall), +3.6 MB beyond the gradients.
#include "cpu_vec.h"

#include "infonce_cpu.h"
#include "tile_gemm.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

namespace cl_fast::cpu {
namespace {

constexpr float kNormEps = 1e-12f;

// Tile edge. 256 keeps Z_I, Z_J (D = 128: 128 KB each) and the 256 KB logits tile in a 1 MB L2
// and the per-tile BLAS call overhead below 1%. CPU time of the case above by tile edge: 128:
// 1.95 s, 256: 1.76 s, 384: 1.93 s, 512: 1.80 s. Override for tuning: CL_FAST_CPU_TILE.
constexpr int64_t kMaxBlockRows = 256;

// The fixed shift c serves every logit when |S| <= c and 2c <= 80 (then E = exp(S - c) lies in
// [e^-80, 1], a normal float). normalize = true: |S| <= s, so c = s. normalize = false (features
// as given): |S_ij| <= s ||q_i|| ||k_j|| <= s max ||q|| max ||k|| = c. Returns c, or a negative
// value when the per-row max pass is needed (2c > 80, or the bound is not finite).
double fixed_shift(double scale, double bound_norm_product) {
  const double c = scale * bound_norm_product;
  return 2.0 * c <= 80.0 ? c : -1.0;
}

int64_t max_block_rows() {
  static const int64_t rows = [] {
    const char* env = std::getenv("CL_FAST_CPU_TILE");
    const int64_t value = env ? std::atoll(env) : 0;
    return value >= 8 ? value : kMaxBlockRows;
  }();
  return rows;
}

// Rows per block for n rows: tiles of up to max_block_rows(), smaller for small inputs so that
// a round still holds several tiles; sizes equalised so that no ragged block idles a thread.
// Depends on n only (not on the thread count): results do not change with threads.
int64_t block_rows(int64_t n) {
  const int64_t target = std::min(max_block_rows(), std::max<int64_t>(32, n / 8));
  const int64_t blocks = (n + target - 1) / target;
  return (n + blocks - 1) / blocks;
}

// ---- blocks, per-row state and the round schedules --------------------------------------

struct Block {
  const float* z;   // first row (fp32), row stride D
  float* acc;       // matching rows of the fp32 gradient accumulator (backward)
  int64_t row0;     // global index of the first row into the side's per-row arrays
  int64_t rows;
};

// Cuts rows [0, n) of an fp32 matrix into blocks of bs rows.
void append_blocks(std::vector<Block>& out, const float* z, float* acc, int64_t n, int64_t d, int64_t bs,
                   int64_t row_offset) {
  for (int64_t start = 0; start < n; start += bs) {
    out.push_back({z + start * d, acc ? acc + start * d : nullptr, row_offset + start, std::min(bs, n - start)});
  }
}

// Per-row arrays of one side of the tiles, indexed by Block::row0 + i.
struct Side {
  const float* r = nullptr;     // inverse norms
  double* sum = nullptr;        // sum over the NEGATIVES j != p(i): forward exp(S_ij - shift_i),
                                //   backward exp(S_ij - c) (fixed) or exp(S_ij - lse_i) (fallback)
  float* max = nullptr;         // forward, fallback: max_j S_ij
  const float* lse = nullptr;   // backward, fallback
  const float* coef = nullptr;  // backward: g_i exp(c - lse_i) (fixed shift) or g_i (fallback)
  float* pos = nullptr;         // forward: the positive logit S_i,p(i); backward: its raw dot
};

using Tile = std::pair<int32_t, int32_t>;  // (row block, column block)
using WorkItem = std::vector<Tile>;        // tiles that one thread runs in this order
using Rounds = std::vector<std::vector<WorkItem>>;

// Blocks are gathered into G contiguous groups and the schedule is built on groups, so a pass
// has G barriers, not B: G = max(16, 2 * threads) capped by B. It depends on the thread count
// only beyond 8 threads, so 1..8 threads give bitwise identical results.
int32_t group_count(int32_t blocks, bool even) {
  int32_t groups = std::min<int32_t>(blocks, std::max<int32_t>(16, 2 * at::get_num_threads()));
  if (even && groups % 2 == 1) --groups;
  return std::max<int32_t>(groups, 1);
}

std::vector<int32_t> group_bounds(int32_t blocks, int32_t groups) {
  std::vector<int32_t> bounds(groups + 1);
  for (int32_t g = 0; g <= groups; ++g) bounds[g] = static_cast<int32_t>(static_cast<int64_t>(g) * blocks / groups);
  return bounds;
}

// nt_xent over B (even) blocks in G (even) groups: round 0 = the upper triangle inside each
// group (diagonal tiles included); then the circle method's G-1 rounds of G/2 disjoint group
// pairs (one group fixed, the others rotating) = every tile (I in A, J in B) once.
Rounds symmetric_rounds(int32_t blocks) {
  const int32_t groups = group_count(blocks, /*even=*/true);
  const std::vector<int32_t> bound = group_bounds(blocks, groups);
  Rounds rounds(1);
  for (int32_t g = 0; g < groups; ++g) {
    WorkItem item;
    for (int32_t i = bound[g]; i < bound[g + 1]; ++i) {
      for (int32_t j = i; j < bound[g + 1]; ++j) item.emplace_back(i, j);
    }
    rounds[0].push_back(std::move(item));
  }
  auto pair_item = [&](int32_t a, int32_t b) {
    if (a > b) std::swap(a, b);
    WorkItem item;
    for (int32_t i = bound[a]; i < bound[a + 1]; ++i) {
      for (int32_t j = bound[b]; j < bound[b + 1]; ++j) item.emplace_back(i, j);
    }
    return item;
  };
  const int32_t ring = groups - 1;
  for (int32_t r = 0; r < ring; ++r) {
    std::vector<WorkItem> round;
    round.push_back(pair_item(r, ring));
    for (int32_t k = 1; k < groups / 2; ++k) round.push_back(pair_item((r + k) % ring, (r - k + ring) % ring));
    rounds.push_back(std::move(round));
  }
  return rounds;
}

// Cross losses over B row blocks x B column blocks in G groups: round r = the group pairs
// (A, A + r mod G), each item all tiles (I in A, J in A + r).
Rounds latin_rounds(int32_t blocks) {
  const int32_t groups = group_count(blocks, /*even=*/false);
  const std::vector<int32_t> bound = group_bounds(blocks, groups);
  Rounds rounds(groups);
  for (int32_t r = 0; r < groups; ++r) {
    for (int32_t a = 0; a < groups; ++a) {
      const int32_t b = (a + r) % groups;
      WorkItem item;
      for (int32_t i = bound[a]; i < bound[a + 1]; ++i) {
        for (int32_t j = bound[b]; j < bound[b + 1]; ++j) item.emplace_back(i, j);
      }
      rounds[r].push_back(std::move(item));
    }
  }
  return rounds;
}

// Per-thread scratch: the logits / weight tile, column partial sums, a pack buffer (at::vec
// GEMM only).
struct Scratch {
  std::vector<float> tile, col, pack;
};

std::vector<Scratch> make_scratch(int64_t bs, int64_t d) {
  std::vector<Scratch> scratch(at::get_num_threads());
  for (auto& s : scratch) {
    s.tile.resize(bs * bs);
    s.col.resize(bs);
    if (!tile_gemm_uses_blas()) s.pack.resize(d * ((bs + 2 * kVec - 1) / (2 * kVec) * 2 * kVec));
  }
  return scratch;
}

// Runs tile_fn(tile, scratch) over every tile: rounds in order, the work items of a round in
// parallel, the tiles of an item in order.
template <class F>
void walk(const Rounds& rounds, std::vector<Scratch>& scratch, const F& tile_fn) {
  for (const auto& round : rounds) {
    at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t begin, int64_t end) {
      TileGemmThreadGuard single_threaded_blas;
      Scratch& w = scratch[at::get_thread_num()];
      for (int64_t item = begin; item < end; ++item) {
        for (const Tile& tile : round[item]) tile_fn(tile, w);
      }
    });
  }
}

// ---- tile bodies ---------------------------------------------------------------------------

struct TileArgs {
  const Block* row;
  const Block* col;
  const Side* rs;
  const Side* cs;
  bool diag;      // nt_xent diagonal tile: row == col block, i == j masked, one direction only
  bool pos_diag;  // the tile's diagonal holds positive pairs (cross (I, I); nt_xent (b, b + N/bs))
};

// Saturated rows. The positive pair is kept OUT of every tile sum (its lane is masked like the
// nt_xent self pair), so a row's sum is the negatives' mass alone: forward
//   loss_i = log(pos_i + neg_i) - log(pos_i) = log1p(neg_i / pos_i)
// (never lse - S_pos, which cancels to a tiny difference of two numbers ~ s), and backward the
// positive's weight dL/dS_i,p(i) = g_i (P_i,p(i) - 1) = -g_i sum_{j != p(i)} P_ij: minus the
// negatives' probabilities, summed with their own relative precision, not 1 - a rounded P.

inline Vec zero_lane(const Vec& v, int64_t lane) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  lanes[lane] = 0.f;
  return Vec::loadu(lanes);
}

// Zeroes the lanes past `count` (ragged tail) and the lane of column i when the tile's diagonal
// is masked (the nt_xent self pair, or the positive pair).
// (always inlined: a Vec passed by value to an out-of-line call goes through memory.)
C10_ALWAYS_INLINE Vec mask_lanes(const Vec& v, const TileArgs& t, int64_t i, int64_t j, int64_t count) {
  if (C10_LIKELY(count == kVec && !(t.diag || t.pos_diag))) return v;
  Vec out = count < kVec ? Vec::set(Vec(0.f), v, count) : v;
  if ((t.diag || t.pos_diag) && i >= j && i < j + count) out = zero_lane(out, i - j);
  return out;
}

// Logits tile C = Z_I Z_J^T into w.tile (row stride = column block rows).
void logits_tile(const TileArgs& t, int64_t d, Scratch& w) {
  gemm_nt(t.row->rows, t.col->rows, d, t.row->z, d, t.col->z, d, w.tile.data(), t.col->rows, w.pack.data());
}

// Fallback pass 1: row maxima (and column maxima when kCol) of S, diagonal excluded.
template <bool kCol>
void max_tile(const TileArgs& t, float s, int64_t d, Scratch& w) {
  logits_tile(t, d, w);
  const int64_t m = t.row->rows, n = t.col->rows;
  const float* rr = t.rs->r + t.row->row0;
  const float* rc = t.cs->r + t.col->row0;
  float* col_max = w.col.data();
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  if (kCol) std::fill(col_max, col_max + n, -std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < m; ++i) {
    const Vec si(s * rr[i]);
    const float* ci = w.tile.data() + i * n;
    Vec row_max = neg_inf;
    for (int64_t j = 0; j < n; j += kVec) {
      const int64_t count = std::min(kVec, n - j);
      Vec logit = load(ci + j, count) * si * load(rc + j, count);
      if (count < kVec) logit = Vec::set(neg_inf, logit, count);
      if (t.diag && i >= j && i < j + count) {
        alignas(64) float lanes[kVec];
        logit.store(lanes);
        lanes[i - j] = -std::numeric_limits<float>::infinity();
        logit = Vec::loadu(lanes);
      }
      row_max = at::vec::maximum(row_max, logit);
      if (kCol) store(at::vec::maximum(load(col_max + j, count), logit), col_max + j, count);
    }
    alignas(64) float lanes[kVec];
    row_max.store(lanes);
    float* out = t.rs->max + t.row->row0 + i;
    for (int64_t l = 0; l < kVec; ++l) *out = (std::isnan(lanes[l]) || lanes[l] > *out) ? lanes[l] : *out;
  }
  if (kCol) {
    float* out = t.cs->max + t.col->row0;
    for (int64_t j = 0; j < n; ++j) out[j] = (std::isnan(col_max[j]) || col_max[j] > out[j]) ? col_max[j] : out[j];
  }
}

// Forward sums of the negatives: row sums of E^row into the row side, column sums of E^col into
// the column side (kCol). kFixed: E^row = E^col = exp(S - c). Else E^row = exp(S - m_i),
// E^col = exp(S - m_j). The positive logit S_i,p(i) is recorded (pos), not summed.
template <bool kFixed, bool kCol>
void sum_tile(const TileArgs& t, float s, float c, int64_t d, Scratch& w) {
  logits_tile(t, d, w);
  const int64_t m = t.row->rows, n = t.col->rows;
  const float* rr = t.rs->r + t.row->row0;
  const float* rc = t.cs->r + t.col->row0;
  const float* col_shift = kFixed ? nullptr : t.cs->max + t.col->row0;
  float* col_sum = w.col.data();
  if (t.pos_diag) {  // before the exps overwrite nothing: the tile holds C, read S from it
    for (int64_t i = 0; i < std::min(m, n); ++i) {
      const float logit = w.tile[i * n + i] * (s * rr[i]) * rc[i];  // as max_tile computes it
      t.rs->pos[t.row->row0 + i] = logit;
      t.cs->pos[t.col->row0 + i] = logit;
    }
  }
  if (kCol) std::fill(col_sum, col_sum + n, 0.f);
  for (int64_t i = 0; i < m; ++i) {
    const Vec si(s * rr[i]);
    const Vec row_shift(kFixed ? -c : -t.rs->max[t.row->row0 + i]);
    const float* ci = w.tile.data() + i * n;
    Vec row_sum(0.f);
    for (int64_t j = 0; j < n; j += kVec) {
      const int64_t count = std::min(kVec, n - j);
      Vec e_row, e_col;
      if (kFixed) {
        e_row = mask_lanes(exp_fast(at::vec::fmadd(load(ci + j, count) * si, load(rc + j, count), row_shift)), t, i, j,
                           count);
        e_col = e_row;
      } else {
        const Vec logit = load(ci + j, count) * si * load(rc + j, count);
        e_row = mask_lanes(exp_fast(logit + row_shift), t, i, j, count);
        if (kCol) e_col = mask_lanes(exp_fast(logit - load(col_shift + j, count)), t, i, j, count);
      }
      row_sum = row_sum + e_row;
      if (kCol) store(load(col_sum + j, count) + e_col, col_sum + j, count);
    }
    t.rs->sum[t.row->row0 + i] += hsum(row_sum);
  }
  if (kCol) {
    double* out = t.cs->sum + t.col->row0;
    for (int64_t j = 0; j < n; ++j) out[j] += col_sum[j];
  }
}

// Backward: W'_ij = r_i r_j (P-part of dL/dS_ij + dL/dS_ji) over the negatives (positive and
// self lanes 0), written over the logits tile, then acc_I += W' Z_J and (kColGrad)
// acc_J += W'^T Z_I. Also sums the negatives' probabilities per row / column into the sides'
// `sum` (the positives' weights, see above). Returns this tile's sum W' C (dscale part).
//   kFixed:   W = E (a_i + b_j), E = exp(S - c)          a, b = side coef (g exp(c - lse))
//             sums: E by row and by column (times exp(c - lse) afterwards)
//   fallback: W = g_i exp(S - lse_i) + h_j exp(S - lse_j)   (second term only when kColCoef)
//             sums: exp(S - lse_i) by row, exp(S - lse_j) by column
template <bool kFixed, bool kColCoef, bool kColGrad>
double grad_tile(const TileArgs& t, float s, float c, int64_t d, Scratch& w) {
  constexpr bool kColSum = kColGrad && (kFixed || kColCoef);
  logits_tile(t, d, w);
  const int64_t m = t.row->rows, n = t.col->rows;
  const float* rr = t.rs->r + t.row->row0;
  const float* rc = t.cs->r + t.col->row0;
  const float* coef_c = t.cs->coef + t.col->row0;
  const float* lse_c = kFixed ? nullptr : t.cs->lse + t.col->row0;
  float* col_sum = w.col.data();
  if (kColSum) std::fill(col_sum, col_sum + n, 0.f);
  if (t.pos_diag) {
    for (int64_t i = 0; i < std::min(m, n); ++i) t.rs->pos[t.row->row0 + i] = t.cs->pos[t.col->row0 + i] = w.tile[i * n + i];
  }
  Vec dscale(0.f);
  for (int64_t i = 0; i < m; ++i) {
    const Vec ri(rr[i]);
    const Vec si(s * rr[i]);
    const Vec coef_i(t.rs->coef[t.row->row0 + i]);
    const Vec neg_lse_i(kFixed ? 0.f : -t.rs->lse[t.row->row0 + i]);
    float* ci = w.tile.data() + i * n;
    Vec row_sum(0.f);
    for (int64_t j = 0; j < n; j += kVec) {
      const int64_t count = std::min(kVec, n - j);
      const Vec cv = load(ci + j, count);
      const Vec rcj = load(rc + j, count);
      Vec weight;
      if (kFixed) {
        const Vec e = mask_lanes(exp_fast(at::vec::fmadd(cv * si, rcj, Vec(-c))), t, i, j, count);
        row_sum = row_sum + e;
        if (kColSum) store(load(col_sum + j, count) + e, col_sum + j, count);
        weight = e * (coef_i + load(coef_c + j, count));
      } else {
        const Vec logit = cv * si * rcj;
        const Vec e_row = mask_lanes(exp_fast(logit + neg_lse_i), t, i, j, count);
        row_sum = row_sum + e_row;
        weight = coef_i * e_row;
        if (kColCoef) {
          const Vec e_col = mask_lanes(exp_fast(logit - load(lse_c + j, count)), t, i, j, count);
          if (kColSum) store(load(col_sum + j, count) + e_col, col_sum + j, count);
          weight = at::vec::fmadd(load(coef_c + j, count), e_col, weight);
        }
      }
      weight = weight * ri * rcj;
      dscale = at::vec::fmadd(weight, cv, dscale);
      store(weight, ci + j, count);
    }
    t.rs->sum[t.row->row0 + i] += hsum(row_sum);
  }
  if (kColSum) {
    double* out = t.cs->sum + t.col->row0;
    for (int64_t j = 0; j < n; ++j) out[j] += col_sum[j];
  }
  gemm_nn_acc(m, d, n, w.tile.data(), n, t.col->z, d, t.row->acc, d);
  if (kColGrad) gemm_tn_acc(n, d, m, w.tile.data(), n, t.row->z, d, t.col->acc, d);
  // A diagonal tile holds both (i, j) and (j, i): sum W' C counts each G_ij S_ij twice.
  return (t.diag ? 0.5 : 1.0) * static_cast<double>(hsum(dscale));
}

// ---- per-row passes ------------------------------------------------------------------------

// fp32 rows of an (n, D) input: the input itself (fp32) or a converted copy (bf16/fp16).
at::Tensor fp32_rows(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x.contiguous() : x.contiguous().to(at::kFloat); }

// The rows the kernels read. normalize: every large row (max |x| > 2^50, cpu_vec.h) is scaled by
// 2^-e_i, which leaves u_i = z_i / ||z_i|| unchanged and keeps sum z^2 and the tile dots in
// range; exps[i] = e_i (0: unscaled). A copy is made only when some row is large (never
// writing into the caller's tensor). normalize = false: the features as given, exps all 0.
at::Tensor kernel_rows(const at::Tensor& x, bool normalize, std::vector<int>& exps) {
  at::Tensor rows = fp32_rows(x);
  const int64_t n = rows.size(0), d = rows.size(1);
  exps.assign(n, 0);
  if (!normalize) return rows;
  const float* p = rows.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) exps[i] = row_scale_exponent(max_abs(p + i * d, d));
  });
  if (std::all_of(exps.begin(), exps.end(), [](int e) { return e == 0; })) return rows;
  if (rows.is_alias_of(x)) rows = rows.clone();
  float* out = rows.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (exps[i] != 0) scale_row_pow2(out + i * d, out + i * d, d, exps[i]);
  }
  return rows;
}

// dz_i *= 2^-e_i for the rows kernel_rows scaled: u_i depends on z_i / ||z_i|| only, so
// dL/dz_i = 2^-e_i dL/dz'_i for z'_i = 2^-e_i z_i.
void unscale_gradient(float* dz, const std::vector<int>& exps, int64_t d) {
  for (size_t i = 0; i < exps.size(); ++i) {
    if (exps[i] != 0) scale_row_pow2(dz + i * d, dz + i * d, d, exps[i]);
  }
}

void inverse_norms(const float* z, int64_t n, int64_t d, float* r) {
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float norm = std::sqrt(dot(z + i * d, z + i * d, d));
      r[i] = 1.f / (norm > kNormEps || std::isnan(norm) ? norm : kNormEps);
    }
  });
}

// normalize = false: r = 1 (S = s q.k); returns max_i ||x_i|| (overflow-free, NaN if any is NaN).
double unit_inverse_norms(const float* z, int64_t n, int64_t d, float* r) {
  std::fill(r, r + n, 1.f);
  double largest = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double norm = row_norm(z + i * d, d);
    largest = (std::isnan(norm) || norm > largest) ? norm : largest;
  }
  return largest;
}

// acc_i (= r_i dL/du_i / s) -> dL/dz_i, in place: the chain rule through u = z / max(||z||, eps)
// (normalize), or dL/dz_i = s acc_i (features as given, r = 1).
void finish_rows(const float* z, float* acc, int64_t n, int64_t d, float s, bool normalize) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    const Vec vs(s);
    for (int64_t i = begin; i < end; ++i) {
      const float* zi = z + i * d;
      float* ai = acc + i * d;
      const float sq = normalize ? dot(zi, zi, d) : 0.f;
      const float norm = std::sqrt(sq);
      if (normalize && (norm > kNormEps || std::isnan(norm))) {
        const Vec proj(-dot(zi, ai, d) / sq);  // -r_i^2 (z_i . acc_i)
        for (int64_t j = 0; j < d; j += kVec) {
          const int64_t count = std::min(kVec, d - j);
          store(at::vec::fmadd(proj, load(zi + j, count), load(ai + j, count)) * vs, ai + j, count);
        }
      } else {
        const Vec factor(s);  // s acc_i / (r_i eps) with r_i = 1 / eps; or s acc_i (r_i = 1)
        for (int64_t j = 0; j < d; j += kVec) {
          const int64_t count = std::min(kVec, d - j);
          store(load(ai + j, count) * factor, ai + j, count);
        }
      }
    }
  });
}

// acc_i -= w z_j
inline void axpy_row(float* acc, const float* z, float w, int64_t d) {
  const Vec vw(-w);
  for (int64_t j = 0; j < d; j += kVec) {
    const int64_t count = std::min(kVec, d - j);
    store(at::vec::fmadd(vw, load(z + j, count), load(acc + j, count)), acc + j, count);
  }
}

double ordered_sum(const std::vector<double>& parts) {
  double total = 0.0;
  for (double p : parts) total += p;
  return total;
}

at::Tensor fp32_tensor(int64_t n) { return at::empty({n}, at::TensorOptions().dtype(at::kFloat)); }

// One row's loss and lse from its shift, the negatives' mass neg = sum_{j != p} exp(S_ij - shift)
// and the positive logit: pos = exp(S_pos - shift),
//   lse = shift + log(pos + neg),  loss = log1p(neg / pos)  (pos >= neg: the small-loss regime,
//   full relative precision), else log(pos + neg) - (S_pos - shift) (loss >= log 2: no cancellation).
// In double: S_pos - shift is exact, and pos cannot underflow before the loss is ~700.
inline void row_loss_lse(double shift, double neg, float positive_logit, float* loss, float* lse) {
  const double pos_arg = static_cast<double>(positive_logit) - shift;
  const double pos = std::exp(pos_arg);
  const double total = pos + neg;
  *lse = static_cast<float>(shift + std::log(total));
  *loss = static_cast<float>(pos >= neg ? std::log1p(neg / pos) : std::log(total) - pos_arg);
}

// The fallback backward's P_ij = exp(S_ij - lse_i) / Z_i. The fp32 lse is rounded by up to
// ulp(lse) / 2 (5e-4 at lse ~ 1e4): an error common to the row's P_ij, which a plain softmax
// does not have (it divides by its own sum). One more pass over the logits tiles (sum_tile with
// the lse as the shift) gives Z_i = sum_j exp(S_ij - lse_i), 1 up to that rounding, so the
// backward's probabilities sum to 1 as computed. On entry z holds the negatives' part (the pass'
// sums); the positive's exp(S_pos - lse_i) is added here, in double.
void lse_normalisers(std::vector<double>& z, const std::vector<float>& positive_logit, const float* lse) {
  for (size_t i = 0; i < z.size(); ++i) {
    z[i] += std::exp(static_cast<double>(positive_logit[i]) - lse[i]);
  }
}

}  // namespace

// ---- nt_xent ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ntxent_fwd(const at::Tensor& z1_in, const at::Tensor& z2_in, double scale) {
  const int64_t n = z1_in.size(0), d = z1_in.size(1), rows = 2 * n;
  const float s = static_cast<float>(scale);
  std::vector<int> exps1, exps2;  // unused in the forward: u depends on z / ||z|| only
  const at::Tensor z1 = kernel_rows(z1_in, true, exps1), z2 = kernel_rows(z2_in, true, exps2);
  const float* zh[2] = {z1.data_ptr<float>(), z2.data_ptr<float>()};

  std::vector<float> r(rows);
  inverse_norms(zh[0], n, d, r.data());
  inverse_norms(zh[1], n, d, r.data() + n);

  const int64_t bs = block_rows(n);
  std::vector<Block> blocks;
  append_blocks(blocks, zh[0], nullptr, n, d, bs, 0);
  append_blocks(blocks, zh[1], nullptr, n, d, bs, n);
  const Rounds rounds = symmetric_rounds(static_cast<int32_t>(blocks.size()));
  std::vector<Scratch> scratch = make_scratch(bs, d);

  std::vector<double> sum(rows, 0.0);
  std::vector<float> row_max(rows, -std::numeric_limits<float>::infinity());
  std::vector<float> pos(rows);
  Side side;
  side.r = r.data();
  side.sum = sum.data();
  side.max = row_max.data();
  side.pos = pos.data();
  const double shift = fixed_shift(scale, 1.0);
  const bool fixed = shift >= 0.0;
  const float c = static_cast<float>(shift);
  const int32_t half_blocks = static_cast<int32_t>(blocks.size() / 2);
  auto args = [&](const Tile& tile) {
    return TileArgs{&blocks[tile.first], &blocks[tile.second], &side, &side, tile.first == tile.second,
                    tile.second == tile.first + half_blocks};
  };
  if (!fixed) {
    walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
      const TileArgs t = args(tile);
      t.diag ? max_tile<false>(t, s, d, w) : max_tile<true>(t, s, d, w);
    });
  }
  walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
    const TileArgs t = args(tile);
    if (fixed) {
      t.diag ? sum_tile<true, false>(t, s, c, d, w) : sum_tile<true, true>(t, s, c, d, w);
    } else {
      t.diag ? sum_tile<false, false>(t, s, c, d, w) : sum_tile<false, true>(t, s, c, d, w);
    }
  });

  at::Tensor loss = fp32_tensor(rows), lse = fp32_tensor(rows);
  float* loss_p = loss.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  for (int64_t i = 0; i < rows; ++i) {
    row_loss_lse(fixed ? shift : static_cast<double>(row_max[i]), sum[i], pos[i], loss_p + i, lse_p + i);
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd(const at::Tensor& grad_in, const at::Tensor& z1_in,
                                                          const at::Tensor& z2_in, double scale,
                                                          const at::Tensor& lse_in) {
  const int64_t n = z1_in.size(0), d = z1_in.size(1), rows = 2 * n;
  const float s = static_cast<float>(scale);
  const bool fp32_in = z1_in.scalar_type() == at::kFloat;
  std::vector<int> exps1, exps2;
  const at::Tensor z1 = kernel_rows(z1_in, true, exps1), z2 = kernel_rows(z2_in, true, exps2);
  const at::Tensor grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const float* g = grad.data_ptr<float>();
  const float* lse_p = lse.data_ptr<float>();
  const float* zh[2] = {z1.data_ptr<float>(), z2.data_ptr<float>()};
  // fp32 inputs accumulate straight into the returned gradients
  at::Tensor acc1 = at::zeros({n, d}, z1.options()), acc2 = at::zeros({n, d}, z2.options());
  float* acch[2] = {acc1.data_ptr<float>(), acc2.data_ptr<float>()};

  std::vector<float> r(rows);
  inverse_norms(zh[0], n, d, r.data());
  inverse_norms(zh[1], n, d, r.data() + n);
  const double shift = fixed_shift(scale, 1.0);
  const bool fixed = shift >= 0.0;
  const float c = static_cast<float>(shift);

  const int64_t bs = block_rows(n);
  std::vector<Block> blocks;
  append_blocks(blocks, zh[0], acch[0], n, d, bs, 0);
  append_blocks(blocks, zh[1], acch[1], n, d, bs, n);
  const Rounds rounds = symmetric_rounds(static_cast<int32_t>(blocks.size()));
  std::vector<Scratch> scratch = make_scratch(bs, d);
  const int32_t half_blocks = static_cast<int32_t>(blocks.size() / 2);

  // Fallback: Z_i = sum_j exp(S_ij - lse_i), see lse_normalisers.
  std::vector<double> norm(rows, 1.0);
  if (!fixed) {
    std::vector<float> shift(lse_p, lse_p + rows), pos_logit(rows);
    Side ns;
    ns.r = r.data();
    ns.sum = norm.data();
    ns.max = shift.data();
    ns.pos = pos_logit.data();
    std::fill(norm.begin(), norm.end(), 0.0);
    walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
      const TileArgs t{&blocks[tile.first], &blocks[tile.second], &ns, &ns, tile.first == tile.second,
                       tile.second == tile.first + half_blocks};
      t.diag ? sum_tile<false, false>(t, s, c, d, w) : sum_tile<false, true>(t, s, c, d, w);
    });
    lse_normalisers(norm, pos_logit, lse_p);
  }
  std::vector<float> coef(rows);  // a_i = g_i / l_i = g_i exp(c - lse_i), or g_i / Z_i for the fallback
  for (int64_t i = 0; i < rows; ++i) coef[i] = fixed ? g[i] * std::exp(c - lse_p[i]) : g[i] / norm[i];

  std::vector<float> pos_dot(rows);
  std::vector<double> neg_sum(rows, 0.0);
  Side side;
  side.r = r.data();
  side.sum = neg_sum.data();
  side.lse = lse_p;
  side.coef = coef.data();
  side.pos = pos_dot.data();
  std::vector<double> dscale_block(blocks.size(), 0.0);  // by the tile's row block: one writer per round
  walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
    const TileArgs t{&blocks[tile.first], &blocks[tile.second], &side, &side, tile.first == tile.second,
                     tile.second == tile.first + half_blocks};
    double part;
    if (fixed) {
      part = t.diag ? grad_tile<true, true, false>(t, s, c, d, w) : grad_tile<true, true, true>(t, s, c, d, w);
    } else {
      part = t.diag ? grad_tile<false, true, false>(t, s, c, d, w) : grad_tile<false, true, true>(t, s, c, d, w);
    }
    dscale_block[tile.first] += part;
  });

  // Positive pairs (i, p): the weight of S_ip = S_pi is g_i (P_ip - 1) + g_p (P_pi - 1)
  // = -(g_i neg_i + g_p neg_p), neg_i = sum_{j != p, i} P_ij (the tiles' sums). So
  // acc_i += w r_i r_p z_p; dscale += g_i (P_ip - 1) S_ip / s per row.
  std::vector<double> neg_prob(rows);
  for (int64_t i = 0; i < rows; ++i) neg_prob[i] = (fixed ? std::exp(static_cast<double>(c) - lse_p[i]) : 1.0 / norm[i]) * neg_sum[i];
  std::vector<double> dscale_row(rows);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = (i + n) % rows;
      const float* zp = zh[p / n] + (p % n) * d;
      const float rr = r[i] * r[p];
      const double weight = -(g[i] * neg_prob[i] + g[p] * neg_prob[p]);
      axpy_row(acch[i / n] + (i % n) * d, zp, static_cast<float>(-weight * rr), d);
      dscale_row[i] = -static_cast<double>(g[i]) * neg_prob[i] * rr * pos_dot[i];
    }
  });
  finish_rows(zh[0], acch[0], n, d, s, true);
  finish_rows(zh[1], acch[1], n, d, s, true);
  unscale_gradient(acch[0], exps1, d);
  unscale_gradient(acch[1], exps2, d);

  at::Tensor dscale = at::scalar_tensor(ordered_sum(dscale_block) + ordered_sum(dscale_row), at::kFloat);
  if (fp32_in) return {acc1, acc2, dscale};
  return {acc1.to(z1_in.scalar_type()), acc2.to(z2_in.scalar_type()), dscale};
}

// ---- info_nce / clip (cross) ---------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                     double scale, bool both, bool normalize) {
  const int64_t n = q_in.size(0), d = q_in.size(1);
  const float s = static_cast<float>(scale);
  std::vector<int> exps_q, exps_k;
  const at::Tensor q = kernel_rows(q_in, normalize, exps_q), k = kernel_rows(k_in, normalize, exps_k);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  std::vector<float> rq(n), rk(n);
  double norm_bound = 1.0;  // |S_ij| <= s * norm_bound
  if (normalize) {
    inverse_norms(qp, n, d, rq.data());
    inverse_norms(kp, n, d, rk.data());
  } else {
    norm_bound = unit_inverse_norms(qp, n, d, rq.data()) * unit_inverse_norms(kp, n, d, rk.data());
  }

  const int64_t bs = block_rows(n);
  std::vector<Block> qb, kb;
  append_blocks(qb, qp, nullptr, n, d, bs, 0);
  append_blocks(kb, kp, nullptr, n, d, bs, 0);
  const Rounds rounds = latin_rounds(static_cast<int32_t>(qb.size()));
  std::vector<Scratch> scratch = make_scratch(bs, d);

  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<double> row_sum(n, 0.0), col_sum(both ? n : 0, 0.0);
  std::vector<float> row_max(n, neg_inf), col_max(both ? n : 0, neg_inf);
  std::vector<float> pos(n);
  Side qs, ks;
  qs.r = rq.data();
  qs.sum = row_sum.data();
  qs.max = row_max.data();
  qs.pos = pos.data();
  ks.r = rk.data();
  ks.sum = col_sum.data();
  ks.max = col_max.data();
  ks.pos = pos.data();
  const double shift = fixed_shift(scale, norm_bound);
  const bool fixed = shift >= 0.0;
  const float c = static_cast<float>(shift);
  auto args = [&](const Tile& tile) {
    return TileArgs{&qb[tile.first], &kb[tile.second], &qs, &ks, false, tile.first == tile.second};
  };
  if (!fixed) {
    walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
      both ? max_tile<true>(args(tile), s, d, w) : max_tile<false>(args(tile), s, d, w);
    });
  }
  walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
    const TileArgs t = args(tile);
    if (fixed) {
      both ? sum_tile<true, true>(t, s, c, d, w) : sum_tile<true, false>(t, s, c, d, w);
    } else {
      both ? sum_tile<false, true>(t, s, c, d, w) : sum_tile<false, false>(t, s, c, d, w);
    }
  });

  at::Tensor row_loss = fp32_tensor(n), row_lse = fp32_tensor(n);
  at::Tensor col_loss = fp32_tensor(both ? n : 0), col_lse = fp32_tensor(both ? n : 0);
  float* row_loss_p = row_loss.data_ptr<float>();
  float* row_lse_p = row_lse.data_ptr<float>();
  float* col_loss_p = both ? col_loss.data_ptr<float>() : nullptr;
  float* col_lse_p = both ? col_lse.data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    row_loss_lse(fixed ? shift : static_cast<double>(row_max[i]), row_sum[i], pos[i], row_loss_p + i, row_lse_p + i);
    if (both) {
      row_loss_lse(fixed ? shift : static_cast<double>(col_max[i]), col_sum[i], pos[i], col_loss_p + i, col_lse_p + i);
    }
  }
  return {row_loss, col_loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd(const at::Tensor& grad_row_in,
                                                         const at::Tensor& grad_col_in, const at::Tensor& q_in,
                                                         const at::Tensor& k_in, double scale,
                                                         const at::Tensor& row_lse_in,
                                                         const at::Tensor& col_lse_in, bool both, bool normalize) {
  const int64_t n = q_in.size(0), d = q_in.size(1);
  const float s = static_cast<float>(scale);
  const bool fp32_in = q_in.scalar_type() == at::kFloat;
  std::vector<int> exps_q, exps_k;
  const at::Tensor q = kernel_rows(q_in, normalize, exps_q), k = kernel_rows(k_in, normalize, exps_k);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const at::Tensor grad_row = grad_row_in.contiguous(), row_lse = row_lse_in.contiguous();
  const at::Tensor grad_col = both ? grad_col_in.contiguous() : at::zeros({n}, grad_row.options());
  const at::Tensor col_lse = both ? col_lse_in.contiguous() : at::zeros({n}, grad_row.options());
  const float* gr = grad_row.data_ptr<float>();
  const float* gc = grad_col.data_ptr<float>();
  const float* lr = row_lse.data_ptr<float>();
  const float* lc = col_lse.data_ptr<float>();
  at::Tensor dq = at::zeros({n, d}, q.options()), dk = at::zeros({n, d}, k.options());
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();

  std::vector<float> rq(n), rk(n);
  double norm_bound = 1.0;
  if (normalize) {
    inverse_norms(qp, n, d, rq.data());
    inverse_norms(kp, n, d, rk.data());
  } else {
    norm_bound = unit_inverse_norms(qp, n, d, rq.data()) * unit_inverse_norms(kp, n, d, rk.data());
  }
  const double shift = fixed_shift(scale, norm_bound);
  const bool fixed = shift >= 0.0;
  const float c = static_cast<float>(shift);

  const int64_t bs = block_rows(n);
  std::vector<Block> qb, kb;
  append_blocks(qb, qp, dqp, n, d, bs, 0);
  append_blocks(kb, kp, dkp, n, d, bs, 0);
  const Rounds rounds = latin_rounds(static_cast<int32_t>(qb.size()));
  std::vector<Scratch> scratch = make_scratch(bs, d);

  // Fallback: Z_i = sum_j exp(S_ij - lse_i) by row and by column, see lse_normalisers.
  std::vector<double> norm_r(n, 1.0), norm_c(n, 1.0);
  if (!fixed) {
    std::vector<float> shift_r(lr, lr + n), shift_c(lc, lc + n), pos_logit(n);
    Side nq, nk;
    nq.r = rq.data();
    nq.sum = norm_r.data();
    nq.max = shift_r.data();
    nq.pos = pos_logit.data();
    nk.r = rk.data();
    nk.sum = norm_c.data();
    nk.max = shift_c.data();
    nk.pos = pos_logit.data();
    std::fill(norm_r.begin(), norm_r.end(), 0.0);
    std::fill(norm_c.begin(), norm_c.end(), 0.0);
    walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
      const TileArgs t{&qb[tile.first], &kb[tile.second], &nq, &nk, false, tile.first == tile.second};
      both ? sum_tile<false, true>(t, s, c, d, w) : sum_tile<false, false>(t, s, c, d, w);
    });
    lse_normalisers(norm_r, pos_logit, lr);
    if (both) {
      lse_normalisers(norm_c, pos_logit, lc);
    } else {
      std::fill(norm_c.begin(), norm_c.end(), 1.0);
    }
  }
  std::vector<float> coef_r(n), coef_c(n);  // gr_i / lr_i, gc_j / lc_j (fallback: gr / Z, gc / Z)
  for (int64_t i = 0; i < n; ++i) {
    coef_r[i] = fixed ? gr[i] * std::exp(c - lr[i]) : gr[i] / norm_r[i];
    coef_c[i] = !both ? 0.f : fixed ? gc[i] * std::exp(c - lc[i]) : gc[i] / norm_c[i];
  }

  std::vector<float> pos_dot(n);
  std::vector<double> row_neg(n, 0.0), col_neg(n, 0.0);
  Side qs, ks;
  qs.r = rq.data();
  qs.sum = row_neg.data();
  qs.lse = lr;
  qs.coef = coef_r.data();
  qs.pos = pos_dot.data();
  ks.r = rk.data();
  ks.sum = col_neg.data();
  ks.lse = lc;
  ks.coef = coef_c.data();
  ks.pos = pos_dot.data();
  std::vector<double> dscale_block(qb.size(), 0.0);
  walk(rounds, scratch, [&](const Tile& tile, Scratch& w) {
    const TileArgs t{&qb[tile.first], &kb[tile.second], &qs, &ks, false, tile.first == tile.second};
    double part;
    if (fixed) {
      part = grad_tile<true, true, true>(t, s, c, d, w);  // coef_c is 0 when !both
    } else {
      part = both ? grad_tile<false, true, true>(t, s, c, d, w) : grad_tile<false, false, true>(t, s, c, d, w);
    }
    dscale_block[tile.first] += part;
  });

  // Positives on the diagonal: weight w_i = gr_i (P_ii - 1) + gc_i (P^col_ii - 1)
  // = -(gr_i neg_row_i + gc_i neg_col_i); du_i += w_i r r v_i, dv_i += w_i r r u_i (acc scale).
  std::vector<double> dscale_row(n);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double neg_r = (fixed ? std::exp(static_cast<double>(c) - lr[i]) : 1.0 / norm_r[i]) * row_neg[i];
      const double neg_c = both ? (fixed ? std::exp(static_cast<double>(c) - lc[i]) : 1.0 / norm_c[i]) * col_neg[i] : 0.0;
      const double weight = -(gr[i] * neg_r + gc[i] * neg_c);
      const float rr = rq[i] * rk[i];
      axpy_row(dqp + i * d, kp + i * d, static_cast<float>(-weight * rr), d);
      axpy_row(dkp + i * d, qp + i * d, static_cast<float>(-weight * rr), d);
      dscale_row[i] = weight * rr * pos_dot[i];
    }
  });
  finish_rows(qp, dqp, n, d, s, normalize);
  finish_rows(kp, dkp, n, d, s, normalize);
  unscale_gradient(dqp, exps_q, d);
  unscale_gradient(dkp, exps_k, d);

  at::Tensor dscale = at::scalar_tensor(ordered_sum(dscale_block) + ordered_sum(dscale_row), at::kFloat);
  if (fp32_in) return {dq, dk, dscale};
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dscale};
}

}  // namespace cl_fast::cpu

// ---- registration: the cl_fast_C InfoNCE ops on CPU tensors (schemas and checks: csrc/ops.cpp) ----
namespace cl_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> ntxent_fwd_cpu(const at::Tensor& z1, const at::Tensor& z2,
                                                  const at::Tensor& scale) {
  check_ntxent_fwd(z1, z2, scale);
  return cpu::ntxent_fwd(z1, z2, cpu_scalar(scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_bwd_cpu(const at::Tensor& grad, const at::Tensor& z1,
                                                              const at::Tensor& z2, const at::Tensor& scale,
                                                              const at::Tensor& lse) {
  check_ntxent_bwd(grad, z1, z2, scale, lse);
  return cpu::ntxent_bwd(grad, z1, z2, cpu_scalar(scale), lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& scale, bool both,
                                                                         bool normalize) {
  check_cross_fwd(q, k, scale, both, normalize);
  return cpu::cross_fwd(q, k, cpu_scalar(scale), both, normalize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_bwd_cpu(const at::Tensor& grad_row, const at::Tensor& grad_col,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& scale, const at::Tensor& row_lse,
                                                             const at::Tensor& col_lse, bool both, bool normalize) {
  check_cross_bwd(grad_row, grad_col, q, k, scale, row_lse, col_lse, both, normalize);
  return cpu::cross_bwd(grad_row, grad_col, q, k, cpu_scalar(scale), row_lse, col_lse, both, normalize);
}

}  // namespace
}  // namespace cl_fast

TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("ntxent_fwd", &cl_fast::ntxent_fwd_cpu);
  m.impl("ntxent_bwd", &cl_fast::ntxent_bwd_cpu);
  m.impl("cross_fwd", &cl_fast::cross_fwd_cpu);
  m.impl("cross_bwd", &cl_fast::cross_bwd_cpu);
}
