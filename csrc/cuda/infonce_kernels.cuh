#pragma once
// The InfoNCE CUDA kernels: nt_xent and the cross losses (info_nce / clip_loss), forward and
// backward, row-stationary and free of atomics. Math in DESIGN.md ("CUDA kernels"); in short:
//
// Stacked rows X (2n rows; see infonce_kernels.h), u_R = r_R x_R with r_R = 1/max(||x_R||, eps)
// (r = 1 when normalize=False), S_RC = s u_R . u_C over the columns C of row R (nt_xent: all
// rows but R; cross: the other half), positive p(R) = R +- n.
// Shift: c = s when rows are normalised and 2s <= 80 (|S| <= s, so every exp(S - c) lies in
// [e^-80, 1]: one exp per entry, no max); otherwise a running max. Decided on the device from
// *scale, the same way in the forward and the backward.
//
// CTA = 64 rows: 32 rows of the first half (warps 0, 1) and their 32 partners (warps 2, 3), so the
// positive pair of every row lives in one CTA. Column tiles of 64 are streamed; for each tile the
// S tile is a tensor-core product over D in chunks of 128 bytes, double-buffered with cp.async.
//
// Forward: per row, neg_R = sum over negatives of exp(S - m) (m = c or the running max) and the
// positive logit; loss_R = softplus(m + log neg_R - S_pos) = log1p(neg/pos) (never negative, full
// relative precision when saturated), lse_R = S_pos + loss_R. Only lse (and loss) are stored.
//
// Backward: G_RC = dL/dS_RC = g_R (P_RC - [C = p(R)]) with P_RC = exp(S_RC - lse_R). For a row R,
// du_R = s sum_C W_RC u_C where W_RC = G_RC + G_CR (both entries share S_RC):
//   negatives: W = g_R P_RC + g_C P_CR  (fixed shift: E = exp(S - c), W = E (a_R + a_C),
//              a = g exp(c - lse); otherwise two exps, both <= 1),
//   positive:  W = -(g_R negP_R + g_p negP_p), negP_R = sum over negatives of P_RC, accumulated
//              in the tile loop (never 1 - P_pos, which cancels) and exchanged with the partner row
//              through shared memory at the end.
// The CTA owns the rows and ALL their columns, so du stays in registers: no scatter, no atomics,
// deterministic. For nt_xent this is the full square (the column sums of a tile are the row sums
// of its mirror); for cross the q rows and the k rows each walk their own columns.
// The output features are split over blockIdx.y in slices of 128 (du is 16 x 128 fp32 per warp);
// S is recomputed per slice.
// Through the normalisation: dz_R = r_R (du_R - u_R c_R) with c_R = u_R . du_R = sum_C W_RC S_RC,
// a per-row scalar formed in the tile loop (so no slice needs the whole du row). It also gives
// the scale gradient: dL/ds = sum_RC G_RC S_RC / s = sum_R c_R / (2 s), summed per CTA and then
// over CTAs in a fixed order.
//
// Numerics: fp16/bf16 S tiles are m16n8k16 MMAs; the W @ V product always runs in bf16 (W spans
// g * P, far below fp16's range; fp16 V tiles are converted while loading fragments). fp32 inputs
// use 3xTF32 (hi*hi + hi*lo + lo*hi) for both products: plain tf32 logits are off by ~5e-4 * s.
#include "common.cuh"
#include "infonce_kernels.h"

#include <cmath>
#include <type_traits>

namespace cl_fast::cuda {

template <typename Element_, bool kCross_, bool kSiglip_ = false>
struct InfonceTraits {
  using Element = Element_;
  static constexpr bool kCross = kCross_;
  static constexpr bool kSiglip = kSiglip_;  // sigmoid loss on raw features (cross layout)
  static_assert(!kSiglip || kCross, "SigLIP runs on the cross layout");
  static constexpr bool kFp32 = std::is_same_v<Element, float>;
  static constexpr int kTiles = kCross ? 2 : 1;  // column tiles in flight (cross: k rows for q, q rows for k)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 64;  // rows per CTA: 2 x kInfonceHalfRows
  static constexpr int kCols = 64;  // columns per tile
  static constexpr int kPerSeg = 16 / sizeof(Element);  // elements per 16-byte copy
  static constexpr int kChunk = 128 / sizeof(Element);  // features per D chunk (128 bytes)
  static constexpr int kChunkStride = kChunk + kPerSeg;  // +16 bytes: conflict-free fragment loads
  static constexpr int kSlice = 128;                     // output features per CTA (backward)
  static constexpr int kSliceStride = kSlice + kPerSeg;
  static constexpr int kMmaK = kFp32 ? 8 : 16;
  static constexpr int kColTiles8 = kCols / 8;    // n8 tiles of an S tile per warp
  static constexpr int kSliceTiles8 = kSlice / 8;  // n8 tiles of a du slice per warp
  static_assert(kRows == 2 * kInfonceHalfRows, "a CTA holds two halves");
  static_assert(kRows == kWarps * 16, "one 16-row MMA slab per warp");

