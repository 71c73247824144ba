// SwAV's Sinkhorn-Knopp assignment on CPU, in the log domain, without a (B, K) intermediate.
//
// x = scores / eps (B x K, fp32). SwAV's iterations keep Q[k, b] = exp(x_bk + f_k + g_b) up to
// constants (which cancel in the final row normalisation), with the scaling vectors
//   prototype step  f_k = -lse_b (x_bk + g_b)     (g = 0 before the first step)
//   sample step     g_b = -lse_k (x_bk + f_k)
// and the output is the last sample step written out: out[b, :] = softmax_k(x_b + f).
// Only f (K) and g (B) are kept between passes; every pass re-reads `scores` and recomputes its exps.
//
// Passes of the fused op (`sinkhorn`, T iterations, T + 1 reads of scores):
//   1. column pass (g = 0): f = -lse_b x_bk. Rows go in chunks of kChunkRows (the parallel unit;
//      fixed, so the result does not depend on the thread count); each chunk keeps a running
//      per-column (max, sum exp(. - max)) and folds kBlockRows rows at a time: one exact max,
//      one rescale per block, one exp per entry. Chunk partials are merged per column.
//   2. T - 1 fused passes: row b's sample step gives e_bk = exp(y_bk - c_b), y = x + f,
//      s_b = sum_k e_bk, i.e. P_bk = e_bk / s_b, and the next prototype step needs only its
//      column sums: lse_b (x_bk + g_b) = log sum_b P_bk - f_k, so f_k -= log sum_b P_bk.
//      The shift c_b is not the row max (that would be a second sweep) but the upper bound
//      -g_b from the previous pass (see sample_step_bounded, which falls back to the max).
//      One exp per entry, and no max over the column is needed: after a prototype step every
//      column of Q holds mass 1/K and every row at most 1 (the total is 1), so P_bk >= Q_bk and
//      sum_b P_bk >= 1/K; the entries carrying that mass are >= 1/(B K), far above FLT_MIN. The
//      entries that underflow (P < FLT_MIN, flushed to 0) change the column sum by < B e^-87
//      relative to >= 1/K: the sums, hence f, keep fp32 accuracy for any finite scores.
//   3. assign pass: out[b, :] = softmax_k(x_b + f), one exp per entry, straight into `out`,
//      shifted by the same bound.
// Within a row the sweeps run over a K-float buffer that stays in L1/L2.
//
// Precision at large |scores / eps|. x = s inv_eps is never rounded on its own: rounding x (or
// a potential f_k of the same size) to fp32 costs an absolute error ~|x| 2^-24 in every exp
// argument (1e-3 at |x| = 2e4), although the arguments that matter are small. So
//   - f is kept in double and split f = f_hi + f_lo (two floats); y = x + f is formed as
//     fma(s, inv_eps, f_hi) + f_lo: the product enters the fma exactly and only the small
//     result is rounded;
//   - pass 1 takes the column max in SCORE units (M_k = max_b s_bk; the max of x is inv_eps M_k
//     since inv_eps > 0) and the exp arguments as fma(s, inv_eps, -m_hi) - m_lo with
//     m = inv_eps M_k split likewise (m_lo = fma(M_k, inv_eps, -m_hi) exactly);
//   - f_k = -(inv_eps M_k + log sum) and the later f_k -= log sum_b P_bk are in double.
// The error is then that of fp32 exps of small arguments and fp32 sums, at any |scores / eps|.
// exps are cpu_vec.h's exp_fast: 0 below ln(FLT_MIN) for any argument, however negative (ATen's
// exp_u20 returned garbage past ~-1e8, which made |scores / eps| > ~6e8 NaN).
//
// Non-finite input: a row or column whose max is NaN or +inf comes out NaN (decided from the
// maxima).
//
// The distributed path (cl_fast/swav.py) runs `sinkhorn_col_lse` (pass 1 with g from f, local
// rows only) and all-reduces its (max, sum) before each prototype step, then `sinkhorn_assign`.
#include "cpu_vec.h"
#include "../ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace cl_fast::cpu {
namespace {

constexpr int64_t kChunkRows = 128;  // rows per parallel chunk (and per column partial)
constexpr int64_t kBlockRows = 16;   // rows whose column maxima are taken together in pass 1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The shift for exp(v - shift): the max, or 0 where nothing was seen yet (max = -inf), so that
// exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
inline Vec finite_shift(const Vec& m) { return Vec::blendv(m, Vec(0.f), m == Vec(kNegInf)); }
inline float finite_shift(float m) { return m == kNegInf ? 0.f : m; }

// fp16 -> fp32 with the F16C instructions (every AVX2 CPU has them). Compiled for that target
// here: the extension is built with -mavx2 -mfma only, and c10::Half's own conversion then does
// not compile in an AVX2 translation unit (ATen's AVX2 path calls _cvtsh_ss).
// Other targets (ARM, ...): c10's portable software conversion.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
void half_to_float_portable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = c10::detail::fp16_ieee_to_fp32_value(src[k]);
}

