// Block and window sums of blocked mixing (the algorithm: hmx_cuda_blocks.cuh). Memory-bound and
// small next to the token passes: nb * (pieces per block + 2) reads of a D x D state per (b, h).
#include "hmx_cuda_blocks.cuh"

#include <cuda_runtime.h>

namespace hmx {
namespace cuda {

struct WindowArgs {
  WindowJob job;
  const int32_t* block_piece;  // [nb + 1]
  const int32_t* seq_first;    // [nb]
  const int32_t* seq_last;     // [nb]
  int64_t BH, nb, n_pieces;
};

// one thread per (b h, element)
__global__ void __launch_bounds__(kThreads) block_window_kernel(WindowArgs a) {
  const WindowJob& w = a.job;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.BH * w.E) return;
  const int64_t bh = i / w.E, e = i % w.E, nb = a.nb, E = w.E;
  float* __restrict__ x = w.dst + bh * nb * E + e;  // x[j * E]
  if (w.part != nullptr) {  // block sums, in piece order
    const float* __restrict__ p = w.part + bh * a.n_pieces * w.per_piece * E + e;
    for (int64_t j = 0; j < nb; ++j) {
      float acc = 0.f;
      const int64_t q1 = (int64_t)a.block_piece[j + 1] * w.per_piece;
      for (int64_t q = (int64_t)a.block_piece[j] * w.per_piece; q < q1; ++q) acc += p[q * E];
      x[j * E] = acc;
    }
  }
  if (w.width == 1) return;
  // position k walks the blocks (reverse: from the last); first(k): the position of the first
  // block of its sequence in that order
  auto blk = [&](int64_t k) { return w.reverse ? nb - 1 - k : k; };
  auto first = [&](int64_t k) {
    return w.reverse ? nb - 1 - (int64_t)a.seq_last[nb - 1 - k] : (int64_t)a.seq_first[k];
  };
  const int64_t W = w.width;
  float* __restrict__ y = w.scratch + bh * nb * E + e;
  if (W > 1) {  // suffix sums within segments (right to left)
    float run = 0.f;
    for (int64_t k = nb - 1; k >= 0; --k) {
      const int64_t f = first(k);
      const bool seg_end = k == nb - 1 || first(k + 1) != f || (k + 1 - f) % W == 0;
      run = seg_end ? x[blk(k) * E] : x[blk(k) * E] + run;
      y[blk(k) * E] = run;
    }
  }
  float pre = 0.f;
  for (int64_t k = 0; k < nb; ++k) {  // prefix sums within segments, and the windows (in place)
    const int64_t f = first(k);
    const int64_t g = W > 0 ? f + (k - f) / W * W : f;  // k's segment start
    const float xk = x[blk(k) * E];
    pre = k == g ? xk : pre + xk;
    const int64_t s = W > 0 && k - W + 1 > f ? k - W + 1 : f;  // the window's first position
    x[blk(k) * E] = s == g ? pre : y[blk(s) * E] + pre;
  }
}

cudaError_t block_windows(const BlockPlan& plan, int64_t BH, const WindowJob& job, cudaStream_t stream) {
  WindowArgs a{job, plan.block_piece(), plan.seq_first(), plan.seq_last(), BH, plan.nb, plan.n_pieces};
  const int64_t n = BH * job.E;
  if (n == 0 || plan.nb == 0) return cudaSuccess;
  block_window_kernel<<<(unsigned)((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t block_windows(const BlockPlan& plan, int64_t BH, const WindowJob& mat, const WindowJob& vec,
                          cudaStream_t stream) {
  const cudaError_t err = block_windows(plan, BH, mat, stream);
  return err != cudaSuccess ? err : block_windows(plan, BH, vec, stream);
}

// one thread per (row, element)
__global__ void __launch_bounds__(kThreads) row_sums_kernel(const float* __restrict__ part, int64_t R, int64_t P,
                                                            int64_t E, float* __restrict__ out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= R * E) return;
  const int64_t r = i / E, e = i % E;
  const float* p = part + r * P * E + e;
  float acc = 0.f;
  for (int64_t q = 0; q < P; ++q) acc += p[q * E];
  out[i] = acc;
}

cudaError_t row_sums(const float* part, int64_t R, int64_t P, int64_t E, float* out, cudaStream_t stream) {
  const int64_t n = R * E;
  if (n == 0) return cudaSuccess;
  row_sums_kernel<<<(unsigned)((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(part, R, P, E, out);
  return cudaGetLastError();
}

cudaError_t reducer_sums(const float* mat_part, int64_t n_mat, const float* vec_part, int64_t n_vec, int64_t BH,
                         int64_t D, float* out, cudaStream_t stream) {
  const cudaError_t err = row_sums(mat_part, BH, n_mat, D * D, out, stream);
  return err != cudaSuccess ? err : row_sums(vec_part, BH, n_vec, D, out + BH * D * D, stream);
}

}  // namespace cuda
}  // namespace hmx
