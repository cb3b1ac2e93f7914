// The pass templates of the CUDA forward and backward (reassociated form, docs/HYPERMIXING.md).
//
// Because fc2 is linear, k_h never enters a token loop: per (batch, head) the token passes reduce
// d_h x d_h states (S = sum m hid^T V, T = sum m hid2^T dY and the fc1 gradients) and apply
// d_h x d_h matrices (C = fc2_2^T A, R = fc2^T dP); every k_h-sized product is in a small
// "finalize" pass per (batch, head) that walks k_h in blocks of J rows.
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
#include "hmx_cuda_layout.cuh"
#include "hmx_cuda_tiles.cuh"

namespace hmx {
namespace cuda {
namespace dev {

// chunk c of C over L tokens: tiles [c tiles / C, (c + 1) tiles / C) of `tile` tokens
__device__ __forceinline__ void chunk_rows(int64_t L, int tile, int64_t C, int64_t c, int64_t* r0, int64_t* r1) {
  const int64_t tiles = cdiv(L, tile);
  *r0 = (c * tiles / C) * tile;
  const int64_t e = ((c + 1) * tiles / C) * tile;
  *r1 = e < L ? e : L;
}

// ---- token passes ---------------------------------------------------------------------------
// Plain mixing: one block per (b h, token chunk), blockIdx.x = b * H + h, blockIdx.y = chunk.
// Blocked mixing (kBlocked): one block per (piece, b h), blockIdx.x = piece, blockIdx.y = b * H + h
// (hmx_pieces.h); the piece's tokens read their mixing block's matrices (row b h * nb + block) and
// their PE rows from the first token of their sequence on; the partials are per piece (C = pieces).
struct TokArgs {
  ProblemParams pb;
  int64_t C;               // token chunks (blocked: pieces)
  const int32_t* pieces;   // blocked: the piece table [C][4] (start, end, block, sequence start)
  int64_t nb;              // blocked: mixing blocks per batch row
  const float* wmat;       // C (mix, query) or R (key) [BH][D * D] (blocked: [BH][nb][D * D])
  const float* wvec;       // c0 (mix) or r0 (key) [BH][D] (blocked: [BH][nb][D])
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
template <typename T, int D, Pass P, bool kBlocked = false>
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
  const int64_t bh = kBlocked ? blockIdx.y : blockIdx.x, chunk = kBlocked ? blockIdx.x : blockIdx.y;
  const int64_t h = bh % pb.H, b = bh / pb.H;
  // rows [r0, r1); the row of wmat / wvec; the first token of the sequence (its PE row 0)
  int64_t r0 = 0, r1 = 0, wrow = bh, seq0 = 0;
  if constexpr (kBlocked) {
    const int32_t* pc = a.pieces + chunk * 4;
    r0 = pc[0];
    r1 = pc[1];
    wrow = bh * a.nb + pc[2];
    seq0 = pc[3];
  }
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
  // (b, h) or per (b, h, block), the same in every chunk); m dY tiles by g_scale, their own (query); see the header.
  constexpr bool kPow2 = std::is_same<T, __half>::value;
  float w_scale = 1.f;
  if constexpr (kPow2 && P != Pass::kState) {
    float mx = 0.f;
#pragma unroll 1
    for (int i = tid; i < D * D; i += kThreads) mx = fmaxf(mx, fabsf(a.wmat[wrow * D * D + i]));
    w_scale = pow2_of(block_max(mx, s.scr));
  }
  // weights of this head (zero-padded to D)
  const T* __restrict__ fc1 = static_cast<const T*>(gp.fc1_w) + h * dh * dh;
  const T* __restrict__ fb1 = gp.fc1_b ? static_cast<const T*>(gp.fc1_b) + h * dh : nullptr;
  for (int i = tid; i < D * D; i += kThreads) {
    const int o = i / D, c = i % D;
    s.w1[o * LD + c] = (o < dh && c < dh) ? fc1[o * dh + c] : from_f<E>(0.f);
    if constexpr (P != Pass::kState)
      s.w2[o * LD + c] = from_f<E>((o < dh && c < dh) ? a.wmat[wrow * D * D + i] / w_scale : 0.f);
  }
  if (tid < D) {
    s.b1[tid] = (fb1 != nullptr && tid < dh) ? to_f(fb1[tid]) : 0.f;
    s.vec[tid] = (P == Pass::kMix || P == Pass::kKey) && tid < dh ? a.wvec[wrow * D + tid] : 0.f;
  }