  static constexpr int kChunkElems = kRows * kChunkStride;
  static constexpr size_t fwd_smem_bytes() {
    return sizeof(Element) * (2 * kChunkElems + 2 * kTiles * kChunkElems) +
           sizeof(float) * (2 * kTiles * kCols + kRows);
  }
  static constexpr size_t bwd_smem_bytes() {
    return sizeof(Element) * (2 * kChunkElems + 2 * kTiles * kChunkElems + kTiles * kCols * kSliceStride) +
           sizeof(float) * (5 * kTiles * kCols + 2 * kRows + 2 * kWarps);
  }
};

// Stacked row R -> its features (nullptr when R is out of range).
template <typename Element>
__device__ __forceinline__ const Element* stacked_row(const InfonceProblem& p, int64_t R) {
  if (R < 0 || R >= 2 * p.n) return nullptr;
  const Element* base = static_cast<const Element*>(R < p.n ? p.first : p.second);
  return base + (R < p.n ? R : R - p.n) * p.dim;
}

__device__ __forceinline__ int64_t partner_row(int64_t R, int64_t n) { return R < n ? R + n : R - n; }

// The stacked row of local row lr (0..63) of CTA `block`, or -1 past the end.
__device__ __forceinline__ int64_t cta_row(int block, int lr, int64_t n) {
  const int64_t idx = static_cast<int64_t>(block) * kInfonceHalfRows + (lr % kInfonceHalfRows);
  if (idx >= n) return -1;
  return (lr / kInfonceHalfRows) * n + idx;
}

// First stacked column of half h's column range, and the range's length.
__device__ __forceinline__ int64_t column_base(bool cross, int h, int64_t n) { return cross ? (h == 0 ? n : 0) : 0; }
__device__ __forceinline__ int64_t column_count(bool cross, int64_t n) { return cross ? n : 2 * n; }

// Copies features [d0, d0 + kWidth) of kRowsTile rows into shared memory (row stride `stride`),
// zero-filling rows past the end and features past dim. row_of(i) gives row i's features or
// nullptr. 16-byte cp.async when `vector` (dim a multiple of the vector and 16-byte aligned
// rows), else element-wise loads and stores.
template <typename Traits, int kRowsTile, int kWidth, typename RowOf>
__device__ __forceinline__ void copy_rows(typename Traits::Element* dst, int stride, const RowOf& row_of, int d0,
                                          int dim, bool vector, const void* any_valid) {
  using Element = typename Traits::Element;
  constexpr int kSegs = kWidth / Traits::kPerSeg;
  for (int id = threadIdx.x; id < kRowsTile * kSegs; id += Traits::kThreads) {
    const int row = id / kSegs, seg = id % kSegs;
    const Element* src = row_of(row);
    const int d = d0 + seg * Traits::kPerSeg;
    Element* out = dst + row * stride + seg * Traits::kPerSeg;
    if (vector) {
      const bool ok = src != nullptr && d < dim;
      cp_async_16(out, ok ? static_cast<const void*>(src + d) : any_valid, ok ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < Traits::kPerSeg; ++e) {
        out[e] = (src != nullptr && d + e < dim) ? src[d + e] : from_float<Element>(0.f);
      }
    }
  }
}

// acc[nt][.] += A_slab (16 x kChunk, rows 16*warp.. of a_tile) x B (kCols x kChunk)^T for one chunk.
template <typename Traits>
__device__ __forceinline__ void mma_scores_chunk(float (&acc)[Traits::kColTiles8][4],
                                                 const typename Traits::Element* a_tile,
                                                 const typename Traits::Element* b_tile, int warp, int lane) {
  using Element = typename Traits::Element;
  constexpr int S = Traits::kChunkStride;
  const int g = lane >> 2, t = lane & 3;
  const Element* a_row0 = a_tile + (16 * warp + g) * S;
  const Element* a_row8 = a_row0 + 8 * S;
  const int lr = lane & 7, lg = lane >> 3;  // ldmatrix: row lr of matrix lg
  const Element* a_frag = a_tile + (16 * warp + lr + 8 * (lg & 1)) * S + 8 * (lg >> 1);
  const Element* b_frag = b_tile + (lr + 8 * (lg >> 1)) * S + 8 * (lg & 1);
  static_assert(Traits::kColTiles8 % 2 == 0, "n8 tiles are loaded in pairs");
#pragma unroll
  for (int ks = 0; ks < Traits::kChunk / Traits::kMmaK; ++ks) {
    const int k0 = ks * Traits::kMmaK;
    if constexpr (Traits::kFp32) {
      uint32_t ahi[4], alo[4];
      split_tf32(a_row0[k0 + t], ahi[0], alo[0]);
      split_tf32(a_row8[k0 + t], ahi[1], alo[1]);
      split_tf32(a_row0[k0 + t + 4], ahi[2], alo[2]);
      split_tf32(a_row8[k0 + t + 4], ahi[3], alo[3]);
#pragma unroll
      for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
        const float* b_row = b_tile + (8 * nt + g) * S + k0;
        uint32_t b0hi, b0lo, b1hi, b1lo;
        split_tf32(b_row[t], b0hi, b0lo);
        split_tf32(b_row[t + 4], b1hi, b1lo);
        mma_tf32_1688(acc[nt], alo, b0hi, b1hi);
        mma_tf32_1688(acc[nt], ahi, b0lo, b1lo);
        mma_tf32_1688(acc[nt], ahi, b0hi, b1hi);
      }
    } else {
      // ldmatrix.x4, lane group lg = lane / 8 addresses matrix lg (lr = lane % 8 its row):
      // A: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a0..a3;
      // B for the n8 tiles nt, nt+1: (nt, k 0-7), (nt, k 8-15), (nt+1, k 0-7), (nt+1, k 8-15) =
      // b0, b1 of nt, b0, b1 of nt+1 (B's column n is the tile row, stored along k).
      uint32_t a[4];
      ldmatrix_x4(a, a_frag + k0);
#pragma unroll
      for (int nt = 0; nt < Traits::kColTiles8; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, b_frag + 8 * nt * S + k0);
        if constexpr (std::is_same_v<Element, __half>) {
          mma_f16_16816(acc[nt], a, b[0], b[1]);
          mma_f16_16816(acc[nt + 1], a, b[2], b[3]);
        } else {
          mma_bf16_16816(acc[nt], a, b[0], b[1]);
          mma_bf16_16816(acc[nt + 1], a, b[2], b[3]);
        }
      }
    }
  }
}

