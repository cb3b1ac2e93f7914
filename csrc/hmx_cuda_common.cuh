// Device helpers shared by the CUDA forward and backward kernels: type conversion, exact GELU,
// loading a token tile of the hypernetwork input into shared memory and running one generator
// MLP on it. One thread block works on one (batch, head, token chunk); the block's threads split
// every small product element-wise (thread i owns outputs i, i + blockDim, ...), so each output
// is summed by one thread in a fixed order: results do not depend on scheduling.
// Trade-off: plain fp32 FMA (SIMT) products out of shared memory, simple and exact for any d_h /
// k_h (18, 72, ...). Exception: for fp16/bf16 inputs on sm_80+ the generator's fc2 product
// (Hd [T, d_h] @ fc2^T [d_h, k_h]) runs on tensor cores (nvcuda::wmma 16x16x16, fp32
// accumulators) out of zero-padded shared-memory copies; Hd is rounded to the input type first
// (fp16/bf16 rounding-level change); the forward also uses them for P and Y (hmx_cuda_forward.cu).
// The host keeps the FMA path for fp32, below sm_80, with HMX_KERNELS_CUDA_NO_MMA=1 and where the
// staging area does not fit the GPU's opt-in shared memory; code compiled for < sm_80 has no MMA.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// ---- tensor-core (MMA) staging, fp16/bf16 only ----------------------------------------------
// Dynamic shared memory = fp32 tile buffers, then (when MMA is on) at a 128-byte aligned offset,
// with dhp / khp = d_h / k_h rounded up to 16 and every buffer zero-padded:
//   b   [khp, dhp]        fc2 weights (input type T), staged once per block
//   hd  [kCudaTile, dhp]  Hd rounded to T
//   c   [kCudaTile, khp]  fp32 result of Hd fc2^T
// and for the forward's P / Y products (MmaUse::kP, kY) also
//   wh  [kCudaTile, khp]  W = (Hd fc2^T + b2) * m rounded to T
//   scr [kWarps, 16, 16]  fp32, one 16 x 16 block per warp (fragment -> global memory)
//   xh  [kCudaTile, dhp]  V tile in T                     (kP only)
//   ah  [khp, dhp]        A = GELU(P) rounded to T        (kY only), staged once per block
// Every buffer is a multiple of 512 bytes, so all wmma pointers are 256-bit aligned; leading
// dimensions are multiples of 16 elements.
constexpr int kMma = 16;  // wmma tile: 16 x 16 x 16
constexpr int kWarps = kThreads / 32;
constexpr int kPFrags = 8;  // P accumulator fragments per warp: P-MMA needs (khp/16)(dhp/16) <= kWarps * kPFrags
static_assert(kCudaTile % kMma == 0, "the token tile must be a multiple of the MMA tile");
static_assert(kThreads % 32 == 0, "blocks are whole warps");
static_assert((kCudaTile / kMma) * (64 / kMma) <= kWarps, "Y-MMA: one 16 x 16 output block per warp at d_h <= 64");

enum class MmaUse { kMlp, kP, kY };

__host__ __device__ inline int64_t pad16(int64_t x) { return (x + kMma - 1) / kMma * kMma; }
__host__ __device__ inline size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }
// byte offset of the staging area after `fp32_floats` floats of tile buffers
__host__ __device__ inline size_t mma_offset(size_t fp32_floats) { return align128(fp32_floats * sizeof(float)); }
__host__ __device__ inline size_t mma_stage_bytes(int64_t dh, int64_t kh, MmaUse use) {
  const int64_t dhp = pad16(dh), khp = pad16(kh), T = kCudaTile;
  size_t n = (size_t)(khp * dhp + T * dhp) * 2 + (size_t)T * khp * sizeof(float);
  if (use != MmaUse::kMlp) n += (size_t)T * khp * 2 + (size_t)kWarps * kMma * kMma * sizeof(float);
  if (use == MmaUse::kP) n += (size_t)T * dhp * 2;
  if (use == MmaUse::kY) n += (size_t)khp * dhp * 2;
  return n;
}
// dynamic shared memory of a kernel whose fp32 buffers take `fp32_floats` floats
__host__ __device__ inline size_t smem_bytes(size_t fp32_floats, int64_t dh, int64_t kh, MmaUse use, bool mma) {
  return mma ? mma_offset(fp32_floats) + mma_stage_bytes(dh, kh, use) : fp32_floats * sizeof(float);
}

// Host: whether the launch should take the MMA path (the kernel itself also requires sm_80+ code).
// `allow` is ProblemParams::allow_mma (off with HMX_KERNELS_CUDA_NO_MMA=1, read once in Python).
inline bool mma_wanted(DType dtype, bool allow) {
  if (dtype == DType::kF32 || !allow) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;
}
// Host: opt-in shared memory per block of the current device (0 if unknown).
inline size_t smem_optin() {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  return (size_t)optin;
}
// Host: 1 if a kernel with `fp32_floats` floats of tile buffers takes the MMA path: wanted, the
// sizes are within the MMA code's limits and the staging area fits the device's opt-in shared
// memory (else 0: the FMA path, which needs less).
inline int pick_mma(bool wanted, size_t fp32_floats, int64_t dh, int64_t kh, MmaUse use) {
  if (!wanted || dh > 64 || kh > 256) return 0;
  if (use == MmaUse::kP && (pad16(kh) / kMma) * (pad16(dh) / kMma) > kWarps * kPFrags) return 0;
  return smem_bytes(fp32_floats, dh, kh, use, true) <= smem_optin() ? 1 : 0;
}

