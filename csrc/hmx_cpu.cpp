// CPU twin of the fused HyperMixing kernels, in the reassociated form (docs/HYPERMIXING.md,
// "Reassociated form"). The CUDA kernels form W1 / W2 per token (the direct form); fc2 is linear,
// so the twin never does: per (batch b, head h), with hid_t = GELU(z_t fc1^T + b1) [d_h] and the
// keep mask m_t, only d_h x d_h products run per token and k_h appears in per-(b, h) products.
//
// Work is parallel over (b, h, token chunk): OpenMP work items are (b, chunk, group of heads),
// see PassItems; every (b, h, chunk) keeps its own partial sums.
// Forward:
//   key pass, per (b, h, key chunk), per tile of kCpuTile keys:
//     z = s * (x * m_k) + PE, hid = m * GELU(z fc1^T + b1)            [T, d_h]
//     S += hid^T value [d_h, d_h],  sv += sum_t m_t value_t [d_h]      (chunk partials)
//   per (b, h): S, sv = sum of the chunk partials in chunk order (deterministic for any thread
//     count); P = fc2 S + b2 sv^T [k_h, d_h] (written to p), A = GELU(P),
//     C = fc2_2^T A [d_h, d_h], c0 = A^T b2_2 [d_h]
//   query pass, per (b, h, query chunk): hid2 likewise, Y = hid2 C + m c0 -> [T, d_h].
// Backward (the caller applies LayerNorm's backward first), recomputing hid / hid2 per tile:
//   per (b, h): A = GELU(P), C
//   query pass: T += hid2^T dY, sdy += sum_t m_t dY_t; dhid2 = dY C^T; the fc1 chain
//     (dU = dhid2 * m GELU'(U), dfc1 += dU^T z, db1 += sum dU, dquery = s dU fc1)
//   per (b, h): dA = fc2_2 T + b2_2 sdy^T, dfc2_2 = A T^T, db2_2 = A sdy, dP = dA * GELU'(P),
//     R = fc2^T dP [d_h, d_h], r0 = dP^T b2 [d_h]
//   key pass: S, sv again (only P is saved); dvalue = hid R + m r0; dhid = value R^T; the fc1
//     chain -> generator-1 fc1 partials and dkey
//   per (b, h): dfc2 = dP S^T, db2 = dP sv
//   weight gradients summed over (b, chunk) in a fixed order.
// Per token and head that is 15 [1, d_h] x [d_h, d_h] products in forward + backward (forward 2
// per key and 2 per query, backward 5 per query and 6 per key; hmx_kernels/flops.py). Every tile
// product is one call of the BLAS gemm passed in (hmx_cpu.h), on tiles of kCpuTile tokens;
// element-wise work (mask, bias, GELU) runs between the calls. The keep masks hold only 0 and 1
// (the op contract), which the folding of masks below relies on (m^2 = m).
#include "hmx_cpu.h"

#ifdef _OPENMP
#include <omp.h>  // built without OpenMP (portable fallback build) the pragmas are ignored: serial
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

// The element-wise loops (GELU above all) run on 16 fp32 lanes where the CPU has AVX-512: GCC
// otherwise prefers 256-bit vectors for Intel targets. The BLAS calls are unaffected.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif

