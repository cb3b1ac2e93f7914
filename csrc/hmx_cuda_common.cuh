// Device building blocks of the CUDA forward and backward (reassociated form, docs/HYPERMIXING.md).
//
// Because fc2 is linear, k_h never enters a token loop: per (batch, head) the token passes reduce
// d_h x d_h states (S = sum m hid^T V, T = sum m hid2^T dY and the fc1 gradients) and apply
// d_h x d_h matrices (C = fc2_2^T A, R = fc2^T dP); every k_h-sized product is in a small
// "finalize" pass per (batch, head) that walks k_h in blocks of J rows. d_h is padded to a block
// D in {32, 64, 128} (a template parameter), k_h is a runtime size (zero-padded blocks of J rows).
//
// Products: every matrix product is a block product out of shared memory, split over the 8 warps
// of a block in 16 x 16 output tiles (block_gemm), with fp32 accumulators:
// - fp16 / bf16 operands, code for sm_80+: tensor cores (nvcuda::wmma 16x16x16, HMMA in SASS);
//   the accumulator goes through a 1 KB per-warp fp32 scratch tile to its epilogue;
// - fp32 operands (and 2-byte operands in code for older GPUs): SIMT FMA, each lane owns a 4 x 2
//   piece of the 16 x 16 tile and reads its operands as float4 / float2 from shared memory
//   (0.25 shared loads per FMA for fp32).
// Token passes keep their operands in the input type T (fp16/bf16: z, hid, dU and the staged C / R
// are rounded to T, the tensor-core operands); fp16's range (65504 down to 2^-14) is kept by powers
// of two, as in the Triton backend: C / R are staged divided by the power of two of their largest
// element (per (b, h)), each m dY tile by that of its own (per tile), so dU is rounded in those
// units too; the accumulators follow the tile's power of two (exact rescales), Y is written in
// fp32 and dY read in fp32. bf16 (fp32's range) and fp32 take none of it. The finalize passes multiply fp32 states (S, T, A,
// dP), so for fp16/bf16 they split every operand into bf16 hi + lo planes and add three products
// (hi hi + hi lo + lo hi: about 16 significant bits, fp32 range), on tensor cores too.
// Determinism: every output element and every partial sum has one owner and a fixed summation
// order; partials of token chunks and K-splits go to the workspace and are summed in a fixed order
// by the next pass (no atomics). The number of token chunks depends on the device's SM count, so
// results are bitwise reproducible on a given GPU model (not across models).
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

// ---- configurations ---------------------------------------------------------------------------
// Token passes, operand type E (the input type), head block D: tile of TT tokens; shared-memory
// rows padded by 16 bytes (LD elements of E, LDF floats); a D x D accumulator has NB 16 x 16
// blocks, one per warp or several; with fewer blocks than warps (D = 32) the warps split the
// tile's tokens KS ways and keep KS partial states; column sums (sum of V, dY, dU over tokens)
// use G row groups of D threads.
template <typename E, int D>
struct TokCfg {
  static_assert(D == 32 || D == 64 || D == 128, "head blocks are 32, 64 or 128");
  static constexpr bool kF32 = sizeof(E) == 4;
  static constexpr int TT = D == 128 ? (kF32 ? 16 : 32) : (D == 64 && kF32 ? 32 : 64);
  static constexpr int LD = D + 16 / (int)sizeof(E);
  static constexpr int LDF = D + 4;
  static constexpr int NB = (D / 16) * (D / 16);
  static constexpr int KS = NB >= kWarps ? 1 : kWarps / NB;
  static constexpr int G = kThreads / D;
  static_assert(TT % (16 * KS) == 0 && (TT / 16) * (D / 16) >= kWarps, "token tile too small");
  static_assert(!kF32 || LD == LDF, "fp32 dU shares the U buffer");
};

// Blocks per SM the token kernels are compiled for (__launch_bounds__): two at D <= 64 (at most
// 128 registers per thread), one at D = 128; the grid has about two blocks per SM.
template <int D>
constexpr int kTokMinBlocks = D <= 64 ? 2 : 1;

// Finalize passes: operand type FE (fp32, or bf16 hi/lo planes for fp16/bf16 inputs), blocks of
// J rows of k_h.
template <typename T>
struct FinType {
  using type = __nv_bfloat16;
  static constexpr int PL = 2;
};
template <>
struct FinType<float> {
  using type = float;
  static constexpr int PL = 1;
};

template <typename T, int D>
struct FinCfg {
  using FE = typename FinType<T>::type;
  static constexpr int PL = FinType<T>::PL;
  static constexpr int J = D == 128 ? 16 : 32;
  static constexpr int LD = D + 16 / (int)sizeof(FE);
  static constexpr int LDF = D + 4;
  static constexpr int G = kThreads / D;
};

