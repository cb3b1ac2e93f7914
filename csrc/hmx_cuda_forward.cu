// Fused HyperMixing forward on CUDA, reassociated (docs/HYPERMIXING.md, "Reassociated form"):
// k_h never enters a token loop and no [N, k] tensor exists anywhere.
//
//   1. state_kernel, grid (B H, key chunks): per tile of keys, hid = GELU(z fc1^T + b1) and
//      V m^2 in shared memory; each block reduces S = sum hid^T V m^2 [d_h, d_h] and
//      sv = sum V m^2 [d_h] into fp32 chunk partials.
//   2. fwd_finalize_kernel, grid B H: S, sv = the partials summed in a fixed order (sequence
//      parallel: row_sums, then the ranks' all-reduce, hmx_cuda.h);
//      P = fc2 S + b2 sv^T (written: the state the backward takes), A = GELU(P),
//      C = fc2_2^T A [d_h, d_h], c0 = b2_2^T A, walking k_h in blocks of J rows.
//   3. mix_kernel, grid (B H, query chunks): hid2 = GELU(z fc1_2^T + b1_2) per tile,
//      Y = m (hid2 C + c0), written in fp32 (fp16's range). LayerNorm is applied by the caller.
// Workspace (fp32): S and sv partials [B H, chunks, KS, D^2] / [B H, chunks, G, D]; C, c0.
//
// Mixing blocks (BlockPlan, hmx_cuda.h): the state and mix passes run over (piece, b h) (the
// *_blocked_kernel instantiations; the plain kernels are untouched), the pieces' partials become
// per-block window sums (hmx_cuda_blocks.cuh), the finalize pass runs per (b, h, block) and P_j
// goes to block slot j of p (unused slots zero).
#include <cuda_runtime.h>

#include <cstdio>

#include "hmx_cuda.h"
#include "hmx_cuda_blocks.cuh"
#include "hmx_cuda_passes.cuh"
#include "hmx_cuda_plan.cuh"

namespace hmx {
namespace cuda {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) state_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kState>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) mix_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kMix>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) state_blocked_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kState, true>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) mix_blocked_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kMix, true>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) fwd_finalize_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kFwd>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) fwd_finalize_blocked_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kFwd, true>(a);
}

