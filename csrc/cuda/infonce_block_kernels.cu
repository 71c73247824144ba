// The InfoNCE block-piece CUDA kernels (rows against one slice of columns; interface in
// infonce_block_kernels.h, semantics in cl_fast/reference.py infonce_block_*) and their launchers.
//
// S_ij = s rows_i . cols_j on the features as given (no normalisation inside, any finite
// magnitude): the forward keeps a running row max, never a fixed shift. Rows (either side) with
// max |x| >= 2^40 enter the score tiles multiplied by an exact power of two 2^-(e-1) (a pre-pass
// writes the factors; tiles holding none skip it), so the tiles' dot products stay in fp32's range
// and S = dot' (s 2^(e_i-1)) 2^(e_j-1); the W @ V products use the features as given. The
// backward's dscale is sum W S / s (not sum W dot, which can overflow where S does not). The tiles are those of the
// InfoNCE kernels (infonce_kernels.cuh: copy_rows, mma_scores_chunk, mma_weights_slice): 4 warps,
// 64 stationary items per CTA (16 per warp), streamed tiles of 64 items, D in 128-byte chunks
// double-buffered with cp.async; fp16 / bf16 S tiles are m16n8k16 MMAs, fp32 inputs 3xTF32; the
// W @ V products run in bf16 (fp32 inputs: 3xTF32). Exponentials run in base 2 (ex2.approx):
// S log2(e) = dot * (s log2(e)), one multiply per entry.
//
// Forward: CTA = 64 rows; column tiles streamed; per row a running (max, sum) pair per lane, merged
// over the quad at the end: lse_i = log sum exp(S_ij) over the kept columns, -inf when none is kept
// (NaN propagates: fmaxf skips it, the sum does not). The exclusion mask (and the tail mask) is
// applied only on tiles holding an excluded or a missing column of one of the warp's rows.
// Few row blocks (the local rows of a distributed loss against many gathered columns): the columns
// are split over blockIdx.y (p.splits ranges of whole tiles), each CTA writes its rows' (max, sum)
// to the workspace and a merge kernel adds the splits in a fixed order.
//
// Backward, no atomics, two kernels that each recompute S:
//   rows (drows): CTA = 64 rows x one slice of 128 output features (blockIdx.y), column tiles
//     streamed: W_ij = g_i exp(S_ij - lse_i) (0 where excluded), drows_slab += W @ cols[:, slice];
//     slice-0 CTAs also sum W_ij (rows_i . cols_j) into one dscale partial per row block, and a
//     one-block kernel adds the partials in a fixed order (dscale_finalize_kernel). With column
//     splits (blockIdx.z) each split writes a partial drows to the workspace, summed in split
//     order by a reduce kernel.
//   columns (dcols): CTA = 64 columns x one slice, row tiles streamed: the S^T tile
//     cols_slab . rows_tile^T, W^T_ji = g_i exp(S_ij - lse_i) with the tile's (g_i, lse_i) in shared
//     memory, dcols_slab += W^T @ rows[:, slice]; with row splits (blockIdx.z, few column blocks:
//     a ring slice), partial dcols summed in split order likewise.
// Column j's excluded rows mirror row i's excluded columns: j == i + diag gives i = j - diag, and
// with pairs j == diag + (i + m/2) mod m gives i = (j - diag + m/2) mod m (the partner of j - diag),
// both only when 0 <= j - diag < m.
// Rows whose lse is not finite (no kept column in any slice, or NaN) have g = 0 and lse = +inf in
// the kernels: their terms are 0 (for finite S).
// Split counts come from the host (infonce_block_{fwd,bwd}_splits: about two CTAs per SM, from the
// SM count), so repeated calls on one device are bit-identical.
#include "infonce_block_kernels.h"
#include "infonce_kernels.cuh"

#include <cmath>
#include <type_traits>

