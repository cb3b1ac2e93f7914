// CPU twin of the fused HyperMixing kernels: the same passes and tiling as the CUDA kernels, with
// OpenMP threads in place of thread blocks. No [N, k] tensor is ever formed.
//
// Forward, per (batch b, head h):
//   pass 1, parallel over (b, h, key chunk): for each tile of kTokenTile keys build
//     z = s * (x * m_k) + PE                          [T, d_h]
//     U = z fc1^T + b1, Hd = GELU(U)                  [T, d_h]
//     W1 = (Hd fc2^T + b2) * m_k                      [T, k_h]   (thread-local buffer)
//     P_chunk += W1^T V                               [k_h, T] @ [T, d_h] -> [k_h, d_h]
//   then P = sum of the chunk partials in chunk order (deterministic for any thread count),
//   A = GELU(P);
//   pass 2, parallel over (b, h, query chunk): W2 tile likewise, Y_tile = W2 A -> [T, d_h].
// Backward (the caller applies LayerNorm's backward first), recomputing every tile:
//   pass A over query tiles: dW2 = (dY A^T) * m_q, dA += W2^T dY, MLP2 backward -> generator-2
//     weight partials and dquery = s * m_q * dz;  dP = dA * GELU'(P)
//   pass B over key tiles: dW1 = (V dP^T) * m_k, dvalue = (W1 dP) * m_k, MLP1 backward ->
//     generator-1 weight partials and dkey = s * m_k * dz.
//   Weight-gradient partials live in per-(b, h, chunk) buffers summed in a fixed order.
// Trade-off: the small per-tile matrix products are hand-written loops (register-blocked over
// the reduction, `omp simd` over the contiguous output row) rather than BLAS calls: tiles are
// tiny (64 x 18..256), where per-call overhead of a library GEMM dominates.
#include "hmx_cpu.h"

#ifdef _OPENMP
#include <omp.h>  // built without OpenMP (portable fallback build) the pragmas are ignored: serial
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace hmx {
namespace cpu {
namespace {

template <typename T>
inline T gelu(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
}

template <typename T>
inline T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
  const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
  return cdf + x * pdf;
}

// C[i, j] (+)= sum_kk A(i, kk) * Bm[kk, j] for i < m, j < n, kk < k.
// A(i, kk) = a[i * a_rs + kk * a_cs] (so A or A^T can be passed); Bm row-major with leading
// dimension ldb; C row-major with leading dimension ldc. The reduction is unrolled by 4 so each
// pass over a C row does 4 multiply-adds per load/store; the j loop vectorises.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_rs, int64_t a_cs, const T* bm,
          int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    T* __restrict__ ci = c + i * ldc;
    if (!accumulate) std::fill(ci, ci + n, T(0));
    const T* ai = a + i * a_rs;
    int64_t kk = 0;
    for (; kk + 4 <= k; kk += 4) {
      const T a0 = ai[kk * a_cs], a1 = ai[(kk + 1) * a_cs];
      const T a2 = ai[(kk + 2) * a_cs], a3 = ai[(kk + 3) * a_cs];
      const T* __restrict__ b0 = bm + kk * ldb;
      const T* __restrict__ b1 = b0 + ldb;
      const T* __restrict__ b2 = b1 + ldb;
      const T* __restrict__ b3 = b2 + ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j];
    }
    for (; kk < k; ++kk) {
      const T a0 = ai[kk * a_cs];
      const T* __restrict__ b0 = bm + kk * ldb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += a0 * b0[j];
    }
  }
}

// out[i, j] = in[j, i] for an [r, c] input
template <typename T>
void transpose(const T* in, int64_t r, int64_t c, T* out) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) out[j * r + i] = in[i * c + j];
}

// Generator weights of one head, with the transposed copies the forward products need.
template <typename T>
struct HeadWeights {
  const T* fc1_w;  // [d_h(out), d_h(in)]
  const T* fc1_b;  // [d_h] or nullptr
  const T* fc2_w;  // [k_h, d_h]
  const T* fc2_b;  // [k_h] or nullptr
  const T* fc1_t;  // [d_h(in), d_h(out)]
  const T* fc2_t;  // [d_h, k_h]
};