// ---- shared memory --------------------------------------------------------------------------
// The same carving runs on the host (base = nullptr: only the size) and on the device, so the
// launch size and the kernel's layout cannot disagree. Every buffer starts 128-byte aligned.
struct Carver {
  char* base;
  size_t off;
  template <typename X>
  __host__ __device__ X* take(size_t n) {
    off = (off + 127) / 128 * 128;
    X* p = base != nullptr ? reinterpret_cast<X*>(base + off) : nullptr;
    off += n * sizeof(X);
    return p;
  }
};

__device__ __forceinline__ char* dyn_smem() {
  extern __shared__ __align__(128) char hmx_dyn_smem[];
  return hmx_dyn_smem;
}

enum class Pass { kState, kMix, kQuery, kKey };

template <typename E, int D, Pass P>
struct TokSmem {
  E* w1;      // fc1 [D][LD] ([out][in], zero-padded)
  E* w2;      // C (mix, query) or R (key) [D][LD]
  E* z;       // hypernetwork input tile [TT][LD]
  E* h;       // hid = GELU(U) [TT][LD]
  E* x;       // V m^2 (state, key) or m dY (query) [TT][LD]
  float* u;   // U, then dU in fp32 (query, key) [TT][LDF]
  E* du;      // dU (query, key) [TT][LD]; fp32: the same buffer as u
  float* m;   // keep mask of the tile's rows (0 past the end) [TT]
  float* b1;  // fc1 bias [D]
  float* vec; // c0 (mix) or r0 (key) [D]
  float* scr; // per-warp fp32 16 x 16 tiles (tensor-core epilogues) [kWarps][256]
  __host__ __device__ static size_t carve(char* base, TokSmem* s) {
    using C = TokCfg<E, D>;
    constexpr bool kBwd = P == Pass::kQuery || P == Pass::kKey;
    Carver cv{base, 0};
    s->w1 = cv.take<E>((size_t)D * C::LD);
    s->w2 = P != Pass::kState ? cv.take<E>((size_t)D * C::LD) : nullptr;
    s->z = cv.take<E>((size_t)C::TT * C::LD);
    s->h = cv.take<E>((size_t)C::TT * C::LD);
    s->x = P != Pass::kMix ? cv.take<E>((size_t)C::TT * C::LD) : nullptr;
    s->u = kBwd ? cv.take<float>((size_t)C::TT * C::LDF) : nullptr;
    // fp32: dU in the operand type is the fp32 dU itself (LD == LDF)
    s->du = !kBwd ? nullptr : sizeof(E) == 4 ? reinterpret_cast<E*>(s->u) : cv.take<E>((size_t)C::TT * C::LD);
    s->m = cv.take<float>(C::TT);
    s->b1 = cv.take<float>(D);
    s->vec = cv.take<float>(D);
    s->scr = sizeof(E) == 2 ? cv.take<float>((size_t)kWarps * 256) : nullptr;
    return cv.off;
  }
};

enum class Fin { kFwd, kPrep, kMid, kFinal };

template <typename T, int D, Fin F>
struct FinSmem {
  using C = FinCfg<T, D>;
  using FE = typename C::FE;
  FE* smat;    // S (fwd, final) or T (mid) [PL][D][LD]
  float* sv;   // sum of V m^2 (fwd, final) or of m dY (mid) [D]
  FE* f2;      // generator-1 fc2 rows (fwd, mid) [PL][J][LD]
  FE* g2;      // generator-2 fc2 rows (fwd, prep, mid) [PL][J][LD]
  FE* ab;      // A = GELU(P) rows (fwd, prep, mid) [PL][J][LD]
  FE* dpb;     // dP rows (mid, final) [PL][J][LD]
  float* af;   // A rows in fp32 (fwd, prep) [J][LDF]
  float* pf;   // P rows in fp32 (mid) [J][LDF]
  float* dpf;  // dP rows in fp32 (mid, final) [J][LDF]
  float* b2;   // generator-1 fc2 bias rows [J]
  float* b22;  // generator-2 fc2 bias rows [J]
  float* red;  // column-sum groups [G][D]
  float* scr;  // per-warp fp32 16 x 16 tiles [kWarps][256]
  __host__ __device__ static size_t carve(char* base, FinSmem* s) {
    constexpr int PL = C::PL, J = C::J, LD = C::LD, LDF = C::LDF;
    Carver cv{base, 0};
    const bool sum = F != Fin::kPrep, hasf2 = F == Fin::kFwd || F == Fin::kMid, hasg2 = F != Fin::kFinal;
    const bool hasdp = F == Fin::kMid || F == Fin::kFinal;
    s->smat = sum ? cv.take<FE>((size_t)PL * D * LD) : nullptr;
    s->sv = sum ? cv.take<float>(D) : nullptr;
    s->f2 = hasf2 ? cv.take<FE>((size_t)PL * J * LD) : nullptr;
    s->g2 = hasg2 ? cv.take<FE>((size_t)PL * J * LD) : nullptr;
    s->ab = hasg2 ? cv.take<FE>((size_t)PL * J * LD) : nullptr;
    s->dpb = hasdp ? cv.take<FE>((size_t)PL * J * LD) : nullptr;
    s->af = F == Fin::kFwd || F == Fin::kPrep ? cv.take<float>((size_t)J * LDF) : nullptr;
    s->pf = F == Fin::kMid ? cv.take<float>((size_t)J * LDF) : nullptr;
    s->dpf = hasdp ? cv.take<float>((size_t)J * LDF) : nullptr;
    s->b2 = hasf2 ? cv.take<float>(J) : nullptr;
    s->b22 = hasg2 ? cv.take<float>(J) : nullptr;
    s->red = F != Fin::kFinal ? cv.take<float>((size_t)C::G * D) : nullptr;
    s->scr = sizeof(FE) == 2 ? cv.take<float>((size_t)kWarps * 256) : nullptr;
    return cv.off;
  }
};

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

