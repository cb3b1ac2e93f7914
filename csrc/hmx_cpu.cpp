// CPU twin of the fused HyperMixing kernels: the same passes as the CUDA kernels, with OpenMP
// threads in place of thread blocks and larger token tiles. No [N, k] tensor is ever formed.
//
// Forward, per (batch b, head h):
//   pass 1, parallel over (b, h, key chunk): for each tile of kCpuTile keys build
//     z = s * (x * m_k) + PE                          [T, d_h]
//     U = z fc1^T + b1, Hd = GELU(U)                  [T, d_h]
//     W1 = (Hd fc2^T + b2) * m_k                      [T, k_h]   (thread-local buffer)
//     P_chunk += W1^T value                           [k_h, T] @ [T, d_h] -> [k_h, d_h]
//   (W1's padded rows are zero, so value needs no mask of its own) then P = sum of the chunk
//   partials in chunk order (deterministic for any thread count), A = GELU(P);
//   pass 2, parallel over (b, h, query chunk): W2 tile likewise, Y_tile = W2 A -> [T, d_h].
// Backward (the caller applies LayerNorm's backward first), recomputing every tile once:
//   pass A over query tiles: dA += W2^T dY, MLP2 backward -> generator-2 weight partials and
//     dquery = s * m_q * dz;  dP = dA * GELU'(P)
//   pass B over key tiles: dvalue = (W1 dP) * m_k, MLP1 backward -> generator-1 weight partials
//     and dkey = s * m_k * dz.
//   dW2 = (dY A^T) * m_q and dW1 = (value dP^T) * m_k are never formed: the generator backward
//   only needs dW fc2 and dW^T Hd, which reassociate into d_h x d_h products (see tile_fc2_sums),
//   so each tile does two k_h-sized products in the backward (the W recompute and dA / dvalue).
//   Weight-gradient partials live in per-(b, h, chunk) buffers summed in a fixed order.
// Trade-off: every tile product is one call of the BLAS gemm passed in (hmx_cpu.h), on tiles of
// kCpuTile = 256 tokens: large enough for the library's blocking to pay, while the thread-local
// buffers stay O(kCpuTile * k_h). Element-wise work (mask, bias, GELU) runs between the calls.
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

// Token tile of the CPU twin (the CUDA kernels use kTokenTile); chunks are whole tiles.
constexpr int64_t kCpuTile = 256;

// Exact (erf) GELU and its derivative. fp64: std::erf / std::exp. fp32: branch-free versions the
// compiler vectorises (`omp simd` loops below; the clamp needs -fno-trapping-math to become a
// vector max); scalar libm erff was about half the twin's time.
//   exp(x), x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes
//     coefficients), 2^n from the exponent bits; relative error ~1e-7, flushes to 0 below -87.
//   erf(a), a >= 0: Abramowitz & Stegun 7.1.26, 1 - t (a1 + ... + a5 t^4) exp(-a^2),
//     t = 1 / (1 + p a); absolute error <= 1.5e-7 (below fp32 resolution of GELU's output scale).
//   With a = |x| / sqrt(2), exp(-a^2) = exp(-x^2 / 2) is also the normal pdf's factor: one exp
//   serves both the cdf and the pdf.
inline float exp_neg_f32(float x) {  // x <= 0
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln2): adding and subtracting 1.5 * 2^23 rounds to an integer (|x / ln2| < 2^22)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float er = (q * r * r + r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return er * __builtin_bit_cast(float, bits);
}

// Normal cdf Phi(x) and exp(-x^2 / 2), fp32.
inline void phi_f32(float x, float* cdf, float* e) {
  const float a = std::fabs(x) * 0.70710678118654752f;
  const float ex = exp_neg_f32(-0.5f * x * x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float erf_a = 1.0f - q * t * ex;
  *cdf = 0.5f + 0.5f * (x < 0.0f ? -erf_a : erf_a);
  *e = ex;
}

inline float gelu(float x) {
  float cdf, e;
  phi_f32(x, &cdf, &e);
  return x * cdf;
}

inline float gelu_grad(float x) {
  float cdf, e;
  phi_f32(x, &cdf, &e);
  return cdf + x * e * 0.39894228040143267794f;
}

inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440)); }