template <typename T>
struct Generator {
  std::vector<T> fc1_t, fc2_t;  // [H, d_h, d_h], [H, d_h, k_h]
  GeneratorParams g;
  int64_t d_h, k_h;
  Generator(const GeneratorParams& gp, int64_t H, int64_t dh, int64_t kh)
      : fc1_t(H * dh * dh), fc2_t(H * dh * kh), g(gp), d_h(dh), k_h(kh) {
    for (int64_t h = 0; h < H; ++h) {
      transpose(static_cast<const T*>(g.fc1_w) + h * dh * dh, dh, dh, fc1_t.data() + h * dh * dh);
      transpose(static_cast<const T*>(g.fc2_w) + h * kh * dh, kh, dh, fc2_t.data() + h * dh * kh);
    }
  }
  HeadWeights<T> head(int64_t h) const {
    HeadWeights<T> w;
    w.fc1_w = static_cast<const T*>(g.fc1_w) + h * d_h * d_h;
    w.fc1_b = g.fc1_b ? static_cast<const T*>(g.fc1_b) + h * d_h : nullptr;
    w.fc2_w = static_cast<const T*>(g.fc2_w) + h * k_h * d_h;
    w.fc2_b = g.fc2_b ? static_cast<const T*>(g.fc2_b) + h * k_h : nullptr;
    w.fc1_t = fc1_t.data() + h * d_h * d_h;
    w.fc2_t = fc2_t.data() + h * d_h * k_h;
    return w;
  }
};

// One token stream (keys or queries) of one (batch, head).
template <typename T>
struct Stream {
  const T* x;     // tokens of batch b, head h's first channel
  int64_t rstride;
  const T* pe;    // PE rows, head h's first channel, row stride d
  const T* mask;  // [L] of batch b or nullptr
  int64_t d;
  T scale;
  T m(int64_t r) const { return mask ? mask[r] : T(1); }
};

// Per-thread tile buffers.
template <typename T>
struct TileBuffers {
  std::vector<T> z, u, hd, w, dw, dhd, du, dz, vt, yt;
  TileBuffers(int64_t dh, int64_t kh)
      : z(kTokenTile * dh), u(kTokenTile * dh), hd(kTokenTile * dh), w(kTokenTile * kh),
        dw(kTokenTile * kh), dhd(kTokenTile * dh), du(kTokenTile * dh), dz(kTokenTile * dh),
        vt(kTokenTile * dh), yt(kTokenTile * dh) {}
};

// z[t, c] = s * (x[r0 + t, c] * m[r0 + t]) + pe[r0 + t, c]
template <typename T>
void load_z(const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, T* z) {
  for (int64_t t = 0; t < tn; ++t) {
    const int64_t r = r0 + t;
    const T* xr = st.x + r * st.rstride;
    const T* per = st.pe + r * st.d;
    const T mr = st.m(r);
    T* zt = z + t * dh;
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) zt[c] = st.scale * (xr[c] * mr) + per[c];
  }
}

// W = (GELU(z fc1^T + b1) fc2^T + b2) * m, keeping U (pre-activation) and Hd for the backward.
template <typename T>
void mlp_forward(const HeadWeights<T>& w, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh,
                 int64_t kh, TileBuffers<T>& buf) {
  load_z(st, r0, tn, dh, buf.z.data());
  // [T, d_h] @ [d_h, d_h] -> [T, d_h]
  gemm<T>(tn, dh, dh, buf.z.data(), dh, 1, w.fc1_t, dh, buf.u.data(), dh, false);
  for (int64_t t = 0; t < tn; ++t) {
    T* ut = buf.u.data() + t * dh;
    T* ht = buf.hd.data() + t * dh;
    if (w.fc1_b)
      for (int64_t c = 0; c < dh; ++c) ut[c] += w.fc1_b[c];
    for (int64_t c = 0; c < dh; ++c) ht[c] = gelu(ut[c]);
  }
  // [T, d_h] @ [d_h, k_h] -> [T, k_h]
  gemm<T>(tn, kh, dh, buf.hd.data(), dh, 1, w.fc2_t, kh, buf.w.data(), kh, false);
  for (int64_t t = 0; t < tn; ++t) {
    T* wt = buf.w.data() + t * kh;
    const T mr = st.m(r0 + t);
    if (w.fc2_b) {
#pragma omp simd
      for (int64_t j = 0; j < kh; ++j) wt[j] = (wt[j] + w.fc2_b[j]) * mr;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < kh; ++j) wt[j] *= mr;
    }
  }
}