__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
  for (; k < n; ++k) dst[k] = _cvtsh_ss(src[k]);
}

// An x86-64 build without -mavx2 (or one run on a CPU without F16C) takes the portable path.
void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  static const bool has_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  has_f16c ? half_to_float_f16c(src, dst, n) : half_to_float_portable(src, dst, n);
}
#else
void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = c10::detail::fp16_ieee_to_fp32_value(src[k]);
}
#endif

// bf16 -> fp32: the bf16 bits are the top half of the fp32 bits.
void bfloat16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
    std::memcpy(dst + k, &bits, sizeof(float));
  }
}

// Row b of the scores as fp32: the row itself for fp32, else converted into `buffer`.
template <typename scalar_t>
const float* row_as_float(const scalar_t* src, int64_t K, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    half_to_float(reinterpret_cast<const uint16_t*>(src), buffer, K);
  } else {
    static_assert(std::is_same_v<scalar_t, at::BFloat16>);
    bfloat16_to_float(reinterpret_cast<const uint16_t*>(src), buffer, K);
  }
  return buffer;
}

// y = x + f with x = s * inv_eps, f = f_hi + f_lo (f_hi null: y = x, f_lo null: 0), formed as
// fma(s, inv_eps, f_hi) + f_lo (see the precision note above); returns max_k y (NaN if any is NaN).
inline Vec logits(const float* s, const Vec& scale, const float* f_hi, const float* f_lo, int64_t k, int64_t n) {
  if (f_hi == nullptr) return load(s + k, n) * scale;
  const Vec v = fma_exact(load(s + k, n), scale, load(f_hi + k, n));
  return f_lo != nullptr ? v + load(f_lo + k, n) : v;
}

float logits_and_max(const float* s, float inv_eps, const float* f, const float* f_lo, int64_t K, float* y) {
  const Vec scale(inv_eps);
  Vec vmax(kNegInf);
  for (int64_t k = 0; k < K; k += kVec) {
    const int64_t n = std::min(kVec, K - k);
    const Vec v = logits(s, scale, f, f_lo, k, n);
    store(v, y + k, n);
    vmax = at::vec::maximum(vmax, n == kVec ? v : Vec::set(Vec(kNegInf), v, n));
  }
  return hmax(vmax);
}

// Sample step of one row, in place on y (= x + f on entry, from logits_and_max with its max m):
// y_k <- exp(y_k - m), returns their sum. A row whose max is NaN or +inf becomes NaN.
float exp_row(float* y, float m, int64_t K) {
  if (std::isnan(m) || m == std::numeric_limits<float>::infinity()) {
    std::fill(y, y + K, kNaN);
    return kNaN;
  }
  const Vec shift(finite_shift(m));
  Vec acc(0.f);
  for (int64_t k = 0; k < K; k += kVec) {
    const int64_t n = std::min(kVec, K - k);
    Vec e = exp_fast(load(y + k, n) - shift);
    if (n < kVec) e = Vec::set(Vec(0.f), e, n);
    store(e, y + k, n);
    acc = acc + e;
  }
  return hsum(acc);
}