namespace hmx {
namespace cpu {
namespace {

// Token tile of the CPU twin (the CUDA kernels use kTokenTile); chunks are whole tiles.
constexpr int64_t kCpuTile = 256;

// Exact (erf) GELU and its derivative. fp64: std::erf / std::exp. fp32: branch-free versions the
// compiler vectorises (`omp simd` loops below; the selects need -fno-trapping-math to become
// vector blends); scalar libm erff was about half the twin's time.
//   exp(x), x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes
//     coefficients), 2^n from the exponent bits; relative error ~1e-7; 0 below -87 (exactly 0,
//     not a tiny number: GELU'(x) of a very negative x must be 0, or products with it become
//     subnormal and every later operation on them takes a slow microcode path).
//   erf(a), a >= 0: Abramowitz & Stegun 7.1.26, 1 - t (a1 + ... + a5 t^4) exp(-a^2),
//     t = 1 / (1 + p a); absolute error <= 1.5e-7 (below fp32 resolution of GELU's output scale).
//   With a = |x| / sqrt(2), exp(-a^2) = exp(-x^2 / 2) is also the normal pdf's factor: one exp
//   serves both the cdf and the pdf, so GELU and GELU' of one x cost one evaluation.
inline float exp_neg_f32(float x) {  // x <= 0
  const bool under = x < -87.0f;
  x = under ? -87.0f : x;
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
  const float e = er * __builtin_bit_cast(float, bits);
  return under ? 0.0f : e;
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

constexpr double kInvSqrt2Pi = 0.39894228040143267794;

inline float gelu(float x) {
  float cdf, e;
  phi_f32(x, &cdf, &e);
  return x * cdf;
}

inline float gelu_grad(float x) {
  float cdf, e;
  phi_f32(x, &cdf, &e);
  return cdf + x * e * static_cast<float>(kInvSqrt2Pi);
}

// GELU(x) and GELU'(x) from one evaluation.
inline void gelu_both(float x, float* g, float* gd) {
  float cdf, e;
  phi_f32(x, &cdf, &e);
  *g = x * cdf;
  *gd = cdf + x * e * static_cast<float>(kInvSqrt2Pi);
}

inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440)); }

inline double gelu_grad(double x) {
  const double cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
  const double pdf = std::exp(-0.5 * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

inline void gelu_both(double x, double* g, double* gd) {
  const double cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
  *g = x * cdf;
  *gd = cdf + x * std::exp(-0.5 * x * x) * kInvSqrt2Pi;
}

// Row-major products on top of the column-major gemm: C [m, n] = alpha op(A) op(B) (+ C if
// accumulate), op(A) [m, k] is A [m, k] (lda = its row stride) or, with ta, A^T of A [k, m];
// op(B) likewise. A row-major matrix is the column-major transpose, so C^T = op(B)^T op(A)^T.
// Without a gemm (fn == nullptr: torch built without BLAS) plain loops compute the same products.
template <typename T>
struct Mm {
  GemmFn<T> fn;
  void operator()(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T* c, int64_t ldc, bool accumulate, T alpha = T(1)) const {
    if (fn) {
      fn(tb ? 'T' : 'N', ta ? 'T' : 'N', n, m, k, alpha, b, ldb, a, lda, accumulate ? T(1) : T(0), c, ldc);
      return;
    }
    const int64_t a_rs = ta ? 1 : lda, a_cs = ta ? lda : 1;
    for (int64_t i = 0; i < m; ++i) {
      T* __restrict__ ci = c + i * ldc;
      if (!accumulate) std::fill(ci, ci + n, T(0));
      const T* ai = a + i * a_rs;
      if (tb) {  // C[i, j] += alpha sum_kk A(i, kk) * b[j, kk]
        for (int64_t j = 0; j < n; ++j) {
          const T* bj = b + j * ldb;
          T acc = T(0);
          for (int64_t kk = 0; kk < k; ++kk) acc += ai[kk * a_cs] * bj[kk];
          ci[j] += alpha * acc;
        }
      } else {  // C[i, :] += alpha A(i, kk) * b[kk, :]
        for (int64_t kk = 0; kk < k; ++kk) {
          const T aik = alpha * ai[kk * a_cs];
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

// One token stream (keys or queries) of one batch element.
template <typename T>
struct Stream {
  const T* x;     // tokens of batch b: row r at x + r * rstride
  int64_t rstride;
  const T* pe;    // PE rows, row stride d
  const T* mask;  // [L] of batch b or nullptr
  T scale;
  T m(int64_t r) const { return mask ? mask[r] : T(1); }
};

template <typename T>
Stream<T> make_stream(const ProblemParams& pb, const void* x, int64_t bstride, int64_t rstride, const void* pe,
                      const void* mask, int64_t L, int64_t b) {
  Stream<T> s;
  s.x = static_cast<const T*>(x) + b * bstride;
  s.rstride = rstride;
  s.pe = static_cast<const T*>(pe);
  s.mask = mask ? static_cast<const T*>(mask) + b * L : nullptr;
  s.scale = static_cast<T>(pb.scale);
  return s;
}

inline void chunk_range(int64_t L, int64_t C, int64_t c, int64_t* r0, int64_t* r1) {
  const int64_t tiles = num_tiles(L, kCpuTile);
  *r0 = (c * tiles / C) * kCpuTile;
  *r1 = std::min(L, ((c + 1) * tiles / C) * kCpuTile);
}

// Work items of a token pass: (batch b, chunk c, head group g), g fastest. A group is a run of
// consecutive heads [g H / G, (g + 1) H / G); its tile of tokens is read once, in contiguous
// row segments, for all of its heads (per head, rows are d_h of d channels: read head by head,
// the loads were a stride the hardware prefetchers follow poorly). G is the fewest groups that
// give every thread about four items; every head's arithmetic is the same for any G (each head
// keeps its own partials and its own column offset in the tile buffer), so results do not depend
// on G, hence on the thread count.
struct PassItems {
  int64_t C, G;
  int64_t count(int64_t B) const { return B * C * G; }
  void decode(int64_t item, int64_t H, int64_t* b, int64_t* c, int64_t* h0, int64_t* h1) const {
    const int64_t g = item % G, bc = item / G;
    *c = bc % C;
    *b = bc / C;
    *h0 = g * H / G;
    *h1 = (g + 1) * H / G;
  }
};

inline PassItems pass_items(int64_t B, int64_t L, int64_t H, int nthreads) {
  PassItems p;
  p.C = num_chunks(L, kCpuTile);
  p.G = 1;
  while (p.G < H && B * p.C * p.G < 4 * static_cast<int64_t>(nthreads)) ++p.G;
  return p;
}

// 64-byte aligned buffer (equal alignment on every thread and call: the BLAS kernels it is passed
// to may take alignment-dependent paths).
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) : p_(static_cast<T*>(::operator new[](sizeof(T) * std::max<int64_t>(n, 1), std::align_val_t(64)))) {}
  ~Buffer() { ::operator delete[](p_, std::align_val_t(64)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
};

// Per-thread tile buffers: z [kCpuTile, d] (each head's d_h columns at the head's own offset),
// the rest [kCpuTile, d_h] for the head being worked on.
template <typename T>
struct TileBuffers {
  Buffer<T> z, hd, gd, dhd, du;
  TileBuffers(int64_t d, int64_t dh)
      : z(kCpuTile * d), hd(kCpuTile * dh), gd(kCpuTile * dh), dhd(kCpuTile * dh), du(kCpuTile * dh) {}
};

// z[t, c] = s * (x[r0 + t, c] * m[r0 + t]) + pe[r0 + t, c] for the channels c in [c0, c1), into
// rows of stride d.
template <typename T>
void load_z(const Stream<T>& st, int64_t r0, int64_t tn, int64_t c0, int64_t c1, int64_t d, T* z) {
  for (int64_t t = 0; t < tn; ++t) {
    const int64_t r = r0 + t;
    const T* xr = st.x + r * st.rstride;
    const T* per = st.pe + r * d;
    const T mr = st.m(r);
    T* zt = z + t * d;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) zt[c] = st.scale * (xr[c] * mr) + per[c];
  }
}

// The generator's hidden layer on one tile, masked: buf.hd = m * GELU(U), U = z fc1^T + b1
// [T, d_h] (z: the head's columns, row stride ldz); with `grad` also buf.gd = m * GELU'(U)
// (backward). The mask is 0 or 1, so multiplying by it is exact, and m^2 = m lets every later
// per-token product use these rows without masking again.
template <typename T>
void hidden(const Mm<T>& mm, const HeadWeights<T>& w, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh,
            const T* z, int64_t ldz, TileBuffers<T>& buf, bool grad) {
  // U = z fc1^T: [T, d_h(in)] @ [d_h(in), d_h(out)] -> [T, d_h], into hd (then replaced in place)
  mm(false, true, tn, dh, dh, z, ldz, w.fc1_w, dh, buf.hd.data(), dh, false);
  T* __restrict__ hd = buf.hd.data();
  T* __restrict__ gd = buf.gd.data();
  if (w.fc1_b)
    for (int64_t t = 0; t < tn; ++t) {
#pragma omp simd
      for (int64_t c = 0; c < dh; ++c) hd[t * dh + c] += w.fc1_b[c];
    }
  // GELU over the whole tile in one loop (rows of d_h are too short a loop to keep the vector
  // units busy), then the mask row by row
  const int64_t n = tn * dh;
  if (grad) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gelu_both(hd[i], &hd[i], &gd[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) hd[i] = gelu(hd[i]);
  }
  if (!st.mask) return;
  for (int64_t t = 0; t < tn; ++t) {
    const T mr = st.m(r0 + t);
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) {
      hd[t * dh + c] *= mr;
      if (grad) gd[t * dh + c] *= mr;
    }
  }
}

// acc [n] += sum_t m_t X_t over rows X_t (stride ldx) of a tile, m = nullptr: all 1. Four rows per
// step (a fixed association, so the same result every time) instead of one dependent add per row.
template <typename T>
void add_rows(const T* x, int64_t ldx, int64_t tn, int64_t n, const T* m, T* acc) {
  int64_t t = 0;
  for (; t + 4 <= tn; t += 4) {
    const T* x0 = x + t * ldx;
    const T* x1 = x0 + ldx;
    const T* x2 = x1 + ldx;
    const T* x3 = x2 + ldx;
    const T m0 = m ? m[t] : T(1), m1 = m ? m[t + 1] : T(1), m2 = m ? m[t + 2] : T(1), m3 = m ? m[t + 3] : T(1);
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) acc[c] += (x0[c] * m0 + x1[c] * m1) + (x2[c] * m2 + x3[c] * m3);
  }
  for (; t < tn; ++t) {
    const T mt = m ? m[t] : T(1);
    const T* xt = x + t * ldx;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) acc[c] += xt[c] * mt;
  }
}

// Chunk sums S (+)= hid^T X [d_h, d_h] and sv (+)= sum_t m_t X_t [d_h], X [T, d_h] with row
// stride ldx (value rows for generator 1, dY rows for generator 2); hid is already masked.
template <typename T>
void accumulate_state(const Mm<T>& mm, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, const T* x,
                      int64_t ldx, const TileBuffers<T>& buf, T* s, T* sv, bool first) {
  // [d_h, T] @ [T, d_h] -> [d_h, d_h]
  mm(true, false, dh, dh, tn, buf.hd.data(), dh, x, ldx, s, dh, !first);
  if (first) std::fill(sv, sv + dh, T(0));
  add_rows(x, ldx, tn, dh, st.mask ? st.mask + r0 : nullptr, sv);
}

// out rows (stride ldo) = hid G + m g0: [T, d_h] @ [d_h, d_h], from gt = G^T; g0 [d_h] or nullptr.
// Y (G = C, g0 = c0) and dvalue (G = R, g0 = r0). Products [T, d_h] x [d_h, d_h] take the right
// operand transposed throughout (inside the passes the BLAS's kernel for that layout ran them
// faster, about 5% of the whole twin), so C, R and fc1 are transposed once per call.
template <typename T>
void mix_rows(const Mm<T>& mm, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, const TileBuffers<T>& buf,
              const T* gt, const T* g0, T* out, int64_t ldo) {
  mm(false, true, tn, dh, dh, buf.hd.data(), dh, gt, dh, out, ldo, false);
  if (!g0) return;
  for (int64_t t = 0; t < tn; ++t) {
    const T mr = st.m(r0 + t);
    T* ot = out + t * ldo;
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) ot[c] += mr * g0[c];
  }
}

// Per (b, h, chunk): the chunk's sums S / T and sv / sdy, and one generator's fc1 gradients.
template <typename T>
struct ChunkPartial {
  T* s;      // [d_h, d_h]
  T* sv;     // [d_h]
  T* fc1_w;  // [d_h(out), d_h(in)]
  T* fc1_b;  // [d_h]
  static int64_t size(int64_t dh) { return 2 * (dh * dh + dh); }
  ChunkPartial(T* base, int64_t dh)
      : s(base), sv(base + dh * dh), fc1_w(base + dh * dh + dh), fc1_b(base + 2 * dh * dh + dh) {}
};

// The generator backward below the hidden layer, from dHd in buf.dhd (not yet masked):
// dU = dHd * m GELU'(U); db1 += sum_t dU_t; dfc1 += dU^T z; dx rows (stride ldx) = s * dU fc1
// (masked rows get dU = 0, hence 0).
template <typename T>
void fc1_backward(const Mm<T>& mm, const T* fc1_t, int64_t tn, int64_t dh, T s, const T* z, int64_t ldz,
                  TileBuffers<T>& buf, ChunkPartial<T>& cp, T* dx, int64_t ldx) {
  T* __restrict__ du = buf.du.data();
  const T* __restrict__ dhd = buf.dhd.data();
  const T* __restrict__ gd = buf.gd.data();
  const int64_t n = tn * dh;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) du[i] = dhd[i] * gd[i];
  add_rows(du, dh, tn, dh, static_cast<const T*>(nullptr), cp.fc1_b);
  // dfc1 += dU^T z: [d_h(out), T] @ [T, d_h(in)] -> [d_h(out), d_h(in)]
  mm(true, false, dh, dh, tn, buf.du.data(), dh, z, ldz, cp.fc1_w, dh, true);
  // dx = s * dU fc1: [T, d_h(out)] @ [d_h(out), d_h(in)] -> [T, d_h], into dx's rows (fc1_t = fc1^T)
  mm(false, true, tn, dh, dh, buf.du.data(), dh, fc1_t, dh, dx, ldx, false, s);
}

// S, sv of (b, h) = its chunk partials [C] summed in chunk order, into out ([d_h, d_h] then [d_h]).
template <typename T>
void sum_state(const T* part, int64_t C, int64_t dh, T* out) {
  const int64_t psz = ChunkPartial<T>::size(dh), n = dh * dh + dh;
  std::fill(out, out + n, T(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* src = part + c * psz;  // s then sv: contiguous
    for (int64_t i = 0; i < n; ++i) out[i] += src[i];
  }
}

// A generator's fc2 gradients for one (b, h) from the k_h-side factor F [k_h, d_h(x)] and the
// token sums S [d_h(hid), d_h(x)], sv [d_h(x)]: dfc2 = F S^T [k_h, d_h(hid)], dfc2_b = F sv [k_h].
// Generator 2: F = A, (S, sv) = (T, sdy); generator 1: F = dP, (S, sv).
template <typename T>
void fc2_grads(const Mm<T>& mm, const T* f, const T* s, const T* sv, int64_t dh, int64_t kh, T* dfc2, T* dfc2_b) {
  mm(false, true, kh, dh, dh, f, dh, s, dh, dfc2, dh, false);
  for (int64_t j = 0; j < kh; ++j) {
    T acc = T(0);
    for (int64_t c = 0; c < dh; ++c) acc += f[j * dh + c] * sv[c];
    dfc2_b[j] = acc;
  }
}

// out [n, n] = in^T
template <typename T>
void transpose(const T* in, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) out[j * n + i] = in[i * n + j];
}

// fc1^T of every head of a generator: [H][d_h(in), d_h(out)]
template <typename T>
std::vector<T> fc1_transposed(const GeneratorParams& g, int64_t H, int64_t dh) {
  std::vector<T> out(H * dh * dh);
  for (int64_t h = 0; h < H; ++h) transpose(static_cast<const T*>(g.fc1_w) + h * dh * dh, dh, out.data() + h * dh * dh);
  return out;
}

// G = fc2^T F [d_h, d_h] and, with a bias, g0 = F^T b2 [d_h] (else g0 is left untouched).
// C, c0 from F = A (generator 2); R, r0 from F = dP (generator 1).
template <typename T>
void fold_fc2(const Mm<T>& mm, const HeadWeights<T>& w, const T* f, int64_t dh, int64_t kh, T* g, T* g0) {
  // [d_h, k_h] @ [k_h, d_h] -> [d_h, d_h]
  mm(true, false, dh, dh, kh, w.fc2_w, dh, f, dh, g, dh, false);
  if (!w.fc2_b) return;
  std::fill(g0, g0 + dh, T(0));
  for (int64_t j = 0; j < kh; ++j) {
    const T bj = w.fc2_b[j];
    const T* fj = f + j * dh;
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) g0[c] += bj * fj[c];
  }
}

// Per head, in fixed order: fc1 gradients = sum over (b, c) of the chunk partials [B][H][C],
// fc2 gradients = sum over b of the per-(b, h) ones [B][H][k_h * d_h + k_h]; written in the
// weights' own layouts.
template <typename T>
void reduce_generator_grads(const std::vector<T>& chunk_part, const std::vector<T>& fc2_part, int64_t B,
                            int64_t H, int64_t C, int64_t dh, int64_t kh, const GeneratorGrads& out, int nthreads) {
  const int64_t csz = ChunkPartial<T>::size(dh), fsz = kh * dh + kh, n1 = dh * dh + dh;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t h = 0; h < H; ++h) {
    std::vector<T> a1(n1, T(0)), a2(fsz, T(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const T* src = chunk_part.data() + ((b * H + h) * C + c) * csz + n1;  // fc1_w, fc1_b
        for (int64_t i = 0; i < n1; ++i) a1[i] += src[i];
      }
      const T* src = fc2_part.data() + (b * H + h) * fsz;
      for (int64_t i = 0; i < fsz; ++i) a2[i] += src[i];
    }
    std::memcpy(static_cast<T*>(out.fc1_w) + h * dh * dh, a1.data(), dh * dh * sizeof(T));
    if (out.fc1_b) std::memcpy(static_cast<T*>(out.fc1_b) + h * dh, a1.data() + dh * dh, dh * sizeof(T));
    std::memcpy(static_cast<T*>(out.fc2_w) + h * kh * dh, a2.data(), kh * dh * sizeof(T));
    if (out.fc2_b) std::memcpy(static_cast<T*>(out.fc2_b) + h * kh, a2.data() + kh * dh, kh * sizeof(T));
  }
}