// Weight-gradient partials of one generator for one work item.
template <typename T>
struct GradPartial {
  T* fc1_t;  // [d_h(in), d_h(out)]
  T* fc1_b;  // [d_h]
  T* fc2_t;  // [d_h, k_h]
  T* fc2_b;  // [k_h]
  static int64_t size(int64_t dh, int64_t kh) { return dh * dh + dh + dh * kh + kh; }
  GradPartial(T* base, int64_t dh, int64_t kh)
      : fc1_t(base), fc1_b(base + dh * dh), fc2_t(base + dh * dh + dh), fc2_b(base + dh * dh + dh + dh * kh) {}
};

// Backward of W = (GELU(z fc1^T + b1) fc2^T + b2) * m given dW in buf.dw (already times m):
// accumulates weight partials and leaves dz in buf.dz.
template <typename T>
void mlp_backward(const HeadWeights<T>& w, int64_t tn, int64_t dh, int64_t kh, TileBuffers<T>& buf,
                  GradPartial<T>& gp) {
  // dfc2^T += Hd^T dW: [d_h, T] @ [T, k_h] -> [d_h, k_h]
  gemm<T>(dh, kh, tn, buf.hd.data(), 1, dh, buf.dw.data(), kh, gp.fc2_t, kh, true);
  for (int64_t t = 0; t < tn; ++t) {
    const T* dwt = buf.dw.data() + t * kh;
#pragma omp simd
    for (int64_t j = 0; j < kh; ++j) gp.fc2_b[j] += dwt[j];
  }
  // dHd = dW fc2: [T, k_h] @ [k_h, d_h] -> [T, d_h]
  gemm<T>(tn, dh, kh, buf.dw.data(), kh, 1, w.fc2_w, dh, buf.dhd.data(), dh, false);
  for (int64_t t = 0; t < tn; ++t) {
    T* dut = buf.du.data() + t * dh;
    const T* dht = buf.dhd.data() + t * dh;
    const T* ut = buf.u.data() + t * dh;
    for (int64_t c = 0; c < dh; ++c) {
      dut[c] = dht[c] * gelu_grad(ut[c]);
      gp.fc1_b[c] += dut[c];
    }
  }
  // dfc1^T += z^T dU: [d_h, T] @ [T, d_h] -> [d_h(in), d_h(out)]
  gemm<T>(dh, dh, tn, buf.z.data(), 1, dh, buf.du.data(), dh, gp.fc1_t, dh, true);
  // dz = dU fc1: [T, d_h(out)] @ [d_h(out), d_h(in)] -> [T, d_h]
  gemm<T>(tn, dh, dh, buf.du.data(), dh, 1, w.fc1_w, dh, buf.dz.data(), dh, false);
}

// Sums partials [B][H][C][size] over (b, c) in fixed order into per-head [H][size] and writes
// the generator's gradients in the weights' own layouts (to += when accumulate).
template <typename T>
void reduce_generator_grads(const std::vector<T>& part, int64_t B, int64_t H, int64_t C, int64_t dh,
                            int64_t kh, const GeneratorGrads& out, int nthreads) {
  const int64_t sz = GradPartial<T>::size(dh, kh);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t h = 0; h < H; ++h) {
    std::vector<T> acc(sz, T(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const T* src = part.data() + ((b * H + h) * C + c) * sz;
        for (int64_t i = 0; i < sz; ++i) acc[i] += src[i];
      }
    GradPartial<T> g(acc.data(), dh, kh);
    transpose(g.fc1_t, dh, dh, static_cast<T*>(out.fc1_w) + h * dh * dh);  // -> [out, in]
    transpose(g.fc2_t, dh, kh, static_cast<T*>(out.fc2_w) + h * kh * dh);  // -> [k_h, d_h]
    if (out.fc1_b) std::memcpy(static_cast<T*>(out.fc1_b) + h * dh, g.fc1_b, dh * sizeof(T));
    if (out.fc2_b) std::memcpy(static_cast<T*>(out.fc2_b) + h * kh, g.fc2_b, kh * sizeof(T));
  }
}