namespace {

struct FwdWorkspace {
  float* s_part;   // [BH][Ck][KS][D * D] (blocks: Ck = pieces)
  float* sv_part;  // [BH][Ck][G][D]
  float* cmat;     // [BH][nb][D * D]
  float* c0;       // [BH][nb][D]
  float* s_win;    // blocks: window sums of S [BH][nb][D * D]
  float* sv_win;   // blocks: window sums of sv [BH][nb][D]
  float* scratch;  // blocks: the window pass's suffix sums [BH][nb][D * D]
  float* p_blocks; // blocks with more state slots than blocks: P [BH][nb][k_h][d_h]
  float* sums;     // sequence parallel: S [BH][D * D] then sv [BH][D], all-reduced (one region)
  size_t bytes;
};

template <typename T, int D>
FwdWorkspace carve_fwd(const ProblemParams& pb, const BlockPlan& plan, void* base, int64_t Ck, bool reduced) {
  using TC = dev::TokCfg<T, D>;
  const int64_t BH = pb.B * pb.H, nb = plan.blocked() ? plan.nb : 1, bl = plan.blocked() ? 1 : 0;
  const int64_t pslots = plan.blocked() && pb.num_blocks != plan.nb ? 1 : 0;
  size_t off = 0;
  auto take = [&](int64_t n) {
    float* p = base != nullptr ? reinterpret_cast<float*>(static_cast<char*>(base) + off) : nullptr;
    off += ((size_t)n * sizeof(float) + 255) / 256 * 256;
    return p;
  };
  FwdWorkspace w;
  w.s_part = take(BH * Ck * TC::KS * D * D);
  w.sv_part = take(BH * Ck * TC::G * D);
  w.cmat = take(BH * nb * D * D);
  w.c0 = take(BH * nb * D);
  w.s_win = take(bl * BH * nb * D * D);
  w.sv_win = take(bl * BH * nb * D);
  w.scratch = take(bl * BH * nb * D * D);
  w.p_blocks = take(pslots * BH * nb * pb.k_h * pb.d_h);
  w.sums = take(reduced ? cuda_reduce_count(pb.B, pb.H, pb.d_h) : 0);
  w.bytes = off;
  return w;
}

template <class K>
cudaError_t prepare(K kernel, size_t smem) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

template <typename T, int D>
int forward_blocked(const ForwardParams& fp, const BlockPlan& plan, void* workspace, cudaStream_t stream);

template <typename T, int D>
int forward_t(const ForwardParams& fp, const BlockPlan& plan, void* workspace, cudaStream_t stream,
              const Reducer& reduce) {
  if (plan.blocked()) return reduce ? (int)cudaErrorNotSupported : forward_blocked<T, D>(fp, plan, workspace, stream);
  using TC = dev::TokCfg<T, D>;
  const ProblemParams& pb = fp.pb;
  const int64_t BH = pb.B * pb.H;
  const int sms = device_sms();
  const int64_t Ck = token_chunks(pb.N, BH, TC::TT, sms), Cq = token_chunks(pb.M, BH, TC::TT, sms);
  const FwdWorkspace w = carve_fwd<T, D>(pb, plan, workspace, Ck, (bool)reduce);

  const size_t s_state = Sizes<T, D>::template tok<dev::Pass::kState>();
  const size_t s_fin = Sizes<T, D>::template fin<dev::Fin::kFwd>();
  const size_t s_mix = Sizes<T, D>::template tok<dev::Pass::kMix>();
  cudaError_t err;
  if ((err = prepare(state_kernel<T, D>, s_state)) != cudaSuccess) return (int)err;
  if ((err = prepare(fwd_finalize_kernel<T, D>, s_fin)) != cudaSuccess) return (int)err;
  if ((err = prepare(mix_kernel<T, D>, s_mix)) != cudaSuccess) return (int)err;

  dev::TokArgs ta{};
  ta.pb = pb;
  ta.C = Ck;
  ta.acc_part = w.s_part;
  ta.vec_part = w.sv_part;
  state_kernel<T, D><<<dim3((unsigned)BH, (unsigned)Ck), kThreads, s_state, stream>>>(ta);

  dev::FinArgs fa{};
  fa.pb = pb;
  fa.n_mat_parts = Ck * TC::KS;
  fa.n_vec_parts = Ck * TC::G;
  fa.mat_part = w.s_part;
  fa.vec_part = w.sv_part;
  if (reduce) {  // sequence parallel: this slice's S, sv, summed over the ranks (hmx_cuda.h)
    if ((err = reducer_sums(w.s_part, fa.n_mat_parts, w.sv_part, fa.n_vec_parts, BH, D, w.sums, stream)) !=
        cudaSuccess)
      return (int)err;
    reduce(w.sums, cuda_reduce_count(pb.B, pb.H, pb.d_h));
    fa.n_mat_parts = fa.n_vec_parts = 1;
    fa.mat_part = w.sums;
    fa.vec_part = w.sums + BH * D * D;
  }
  fa.p_out = static_cast<float*>(fp.p);
  fa.mat_out = w.cmat;
  fa.vec_out = w.c0;
  fwd_finalize_kernel<T, D><<<(unsigned)BH, kThreads, s_fin, stream>>>(fa);

  dev::TokArgs ma{};
  ma.pb = pb;
  ma.C = Cq;
  ma.wmat = w.cmat;
  ma.wvec = w.c0;
  ma.out1 = fp.y;
  mix_kernel<T, D><<<dim3((unsigned)BH, (unsigned)Cq), kThreads, s_mix, stream>>>(ma);
  return (int)cudaGetLastError();
}

// Blocked mixing: state pass over the pieces, window sums of S and sv per block, the finalize pass
// per (b, h, block), the mix pass over the pieces reading its block's C, c0.
template <typename T, int D>
int forward_blocked(const ForwardParams& fp, const BlockPlan& plan, void* workspace, cudaStream_t stream) {
  using TC = dev::TokCfg<T, D>;
  const ProblemParams& pb = fp.pb;
  const int64_t BH = pb.B * pb.H, nb = plan.nb, np = plan.n_pieces, kh = pb.k_h, dh = pb.d_h;
  const FwdWorkspace w = carve_fwd<T, D>(pb, plan, workspace, np, false);
  float* p = static_cast<float*>(fp.p);
  cudaError_t err;
  {
    const size_t s_state = Sizes<T, D>::template tok<dev::Pass::kState>();
    const size_t s_fin = Sizes<T, D>::template fin<dev::Fin::kFwd>();
    const size_t s_mix = Sizes<T, D>::template tok<dev::Pass::kMix>();
    if ((err = prepare(state_blocked_kernel<T, D>, s_state)) != cudaSuccess) return (int)err;
    if ((err = prepare(fwd_finalize_blocked_kernel<T, D>, s_fin)) != cudaSuccess) return (int)err;
    if ((err = prepare(mix_blocked_kernel<T, D>, s_mix)) != cudaSuccess) return (int)err;
    const dim3 grid((unsigned)np, (unsigned)BH);

    dev::TokArgs ta{};
    ta.pb = pb;
    ta.C = np;
    ta.pieces = plan.pieces();
    ta.nb = nb;
    ta.acc_part = w.s_part;
    ta.vec_part = w.sv_part;
    state_blocked_kernel<T, D><<<grid, kThreads, s_state, stream>>>(ta);
    if ((err = block_windows(plan, BH, {w.s_part, TC::KS, w.s_win, w.scratch, D * D, plan.width, false},
                             {w.sv_part, TC::G, w.sv_win, w.scratch, D, plan.width, false}, stream)) != cudaSuccess)
      return (int)err;

    dev::FinArgs fa{};
    fa.pb = pb;
    fa.nb = nb;
    fa.n_mat_parts = 1;
    fa.n_vec_parts = 1;
    fa.mat_part = w.s_win;
    fa.vec_part = w.sv_win;
    fa.p_out = w.p_blocks != nullptr ? w.p_blocks : p;
    fa.mat_out = w.cmat;
    fa.vec_out = w.c0;
    fa.p_init = static_cast<const float*>(fp.p_init);  // [B H][n_init or 1][k_h][d_h] (the binding's layout)
    fa.init_div = fp.n_init == 0 ? nb : 1;
    fwd_finalize_blocked_kernel<T, D><<<(unsigned)(BH * nb), kThreads, s_fin, stream>>>(fa);

    dev::TokArgs ma{};
    ma.pb = pb;
    ma.C = np;
    ma.pieces = plan.pieces();
    ma.nb = nb;
    ma.wmat = w.cmat;
    ma.wvec = w.c0;
    ma.out1 = fp.y;
    mix_blocked_kernel<T, D><<<grid, kThreads, s_mix, stream>>>(ma);
  }
  // p [BH][num_blocks][k_h][d_h]: P_j in slot j, the slots past the blocks zero
  const size_t blk = (size_t)kh * dh * sizeof(float), row = (size_t)pb.num_blocks * blk;
  if (w.p_blocks != nullptr &&
      (err = cudaMemcpy2DAsync(p, row, w.p_blocks, nb * blk, nb * blk, BH, cudaMemcpyDeviceToDevice, stream)) !=
          cudaSuccess)
    return (int)err;
  if (pb.num_blocks > nb && (err = cudaMemset2DAsync(reinterpret_cast<char*>(p) + nb * blk, row, 0,
                                                      (pb.num_blocks - nb) * blk, BH, stream)) != cudaSuccess)
    return (int)err;
  return (int)cudaGetLastError();
}

struct ForwardFn {
  const ForwardParams& fp;
  const BlockPlan& plan;
  void* ws;
  cudaStream_t stream;
  const Reducer& reduce;
  template <typename T, int D>
  int operator()() const { return forward_t<T, D>(fp, plan, ws, stream, reduce); }
};

struct FwdBytesFn {
  const ProblemParams& pb;
  const BlockPlan& plan;
  bool reduced;
  template <typename T, int D>
  size_t operator()() const {
    const int64_t Ck = plan.blocked() ? plan.n_pieces : token_chunks(pb.N, pb.B * pb.H, dev::TokCfg<T, D>::TT, device_sms());
    return carve_fwd<T, D>(pb, plan, nullptr, Ck, reduced).bytes;
  }
};

struct PieceTokensFn {
  const ProblemParams& pb;
  template <typename T, int D>
  int64_t operator()() const {
    constexpr int TT = dev::TokCfg<T, D>::TT;
    const int64_t chunks = token_chunks(pb.N, pb.B * pb.H, TT, device_sms());
    return dev::cdiv(dev::cdiv(pb.N, TT), chunks) * TT;
  }
};

struct MaxSmemFn {
  template <typename T, int D>
  size_t operator()() const {
    KernelSize t[kMaxKernels];
    const int n = Sizes<T, D>::table(t);
    size_t m = 0;
    for (int i = 0; i < n; ++i) m = t[i].smem > m ? t[i].smem : m;
    return m;
  }
};

const char* dtype_name(DType t) { return t == DType::kF16 ? "float16" : t == DType::kBF16 ? "bfloat16" : "float32"; }

}  // namespace