namespace cl_fast::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x (ex2.approx, flush-to-zero): 2^-inf = 0, NaN stays NaN.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename Element_>
struct BlockTraits {
  using Element = Element_;
  static constexpr bool kFp32 = std::is_same_v<Element, float>;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kInfonceBlockItems;  // stationary items per CTA (rows or columns)
  static constexpr int kCols = kInfonceBlockTile;   // streamed items per tile
  static constexpr int kPerSeg = 16 / sizeof(Element);  // elements per 16-byte copy
  static constexpr int kChunk = 128 / sizeof(Element);  // features per D chunk (128 bytes)
  static constexpr int kChunkStride = kChunk + kPerSeg;  // +16 bytes: conflict-free fragment loads
  static constexpr int kSlice = kInfonceBlockSlice;      // output features per CTA (backward)
  static constexpr int kSliceStride = kSlice + kPerSeg;
  static constexpr int kMmaK = kFp32 ? 8 : 16;
  static constexpr int kColTiles8 = kCols / 8;     // n8 tiles of an S tile per warp
  static constexpr int kSliceTiles8 = kSlice / 8;  // n8 tiles of an output slice per warp
  static constexpr int kChunkElems = kRows * kChunkStride;  // one chunk buffer (stationary or streamed)
  static_assert(kRows == kWarps * 16, "one 16-row MMA slab per warp");
  static_assert(kRows == kCols, "the stationary and the streamed chunk buffers have one size");

  static constexpr size_t fwd_smem_bytes() { return sizeof(Element) * 4 * kChunkElems + sizeof(float) * (kRows + kCols); }
  static constexpr size_t bwd_smem_bytes() {
    return sizeof(Element) * (4 * kChunkElems + kCols * kSliceStride) +
           sizeof(float) * (kRows + 3 * kCols + kWarps);
  }
};

// Dynamic shared memory per block: within sm_80's opt-in limit (163 KB; sm_90: 227 KB).
constexpr size_t kMaxSmemPerBlock = 166912;
template <typename Element>
constexpr bool smem_fits() {
  return BlockTraits<Element>::fwd_smem_bytes() <= kMaxSmemPerBlock &&
         BlockTraits<Element>::bwd_smem_bytes() <= kMaxSmemPerBlock;
}
static_assert(smem_fits<float>() && smem_fits<__half>() && smem_fits<__nv_bfloat16>(),
              "InfoNCE block tiles exceed the per-block shared memory of sm_80");

// Shared memory of one CTA: a_chunk[2] (stationary), b_chunk[2] (streamed), v_slice (backward);
// then own_down[kRows], tile_down[kCols] (the power-of-two factors of the stationary items and of
// the streamed tile) and, backward only, tile_g, tile_lse2 ([kCols] each, the column kernel's
// streamed rows) and warp_part[kWarps].
template <typename Traits>
struct BlockSmem {
  using Element = typename Traits::Element;
  Element* elements;
  float* floats;

  __device__ BlockSmem(unsigned char* raw, bool backward)
      : elements(reinterpret_cast<Element*>(raw)),
        floats(reinterpret_cast<float*>(elements + 4 * Traits::kChunkElems +
                                        (backward ? Traits::kCols * Traits::kSliceStride : 0))) {}
  __device__ Element* a_chunk(int buf) const { return elements + buf * Traits::kChunkElems; }        // kRows x kChunkStride
  __device__ Element* b_chunk(int buf) const { return elements + (2 + buf) * Traits::kChunkElems; }  // kCols x kChunkStride
  __device__ Element* v_slice() const { return elements + 4 * Traits::kChunkElems; }               // kCols x kSliceStride
  __device__ float* own_down() const { return floats; }
  __device__ float* tile_down() const { return floats + Traits::kRows; }
  __device__ float* tile_g() const { return floats + Traits::kRows + Traits::kCols; }
  __device__ float* tile_lse2() const { return floats + Traits::kRows + 2 * Traits::kCols; }
  __device__ float* warp_part() const { return floats + Traits::kRows + 3 * Traits::kCols; }
};

__device__ __forceinline__ bool vector_copies(const InfonceBlockProblem& p, int per_seg) {
  return p.dim % per_seg == 0 && reinterpret_cast<uintptr_t>(p.rows) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.cols) % 16 == 0;
}