template <typename T>
Stream<T> make_stream(const ProblemParams& pb, const void* x, int64_t bstride, int64_t rstride,
                      const void* pe, const void* mask, int64_t L, int64_t b, int64_t h) {
  Stream<T> s;
  s.x = static_cast<const T*>(x) + b * bstride + h * pb.d_h;
  s.rstride = rstride;
  s.pe = static_cast<const T*>(pe) + h * pb.d_h;
  s.mask = mask ? static_cast<const T*>(mask) + b * L : nullptr;
  s.d = pb.d;
  s.scale = static_cast<T>(pb.scale);
  return s;
}

inline void chunk_range(int64_t L, int64_t C, int64_t c, int64_t* r0, int64_t* r1) {
  const int64_t tiles = num_tiles(L, kTokenTile);
  *r0 = (c * tiles / C) * kTokenTile;
  *r1 = std::min(L, ((c + 1) * tiles / C) * kTokenTile);
}

// Pass 1: P[b, h] = sum over key tiles of W1^T V (written to p).
template <typename T>
void compute_p(const ProblemParams& pb, const Generator<T>& g1, T* p, int nthreads) {
  const int64_t B = pb.B, H = pb.H, N = pb.N, dh = pb.d_h, kh = pb.k_h;
  const int64_t C = num_chunks(N, kTokenTile);
  const int64_t psz = kh * dh;
  std::vector<T> part(B * H * C * psz);
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(dh, kh);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * C; ++item) {
      const int64_t c = item % C, bh = item / C, h = bh % H, b = bh / H;
      const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b, h);
      const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
      const HeadWeights<T> w = g1.head(h);
      T* pp = part.data() + item * psz;
      std::fill(pp, pp + psz, T(0));
      int64_t c0, c1;
      chunk_range(N, C, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kTokenTile) {
        const int64_t tn = std::min(kTokenTile, c1 - r0);
        mlp_forward(w, ks, r0, tn, dh, kh, buf);
        for (int64_t t = 0; t < tn; ++t) {  // V tile = value * m_k
          const T mr = ks.m(r0 + t);
          const T* vr = vx + (r0 + t) * pb.v_rstride;
          T* vt = buf.vt.data() + t * dh;
          for (int64_t cc = 0; cc < dh; ++cc) vt[cc] = vr[cc] * mr;
        }
        // P += W1^T V: [k_h, T] @ [T, d_h] -> [k_h, d_h]
        gemm<T>(kh, dh, tn, buf.w.data(), 1, kh, buf.vt.data(), dh, pp, dh, true);
      }
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      T* out = p + bh * psz;
      std::fill(out, out + psz, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* src = part.data() + (bh * C + c) * psz;
        for (int64_t i = 0; i < psz; ++i) out[i] += src[i];
      }
    }
  }
}

template <typename T>
void forward_impl(const ForwardParams& fp, int nthreads) {
  const ProblemParams& pb = fp.pb;
  const int64_t B = pb.B, H = pb.H, M = pb.M, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Generator<T> g1(pb.g1, H, dh, kh), g2(pb.g2, H, dh, kh);
  T* p = static_cast<T*>(fp.p);
  compute_p<T>(pb, g1, p, nthreads);
  std::vector<T> a(B * H * kh * dh);
  for (int64_t i = 0; i < B * H * kh * dh; ++i) a[i] = gelu(p[i]);

  // pass 2: Y = W2 A per query tile
  const int64_t C = num_chunks(M, kTokenTile);
  T* y = static_cast<T*>(fp.y);
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(dh, kh);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * C; ++item) {
      const int64_t c = item % C, bh = item / C, h = bh % H, b = bh / H;
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b, h);
      const HeadWeights<T> w = g2.head(h);
      const T* ab = a.data() + bh * kh * dh;
      int64_t c0, c1;
      chunk_range(M, C, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kTokenTile) {
        const int64_t tn = std::min(kTokenTile, c1 - r0);
        mlp_forward(w, qs, r0, tn, dh, kh, buf);
        // Y = W2 A: [T, k_h] @ [k_h, d_h] -> [T, d_h]
        gemm<T>(tn, dh, kh, buf.w.data(), kh, 1, ab, dh, buf.yt.data(), dh, false);
        for (int64_t t = 0; t < tn; ++t)
          std::memcpy(y + (b * M + r0 + t) * d + h * dh, buf.yt.data() + t * dh, dh * sizeof(T));
      }
    }
  }
}