// Key pass, one work item: per tile and head, S, sv into the chunk partials (b, h, c) of `part`;
// in the backward (r != nullptr: R and r0 per (b, h), r0 nullptr without b2) also dvalue and
// dHd = value R^T -> the fc1 chain -> generator-1 fc1 partials and dkey. Backward partials must
// start at zero (fc1 parts accumulate); S, sv are overwritten at the chunk's first tile.
template <typename T>
void key_item(const ProblemParams& pb, const Mm<T>& mm, const PassItems& items, int64_t item, TileBuffers<T>& buf,
              T* part, const T* r, const T* rt, const T* r0v, const T* fc1_t, T* dk, T* dv) {
  const int64_t H = pb.H, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d, C = items.C;
  const int64_t csz = ChunkPartial<T>::size(dh), gsq = dh * dh;
  int64_t b, c, h0, h1, c0, c1;
  items.decode(item, H, &b, &c, &h0, &h1);
  chunk_range(N, C, c, &c0, &c1);
  const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b);
  const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride;
  for (int64_t t0 = c0; t0 < c1; t0 += kCpuTile) {
    const int64_t tn = std::min(kCpuTile, c1 - t0);
    load_z(ks, t0, tn, h0 * dh, h1 * dh, d, buf.z.data());
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t bh = b * H + h;
      const HeadWeights<T> w = head_weights<T>(pb.g1, h, dh, kh);
      ChunkPartial<T> cp(part + (bh * C + c) * csz, dh);
      const T* z = buf.z.data() + h * dh;
      const T* vt = vx + t0 * pb.v_rstride + h * dh;
      hidden(mm, w, ks, t0, tn, dh, z, d, buf, r != nullptr);
      accumulate_state(mm, ks, t0, tn, dh, vt, pb.v_rstride, buf, cp.s, cp.sv, t0 == c0);
      if (!r) continue;
      const T* rb = r + bh * gsq;
      // dvalue = hid R + m r0, into dv's rows
      mix_rows(mm, ks, t0, tn, dh, buf, rt + bh * gsq, r0v ? r0v + bh * dh : nullptr, dv + (b * N + t0) * d + h * dh,
               d);
      // dHd = value R^T: [T, d_h(v)] @ [d_h(v), d_h(hid)] -> [T, d_h]
      mm(false, true, tn, dh, dh, vt, pb.v_rstride, rb, dh, buf.dhd.data(), dh, false);
      fc1_backward(mm, fc1_t + h * gsq, tn, dh, ks.scale, z, d, buf, cp, dk + (b * N + t0) * d + h * dh, d);
    }
  }
}

