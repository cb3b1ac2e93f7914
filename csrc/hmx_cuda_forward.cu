// Fused HyperMixing forward on CUDA, without an [N, k] tensor in global memory.
//
//   1. p_partial_kernel, one block per (b, h, key chunk): tiles of kCudaTile keys stream through
//      shared memory; the block builds z, U = z fc1^T + b1, Hd = GELU(U), W1 = (Hd fc2^T + b2) m_k
//      and V = value m_k on chip and adds W1^T V ([k_h, T] @ [T, d_h]) into its fp32 partial of P.
//   2. p_reduce_kernel: P[b, h] = sum of the chunk partials in chunk order (deterministic: the
//      chunk split depends on N only, never on the GPU).
//   3. y_kernel, one block per (b, h, query chunk): W2 tiles on chip, Y = W2 GELU(P)
//      ([T, k_h] @ [k_h, d_h]) written in the input type. LayerNorm is applied by the caller.
// Workspace: B * H * C_k * k_h * d_h floats (the P partials), tiny next to the inputs.
// Trade-off: see hmx_cuda_common.cuh (SIMT fp32 products; no tensor cores yet).
#include <cuda_runtime.h>

#include "hmx_cuda.h"
#include "hmx_cuda_common.cuh"

namespace hmx {
namespace cuda {
namespace {

using namespace dev;

template <typename T>
__global__ void __launch_bounds__(kThreads) p_partial_kernel(ProblemParams pb, float* __restrict__ p_part, int use_mma) {
  extern __shared__ __align__(128) float smem[];
  const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const int64_t C = num_chunks(pb.N, kCudaTile);
  const int64_t item = blockIdx.x;
  const int64_t c = item % C, bh = item / C, h = bh % pb.H, b = bh / pb.H;
  Tile tile = carve_tile(smem, dh, kh);
  const HeadW<T> w = head_weights<T>(pb.g1, h, dh, kh);
  const MmaStage<T> st = mma_active<T>(use_mma) ? stage_fc2<T>(smem, tile_floats(dh, kh), w, dh, kh) : MmaStage<T>();
  const T* kx = static_cast<const T*>(pb.k) + b * pb.k_bstride + h * dh;
  const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
  const float* pe = static_cast<const float*>(pb.pe_k) + h * dh;
  const float* mask = pb.m_k ? static_cast<const float*>(pb.m_k) + b * pb.N : nullptr;
  float* part = p_part + item * kh * dh;
  for (int64_t i = threadIdx.x; i < kh * dh; i += blockDim.x) part[i] = 0.f;
  int64_t c0, c1;
  chunk_rows(pb.N, C, c, &c0, &c1);
  for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
    const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
    load_z<T>(kx, pb.k_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
    load_rows<T>(vx, pb.v_rstride, dh, r0, tn, tile.m, tile.x2);
    mlp_forward<T>(w, dh, kh, tn, tile, st);  // ends with __syncthreads
    // P += W1^T V: [k_h, T] @ [T, d_h] -> [k_h, d_h]; thread i always owns the same elements
    for (int64_t i = threadIdx.x; i < kh * dh; i += blockDim.x) {
      const int64_t j = i / dh, cc = i % dh;
      float acc = 0.f;
      for (int64_t t = 0; t < tn; ++t) acc = fmaf(tile.w[t * kh + j], tile.x2[t * dh + cc], acc);
      part[i] += acc;
    }
    __syncthreads();
  }
}

__global__ void p_reduce_kernel(int64_t BH, int64_t C, int64_t psz, const float* __restrict__ p_part,
                                float* __restrict__ p) {
  const int64_t bh = blockIdx.x;
  for (int64_t i = threadIdx.x; i < psz; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) acc += p_part[(bh * C + c) * psz + i];
    p[bh * psz + i] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) y_kernel(ProblemParams pb, const float* __restrict__ p, T* __restrict__ y,
                                                     int use_mma) {
  extern __shared__ __align__(128) float smem[];
  const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d, M = pb.M;
  const int64_t C = num_chunks(M, kCudaTile);
  const int64_t item = blockIdx.x;
  const int64_t c = item % C, bh = item / C, h = bh % pb.H, b = bh / pb.H;
  Tile tile = carve_tile(smem, dh, kh);
  float* a = smem + tile_floats(dh, kh);  // A = GELU(P) [k_h, d_h]
  for (int64_t i = threadIdx.x; i < kh * dh; i += blockDim.x) a[i] = gelu(p[bh * kh * dh + i]);
  const HeadW<T> w = head_weights<T>(pb.g2, h, dh, kh);
  const MmaStage<T> st =
      mma_active<T>(use_mma) ? stage_fc2<T>(smem, tile_floats(dh, kh) + kh * dh, w, dh, kh) : MmaStage<T>();
  const T* qx = static_cast<const T*>(pb.q) + b * pb.q_bstride + h * dh;
  const float* pe = static_cast<const float*>(pb.pe_q) + h * dh;
  const float* mask = pb.m_q ? static_cast<const float*>(pb.m_q) + b * M : nullptr;
  int64_t c0, c1;
  chunk_rows(M, C, c, &c0, &c1);
  for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
    const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
    load_z<T>(qx, pb.q_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
    mlp_forward<T>(w, dh, kh, tn, tile, st);
    // Y = W2 A: [T, k_h] @ [k_h, d_h] -> [T, d_h]
    for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
      const int64_t t = i / dh, cc = i % dh;
      float acc = 0.f;
      for (int64_t j = 0; j < kh; ++j) acc = fmaf(tile.w[t * kh + j], a[j * dh + cc], acc);
      y[(b * M + r0 + t) * d + h * dh + cc] = from_f<T>(acc);
    }
    __syncthreads();
  }
}

size_t fwd_p_floats(const ProblemParams& pb) { return tile_floats(pb.d_h, pb.k_h); }
size_t fwd_y_floats(const ProblemParams& pb) { return tile_floats(pb.d_h, pb.k_h) + pb.k_h * pb.d_h; }

template <typename T>
int forward_t(const ForwardParams& fp, bool mma, void* workspace, cudaStream_t stream) {
  const ProblemParams& pb = fp.pb;
  const int64_t BH = pb.B * pb.H, psz = pb.k_h * pb.d_h;
  const int64_t Ck = num_chunks(pb.N, kCudaTile), Cq = num_chunks(pb.M, kCudaTile);
  float* p_part = static_cast<float*>(workspace);
  const int mma1 = pick_mma(mma, fwd_p_floats(pb), pb.d_h, pb.k_h);
  const int mma2 = pick_mma(mma, fwd_y_floats(pb), pb.d_h, pb.k_h);
  const size_t s1 = smem_bytes(fwd_p_floats(pb), pb.d_h, pb.k_h, mma1 != 0);
  const size_t s2 = smem_bytes(fwd_y_floats(pb), pb.d_h, pb.k_h, mma2 != 0);
  cudaError_t err = cudaFuncSetAttribute(p_partial_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s1);
  if (err != cudaSuccess) return (int)err;
  err = cudaFuncSetAttribute(y_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s2);
  if (err != cudaSuccess) return (int)err;
  p_partial_kernel<T><<<(unsigned)(BH * Ck), kThreads, s1, stream>>>(pb, p_part, mma1);
  p_reduce_kernel<<<(unsigned)BH, kThreads, 0, stream>>>(BH, Ck, psz, p_part, static_cast<float*>(fp.p));
  y_kernel<T><<<(unsigned)(BH * Cq), kThreads, s2, stream>>>(pb, static_cast<const float*>(fp.p),
                                                            static_cast<T*>(fp.y), mma2);
  return (int)cudaGetLastError();
}

}  // namespace

size_t max_smem_bytes(const ProblemParams& pb);  // hmx_cuda_backward.cu

const char* not_supported(const ProblemParams& pb) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "no CUDA device";
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "cannot query the device's shared memory size";
  // the FMA path's needs (the MMA path is taken only where its larger staging area fits)
  size_t need = max_smem_bytes(pb);
  if (fwd_y_floats(pb) * sizeof(float) > need) need = fwd_y_floats(pb) * sizeof(float);
  if (need > (size_t)optin) return "d_h / k_h too large for this GPU's shared memory per block";
  const int64_t blocks = pb.B * pb.H * kMaxChunks;
  if (blocks > 2147483647LL) return "batch * heads too large for one grid";
  return nullptr;
}

size_t forward_workspace_bytes(const ProblemParams& pb) {
  return (size_t)(pb.B * pb.H * num_chunks(pb.N, kCudaTile) * pb.k_h * pb.d_h) * sizeof(float);
}

int forward(const ForwardParams& fp, DType dtype, void* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF16: return forward_t<__half>(fp, mma_wanted(dtype), workspace, stream);
    case DType::kBF16: return forward_t<__nv_bfloat16>(fp, mma_wanted(dtype), workspace, stream);
    default: return forward_t<float>(fp, false, workspace, stream);
  }
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace hmx