template <typename T>
void backward_impl(const BackwardParams& bp, int nthreads) {
  const ProblemParams& pb = bp.pb;
  const int64_t B = pb.B, H = pb.H, M = pb.M, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Generator<T> g1(pb.g1, H, dh, kh), g2(pb.g2, H, dh, kh);
  const T* p = static_cast<const T*>(bp.p);
  const int64_t psz = kh * dh;
  std::vector<T> a_t(B * H * psz);  // A^T per (b, h): [d_h, k_h]
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t j = 0; j < kh; ++j)
      for (int64_t c = 0; c < dh; ++c) a_t[bh * psz + c * kh + j] = gelu(p[bh * psz + j * dh + c]);

  const int64_t gsz = GradPartial<T>::size(dh, kh);
  const int64_t Cq = num_chunks(M, kTokenTile), Ck = num_chunks(N, kTokenTile);
  std::vector<T> da_part(B * H * Cq * psz);
  std::vector<T> g2_part(B * H * Cq * gsz);
  std::vector<T> g1_part(B * H * Ck * gsz);
  std::vector<T> dp(B * H * psz), dp_t(B * H * psz);
  const T* dy = static_cast<const T*>(bp.dy);
  T* dq = static_cast<T*>(bp.dq);
  T* dk = static_cast<T*>(bp.dk);
  T* dv = static_cast<T*>(bp.dv);
  const T s = static_cast<T>(pb.scale);