// acc = this warp's 16 stationary items (of the kRows from a0 in `a`) dotted with the kCols
// streamed items from b0 in `b`: fp32 dot products over all dim features; items past a_count /
// b_count are zeros. With `rescale` (CTA-uniform) the chunks are multiplied by own_down /
// tile_down first (dot' of the scaled rows). D streams in chunks through the double-buffered
// a_chunk / b_chunk, after any copies the caller committed before (they have landed when it
// returns). Every thread of the CTA calls it; it ends on a barrier.
template <typename Traits>
__device__ __forceinline__ void block_score_tile(float (&acc)[Traits::kColTiles8][4], const BlockSmem<Traits>& sm,
                                                 const typename Traits::Element* a, int64_t a0, int64_t a_count,
                                                 const typename Traits::Element* b, int64_t b0, int64_t b_count,
                                                 int dim, bool vector, bool rescale, int warp, int lane) {
  using Element = typename Traits::Element;
#pragma unroll
  for (int nt = 0; nt < Traits::kColTiles8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  const auto a_row = [&](int r) { return a0 + r < a_count ? a + (a0 + r) * dim : static_cast<const Element*>(nullptr); };
  const auto b_row = [&](int r) { return b0 + r < b_count ? b + (b0 + r) * dim : static_cast<const Element*>(nullptr); };
  const auto load = [&](int kc, int buf) {
    const int d0 = kc * Traits::kChunk;
    copy_rows<Traits, Traits::kRows, Traits::kChunk>(sm.a_chunk(buf), Traits::kChunkStride, a_row, d0, dim, vector, a);
    copy_rows<Traits, Traits::kCols, Traits::kChunk>(sm.b_chunk(buf), Traits::kChunkStride, b_row, d0, dim, vector, a);
  };
  const int chunks = (dim + Traits::kChunk - 1) / Traits::kChunk;
  load(0, 0);
  cp_async_commit();
  for (int kc = 0; kc < chunks; ++kc) {
    if (kc + 1 < chunks) load(kc + 1, (kc + 1) & 1);
    cp_async_commit();   // (possibly empty) group of chunk kc + 1
    cp_async_wait<1>();  // chunk kc and everything issued before it have landed
    __syncthreads();
    if (rescale) {  // some row of the CTA or of the tile has max |x| >= 2^40
      scale_rows<Traits, Traits::kRows, Traits::kChunk>(sm.a_chunk(kc & 1), Traits::kChunkStride, sm.own_down());
      scale_rows<Traits, Traits::kCols, Traits::kChunk>(sm.b_chunk(kc & 1), Traits::kChunkStride, sm.tile_down());
      __syncthreads();
    }
    mma_scores_chunk<Traits>(acc, sm.a_chunk(kc & 1), sm.b_chunk(kc & 1), warp, lane);
    __syncthreads();  // the buffer is refilled by the next iteration's load
  }
}

// down[r] for the m rows then the c columns (InfonceBlockProblem::down), one warp per row:
// 2^-(e-1) where 2^e <= max |x| < 2^(e+1) with e >= 40 (the scaled row's max lies in [2, 4)),
// else 1 (NaN and inf rows too: they stay what they are).
template <typename Element>
__global__ void __launch_bounds__(256) infonce_block_down_kernel(const __grid_constant__ InfonceBlockProblem p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (r >= p.m + p.c) return;
  const Element* x = r < p.m ? static_cast<const Element*>(p.rows) + r * p.dim
                             : static_cast<const Element*>(p.cols) + (r - p.m) * p.dim;
  float amax = 0.f;
  for (int d = lane; d < p.dim; d += 32) amax = fmaxf(amax, fabsf(to_float(x[d])));
  amax = warp_max(amax);
  float down = 1.f;
  if (amax >= 0x1p40f && amax <= 3.402823466e38f) down = __int_as_float((128 - ilogbf(amax)) << 23);  // e <= 127
  if (lane == 0) p.down[r] = down;
}

// 1 / f for a power of two f in [2^-126, 1] (the factors above), exactly, without a division.
__device__ __forceinline__ float inverse_pow2(float f) { return __int_as_float((254 << 23) - __float_as_int(f)); }

// Loads the factors of `count` items from `first` (1 past `limit`) into dst; true on the threads
// that found one != 1.
template <typename Traits>
__device__ __forceinline__ bool load_down(float* dst, int count, const float* down, int64_t first, int64_t limit) {
  bool scaled = false;
  for (int i = threadIdx.x; i < count; i += Traits::kThreads) {
    const float f = first + i < limit ? down[first + i] : 1.f;
    dst[i] = f;
    scaled = scaled || f != 1.f;
  }
  return scaled;
}

// The two streamed indices that stationary item x leaves out (-1: none). Rows (kColumns false):
// columns x + diag and, with pairs, diag + partner(x), partner(i) = (i + m/2) mod m. Columns: rows
// x - diag and, with pairs, partner(x - diag), when x - diag is a row.
template <bool kColumns>
__device__ __forceinline__ void excluded_of(const InfonceBlockProblem& p, int64_t x, int64_t& first, int64_t& second) {
  const int64_t half = p.m / 2;
  const auto partner = [&](int64_t i) { return i < half ? i + half : i - half; };
  if constexpr (kColumns) {
    const int64_t r = x - p.diag;
    const bool is_row = r >= 0 && r < p.m;
    first = is_row ? r : -1;
    second = is_row && p.pairs ? partner(r) : -1;
  } else {
    first = x + p.diag;
    second = p.pairs && x < p.m ? p.diag + partner(x) : -1;
  }
}

// Whether the streamed tile [y0, y0 + n) needs masking for some lane of the warp: it runs past
// `count`, or holds an excluded index of one of the warp's items. Warp-uniform.
__device__ __forceinline__ bool tile_needs_mask(int64_t y0, int n, int64_t count, const int64_t (&first)[2],
                                                const int64_t (&second)[2]) {
  const auto in_tile = [&](int64_t y) { return y >= y0 && y < y0 + n; };
  bool mask = y0 + n > count;
#pragma unroll
  for (int q = 0; q < 2; ++q) mask = mask || in_tile(first[q]) || in_tile(second[q]);
  return __any_sync(0xffffffffu, mask);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) infonce_block_fwd_kernel(
    const __grid_constant__ InfonceBlockFwdParams p) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BlockSmem<Traits> sm(smem_raw, false);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const Element* rows = static_cast<const Element*>(p.rows);
  const Element* cols = static_cast<const Element*>(p.cols);
  const float s2 = *p.scale * kLog2e;  // S log2(e) = dot * s2
  const bool vector = vector_copies(p, Traits::kPerSeg);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * Traits::kRows;
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * p.split_cols;  // this split's columns
  const int64_t j_end = j_begin + p.split_cols < p.c ? j_begin + p.split_cols : p.c;

  // lane (g, t) holds rows 16 warp + g + 8q (q = 0, 1), columns 8 nt + 2t + e of every tile;
  // (m, l): running max of S log2(e) and sum of 2^(S log2(e) - m) over those columns
  int64_t ex_first[2], ex_second[2];
  float m[2], l[2], row_mult[2];  // row_mult = 1 / down_i (a power of two >= 1)
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int64_t i = r0 + 16 * warp + g + 8 * q;
    excluded_of<false>(p, i, ex_first[q], ex_second[q]);
    m[q] = -INFINITY;
    l[q] = 0.f;
    row_mult[q] = i < p.m ? inverse_pow2(p.down[i]) : 1.f;
  }
  const bool rows_scaled = load_down<Traits>(sm.own_down(), Traits::kRows, p.down, r0, p.m);

  for (int64_t j0 = j_begin; j0 < j_end; j0 += Traits::kCols) {
    const bool cols_scaled = load_down<Traits>(sm.tile_down(), Traits::kCols, p.down + p.m, j0, p.c);
    const bool rescale = __syncthreads_or(rows_scaled || cols_scaled) != 0;
    float acc[Traits::kColTiles8][4];
    block_score_tile<Traits>(acc, sm, rows, r0, p.m, cols, j0, p.c, p.dim, vector, rescale, warp, lane);
    const bool mask = tile_needs_mask(j0, Traits::kCols, p.c, ex_first, ex_second);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          // (dot' s log2(e)) 2^(e_i-1) [2^(e_j-1)]: a product that overflows only where S does
          float x = acc[nt][2 * q + e] * s2 * row_mult[q];
          if (rescale) x *= inverse_pow2(sm.tile_down()[8 * nt + 2 * t + e]);
          if (mask) {
            const int64_t j = j0 + 8 * nt + 2 * t + e;
            if (j >= p.c || j == ex_first[q] || j == ex_second[q]) x = -INFINITY;
          }
          acc[nt][2 * q + e] = x;
          tile_max[q] = fmaxf(tile_max[q], x);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float m_new = fmaxf(m[q], tile_max[q]);
      const float shift = m_new == -INFINITY ? 0.f : m_new;  // nothing kept yet: 2^(-inf - 0) = 0
      float sum = l[q] * exp2_approx(m[q] - shift);
#pragma unroll
      for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
        sum += exp2_approx(acc[nt][2 * q] - shift) + exp2_approx(acc[nt][2 * q + 1] - shift);
      }
      l[q] = sum;
      m[q] = m_new;
    }
    __syncthreads();  // tile_down is rewritten by the next tile
  }

