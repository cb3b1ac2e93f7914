// Fused HyperMixing backward on CUDA, reassociated (docs/HYPERMIXING.md, "Reassociated form").
// The caller has already applied LayerNorm's backward, so dY is the gradient of Y. The saved state
// is P [B, H, k_h, d_h]; hid / hid2 tiles are recomputed on chip, no [N, k] tensor exists.
//
//   1. bwd_prep_kernel, grid B H: A = GELU(P), C = fc2_2^T A, c0 = b2_2^T A.
//   2. query_kernel, grid (B H, query chunks): per tile hid2, T += hid2^T (m dY), sdy += m dY,
//      dhid2 = (m dY) C^T, dU = dhid2 * GELU'(U): generator-2 fc1 partials and dquery.
//   3. bwd_mid_kernel, grid B H: T, sdy summed; per k_h block dA = fc2_2 T + b2_2 sdy^T,
//      dP = dA * GELU'(P), dfc2_2 = A T^T, db2_2 = A sdy; R = fc2^T dP, r0 = b2^T dP.
//   4. key_kernel, grid (B H, key chunks): per tile hid, S += hid^T (V m^2), sv, dvalue =
//      m^2 (hid R + r0), dhid = (V m^2) R^T, dU: generator-1 fc1 partials and dkey.
//   5. bwd_final_kernel, grid B H: S, sv summed (re-accumulated by the key pass: P stays the only
//      saved state); dfc2 = dP S^T, db2 = dP sv.
//   6. sum_parts_kernel, grid (elements, H): every weight gradient = its partials summed over
//      batch, chunk and K-split in a fixed order.
// Every partial element has one owner: no atomics, bitwise reproducible on a given GPU model.
#include <cuda_runtime.h>

#include "hmx_cuda.h"
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

namespace {

struct BwdWorkspace {
  float *cmat, *c0;               // [BH][D*D], [BH][D]
  float *t_part, *sdy_part;       // [BH][Cq][KS][D*D], [BH][Cq][G][D]
  float *g2w_part, *g2b_part;     // generator-2 fc1 partials, same layouts
  float *g2fc2, *g2fc2b;          // [BH][k_h][d_h], [BH][k_h]
  float *dp, *rmat, *r0;          // [BH][k_h][D], [BH][D*D], [BH][D]
  float *s_part, *sv_part;        // [BH][Ck][KS][D*D], [BH][Ck][G][D]
  float *g1w_part, *g1b_part;     // generator-1 fc1 partials
  float *g1fc2, *g1fc2b;          // [BH][k_h][d_h], [BH][k_h]
  size_t bytes;
};

template <typename T, int D>
BwdWorkspace carve_bwd(const ProblemParams& pb, void* base, int64_t Cq, int64_t Ck) {
  using TC = dev::TokCfg<T, D>;
  const int64_t BH = pb.B * pb.H, kh = pb.k_h, dh = pb.d_h;
  size_t off = 0;
  auto take = [&](int64_t n) {
    float* p = base != nullptr ? reinterpret_cast<float*>(static_cast<char*>(base) + off) : nullptr;
    off += ((size_t)n * sizeof(float) + 255) / 256 * 256;
    return p;
  };
  BwdWorkspace w;
  w.cmat = take(BH * D * D);
  w.c0 = take(BH * D);
  w.t_part = take(BH * Cq * TC::KS * D * D);
  w.sdy_part = take(BH * Cq * TC::G * D);
  w.g2w_part = take(BH * Cq * TC::KS * D * D);
  w.g2b_part = take(BH * Cq * TC::G * D);
  w.g2fc2 = take(BH * kh * dh);
  w.g2fc2b = take(BH * kh);
  w.dp = take(BH * kh * D);
  w.rmat = take(BH * D * D);
  w.r0 = take(BH * D);
  w.s_part = take(BH * Ck * TC::KS * D * D);
  w.sv_part = take(BH * Ck * TC::G * D);
  w.g1w_part = take(BH * Ck * TC::KS * D * D);
  w.g1b_part = take(BH * Ck * TC::G * D);
  w.g1fc2 = take(BH * kh * dh);
  w.g1fc2b = take(BH * kh);
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
int backward_t(const BackwardParams& bp, void* workspace, cudaStream_t stream) {
  using TC = dev::TokCfg<T, D>;
  using SZ = Sizes<T, D>;
  const ProblemParams& pb = bp.pb;
  const int64_t BH = pb.B * pb.H, kh = pb.k_h, dh = pb.d_h;
  const int sms = device_sms();
  const int64_t Cq = token_chunks(pb.M, BH, TC::TT, sms), Ck = token_chunks(pb.N, BH, TC::TT, sms);
  const BwdWorkspace w = carve_bwd<T, D>(pb, workspace, Cq, Ck);

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

struct BackwardFn {
  const BackwardParams& bp;
  void* ws;
  cudaStream_t stream;
  template <typename T, int D>
  int operator()() const { return backward_t<T, D>(bp, ws, stream); }
};

struct BwdBytesFn {
  const ProblemParams& pb;
  template <typename T, int D>
  size_t operator()() const {
    const int sms = device_sms();
    const int64_t BH = pb.B * pb.H;
    const int tt = dev::TokCfg<T, D>::TT;
    return carve_bwd<T, D>(pb, nullptr, token_chunks(pb.M, BH, tt, sms), token_chunks(pb.N, BH, tt, sms)).bytes;
  }
};

}  // namespace

size_t backward_workspace_bytes(const ProblemParams& pb, DType dtype) {
  const int D = head_block(pb.d_h);
  return D == 0 ? 0 : with_config(dtype, D, BwdBytesFn{pb});
}

int backward(const BackwardParams& bp, DType dtype, void* workspace, cudaStream_t stream) {
  const int D = head_block(bp.pb.d_h);
  if (D == 0) return (int)cudaErrorInvalidValue;
  return with_config(dtype, D, BackwardFn{bp, workspace, stream});
}

}  // namespace cuda
}  // namespace hmx
