// Configurations and shared-memory layouts of the CUDA kernels, per (element type, head block D).
//
// d_h is padded to a block D in {32, 64, 128} (a template parameter), k_h is a runtime size walked
// in zero-padded blocks of J rows. TokCfg / FinCfg give the token passes' tile and the finalize
// passes' row block; TokSmem / FinSmem carve dynamic shared memory with one function that runs on
// the host (size only: the launch size, hmx_cuda_plan.cuh) and on the device (the pointers), so
// the two cannot disagree.
#pragma once
#include "hmx_cuda_tiles.cuh"

namespace hmx {
namespace cuda {
namespace dev {

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

}  // namespace dev
}  // namespace cuda
}  // namespace hmx