inline double gelu_grad(double x) {
  const double cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
  const double pdf = std::exp(-0.5 * x * x) * 0.39894228040143267794;
  return cdf + x * pdf;
}

// Row-major products on top of the column-major gemm: C [m, n] = op(A) op(B) (+ C if accumulate),
// op(A) [m, k] is A [m, k] (lda = its row stride) or, with ta, A^T of A [k, m]; op(B) likewise.
// A row-major matrix is the column-major transpose, so C^T = op(B)^T op(A)^T. Without a gemm
// (fn == nullptr: torch built without BLAS) plain loops compute the same products.
template <typename T>
struct Mm {
  GemmFn<T> fn;
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T* c, int64_t ldc, bool accumulate) const {
    if (fn) {
      fn(tb ? 'T' : 'N', ta ? 'T' : 'N', n, m, k, T(1), b, ldb, a, lda, accumulate ? T(1) : T(0), c, ldc);
      return;
    }
    const int64_t a_rs = ta ? 1 : lda, a_cs = ta ? lda : 1;
    for (int64_t i = 0; i < m; ++i) {
      T* __restrict__ ci = c + i * ldc;
      if (!accumulate) std::fill(ci, ci + n, T(0));
      const T* ai = a + i * a_rs;
      if (tb) {  // C[i, j] += sum_kk A(i, kk) * b[j, kk]
        for (int64_t j = 0; j < n; ++j) {
          const T* bj = b + j * ldb;
          T acc = T(0);
          for (int64_t kk = 0; kk < k; ++kk) acc += ai[kk * a_cs] * bj[kk];
          ci[j] += acc;
        }
      } else {  // C[i, :] += A(i, kk) * b[kk, :]
        for (int64_t kk = 0; kk < k; ++kk) {
          const T aik = ai[kk * a_cs];
          const T* __restrict__ bk = b + kk * ldb;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) ci[j] += aik * bk[j];
        }
      }
    }
  }
};

// Generator weights of one head.
template <typename T>
struct HeadWeights {
  const T* fc1_w;  // [d_h(out), d_h(in)]
  const T* fc1_b;  // [d_h] or nullptr
  const T* fc2_w;  // [k_h, d_h]
  const T* fc2_b;  // [k_h] or nullptr
};