#pragma unroll
  for (int q = 0; q < 2; ++q) {
    // merge the quad's (m, l): each lane of a quad holds a quarter of the row's columns
    float m_row = m[q];
    m_row = fmaxf(m_row, __shfl_xor_sync(0xffffffffu, m_row, 1));
    m_row = fmaxf(m_row, __shfl_xor_sync(0xffffffffu, m_row, 2));
    const float shift = m_row == -INFINITY ? 0.f : m_row;
    const float l_row = quad_sum(l[q] * exp2_approx(m[q] - shift));
    const int64_t i = r0 + 16 * warp + g + 8 * q;
    if (t == 0 && i < p.m) {
      if (p.splits == 1) {
        p.lse[i] = (shift + log2f(l_row)) * kLn2;  // l_row = 0: -inf
      } else {  // this split's (max, sum) of the row, base 2
        p.workspace[blockIdx.y * p.m + i] = m_row;
        p.workspace[(p.splits + blockIdx.y) * p.m + i] = l_row;
      }
    }
  }
}

// lse_i from the splits' (max, sum) pairs of row i, in split order. One thread per row.
__global__ void __launch_bounds__(256) infonce_block_lse_merge_kernel(const __grid_constant__ InfonceBlockFwdParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= p.m) return;
  const float* max_part = p.workspace;
  const float* sum_part = p.workspace + p.splits * p.m;
  float m_row = -INFINITY;
  for (int split = 0; split < p.splits; ++split) m_row = fmaxf(m_row, max_part[split * p.m + i]);
  const float shift = m_row == -INFINITY ? 0.f : m_row;
  float l_row = 0.f;
  for (int split = 0; split < p.splits; ++split) {
    l_row += sum_part[split * p.m + i] * exp2_approx(max_part[split * p.m + i] - shift);
  }
  p.lse[i] = (shift + log2f(l_row)) * kLn2;
}

