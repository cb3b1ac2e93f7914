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
// Tensor cores (fp16/bf16 on sm_80+, unless HMX_KERNELS_CUDA_NO_MMA=1 or the staging area does
// not fit shared memory): besides fc2 (hmx_cuda_common.cuh), p_partial_kernel runs P += W1^T V
// and y_kernel Y = W2 A as 16x16x16 wmma products with fp32 accumulators, on zero-padded copies
// of W1 / V / W2 / A in the input type (W1, W2 and A are rounded to it: fp16/bf16 rounding level).
// fp32 inputs use SIMT fp32 FMA (no TF32), the FMA path the MMA path falls back to.
#include <cuda_runtime.h>

#include "hmx_cuda.h"
#include "hmx_cuda_common.cuh"

namespace hmx {
namespace cuda {
namespace {

using namespace dev;

// Tensor-core path of p_partial_kernel (fp16/bf16, sm_80+): fc2 and P += W1^T V on tensor cores,
// the chunk's P partial kept in fp32 accumulator fragments across tiles (warp w owns the 16 x 16
// blocks w + f * kWarps, f < kPFrags) and written once at the end. W1 is rounded to T first.
template <typename T>
__device__ void p_partial_mma(const ProblemParams& pb, float* smem, Tile& tile, const HeadW<T>& w,
                              const T* __restrict__ kx, const T* __restrict__ vx, const float* __restrict__ pe,
                              const float* __restrict__ mask, int64_t c0, int64_t c1, float* __restrict__ part) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2) {
    namespace wmma = nvcuda::wmma;
    const int64_t dh = pb.d_h, kh = pb.k_h;
    const MmaStage<T> st = stage_fc2<T>(smem, tile_floats(dh, kh), w, dh, kh, MmaUse::kP);
    const int dhp = st.dhp, khp = st.khp;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nbd = dhp / kMma, blocks = (khp / kMma) * nbd;  // <= kWarps * kPFrags (pick_mma)
    wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc[kPFrags];
#pragma unroll
    for (int f = 0; f < kPFrags; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
      const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
      load_z<T>(kx, pb.k_rstride, pe, mask, pb.d, dh, (float)pb.scale, r0, tn, tile);  // ends with a barrier
      // V tile * m_k in T (exact: m is 0 or 1), zero-padded to [kCudaTile, dhp]
      for (int i = threadIdx.x; i < kCudaTile * dhp; i += blockDim.x) {
        const int t = i / dhp, cc = i % dhp;
        st.xh[i] = (t < tn && cc < dh) ? from_f<T>(to_f(vx[(r0 + t) * pb.v_rstride + cc]) * tile.m[t]) : from_f<T>(0.f);
      }
      mlp_forward<T>(w, dh, kh, tn, tile, st);  // fills st.wh; its barriers also publish st.xh
      // P += W1^T V: [khp, T] @ [T, dhp] -> [khp, dhp]
#pragma unroll
      for (int f = 0; f < kPFrags; ++f) {
        const int blk = warp + f * kWarps;
        if (blk < blocks) {
          const int mi = blk / nbd, ni = blk % nbd;
          for (int kk = 0; kk < kCudaTile; kk += kMma) {
            wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::col_major> fa;  // W1^T(j, t) = wh[t, j]
            wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::row_major> fb;  // V(t, c) = xh[t, c]
            wmma::load_matrix_sync(fa, st.wh + kk * khp + mi * kMma, khp);
            wmma::load_matrix_sync(fb, st.xh + kk * dhp + ni * kMma, dhp);
            wmma::mma_sync(acc[f], fa, fb, acc[f]);
          }
        }
      }
      __syncthreads();  // st.wh, st.xh and the tile are overwritten by the next tile
    }
    // partial P[:k_h, :d_h] through the warp's 16 x 16 scratch (every element written once)
    float* scr = st.scr + warp * kMma * kMma;
#pragma unroll
    for (int f = 0; f < kPFrags; ++f) {
      const int blk = warp + f * kWarps;
      if (blk < blocks) {
        const int mi = blk / nbd, ni = blk % nbd;
        wmma::store_matrix_sync(scr, acc[f], kMma, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < kMma * kMma; e += 32) {
          const int j = mi * kMma + e / kMma, cc = ni * kMma + e % kMma;
          if (j < kh && cc < dh) part[j * dh + cc] = scr[e];
        }
        __syncwarp();
      }
    }
  }
#endif
  (void)pb; (void)smem; (void)tile; (void)w; (void)kx; (void)vx; (void)pe; (void)mask; (void)c0; (void)c1;
  (void)part;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) p_partial_kernel(ProblemParams pb, float* __restrict__ p_part,
                                                             int use_mma) {
  extern __shared__ __align__(128) float smem[];
  const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const int64_t C = num_chunks(pb.N, kCudaTile);
  const int64_t item = blockIdx.x;
  const int64_t c = item % C, bh = item / C, h = bh % pb.H, b = bh / pb.H;
  Tile tile = carve_tile(smem, dh, kh);
  const HeadW<T> w = head_weights<T>(pb.g1, h, dh, kh);
  const T* kx = static_cast<const T*>(pb.k) + b * pb.k_bstride + h * dh;
  const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
  const float* pe = static_cast<const float*>(pb.pe_k) + h * dh;
  const float* mask = pb.m_k ? static_cast<const float*>(pb.m_k) + b * pb.N : nullptr;
  float* part = p_part + item * kh * dh;
  int64_t c0, c1;
  chunk_rows(pb.N, C, c, &c0, &c1);
  if (mma_active<T>(use_mma)) {
    p_partial_mma<T>(pb, smem, tile, w, kx, vx, pe, mask, c0, c1, part);
    return;
  }
  const MmaStage<T> off;  // FMA path
  for (int64_t i = threadIdx.x; i < kh * dh; i += blockDim.x) part[i] = 0.f;
  for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
    const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
    load_z<T>(kx, pb.k_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
    load_rows<T>(vx, pb.v_rstride, dh, r0, tn, tile.m, tile.x2);
    mlp_forward<T>(w, dh, kh, tn, tile, off);  // ends with __syncthreads
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

// Tensor-core path of y_kernel (fp16/bf16, sm_80+): fc2 and Y = W2 A on tensor cores, with
// A = GELU(P) and W2 rounded to T; warp w computes the 16 x 16 output blocks w, w + kWarps, ...
template <typename T>
__device__ void y_mma(const ProblemParams& pb, float* smem, Tile& tile, const HeadW<T>& w,
                      const float* __restrict__ p_bh, const T* __restrict__ qx, const float* __restrict__ pe,
                      const float* __restrict__ mask, int64_t c0, int64_t c1, T* __restrict__ yb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == 2) {
    namespace wmma = nvcuda::wmma;
    const int64_t dh = pb.d_h, kh = pb.k_h, d = pb.d;
    const MmaStage<T> st = stage_fc2<T>(smem, tile_floats(dh, kh), w, dh, kh, MmaUse::kY);  // no fp32 A
    const int dhp = st.dhp, khp = st.khp;
    for (int i = threadIdx.x; i < khp * dhp; i += blockDim.x) {  // A = GELU(P) in T, zero-padded
      const int j = i / dhp, cc = i % dhp;
      st.ah[i] = (j < kh && cc < dh) ? from_f<T>(gelu(p_bh[j * dh + cc])) : from_f<T>(0.f);
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nbd = dhp / kMma, blocks = (kCudaTile / kMma) * nbd;
    float* scr = st.scr + warp * kMma * kMma;
    for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
      const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
      load_z<T>(qx, pb.q_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
      mlp_forward<T>(w, dh, kh, tn, tile, st);  // fills st.wh (ends with a barrier)
      // Y = W2 A: [T, khp] @ [khp, dhp] -> [T, dhp]
      for (int blk = warp; blk < blocks; blk += kWarps) {
        const int mi = blk / nbd, ni = blk % nbd;
        wmma::fragment<wmma::accumulator, kMma, kMma, kMma, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int kk = 0; kk < khp; kk += kMma) {
          wmma::fragment<wmma::matrix_a, kMma, kMma, kMma, T, wmma::row_major> fa;  // W2(t, j) = wh[t, j]
          wmma::fragment<wmma::matrix_b, kMma, kMma, kMma, T, wmma::row_major> fb;  // A(j, c) = ah[j, c]
          wmma::load_matrix_sync(fa, st.wh + mi * kMma * khp + kk, khp);
          wmma::load_matrix_sync(fb, st.ah + kk * dhp + ni * kMma, dhp);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(scr, acc, kMma, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < kMma * kMma; e += 32) {
          const int t = mi * kMma + e / kMma, cc = ni * kMma + e % kMma;
          if (t < tn && cc < dh) yb[(r0 + t) * d + cc] = from_f<T>(scr[e]);
        }
        __syncwarp();
      }
      __syncthreads();  // st.wh and the tile are overwritten by the next tile
    }
  }
#endif
  (void)pb; (void)smem; (void)tile; (void)w; (void)p_bh; (void)qx; (void)pe; (void)mask; (void)c0; (void)c1;
  (void)yb;
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
  const HeadW<T> w = head_weights<T>(pb.g2, h, dh, kh);
  const T* qx = static_cast<const T*>(pb.q) + b * pb.q_bstride + h * dh;
  const float* pe = static_cast<const float*>(pb.pe_q) + h * dh;
  const float* mask = pb.m_q ? static_cast<const float*>(pb.m_q) + b * M : nullptr;
  int64_t c0, c1;
  chunk_rows(M, C, c, &c0, &c1);
  if (mma_active<T>(use_mma)) {
    y_mma<T>(pb, smem, tile, w, p + bh * kh * dh, qx, pe, mask, c0, c1, y + b * M * d + h * dh);
    return;
  }
  const MmaStage<T> off;  // FMA path
  float* a = smem + tile_floats(dh, kh);  // A = GELU(P) [k_h, d_h]
  for (int64_t i = threadIdx.x; i < kh * dh; i += blockDim.x) a[i] = gelu(p[bh * kh * dh + i]);
  for (int64_t r0 = c0; r0 < c1; r0 += kCudaTile) {
    const int64_t tn = (c1 - r0) < kCudaTile ? (c1 - r0) : kCudaTile;
    load_z<T>(qx, pb.q_rstride, pe, mask, d, dh, (float)pb.scale, r0, tn, tile);
    mlp_forward<T>(w, dh, kh, tn, tile, off);
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

// fp32 floats of dynamic shared memory: the tile buffers (p_partial_kernel, y_kernel on the MMA
// path), plus A = GELU(P) [k_h, d_h] (y_kernel on the FMA path)
size_t fwd_p_floats(const ProblemParams& pb) { return tile_floats(pb.d_h, pb.k_h); }
size_t fwd_y_floats(const ProblemParams& pb) { return tile_floats(pb.d_h, pb.k_h) + pb.k_h * pb.d_h; }

template <typename T>
int forward_t(const ForwardParams& fp, bool mma, void* workspace, cudaStream_t stream) {
  const ProblemParams& pb = fp.pb;
  const int64_t BH = pb.B * pb.H, psz = pb.k_h * pb.d_h;
  const int64_t Ck = num_chunks(pb.N, kCudaTile), Cq = num_chunks(pb.M, kCudaTile);
  float* p_part = static_cast<float*>(workspace);
  const int mma1 = pick_mma(mma, fwd_p_floats(pb), pb.d_h, pb.k_h, MmaUse::kP);
  // the MMA path of y_kernel keeps A in T in its staging area, not in fp32 after the tile
  const int mma2 = pick_mma(mma, fwd_p_floats(pb), pb.d_h, pb.k_h, MmaUse::kY);
  const size_t s1 = smem_bytes(fwd_p_floats(pb), pb.d_h, pb.k_h, MmaUse::kP, mma1 != 0);
  const size_t s2 = mma2 ? smem_bytes(fwd_p_floats(pb), pb.d_h, pb.k_h, MmaUse::kY, true)
                         : fwd_y_floats(pb) * sizeof(float);
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
    case DType::kF16: return forward_t<__half>(fp, mma_wanted(dtype, fp.pb.allow_mma), workspace, stream);
    case DType::kBF16: return forward_t<__nv_bfloat16>(fp, mma_wanted(dtype, fp.pb.allow_mma), workspace, stream);
    default: return forward_t<float>(fp, false, workspace, stream);
  }
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace hmx
