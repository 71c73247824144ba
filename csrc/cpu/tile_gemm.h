#pragma once
// The three fp32 tile products of the fused CPU losses (row-major, single-threaded: they run
// inside the kernels' own parallel loops).
//
//   gemm_nt     C  = A B^T   (m x n, k)   the logits tile: A, B are row blocks of the inputs
//   gemm_nn_acc C += A B     (m x n, k)   dU_I += W' U_J
//   gemm_tn_acc C += A^T B   (m x n, k)   dU_J += W'^T U_I   (A is k x m)
//
// Two implementations: MKL's sgemm (the one libtorch links; found at load time) and an at::vec
// register-blocked micro-kernel used where no sgemm is exported or when CL_FAST_CPU_GEMM=vec.
// MKL is the default: about twice the at::vec kernel's rate here (numbers in tile_gemm.cpp).
#include <cstdint>

namespace cl_fast::cpu {

// True when the BLAS path is in use (sgemm_ found and not overridden by CL_FAST_CPU_GEMM=vec).
bool tile_gemm_uses_blas();

// Makes BLAS calls on this thread single-threaded for the guard's lifetime (the fused kernels
// parallelise over tiles themselves; a nested multi-threaded sgemm would oversubscribe and make
// the result depend on the thread count).
class TileGemmThreadGuard {
 public:
  TileGemmThreadGuard();
  ~TileGemmThreadGuard();
  TileGemmThreadGuard(const TileGemmThreadGuard&) = delete;
  TileGemmThreadGuard& operator=(const TileGemmThreadGuard&) = delete;

 private:
  int previous_;
  bool active_;
};

// `pack` is scratch of at least k * round_up(n, 2 * Vec::size()) floats (at::vec path only).
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
             float* c, int64_t ldc, float* pack);
void gemm_nn_acc(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc);
void gemm_tn_acc(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc);

}  // namespace cl_fast::cpu