// exp(scale v - m) for m = scale M given as the float pair (m_hi, m_lo): fma(v, scale, -m_hi) - m_lo.
inline Vec exp_scaled_minus(const Vec& v, const Vec& scale, const Vec& m_hi, const Vec& m_lo) {
  return exp_fast(fma_exact(v, scale, Vec(0.f) - m_hi) - m_lo);
}

// m = scale M as a float pair: m_hi = fl(scale M), m_lo = scale M - m_hi (exact: one fma).
inline void split_product(const Vec& M, const Vec& scale, Vec* m_hi, Vec* m_lo) {
  *m_hi = M * scale;
  *m_lo = fma_exact(M, scale, Vec(0.f) - *m_hi);
}

// Folds the rows z[0..nrows) (each K long, stride K) into the running column (max, sum) of
// scale * z: the max is kept in z's units (scale > 0 preserves the order), the sum is
// sum_b exp(scale z_bk - scale max_k). scale = inv_eps with z = the raw scores (pass 1, g = 0),
// or 1 with z = x + g (the distributed column pass).
void fold_rows_into_columns(const float* z, int64_t nrows, int64_t K, float scale_value, float* col_max,
                            float* col_sum) {
  const Vec scale(scale_value);
  for (int64_t k = 0; k < K; k += kVec) {
    const int64_t n = std::min(kVec, K - k);
    Vec block_max = load(z + k, n);
    for (int64_t r = 1; r < nrows; ++r) block_max = at::vec::maximum(block_max, load(z + r * K + k, n));
    const Vec old_max = load(col_max + k, n);
    const Vec new_max = at::vec::maximum(old_max, block_max);
    Vec m_hi, m_lo;
    split_product(finite_shift(new_max), scale, &m_hi, &m_lo);
    Vec sum = load(col_sum + k, n) * exp_scaled_minus(old_max, scale, m_hi, m_lo);
    for (int64_t r = 0; r < nrows; ++r) sum = sum + exp_scaled_minus(load(z + r * K + k, n), scale, m_hi, m_lo);
    store(new_max, col_max + k, n);
    store(sum, col_sum + k, n);
  }
}

int64_t num_chunks(int64_t B) { return (B + kChunkRows - 1) / kChunkRows; }

// Runs body(scratch, c) for every chunk c in [0, n) on the intra-op threads. Chunks are claimed
// one at a time from a shared counter rather than split statically, so a thread that is
// descheduled (a loaded machine) or slower delays one chunk, not a 1/T share of the pass. Each
// chunk writes only its own outputs, so the result does not depend on who ran it.
// make_scratch() gives each thread its row buffers.
template <typename MakeScratch, typename Body>
void for_each_chunk(int64_t n, const MakeScratch& make_scratch, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      auto scratch = make_scratch();
      for (int64_t c = next++; c < n; c = next++) body(scratch, c);
    }
  });
}

// Merges chunk partials (nchunks x K each, maxima in the units of fold_rows_into_columns' z)
// into one (max, sum) per column. A column whose max is NaN or +inf gets max NaN (its sum is
// meaningless then).
void merge_column_partials(const float* part_max, const float* part_sum, int64_t nchunks, int64_t K,
                           float scale_value, float* col_max, float* col_sum) {
  const Vec pos_inf(std::numeric_limits<float>::infinity());
  const Vec scale(scale_value);
  for (int64_t k = 0; k < K; k += kVec) {
    const int64_t n = std::min(kVec, K - k);
    Vec m(kNegInf);
    for (int64_t c = 0; c < nchunks; ++c) m = at::vec::maximum(m, load(part_max + c * K + k, n));
    Vec m_hi, m_lo;
    split_product(finite_shift(m), scale, &m_hi, &m_lo);
    Vec s(0.f);
    for (int64_t c = 0; c < nchunks; ++c) {
      s = s + load(part_sum + c * K + k, n) * exp_scaled_minus(load(part_max + c * K + k, n), scale, m_hi, m_lo);
    }
    m = Vec::blendv(m, Vec(kNaN), (m != m) | (m == pos_inf));
    store(m, col_max + k, n);
    store(s, col_sum + k, n);
  }
}