// du_slab (16 x kSlice per warp, fp32) += W (16 x kCols: the warp's rows, in the accumulator
// layout of an S tile) @ V (kCols x kSlice in shared memory, row stride kSliceStride). fp32: 3xTF32;
// fp16 / bf16: bf16 MMAs (W rounded to bf16, fp16 V fragments converted while loading).
template <typename Traits>
__device__ __forceinline__ void mma_weights_slice(float (&du)[Traits::kSliceTiles8][4],
                                                  const float (&acc)[Traits::kColTiles8][4],
                                                  const typename Traits::Element* v, int lane) {
  using Element = typename Traits::Element;
  const int g = lane >> 2, t = lane & 3;
  constexpr int VS = Traits::kSliceStride;
  if constexpr (Traits::kFp32) {
    // k order permuted to the accumulator layout: logical k = t <-> column 2t, k = t + 4 <-> 2t + 1
#pragma unroll
    for (int ks = 0; ks < Traits::kCols / 8; ++ks) {
      uint32_t ahi[4], alo[4];
      split_tf32(acc[ks][0], ahi[0], alo[0]);
      split_tf32(acc[ks][2], ahi[1], alo[1]);
      split_tf32(acc[ks][1], ahi[2], alo[2]);
      split_tf32(acc[ks][3], ahi[3], alo[3]);
      const float* v0 = v + (8 * ks + 2 * t) * VS + g;
#pragma unroll
      for (int dn = 0; dn < Traits::kSliceTiles8; ++dn) {
        uint32_t b0hi, b0lo, b1hi, b1lo;
        split_tf32(v0[8 * dn], b0hi, b0lo);
        split_tf32(v0[VS + 8 * dn], b1hi, b1lo);
        mma_tf32_1688(du[dn], alo, b0hi, b1hi);
        mma_tf32_1688(du[dn], ahi, b0lo, b1lo);
        mma_tf32_1688(du[dn], ahi, b0hi, b1hi);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < Traits::kCols / 16; ++ks) {
      uint32_t a[4];
      a[0] = pack_bf16(acc[2 * ks][0], acc[2 * ks][1]);
      a[1] = pack_bf16(acc[2 * ks][2], acc[2 * ks][3]);
      a[2] = pack_bf16(acc[2 * ks + 1][0], acc[2 * ks + 1][1]);
      a[3] = pack_bf16(acc[2 * ks + 1][2], acc[2 * ks + 1][3]);
      // ldmatrix.x4.trans of V (rows j = columns of the tile, along k; features d along n):
      // matrices (j 0-7, dn), (j 8-15, dn), (j 0-7, dn+1), (j 8-15, dn+1) = b0, b1 of dn and of
      // dn+1 (lane l gets V[j0 + 2(l%4)][d0 + l/4] and V[j0 + 2(l%4) + 1][d0 + l/4])
      const Element* v_frag = v + (16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1)) * VS + 8 * (lane >> 4);
#pragma unroll
      for (int dn = 0; dn < Traits::kSliceTiles8; dn += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_frag + 8 * dn);
        if constexpr (std::is_same_v<Element, __half>) {
#pragma unroll
          for (int r = 0; r < 4; ++r) b[r] = f16x2_to_bf16x2(b[r]);
        }
        mma_bf16_16816(du[dn], a, b[0], b[1]);
        mma_bf16_16816(du[dn + 1], a, b[2], b[3]);
      }
    }
  }
}

// Shared-memory pieces of one CTA (offsets computed, never a run-time index into a pointer array,
// which would put the array on the stack).
template <typename Traits>
struct InfonceSmem {
  using Element = typename Traits::Element;
  Element* elements;  // a_chunk[2], b_chunk[2][kTiles], v_slice[kTiles] (backward)
  // col_r, col_f ([kTiles][kCols] each), row_f[kRows]; backward only: col_g, col_lse, col_a
  // ([kTiles][kCols] each), row_gneg[kRows], warp_part[2 * kWarps]
  float* floats;

