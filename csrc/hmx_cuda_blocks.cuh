// Block and window sums of blocked mixing on the device (hmx_cuda_blocks.cu), between the token
// passes and the finalize passes of hmx_cuda_forward.cu / hmx_cuda_backward.cu; and the row sums
// of chunk partials that sequence parallelism all-reduces.
//
// For every (b h, element e) one thread walks the blocks of the row in order, so every sum has one
// owner and a fixed order (no atomics):
// 1. block sums (part != nullptr): x_j = the partials of block j's pieces, added in piece order;
// 2. windows (width != 1): y_j = x_i summed over i = max(first block of j's sequence, j - width + 1)
//    .. j (width 0: from the sequence's first block). Exact sums in O(nb) per element whatever the
//    width: each sequence is cut into segments of `width` blocks from its first block; a suffix
//    pass (right to left, within segments) and a prefix pass (left to right) give
//    y_j = pre_j                   where the window starts at j's segment start,
//    y_j = suf_s + pre_j           else (s = the window's first block, in the segment before j's),
//    pre_j = ((x_g + x_g+1) + ...) + x_j from j's segment start g, suf_s = x_s + (x_s+1 + (...)) to
//    the end of s's segment. reverse: the same on the blocks in reverse order (sequences reversed),
//    i.e. y_i = x_j summed over the blocks j whose window holds i (the backward's R, r0).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "hmx_cuda.h"

namespace hmx {
namespace cuda {

struct WindowJob {
  const float* part;    // [BH][n_pieces * per_piece][E] partials, or nullptr: dst holds the block values
  int64_t per_piece;    // partials per piece (K-splits or column-sum groups)
  float* dst;           // [BH][nb][E]: the result
  float* scratch;       // [BH][nb][E] (suffix sums; width > 1)
  int64_t E;            // elements per block
  int64_t width;        // 1: block sums only; 0: unbounded; else left_context + 1
  bool reverse;
};

// launches the block / window sums of `job` for BH rows of `plan`'s blocks on `stream`
cudaError_t block_windows(const BlockPlan& plan, int64_t BH, const WindowJob& job, cudaStream_t stream);
// the same for a matrix and a vector job of the same blocks (every use: a [D, D] sum and its [D]
// companion, e.g. S and sv); the first error, if any
cudaError_t block_windows(const BlockPlan& plan, int64_t BH, const WindowJob& mat, const WindowJob& vec,
                          cudaStream_t stream);

// Sequence parallelism (plain mixing): out[r][e] = sum over p < P of part[r][p][e] for rows r < R,
// e < E, added in p order (the order in which the finalize passes add the partials themselves)
cudaError_t row_sums(const float* part, int64_t R, int64_t P, int64_t E, float* out, cudaStream_t stream);
// The region a sequence-parallel Reducer sums (hmx_params.h): the row sums of a D x D state's
// partials [BH][n_mat][D * D] into out[0, BH D^2), then of its column sum's [BH][n_vec][D] into
// the BH D values after them; the first error, if any
cudaError_t reducer_sums(const float* mat_part, int64_t n_mat, const float* vec_part, int64_t n_vec, int64_t BH,
                         int64_t D, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace hmx
