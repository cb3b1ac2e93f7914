// Host entry points of the CUDA kernels (hmx_cuda_forward.cu, hmx_cuda_backward.cu).
// No torch headers: pointers, sizes and strides come in the structs of hmx_params.h, scratch
// memory in a caller-allocated workspace of *_workspace_bytes() bytes, work goes on `stream`.
// Return values are cudaError_t codes (0 = success).
//
// fp16 / bf16 run on tensor cores (sm_80+ code); the binding runs them through the fp32 kernels on
// upcast copies when tensor cores are switched off (HMX_KERNELS_CUDA_NO_MMA=1), so the `dtype`
// below is the one the kernels compute in. Sizes depend on the dtype (token tile) and on the
// current device (its SM count sets the number of token chunks), so pass the same dtype to the
// workspace functions as to forward / backward, on the same device.
//
// Mixing blocks (chunk-causal, packed sequences; hmx_params.h): the caller builds the piece table
// (hmx_pieces.h) with piece_tokens() tokens per piece, copies it to the device and passes a
// BlockPlan; the token passes then run over (piece, b h), every block gets its own state, the
// window sums run in a fixed order (no atomics) and the finalize passes run per (b, h, block).
// The default BlockPlan (no table) is plain mixing, on the plain kernels.
//
// Sequence parallelism (plain mixing only): with a `reduce` callback (hmx_params.h, Reducer) the
// token passes' chunk partials of the cross-slice sums are first added up per (b, h) (row_sums,
// the finalize passes' own order), then handed to `reduce` (one call per direction: S, sv in the
// forward; T, sdy in the backward), and the finalize passes read the reduced sums; the generator-2
// fc2 gradients come from the slice's own T, sdy (one more bwd_mid pass), so that the caller sums
// every weight gradient over the ranks, as with the CPU twin. Pass
// `reduced` = whether a callback will be given to the workspace functions too.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "hmx_params.h"

namespace hmx {
namespace cuda {

enum class DType { kF32, kF16, kBF16 };

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kMaxHeadDim = 128;  // d_h is padded to a block of 32, 64 or 128

struct BlockPlan {
  const int32_t* table = nullptr;  // device copy of PieceTable::data, or nullptr: plain mixing
  int64_t n_pieces = 0;            // pieces (PieceTable::n_pieces)
  int64_t nb = 1;                  // blocks per batch row (PieceTable::nb)
  int64_t width = 0;               // window in blocks: left_context + 1, or 0: the whole sequence so far
  bool blocked() const { return table != nullptr; }
  const int32_t* pieces() const { return table; }
  const int32_t* block_piece() const { return table + 4 * n_pieces; }
  const int32_t* seq_first() const { return table + 4 * n_pieces + nb + 1; }
  const int32_t* seq_last() const { return table + 4 * n_pieces + 2 * nb + 1; }
};

// nullptr when the kernels can run this problem on the current device, else the reason.
const char* not_supported(const ProblemParams& pb, DType dtype);
// tokens per piece of blocked mixing (a multiple of the token tile; about the plain chunk length)
int64_t piece_tokens(const ProblemParams& pb, DType dtype);
size_t forward_workspace_bytes(const ProblemParams& pb, const BlockPlan& plan, DType dtype, bool reduced = false);
size_t backward_workspace_bytes(const ProblemParams& pb, const BlockPlan& plan, DType dtype, bool reduced = false);
int forward(const ForwardParams& fp, const BlockPlan& plan, DType dtype, void* workspace, cudaStream_t stream,
            const Reducer& reduce = Reducer());
int backward(const BackwardParams& bp, const BlockPlan& plan, DType dtype, void* workspace, cudaStream_t stream,
             const Reducer& reduce = Reducer());
const char* error_string(int err);

}  // namespace cuda
}  // namespace hmx
