// Entry points of the CPU twin (hmx_cpu.cpp): the fused forward and backward passes for fp32 and
// fp64, parallel over (batch, head, token chunk) with `nthreads` OpenMP threads. Pointers and
// layouts as described in hmx_params.h (every pointer is the compute type).
//
// The per-tile matrix products go through a BLAS gemm the caller passes in (the binding passes
// torch's CPU BLAS), so this file and hmx_cpu.cpp stay free of torch headers. The gemm is
// called from inside the OpenMP region, one call per thread at a time; it must be
// single-threaded there (OpenMP BLAS runtimes do not nest) and deterministic for fixed sizes.
// gemm == nullptr: plain loops instead (slower; for torch builds without a BLAS).
#pragma once
#include <cstdint>

#include "hmx_params.h"

namespace hmx {
namespace cpu {

// Column-major BLAS convention: C = alpha op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n],
// C [m, n]; trans 'N' or 'T'; beta = 0 never reads C.
template <typename T>
using GemmFn = void (*)(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                        int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

void forward_f32(const ForwardParams& p, GemmFn<float> gemm, int nthreads);
void forward_f64(const ForwardParams& p, GemmFn<double> gemm, int nthreads);
void backward_f32(const BackwardParams& p, GemmFn<float> gemm, int nthreads);
void backward_f64(const BackwardParams& p, GemmFn<double> gemm, int nthreads);
}  // namespace cpu
}  // namespace hmx