// chunk c of C over L tokens: tiles [c tiles / C, (c + 1) tiles / C) of `tile` tokens
__device__ __forceinline__ void chunk_rows(int64_t L, int tile, int64_t C, int64_t c, int64_t* r0, int64_t* r1) {
  const int64_t tiles = cdiv(L, tile);
  *r0 = (c * tiles / C) * tile;
  const int64_t e = ((c + 1) * tiles / C) * tile;
  *r1 = e < L ? e : L;
}

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

// ---- token passes ---------------------------------------------------------------------------
// One block per (b h, token chunk): blockIdx.x = b * H + h, blockIdx.y = chunk.
struct TokArgs {
  ProblemParams pb;
  int64_t C;               // token chunks
  const float* wmat;       // C (mix, query) or R (key) [BH][D * D]
  const float* wvec;       // c0 (mix) or r0 (key) [BH][D]
  const float* dy;         // query: dY [B, M, d] fp32
  void* out1;              // mix: y (fp32), query: dq, key: dk [B, L, d]
  void* out2;              // key: dv [B, N, d]
  float* acc_part;         // S (state, key) or T (query) partials [BH][C][KS][D * D]
  float* vec_part;         // sum V m^2 or sum m dY partials [BH][C][G][D]
  float* g_part;           // fc1 weight-gradient partials (query, key) [BH][C][KS][D * D]
  float* gb_part;          // fc1 bias-gradient partials (query, key) [BH][C][G][D]
};

