// Device helpers shared by the CUDA forward and backward kernels: type conversion, exact GELU,
// loading a token tile of the hypernetwork input into shared memory and running one generator
// MLP on it. One thread block works on one (batch, head, token chunk); the block's threads split
// every small product element-wise (thread i owns outputs i, i + blockDim, ...), so each output
// is summed by one thread in a fixed order: results do not depend on scheduling.
// Trade-off: plain fp32 FMA (SIMT) products out of shared memory, simple and exact for any d_h /
// k_h (18, 72, ...); tensor-core MMA for fp16/bf16 is not used yet.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hmx_cuda.h"
#include "hmx_params.h"

namespace hmx {
namespace cuda {
namespace dev {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  return cdf + x * expf(-0.5f * x * x) * 0.39894228040143267f;
}

// One generator's weights for head h (input type T, read through the caches).
template <typename T>
struct HeadW {
  const T* __restrict__ fc1_w;  // [d_h(out), d_h(in)]
  const T* __restrict__ fc1_b;  // [d_h] or nullptr
  const T* __restrict__ fc2_w;  // [k_h, d_h]
  const T* __restrict__ fc2_b;  // [k_h] or nullptr
};

template <typename T>
__device__ __forceinline__ HeadW<T> head_weights(const GeneratorParams& g, int64_t h, int64_t dh, int64_t kh) {
  HeadW<T> w;
  w.fc1_w = static_cast<const T*>(g.fc1_w) + h * dh * dh;
  w.fc1_b = g.fc1_b ? static_cast<const T*>(g.fc1_b) + h * dh : nullptr;
  w.fc2_w = static_cast<const T*>(g.fc2_w) + h * kh * dh;
  w.fc2_b = g.fc2_b ? static_cast<const T*>(g.fc2_b) + h * kh : nullptr;
  return w;
}

// Shared-memory tile buffers (fp32). Sizes: z, u, hd, x2, du: [kCudaTile, d_h];
// w, dw: [kCudaTile, k_h]; m: [kCudaTile].
struct Tile {
  float* z;
  float* u;
  float* hd;
  float* x2;  // V tile (key passes) or dY tile (query pass)
  float* du;
  float* w;
  float* dw;
  float* m;
};

__host__ __device__ inline size_t tile_floats(int64_t dh, int64_t kh) {
  return (size_t)kCudaTile * (5 * dh + 2 * kh + 1);
}

__device__ inline Tile carve_tile(float* smem, int64_t dh, int64_t kh) {
  Tile t;
  const int64_t T = kCudaTile;
  t.z = smem;
  t.u = t.z + T * dh;
  t.hd = t.u + T * dh;
  t.x2 = t.hd + T * dh;
  t.du = t.x2 + T * dh;
  t.w = t.du + T * dh;
  t.dw = t.w + T * kh;
  t.m = t.dw + T * kh;
  return t;
}

// chunk c of L tokens covers tiles [c * tiles / C, (c + 1) * tiles / C) of kCudaTile tokens
__device__ __forceinline__ void chunk_rows(int64_t L, int64_t C, int64_t c, int64_t* r0, int64_t* r1) {
  const int64_t tiles = num_tiles(L, kCudaTile);
  *r0 = (c * tiles / C) * kCudaTile;
  const int64_t e = ((c + 1) * tiles / C) * kCudaTile;
  *r1 = e < L ? e : L;
}

// z[t, c] = s * (x[r0 + t, c] * m) + pe[r0 + t, c] for head h's channels; also the row masks.
template <typename T>
__device__ void load_z(const T* __restrict__ x, int64_t rstride, const float* __restrict__ pe,
                       const float* __restrict__ mask, int64_t d, int64_t dh, float s, int64_t r0, int64_t tn,
                       Tile& tile) {
  for (int64_t i = threadIdx.x; i < tn; i += blockDim.x) tile.m[i] = mask ? mask[r0 + i] : 1.f;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
    const int64_t t = i / dh, c = i % dh;
    tile.z[i] = s * (to_f(x[(r0 + t) * rstride + c]) * tile.m[t]) + pe[(r0 + t) * d + c];
  }
  __syncthreads();
}

// out[t, c] = x[r0 + t, c] * m_t (V tile) or dy rows (mask nullptr -> scale 1)
template <typename T>
__device__ void load_rows(const T* __restrict__ x, int64_t rstride, int64_t dh, int64_t r0, int64_t tn,
                          const float* m, float* out) {
  for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
    const int64_t t = i / dh, c = i % dh;
    out[i] = to_f(x[(r0 + t) * rstride + c]) * (m ? m[t] : 1.f);
  }
}

