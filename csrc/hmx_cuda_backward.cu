// Fused HyperMixing backward on CUDA, reassociated (docs/HYPERMIXING.md, "Reassociated form").
// The caller has already applied LayerNorm's backward, so dY is the gradient of Y. The saved state
// is P [B, H, k_h, d_h]; hid / hid2 tiles are recomputed on chip, no [N, k] tensor exists.
//
//   1. bwd_prep_kernel, grid B H: A = GELU(P), C = fc2_2^T A, c0 = b2_2^T A.
//   2. query_kernel, grid (B H, query chunks): per tile hid2, T += hid2^T (m dY), sdy += m dY,
//      dhid2 = (m dY) C^T, dU = dhid2 * GELU'(U): generator-2 fc1 partials and dquery.
//   3. bwd_mid_kernel, grid B H: T, sdy summed (sequence parallel: row_sums, the ranks'
//      all-reduce, and a second mid pass on the slice's own sums for dfc2_2, db2_2); per k_h block dA = fc2_2 T + b2_2 sdy^T,
//      dP = dA * GELU'(P), dfc2_2 = A T^T, db2_2 = A sdy; R = fc2^T dP, r0 = b2^T dP.
//   4. key_kernel, grid (B H, key chunks): per tile hid, S += hid^T (V m^2), sv, dvalue =
//      m^2 (hid R + r0), dhid = (V m^2) R^T, dU: generator-1 fc1 partials and dkey.
//   5. bwd_final_kernel, grid B H: S, sv summed (re-accumulated by the key pass: P stays the only
//      saved state); dfc2 = dP S^T, db2 = dP sv.
//   6. sum_parts_kernel, grid (elements, H): every weight gradient = its partials summed over
//      batch, chunk and K-split in a fixed order.
// Every partial element has one owner: no atomics, bitwise reproducible on a given GPU model.
//
// Mixing blocks (BlockPlan, hmx_cuda.h; docs/HYPERMIXING.md "Causal and chunked mixing"): the
// finalize passes run per (b, h, block j) on P_j (block slot j of p); the query pass over the
// pieces reads its block's C_j; T_j, sdy_j = block j's own pieces summed; the mid pass gives dP_j
// and R'_j = fc2^T dP_j, r0'_j; the key pass over the pieces of block i reads R_i, r0_i = the sums
// of R'_j, r0'_j over the blocks j whose window holds i (reverse windows, hmx_cuda_blocks.cuh); the
// final pass takes the window sums of the key pass's S, sv, as the forward did.
#include <cuda_runtime.h>

#include "hmx_cuda.h"
#include "hmx_cuda_blocks.cuh"
#include "hmx_cuda_passes.cuh"
#include "hmx_cuda_plan.cuh"

namespace hmx {
namespace cuda {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_prep_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kPrep>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) query_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kQuery>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_mid_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kMid>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) key_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kKey>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_final_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kFinal>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) query_blocked_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kQuery, true>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, dev::kTokMinBlocks<D>) key_blocked_kernel(dev::TokArgs a) {
  dev::token_pass<T, D, dev::Pass::kKey, true>(a);
}