// state: hid = GELU(z fc1^T + b1); S += hid^T (V m^2); sv += sum V m^2           (generator 1)
// mix:   hid2 = GELU(z fc1_2^T + b1_2); Y = m (hid2 C + c0), fp32                (generator 2)
// query: hid2; T += hid2^T (m dY); sdy += sum m dY; dU = (m dY) C^T * GELU'(U);
//        dfc1_2 += dU^T z, db1_2 += sum dU, dquery = s m (dU fc1_2)
// key:   hid; S += hid^T (V m^2), sv; dvalue = m^2 (hid R + r0); dU = (V m^2) R^T * GELU'(U);
//        dfc1 += dU^T z, db1 += sum dU, dkey = s m (dU fc1)
template <typename T, int D, Pass P>
__device__ __forceinline__ void token_pass(const TokArgs& a) {
  using E = T;
  using Cfg = TokCfg<E, D>;
  constexpr int TT = Cfg::TT, LD = Cfg::LD, LDF = Cfg::LDF, G = Cfg::G;
  constexpr bool kKeySide = P == Pass::kState || P == Pass::kKey;
  constexpr bool kBwd = P == Pass::kQuery || P == Pass::kKey;
  using SAcc = StateAcc<E, D, TT, true>;
  static_assert(SAcc::KS == Cfg::KS, "K split");

  TokSmem<E, D, P> s;
  TokSmem<E, D, P>::carve(dyn_smem(), &s);
  const ProblemParams& pb = a.pb;
  const int dh = (int)pb.d_h;
  const int64_t d = pb.d;
  const int64_t bh = blockIdx.x, chunk = blockIdx.y;
  const int64_t h = bh % pb.H, b = bh / pb.H;
  const int64_t L = kKeySide ? pb.N : pb.M;
  const GeneratorParams& gp = kKeySide ? pb.g1 : pb.g2;
  const T* __restrict__ x = static_cast<const T*>(kKeySide ? pb.k : pb.q) +
                            b * (kKeySide ? pb.k_bstride : pb.q_bstride) + h * dh;
  const int64_t xrs = kKeySide ? pb.k_rstride : pb.q_rstride;
  const float* __restrict__ pe = static_cast<const float*>(kKeySide ? pb.pe_k : pb.pe_q) + h * dh;
  const float* __restrict__ mask =
      (kKeySide ? pb.m_k : pb.m_q) ? static_cast<const float*>(kKeySide ? pb.m_k : pb.m_q) + b * L : nullptr;
  const float sc = (float)pb.scale;
  const int tid = threadIdx.x, warp = tid >> 5;
  float* scr = s.scr != nullptr ? s.scr + warp * 256 : nullptr;

  // fp16: C / R staged divided by w_scale, the power of two of their largest element (one per
  // (b, h), the same in every chunk); m dY tiles by g_scale, their own (query); see the header.
  constexpr bool kPow2 = std::is_same<T, __half>::value;
  float w_scale = 1.f;
  if constexpr (kPow2 && P != Pass::kState) {
    float mx = 0.f;
#pragma unroll 1
    for (int i = tid; i < D * D; i += kThreads) mx = fmaxf(mx, fabsf(a.wmat[bh * D * D + i]));
    w_scale = pow2_of(block_max(mx, s.scr));
  }
  // weights of this head (zero-padded to D)
  const T* __restrict__ fc1 = static_cast<const T*>(gp.fc1_w) + h * dh * dh;
  const T* __restrict__ fb1 = gp.fc1_b ? static_cast<const T*>(gp.fc1_b) + h * dh : nullptr;
  for (int i = tid; i < D * D; i += kThreads) {
    const int o = i / D, c = i % D;
    s.w1[o * LD + c] = (o < dh && c < dh) ? fc1[o * dh + c] : from_f<E>(0.f);
    if constexpr (P != Pass::kState)
      s.w2[o * LD + c] = from_f<E>((o < dh && c < dh) ? a.wmat[bh * D * D + i] / w_scale : 0.f);
  }
  if (tid < D) {
    s.b1[tid] = (fb1 != nullptr && tid < dh) ? to_f(fb1[tid]) : 0.f;
    s.vec[tid] = (P == Pass::kMix || P == Pass::kKey) && tid < dh ? a.wvec[bh * D + tid] : 0.f;
  }

  SAcc acc1, acc2;  // S or T; fc1 gradient
  acc1.zero();
  acc2.zero();
  const int cc = tid % D, gi = tid / D;  // column-sum owner: column cc, rows gi, gi + G, ...
  float cs1 = 0.f, cs2 = 0.f;
  float g_scale = 1.f;  // query, fp16: this tile's power of two of max |m dY|; acc1, acc2 in its units

  int64_t r0, r1;
  chunk_rows(L, TT, a.C, chunk, &r0, &r1);
  for (bool first = true; r0 < r1; r0 += TT, first = false) {
    const int tn = (int)((r1 - r0) < TT ? (r1 - r0) : TT);
    __syncthreads();  // the previous tile's readers are done (first tile: weights staged)
    if constexpr (kPow2 && P == Pass::kQuery) {
      const float* __restrict__ dy = a.dy + b * pb.M * d + h * dh;
      float mx = 0.f;
#pragma unroll 1
      for (int i = tid; i < TT * D; i += kThreads) {
        const int t = i / D, c = i % D;
        if (t < tn && c < dh && (mask == nullptr || mask[r0 + t] != 0.f)) mx = fmaxf(mx, fabsf(dy[(r0 + t) * d + c]));
      }
      const float g = pow2_of(block_max(mx, s.scr));
      if (!first && g != g_scale) {  // exact: a power of two (fp32 range)
        acc1.scale(g_scale / g);
        acc2.scale(g_scale / g);
      }
      g_scale = g;  // (block_max's readers of s.scr finish before the sync after the staging)
    }
    for (int i = tid; i < TT * D; i += kThreads) {
      const int t = i / D, c = i % D;
      const int64_t row = r0 + t;
      const float mt = t < tn ? (mask != nullptr ? mask[row] : 1.f) : 0.f;
      const bool ok = t < tn && c < dh;
      // a padded row's tokens are selected away (not read), never multiplied by its 0: NaN * 0 =
      // NaN would carry a NaN / inf in a padded position into every kept result
      const bool kept = ok && mt != 0.f;
      s.z[t * LD + c] = from_f<E>(ok ? sc * (kept ? to_f(x[row * xrs + c]) : 0.f) + pe[row * d + c] : 0.f);
      if constexpr (kKeySide) {
        const T* __restrict__ v = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
        s.x[t * LD + c] = from_f<E>(kept ? to_f(v[row * pb.v_rstride + c]) : 0.f);
      }
      if constexpr (P == Pass::kQuery) {
        const float* __restrict__ dy = a.dy + b * pb.M * d + h * dh;
        s.x[t * LD + c] = from_f<E>(kept ? dy[row * d + c] / g_scale : 0.f);
      }
      if (c == 0) s.m[t] = mt;
    }
    __syncthreads();
    // U = z fc1^T + b1 ([TT, D] @ [D, D]^T), hid = GELU(U)
    block_gemm<E, TT, D, D, true, false>(s.z, LD, 0, s.w1, LD, 0, scr, [&](int t, int o, float v) {
      const float u = v + s.b1[o];
      if constexpr (kBwd) s.u[t * LDF + o] = u;
      s.h[t * LD + o] = from_f<E>(o < dh ? gelu(u) : 0.f);
    });
    __syncthreads();
    if constexpr (P != Pass::kMix) {
      acc1.add_tn(s.h, LD, 0, s.x, LD, 0);  // S or T += hid^T X
#pragma unroll 4
      for (int t = gi; t < TT; t += G) cs1 += to_f(s.x[t * LD + cc]) * g_scale;
    }
    if constexpr (P == Pass::kMix) {  // Y = m (hid2 C + c0), fp32
      float* __restrict__ y = static_cast<float*>(a.out1) + b * pb.M * d + h * dh;
      block_gemm<E, TT, D, D, true, true>(s.h, LD, 0, s.w2, LD, 0, scr, [&](int t, int c, float v) {
        if (t < tn && c < dh) y[(r0 + t) * d + c] = s.m[t] * (v * w_scale + s.vec[c]);
      });
    }
    if constexpr (P == Pass::kKey) {  // dvalue = m^2 (hid R + r0)
      T* __restrict__ dv = static_cast<T*>(a.out2) + b * pb.N * d + h * dh;
      block_gemm<E, TT, D, D, true, true>(s.h, LD, 0, s.w2, LD, 0, scr, [&](int t, int c, float v) {
        if (t < tn && c < dh) dv[(r0 + t) * d + c] = from_f<T>(s.m[t] * s.m[t] * (v * w_scale + s.vec[c]));
      });
    }
    // dU's units: w_scale (key) or g_scale * w_scale (query); 1 but for fp16
    const float du_unit = P == Pass::kQuery ? g_scale * w_scale : w_scale;
    if constexpr (kBwd) {
      // dhid = X W2^T (key: (V m^2) R^T; query: (m dY) C^T), dU = dhid * GELU'(U); s.du in
      // du_unit, s.u (the fp32 column sums) in true units
      block_gemm<E, TT, D, D, true, false>(s.x, LD, 0, s.w2, LD, 0, scr, [&](int t, int o, float v) {
        const float du = v * gelu_grad(s.u[t * LDF + o]);
        s.u[t * LDF + o] = du * du_unit;
        s.du[t * LD + o] = from_f<E>(du);
      });
      __syncthreads();
      acc2.add_tn(s.du, LD, 0, s.z, LD, 0);  // dfc1 += dU^T z
#pragma unroll 4
      for (int t = gi; t < TT; t += G) cs2 += s.u[t * LDF + cc];
      // dz = dU fc1 ([TT, D] @ [D, D]); dx = s m dz
      T* __restrict__ dx = static_cast<T*>(a.out1) + b * L * d + h * dh;
      block_gemm<E, TT, D, D, true, true>(s.du, LD, 0, s.w1, LD, 0, scr, [&](int t, int c, float v) {
        if (t < tn && c < dh) dx[(r0 + t) * d + c] = from_f<T>(sc * s.m[t] * v * du_unit);
      });
    }
  }
  // chunk partials (acc1: units g_scale of the last tile (query), acc2: dU's)
  const int64_t item = bh * a.C + chunk;
  if constexpr (P != Pass::kMix) {
    acc1.store(a.acc_part + item * Cfg::KS * D * D, scr, P == Pass::kQuery ? g_scale : 1.f);
    a.vec_part[(item * G + gi) * D + cc] = cs1;
  }
  if constexpr (kBwd) {
    acc2.store(a.g_part + item * Cfg::KS * D * D, scr, P == Pass::kQuery ? g_scale * w_scale : w_scale);
    a.gb_part[(item * G + gi) * D + cc] = cs2;
  }
}