// Pass 1: per column, (max, sum exp(x_bk + g_b - max)) over the rows of scores, with
// g_b = -lse_k (x_bk + f_k) when f is given, else g = 0. The max is in SCORE units when f is null
// (max = inv_eps col_max exactly, see the precision note), in x units otherwise.
template <typename scalar_t>
void column_lse_pass(const scalar_t* scores, int64_t B, int64_t K, float inv_eps, const float* f,
                     float* col_max, float* col_sum) {
  const int64_t nchunks = num_chunks(B);
  std::vector<float> part_max(nchunks * K, kNegInf), part_sum(nchunks * K, 0.f);
  const float fold_scale = f == nullptr ? inv_eps : 1.f;
  struct Scratch {
    std::vector<float> block, row, convert;
  };
  const auto make_scratch = [K] { return Scratch{std::vector<float>(kBlockRows * K), std::vector<float>(K), std::vector<float>(K)}; };
  for_each_chunk(nchunks, make_scratch, [&](Scratch& scratch, int64_t c) {
    const int64_t row_end = std::min(B, (c + 1) * kChunkRows);
    for (int64_t r0 = c * kChunkRows; r0 < row_end; r0 += kBlockRows) {
      const int64_t nrows = std::min(kBlockRows, row_end - r0);
      for (int64_t r = 0; r < nrows; ++r) {
        const float* s = row_as_float(scores + (r0 + r) * K, K, scratch.convert.data());
        float* z = scratch.block.data() + r * K;
        if (f == nullptr) {  // z = the scores themselves
          std::copy(s, s + K, z);
        } else {  // z = x + g
          logits_and_max(s, inv_eps, nullptr, nullptr, K, z);
          float* y = scratch.row.data();
          const float m = logits_and_max(s, inv_eps, f, nullptr, K, y);
          const Vec g(-(finite_shift(m) + std::log(exp_row(y, m, K))));
          at::vec::map([g](Vec v) { return v + g; }, z, z, K);
        }
      }
      fold_rows_into_columns(scratch.block.data(), nrows, K, fold_scale, part_max.data() + c * K,
                             part_sum.data() + c * K);
    }
  });
  merge_column_partials(part_max.data(), part_sum.data(), nchunks, K, fold_scale, col_max, col_sum);
}

// The sample step of row b in ONE sweep, given an upper bound `shift` of y = x + f: the previous
// pass's -g_b (f_k = -lse_b' (x_b'k + g_b') <= -(x_bk + g_b), so y_bk <= -g_b). Writes
// e_k = exp(y_k - shift), returns g_b = -lse_k y_k and *row_sum = sum_k e_k. The bound is close
// for all but rows far from every prototype's mass; where it is not (the sum below e^-40, some
// e above e^40) or y holds NaN/+inf, the row is redone with its exact max (a second sweep;
// NaN/+inf rows become NaN), so accuracy and finiteness never depend on the bound.
constexpr float kMinBoundedSum = 4.2483542e-18f;  // e^-40
constexpr float kMaxAboveBound = 40.f;

float sample_step_bounded(const float* s, float inv_eps, const float* f, const float* f_lo, int64_t K, float shift,
                          float* e, float* row_sum) {
  const Vec scale(inv_eps), vshift(shift);
  Vec vmax(kNegInf), acc(0.f);
  for (int64_t k = 0; k < K; k += kVec) {
    const int64_t n = std::min(kVec, K - k);
    const Vec y = logits(s, scale, f, f_lo, k, n);
    Vec ek = exp_fast(y - vshift);
    if (n < kVec) ek = Vec::set(Vec(0.f), ek, n);
    store(ek, e + k, n);
    acc = acc + ek;
    vmax = at::vec::maximum(vmax, n == kVec ? y : Vec::set(Vec(kNegInf), y, n));
  }
  float sum = hsum(acc);
  const float m = hmax(vmax);
  if (!(m <= shift + kMaxAboveBound) || !(sum >= kMinBoundedSum)) {  // also true for NaN
    logits_and_max(s, inv_eps, f, f_lo, K, e);
    sum = exp_row(e, m, K);
    shift = finite_shift(m);
  }
  *row_sum = sum;
  return -(shift + std::log(sum));
}