  __device__ InfonceSmem(unsigned char* raw, bool backward) : elements(reinterpret_cast<Element*>(raw)) {
    const int count = (2 + 2 * Traits::kTiles) * Traits::kChunkElems +
                      (backward ? Traits::kTiles * Traits::kCols * Traits::kSliceStride : 0);
    floats = reinterpret_cast<float*>(elements + count);
  }
  // kRows x kChunkStride
  __device__ Element* a_chunk(int buf) const { return elements + buf * Traits::kChunkElems; }
  // kCols x kChunkStride
  __device__ Element* b_chunk(int buf, int tile) const {
    return elements + (2 + buf * Traits::kTiles + tile) * Traits::kChunkElems;
  }
  // kCols x kSliceStride
  __device__ Element* v_slice(int tile) const {
    return elements + (2 + 2 * Traits::kTiles) * Traits::kChunkElems + tile * Traits::kCols * Traits::kSliceStride;
  }
  __device__ float* col_r() const { return floats; }
  __device__ float* col_f() const { return floats + Traits::kTiles * Traits::kCols; }  // row factors f_C
  __device__ float* row_f() const { return floats + 2 * Traits::kTiles * Traits::kCols; }  // f_R of the CTA's rows
  __device__ float* col_g() const { return row_f() + Traits::kRows; }
  __device__ float* col_lse() const { return col_g() + Traits::kTiles * Traits::kCols; }
  __device__ float* col_a() const { return col_g() + 2 * Traits::kTiles * Traits::kCols; }
  __device__ float* row_gneg() const { return col_g() + 3 * Traits::kTiles * Traits::kCols; }
  __device__ float* warp_part() const { return row_gneg() + Traits::kRows; }
};

// Issues the copies of D chunk kc of the CTA's rows and of column tile j0 into buffer buf.
template <typename Traits>
__device__ __forceinline__ void load_score_chunk(const InfonceProblem& p, const InfonceSmem<Traits>& sm, int64_t j0,
                                                 int kc, int buf, bool vector) {
  using Element = typename Traits::Element;
  const int block = blockIdx.x;
  const int64_t ncols = column_count(p.cross, p.n);
  const int d0 = kc * Traits::kChunk;
  const auto a_row = [&](int lr) { return stacked_row<Element>(p, cta_row(block, lr, p.n)); };
  copy_rows<Traits, Traits::kRows, Traits::kChunk>(sm.a_chunk(buf), Traits::kChunkStride, a_row, d0, p.dim, vector,
                                                   p.first);
#pragma unroll
  for (int h = 0; h < Traits::kTiles; ++h) {
    const int64_t base = column_base(p.cross, h, p.n);
    const auto b_row = [&](int jj) {
      return j0 + jj < ncols ? stacked_row<Element>(p, base + j0 + jj) : static_cast<const Element*>(nullptr);
    };
    copy_rows<Traits, Traits::kCols, Traits::kChunk>(sm.b_chunk(buf, h), Traits::kChunkStride, b_row, d0, p.dim,
                                                     vector, p.first);
  }
}

// Multiplies the features of kRowsTile rows (row stride `stride`, kWidth features) in shared memory
// by their row's power-of-two factor (exact: the scaled rows' max |x| is in [2, 4)). Only reached
// when a row of the tile has f != 1 (max |x| >= 2^40), which fp16 inputs (max 65504) never have.
template <typename Traits, int kRowsTile, int kWidth>
__device__ __forceinline__ void scale_rows(typename Traits::Element* tile, int stride, const float* factor) {
  using Element = typename Traits::Element;
  if constexpr (!std::is_same_v<Element, __half>) {
#pragma unroll 1
    for (int id = threadIdx.x; id < kRowsTile * kWidth; id += Traits::kThreads) {
      const int row = id / kWidth, col = id % kWidth;
      Element& x = tile[row * stride + col];
      x = from_float<Element>(to_float(x) * factor[row]);
    }
  }
}

