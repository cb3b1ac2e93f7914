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
#include <cstddef>
#include <cstdint>

#include "hmx_params.h"

namespace hmx {
namespace cpu {

// Token tile of the CPU twin (the CUDA kernels use kTokenTile); work chunks are whole tiles.
constexpr int64_t kCpuTile = 256;

// Token-causal mixing (chunk_size 1, unbounded left context) runs as a scan over the tokens
// (hmx_cpu_scan.h, "token-causal mixing as a scan"); its state slots are checkpoints of P, one per
// tile of kCpuTile tokens, not one per token.
inline bool token_scan(int64_t chunk_size, int64_t left_context) { return chunk_size == 1 && left_context < 0; }
inline bool token_scan(const ProblemParams& pb) { return token_scan(pb.chunk_size, pb.left_context); }

// [k_h, d_h] state slots per (b, h) the forward writes to p (the op's state) for N tokens per
// row: one per mixing block (`blocks` of them), or for the token scan one per tile and, last, the
// state after the last token (P^T, as a block's; streaming hands it to the next piece).
inline int64_t state_slots(int64_t N, int64_t chunk_size, int64_t left_context, int64_t blocks) {
  return token_scan(chunk_size, left_context) ? (N + kCpuTile - 1) / kCpuTile + 1 : blocks;
}

// Column-major BLAS convention: C = alpha op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n],
// C [m, n]; trans 'N' or 'T'; beta = 0 never reads C.
template <typename T>
using GemmFn = void (*)(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                        int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// Sequence parallelism: hmx::Reducer (hmx_params.h), called between the passes on the calling
// thread, outside any OpenMP region, with the key sums S, sv (forward) or the query sums T, sdy
// (backward) per (b, h, block) in the compute type.
using hmx::Reducer;

void forward_f32(const ForwardParams& p, GemmFn<float> gemm, int nthreads, const Reducer& reduce = Reducer());
void forward_f64(const ForwardParams& p, GemmFn<double> gemm, int nthreads, const Reducer& reduce = Reducer());
void backward_f32(const BackwardParams& p, GemmFn<float> gemm, int nthreads, const Reducer& reduce = Reducer());
void backward_f64(const BackwardParams& p, GemmFn<double> gemm, int nthreads, const Reducer& reduce = Reducer());
// The twin keeps its working buffers between calls in a per-thread pool (hmx_cpu.cpp BufferPool,
// at most 256 MiB per thread): release_buffers() frees the calling thread's pooled blocks and
// returns how many bytes they held; pooled_bytes() is what the calling thread's pool holds now.
size_t release_buffers();
size_t pooled_bytes();
}  // namespace cpu
}  // namespace hmx