#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(dh, kh);
    // ---- pass A: query tiles -> dA partials, generator-2 grads, dquery ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * Cq; ++item) {
      const int64_t c = item % Cq, bh = item / Cq, h = bh % H, b = bh / H;
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b, h);
      const HeadWeights<T> w = g2.head(h);
      const T* at = a_t.data() + bh * psz;
      T* dap = da_part.data() + item * psz;
      std::fill(dap, dap + psz, T(0));
      T* gbase = g2_part.data() + item * gsz;
      std::fill(gbase, gbase + gsz, T(0));
      GradPartial<T> gp(gbase, dh, kh);
      int64_t c0, c1;
      chunk_range(M, Cq, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kTokenTile) {
        const int64_t tn = std::min(kTokenTile, c1 - r0);
        mlp_forward(w, qs, r0, tn, dh, kh, buf);
        const T* dyt = dy + (b * M + r0) * d + h * dh;  // rows of stride d
        // dA += W2^T dY: [k_h, T] @ [T, d_h] -> [k_h, d_h]
        gemm<T>(kh, dh, tn, buf.w.data(), 1, kh, dyt, d, dap, dh, true);
        // dW2 = (dY A^T) * m_q: [T, d_h] @ [d_h, k_h] -> [T, k_h]
        gemm<T>(tn, kh, dh, dyt, d, 1, at, kh, buf.dw.data(), kh, false);
        if (qs.mask)
          for (int64_t t = 0; t < tn; ++t) {
            const T mr = qs.m(r0 + t);
            T* dwt = buf.dw.data() + t * kh;
            for (int64_t j = 0; j < kh; ++j) dwt[j] *= mr;
          }
        mlp_backward(w, tn, dh, kh, buf, gp);
        for (int64_t t = 0; t < tn; ++t) {
          const T f = s * qs.m(r0 + t);
          T* out = dq + (b * M + r0 + t) * d + h * dh;
          const T* dzt = buf.dz.data() + t * dh;
          for (int64_t cc = 0; cc < dh; ++cc) out[cc] = f * dzt[cc];
        }
      }
    }
    // ---- dP = (sum of dA partials) * GELU'(P) ----
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      T* dpb = dp.data() + bh * psz;
      std::fill(dpb, dpb + psz, T(0));
      for (int64_t c = 0; c < Cq; ++c) {
        const T* src = da_part.data() + (bh * Cq + c) * psz;
        for (int64_t i = 0; i < psz; ++i) dpb[i] += src[i];
      }
      for (int64_t i = 0; i < psz; ++i) dpb[i] *= gelu_grad(p[bh * psz + i]);
      transpose(dpb, kh, dh, dp_t.data() + bh * psz);
    }
    // ---- pass B: key tiles -> generator-1 grads, dkey, dvalue ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * Ck; ++item) {
      const int64_t c = item % Ck, bh = item / Ck, h = bh % H, b = bh / H;
      const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b, h);
      const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
      const HeadWeights<T> w = g1.head(h);
      const T* dpb = dp.data() + bh * psz;
      const T* dpt = dp_t.data() + bh * psz;
      T* gbase = g1_part.data() + item * gsz;
      std::fill(gbase, gbase + gsz, T(0));
      GradPartial<T> gp(gbase, dh, kh);
      int64_t c0, c1;
      chunk_range(N, Ck, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kTokenTile) {
        const int64_t tn = std::min(kTokenTile, c1 - r0);
        mlp_forward(w, ks, r0, tn, dh, kh, buf);
        for (int64_t t = 0; t < tn; ++t) {
          const T mr = ks.m(r0 + t);
          const T* vr = vx + (r0 + t) * pb.v_rstride;
          T* vt = buf.vt.data() + t * dh;
          for (int64_t cc = 0; cc < dh; ++cc) vt[cc] = vr[cc] * mr;
        }
        // dW1 = (V dP^T) * m_k: [T, d_h] @ [d_h, k_h] -> [T, k_h]
        gemm<T>(tn, kh, dh, buf.vt.data(), dh, 1, dpt, kh, buf.dw.data(), kh, false);
        // dV = W1 dP: [T, k_h] @ [k_h, d_h] -> [T, d_h]  (W1 already carries m_k)
        gemm<T>(tn, dh, kh, buf.w.data(), kh, 1, dpb, dh, buf.yt.data(), dh, false);
        for (int64_t t = 0; t < tn; ++t) {
          const T mr = ks.m(r0 + t);
          T* dwt = buf.dw.data() + t * kh;
          if (ks.mask)
            for (int64_t j = 0; j < kh; ++j) dwt[j] *= mr;
          T* out = dv + (b * N + r0 + t) * d + h * dh;
          const T* dvt = buf.yt.data() + t * dh;
          for (int64_t cc = 0; cc < dh; ++cc) out[cc] = dvt[cc] * mr;
        }
        mlp_backward(w, tn, dh, kh, buf, gp);
        for (int64_t t = 0; t < tn; ++t) {
          const T f = s * ks.m(r0 + t);
          T* out = dk + (b * N + r0 + t) * d + h * dh;
          const T* dzt = buf.dz.data() + t * dh;
          for (int64_t cc = 0; cc < dh; ++cc) out[cc] = f * dzt[cc];
        }
      }
    }
  }
  reduce_generator_grads<T>(g2_part, B, H, Cq, dh, kh, bp.dg2, nthreads);
  reduce_generator_grads<T>(g1_part, B, H, Ck, dh, kh, bp.dg1, nthreads);
}

}  // namespace

void forward_f32(const ForwardParams& p, int nthreads) { forward_impl<float>(p, nthreads); }
void forward_f64(const ForwardParams& p, int nthreads) { forward_impl<double>(p, nthreads); }
void backward_f32(const BackwardParams& p, int nthreads) { backward_impl<float>(p, nthreads); }
void backward_f64(const BackwardParams& p, int nthreads) { backward_impl<double>(p, nthreads); }

}  // namespace cpu
}  // namespace hmx