const char* not_supported(const ProblemParams& pb, DType dtype) {
  static thread_local char why[256];
  const int D = head_block(pb.d_h);
  if (D == 0) return "head size d_h = d / H exceeds 128 (the CUDA kernels' largest head block)";
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "no CUDA device";
  const size_t optin = device_smem_optin();
  if (optin == 0) return "cannot query the device's shared memory size";
  const size_t need = with_config(dtype, D, MaxSmemFn{});
  if (need > optin) {
    snprintf(why, sizeof(why),
             "d_h = %lld in %s needs %zu bytes of shared memory per block (head block %d), this GPU allows %zu "
             "(fp32 at d_h > 64 needs an sm_90-class GPU; fp16 / bf16 fit sm_80)",
             (long long)pb.d_h, dtype_name(dtype), need, D, optin);
    return why;
  }
  if (pb.B * pb.H > 2147483647LL) return "batch * heads too large for one grid";
  if (pb.blocked()) {
    if (pb.chunk_size == 1 && pb.left_context < 0)
      return "token-causal mixing (chunk_size 1, unbounded left context) is not implemented by the CUDA kernels";
    if (pb.B * pb.H > 65535) return "batch * heads > 65535 with mixing blocks (one grid dimension)";
    if (pb.N > 2147483647LL) return "more than 2^31 - 1 tokens with mixing blocks (int32 piece table)";
  }
  return nullptr;
}

size_t forward_workspace_bytes(const ProblemParams& pb, const BlockPlan& plan, DType dtype, bool reduced) {
  const int D = head_block(pb.d_h);
  return D == 0 ? 0 : with_config(dtype, D, FwdBytesFn{pb, plan, reduced});
}

int64_t piece_tokens(const ProblemParams& pb, DType dtype) {
  const int D = head_block(pb.d_h);
  return D == 0 ? 0 : with_config(dtype, D, PieceTokensFn{pb});
}

int forward(const ForwardParams& fp, const BlockPlan& plan, DType dtype, void* workspace, cudaStream_t stream,
            const Reducer& reduce) {
  const int D = head_block(fp.pb.d_h);
  if (D == 0) return (int)cudaErrorInvalidValue;
  return with_config(dtype, D, ForwardFn{fp, plan, workspace, stream, reduce});
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace hmx