template <typename T>
HeadWeights<T> head_weights(const GeneratorParams& g, int64_t h, int64_t dh, int64_t kh) {
  HeadWeights<T> w;
  w.fc1_w = static_cast<const T*>(g.fc1_w) + h * dh * dh;
  w.fc1_b = g.fc1_b ? static_cast<const T*>(g.fc1_b) + h * dh : nullptr;
  w.fc2_w = static_cast<const T*>(g.fc2_w) + h * kh * dh;
  w.fc2_b = g.fc2_b ? static_cast<const T*>(g.fc2_b) + h * kh : nullptr;
  return w;
}

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
  std::vector<T> z, u, hd, w, dhd, du, dz, sm, sv;
  TileBuffers(int64_t dh, int64_t kh)
      : z(kCpuTile * dh), u(kCpuTile * dh), hd(kCpuTile * dh), w(kCpuTile * kh), dhd(kCpuTile * dh),
        du(kCpuTile * dh), dz(kCpuTile * dh), sm(dh * dh), sv(dh) {}
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
void mlp_forward(const Mm<T>& mm, const HeadWeights<T>& w, const Stream<T>& st, int64_t r0, int64_t tn,
                 int64_t dh, int64_t kh, TileBuffers<T>& buf) {
  load_z(st, r0, tn, dh, buf.z.data());
  // U = z fc1^T: [T, d_h] @ [d_h(in), d_h(out)] -> [T, d_h]
  mm(false, true, tn, dh, dh, buf.z.data(), dh, w.fc1_w, dh, buf.u.data(), dh, false);
  for (int64_t t = 0; t < tn; ++t) {
    T* ut = buf.u.data() + t * dh;
    T* ht = buf.hd.data() + t * dh;
    if (w.fc1_b) {
#pragma omp simd
      for (int64_t c = 0; c < dh; ++c) ut[c] += w.fc1_b[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) ht[c] = gelu(ut[c]);
  }
  // W = Hd fc2^T: [T, d_h] @ [d_h, k_h] -> [T, k_h]
  mm(false, true, tn, kh, dh, buf.hd.data(), dh, w.fc2_w, dh, buf.w.data(), kh, false);
  if (!w.fc2_b && !st.mask) return;
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

// Weight-gradient partials of one generator for one work item, in the weights' own layouts.
template <typename T>
struct GradPartial {
  T* fc1_w;  // [d_h(out), d_h(in)]
  T* fc1_b;  // [d_h]
  T* fc2_w;  // [k_h, d_h]
  T* fc2_b;  // [k_h]
  static int64_t size(int64_t dh, int64_t kh) { return dh * dh + dh + kh * dh + kh; }
  GradPartial(T* base, int64_t dh, int64_t kh)
      : fc1_w(base), fc1_b(base + dh * dh), fc2_w(base + dh * dh + dh), fc2_b(base + dh * dh + dh + kh * dh) {}
};

// Generator backward on one tile without forming dW [T, k_h]. Both passes have dW of the form
//   dW = m * (X R^T)      X [T, d_h] (dY for generator 2, value for generator 1),
//                         R [k_h, d_h] (A = GELU(P) for generator 2, dP for generator 1),
// so with G = R^T fc2 [d_h, d_h] (per batch and head):
//   dHd  = dW fc2      = m * (X G)                      [T, d_h]
//   dfc2 = dW^T Hd     = R (X^T (m * Hd))               [k_h, d_h]: S = X^T (m * Hd) [d_h, d_h]
//   dfc2_b = sum_t dW  = R (X^T m)                      [k_h]:      sv = X^T m       [d_h]
// S and sv are summed over the chunk's tiles (tile_fc2_sums) and multiplied by R once per chunk
// (finish_fc2): the k_h-sized products per tile drop from five to two (the W recompute and
// dA / dvalue).

// Per chunk: S += X^T (m * Hd), sv += X^T m; scales buf.hd's rows by m. X rows have stride ldx.
template <typename T>
void tile_fc2_sums(const Mm<T>& mm, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, const T* x,
                   int64_t ldx, TileBuffers<T>& buf, T* sm, T* sv, bool first) {
  if (st.mask)
    for (int64_t t = 0; t < tn; ++t) {
      const T mr = st.m(r0 + t);
      T* ht = buf.hd.data() + t * dh;
#pragma omp simd
      for (int64_t c = 0; c < dh; ++c) ht[c] *= mr;
    }
  // S (+)= X^T (m * Hd): [d_h, T] @ [T, d_h] -> [d_h, d_h]
  mm(true, false, dh, dh, tn, x, ldx, buf.hd.data(), dh, sm, dh, !first);
  if (first) std::fill(sv, sv + dh, T(0));
  for (int64_t t = 0; t < tn; ++t) {
    const T mr = st.m(r0 + t);
    const T* xt = x + t * ldx;
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) sv[c] += xt[c] * mr;
  }
}

// dHd = m * (X G): [T, d_h] @ [d_h, d_h] -> [T, d_h] into buf.dhd
template <typename T>
void tile_dhd(const Mm<T>& mm, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, const T* x, int64_t ldx,
              const T* g, TileBuffers<T>& buf) {
  mm(false, false, tn, dh, dh, x, ldx, g, dh, buf.dhd.data(), dh, false);
  if (st.mask)
    for (int64_t t = 0; t < tn; ++t) {
      const T mr = st.m(r0 + t);
      T* dt = buf.dhd.data() + t * dh;
#pragma omp simd
      for (int64_t c = 0; c < dh; ++c) dt[c] *= mr;
    }
}

// dfc2 = R S, dfc2_b = R sv for one chunk (the partial slots start at zero)
template <typename T>
void finish_fc2(const Mm<T>& mm, const T* r, int64_t dh, int64_t kh, const T* sm, const T* sv, GradPartial<T>& gp) {
  // [k_h, d_h] @ [d_h, d_h] -> [k_h, d_h]
  mm(false, false, kh, dh, dh, r, dh, sm, dh, gp.fc2_w, dh, false);
  for (int64_t j = 0; j < kh; ++j) {
    T acc = T(0);
    for (int64_t c = 0; c < dh; ++c) acc += r[j * dh + c] * sv[c];
    gp.fc2_b[j] = acc;
  }
}

// The rest of the generator backward from dHd in buf.dhd: dU = dHd * GELU'(U), accumulates the
// fc1 partials and leaves dz in buf.dz.
template <typename T>
void mlp_backward_fc1(const Mm<T>& mm, const HeadWeights<T>& w, int64_t tn, int64_t dh, TileBuffers<T>& buf,
                      GradPartial<T>& gp) {
  for (int64_t t = 0; t < tn; ++t) {
    T* dut = buf.du.data() + t * dh;
    const T* dht = buf.dhd.data() + t * dh;
    const T* ut = buf.u.data() + t * dh;
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) {
      dut[c] = dht[c] * gelu_grad(ut[c]);
      gp.fc1_b[c] += dut[c];
    }
  }
  // dfc1 += dU^T z: [d_h(out), T] @ [T, d_h(in)] -> [d_h(out), d_h(in)]
  mm(true, false, dh, dh, tn, buf.du.data(), dh, buf.z.data(), dh, gp.fc1_w, dh, true);
  // dz = dU fc1: [T, d_h(out)] @ [d_h(out), d_h(in)] -> [T, d_h]
  mm(false, false, tn, dh, dh, buf.du.data(), dh, w.fc1_w, dh, buf.dz.data(), dh, false);
}