// Pass 2: with f, the sample step of every row: returns the column sums of P, sum_b P_bk, and
// updates g (in: the previous pass's g, bounding this pass's rows; out: this pass's).
template <typename scalar_t>
void fused_sample_pass(const scalar_t* scores, int64_t B, int64_t K, float inv_eps, const float* f,
                       const float* f_lo, float* g, float* col_sum) {
  const int64_t nchunks = num_chunks(B);
  std::vector<float> part_sum(nchunks * K, 0.f);
  const auto make_scratch = [K] { return std::pair{std::vector<float>(K), std::vector<float>(K)}; };
  for_each_chunk(nchunks, make_scratch, [&](auto& scratch, int64_t c) {
    auto& [row, convert] = scratch;
    float* acc = part_sum.data() + c * K;
    for (int64_t b = c * kChunkRows; b < std::min(B, (c + 1) * kChunkRows); ++b) {
      const float* s = row_as_float(scores + b * K, K, convert.data());
      float row_sum;
      g[b] = sample_step_bounded(s, inv_eps, f, f_lo, K, -g[b], row.data(), &row_sum);
      const Vec inv_sum(1.f / row_sum);
      at::vec::map2([inv_sum](Vec a, Vec e) { return at::vec::fmadd(e, inv_sum, a); }, acc, acc, row.data(), K);
    }
  });
  for (int64_t k = 0; k < K; k += kVec) {
    const int64_t n = std::min(kVec, K - k);
    Vec total(0.f);
    for (int64_t c = 0; c < nchunks; ++c) total = total + load(part_sum.data() + c * K + k, n);
    store(total, col_sum + k, n);
  }
}

// Pass 3: out[b, :] = softmax_k(x_b + f), with g bounding the rows as in pass 2 (g = nullptr:
// no bound known, exact row max).
template <typename scalar_t>
void assign_pass(const scalar_t* scores, int64_t B, int64_t K, float inv_eps, const float* f, const float* f_lo,
                 const float* g, float* out) {
  constexpr int64_t kAssignRows = 16;
  const auto make_scratch = [K] { return std::vector<float>(K); };
  for_each_chunk((B + kAssignRows - 1) / kAssignRows, make_scratch, [&](std::vector<float>& convert, int64_t c) {
    for (int64_t b = c * kAssignRows; b < std::min(B, (c + 1) * kAssignRows); ++b) {
      float* y = out + b * K;
      const float* s = row_as_float(scores + b * K, K, convert.data());
      float row_sum;
      if (g != nullptr) {
        sample_step_bounded(s, inv_eps, f, f_lo, K, -g[b], y, &row_sum);
      } else {
        row_sum = exp_row(y, logits_and_max(s, inv_eps, f, f_lo, K, y), K);
      }
      const Vec inv_sum(1.f / row_sum);
      at::vec::map([inv_sum](Vec e) { return e * inv_sum; }, y, y, K);
    }
  });
}

// f (double) -> the float pair f_hi + f_lo the passes read.
void split_potential(const std::vector<double>& f, std::vector<float>& f_hi, std::vector<float>& f_lo) {
  for (size_t k = 0; k < f.size(); ++k) {
    f_hi[k] = static_cast<float>(f[k]);
    f_lo[k] = std::isfinite(f_hi[k]) ? static_cast<float>(f[k] - f_hi[k]) : 0.f;
  }
}