  SAcc acc1, acc2;  // S or T; fc1 gradient
  acc1.zero();
  acc2.zero();
  const int cc = tid % D, gi = tid / D;  // column-sum owner: column cc, rows gi, gi + G, ...
  float cs1 = 0.f, cs2 = 0.f;
  float g_scale = 1.f;  // query, fp16: this tile's power of two of max |m dY|; acc1, acc2 in its units

  if constexpr (!kBlocked) chunk_rows(L, TT, a.C, chunk, &r0, &r1);
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
      s.z[t * LD + c] = from_f<E>(ok ? sc * (kept ? to_f(x[row * xrs + c]) : 0.f) + pe[(row - seq0) * d + c] : 0.f);
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
// One block per row, walking k_h in blocks of J rows: a row is a (b, h) or, with mixing blocks,
// a (b, h, block), row = (b H + h) nb + block; every per-row array below is indexed by the row.
struct FinArgs {
  ProblemParams pb;
  int64_t nb;              // blocked: rows per (b, h), the mixing blocks per batch row
  int64_t n_mat_parts;     // partials per row of the D x D state: chunks * KS (blocks: 1, the window sum)
  int64_t n_vec_parts;     // partials per row of its column sum: chunks * G (blocks: 1)
  const float* mat_part;   // S (fwd, final) or T (mid) partials [rows][n_mat_parts][D * D]
  const float* vec_part;   // sv or sdy partials [rows][n_vec_parts][D]
  const float* p_in;       // saved P [rows][k_h][d_h] (prep, mid)
  float* p_out;            // P (fwd) [rows][k_h][d_h]
  float* mat_out;          // C (fwd, prep) or R (mid) [rows][D * D]
  float* vec_out;          // c0 (fwd, prep) or r0 (mid) [rows][D]
  float* dp;               // dP [rows][k_h][D]: written by mid, read by final
  float* gw;               // fc2 weight-gradient partial per row [rows][k_h][d_h] (mid: gen 2, final: gen 1)
  float* gb;               // fc2 bias-gradient partial per row [rows][k_h]
  // blocked only, a carried state (streaming; hmx_params.h p_init / dp_extra / dp_init):
  const float* p_init;     // fwd: added to P, [rows / init_div][k_h][d_h], or nullptr
  int64_t init_div;        // nb: one state per (b, h) in every block's window; 1: one term per block
  const float* dp_extra;   // mid: the gradient of the saved state, added to dP [rows][k_h][d_h], or nullptr
  float* dp_out;           // mid: dP written unpadded [rows][k_h][d_h] (the carried state's gradient), or nullptr
};

// fwd:   S, sv = sums of the state pass's partials; per row block: P = fc2 S + b2 sv^T (+ p_init) (written),
//        A = GELU(P); C += fc2_2^T A, c0 += b2_2^T A
// prep:  A = GELU(P) from the saved P; C, c0 as in fwd
// mid:   T, sdy = sums of the query pass's partials; per row block: dA = fc2_2 T + b2_2 sdy^T,
//        dP = dA * GELU'(P) (+ dp_extra) (written), dfc2_2 = A T^T, db2_2 = A sdy (written);
//        R += fc2^T dP, r0 += b2^T dP
// final: S, sv = sums of the key pass's partials; per row block: dfc2 = dP S^T, db2 = dP sv
template <typename T, int D, Fin F, bool kBlocked = false>
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
  const int64_t bh = blockIdx.x, h = kBlocked ? (bh / a.nb) % pb.H : bh % pb.H;
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
        float pv = v + s.b2[j] * s.sv[c];
        if constexpr (kBlocked)
          if (ok && a.p_init != nullptr) pv += a.p_init[((bh / a.init_div) * kh + jb + j) * dh + c];
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
        float dpv = ok ? (v + s.b22[j] * s.sv[c]) * gelu_grad(s.pf[j * LDF + c]) : 0.f;
        if constexpr (kBlocked) {
          if (ok && a.dp_extra != nullptr) dpv += a.dp_extra[(bh * kh + jb + j) * dh + c];
          if (ok && a.dp_out != nullptr) a.dp_out[(bh * kh + jb + j) * dh + c] = dpv;
        }
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
}  // namespace cuda
}  // namespace hmx