template <typename T>
void forward_impl(const ForwardParams& fp, GemmFn<T> gemm, int nthreads) {
  const ProblemParams& pb = fp.pb;
  const int64_t B = pb.B, H = pb.H, M = pb.M, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Mm<T> mm{gemm};
  T* p = static_cast<T*>(fp.p);
  T* y = static_cast<T*>(fp.y);
  const PassItems kitems = pass_items(B, N, H, nthreads), qitems = pass_items(B, M, H, nthreads);
  const int64_t Ck = kitems.C;
  const int64_t csz = ChunkPartial<T>::size(dh), gsq = dh * dh;
  std::vector<T> part(B * H * Ck * csz);
  std::vector<T> cmt(B * H * gsq), c0(B * H * dh);  // C^T (C = fc2_2^T A), c0 = A^T b2_2 per (b, h)
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(d, dh);
    std::vector<T> state(gsq + dh), a(kh * dh), cm(gsq);
    // key pass: S, sv chunk partials
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < kitems.count(B); ++item)
      key_item<T>(pb, mm, kitems, item, buf, part.data(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    // per (b, h): P = fc2 S + b2 sv^T, A = GELU(P), C, c0
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t h = bh % H;
      sum_state(part.data() + bh * Ck * csz, Ck, dh, state.data());
      const T* s = state.data();
      const T* sv = s + gsq;
      const HeadWeights<T> w1 = head_weights<T>(pb.g1, h, dh, kh);
      T* pbh = p + bh * kh * dh;
      // [k_h, d_h] @ [d_h, d_h] -> [k_h, d_h]
      mm(false, false, kh, dh, dh, w1.fc2_w, dh, s, dh, pbh, dh, false);
      if (w1.fc2_b)
        for (int64_t j = 0; j < kh; ++j) {
          const T bj = w1.fc2_b[j];
#pragma omp simd
          for (int64_t c = 0; c < dh; ++c) pbh[j * dh + c] += bj * sv[c];
        }
#pragma omp simd
      for (int64_t i = 0; i < kh * dh; ++i) a[i] = gelu(pbh[i]);
      fold_fc2(mm, head_weights<T>(pb.g2, h, dh, kh), a.data(), dh, kh, cm.data(), c0.data() + bh * dh);
      transpose(cm.data(), dh, cmt.data() + bh * gsq);
    }
    // query pass: Y = hid2 C + m c0
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qitems.count(B); ++item) {
      int64_t b, c, h0, h1, r0, r1;
      qitems.decode(item, H, &b, &c, &h0, &h1);
      chunk_range(M, qitems.C, c, &r0, &r1);
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b);
      for (int64_t t0 = r0; t0 < r1; t0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, r1 - t0);
        load_z(qs, t0, tn, h0 * dh, h1 * dh, d, buf.z.data());
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t bh = b * H + h;
          const HeadWeights<T> w = head_weights<T>(pb.g2, h, dh, kh);
          hidden(mm, w, qs, t0, tn, dh, buf.z.data() + h * dh, d, buf, false);
          mix_rows(mm, qs, t0, tn, dh, buf, cmt.data() + bh * gsq, w.fc2_b ? c0.data() + bh * dh : nullptr,
                   y + (b * M + t0) * d + h * dh, d);
        }
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
  const int64_t psz = kh * dh, gsq = dh * dh, fsz = kh * dh + kh;
  const int64_t csz = ChunkPartial<T>::size(dh);
  const PassItems kitems = pass_items(B, N, H, nthreads), qitems = pass_items(B, M, H, nthreads);
  const int64_t Cq = qitems.C, Ck = kitems.C;
  std::vector<T> a(B * H * psz), dp(B * H * psz);  // A = GELU(P), dP per (b, h): [k_h, d_h]
  std::vector<T> cm(B * H * gsq), rm(B * H * gsq), rmt(B * H * gsq);  // C = fc2_2^T A, R = fc2^T dP, R^T
  std::vector<T> r0v(B * H * dh);                   // r0 = dP^T b2
  // chunk partials start at zero: the fc1 parts accumulate over the chunk's tiles
  std::vector<T> q_part(B * H * Cq * csz, T(0)), k_part(B * H * Ck * csz, T(0));
  std::vector<T> g2_fc2(B * H * fsz), g1_fc2(B * H * fsz);
  const T* dy = static_cast<const T*>(bp.dy);
  T* dq = static_cast<T*>(bp.dq);
  T* dk = static_cast<T*>(bp.dk);
  T* dv = static_cast<T*>(bp.dv);
  const bool b2_1 = pb.g1.fc2_b != nullptr;
  const std::vector<T> fc1t_1 = fc1_transposed<T>(pb.g1, H, dh), fc1t_2 = fc1_transposed<T>(pb.g2, H, dh);