// ---- finalize passes ------------------------------------------------------------------------
// One block per (b, h), walking k_h in blocks of J rows.
struct FinArgs {
  ProblemParams pb;
  int64_t n_mat_parts;     // partials per (b, h) of the D x D state: chunks * KS
  int64_t n_vec_parts;     // partials per (b, h) of its column sum: chunks * G
  const float* mat_part;   // S (fwd, final) or T (mid) partials [BH][n_mat_parts][D * D]
  const float* vec_part;   // sv or sdy partials [BH][n_vec_parts][D]
  const float* p_in;       // saved P [BH][k_h][d_h] (prep, mid)
  float* p_out;            // P (fwd) [BH][k_h][d_h]
  float* mat_out;          // C (fwd, prep) or R (mid) [BH][D * D]
  float* vec_out;          // c0 (fwd, prep) or r0 (mid) [BH][D]
  float* dp;               // dP [BH][k_h][D]: written by mid, read by final
  float* gw;               // fc2 weight-gradient partial per (b, h) [BH][k_h][d_h] (mid: gen 2, final: gen 1)
  float* gb;               // fc2 bias-gradient partial per (b, h) [BH][k_h]
};

// fwd:   S, sv = sums of the state pass's partials; per row block: P = fc2 S + b2 sv^T (written),
//        A = GELU(P); C += fc2_2^T A, c0 += b2_2^T A
// prep:  A = GELU(P) from the saved P; C, c0 as in fwd
// mid:   T, sdy = sums of the query pass's partials; per row block: dA = fc2_2 T + b2_2 sdy^T,
//        dP = dA * GELU'(P) (written), dfc2_2 = A T^T, db2_2 = A sdy (written);
//        R += fc2^T dP, r0 += b2^T dP
// final: S, sv = sums of the key pass's partials; per row block: dfc2 = dP S^T, db2 = dP sv
template <typename T, int D, Fin F>
__device__ __forceinline__ void fin_pass(const FinArgs& a) {
  using Cfg = FinCfg<T, D>;
  using FE = typename Cfg::FE;
  constexpr int PL = Cfg::PL, J = Cfg::J, LD = Cfg::LD, LDF = Cfg::LDF, G = Cfg::G;
  constexpr size_t kPlM = (size_t)D * LD, kPlB = (size_t)J * LD;  // plane strides
  using SAcc = StateAcc<FE, D, J, false>;

  FinSmem<T, D, F> s;
  FinSmem<T, D, F>::carve(dyn_smem(), &s);
  const ProblemParams& pb = a.pb;
  const int dh = (int)pb.d_h, kh = (int)pb.k_h;
  const int64_t bh = blockIdx.x, h = bh % pb.H;
  const int tid = threadIdx.x, warp = tid >> 5;
  float* scr = s.scr != nullptr ? s.scr + warp * 256 : nullptr;
  const int cc = tid % D, gi = tid / D;

  // the D x D state and its column sum: partials added in a fixed order
  if constexpr (F != Fin::kPrep) {
    for (int i = tid; i < D * D; i += kThreads) {
      const float* p = a.mat_part + bh * a.n_mat_parts * D * D + i;
      float acc = 0.f;
      for (int64_t q = 0; q < a.n_mat_parts; ++q) acc += p[q * D * D];
      put<PL>(s.smat + (i / D) * LD + i % D, kPlM, acc);
    }
    if (tid < D) {
      const float* p = a.vec_part + bh * a.n_vec_parts * D + tid;
      float acc = 0.f;
      for (int64_t q = 0; q < a.n_vec_parts; ++q) acc += p[q * D];
      s.sv[tid] = acc;
    }
  }
  const T* __restrict__ fc2_1 = static_cast<const T*>(pb.g1.fc2_w) + h * kh * dh;
  const T* __restrict__ fb2_1 = pb.g1.fc2_b ? static_cast<const T*>(pb.g1.fc2_b) + h * kh : nullptr;
  const T* __restrict__ fc2_2 = static_cast<const T*>(pb.g2.fc2_w) + h * kh * dh;
  const T* __restrict__ fb2_2 = pb.g2.fc2_b ? static_cast<const T*>(pb.g2.fc2_b) + h * kh : nullptr;
  constexpr bool kHasF2 = F == Fin::kFwd || F == Fin::kMid, kHasG2 = F != Fin::kFinal;

  SAcc acc;  // C or R
  acc.zero();
  float vp = 0.f;  // c0 or r0 partial: column cc, rows gi, gi + G, ...

#pragma unroll 1
  for (int jb = 0; jb < kh; jb += J) {
    __syncthreads();  // previous block's readers done (first block: the state is staged)
    for (int i = tid; i < J * D; i += kThreads) {
      const int j = i / D, o = i % D;
      const bool ok = jb + j < kh && o < dh;
      const int64_t src = (int64_t)(jb + j) * dh + o;
      if constexpr (kHasF2) put<PL>(s.f2 + j * LD + o, kPlB, ok ? to_f(fc2_1[src]) : 0.f);
      if constexpr (kHasG2) put<PL>(s.g2 + j * LD + o, kPlB, ok ? to_f(fc2_2[src]) : 0.f);
      if constexpr (F == Fin::kPrep || F == Fin::kMid) {
        const float pv = ok ? a.p_in[bh * kh * dh + src] : 0.f;
        const float av = ok ? gelu(pv) : 0.f;
        put<PL>(s.ab + j * LD + o, kPlB, av);
        if constexpr (F == Fin::kPrep) s.af[j * LDF + o] = av;
        if constexpr (F == Fin::kMid) s.pf[j * LDF + o] = pv;
      }
      if constexpr (F == Fin::kFinal) {
        const float dpv = jb + j < kh ? a.dp[(bh * kh + jb + j) * D + o] : 0.f;
        put<PL>(s.dpb + j * LD + o, kPlB, dpv);
        s.dpf[j * LDF + o] = dpv;
      }
    }
    if (tid < J) {
      const bool ok = jb + tid < kh;
      if constexpr (kHasF2) s.b2[tid] = ok && fb2_1 != nullptr ? to_f(fb2_1[jb + tid]) : 0.f;
      if constexpr (kHasG2) s.b22[tid] = ok && fb2_2 != nullptr ? to_f(fb2_2[jb + tid]) : 0.f;
    }
    __syncthreads();
    if constexpr (F == Fin::kFwd) {
      // P = fc2 S + b2 sv^T ([J, D] @ [D, D]), A = GELU(P)
      block_gemm<FE, J, D, D, true, true, PL>(s.f2, LD, kPlB, s.smat, LD, kPlM, scr, [&](int j, int c, float v) {
        const bool ok = jb + j < kh && c < dh;
        const float pv = v + s.b2[j] * s.sv[c];
        if (ok) a.p_out[(bh * kh + jb + j) * dh + c] = pv;
        const float av = ok ? gelu(pv) : 0.f;
        put<PL>(s.ab + j * LD + c, kPlB, av);
        s.af[j * LDF + c] = av;
      });
      __syncthreads();
    }
    if constexpr (F == Fin::kFwd || F == Fin::kPrep) {
      acc.template add_tn<PL>(s.g2, LD, kPlB, s.ab, LD, kPlB);  // C += fc2_2^T A
      for (int j = gi; j < J; j += G) vp += s.b22[j] * s.af[j * LDF + cc];  // c0 += b2_2^T A
    }
    if constexpr (F == Fin::kMid) {
      // dA = fc2_2 T + b2_2 sdy^T ([J, D] @ [D, D]); dP = dA * GELU'(P)
      block_gemm<FE, J, D, D, true, true, PL>(s.g2, LD, kPlB, s.smat, LD, kPlM, scr, [&](int j, int c, float v) {
        const bool ok = jb + j < kh && c < dh;
        const float dpv = ok ? (v + s.b22[j] * s.sv[c]) * gelu_grad(s.pf[j * LDF + c]) : 0.f;
        if (jb + j < kh) a.dp[(bh * kh + jb + j) * D + c] = dpv;
        put<PL>(s.dpb + j * LD + c, kPlB, dpv);
        s.dpf[j * LDF + c] = dpv;
      });
      // dfc2_2 = A T^T ([J, D] @ [D, D]^T)
      block_gemm<FE, J, D, D, true, false, PL>(s.ab, LD, kPlB, s.smat, LD, kPlM, scr, [&](int j, int o, float v) {
        if (jb + j < kh && o < dh) a.gw[(bh * kh + jb + j) * dh + o] = v;
      });
      if (tid < J && jb + tid < kh) {  // db2_2 = A sdy
        float acc_b = 0.f;
        for (int c = 0; c < dh; ++c) acc_b += gelu(s.pf[tid * LDF + c]) * s.sv[c];
        a.gb[bh * kh + jb + tid] = acc_b;
      }
      __syncthreads();
      acc.template add_tn<PL>(s.f2, LD, kPlB, s.dpb, LD, kPlB);  // R += fc2^T dP
      for (int j = gi; j < J; j += G) vp += s.b2[j] * s.dpf[j * LDF + cc];  // r0 += b2^T dP
    }
    if constexpr (F == Fin::kFinal) {
      // dfc2 = dP S^T ([J, D] @ [D, D]^T), db2 = dP sv
      block_gemm<FE, J, D, D, true, false, PL>(s.dpb, LD, kPlB, s.smat, LD, kPlM, scr, [&](int j, int o, float v) {
        if (jb + j < kh && o < dh) a.gw[(bh * kh + jb + j) * dh + o] = v;
      });
      if (tid < J && jb + tid < kh) {
        float acc_b = 0.f;
        for (int c = 0; c < dh; ++c) acc_b += s.dpf[tid * LDF + c] * s.sv[c];
        a.gb[bh * kh + jb + tid] = acc_b;
      }
    }
  }
  if constexpr (F != Fin::kFinal) {
    acc.store(a.mat_out + bh * D * D, scr);
    s.red[gi * D + cc] = vp;
    __syncthreads();
    if (tid < D) {
      float v = 0.f;
      for (int g = 0; g < G; ++g) v += s.red[g * D + tid];
      a.vec_out[bh * D + tid] = v;
    }
  }
}

}  // namespace dev