// kColumns false: drows (and the dscale partials); true: dcols. See the top of the file.
template <typename Traits, bool kColumns>
__global__ void __launch_bounds__(Traits::kThreads) infonce_block_bwd_kernel(
    const __grid_constant__ InfonceBlockBwdParams p) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const BlockSmem<Traits> sm(smem_raw, true);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const Element* own = static_cast<const Element*>(kColumns ? p.cols : p.rows);      // stationary
  const Element* other = static_cast<const Element*>(kColumns ? p.rows : p.cols);    // streamed
  const int64_t own_count = kColumns ? p.c : p.m, other_count = kColumns ? p.m : p.c;
  const float s = *p.scale;
  const float s2 = s * kLog2e;
  const bool vector = vector_copies(p, Traits::kPerSeg);
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * Traits::kRows;
  const int d_slice = blockIdx.y * Traits::kSlice;
  // this split's streamed items (columns for the rows kernel, rows for the columns kernel)
  const int splits = kColumns ? p.col_splits : p.splits;
  const int64_t per_split = kColumns ? p.split_rows : p.split_cols;
  const int64_t y_begin = static_cast<int64_t>(blockIdx.z) * per_split;
  const int64_t y_end = y_begin + per_split < other_count ? y_begin + per_split : other_count;

  // (g_i, lse_i log2(e)) of row i; g = 0 and +inf for rows past m or with a non-finite lse
  const auto row_stats = [&](int64_t i, float& gi, float& lse2) {
    const float lse = i < p.m ? p.lse[i] : INFINITY;
    const bool live = isfinite(lse);
    gi = live ? p.grad[i] : 0.f;
    lse2 = live ? lse * kLog2e : INFINITY;
  };

  // factors: the stationary items' from down + own_offset, the streamed ones' from down + other_offset
  const int64_t own_offset = kColumns ? p.m : 0, other_offset = kColumns ? 0 : p.m;
  int64_t ex_first[2], ex_second[2];
  float g_own[2] = {0.f, 0.f}, lse2_own[2] = {INFINITY, INFINITY};  // rows kernel: the lane's two rows
  float own_mult[2];  // 1 / down of the lane's two stationary items (a power of two >= 1)
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int64_t x = x0 + 16 * warp + g + 8 * q;
    excluded_of<kColumns>(p, x, ex_first[q], ex_second[q]);
    if constexpr (!kColumns) row_stats(x, g_own[q], lse2_own[q]);
    own_mult[q] = x < own_count ? inverse_pow2(p.down[own_offset + x]) : 1.f;
  }
  const bool own_scaled = load_down<Traits>(sm.own_down(), Traits::kRows, p.down + own_offset, x0, own_count);
  float du[Traits::kSliceTiles8][4];