template <typename scalar_t>
void sinkhorn_impl(const scalar_t* scores, int64_t B, int64_t K, float inv_eps, int64_t iterations, float* out) {
  std::vector<float> col_max(K), col_sum(K), g(B, 0.f), f_hi(K), f_lo(K);
  std::vector<double> f(K);
  column_lse_pass(scores, B, K, inv_eps, nullptr, col_max.data(), col_sum.data());
  // the prototype step f_k = -lse_b x_bk = -(inv_eps M_k + log sum), M_k in score units: the
  // product of two floats is exact in double
  for (int64_t k = 0; k < K; ++k) {
    f[k] = -(static_cast<double>(finite_shift(col_max[k])) * inv_eps + std::log(static_cast<double>(col_sum[k])));
  }
  split_potential(f, f_hi, f_lo);
  for (int64_t t = 1; t < iterations; ++t) {
    fused_sample_pass(scores, B, K, inv_eps, f_hi.data(), f_lo.data(), g.data(), col_sum.data());
    for (int64_t k = 0; k < K; ++k) f[k] -= std::log(static_cast<double>(col_sum[k]));  // >= 1/K: no underflow
    split_potential(f, f_hi, f_lo);
  }
  assign_pass(scores, B, K, inv_eps, f_hi.data(), f_lo.data(), g.data(), out);
}

// The (B, K) output is first touched by the assign pass. No MADV_HUGEPAGE on it: with THP defrag
// set to "madvise" (common, and so here) a huge-page fault compacts memory synchronously, which
// made single calls swing between 22 and 100 ms here; 4 KiB faults cost a steady ~12 ms for 49 MB.
at::Tensor new_output(const at::Tensor& scores) {
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kFloat));
  return out;
}

// float, Half, BFloat16 (float64 goes to the PyTorch reference).
#define DISPATCH_SCORES(dtype, name, ...)                                          \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }           \
      case at::kHalf: { using scalar_t = at::Half; return __VA_ARGS__(); }         \
      case at::kBFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);            \
    }                                                                              \
  }()

at::Tensor sinkhorn_cpu(const at::Tensor& scores_in, double inv_eps, int64_t iterations) {
  check_sinkhorn(scores_in, inv_eps, iterations);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor out = new_output(scores);
  DISPATCH_SCORES(scores.scalar_type(), "sinkhorn_cpu", [&] {
    sinkhorn_impl(scores.const_data_ptr<scalar_t>(), B, K, static_cast<float>(inv_eps), iterations,
                  out.mutable_data_ptr<float>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_col_lse_cpu(const at::Tensor& scores_in, double inv_eps,
                                                         const std::optional<at::Tensor>& f_in) {
  check_sinkhorn_col_lse(scores_in, inv_eps, f_in);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor f;
  if (f_in.has_value()) f = f_in->contiguous();
  const auto options = scores.options().dtype(at::kFloat);
  at::Tensor col_max = at::empty({K}, options), col_sum = at::empty({K}, options);
  DISPATCH_SCORES(scores.scalar_type(), "sinkhorn_col_lse_cpu", [&] {
    column_lse_pass(scores.const_data_ptr<scalar_t>(), B, K, static_cast<float>(inv_eps),
                    f.defined() ? f.const_data_ptr<float>() : nullptr, col_max.mutable_data_ptr<float>(),
                    col_sum.mutable_data_ptr<float>());
  });
  if (!f.defined()) col_max.mul_(static_cast<float>(inv_eps));  // score units -> x units (fp32)
  return {col_max, col_sum};
}

at::Tensor sinkhorn_assign_cpu(const at::Tensor& scores_in, double inv_eps, const at::Tensor& f_in) {
  check_sinkhorn_assign(scores_in, inv_eps, f_in);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  const at::Tensor f = f_in.contiguous();
  at::Tensor out = new_output(scores);
  DISPATCH_SCORES(scores.scalar_type(), "sinkhorn_assign_cpu", [&] {
    assign_pass(scores.const_data_ptr<scalar_t>(), B, K, static_cast<float>(inv_eps), f.const_data_ptr<float>(),
                nullptr, nullptr, out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace
}  // namespace cl_fast::cpu

// Registration: the cl_fast_C Sinkhorn ops on CPU tensors (schemas and checks: csrc/ops.cpp).
TORCH_LIBRARY_IMPL(cl_fast_C, CPU, m) {
  m.impl("sinkhorn", &cl_fast::cpu::sinkhorn_cpu);
  m.impl("sinkhorn_col_lse", &cl_fast::cpu::sinkhorn_col_lse_cpu);
  m.impl("sinkhorn_assign", &cl_fast::cpu::sinkhorn_assign_cpu);
}