// The S tile of this warp for column tile j0 (raw dot products x_R . x_C, fp32), streaming D in
// chunks through the double-buffered a_chunk / b_chunk. Every thread of the CTA must call it.
template <typename Traits>
__device__ __forceinline__ void score_tile(float (&acc)[Traits::kColTiles8][4], const InfonceProblem& p,
                                           InfonceSmem<Traits>& sm, int64_t j0, bool vector, bool rescale, int warp,
                                           int lane) {
#pragma unroll
  for (int nt = 0; nt < Traits::kColTiles8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  const int chunks = (p.dim + Traits::kChunk - 1) / Traits::kChunk;
  const int tile = Traits::kCross ? warp / 2 : 0;
  load_score_chunk<Traits>(p, sm, j0, 0, 0, vector);
  cp_async_commit();
  for (int kc = 0; kc < chunks; ++kc) {
    if (kc + 1 < chunks) load_score_chunk<Traits>(p, sm, j0, kc + 1, (kc + 1) & 1, vector);
    cp_async_commit();  // (possibly empty) group of chunk kc + 1
    cp_async_wait<1>();  // chunk kc and everything issued before it have landed
    __syncthreads();
    if (rescale) {  // CTA-uniform: some row of the CTA or of the tile has max |x| >= 2^40
      scale_rows<Traits, Traits::kRows, Traits::kChunk>(sm.a_chunk(kc & 1), Traits::kChunkStride, sm.row_f());
#pragma unroll
      for (int hh = 0; hh < Traits::kTiles; ++hh) {
        scale_rows<Traits, Traits::kCols, Traits::kChunk>(sm.b_chunk(kc & 1, hh), Traits::kChunkStride,
                                                          sm.col_f() + hh * Traits::kCols);
      }
      __syncthreads();
    }
    mma_scores_chunk<Traits>(acc, sm.a_chunk(kc & 1), sm.b_chunk(kc & 1, tile), warp, lane);
    __syncthreads();  // the buffer is refilled by the next iteration's load
  }
}

// Rows' inverse norms and power-of-two factors (InfonceProblem::inv_norm, row_factor), one warp per
// stacked row, overflow-free for any finite row. With 2^e <= amax = max |x| < 2^(e+1), the sum of
// squares runs on x 2^-(e-1) (exact power-of-two scaling, every term <= 16): norm' = ||x 2^-(e-1)||
// in [2, 4 sqrt(D)]. Rows with e >= 40 keep the factor f = 2^-(e-1) (the kernels scale their
// features by it) and store 1 / norm'; the others store f = 1 and 1 / max(norm' 2^(e-1), eps)
// (amax < 2^40: norm < 2^46, no overflow). amax < 2^-100 gives norm < 2^-84 < eps directly.
// NaN rows stay NaN; rows holding inf keep the old meaning (norm inf, r = 0).
template <typename Element>
__global__ void __launch_bounds__(256) row_inv_norm_kernel(const __grid_constant__ InfonceProblem p) {
  const int lane = threadIdx.x & 31;
  const int64_t R = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const Element* x = stacked_row<Element>(p, R);
  if (x == nullptr) return;
  float amax = 0.f;
  bool nan = false;
  for (int d = lane; d < p.dim; d += 32) {
    const float v = to_float(x[d]);
    amax = fmaxf(amax, fabsf(v));
    nan = nan || isnan(v);
  }
  amax = warp_max(amax);
  nan = __any_sync(0xffffffffu, nan);
  float inv = 1.f / kNormEps, factor = 1.f;
  if (nan) {
    inv = NAN;
  } else if (isinf(amax)) {
    inv = 0.f;
  } else if (amax >= 0x1p-100f) {
    const int e = ilogbf(amax);                        // -100 <= e <= 127
    const float down = __int_as_float((128 - e) << 23);  // 2^-(e-1), a normal float: e - 1 <= 126
    float sum = 0.f;
    for (int d = lane; d < p.dim; d += 32) {
      const float v = to_float(x[d]) * down;
      sum = fmaf(v, v, sum);
    }
    const float norm_scaled = sqrtf(warp_sum(sum));  // >= 2: the max term alone is >= 4
    if (e >= 40) {
      factor = down;
      inv = 1.f / norm_scaled;
    } else {
      const float norm = norm_scaled * __int_as_float((126 + e) << 23);  // * 2^(e-1), exact, e - 1 >= -101
      inv = 1.f / fmaxf(norm, kNormEps);
    }
  }
  if (lane == 0) {
    p.inv_norm[R] = inv;
    p.row_factor[R] = factor;
  }
}

// Writes the power-of-two factors of the CTA's rows to shared memory (1 without normalisation or
// past the end); true on the threads that found a factor != 1.
template <typename Traits>
__device__ __forceinline__ bool load_row_factors(const InfonceProblem& p, const InfonceSmem<Traits>& sm) {
  bool scaled = false;
  for (int lr = threadIdx.x; lr < Traits::kRows; lr += Traits::kThreads) {
    const int64_t R = cta_row(blockIdx.x, lr, p.n);
    const float f = R >= 0 && p.normalize ? p.row_factor[R] : 1.f;
    sm.row_f()[lr] = f;
    scaled = scaled || f != 1.f;
  }
  return scaled;
}

__device__ __forceinline__ bool use_fixed_shift(const InfonceProblem& p, float s) { return p.normalize && 2.f * s <= 80.f; }

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) infonce_fwd_kernel(const __grid_constant__ InfonceFwdParams p) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  InfonceSmem<Traits> sm(smem_raw, false);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = warp / 2;  // half of the rows this warp holds
  const int tile = Traits::kCross ? h : 0;
  const float s = *p.scale;
  const float bias = Traits::kSiglip ? *p.bias : 0.f;
  const bool fixed = use_fixed_shift(p, s);
  const bool vector = p.dim % Traits::kPerSeg == 0 && reinterpret_cast<uintptr_t>(p.first) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.second) % 16 == 0;
  const int64_t ncols = column_count(p.cross, p.n);

  int64_t row[2], partner[2];
  float row_r[2], m[2], l[2], s_pos[2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    row[q] = cta_row(blockIdx.x, 16 * warp + g + 8 * q, p.n);
    partner[q] = row[q] < 0 ? -1 : partner_row(row[q], p.n);
    row_r[q] = row[q] < 0 ? 0.f : (p.normalize ? p.inv_norm[row[q]] : 1.f);
    m[q] = fixed ? s : -1e30f;  // finite start: exp(m - m') is 0 or 1, never exp(inf - inf)
    l[q] = 0.f;
    s_pos[q] = 0.f;
  }
  const bool rows_scaled = load_row_factors(p, sm);  // visible after the first tile's barrier

  for (int64_t j0 = 0; j0 < ncols; j0 += Traits::kCols) {
    // column inverse norms and factors of this tile (read after score_tile's barriers)
    bool cols_scaled = false;
    for (int i = threadIdx.x; i < Traits::kTiles * Traits::kCols; i += Traits::kThreads) {
      const int hh = i / Traits::kCols, jj = i % Traits::kCols;
      const int64_t C = column_base(p.cross, hh, p.n) + j0 + jj;
      const bool ok = j0 + jj < ncols;
      sm.col_r()[i] = ok ? (p.normalize ? p.inv_norm[C] : 1.f) : 0.f;
      const float f = ok && p.normalize ? p.row_factor[C] : 1.f;
      sm.col_f()[i] = f;
      cols_scaled = cols_scaled || f != 1.f;
    }
    const bool rescale = __syncthreads_or(rows_scaled || cols_scaled) != 0;
    float acc[Traits::kColTiles8][4];
    score_tile<Traits>(acc, p, sm, j0, vector, rescale, warp, lane);
    const int64_t cbase = column_base(p.cross, h, p.n) + j0;
    if constexpr (Traits::kSiglip) {
      // l accumulates the row's sigmoid loss: softplus(-z (s x.y + b)), z = +1 at the partner
#pragma unroll
      for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int jj = 8 * nt + 2 * t + e;
            const float logit = fmaf(s, acc[nt][2 * q + e], bias);
            const float z = cbase + jj == partner[q] ? 1.f : -1.f;
            if (j0 + jj < ncols) l[q] += softplus(-z * logit);
          }
        }
      }
    } else {
      float tile_max[2] = {-INFINITY, -INFINITY};
  #pragma unroll
      for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
  #pragma unroll
        for (int q = 0; q < 2; ++q) {
  #pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int jj = 8 * nt + 2 * t + e;
            const int64_t C = cbase + jj;
            float S = s * acc[nt][2 * q + e] * row_r[q] * sm.col_r()[tile * Traits::kCols + jj];
            if (C == partner[q]) {
              s_pos[q] = S;
              S = -INFINITY;
            } else if (j0 + jj >= ncols || C == row[q]) {
              S = -INFINITY;
            }
            acc[nt][2 * q + e] = S;
            tile_max[q] = fmaxf(tile_max[q], S);
          }
        }
      }
  #pragma unroll
      for (int q = 0; q < 2; ++q) {
        float m_new = m[q];
        if (!fixed) {
          m_new = fmaxf(m[q], tile_max[q]);
          l[q] *= __expf(m[q] - m_new);
          m[q] = m_new;
        }
  #pragma unroll
        for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
          l[q] += __expf(acc[nt][2 * q] - m_new) + __expf(acc[nt][2 * q + 1] - m_new);
        }
      }
    }
    __syncthreads();  // col_r is rewritten by the next tile
  }

  if constexpr (Traits::kSiglip) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float loss = quad_sum(l[q]);
      if (t == 0 && row[q] >= 0 && row[q] < p.n && p.loss_first != nullptr) p.loss_first[row[q]] = loss;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      // merge the quad's partial (m, l): every lane of a quad holds a quarter of the row's columns
      float m_row = m[q];
      m_row = fmaxf(m_row, __shfl_xor_sync(0xffffffffu, m_row, 1));
      m_row = fmaxf(m_row, __shfl_xor_sync(0xffffffffu, m_row, 2));
      const float l_row = quad_sum(l[q] * __expf(m[q] - m_row));
      const float pos = quad_sum(s_pos[q]);
      const float loss = softplus(m_row + logf(l_row) - pos);  // log1p(neg / pos)
      if (t == 0 && row[q] >= 0) {
        const bool first = row[q] < p.n;
        const int64_t i = first ? row[q] : row[q] - p.n;
        float* loss_out = first ? p.loss_first : p.loss_second;
        float* lse_out = first ? p.lse_first : p.lse_second;
        if (loss_out != nullptr) loss_out[i] = loss;
        if (lse_out != nullptr) lse_out[i] = pos + loss;
      }
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads) infonce_bwd_kernel(const __grid_constant__ InfonceBwdParams p) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  InfonceSmem<Traits> sm(smem_raw, true);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int h = warp / 2;
  const int tile = Traits::kCross ? h : 0;
  const float s = *p.scale;
  const bool fixed = use_fixed_shift(p, s);
  const float c = s;  // the fixed shift
  const float bias = Traits::kSiglip ? *p.bias : 0.f;
  const bool vector = p.dim % Traits::kPerSeg == 0 && reinterpret_cast<uintptr_t>(p.first) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(p.second) % 16 == 0;
  const int64_t ncols = column_count(p.cross, p.n);
  const int d_slice = blockIdx.y * Traits::kSlice;

  // (g, lse) of a stacked row; a half without upstream gradient has g = 0, lse = +inf (P = 0)
  const auto grad_of = [&](int64_t R) {
    const float* gp = R < p.n ? p.grad_first : p.grad_second;
    return gp == nullptr ? 0.f : gp[R < p.n ? R : R - p.n];
  };
  const auto lse_of = [&](int64_t R) {
    const float* gp = R < p.n ? p.grad_first : p.grad_second;
    const float* lp = R < p.n ? p.lse_first : p.lse_second;
    return gp == nullptr || lp == nullptr ? INFINITY : lp[R < p.n ? R : R - p.n];
  };

  int64_t row[2], partner[2];
  float row_r[2], g_own[2], lse_own[2], e_own[2], neg_p[2], c_row[2], s_pos[2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    row[q] = cta_row(blockIdx.x, 16 * warp + g + 8 * q, p.n);
    partner[q] = row[q] < 0 ? -1 : partner_row(row[q], p.n);
    const bool ok = row[q] >= 0;
    row_r[q] = ok ? (p.normalize ? p.inv_norm[row[q]] : 1.f) : 0.f;
    g_own[q] = ok ? grad_of(row[q]) : 0.f;
    lse_own[q] = ok ? lse_of(row[q]) : INFINITY;
    e_own[q] = __expf(c - lse_own[q]);  // fixed shift: P = E e_own (c - lse in [-log 2n, 2s])
    neg_p[q] = c_row[q] = s_pos[q] = 0.f;
  }
  const bool rows_scaled = load_row_factors(p, sm);  // visible after the first tile's barrier
  float du[Traits::kSliceTiles8][4];