#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(d, dh);
    std::vector<T> state(gsq + dh), unused(dh);
    // ---- per (b, h): A = GELU(P), C = fc2_2^T A ----
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      T* ab = a.data() + bh * psz;
      const T* pp = p + bh * psz;
#pragma omp simd
      for (int64_t i = 0; i < psz; ++i) ab[i] = gelu(pp[i]);
      HeadWeights<T> w2 = head_weights<T>(pb.g2, bh % H, dh, kh);
      w2.fc2_b = nullptr;  // c0 is not needed by the backward
      fold_fc2(mm, w2, ab, dh, kh, cm.data() + bh * gsq, unused.data());
    }
    // ---- query pass: T, sdy partials, generator-2 fc1 partials, dquery ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qitems.count(B); ++item) {
      int64_t b, c, h0, h1, r0, r1;
      qitems.decode(item, H, &b, &c, &h0, &h1);
      chunk_range(M, Cq, c, &r0, &r1);
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b);
      for (int64_t t0 = r0; t0 < r1; t0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, r1 - t0);
        load_z(qs, t0, tn, h0 * dh, h1 * dh, d, buf.z.data());
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t bh = b * H + h;
          const HeadWeights<T> w = head_weights<T>(pb.g2, h, dh, kh);
          ChunkPartial<T> cp(q_part.data() + (bh * Cq + c) * csz, dh);
          const T* z = buf.z.data() + h * dh;
          const T* dyt = dy + (b * M + t0) * d + h * dh;  // rows of stride d
          hidden(mm, w, qs, t0, tn, dh, z, d, buf, true);
          accumulate_state(mm, qs, t0, tn, dh, dyt, d, buf, cp.s, cp.sv, t0 == r0);
          // dHd2 = dY C^T: [T, d_h(y)] @ [d_h(y), d_h(hid)] -> [T, d_h]
          mm(false, true, tn, dh, dh, dyt, d, cm.data() + bh * gsq, dh, buf.dhd.data(), dh, false);
          fc1_backward(mm, fc1t_2.data() + h * gsq, tn, dh, qs.scale, z, d, buf, cp, dq + (b * M + t0) * d + h * dh, d);
        }
      }
    }
    // ---- per (b, h): dA, generator-2 fc2 grads, dP, R, r0 ----
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t h = bh % H;
      sum_state(q_part.data() + bh * Cq * csz, Cq, dh, state.data());
      const T* tm = state.data();  // T [d_h(hid2), d_h(y)]
      const T* sdy = tm + gsq;
      const HeadWeights<T> w2 = head_weights<T>(pb.g2, h, dh, kh);
      const HeadWeights<T> w1 = head_weights<T>(pb.g1, h, dh, kh);
      const T* ab = a.data() + bh * psz;
      T* dpb = dp.data() + bh * psz;
      // dA = fc2_2 T + b2_2 sdy^T: [k_h, d_h] @ [d_h, d_h] -> [k_h, d_h]
      mm(false, false, kh, dh, dh, w2.fc2_w, dh, tm, dh, dpb, dh, false);
      if (w2.fc2_b)
        for (int64_t j = 0; j < kh; ++j) {
          const T bj = w2.fc2_b[j];
#pragma omp simd
          for (int64_t c = 0; c < dh; ++c) dpb[j * dh + c] += bj * sdy[c];
        }
      // dfc2_2 = A T^T, db2_2 = A sdy
      T* g2 = g2_fc2.data() + bh * fsz;
      fc2_grads(mm, ab, tm, sdy, dh, kh, g2, g2 + kh * dh);
      // dP = dA * GELU'(P)
      const T* pp = p + bh * psz;