// Device: the MMA path runs for fp16/bf16 in code compiled for sm_80+ when the launch asked for it.
template <typename T>
__device__ __forceinline__ bool mma_active(int use_mma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return use_mma != 0 && !std::is_same<T, float>::value;
#else
  (void)use_mma;
  return false;
#endif
}

template <typename T>
struct MmaStage {
  T* b = nullptr;  // [khp, dhp] fc2 weights (wmma matrix_b, col-major view of fc2^T); nullptr = off
  T* hd = nullptr;      // [kCudaTile, dhp]
  float* c = nullptr;   // [kCudaTile, khp]
  T* wh = nullptr;      // [kCudaTile, khp] or nullptr (kMlp)
  float* scr = nullptr; // [kWarps, 16, 16] or nullptr (kMlp)
  T* xh = nullptr;      // [kCudaTile, dhp] (kP)
  T* ah = nullptr;      // [khp, dhp] (kY), staged by the caller
  int dhp = 0, khp = 0;
};

// Carves the staging area at smem + mma_offset(fp32_floats) and stages fc2 (ends with a barrier).
// fp32 gets an empty stage (mma_stage_bytes counts 2-byte element types).
template <typename T>
__device__ MmaStage<T> stage_fc2(float* smem, size_t fp32_floats, const HeadW<T>& w, int64_t dh, int64_t kh,
                                 MmaUse use) {
  MmaStage<T> st;
  if constexpr (sizeof(T) == 2) {
    const int T_ = (int)kCudaTile;
    st.dhp = (int)pad16(dh);
    st.khp = (int)pad16(kh);
    char* base = reinterpret_cast<char*>(smem) + mma_offset(fp32_floats);
    st.b = reinterpret_cast<T*>(base);
    st.hd = st.b + st.khp * st.dhp;
    st.c = reinterpret_cast<float*>(st.hd + T_ * st.dhp);
    if (use != MmaUse::kMlp) {
      st.wh = reinterpret_cast<T*>(st.c + T_ * st.khp);
      st.scr = reinterpret_cast<float*>(st.wh + T_ * st.khp);
      T* next = reinterpret_cast<T*>(st.scr + kWarps * kMma * kMma);
      if (use == MmaUse::kP) st.xh = next;
      if (use == MmaUse::kY) st.ah = next;
    }
    for (int i = threadIdx.x; i < st.khp * st.dhp; i += blockDim.x) {
      const int j = i / st.dhp, o = i % st.dhp;
      st.b[i] = (j < kh && o < dh) ? w.fc2_w[j * dh + o] : from_f<T>(0.f);
    }
    __syncthreads();
  } else {
    (void)smem; (void)fp32_floats; (void)w; (void)dh; (void)kh; (void)use;
  }
  return st;
}

// W = (Hd fc2^T + b2) * m on tensor cores (also rounded to T into st.wh when staged); false
// (nothing done) where the MMA path is not compiled in (fp32, code below sm_80) or not staged.
template <typename T>
__device__ bool fc2_mma(const HeadW<T>& w, int64_t dh, int64_t kh, int64_t tn, Tile& tile, const MmaStage<T>& st) {
  bool done = false;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!std::is_same<T, float>::value) {
    if (st.b != nullptr) {
      namespace wmma = nvcuda::wmma;
      const int dhp = st.dhp, khp = st.khp;
      // Hd rounded to T, zero rows t >= tn and columns o >= d_h
      for (int i = threadIdx.x; i < kCudaTile * dhp; i += blockDim.x) {
        const int t = i / dhp, o = i % dhp;
        st.hd[i] = (t < tn && o < dh) ? from_f<T>(tile.hd[t * dh + o]) : from_f<T>(0.f);
      }
      __syncthreads();
      // [T, dhp] @ [dhp, khp] -> [T, khp]; warp w owns the 16x16 output blocks w, w + kWarps, ...
      const int warp = threadIdx.x / 32;
      const int nb = khp / kMma, blocks = (kCudaTile / kMma) * nb;
      for (int blk = warp; blk < blocks; blk += kWarps) {
        const int mi = blk / nb, ni = blk % nb;
        wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int kk = 0; kk < dhp; kk += kMma) {
          wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> fa;  // Hd(t, o)
          wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::col_major> fb;  // fc2^T(o, j) = b[j, o]
          wmma::load_matrix_sync(fa, st.hd + mi * kMma * dhp + kk, dhp);
          wmma::load_matrix_sync(fb, st.b + ni * kMma * dhp + kk, dhp);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(st.c + mi * kMma * khp + ni * kMma, acc, khp, wmma::mem_row_major);
      }
      __syncthreads();
      for (int i = threadIdx.x; i < kCudaTile * khp; i += blockDim.x) {
        const int t = i / khp, j = i % khp;
        if (t < tn && j < kh) {
          const float v = (st.c[i] + (w.fc2_b ? to_f(w.fc2_b[j]) : 0.f)) * tile.m[t];
          tile.w[t * kh + j] = v;
          if (st.wh != nullptr) st.wh[i] = from_f<T>(v);
        } else if (st.wh != nullptr) {
          st.wh[i] = from_f<T>(0.f);
        }
      }
      __syncthreads();
      done = true;
    }
  }
#endif
  (void)w; (void)dh; (void)kh; (void)tn; (void)tile; (void)st;
  return done;
}

// U = z fc1^T + b1, Hd = GELU(U), W = (Hd fc2^T + b2) * m   (tile.z must be loaded); fc2 on
// tensor cores when `st` is staged (see fc2_mma)
template <typename T>
__device__ void mlp_forward(const HeadW<T>& w, int64_t dh, int64_t kh, int64_t tn, Tile& tile,
                            const MmaStage<T>& st) {
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
  if (fc2_mma<T>(w, dh, kh, tn, tile, st)) return;
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