#pragma unroll
  for (int dn = 0; dn < Traits::kSliceTiles8; ++dn) du[dn][0] = du[dn][1] = du[dn][2] = du[dn][3] = 0.f;

  for (int64_t j0 = 0; j0 < ncols; j0 += Traits::kCols) {
    // this tile's column data and feature slice (visible after score_tile's barriers)
    bool cols_scaled = false;
    for (int i = threadIdx.x; i < Traits::kTiles * Traits::kCols; i += Traits::kThreads) {
      const int hh = i / Traits::kCols, jj = i % Traits::kCols;
      const int64_t C = column_base(p.cross, hh, p.n) + j0 + jj;
      const bool ok = j0 + jj < ncols;
      const float gc = ok ? grad_of(C) : 0.f, lc = ok ? lse_of(C) : INFINITY;
      sm.col_r()[i] = ok ? (p.normalize ? p.inv_norm[C] : 1.f) : 0.f;
      const float f = ok && p.normalize ? p.row_factor[C] : 1.f;
      sm.col_f()[i] = f;
      cols_scaled = cols_scaled || f != 1.f;
      sm.col_g()[i] = gc;
      sm.col_lse()[i] = lc;
      sm.col_a()[i] = gc * __expf(c - lc);
    }
    const bool rescale = __syncthreads_or(rows_scaled || cols_scaled) != 0;
#pragma unroll
    for (int hh = 0; hh < Traits::kTiles; ++hh) {
      const int64_t base = column_base(p.cross, hh, p.n) + j0;
      const auto v_row = [&](int jj) {
        return j0 + jj < ncols ? stacked_row<Element>(p, base + jj) : static_cast<const Element*>(nullptr);
      };
      copy_rows<Traits, Traits::kCols, Traits::kSlice>(sm.v_slice(hh), Traits::kSliceStride, v_row, d_slice, p.dim,
                                                       vector, p.first);
    }
    cp_async_commit();  // the slice lands with chunk 0 of score_tile (its waits cover older groups)

    float acc[Traits::kColTiles8][4];
    score_tile<Traits>(acc, p, sm, j0, vector, rescale, warp, lane);
    if (rescale) {  // the feature slice landed with score_tile's waits and barriers
#pragma unroll
      for (int hh = 0; hh < Traits::kTiles; ++hh) {
        scale_rows<Traits, Traits::kCols, Traits::kSlice>(sm.v_slice(hh), Traits::kSliceStride,
                                                          sm.col_f() + hh * Traits::kCols);
      }
      __syncthreads();
    }

    // W (times the column's inverse norm) in place of S
    const int64_t cbase = column_base(p.cross, h, p.n) + j0;
    const float* col_r = sm.col_r() + tile * Traits::kCols;
    const float* col_g = sm.col_g() + tile * Traits::kCols;
    const float* col_lse = sm.col_lse() + tile * Traits::kCols;
    const float* col_a = sm.col_a() + tile * Traits::kCols;
#pragma unroll
    for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = 8 * nt + 2 * t + e;
          const int64_t C = cbase + jj;
          if constexpr (Traits::kSiglip) {
            // G = dL/dlogit = -z g sigmoid(-z logit) with g the x row's gradient: the row's own
            // for the x half, the column's for the y half (the other one is 0).
            const float dot = acc[nt][2 * q + e];
            const float z = C == partner[q] ? 1.f : -1.f;
            const float gx = g_own[q] + col_g[jj];
            const float w = j0 + jj < ncols ? -z * gx / (1.f + __expf(z * fmaf(s, dot, bias))) : 0.f;
            c_row[q] = fmaf(w, dot, c_row[q]);  // dL/ds = sum G x.y
            neg_p[q] += w;                      // dL/db = sum G
            acc[nt][2 * q + e] = w;
            continue;
          }
          const float S = s * acc[nt][2 * q + e] * row_r[q] * col_r[jj];
          float w = 0.f;
          if (C == partner[q]) {
            s_pos[q] = S;
          } else if (j0 + jj < ncols && C != row[q]) {
            float prob;
            if (fixed) {
              const float E = __expf(S - c);
              prob = E * e_own[q];
              w = E * (g_own[q] * e_own[q] + col_a[jj]);
            } else {
              prob = __expf(S - lse_own[q]);
              w = g_own[q] * prob + col_g[jj] * __expf(S - col_lse[jj]);
            }
            neg_p[q] += prob;
            c_row[q] = fmaf(w, S, c_row[q]);
          }
          acc[nt][2 * q + e] = w * col_r[jj];
        }
      }
    }

    // du_slab += W (16 x kCols) @ V (kCols x kSlice)
    mma_weights_slice<Traits>(du, acc, sm.v_slice(tile), lane);
    __syncthreads();  // v_slice and the column data are rewritten by the next tile
  }

  // ---- epilogue: the positive pair, the normalisation backward, dscale ----
  float pair_w[2];
  float b_sum = 0.f;
  if constexpr (Traits::kSiglip) {  // no pair term; dscale, dbias from the x rows (each entry once)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float cq = quad_sum(c_row[q]), bq = quad_sum(neg_p[q]);
      if (row[q] >= 0 && row[q] < p.n) {
        b_sum += bq;
        c_row[q] = cq;
      } else {
        c_row[q] = 0.f;
      }
      neg_p[q] = 0.f;  // no exchange below
      s_pos[q] = 0.f;
    }
  }
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    if constexpr (!Traits::kSiglip) {
      neg_p[q] = quad_sum(neg_p[q]);
      c_row[q] = quad_sum(c_row[q]);
      s_pos[q] = quad_sum(s_pos[q]);
    }
    if (t == 0) sm.row_gneg()[16 * warp + g + 8 * q] = g_own[q] * neg_p[q];
  }
  __syncthreads();
  float c_sum = 0.f;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int lr = 16 * warp + g + 8 * q;
    // W at the positive: G_Rp + G_pR = -(g_R negP_R + g_p negP_p)
    pair_w[q] = -(sm.row_gneg()[lr] + sm.row_gneg()[lr ^ kInfonceHalfRows]);
    c_row[q] = fmaf(pair_w[q], s_pos[q], c_row[q]);  // c_R = u_R . du_R
    if (row[q] >= 0) c_sum += c_row[q];
  }
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    if (row[q] < 0) continue;
    const Element* x_own = stacked_row<Element>(p, row[q]);
    const Element* x_pair = stacked_row<Element>(p, partner[q]);
    // r x = r' (f x) with r' = inv_norm, f = row_factor (f = 1 unless max |x| >= 2^40)
    const float r_pair = p.normalize ? p.inv_norm[partner[q]] : 1.f;
    const float f_pair = p.normalize ? p.row_factor[partner[q]] : 1.f;
    const float f_own = p.normalize ? p.row_factor[row[q]] : 1.f;
    const bool project = p.normalize && row_r[q] < 1.f / kNormEps;  // ||x_R|| > eps
    const bool first = row[q] < p.n;
    Element* out = static_cast<Element*>(first ? p.dx_first : p.dx_second) + (first ? row[q] : row[q] - p.n) * p.dim;
