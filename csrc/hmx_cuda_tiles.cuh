// Warp tiles and block products of the CUDA kernels: the arithmetic every pass is built from.
//
// Every matrix product is a block product out of shared memory, split over the 8 warps of a block
// in 16 x 16 output tiles (block_gemm), with fp32 accumulators:
// - fp16 / bf16 operands, code for sm_80+: tensor cores (nvcuda::wmma 16x16x16, HMMA in SASS);
//   the accumulator goes through a 1 KB per-warp fp32 scratch tile to its epilogue;
// - fp32 operands (and 2-byte operands in code for older GPUs): SIMT FMA, each lane owns a 4 x 2
//   piece of the 16 x 16 tile and reads its operands as float4 / float2 from shared memory
//   (0.25 shared loads per FMA for fp32).
// StateAcc keeps a D x D fp32 state in registers across token tiles (the token passes' sums);
// mma_planes multiplies operands split into bf16 hi + lo planes (the finalize passes' fp32
// operands: hi hi + hi lo + lo hi, about 16 significant bits, fp32 range). Also here: the scalar
// conversions, GELU, and the fp16-range helpers (powers of two, block max).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "hmx_cuda.h"
#include "hmx_params.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define HMX_TENSOR_CORES 1
#else
#define HMX_TENSOR_CORES 0
#endif

namespace hmx {
namespace cuda {
namespace dev {

constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && kWarps == 8, "the tiling below assumes 8 warps per block");

// ---- scalars --------------------------------------------------------------------------------
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

// x stored as PL planes of E: PL = 1: E(x); PL = 2 (bf16): hi = bf16(x) and, `plane` elements
// further, lo = bf16(x - hi)
template <int PL, typename E>
__device__ __forceinline__ void put(E* p, size_t plane, float x) {
  const E hi = from_f<E>(x);
  p[0] = hi;
  if constexpr (PL == 2) p[plane] = from_f<E>(x - to_f(hi));
  (void)plane;
}

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- 16 x 16 warp tiles -----------------------------------------------------------------------
// acc(16 x 16) += A(16 x K) B(K x 16), operands in shared memory. AR: A row-major (element (m, k)
// at A[m * lda + k]), else column-major (A[k * lda + m]); BR: B row-major (B[k * ldb + n]), else
// column-major (B[n * ldb + k]). A and B point at the tile's first row / column. visit() calls
// f(row, col, value) once for every element, on the lane that owns it.

// SIMT: lane l owns rows 4 (l / 8) .. +3 and columns 2 (l % 8) .. +1.
template <typename E>
struct SimtAcc {
  float v[8];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
  }
  template <bool AR, bool BR, int K>
  __device__ __forceinline__ void mma(const E* __restrict__ A, int lda, const E* __restrict__ B, int ldb) {
    static_assert(K % 4 == 0, "K must be a multiple of 4");
    const int lane = threadIdx.x & 31, r = (lane >> 3) * 4, c = (lane & 7) * 2;
#pragma unroll 1
    for (int k = 0; k < K; k += 4) {
      float a[4][4], b[4][2];  // a[i][kk] = A(r + i, k + kk), b[kk][j] = B(k + kk, c + j)
      if constexpr (std::is_same<E, float>::value) {
        if constexpr (AR) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float4 t = *reinterpret_cast<const float4*>(A + (r + i) * lda + k);
            a[i][0] = t.x; a[i][1] = t.y; a[i][2] = t.z; a[i][3] = t.w;
          }
        } else {
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const float4 t = *reinterpret_cast<const float4*>(A + (k + kk) * lda + r);
            a[0][kk] = t.x; a[1][kk] = t.y; a[2][kk] = t.z; a[3][kk] = t.w;
          }
        }
        if constexpr (BR) {
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const float2 t = *reinterpret_cast<const float2*>(B + (k + kk) * ldb + c);
            b[kk][0] = t.x; b[kk][1] = t.y;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float4 t = *reinterpret_cast<const float4*>(B + (c + j) * ldb + k);
            b[0][j] = t.x; b[1][j] = t.y; b[2][j] = t.z; b[3][j] = t.w;
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i][kk] = to_f(AR ? A[(r + i) * lda + k + kk] : A[(k + kk) * lda + r + i]);
#pragma unroll
          for (int j = 0; j < 2; ++j) b[kk][j] = to_f(BR ? B[(k + kk) * ldb + c + j] : B[(c + j) * ldb + k + kk]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) v[i * 2 + j] = fmaf(a[i][kk], b[kk][j], v[i * 2 + j]);
    }
  }
  __device__ __forceinline__ void scale(float s) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= s;
  }
  template <class Fn>
  __device__ __forceinline__ void visit(float* /*scr*/, Fn&& f) const {
    const int lane = threadIdx.x & 31, r = (lane >> 3) * 4, c = (lane & 7) * 2;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) f(r + i, c + j, v[i * 2 + j]);
  }
};

