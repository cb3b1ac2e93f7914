// Fused HyperMixing backward on CUDA: every tile of W1 / W2 is recomputed on chip, never stored.
// The caller has already applied LayerNorm's backward, so dY is the gradient of Y = W2 GELU(P).
//
//   1. gelu_kernel: A = GELU(P) [B, H, k_h, d_h] (P saved by the forward).
//   2. query_kernel, one block per (b, h, query chunk): per tile recompute W2, then
//        dA_part += W2^T dY              [k_h, T] @ [T, d_h]
//        dW2 = (dY A^T) * m_q            [T, d_h] @ [d_h, k_h]
//      and the MLP2 backward: generator-2 weight partials, dquery = s * m_q * dz.
//   3. dp_kernel: dP = (sum of dA partials in chunk order) * GELU'(P).
//   4. key_kernel, one block per (b, h, key chunk): recompute W1, then
//        dW1 = (V dP^T) * m_k            [T, d_h] @ [d_h, k_h]
//        dvalue = (W1 dP) * m_k          [T, k_h] @ [k_h, d_h]
//      and the MLP1 backward: generator-1 weight partials, dkey = s * m_k * dz.
//   5. grad_reduce_kernel: weight gradients = sum over (b, chunk) of the partials, fixed order.
// Every partial element is owned by one thread of one block: no atomics, deterministic.
// Tensor cores: only the W1 / W2 recompute's fc2 product (fp16/bf16, sm_80+, see
// hmx_cuda_common.cuh); the gradient products are SIMT fp32 FMA.
// Workspace (floats): A, dP [B H k_h d_h]; dA partials [B H C_q k_h d_h]; generator partials
// [B H C (d_h^2 + d_h + k_h d_h + k_h)] for both generators.
#include <cuda_runtime.h>

#include "hmx_cuda.h"
#include "hmx_cuda_common.cuh"