#pragma unroll
    for (int dn = 0; dn < Traits::kSliceTiles8; ++dn) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = d_slice + 8 * dn + 2 * t + e;
        if (d >= p.dim) continue;
        const float grad_u = s * (du[dn][2 * q + e] + pair_w[q] * r_pair * (to_float(x_pair[d]) * f_pair));
        float grad_x = grad_u;
        if (p.normalize) {
          // dz = r (du - u c) with r = f r': (r' (du - r' (f x) c)) f; unprojected rows have f = 1
          grad_x = project ? (row_r[q] * (grad_u - row_r[q] * (to_float(x_own[d]) * f_own) * c_row[q])) * f_own
                           : row_r[q] * grad_u;
        }
        out[d] = from_float<Element>(grad_x);
      }
    }
  }
  // per-CTA dscale partial (once per row block: slice 0), rows summed in a fixed order
  if (blockIdx.y == 0) {
    c_sum = warp_sum(t == 0 ? c_sum : 0.f);
    b_sum = warp_sum(t == 0 ? b_sum : 0.f);
    if (lane == 0) {
      sm.warp_part()[warp] = c_sum;
      sm.warp_part()[Traits::kWarps + warp] = b_sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f, bias_total = 0.f;
      for (int w = 0; w < Traits::kWarps; ++w) {
        total += sm.warp_part()[w];
        bias_total += sm.warp_part()[Traits::kWarps + w];
      }
      p.dscale_partials[blockIdx.x] = total;
      if constexpr (Traits::kSiglip) p.dbias_partials[blockIdx.x] = bias_total;
    }
  }
}

// out = sum of the partials (/ (2 s) when halve_by_scale: InfoNCE's dL/ds), one block, fixed order.
// static: each kernel file including this header has its own copy (a __global__ function with
// external linkage would be defined twice when the files are linked into one library).
static __global__ void __launch_bounds__(256) dscale_finalize_kernel(const float* partials, int64_t count,
                                                                     const float* scale, bool halve_by_scale,
                                                                     float* out) {
  __shared__ float warp_totals[8];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += 256) acc += partials[i];
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < 8; ++w) total += warp_totals[w];
    *out = halve_by_scale ? total / (2.f * *scale) : total;
  }
}

}  // namespace cl_fast::cuda