#if HMX_TENSOR_CORES
// Tensor cores: wmma 16x16x16 with an fp32 accumulator fragment; visit() goes through the warp's
// 16 x 16 fp32 scratch tile `scr` (the fragment's element order is not specified).
template <typename E>
struct TcAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
  __device__ __forceinline__ void zero() { nvcuda::wmma::fill_fragment(f, 0.f); }
  template <bool AR, bool BR, int K>
  __device__ __forceinline__ void mma(const E* A, int lda, const E* B, int ldb) {
    namespace wmma = nvcuda::wmma;
    static_assert(K % 16 == 0, "K must be a multiple of 16");
    using LA = typename std::conditional<AR, wmma::row_major, wmma::col_major>::type;
    using LB = typename std::conditional<BR, wmma::row_major, wmma::col_major>::type;
#pragma unroll 2
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, LB> b;
      wmma::load_matrix_sync(a, AR ? A + k : A + (size_t)k * lda, lda);
      wmma::load_matrix_sync(b, BR ? B + (size_t)k * ldb : B + k, ldb);
      wmma::mma_sync(f, a, b, f);
    }
  }
  // f += A_hi B_hi + A_hi B_lo + A_lo B_hi, the lo planes `ap` / `bp` elements after the hi ones
  template <bool AR, bool BR, int K>
  __device__ __forceinline__ void mma3(const E* A, int lda, size_t ap, const E* B, int ldb, size_t bp) {
    namespace wmma = nvcuda::wmma;
    static_assert(K % 16 == 0, "K must be a multiple of 16");
    using LA = typename std::conditional<AR, wmma::row_major, wmma::col_major>::type;
    using LB = typename std::conditional<BR, wmma::row_major, wmma::col_major>::type;
#pragma unroll 1
    for (int k = 0; k < K; k += 16) {
      const E* pa = AR ? A + k : A + (size_t)k * lda;
      const E* pb = BR ? B + (size_t)k * ldb : B + k;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, LB> b;
      wmma::load_matrix_sync(a, pa, lda);
      wmma::load_matrix_sync(b, pb + bp, ldb);
      wmma::mma_sync(f, a, b, f);  // hi lo
      wmma::load_matrix_sync(b, pb, ldb);
      wmma::mma_sync(f, a, b, f);  // hi hi
      wmma::load_matrix_sync(a, pa + ap, lda);
      wmma::mma_sync(f, a, b, f);  // lo hi
    }
  }
  __device__ __forceinline__ void scale(float s) {  // elementwise: the same for every element order
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] *= s;
  }
  template <class Fn>
  __device__ __forceinline__ void visit(float* scr, Fn&& fn) const {
    nvcuda::wmma::store_matrix_sync(scr, f, 16, nvcuda::wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int e = lane; e < 256; e += 32) fn(e >> 4, e & 15, scr[e]);
    __syncwarp();
  }
};
#endif

template <typename E>
struct AccSel {
  using type = SimtAcc<E>;
};
#if HMX_TENSOR_CORES
template <>
struct AccSel<__half> {
  using type = TcAcc<__half>;
};
template <>
struct AccSel<__nv_bfloat16> {
  using type = TcAcc<__nv_bfloat16>;
};
#endif
template <typename E>
using Acc = typename AccSel<E>::type;

// acc += A B over PL planes: A B (PL = 1) or A_hi B_hi + A_hi B_lo + A_lo B_hi (PL = 2, the lo
// planes `ap` / `bp` elements after the hi ones)
template <int PL, bool AR, bool BR, int K, typename AccT, typename E>
__device__ __forceinline__ void mma_planes(AccT& acc, const E* A, int lda, size_t ap, const E* B, int ldb,
                                           size_t bp) {
  if constexpr (PL == 2) {
#if HMX_TENSOR_CORES
    acc.template mma3<AR, BR, K>(A, lda, ap, B, ldb, bp);
#else
    acc.template mma<AR, BR, K>(A, lda, B + bp, ldb);
    acc.template mma<AR, BR, K>(A, lda, B, ldb);
    acc.template mma<AR, BR, K>(A + ap, lda, B, ldb);
#endif
  } else {
    acc.template mma<AR, BR, K>(A, lda, B, ldb);
  }
  (void)ap; (void)bp;
}