#pragma omp simd
      for (int64_t i = 0; i < psz; ++i) dpb[i] *= gelu_grad(pp[i]);
      // R = fc2^T dP, r0 = dP^T b2
      fold_fc2(mm, w1, dpb, dh, kh, rm.data() + bh * gsq, r0v.data() + bh * dh);
      transpose(rm.data() + bh * gsq, dh, rmt.data() + bh * gsq);
    }
    // ---- key pass: S, sv partials, generator-1 fc1 partials, dkey, dvalue ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < kitems.count(B); ++item)
      key_item<T>(pb, mm, kitems, item, buf, k_part.data(), rm.data(), rmt.data(), b2_1 ? r0v.data() : nullptr,
                  fc1t_1.data(), dk, dv);
    // ---- per (b, h): generator-1 fc2 grads dfc2 = dP S^T, db2 = dP sv ----
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      sum_state(k_part.data() + bh * Ck * csz, Ck, dh, state.data());
      T* g1 = g1_fc2.data() + bh * fsz;
      fc2_grads(mm, dp.data() + bh * psz, state.data(), state.data() + gsq, dh, kh, g1, g1 + kh * dh);
    }
  }
  reduce_generator_grads<T>(q_part, g2_fc2, B, H, Cq, dh, kh, bp.dg2, nthreads);
  reduce_generator_grads<T>(k_part, g1_fc2, B, H, Ck, dh, kh, bp.dg1, nthreads);
}

}  // namespace

void forward_f32(const ForwardParams& p, GemmFn<float> gemm, int nthreads) { forward_impl<float>(p, gemm, nthreads); }
void forward_f64(const ForwardParams& p, GemmFn<double> gemm, int nthreads) { forward_impl<double>(p, gemm, nthreads); }
void backward_f32(const BackwardParams& p, GemmFn<float> gemm, int nthreads) { backward_impl<float>(p, gemm, nthreads); }
void backward_f64(const BackwardParams& p, GemmFn<double> gemm, int nthreads) { backward_impl<double>(p, gemm, nthreads); }

}  // namespace cpu
}  // namespace hmx