#pragma unroll
  for (int dn = 0; dn < Traits::kSliceTiles8; ++dn) du[dn][0] = du[dn][1] = du[dn][2] = du[dn][3] = 0.f;
  float dscale_sum = 0.f;

  for (int64_t y0 = y_begin; y0 < y_end; y0 += Traits::kCols) {
    // the streamed tile's row statistics and feature slice (visible after block_score_tile's barriers)
    if constexpr (kColumns) {
      for (int i = threadIdx.x; i < Traits::kCols; i += Traits::kThreads) {
        row_stats(y0 + i, sm.tile_g()[i], sm.tile_lse2()[i]);
      }
    }
    const auto v_row = [&](int r) {
      return y0 + r < other_count ? other + (y0 + r) * p.dim : static_cast<const Element*>(nullptr);
    };
    copy_rows<Traits, Traits::kCols, Traits::kSlice>(sm.v_slice(), Traits::kSliceStride, v_row, d_slice, p.dim,
                                                     vector, own);
    cp_async_commit();  // lands with chunk 0 of block_score_tile (its waits cover older groups)
    const bool tile_scaled = load_down<Traits>(sm.tile_down(), Traits::kCols, p.down + other_offset, y0, other_count);
    const bool rescale = __syncthreads_or(own_scaled || tile_scaled) != 0;

    float acc[Traits::kColTiles8][4];
    block_score_tile<Traits>(acc, sm, own, x0, own_count, other, y0, other_count, p.dim, vector, rescale, warp,
                             lane);
    const bool mask = tile_needs_mask(y0, Traits::kCols, other_count, ex_first, ex_second);
    // W (= dS, the streamed index along n) in place of the dot products
#pragma unroll
    for (int nt = 0; nt < Traits::kColTiles8; ++nt) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = 8 * nt + 2 * t + e;
          float logit2 = acc[nt][2 * q + e] * s2 * own_mult[q];  // S log2(e) (see the forward)
          if (rescale) logit2 *= inverse_pow2(sm.tile_down()[jj]);
          float w;
          if constexpr (kColumns) {
            w = sm.tile_g()[jj] * exp2_approx(logit2 - sm.tile_lse2()[jj]);
          } else {
            w = g_own[q] * exp2_approx(logit2 - lse2_own[q]);
          }
          if (mask) {
            const int64_t y = y0 + jj;
            if (y >= other_count || y == ex_first[q] || y == ex_second[q]) w = 0.f;
          }
          if constexpr (!kColumns) dscale_sum = fmaf(w, logit2, dscale_sum);  // sum W S log2(e)
          acc[nt][2 * q + e] = w;
        }
      }
    }
    mma_weights_slice<Traits>(du, acc, sm.v_slice(), lane);
    __syncthreads();  // v_slice and the tile statistics are rewritten by the next tile
  }

  // out[x, d_slice + ...] = s du, fp32 (pairs of features as one 8-byte store when dim is even);
  // with splits, this split's partial output in the workspace
  float* out_base = splits == 1 ? (kColumns ? p.dcols : p.drows)
                                : p.workspace + static_cast<int64_t>(blockIdx.z) * own_count * p.dim;
  const bool paired = p.dim % 2 == 0;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int64_t x = x0 + 16 * warp + g + 8 * q;
    if (x >= own_count) continue;
    float* out = out_base + x * p.dim;