namespace hmx {
namespace cuda {
namespace {

using namespace dev;

struct Workspace {
  float* a;        // [B, H, k_h, d_h]
  float* dp;       // [B, H, k_h, d_h]
  float* da_part;  // [B, H, C_q, k_h, d_h]
  float* g2_part;  // [B, H, C_q, gsz]
  float* g1_part;  // [B, H, C_k, gsz]
};

Workspace carve_workspace(const ProblemParams& pb, void* base, size_t* total) {
  const int64_t BH = pb.B * pb.H, psz = pb.k_h * pb.d_h, gsz = grad_part_floats(pb.d_h, pb.k_h);
  const int64_t Cq = num_chunks(pb.M, kCudaTile), Ck = num_chunks(pb.N, kCudaTile);
  float* f = static_cast<float*>(base);
  Workspace w;
  w.a = f;
  w.dp = w.a + BH * psz;
  w.da_part = w.dp + BH * psz;
  w.g2_part = w.da_part + BH * Cq * psz;
  w.g1_part = w.g2_part + BH * Cq * gsz;
  *total = (size_t)(2 * BH * psz + BH * Cq * psz + BH * Cq * gsz + BH * Ck * gsz) * sizeof(float);
  return w;
}

__global__ void gelu_kernel(int64_t n, const float* __restrict__ p, float* __restrict__ a) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    a[i] = gelu(p[i]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) query_kernel(BackwardParams bp, Workspace ws, int use_mma) {
  extern __shared__ __align__(128) float smem[];
  const ProblemParams& pb = bp.pb;
  const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d, M = pb.M, psz = kh * dh;
  const int64_t C = num_chunks(M, kCudaTile);
  const int64_t item = blockIdx.x;
  const int64_t c = item % C, bh = item / C, h = bh % pb.H, b = bh / pb.H;
  Tile tile = carve_tile(smem, dh, kh);
  const HeadW<T> w = head_weights<T>(pb.g2, h, dh, kh);
  const MmaStage<T> st =
      mma_active<T>(use_mma) ? stage_fc2<T>(smem, tile_floats(dh, kh), w, dh, kh, MmaUse::kMlp) : MmaStage<T>();
  const T* qx = static_cast<const T*>(pb.q) + b * pb.q_bstride + h * dh;
  const T* dy = static_cast<const T*>(bp.dy) + b * M * d + h * dh;
  T* dq = static_cast<T*>(bp.dq) + b * M * d + h * dh;
  const float* pe = static_cast<const float*>(pb.pe_q) + h * dh;
  const float* mask = pb.m_q ? static_cast<const float*>(pb.m_q) + b * M : nullptr;
  const float* a = ws.a + bh * psz;
  float* da = ws.da_part + item * psz;
  const int64_t gsz = grad_part_floats(dh, kh);
  float* gbase = ws.g2_part + item * gsz;
  for (int64_t i = threadIdx.x; i < psz; i += blockDim.x) da[i] = 0.f;
  for (int64_t i = threadIdx.x; i < gsz; i += blockDim.x) gbase[i] = 0.f;
  __syncthreads();
  GradPart g = carve_grad(gbase, dh, kh);
  int64_t c0, c1;
  chunk_rows(M, C, c, &c0, &c1);
  for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
    const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
    load_z<T>(qx, pb.q_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
    load_rows<T>(dy, d, dh, r0, tn, nullptr, tile.x2);  // dY tile
    mlp_forward<T>(w, dh, kh, tn, tile, st);
    // dA += W2^T dY: [k_h, T] @ [T, d_h] -> [k_h, d_h]
    for (int64_t i = threadIdx.x; i < psz; i += blockDim.x) {
      const int64_t j = i / dh, cc = i % dh;
      float acc = 0.f;
      for (int64_t t = 0; t < tn; ++t) acc = fmaf(tile.w[t * kh + j], tile.x2[t * dh + cc], acc);
      da[i] += acc;
    }
    // dW2 = (dY A^T) * m_q: [T, d_h] @ [d_h, k_h] -> [T, k_h]
    for (int64_t i = threadIdx.x; i < tn * kh; i += blockDim.x) {
      const int64_t t = i / kh, j = i % kh;
      float acc = 0.f;
      for (int64_t cc = 0; cc < dh; ++cc) acc = fmaf(tile.x2[t * dh + cc], a[j * dh + cc], acc);
      tile.dw[i] = acc * tile.m[t];
    }
    __syncthreads();
    mlp_backward<T>(w, dh, kh, tn, (float)pb.scale, tile, g, dq + r0 * d, d);
  }
}

__global__ void dp_kernel(int64_t C, int64_t psz, const float* __restrict__ da_part, const float* __restrict__ p,
                          float* __restrict__ dp) {
  const int64_t bh = blockIdx.x;
  for (int64_t i = threadIdx.x; i < psz; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) acc += da_part[(bh * C + c) * psz + i];
    dp[bh * psz + i] = acc * gelu_grad(p[bh * psz + i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) key_kernel(BackwardParams bp, Workspace ws, int use_mma) {
  extern __shared__ __align__(128) float smem[];
  const ProblemParams& pb = bp.pb;
  const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d, N = pb.N, psz = kh * dh;
  const int64_t C = num_chunks(N, kCudaTile);
  const int64_t item = blockIdx.x;
  const int64_t c = item % C, bh = item / C, h = bh % pb.H, b = bh / pb.H;
  Tile tile = carve_tile(smem, dh, kh);
  const HeadW<T> w = head_weights<T>(pb.g1, h, dh, kh);
  const MmaStage<T> st =
      mma_active<T>(use_mma) ? stage_fc2<T>(smem, tile_floats(dh, kh), w, dh, kh, MmaUse::kMlp) : MmaStage<T>();
  const T* kx = static_cast<const T*>(pb.k) + b * pb.k_bstride + h * dh;
  const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
  T* dk = static_cast<T*>(bp.dk) + b * N * d + h * dh;
  T* dv = static_cast<T*>(bp.dv) + b * N * d + h * dh;
  const float* pe = static_cast<const float*>(pb.pe_k) + h * dh;
  const float* mask = pb.m_k ? static_cast<const float*>(pb.m_k) + b * N : nullptr;
  const float* dp = ws.dp + bh * psz;
  const int64_t gsz = grad_part_floats(dh, kh);
  float* gbase = ws.g1_part + item * gsz;
  for (int64_t i = threadIdx.x; i < gsz; i += blockDim.x) gbase[i] = 0.f;
  __syncthreads();
  GradPart g = carve_grad(gbase, dh, kh);
  int64_t c0, c1;
  chunk_rows(N, C, c, &c0, &c1);
  for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
    const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
    load_z<T>(kx, pb.k_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
    load_rows<T>(vx, pb.v_rstride, dh, r0, tn, tile.m, tile.x2);  // V tile
    mlp_forward<T>(w, dh, kh, tn, tile, st);
    // dW1 = (V dP^T) * m_k: [T, d_h] @ [d_h, k_h] -> [T, k_h]
    for (int64_t i = threadIdx.x; i < tn * kh; i += blockDim.x) {
      const int64_t t = i / kh, j = i % kh;
      float acc = 0.f;
      for (int64_t cc = 0; cc < dh; ++cc) acc = fmaf(tile.x2[t * dh + cc], dp[j * dh + cc], acc);
      tile.dw[i] = acc * tile.m[t];
    }
    // dvalue = (W1 dP) * m_k: [T, k_h] @ [k_h, d_h] -> [T, d_h]  (W1 already carries m_k)
    for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
      const int64_t t = i / dh, cc = i % dh;
      float acc = 0.f;
      for (int64_t j = 0; j < kh; ++j) acc = fmaf(tile.w[t * kh + j], dp[j * dh + cc], acc);
      dv[(r0 + t) * d + cc] = from_f<T>(acc * tile.m[t]);
    }
    __syncthreads();
    mlp_backward<T>(w, dh, kh, tn, (float)pb.scale, tile, g, dk + r0 * d, d);
  }
}

// out[h] = sum over b, then chunk c, of part[b, h, c]; written in the weights' layouts (fp32).
__global__ void grad_reduce_kernel(int64_t B, int64_t H, int64_t C, int64_t dh, int64_t kh,
                                   const float* __restrict__ part, GeneratorGrads out) {
  const int64_t h = blockIdx.x, gsz = grad_part_floats(dh, kh);
  for (int64_t i = threadIdx.x; i < gsz; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) acc += part[((b * H + h) * C + c) * gsz + i];
    int64_t e = i;
    if (e < dh * dh) { static_cast<float*>(out.fc1_w)[h * dh * dh + e] = acc; continue; }
    e -= dh * dh;
    if (e < dh) { if (out.fc1_b) static_cast<float*>(out.fc1_b)[h * dh + e] = acc; continue; }
    e -= dh;
    if (e < kh * dh) { static_cast<float*>(out.fc2_w)[h * kh * dh + e] = acc; continue; }
    e -= kh * dh;
    if (out.fc2_b) static_cast<float*>(out.fc2_b)[h * kh + e] = acc;
  }
}

size_t bwd_floats(const ProblemParams& pb) { return tile_floats(pb.d_h, pb.k_h); }

template <typename T>
int backward_t(const BackwardParams& bp, bool mma, void* workspace, cudaStream_t stream) {
  const ProblemParams& pb = bp.pb;
  const int64_t BH = pb.B * pb.H, psz = pb.k_h * pb.d_h;
  const int64_t Ck = num_chunks(pb.N, kCudaTile), Cq = num_chunks(pb.M, kCudaTile);
  size_t total = 0;
  Workspace ws = carve_workspace(pb, workspace, &total);
  const int use_mma = pick_mma(mma, bwd_floats(pb), pb.d_h, pb.k_h, MmaUse::kMlp);
  const size_t smem = smem_bytes(bwd_floats(pb), pb.d_h, pb.k_h, MmaUse::kMlp, use_mma != 0);
  cudaError_t err = cudaFuncSetAttribute(query_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  err = cudaFuncSetAttribute(key_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return (int)err;
  const int64_t n = BH * psz;
  const unsigned gelu_blocks = (unsigned)((n + kThreads - 1) / kThreads < 65535 ? (n + kThreads - 1) / kThreads : 65535);
  gelu_kernel<<<gelu_blocks, kThreads, 0, stream>>>(n, static_cast<const float*>(bp.p), ws.a);
  query_kernel<T><<<(unsigned)(BH * Cq), kThreads, smem, stream>>>(bp, ws, use_mma);
  dp_kernel<<<(unsigned)BH, kThreads, 0, stream>>>(Cq, psz, ws.da_part, static_cast<const float*>(bp.p), ws.dp);
  key_kernel<T><<<(unsigned)(BH * Ck), kThreads, smem, stream>>>(bp, ws, use_mma);
  grad_reduce_kernel<<<(unsigned)pb.H, kThreads, 0, stream>>>(pb.B, pb.H, Cq, pb.d_h, pb.k_h, ws.g2_part, bp.dg2);
  grad_reduce_kernel<<<(unsigned)pb.H, kThreads, 0, stream>>>(pb.B, pb.H, Ck, pb.d_h, pb.k_h, ws.g1_part, bp.dg1);
  return (int)cudaGetLastError();
}

}  // namespace

size_t max_smem_bytes(const ProblemParams& pb) { return bwd_floats(pb) * sizeof(float); }  // FMA path

size_t backward_workspace_bytes(const ProblemParams& pb) {
  size_t total = 0;
  carve_workspace(pb, nullptr, &total);
  return total;
}

int backward(const BackwardParams& bp, DType dtype, void* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kF16: return backward_t<__half>(bp, mma_wanted(dtype, bp.pb.allow_mma), workspace, stream);
    case DType::kBF16: return backward_t<__nv_bfloat16>(bp, mma_wanted(dtype, bp.pb.allow_mma), workspace, stream);
    default: return backward_t<float>(bp, false, workspace, stream);
  }
}

}  // namespace cuda
}  // namespace hmx