// ---- host: plans and launch sizes -----------------------------------------------------------
// head block for d_h (0: too large)
inline int head_block(int64_t dh) { return dh <= 32 ? 32 : dh <= 64 ? 64 : dh <= 128 ? 128 : 0; }

// the current device's SM count and opt-in shared memory per block (0 if unknown)
inline int device_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}
inline size_t device_smem_optin() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  return (size_t)n;
}

// Token chunks of a pass over L tokens: about two blocks per SM over all (b, h), at least one tile
// per chunk: clamp(ceil(2 SMs / BH), 1, ceil(L / tile)).
inline int64_t token_chunks(int64_t L, int64_t BH, int tile, int sms) {
  int64_t c = dev::cdiv(2 * (int64_t)sms, BH);
  const int64_t tiles = dev::cdiv(L, tile);
  if (c > tiles) c = tiles;
  if (c > 65535) c = 65535;
  return c < 1 ? 1 : c;
}

// Per kernel of one configuration (element type T, head block D): its name, tile (token tile or
// k_h rows), dynamic shared memory. Used by the launchers, not_supported and the resource report.
struct KernelSize {
  const char* name;
  int tile;
  size_t smem;
};

template <typename T, int D>
struct Sizes {
  using TC = dev::TokCfg<T, D>;
  using FC = dev::FinCfg<T, D>;
  template <dev::Pass P>
  static size_t tok() {
    dev::TokSmem<T, D, P> s;
    return dev::TokSmem<T, D, P>::carve(nullptr, &s);
  }
  template <dev::Fin F>
  static size_t fin() {
    dev::FinSmem<T, D, F> s;
    return dev::FinSmem<T, D, F>::carve(nullptr, &s);
  }
  // forward: state, fwd_finalize, mix; backward: bwd_prep, query, bwd_mid, key, bwd_final
  static int table(KernelSize* out) {
    const KernelSize t[] = {
        {"state", TC::TT, tok<dev::Pass::kState>()},     {"fwd_finalize", FC::J, fin<dev::Fin::kFwd>()},
        {"mix", TC::TT, tok<dev::Pass::kMix>()},         {"bwd_prep", FC::J, fin<dev::Fin::kPrep>()},
        {"query", TC::TT, tok<dev::Pass::kQuery>()},     {"bwd_mid", FC::J, fin<dev::Fin::kMid>()},
        {"key", TC::TT, tok<dev::Pass::kKey>()},         {"bwd_final", FC::J, fin<dev::Fin::kFinal>()},
    };
    for (int i = 0; i < 8; ++i) out[i] = t[i];
    return 8;
  }
};