// U = z fc1^T + b1, Hd = GELU(U), W = (Hd fc2^T + b2) * m   (tile.z must be loaded)
template <typename T>
__device__ void mlp_forward(const HeadW<T>& w, int64_t dh, int64_t kh, int64_t tn, Tile& tile) {
  // [T, d_h] @ [d_h, d_h]^T -> [T, d_h]
  for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
    const int64_t t = i / dh, o = i % dh;
    float acc = w.fc1_b ? to_f(w.fc1_b[o]) : 0.f;
    const float* zt = tile.z + t * dh;
    const T* wr = w.fc1_w + o * dh;
    for (int64_t c = 0; c < dh; ++c) acc = fmaf(zt[c], to_f(wr[c]), acc);
    tile.u[i] = acc;
    tile.hd[i] = gelu(acc);
  }
  __syncthreads();
  // [T, d_h] @ [k_h, d_h]^T -> [T, k_h]
  for (int64_t i = threadIdx.x; i < tn * kh; i += blockDim.x) {
    const int64_t t = i / kh, j = i % kh;
    float acc = w.fc2_b ? to_f(w.fc2_b[j]) : 0.f;
    const float* ht = tile.hd + t * dh;
    const T* wr = w.fc2_w + j * dh;
    for (int64_t o = 0; o < dh; ++o) acc = fmaf(ht[o], to_f(wr[o]), acc);
    tile.w[i] = acc * tile.m[t];
  }
  __syncthreads();
}

// Weight-gradient partial of one generator for one block, in the weights' layouts (fp32):
// fc1_w [d_h, d_h], fc1_b [d_h], fc2_w [k_h, d_h], fc2_b [k_h].
struct GradPart {
  float* fc1_w;
  float* fc1_b;
  float* fc2_w;
  float* fc2_b;
};

__host__ __device__ inline int64_t grad_part_floats(int64_t dh, int64_t kh) { return dh * dh + dh + kh * dh + kh; }

__device__ inline GradPart carve_grad(float* base, int64_t dh, int64_t kh) {
  GradPart g;
  g.fc1_w = base;
  g.fc1_b = g.fc1_w + dh * dh;
  g.fc2_w = g.fc1_b + dh;
  g.fc2_b = g.fc2_w + kh * dh;
  return g;
}

// MLP backward for a tile given tile.dw (= dL/dW, already times m): accumulates into the block's
// gradient partial `g` and writes dx = s * m * dz (type T) to rows r0.. of `dx` (row stride d).
template <typename T>
__device__ void mlp_backward(const HeadW<T>& w, int64_t dh, int64_t kh, int64_t tn, float s, Tile& tile,
                             GradPart& g, T* __restrict__ dx, int64_t d) {
  // dfc2 += dW^T Hd: [k_h, T] @ [T, d_h] -> [k_h, d_h]
  for (int64_t i = threadIdx.x; i < kh * dh; i += blockDim.x) {
    const int64_t j = i / dh, o = i % dh;
    float acc = 0.f;
    for (int64_t t = 0; t < tn; ++t) acc = fmaf(tile.dw[t * kh + j], tile.hd[t * dh + o], acc);
    g.fc2_w[i] += acc;
  }
  for (int64_t j = threadIdx.x; j < kh; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t t = 0; t < tn; ++t) acc += tile.dw[t * kh + j];
    g.fc2_b[j] += acc;
  }
  // dU = (dW fc2) * GELU'(U): [T, k_h] @ [k_h, d_h] -> [T, d_h]
  for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
    const int64_t t = i / dh, o = i % dh;
    float acc = 0.f;
    for (int64_t j = 0; j < kh; ++j) acc = fmaf(tile.dw[t * kh + j], to_f(w.fc2_w[j * dh + o]), acc);
    tile.du[i] = acc * gelu_grad(tile.u[i]);
  }
  __syncthreads();
  // dfc1 += dU^T z: [d_h(out), T] @ [T, d_h(in)] -> [d_h, d_h]
  for (int64_t i = threadIdx.x; i < dh * dh; i += blockDim.x) {
    const int64_t o = i / dh, c = i % dh;
    float acc = 0.f;
    for (int64_t t = 0; t < tn; ++t) acc = fmaf(tile.du[t * dh + o], tile.z[t * dh + c], acc);
    g.fc1_w[i] += acc;
  }
  for (int64_t o = threadIdx.x; o < dh; o += blockDim.x) {
    float acc = 0.f;
    for (int64_t t = 0; t < tn; ++t) acc += tile.du[t * dh + o];
    g.fc1_b[o] += acc;
  }
  // dz = dU fc1: [T, d_h(out)] @ [d_h(out), d_h(in)] -> [T, d_h];  dx = s * m * dz
  for (int64_t i = threadIdx.x; i < tn * dh; i += blockDim.x) {
    const int64_t t = i / dh, c = i % dh;
    float acc = 0.f;
    for (int64_t o = 0; o < dh; ++o) acc = fmaf(tile.du[t * dh + o], to_f(w.fc1_w[o * dh + c]), acc);
    dx[t * d + c] = from_f<T>(s * tile.m[t] * acc);
  }
  __syncthreads();
}

}  // namespace dev
}  // namespace cuda
}  // namespace hmx
