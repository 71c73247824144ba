#pragma once
// Plain-C launchers of csrc/cuda/normalize.cu (no torch types: the binding file wraps them).
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum ClFastDtype { CL_FAST_FLOAT32 = 0, CL_FAST_FLOAT16 = 1, CL_FAST_BFLOAT16 = 2 };

// y_i = x_i / max(||x_i||_2, 1e-12) for the rows of a contiguous (rows, cols) matrix, fp32
// compute, x's dtype out, enqueued on `stream` (a cudaStream_t). Returns a cudaError_t (0: ok).
int cl_fast_l2_normalize_cuda(const void* x, void* y, int64_t rows, int64_t cols, int dtype, void* stream);

#ifdef __cplusplus
}
#endif