// f.template operator()<T, D>() for the problem's dtype and head block (D must be 32, 64 or 128)
template <class Fn>
auto with_config(DType dtype, int D, Fn&& f) {
  switch (dtype) {
    case DType::kF16:
      return D == 32 ? f.template operator()<__half, 32>() : D == 64 ? f.template operator()<__half, 64>()
                                                                      : f.template operator()<__half, 128>();
    case DType::kBF16:
      return D == 32 ? f.template operator()<__nv_bfloat16, 32>()
                     : D == 64 ? f.template operator()<__nv_bfloat16, 64>()
                               : f.template operator()<__nv_bfloat16, 128>();
    default:
      return D == 32 ? f.template operator()<float, 32>() : D == 64 ? f.template operator()<float, 64>()
                                                                     : f.template operator()<float, 128>();
  }
}

struct KernelTableFn {
  KernelSize* out;
  template <typename T, int D>
  int operator()() const { return Sizes<T, D>::table(out); }
};

// Kernel table of (dtype, d_h): number of entries written to out[0..8), 0 if d_h is too large
inline int kernel_table(DType dtype, int64_t dh, KernelSize* out) {
  const int D = head_block(dh);
  return D == 0 ? 0 : with_config(dtype, D, KernelTableFn{out});
}

}  // namespace cuda
}  // namespace hmx