#pragma unroll
    for (int dn = 0; dn < Traits::kSliceTiles8; ++dn) {
      const int d = d_slice + 8 * dn + 2 * t;
      const float v0 = s * du[dn][2 * q], v1 = s * du[dn][2 * q + 1];
      if (paired && d + 1 < p.dim) {
        *reinterpret_cast<float2*>(out + d) = make_float2(v0, v1);
      } else {
        if (d < p.dim) out[d] = v0;
        if (d + 1 < p.dim) out[d + 1] = v1;
      }
    }
  }

  // the row block's (and split's) dscale partial (slice 0 only), summed in a fixed order
  if constexpr (!kColumns) {
    if (blockIdx.y == 0) {
      dscale_sum = warp_sum(dscale_sum);
      if (lane == 0) sm.warp_part()[warp] = dscale_sum;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < Traits::kWarps; ++w) total += sm.warp_part()[w];
        // 2 sum W S (dscale_finalize_kernel divides by 2 s)
        p.dscale_partials[static_cast<int64_t>(blockIdx.z) * gridDim.x + blockIdx.x] = total * (2.f * kLn2);
      }
    }
  }
}

// out[k] = sum over the splits of parts[split][k], in split order (partial drows or dcols).
__global__ void __launch_bounds__(256) infonce_block_split_sum_kernel(const float* parts, int64_t count, int splits,
                                                                      float* out) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * 256) {
    float total = 0.f;
    for (int split = 0; split < splits; ++split) total += parts[split * count + k];
    out[k] = total;
  }
}

