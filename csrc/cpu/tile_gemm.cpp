// fp32 tile products for the fused CPU losses; see tile_gemm.h.
//
// Which wins (nt_xent forward + backward, 2N = 16384, D = 128, fp32, 2 threads, -mavx2 build on
// the 2-core EPYC dev box): MKL's sgemm per tile, 1.77 s CPU (~80 GFLOP/s per core, its peak);
// the at::vec 6 x (2 * VEC) register-blocked kernel below, 3.88 s CPU (~37 GFLOP/s). So MKL is
// the default; the at::vec kernel is the portable fallback (a libtorch without an exported
// sgemm_) and is selectable with CL_FAST_CPU_GEMM=vec so that path stays tested.
#include "cpu_vec.h"

#include "tile_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

extern "C" {
// Fortran BLAS (LP64), exported by libtorch_cpu where it links MKL. Weak: null if absent.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's C entry point (the lower-case symbol is the Fortran one, taking a pointer).
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));
}

namespace cl_fast::cpu {
namespace {

bool blas_enabled() {
  static const bool enabled = [] {
    const char* choice = std::getenv("CL_FAST_CPU_GEMM");
    if (choice != nullptr && std::strcmp(choice, "vec") == 0) return false;
    return sgemm_ != nullptr;
  }();
  return enabled;
}

// Row-major C (m x n) is column-major C^T, so every call below swaps the operands.
void sgemm_rowmajor(char trans_b, char trans_a, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                    const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float alpha = 1.f;
  sgemm_(&trans_b, &trans_a, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// ---- at::vec micro-kernel: C[MR x 2*kVec] (+)= A-panel x B-panel -------------------------
// a(i, p) = a[i * a_row + p * a_col]; row p of the B panel starts at b + p * ldb. A full panel
// reads 2*kVec columns of B; a partial one (the last, ncols < 2*kVec) loads with a count.
constexpr int64_t kMR = 6;
constexpr int64_t kNR = 2 * kVec;

template <int64_t MR, bool kFullPanel>
void micro_kernel(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                  int64_t ncols, float* c, int64_t ldc, bool accumulate) {
  Vec lo[MR], hi[MR];
  for (int64_t r = 0; r < MR; ++r) {
    lo[r] = Vec(0.f);
    hi[r] = Vec(0.f);
  }
  const int64_t n_lo = std::min(ncols, kVec), n_hi = ncols - n_lo;
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    Vec b_lo, b_hi;
    if constexpr (kFullPanel) {
      b_lo = Vec::loadu(bp);
      b_hi = Vec::loadu(bp + kVec);
    } else {
      b_lo = Vec::loadu(bp, n_lo);
      b_hi = n_hi > 0 ? Vec::loadu(bp + kVec, n_hi) : Vec(0.f);
    }
    const float* ap = a + p * a_col;
    for (int64_t r = 0; r < MR; ++r) {
      const Vec ar(ap[r * a_row]);
      lo[r] = at::vec::fmadd(ar, b_lo, lo[r]);
      hi[r] = at::vec::fmadd(ar, b_hi, hi[r]);
    }
  }
  for (int64_t r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (ncols == kNR) {
      if (accumulate) {
        (Vec::loadu(cr) + lo[r]).store(cr);
        (Vec::loadu(cr + kVec) + hi[r]).store(cr + kVec);
      } else {
        lo[r].store(cr);
        hi[r].store(cr + kVec);
      }
    } else {
      Vec out_lo = lo[r], out_hi = hi[r];
      if (accumulate) {
        out_lo = out_lo + Vec::loadu(cr, n_lo);
        if (n_hi > 0) out_hi = out_hi + Vec::loadu(cr + kVec, n_hi);
      }
      out_lo.store(cr, n_lo);
      if (n_hi > 0) out_hi.store(cr + kVec, n_hi);
    }
  }
}

template <bool kFullPanel>
void micro_rows(int64_t rows, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                int64_t ldb, int64_t ncols, float* c, int64_t ldc, bool accumulate) {
  switch (rows) {
    case 6: return micro_kernel<6, kFullPanel>(k, a, a_row, a_col, b, ldb, ncols, c, ldc, accumulate);
    case 5: return micro_kernel<5, kFullPanel>(k, a, a_row, a_col, b, ldb, ncols, c, ldc, accumulate);
    case 4: return micro_kernel<4, kFullPanel>(k, a, a_row, a_col, b, ldb, ncols, c, ldc, accumulate);
    case 3: return micro_kernel<3, kFullPanel>(k, a, a_row, a_col, b, ldb, ncols, c, ldc, accumulate);
    case 2: return micro_kernel<2, kFullPanel>(k, a, a_row, a_col, b, ldb, ncols, c, ldc, accumulate);
    default: return micro_kernel<1, kFullPanel>(k, a, a_row, a_col, b, ldb, ncols, c, ldc, accumulate);
  }
}

// C (m x n) (+)= A (m x k, via a_row/a_col) x B (k x n, row stride ldb). `padded`: B has
// round_up(n, kNR) readable columns, so every panel is a full one.
void vec_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate, bool padded) {
  for (int64_t j = 0; j < n; j += kNR) {
    const int64_t ncols = std::min(kNR, n - j);
    const bool full = padded || ncols == kNR;
    for (int64_t i = 0; i < m; i += kMR) {
      const int64_t rows = std::min(kMR, m - i);
      const float* ai = a + i * a_row;
      float* cij = c + i * ldc + j;
      if (full) {
        micro_rows<true>(rows, k, ai, a_row, a_col, b + j, ldb, ncols, cij, ldc, accumulate);
      } else {
        micro_rows<false>(rows, k, ai, a_row, a_col, b + j, ldb, ncols, cij, ldc, accumulate);
      }
    }
  }
}

}  // namespace

bool tile_gemm_uses_blas() { return blas_enabled(); }

TileGemmThreadGuard::TileGemmThreadGuard() : previous_(0), active_(blas_enabled() && MKL_Set_Num_Threads_Local) {
  if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
}

TileGemmThreadGuard::~TileGemmThreadGuard() {
  if (active_) MKL_Set_Num_Threads_Local(previous_);
}

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
             float* c, int64_t ldc, float* pack) {
  if (blas_enabled()) {
    sgemm_rowmajor('T', 'N', m, n, k, a, lda, b, ldb, 0.f, c, ldc);
    return;
  }
  // Pack B^T (k x n, zero-padded to whole panels) so the micro-kernel reads rows of it.
  const int64_t ldp = (n + kNR - 1) / kNR * kNR;
  for (int64_t p = 0; p < k; ++p) {
    float* row = pack + p * ldp;
    for (int64_t j = 0; j < n; ++j) row[j] = b[j * ldb + p];
    for (int64_t j = n; j < ldp; ++j) row[j] = 0.f;
  }
  vec_gemm(m, n, k, a, lda, 1, pack, ldp, c, ldc, /*accumulate=*/false, /*padded=*/true);
}

void gemm_nn_acc(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
  if (blas_enabled()) {
    sgemm_rowmajor('N', 'N', m, n, k, a, lda, b, ldb, 1.f, c, ldc);
    return;
  }
  vec_gemm(m, n, k, a, lda, 1, b, ldb, c, ldc, /*accumulate=*/true, /*padded=*/false);
}

void gemm_tn_acc(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
  if (blas_enabled()) {
    sgemm_rowmajor('N', 'T', m, n, k, a, lda, b, ldb, 1.f, c, ldc);
    return;
  }
  vec_gemm(m, n, k, a, 1, lda, b, ldb, c, ldc, /*accumulate=*/true, /*padded=*/false);
}

}  // namespace cl_fast::cpu