// out(M x N) = A(M x K) B(K x N): warp w computes the 16 x 16 tiles w, w + 8, ... (row-major tile
// order) and hands every element to f(row, col, value). scr: the warp's scratch tile.
template <typename E, int M, int N, int K, bool AR, bool BR, int PL = 1, class Fn>
__device__ __forceinline__ void block_gemm(const E* A, int lda, size_t ap, const E* B, int ldb, size_t bp,
                                           float* scr, Fn&& f) {
  static_assert(M % 16 == 0 && N % 16 == 0, "16 x 16 tiles");
  constexpr int NBN = N / 16, NB = (M / 16) * NBN;
  const int warp = threadIdx.x >> 5;
#pragma unroll 1
  for (int blk = warp; blk < NB; blk += kWarps) {
    const int m0 = blk / NBN * 16, n0 = blk % NBN * 16;
    Acc<E> acc;
    acc.zero();
    mma_planes<PL, AR, BR, K>(acc, AR ? A + m0 * lda : A + m0, lda, ap, BR ? B + n0 : B + n0 * ldb, ldb, bp);
    acc.visit(scr, [&](int r, int c, float v) { f(m0 + r, n0 + c, v); });
  }
}

// A D x D fp32 accumulator held in registers across K steps: state += A^T B for A, B given
// row-major with K rows (token-major tiles: A^T is the column-major view). With SPLIT and fewer
// 16 x 16 tiles than warps, warp w owns tile w % NB over the K rows of slice w / NB (KS slices,
// KS partial states); else warp w owns tiles w, w + 8, ... (warps past the last tile idle).
template <typename E, int D, int K, bool SPLIT>
struct StateAcc {
  static constexpr int NB = (D / 16) * (D / 16);
  static constexpr int KS = SPLIT && NB < kWarps ? kWarps / NB : 1;
  static constexpr int F = KS > 1 ? 1 : (NB + kWarps - 1) / kWarps;
  static constexpr int KL = K / KS;
  static_assert(KS == 1 || kWarps % NB == 0, "K split needs whole groups of warps");
  static_assert(KL % 16 == 0, "K slices are whole 16-row steps");
  Acc<E> a[F];
  __device__ __forceinline__ int slice() const { return KS > 1 ? (int)(threadIdx.x >> 5) / NB : 0; }
  __device__ __forceinline__ int tile(int f) const {
    const int warp = threadIdx.x >> 5;
    return KS > 1 ? warp % NB : warp + f * kWarps;
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < F; ++f) a[f].zero();
  }
  template <int PL = 1>
  __device__ __forceinline__ void add_tn(const E* A, int lda, size_t ap, const E* B, int ldb, size_t bp) {
    const int ks = slice();
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const int t = tile(f);
      if (t < NB) {
        const int m0 = t / (D / 16) * 16, n0 = t % (D / 16) * 16;
        mma_planes<PL, false, true, KL>(a[f], A + (size_t)ks * KL * lda + m0, lda, ap, B + (size_t)ks * KL * ldb + n0,
                                        ldb, bp);
      }
    }
  }
  __device__ __forceinline__ void scale(float s) {
#pragma unroll
    for (int f = 0; f < F; ++f) a[f].scale(s);
  }
  // dst [KS][D * D] row-major: every element written once, times `mul`
  __device__ __forceinline__ void store(float* __restrict__ dst, float* scr, float mul = 1.f) const {
    const int ks = slice();
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const int t = tile(f);
      if (t < NB) {
        const int m0 = t / (D / 16) * 16, n0 = t % (D / 16) * 16;
        a[f].visit(scr, [&](int r, int c, float v) { dst[(size_t)ks * D * D + (m0 + r) * D + n0 + c] = v * mul; });
      }
    }
  }
};

// ---- fp16 range: powers of two ----------------------------------------------------------------
// The power of two of |x|'s exponent (x's exponent bits; 1 for 0 and fp32 subnormals), as the
// Triton kernels' _pow2_of_max: x / pow2_of(x) is in [1, 2).
__device__ __forceinline__ float pow2_of(float x) {
  const float p = __int_as_float(__float_as_int(x) & 0x7F800000);
  return p > 0.f ? p : 1.f;
}

// max of v over the block (v >= 0), through kWarps floats of shared memory `red`. Every thread
// must call it; the caller has synchronised since `red`'s last readers.
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, red[w]);
  return m;
}

}  // namespace dev
}  // namespace cuda
}  // namespace hmx