// out[h][i] (i = r * cols + c < rows * cols) = sum over b, then p < P, of
// part[((b H + h) P + p) * stride + r * ld + c]
__global__ void __launch_bounds__(kThreads) sum_parts_kernel(int64_t B, int64_t H, int64_t P, int64_t stride,
                                                             int64_t rows, int64_t cols, int64_t ld,
                                                             const float* __restrict__ part,
                                                             float* __restrict__ out) {
  const int64_t h = blockIdx.y, n = rows * cols;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t off = (i / cols) * ld + i % cols;
  float acc = 0.f;
  for (int64_t b = 0; b < B; ++b) {
    const float* p = part + (b * H + h) * P * stride + off;
    for (int64_t q = 0; q < P; ++q) acc += p[q * stride];
  }
  out[h * n + i] = acc;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_prep_blocked_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kPrep, true>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_mid_blocked_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kMid, true>(a);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bwd_final_blocked_kernel(dev::FinArgs a) {
  dev::fin_pass<T, D, dev::Fin::kFinal, true>(a);
}

namespace {

// Per-row arrays have BH * nb rows (nb = 1 without mixing blocks, whose chunks are the pieces).
struct BwdWorkspace {
  float *cmat, *c0;               // [BH][D*D], [BH][D]
  float *t_part, *sdy_part;       // [BH][Cq][KS][D*D], [BH][Cq][G][D]
  float *g2w_part, *g2b_part;     // generator-2 fc1 partials, same layouts
  float *g2fc2, *g2fc2b;          // [BH][k_h][d_h], [BH][k_h]
  float *dp, *rmat, *r0;          // [BH][k_h][D], [BH][D*D], [BH][D]
  float *s_part, *sv_part;        // [BH][Ck][KS][D*D], [BH][Ck][G][D]
  float *g1w_part, *g1b_part;     // generator-1 fc1 partials
  float *g1fc2, *g1fc2b;          // [BH][k_h][d_h], [BH][k_h]
  float *t_blk, *sdy_blk;         // blocks: T_j, sdy_j [BH][nb][D*D], [BH][nb][D]
  float *s_win, *sv_win;          // blocks: window sums of the key pass's S, sv
  float *scratch;                 // blocks: the window pass's suffix sums [BH][nb][D*D]
  float *p_blocks;                // blocks with more state slots than blocks: P_j [BH][nb][k_h][d_h]
  // sequence parallel: T [BH][D*D] then sdy [BH][D] (one region): all-reduced (sums) and this
  // slice's own (sums_own); the dropped outputs of the two mid passes (sp_*)
  float *sums, *sums_own;
  float *sp_dp, *sp_rmat, *sp_r0, *sp_gw, *sp_gb;
  size_t bytes;
};

template <typename T, int D>
BwdWorkspace carve_bwd(const ProblemParams& pb, const BlockPlan& plan, void* base, int64_t Cq, int64_t Ck,
                       bool reduced) {
  using TC = dev::TokCfg<T, D>;
  const int64_t nb = plan.blocked() ? plan.nb : 1, bl = plan.blocked() ? 1 : 0;
  const int64_t pslots = plan.blocked() && pb.num_blocks != plan.nb ? 1 : 0;
  const int64_t BH = pb.B * pb.H, R = BH * nb, kh = pb.k_h, dh = pb.d_h;
  size_t off = 0;
  auto take = [&](int64_t n) {
    float* p = base != nullptr ? reinterpret_cast<float*>(static_cast<char*>(base) + off) : nullptr;
    off += ((size_t)n * sizeof(float) + 255) / 256 * 256;
    return p;
  };
  BwdWorkspace w;
  w.cmat = take(R * D * D);
  w.c0 = take(R * D);
  w.t_part = take(BH * Cq * TC::KS * D * D);
  w.sdy_part = take(BH * Cq * TC::G * D);
  w.g2w_part = take(BH * Cq * TC::KS * D * D);
  w.g2b_part = take(BH * Cq * TC::G * D);
  w.g2fc2 = take(R * kh * dh);
  w.g2fc2b = take(R * kh);
  w.dp = take(R * kh * D);
  w.rmat = take(R * D * D);
  w.r0 = take(R * D);
  w.s_part = take(BH * Ck * TC::KS * D * D);
  w.sv_part = take(BH * Ck * TC::G * D);
  w.g1w_part = take(BH * Ck * TC::KS * D * D);
  w.g1b_part = take(BH * Ck * TC::G * D);
  w.g1fc2 = take(R * kh * dh);
  w.g1fc2b = take(R * kh);
  w.t_blk = take(bl * R * D * D);
  w.sdy_blk = take(bl * R * D);
  w.s_win = take(bl * R * D * D);
  w.sv_win = take(bl * R * D);
  w.scratch = take(bl * R * D * D);
  w.p_blocks = take(pslots * R * kh * dh);
  const int64_t sp = reduced ? 1 : 0;
  w.sums = take(sp * cuda_reduce_count(pb.B, pb.H, pb.d_h));
  w.sums_own = take(sp * cuda_reduce_count(pb.B, pb.H, pb.d_h));
  w.sp_dp = take(sp * BH * kh * D);
  w.sp_rmat = take(sp * BH * D * D);
  w.sp_r0 = take(sp * BH * D);
  w.sp_gw = take(sp * BH * kh * dh);
  w.sp_gb = take(sp * BH * kh);
  w.bytes = off;
  return w;
}

template <class K>
cudaError_t prepare(K kernel, size_t smem) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

void sum_parts(const ProblemParams& pb, int64_t P, int64_t stride, int64_t rows, int64_t cols, int64_t ld,
               const float* part, void* out, cudaStream_t stream) {
  if (out == nullptr) return;  // bias absent: no gradient
  const int64_t n = rows * cols;
  const dim3 grid((unsigned)dev::cdiv(n, kThreads), (unsigned)pb.H);
  sum_parts_kernel<<<grid, kThreads, 0, stream>>>(pb.B, pb.H, P, stride, rows, cols, ld, part,
                                                  static_cast<float*>(out));
}

template <typename T, int D>
int backward_blocked(const BackwardParams& bp, const BlockPlan& plan, void* workspace, cudaStream_t stream);

template <typename T, int D>
int backward_t(const BackwardParams& bp, const BlockPlan& plan, void* workspace, cudaStream_t stream,
               const Reducer& reduce) {
  if (plan.blocked()) return reduce ? (int)cudaErrorNotSupported : backward_blocked<T, D>(bp, plan, workspace, stream);
  using TC = dev::TokCfg<T, D>;
  using SZ = Sizes<T, D>;
  const ProblemParams& pb = bp.pb;
  const int64_t BH = pb.B * pb.H, kh = pb.k_h, dh = pb.d_h;
  const int sms = device_sms();
  const int64_t Cq = token_chunks(pb.M, BH, TC::TT, sms), Ck = token_chunks(pb.N, BH, TC::TT, sms);
  const BwdWorkspace w = carve_bwd<T, D>(pb, plan, workspace, Cq, Ck, (bool)reduce);

  const size_t s_prep = SZ::template fin<dev::Fin::kPrep>(), s_mid = SZ::template fin<dev::Fin::kMid>();
  const size_t s_final = SZ::template fin<dev::Fin::kFinal>();
  const size_t s_query = SZ::template tok<dev::Pass::kQuery>(), s_key = SZ::template tok<dev::Pass::kKey>();
  cudaError_t err;
  if ((err = prepare(bwd_prep_kernel<T, D>, s_prep)) != cudaSuccess) return (int)err;
  if ((err = prepare(query_kernel<T, D>, s_query)) != cudaSuccess) return (int)err;
  if ((err = prepare(bwd_mid_kernel<T, D>, s_mid)) != cudaSuccess) return (int)err;
  if ((err = prepare(key_kernel<T, D>, s_key)) != cudaSuccess) return (int)err;
  if ((err = prepare(bwd_final_kernel<T, D>, s_final)) != cudaSuccess) return (int)err;
  const float* p = static_cast<const float*>(bp.p);

  dev::FinArgs pa{};
  pa.pb = pb;
  pa.p_in = p;
  pa.mat_out = w.cmat;
  pa.vec_out = w.c0;
  bwd_prep_kernel<T, D><<<(unsigned)BH, kThreads, s_prep, stream>>>(pa);

  dev::TokArgs qa{};
  qa.pb = pb;
  qa.C = Cq;
  qa.wmat = w.cmat;
  qa.dy = static_cast<const float*>(bp.dy);  // fp32 (the compute type)
  qa.out1 = bp.dq;
  qa.acc_part = w.t_part;
  qa.vec_part = w.sdy_part;
  qa.g_part = w.g2w_part;
  qa.gb_part = w.g2b_part;
  query_kernel<T, D><<<dim3((unsigned)BH, (unsigned)Cq), kThreads, s_query, stream>>>(qa);

  dev::FinArgs ma{};
  ma.pb = pb;
  ma.n_mat_parts = Cq * TC::KS;
  ma.n_vec_parts = Cq * TC::G;
  ma.mat_part = w.t_part;
  ma.vec_part = w.sdy_part;
  ma.p_in = p;
  ma.mat_out = w.rmat;
  ma.vec_out = w.r0;
  ma.dp = w.dp;
  ma.gw = w.g2fc2;
  ma.gb = w.g2fc2b;
  if (reduce) {
    // sequence parallel: dP needs T, sdy summed over the ranks (hmx_cuda.h), but the generator-2
    // fc2 gradients A T^T, A sdy are this slice's own (the caller sums every weight gradient over
    // the ranks; from the reduced sums each rank would hold the whole). Two mid passes: on the
    // slice's own sums for those gradients (its dP, R, r0 dropped), on the reduced sums for the rest.
    const int64_t n = cuda_reduce_count(pb.B, pb.H, pb.d_h);
    if ((err = reducer_sums(w.t_part, ma.n_mat_parts, w.sdy_part, ma.n_vec_parts, BH, D, w.sums_own, stream)) !=
        cudaSuccess)
      return (int)err;
    if ((err = cudaMemcpyAsync(w.sums, w.sums_own, n * sizeof(float), cudaMemcpyDeviceToDevice, stream)) !=
        cudaSuccess)
      return (int)err;
    reduce(w.sums, n);
    ma.n_mat_parts = ma.n_vec_parts = 1;
    dev::FinArgs own = ma;
    own.mat_part = w.sums_own;
    own.vec_part = w.sums_own + BH * D * D;
    own.mat_out = w.sp_rmat;
    own.vec_out = w.sp_r0;
    own.dp = w.sp_dp;
    bwd_mid_kernel<T, D><<<(unsigned)BH, kThreads, s_mid, stream>>>(own);
    ma.mat_part = w.sums;
    ma.vec_part = w.sums + BH * D * D;
    ma.gw = w.sp_gw;
    ma.gb = w.sp_gb;
  }
  bwd_mid_kernel<T, D><<<(unsigned)BH, kThreads, s_mid, stream>>>(ma);

  dev::TokArgs ka{};
  ka.pb = pb;
  ka.C = Ck;
  ka.wmat = w.rmat;
  ka.wvec = w.r0;
  ka.out1 = bp.dk;
  ka.out2 = bp.dv;
  ka.acc_part = w.s_part;
  ka.vec_part = w.sv_part;
  ka.g_part = w.g1w_part;
  ka.gb_part = w.g1b_part;
  key_kernel<T, D><<<dim3((unsigned)BH, (unsigned)Ck), kThreads, s_key, stream>>>(ka);

  dev::FinArgs fa{};
  fa.pb = pb;
  fa.n_mat_parts = Ck * TC::KS;
  fa.n_vec_parts = Ck * TC::G;
  fa.mat_part = w.s_part;
  fa.vec_part = w.sv_part;
  fa.dp = w.dp;
  fa.gw = w.g1fc2;
  fa.gb = w.g1fc2b;
  bwd_final_kernel<T, D><<<(unsigned)BH, kThreads, s_final, stream>>>(fa);

  // weight gradients: fc1 from the token chunks' partials, fc2 from the (b, h) partials
  const float* parts[2][4] = {{w.g1w_part, w.g1b_part, w.g1fc2, w.g1fc2b}, {w.g2w_part, w.g2b_part, w.g2fc2, w.g2fc2b}};
  const GeneratorGrads* outs[2] = {&bp.dg1, &bp.dg2};
  const int64_t chunks[2] = {Ck, Cq};
  for (int g = 0; g < 2; ++g) {
    sum_parts(pb, chunks[g] * TC::KS, D * D, dh, dh, D, parts[g][0], outs[g]->fc1_w, stream);
    sum_parts(pb, chunks[g] * TC::G, D, 1, dh, D, parts[g][1], outs[g]->fc1_b, stream);
    sum_parts(pb, 1, kh * dh, kh, dh, dh, parts[g][2], outs[g]->fc2_w, stream);
    sum_parts(pb, 1, kh, 1, kh, kh, parts[g][3], outs[g]->fc2_b, stream);
  }
  return (int)cudaGetLastError();
}

template <typename T, int D>
int backward_blocked(const BackwardParams& bp, const BlockPlan& plan, void* workspace, cudaStream_t stream) {
  using TC = dev::TokCfg<T, D>;
  using SZ = Sizes<T, D>;
  const ProblemParams& pb = bp.pb;
  const int64_t BH = pb.B * pb.H, kh = pb.k_h, dh = pb.d_h, nb = plan.nb, np = plan.n_pieces;
  const BwdWorkspace w = carve_bwd<T, D>(pb, plan, workspace, np, np, false);
  cudaError_t err;
  const GeneratorGrads* outs[2] = {&bp.dg1, &bp.dg2};
  const size_t s_prep = SZ::template fin<dev::Fin::kPrep>(), s_mid = SZ::template fin<dev::Fin::kMid>();
  const size_t s_final = SZ::template fin<dev::Fin::kFinal>();
  const size_t s_query = SZ::template tok<dev::Pass::kQuery>(), s_key = SZ::template tok<dev::Pass::kKey>();
  if ((err = prepare(bwd_prep_blocked_kernel<T, D>, s_prep)) != cudaSuccess) return (int)err;
  if ((err = prepare(query_blocked_kernel<T, D>, s_query)) != cudaSuccess) return (int)err;
  if ((err = prepare(bwd_mid_blocked_kernel<T, D>, s_mid)) != cudaSuccess) return (int)err;
  if ((err = prepare(key_blocked_kernel<T, D>, s_key)) != cudaSuccess) return (int)err;
  if ((err = prepare(bwd_final_blocked_kernel<T, D>, s_final)) != cudaSuccess) return (int)err;
  const dim3 grid((unsigned)np, (unsigned)BH);
  const unsigned rows = (unsigned)(BH * nb);

  // P_j: block slot j of p [BH][num_blocks][k_h][d_h] (a packed copy when there are more slots)
  const float* p = static_cast<const float*>(bp.p);
  if (w.p_blocks != nullptr) {
    const size_t blk = (size_t)kh * dh * sizeof(float);
    if ((err = cudaMemcpy2DAsync(w.p_blocks, nb * blk, p, pb.num_blocks * blk, nb * blk, BH,
                                 cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
      return (int)err;
    p = w.p_blocks;
  }

  dev::FinArgs pa{};
  pa.pb = pb;
  pa.nb = nb;
  pa.p_in = p;
  pa.mat_out = w.cmat;
  pa.vec_out = w.c0;
  bwd_prep_blocked_kernel<T, D><<<rows, kThreads, s_prep, stream>>>(pa);

  dev::TokArgs qa{};
  qa.pb = pb;
  qa.C = np;
  qa.pieces = plan.pieces();
  qa.nb = nb;
  qa.wmat = w.cmat;
  qa.dy = static_cast<const float*>(bp.dy);
  qa.out1 = bp.dq;
  qa.acc_part = w.t_part;
  qa.vec_part = w.sdy_part;
  qa.g_part = w.g2w_part;
  qa.gb_part = w.g2b_part;
  query_blocked_kernel<T, D><<<grid, kThreads, s_query, stream>>>(qa);
  // T_j, sdy_j: block j's own queries
  if ((err = block_windows(plan, BH, {w.t_part, TC::KS, w.t_blk, w.scratch, D * D, 1, false},
                           {w.sdy_part, TC::G, w.sdy_blk, w.scratch, D, 1, false}, stream)) != cudaSuccess)
    return (int)err;

  dev::FinArgs ma{};
  ma.pb = pb;
  ma.nb = nb;
  ma.n_mat_parts = 1;
  ma.n_vec_parts = 1;
  ma.mat_part = w.t_blk;
  ma.vec_part = w.sdy_blk;
  ma.p_in = p;
  ma.mat_out = w.rmat;
  ma.vec_out = w.r0;
  ma.dp = w.dp;
  ma.gw = w.g2fc2;
  ma.gb = w.g2fc2b;
  ma.dp_extra = static_cast<const float*>(bp.dp_extra);  // p's layout: [B H][nb][k_h][d_h]
  ma.dp_out = static_cast<float*>(bp.dp_init);          // each block's dP [B H][nb][k_h][d_h]
  bwd_mid_blocked_kernel<T, D><<<rows, kThreads, s_mid, stream>>>(ma);
  // R_i, r0_i: R'_j, r0'_j summed over the blocks j whose window holds block i (in place)
  if ((err = block_windows(plan, BH, {nullptr, 1, w.rmat, w.scratch, D * D, plan.width, true},
                           {nullptr, 1, w.r0, w.scratch, D, plan.width, true}, stream)) != cudaSuccess)
    return (int)err;

  dev::TokArgs ka{};
  ka.pb = pb;
  ka.C = np;
  ka.pieces = plan.pieces();
  ka.nb = nb;
  ka.wmat = w.rmat;
  ka.wvec = w.r0;
  ka.out1 = bp.dk;
  ka.out2 = bp.dv;
  ka.acc_part = w.s_part;
  ka.vec_part = w.sv_part;
  ka.g_part = w.g1w_part;
  ka.gb_part = w.g1b_part;
  key_blocked_kernel<T, D><<<grid, kThreads, s_key, stream>>>(ka);
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
  fa.dp = w.dp;
  fa.gw = w.g1fc2;
  fa.gb = w.g1fc2b;
  bwd_final_blocked_kernel<T, D><<<rows, kThreads, s_final, stream>>>(fa);

  // weight gradients: fc1 from the pieces' partials, fc2 from the (b, h, block) partials
  const float* parts[2][4] = {{w.g1w_part, w.g1b_part, w.g1fc2, w.g1fc2b}, {w.g2w_part, w.g2b_part, w.g2fc2, w.g2fc2b}};
  for (int g = 0; g < 2; ++g) {
    sum_parts(pb, np * TC::KS, D * D, dh, dh, D, parts[g][0], outs[g]->fc1_w, stream);
    sum_parts(pb, np * TC::G, D, 1, dh, D, parts[g][1], outs[g]->fc1_b, stream);
    sum_parts(pb, nb, kh * dh, kh, dh, dh, parts[g][2], outs[g]->fc2_w, stream);
    sum_parts(pb, nb, kh, 1, kh, kh, parts[g][3], outs[g]->fc2_b, stream);
  }
  return (int)cudaGetLastError();
}

struct BackwardFn {
  const BackwardParams& bp;
  const BlockPlan& plan;
  void* ws;
  cudaStream_t stream;
  const Reducer& reduce;
  template <typename T, int D>
  int operator()() const { return backward_t<T, D>(bp, plan, ws, stream, reduce); }
};

struct BwdBytesFn {
  const ProblemParams& pb;
  const BlockPlan& plan;
  bool reduced;
  template <typename T, int D>
  size_t operator()() const {
    if (plan.blocked()) return carve_bwd<T, D>(pb, plan, nullptr, plan.n_pieces, plan.n_pieces, false).bytes;
    const int sms = device_sms();
    const int64_t BH = pb.B * pb.H;
    const int tt = dev::TokCfg<T, D>::TT;
    return carve_bwd<T, D>(pb, plan, nullptr, token_chunks(pb.M, BH, tt, sms), token_chunks(pb.N, BH, tt, sms),
                           reduced).bytes;
  }
};

}  // namespace

size_t backward_workspace_bytes(const ProblemParams& pb, const BlockPlan& plan, DType dtype, bool reduced) {
  const int D = head_block(pb.d_h);
  return D == 0 ? 0 : with_config(dtype, D, BwdBytesFn{pb, plan, reduced});
}

int backward(const BackwardParams& bp, const BlockPlan& plan, DType dtype, void* workspace, cudaStream_t stream,
             const Reducer& reduce) {
  const int D = head_block(bp.pb.d_h);
  if (D == 0) return (int)cudaErrorInvalidValue;
  return with_config(dtype, D, BackwardFn{bp, plan, workspace, stream, reduce});
}

}  // namespace cuda
}  // namespace hmx