// Sums partials [B][H][C][size] over (b, c) in fixed order into per-head gradients, written in
// the weights' own layouts.
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
    std::memcpy(static_cast<T*>(out.fc1_w) + h * dh * dh, g.fc1_w, dh * dh * sizeof(T));
    std::memcpy(static_cast<T*>(out.fc2_w) + h * kh * dh, g.fc2_w, kh * dh * sizeof(T));
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
  const int64_t tiles = num_tiles(L, kCpuTile);
  *r0 = (c * tiles / C) * kCpuTile;
  *r1 = std::min(L, ((c + 1) * tiles / C) * kCpuTile);
}

// Pass 1: P[b, h] = sum over key tiles of W1^T value (written to p).
template <typename T>
void compute_p(const ProblemParams& pb, const Mm<T>& mm, T* p, int nthreads) {
  const int64_t B = pb.B, H = pb.H, N = pb.N, dh = pb.d_h, kh = pb.k_h;
  const int64_t C = num_chunks(N, kCpuTile);
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
      const HeadWeights<T> w = head_weights<T>(pb.g1, h, dh, kh);
      T* pp = part.data() + item * psz;
      int64_t c0, c1;
      chunk_range(N, C, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, c1 - r0);
        mlp_forward(mm, w, ks, r0, tn, dh, kh, buf);
        // P (+)= W1^T value: [k_h, T] @ [T, d_h] -> [k_h, d_h]
        mm(true, false, kh, dh, tn, buf.w.data(), kh, vx + r0 * pb.v_rstride, pb.v_rstride, pp, dh, r0 != c0);
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
void forward_impl(const ForwardParams& fp, GemmFn<T> gemm, int nthreads) {
  const ProblemParams& pb = fp.pb;
  const int64_t B = pb.B, H = pb.H, M = pb.M, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Mm<T> mm{gemm};
  T* p = static_cast<T*>(fp.p);
  compute_p<T>(pb, mm, p, nthreads);
  std::vector<T> a(B * H * kh * dh);
#pragma omp simd
  for (int64_t i = 0; i < B * H * kh * dh; ++i) a[i] = gelu(p[i]);

  // pass 2: Y = W2 A per query tile
  const int64_t C = num_chunks(M, kCpuTile);
  T* y = static_cast<T*>(fp.y);
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(dh, kh);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * C; ++item) {
      const int64_t c = item % C, bh = item / C, h = bh % H, b = bh / H;
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b, h);
      const HeadWeights<T> w = head_weights<T>(pb.g2, h, dh, kh);
      const T* ab = a.data() + bh * kh * dh;
      int64_t c0, c1;
      chunk_range(M, C, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, c1 - r0);
        mlp_forward(mm, w, qs, r0, tn, dh, kh, buf);
        // Y = W2 A: [T, k_h] @ [k_h, d_h] -> [T, d_h], written into y's rows (stride d)
        mm(false, false, tn, dh, kh, buf.w.data(), kh, ab, dh, y + (b * M + r0) * d + h * dh, d, false);
      }
    }
  }
}