unsigned grid_for(int64_t count) {
  const int64_t blocks = (count + 255) / 256;
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

// Streamed items per split: whole tiles, every split non-empty (infonce_block_splits).
int64_t items_per_split(int64_t streamed, int splits) {
  const int64_t tiles = (streamed + kInfonceBlockTile - 1) / kInfonceBlockTile;
  const int64_t per = splits > 1 ? (tiles + splits - 1) / splits : (tiles > 0 ? tiles : 1);
  return per * kInfonceBlockTile;
}

// The power-of-two factors of the rows and the columns (InfonceBlockProblem::down).
template <typename Element>
cudaError_t launch_down(const InfonceBlockProblem& p, cudaStream_t stream) {
  const int64_t items = p.m + p.c;
  if (items <= 0) return cudaSuccess;
  infonce_block_down_kernel<Element><<<static_cast<unsigned>((items + 7) / 8), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t forward_impl(const InfonceBlockFwdParams& p, cudaStream_t stream) {
  using Traits = BlockTraits<Element>;
  const size_t smem = Traits::fwd_smem_bytes();
  auto kernel = infonce_block_fwd_kernel<Traits>;
  static std::atomic<unsigned long long> smem_set{0};
  cudaError_t status = allow_smem(kernel, smem, smem_set);
  if (status != cudaSuccess) return status;
  status = launch_down<Element>(p, stream);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>((p.m + Traits::kRows - 1) / Traits::kRows), static_cast<unsigned>(p.splits));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  status = cudaGetLastError();
  if (status != cudaSuccess || p.splits == 1) return status;
  infonce_block_lse_merge_kernel<<<static_cast<unsigned>((p.m + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// One of the two backward kernels over `items` stationary rows (kColumns false) or columns.
template <typename Element, bool kColumns>
cudaError_t backward_kernel(const InfonceBlockBwdParams& p, int64_t items, cudaStream_t stream) {
  using Traits = BlockTraits<Element>;
  if (items <= 0) return cudaSuccess;
  const int splits = kColumns ? p.col_splits : p.splits;
  const size_t smem = Traits::bwd_smem_bytes();
  auto kernel = infonce_block_bwd_kernel<Traits, kColumns>;
  static std::atomic<unsigned long long> smem_set{0};
  cudaError_t status = allow_smem(kernel, smem, smem_set);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>((items + Traits::kRows - 1) / Traits::kRows),
                  static_cast<unsigned>((p.dim + Traits::kSlice - 1) / Traits::kSlice),
                  static_cast<unsigned>(splits));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
  status = cudaGetLastError();
  if (status != cudaSuccess || splits == 1) return status;
  // the splits' partial outputs, summed in split order (before the next kernel reuses the workspace)
  const int64_t count = items * p.dim;
  infonce_block_split_sum_kernel<<<grid_for(count), 256, 0, stream>>>(p.workspace, count, splits,
                                                                      kColumns ? p.dcols : p.drows);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t backward_impl(const InfonceBlockBwdParams& p, cudaStream_t stream) {
  cudaError_t status = launch_down<Element>(p, stream);
  if (status != cudaSuccess) return status;
  status = backward_kernel<Element, false>(p, p.m, stream);
  if (status != cudaSuccess) return status;
  status = backward_kernel<Element, true>(p, p.c, stream);
  if (status != cudaSuccess) return status;
  // m = 0: no partials, dscale = 0
  // dscale = sum W S / s: the partials hold 2 sum W S
  dscale_finalize_kernel<<<1, 256, 0, stream>>>(p.dscale_partials, infonce_block_dscale_partials(p.m, p.splits),
                                                p.scale, /*halve_by_scale=*/true, p.dscale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t infonce_block_forward(const InfonceBlockFwdParams& params, cudaStream_t stream) {
  if (params.m <= 0 || params.dim <= 0) return cudaSuccess;
  if (params.splits < 1 || (params.splits > 1 && params.workspace == nullptr) || params.down == nullptr) {
    return cudaErrorInvalidValue;
  }
  InfonceBlockFwdParams p = params;
  p.split_cols = items_per_split(p.c, p.splits);
  switch (p.dtype) {
    case Dtype::kFloat32: return forward_impl<float>(p, stream);
    case Dtype::kFloat16: return forward_impl<__half>(p, stream);
    case Dtype::kBFloat16: return forward_impl<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t infonce_block_backward(const InfonceBlockBwdParams& params, cudaStream_t stream) {
  if (params.dim <= 0) return cudaErrorInvalidValue;  // the op's checks require D >= 1
  if (params.splits < 1 || params.col_splits < 1 ||
      ((params.splits > 1 || params.col_splits > 1) && params.workspace == nullptr) || params.down == nullptr) {
    return cudaErrorInvalidValue;
  }
  InfonceBlockBwdParams p = params;
  p.split_cols = items_per_split(p.c, p.splits);
  p.split_rows = items_per_split(p.m, p.col_splits);
  switch (p.dtype) {
    case Dtype::kFloat32: return backward_impl<float>(p, stream);
    case Dtype::kFloat16: return backward_impl<__half>(p, stream);
    case Dtype::kBFloat16: return backward_impl<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cl_fast::cuda
