// Host side of the CUDA kernels: head block, device queries, the token-chunk grid rule, the
// per-kernel size table (the kernels' own shared-memory carving, run on the host) and with_config,
// the dispatch from a runtime (dtype, head block) to the templates. Used by the launchers
// (hmx_cuda_forward.cu, hmx_cuda_backward.cu), not_supported and tools/cuda_resources.py.
#pragma once
#include "hmx_cuda_layout.cuh"

namespace hmx {
namespace cuda {

// head block for d_h (0: too large)
inline int head_block(int64_t dh) { return (int)padded_head_dim(dh); }

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
constexpr int kMaxKernels = 16;  // entries of the size table (Sizes::table)

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
  // forward: state, fwd_finalize, mix; backward: bwd_prep, query, bwd_mid, key, bwd_final; the
  // passes of blocked mixing (same shared memory as their plain kernels)
  static int table(KernelSize* out) {
    const KernelSize t[] = {
        {"state", TC::TT, tok<dev::Pass::kState>()},     {"fwd_finalize", FC::J, fin<dev::Fin::kFwd>()},
        {"mix", TC::TT, tok<dev::Pass::kMix>()},         {"bwd_prep", FC::J, fin<dev::Fin::kPrep>()},
        {"query", TC::TT, tok<dev::Pass::kQuery>()},     {"bwd_mid", FC::J, fin<dev::Fin::kMid>()},
        {"key", TC::TT, tok<dev::Pass::kKey>()},         {"bwd_final", FC::J, fin<dev::Fin::kFinal>()},
        {"state_blocked", TC::TT, tok<dev::Pass::kState>()}, {"mix_blocked", TC::TT, tok<dev::Pass::kMix>()},
        {"query_blocked", TC::TT, tok<dev::Pass::kQuery>()}, {"key_blocked", TC::TT, tok<dev::Pass::kKey>()},
        {"fwd_finalize_blocked", FC::J, fin<dev::Fin::kFwd>()}, {"bwd_prep_blocked", FC::J, fin<dev::Fin::kPrep>()},
        {"bwd_mid_blocked", FC::J, fin<dev::Fin::kMid>()},     {"bwd_final_blocked", FC::J, fin<dev::Fin::kFinal>()},
    };
    static_assert(sizeof(t) / sizeof(t[0]) == kMaxKernels, "kMaxKernels entries");
    for (int i = 0; i < kMaxKernels; ++i) out[i] = t[i];
    return kMaxKernels;
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

// Kernel table of (dtype, d_h): number of entries written to out[0..kMaxKernels), 0 if d_h is too large
inline int kernel_table(DType dtype, int64_t dh, KernelSize* out) {
  const int D = head_block(dh);
  return D == 0 ? 0 : with_config(dtype, D, KernelTableFn{out});
}

}  // namespace cuda
}  // namespace hmx