template <typename T>
void backward_impl(const BackwardParams& bp, GemmFn<T> gemm, int nthreads) {
  const ProblemParams& pb = bp.pb;
  const int64_t B = pb.B, H = pb.H, M = pb.M, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Mm<T> mm{gemm};
  const T* p = static_cast<const T*>(bp.p);
  const int64_t psz = kh * dh, gsq = dh * dh;
  std::vector<T> a(B * H * psz);  // A = GELU(P) per (b, h): [k_h, d_h]
#pragma omp simd
  for (int64_t i = 0; i < B * H * psz; ++i) a[i] = gelu(p[i]);

  const int64_t gsz = GradPartial<T>::size(dh, kh);
  const int64_t Cq = num_chunks(M, kCpuTile), Ck = num_chunks(N, kCpuTile);
  std::vector<T> da_part(B * H * Cq * psz);
  std::vector<T> g2_part(B * H * Cq * gsz);
  std::vector<T> g1_part(B * H * Ck * gsz);
  std::vector<T> dp(B * H * psz);
  std::vector<T> ga(B * H * gsq), gp1(B * H * gsq);  // A^T fc2_2 and dP^T fc2_1: [d_h, d_h]
  const T* dy = static_cast<const T*>(bp.dy);
  T* dq = static_cast<T*>(bp.dq);
  T* dk = static_cast<T*>(bp.dk);
  T* dv = static_cast<T*>(bp.dv);
  const T s = static_cast<T>(pb.scale);

#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(dh, kh);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const HeadWeights<T> w = head_weights<T>(pb.g2, bh % H, dh, kh);
      // A^T fc2: [d_h, k_h] @ [k_h, d_h] -> [d_h, d_h]
      mm(true, false, dh, dh, kh, a.data() + bh * psz, dh, w.fc2_w, dh, ga.data() + bh * gsq, dh, false);
    }
    // ---- pass A: query tiles -> dA partials, generator-2 grads, dquery ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * Cq; ++item) {
      const int64_t c = item % Cq, bh = item / Cq, h = bh % H, b = bh / H;
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b, h);
      const HeadWeights<T> w = head_weights<T>(pb.g2, h, dh, kh);
      T* dap = da_part.data() + item * psz;
      T* gbase = g2_part.data() + item * gsz;
      std::fill(gbase, gbase + gsz, T(0));
      GradPartial<T> gp(gbase, dh, kh);
      int64_t c0, c1;
      chunk_range(M, Cq, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, c1 - r0);
        mlp_forward(mm, w, qs, r0, tn, dh, kh, buf);
        const T* dyt = dy + (b * M + r0) * d + h * dh;  // rows of stride d
        // dA (+)= W2^T dY: [k_h, T] @ [T, d_h] -> [k_h, d_h]
        mm(true, false, kh, dh, tn, buf.w.data(), kh, dyt, d, dap, dh, r0 != c0);
        // dW2 = m_q * (dY A^T), used only through dHd and the chunk sums
        tile_dhd(mm, qs, r0, tn, dh, dyt, d, ga.data() + bh * gsq, buf);
        tile_fc2_sums(mm, qs, r0, tn, dh, dyt, d, buf, buf.sm.data(), buf.sv.data(), r0 == c0);
        mlp_backward_fc1(mm, w, tn, dh, buf, gp);
        for (int64_t t = 0; t < tn; ++t) {
          const T f = s * qs.m(r0 + t);
          T* out = dq + (b * M + r0 + t) * d + h * dh;
          const T* dzt = buf.dz.data() + t * dh;
#pragma omp simd
          for (int64_t cc = 0; cc < dh; ++cc) out[cc] = f * dzt[cc];
        }
      }
      finish_fc2(mm, a.data() + bh * psz, dh, kh, buf.sm.data(), buf.sv.data(), gp);
    }
    // ---- dP = (sum of dA partials) * GELU'(P); dP^T fc2_1 ----
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      T* dpb = dp.data() + bh * psz;
      std::fill(dpb, dpb + psz, T(0));
      for (int64_t c = 0; c < Cq; ++c) {
        const T* src = da_part.data() + (bh * Cq + c) * psz;
        for (int64_t i = 0; i < psz; ++i) dpb[i] += src[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < psz; ++i) dpb[i] *= gelu_grad(p[bh * psz + i]);
      const HeadWeights<T> w = head_weights<T>(pb.g1, bh % H, dh, kh);
      // dP^T fc2: [d_h, k_h] @ [k_h, d_h] -> [d_h, d_h]
      mm(true, false, dh, dh, kh, dpb, dh, w.fc2_w, dh, gp1.data() + bh * gsq, dh, false);
    }
    // ---- pass B: key tiles -> generator-1 grads, dkey, dvalue ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * H * Ck; ++item) {
      const int64_t c = item % Ck, bh = item / Ck, h = bh % H, b = bh / H;
      const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b, h);
      const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride + h * dh;
      const HeadWeights<T> w = head_weights<T>(pb.g1, h, dh, kh);
      const T* dpb = dp.data() + bh * psz;
      T* gbase = g1_part.data() + item * gsz;
      std::fill(gbase, gbase + gsz, T(0));
      GradPartial<T> gp(gbase, dh, kh);
      int64_t c0, c1;
      chunk_range(N, Ck, c, &c0, &c1);
      for (int64_t r0 = c0; r0 < c1; r0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, c1 - r0);
        mlp_forward(mm, w, ks, r0, tn, dh, kh, buf);
        const T* vt = vx + r0 * pb.v_rstride;
        // dvalue = (W1 dP) * m_k: [T, k_h] @ [k_h, d_h] -> [T, d_h], written into dv's rows
        T* dvt = dv + (b * N + r0) * d + h * dh;
        mm(false, false, tn, dh, kh, buf.w.data(), kh, dpb, dh, dvt, d, false);
        if (ks.mask)
          for (int64_t t = 0; t < tn; ++t) {
            const T mr = ks.m(r0 + t);
            T* out = dvt + t * d;
#pragma omp simd
            for (int64_t cc = 0; cc < dh; ++cc) out[cc] *= mr;
          }
        // dW1 = m_k * (value dP^T), used only through dHd and the chunk sums
        tile_dhd(mm, ks, r0, tn, dh, vt, pb.v_rstride, gp1.data() + bh * gsq, buf);
        tile_fc2_sums(mm, ks, r0, tn, dh, vt, pb.v_rstride, buf, buf.sm.data(), buf.sv.data(), r0 == c0);
        mlp_backward_fc1(mm, w, tn, dh, buf, gp);
        for (int64_t t = 0; t < tn; ++t) {
          const T f = s * ks.m(r0 + t);
          T* out = dk + (b * N + r0 + t) * d + h * dh;
          const T* dzt = buf.dz.data() + t * dh;
#pragma omp simd
          for (int64_t cc = 0; cc < dh; ++cc) out[cc] = f * dzt[cc];
        }
      }
      finish_fc2(mm, dpb, dh, kh, buf.sm.data(), buf.sv.data(), gp);
    }
  }
  reduce_generator_grads<T>(g2_part, B, H, Cq, dh, kh, bp.dg2, nthreads);
  reduce_generator_grads<T>(g1_part, B, H, Ck, dh, kh, bp.dg1, nthreads);
}

}  // namespace

void forward_f32(const ForwardParams& p, GemmFn<float> gemm, int nthreads) { forward_impl<float>(p, gemm, nthreads); }
void forward_f64(const ForwardParams& p, GemmFn<double> gemm, int nthreads) { forward_impl<double>(p, gemm, nthreads); }
void backward_f32(const BackwardParams& p, GemmFn<float> gemm, int nthreads) { backward_impl<float>(p, gemm, nthreads); }
void backward_f64(const BackwardParams& p, GemmFn<double> gemm, int nthreads) { backward_impl<double>(p, gemm, nthreads); }

}  // namespace cpu
}  // namespace hmx
