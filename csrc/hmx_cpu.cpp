// CPU twin of the fused HyperMixing kernels, in the reassociated form (docs/HYPERMIXING.md,
// "Reassociated form"), as the CUDA and Triton kernels are: fc2 is linear, so none of them forms
// W1 / W2 per token: per (batch b, head h), with hid_t = GELU(z_t fc1^T + b1) [d_h] and the
// keep mask m_t, only d_h x d_h products run per token and k_h appears in per-(b, h, block)
// products.
//
// Mixing blocks (hmx_params.h, BlockMap): the tokens of a row are cut into blocks, each with
// its own state, summed over a window of blocks. Non-causal mixing is one block per row; packed
// sequences (cu_seqlens) one block per sequence; chunk-causal mixing blocks of C tokens with a
// window of L + 1 (or all earlier) blocks of the sequence; token-causal C = 1. One code path
// serves all: the token passes split each tile into runs of one block, and everything k_h-wide
// runs per (b, h, block).
//
// Work is parallel over (b, h, token chunk): OpenMP work items are (b, chunk, group of heads),
// see PassItems; token sums are kept per (b, h, piece), a piece being the overlap of a work
// chunk and a block, so no two items write one sum.
// Forward:
//   key pass, per (b, h, key chunk), per tile of kCpuTile keys:
//     z = s * (x * m_k) + PE, hid = m * GELU(z fc1^T + b1)            [T, d_h]
//     per run of block j: S += hid^T value [d_h, d_h], sv += sum_t m_t value_t [d_h]  (pieces)
//   per (b, h): block sums of the pieces in piece order, then window sums over blocks
//     (deterministic for any thread count);
//   per (b, h, block), over groups of consecutive blocks (hmx_cpu_scan.h, "block stages"):
//     P = fc2 S + b2 sv^T [k_h, d_h] (written to p), A = GELU(P), C = fc2_2^T A [d_h, d_h],
//     c0 = A^T b2_2 [d_h]
//   query pass: hid2 likewise, per run of block j: Y = hid2 C_j + m c0_j -> [T, d_h].
// Backward (the caller applies LayerNorm's backward first), recomputing hid / hid2 per tile:
//   per (b, h, block): A = GELU(P), C
//   query pass: T_j += hid2^T dY, sdy_j += sum_t m_t dY_t; dhid2 = dY C_j^T; the fc1 chain
//     (dU = dhid2 * m GELU'(U), dfc1 += dU^T z, db1 += sum dU, dquery = s dU fc1)
//   per (b, h), per block: dA = fc2_2 T + b2_2 sdy^T, dfc2_2 += A T^T, db2_2 += A sdy,
//     dP = dA * GELU'(P), R' = fc2^T dP [d_h, d_h], r0' = dP^T b2 [d_h]; then each block's
//     R, r0 = sum of R', r0' over the blocks whose window holds it (reverse window sums)
//   key pass: S, sv again (only P is saved); dvalue = hid R + m r0; dhid = value R^T; the fc1
//     chain -> generator-1 fc1 partials and dkey
//   per (b, h): dfc2 = sum_j dP_j S_j^T, db2 = sum_j dP_j sv_j (window sums S_j, sv_j)
//   weight gradients summed over (b, chunk) in a fixed order.
// Per token and head that is 15 [1, d_h] x [d_h, d_h] products in forward + backward (forward 2
// per key and 2 per query, backward 5 per query and 6 per key; hmx_kernels/flops.py); per block
// and head 7 [k_h, d_h] x [d_h, d_h] products (forward 2, backward 5), which is what blocks of a
// few tokens pay for; token-causal mixing runs as a scan in the direct form instead
// (hmx_cpu_scan.h, "token-causal mixing as a scan"). Every tile product is one call of the
// BLAS gemm passed in (hmx_cpu.h), on tiles of kCpuTile tokens (runs of one block inside a tile);
// element-wise work (mask, bias, GELU) runs between the calls. The keep masks hold only 0 and 1
// (the op contract), which the folding of masks below relies on (m^2 = m).
#include "hmx_cpu.h"

#ifdef _OPENMP
#include <omp.h>  // built without OpenMP (portable fallback build) the pragmas are ignored: serial
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <initializer_list>
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

// Working memory kept between calls, per thread. A fresh buffer of the chunked modes' size (the
// token sums per piece and per block, C and c0 per block, dP per block: 50 MiB at N 4096, C 32,
// d 256, k 1024, B 1; 4x that at N 16384) came from the system on every call, and the first touch
// of each of its pages was a page fault: here those faults cost about 2 us per 4 KiB page, 15 to
// 20 % of a chunk-causal pass (benchmarks/README.md, "Causal modes side by side"). Freed buffers go
// back to the pool of the thread that made them, up to kPoolBytes per thread (beyond that the
// blocks given back longest ago are freed: sizes of earlier calls give way to the recent ones),
// and a later buffer takes the smallest pooled block of at least its size and at most twice it. The price: up to kPoolBytes held per thread that runs the twin (the calling thread
// holds the large ones; OpenMP workers only their per-thread tiles), until the thread exits.
// Contents are never carried over: every buffer is written (or zeroed) before it is read, as before.
// (Transparent huge pages for the large buffers cut the faults too, but under memory pressure the
// kernel's compaction for them stalled a call for 50 % more: not asked for.)
constexpr size_t kPoolBytes = size_t(256) << 20;

class BufferPool {
 public:
  ~BufferPool() {
    for (const Block& b : free_) ::operator delete[](b.p, std::align_val_t(64));
  }
  // a block of at least `bytes`; *got: its size (give() takes it back with that size)
  void* take(size_t bytes, size_t* got) {
    *got = bytes;
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].bytes >= bytes && free_[i].bytes / 2 <= bytes &&
          (best == free_.size() || free_[i].bytes < free_[best].bytes))
        best = i;
    if (best == free_.size()) return ::operator new[](bytes, std::align_val_t(64));
    void* p = free_[best].p;
    *got = free_[best].bytes;
    held_ -= free_[best].bytes;
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    return p;
  }
  // every pooled block back to the system (hmx_kernels.clear_caches)
  void release() {
    for (const Block& b : free_) ::operator delete[](b.p, std::align_val_t(64));
    free_.clear();
    held_ = 0;
  }
  size_t held() const { return held_; }
  // back into the pool; over kPoolBytes, the blocks given back longest ago are freed
  void give(void* p, size_t bytes) {
    free_.push_back({p, bytes});
    held_ += bytes;
    while (held_ > kPoolBytes) {
      ::operator delete[](free_.front().p, std::align_val_t(64));
      held_ -= free_.front().bytes;
      free_.erase(free_.begin());
    }
  }

 private:
  struct Block {
    void* p;
    size_t bytes;
  };
  std::vector<Block> free_;
  size_t held_ = 0;
};

inline BufferPool& thread_pool() {
  static thread_local BufferPool pool;
  return pool;
}

}  // namespace

size_t release_buffers() {
  const size_t held = thread_pool().held();
  thread_pool().release();
  return held;
}

size_t pooled_bytes() { return thread_pool().held(); }

namespace {

// 64-byte aligned buffer (equal alignment on every thread and call: the BLAS kernels it is passed
// to may take alignment-dependent paths) from the thread's pool (above); uninitialised, or zeroed
// by zero(). Made and destroyed on one thread (a local of one function or parallel region).
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n)
      : n_(std::max<int64_t>(n, 1)), bytes_(0),
        p_(static_cast<T*>(thread_pool().take(sizeof(T) * static_cast<size_t>(n_), &bytes_))) {}
  ~Buffer() { thread_pool().give(p_, bytes_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() const { return p_; }
  // every value zero (the buffers whose partial sums accumulate)
  void zero() { std::fill(p_, p_ + n_, T(0)); }

 private:
  int64_t n_;
  size_t bytes_;
  T* p_;
};

// Per-thread tile buffers: z [kCpuTile, d] (each head's d_h columns at the head's own offset),
// v [kCpuTile, d] (a key tile's value rows with padded rows zeroed, only for tiles that hold
// padding; see select_values), the rest [kCpuTile, d_h] for the head being worked on.
template <typename T>
struct TileBuffers {
  Buffer<T> z, v, hd, gd, dhd, du;
  TileBuffers(int64_t d, int64_t dh)
      : z(kCpuTile * d), v(kCpuTile * d), hd(kCpuTile * dh), gd(kCpuTile * dh), dhd(kCpuTile * dh),
        du(kCpuTile * dh) {}
};

// Mixing blocks of a batch row (the same for every row; hmx_params.h): block j covers tokens
// [start[j], start[j + 1]); its sequence begins at token seq0[j] (PE position 0); its state is
// the sum of the blocks first[j] .. j (the window), and its own token sums enter the states of
// the blocks j .. last[j]. Non-causal mixing of batch rows is one block [0, N).
struct BlockMap {
  std::vector<int64_t> start, seq0, first, last;
  bool packed = false;  // sequences from cu_seqlens: PE positions restart per sequence
  int64_t nb() const { return static_cast<int64_t>(seq0.size()); }
  // the block of token t (t inside the row)
  int64_t block_of(int64_t t) const {
    if (seq0.size() == 1) return 0;
    return std::upper_bound(start.begin() + 1, start.end() - 1, t) - (start.begin() + 1);
  }
  // end of the run of tokens of t's block j that starts at t, cut at `end`
  int64_t run_end(int64_t j, int64_t end) const { return seq0.size() == 1 ? end : std::min(end, start[j + 1]); }
};

inline BlockMap make_blocks(const ProblemParams& pb) {
  BlockMap bm;
  std::vector<int64_t> seqs = {0, pb.N};
  if (pb.cu_seqlens) {
    seqs.assign(pb.cu_seqlens, pb.cu_seqlens + pb.num_seqs + 1);
    bm.packed = true;
  }
  for (size_t s = 0; s + 1 < seqs.size(); ++s) {
    const int64_t a = seqs[s], e = seqs[s + 1];
    const int64_t step = pb.chunk_size > 0 ? pb.chunk_size : std::max<int64_t>(e - a, 1);
    const int64_t j0 = bm.nb();
    for (int64_t t = a; t < e; t += step) {
      const int64_t j = bm.nb();
      bm.start.push_back(t);
      bm.seq0.push_back(a);
      bm.first.push_back(pb.left_context < 0 ? j0 : std::max(j0, j - pb.left_context));
    }
    const int64_t j1 = bm.nb();  // one past the sequence's last block
    for (int64_t j = j0; j < j1; ++j) bm.last.push_back(pb.left_context < 0 ? j1 - 1 : std::min(j1 - 1, j + pb.left_context));
  }
  bm.start.push_back(pb.N);
  return bm;
}

// Calls f(block j, first token, token count) for the runs of one block inside tokens [t0, t0 + tn).
template <typename F>
void for_block_runs(const BlockMap& bm, int64_t t0, int64_t tn, F&& f) {
  const int64_t end = t0 + tn;
  for (int64_t t = t0; t < end;) {
    const int64_t j = bm.block_of(t), e = bm.run_end(j, end);
    f(j, t, e - t);
    t = e;
  }
}

// Token sums are kept per piece = (work chunk c, block j) overlap, so that no two work items
// write one partial. Pieces are numbered in token order; block j's pieces are
// [pfirst[j], pfirst[j + 1]) and chunk c's pieces start at cbase[c] with block cblock[c].
struct Pieces {
  std::vector<int64_t> cbase, cblock, pfirst;
  int64_t count = 0;
  int64_t index(int64_t c, int64_t j) const { return cbase[c] + (j - cblock[c]); }
};

inline Pieces make_pieces(const BlockMap& bm, int64_t L, int64_t C) {
  Pieces pc;
  const int64_t nb = bm.nb();
  pc.pfirst.assign(nb + 1, -1);
  for (int64_t c = 0; c < C; ++c) {
    int64_t r0, r1;
    chunk_range(L, C, c, &r0, &r1);
    const int64_t j0 = bm.block_of(r0), j1 = r1 > r0 ? bm.block_of(r1 - 1) : j0;
    pc.cbase.push_back(pc.count);
    pc.cblock.push_back(j0);
    for (int64_t j = j0; j <= j1; ++j)
      if (pc.pfirst[j] < 0) pc.pfirst[j] = pc.count + (j - j0);
    pc.count += j1 - j0 + 1;
  }
  pc.pfirst[nb] = pc.count;
  for (int64_t j = nb - 1; j >= 0; --j)  // a block no chunk reaches (none in practice) has no pieces
    if (pc.pfirst[j] < 0) pc.pfirst[j] = pc.pfirst[j + 1];
  return pc;
}

// Per (b, h): block sums blk_j = sum of block j's pieces (in order), each n values, from `part`
// ([pieces][stride], the first n values of each used).
template <typename T>
void block_sums(const T* part, int64_t stride, const Pieces& pc, int64_t nb, int64_t n, T* blk) {
  for (int64_t j = 0; j < nb; ++j) {
    T* out = blk + j * n;
    std::fill(out, out + n, T(0));
    for (int64_t q = pc.pfirst[j]; q < pc.pfirst[j + 1]; ++q) {
      const T* src = part + q * stride;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] += src[i];
    }
  }
}

// Window sums over blocks of n values each (src, dst [nb][n]). Forward (states):
// dst_j = sum_{i = first[j]}^{j} src_i; reverse (gradients back to the blocks' own token sums):
// dst_i = sum_{j = i}^{last[i]} src_j. A window that only grows by one block from its neighbour
// (a prefix of the sequence) reuses the neighbour's sum; others are summed in full, in block
// order, so every sum has a fixed association (deterministic).
template <typename T>
void window_sums(const T* src, const BlockMap& bm, int64_t n, bool reverse, T* dst) {
  const int64_t nb = bm.nb();
  for (int64_t s = 0; s < nb; ++s) {
    const int64_t j = reverse ? nb - 1 - s : s;
    T* out = dst + j * n;
    const T* own = src + j * n;
    const int64_t nbr = reverse ? j + 1 : j - 1;  // the neighbour computed before
    const bool grows = reverse ? (j + 1 < nb && bm.last[j + 1] == bm.last[j] && bm.seq0[j + 1] == bm.seq0[j])
                               : (j > 0 && bm.first[j - 1] == bm.first[j]);
    if (grows) {
      const T* prev = dst + nbr * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = prev[i] + own[i];
      continue;
    }
    const int64_t i0 = reverse ? j : bm.first[j], i1 = reverse ? bm.last[j] : j;
    std::fill(out, out + n, T(0));
    for (int64_t i = i0; i <= i1; ++i) {
      const T* x = src + i * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) out[c] += x[c];
    }
  }
}

// z[t, c] = s * (x[r0 + t, c] * m[r0 + t]) + pe[pos(r0 + t), c] for the channels c in [c0, c1),
// into rows of stride d; pos(r) = r minus the first token of r's sequence. A padded row is
// selected away (z = PE), never multiplied by its 0: NaN * 0 = NaN, so a NaN or inf in a padded
// position would reach every kept result. Every other use of a padded row's tokens reads z, the
// masked hidden rows, or value rows selected the same way (key_item, the scan's value rows).
template <typename T>
void load_z(const Stream<T>& st, const BlockMap& bm, int64_t r0, int64_t tn, int64_t c0, int64_t c1, int64_t d,
            T* z) {
  for_block_runs(bm, r0, tn, [&](int64_t j, int64_t a, int64_t n) {
    const int64_t pos0 = bm.packed ? bm.seq0[j] : 0;
    for (int64_t r = a; r < a + n; ++r) {
      const T* xr = st.x + r * st.rstride;
      const T* per = st.pe + (r - pos0) * d;
      T* zt = z + (r - r0) * d;
      if (st.m(r) == T(0)) {
        std::memcpy(zt + c0, per + c0, (c1 - c0) * sizeof(T));
        continue;
      }
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) zt[c] = st.scale * xr[c] + per[c];
    }
  });
}

// The value rows of a key tile [t0, t0 + tn), channels [c0, c1), as the passes read them: the
// rows themselves (returned pointer at row t0, *rs = their row stride) when the tile has no padded
// row, else a copy in vbuf (row stride d, *rs = d) with the padded rows zero. A padded value row
// meets a zero hidden row in S = hid^T V and in dhid = V R^T, and NaN * 0 = NaN: it must be
// selected away, not multiplied away. Tiles without padding (all of them without a mask) are
// read in place, as before.
template <typename T>
const T* select_values(const Stream<T>& ks, const T* vx, int64_t vrs, int64_t t0, int64_t tn, int64_t c0,
                       int64_t c1, int64_t d, T* vbuf, int64_t* rs) {
  const T* rows = vx + t0 * vrs;
  if (!ks.mask) return rows;
  int64_t padded = 0;
  for (int64_t t = 0; t < tn; ++t) padded += ks.mask[t0 + t] == T(0);
  if (padded == 0) return rows;
  for (int64_t t = 0; t < tn; ++t) {
    T* out = vbuf + t * d;
    if (ks.mask[t0 + t] == T(0))
      std::fill(out + c0, out + c1, T(0));
    else
      std::memcpy(out + c0, rows + t * vrs + c0, (c1 - c0) * sizeof(T));
  }
  *rs = d;
  return vbuf;
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


// Token sums, transposed: S^T += X^T hid [d_h(x), d_h(hid)] and sv += sum_t m_t X_t [d_h] over tn
// rows: hid rows (row stride d_h, already masked) and X [tn, d_h] with row stride ldx (value rows
// for generator 1, dY rows for generator 2). The transposes stack into the per-(b, h) products
// below (expand_fc2 and the rest).
template <typename T>
void accumulate_state(const Mm<T>& mm, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, const T* hd,
                      const T* x, int64_t ldx, T* s_t, T* sv) {
  // [d_h(x), T] @ [T, d_h(hid)] -> [d_h, d_h]
  mm(true, false, dh, dh, tn, x, ldx, hd, dh, s_t, dh, true);
  add_rows(x, ldx, tn, dh, st.mask ? st.mask + r0 : nullptr, sv);
}

// out rows (stride ldo) = hid G + m g0 over tn rows: [T, d_h] @ [d_h, d_h], from gt = G^T; g0
// [d_h] or nullptr. Y (G = C, g0 = c0) and dvalue (G = R, g0 = r0). Products [T, d_h] x
// [d_h, d_h] take the right operand transposed throughout (inside the passes the BLAS's kernel
// for that layout ran them faster, about 5% of the whole twin), so C, R and fc1 are transposed
// once per call.
template <typename T>
void mix_rows(const Mm<T>& mm, const Stream<T>& st, int64_t r0, int64_t tn, int64_t dh, const T* hd, const T* gt,
              const T* g0, T* out, int64_t ldo) {
  mm(false, true, tn, dh, dh, hd, dh, gt, dh, out, ldo, false);
  if (!g0) return;
  for (int64_t t = 0; t < tn; ++t) {
    const T mr = st.m(r0 + t);
    T* ot = out + t * ldo;
#pragma omp simd
    for (int64_t c = 0; c < dh; ++c) ot[c] += mr * g0[c];
  }
}

// Token sums of one piece: S / T [d_h, d_h] then sv / sdy [d_h].
inline int64_t state_size(int64_t dh) { return dh * dh + dh; }

// One generator's fc1 gradient partials of one (b, h, work chunk): fc1_w [d_h(out), d_h(in)],
// then fc1_b [d_h].
template <typename T>
struct Fc1Partial {
  T* fc1_w;
  T* fc1_b;
  static int64_t size(int64_t dh) { return dh * dh + dh; }
  Fc1Partial(T* base, int64_t dh) : fc1_w(base), fc1_b(base + dh * dh) {}
};

// The generator backward below the hidden layer, from dHd in buf.dhd (not yet masked):
// dU = dHd * m GELU'(U); db1 += sum_t dU_t; dfc1 += dU^T z; dx rows (stride ldx) = s * dU fc1
// (masked rows get dU = 0, hence 0).
template <typename T>
void fc1_backward(const Mm<T>& mm, const T* fc1_t, int64_t tn, int64_t dh, T s, const T* z, int64_t ldz,
                  TileBuffers<T>& buf, Fc1Partial<T>& fp, T* dx, int64_t ldx) {
  T* __restrict__ du = buf.du.data();
  const T* __restrict__ dhd = buf.dhd.data();
  const T* __restrict__ gd = buf.gd.data();
  const int64_t n = tn * dh;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) du[i] = dhd[i] * gd[i];
  add_rows(du, dh, tn, dh, static_cast<const T*>(nullptr), fp.fc1_b);
  // dfc1 += dU^T z: [d_h(out), T] @ [T, d_h(in)] -> [d_h(out), d_h(in)]
  mm(true, false, dh, dh, tn, buf.du.data(), dh, z, ldz, fp.fc1_w, dh, true);
  // dx = s * dU fc1: [T, d_h(out)] @ [d_h(out), d_h(in)] -> [T, d_h], into dx's rows (fc1_t = fc1^T)
  mm(false, true, tn, dh, dh, buf.du.data(), dh, fc1_t, dh, dx, ldx, false, s);
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

// The k_h-wide products of one (b, h), a group of blocks at once (hmx_cpu_scan.h, "block
// stages"). Per block j the token sums come transposed (S_j^T [d_h(x), d_h(hid)],
// accumulate_state) and everything k_h-wide is kept transposed too (P_j^T [d_h, k_h], ...), so the
// blocks stack into rows: [nb * d_h, ...] matrices (nb: the blocks of the group), and each product
// below is one gemm over them (blocks of a few tokens would otherwise pay for nb small gemms).
//   stack_rows: [nb][d_h^2 + d_h] window sums -> st [nb * d_h, d_h] (S^T rows), sv [nb * d_h]
template <typename T>
void stack_rows(const T* win, int64_t nb, int64_t dh, T* st, T* sv) {
  const int64_t gsq = dh * dh, ssz = gsq + dh;
  for (int64_t j = 0; j < nb; ++j) {
    std::memcpy(st + j * gsq, win + j * ssz, gsq * sizeof(T));
    std::memcpy(sv + j * dh, win + j * ssz + gsq, dh * sizeof(T));
  }
}

// out [nb * d_h, k_h] = st fc2^T + sv b2^T: per block (fc2 S + b2 sv^T)^T, i.e. P_j^T from the
// state windows (generator 1), or dA_j^T from (T_j^T, sdy_j) (generator 2).
template <typename T>
void expand_fc2(const Mm<T>& mm, const HeadWeights<T>& w, const T* st, const T* sv, int64_t rows, int64_t dh,
                int64_t kh, T* out) {
  // the bias term first, then the product added to it: a product into a zero output (beta = 0)
  // has the BLAS scale the output first, an extra pass over it (its largest output here)
  if (w.fc2_b)
    for (int64_t r = 0; r < rows; ++r) {
      const T s = sv[r];
      T* __restrict__ o = out + r * kh;
#pragma omp simd
      for (int64_t j = 0; j < kh; ++j) o[j] = s * w.fc2_b[j];
    }
  // [nb * d_h, d_h] @ [d_h, k_h] -> [nb * d_h, k_h]
  mm(false, true, rows, kh, dh, st, dh, w.fc2_w, dh, out, kh, w.fc2_b != nullptr);
}

// g [nb * d_h, d_h] = ft fc2 and, with a bias and g0 != nullptr, g0 [nb * d_h] = ft b2, from
// ft [nb * d_h, k_h]: per block (fc2^T F)^T and F^T b2; F = A gives C^T and c0, F = dP gives
// R'^T and r0'.
template <typename T>
void fold_fc2(const Mm<T>& mm, const HeadWeights<T>& w, const T* ft, int64_t rows, int64_t dh, int64_t kh, T* g,
              T* g0) {
  // [nb * d_h, k_h] @ [k_h, d_h] -> [nb * d_h, d_h]
  mm(false, false, rows, dh, kh, ft, kh, w.fc2_w, dh, g, dh, false);
  if (w.fc2_b && g0) mm(false, false, rows, 1, kh, ft, kh, w.fc2_b, 1, g0, 1, false);
}

// fc2 gradients summed over the blocks: dfc2 [k_h, d_h(hid)] = ft^T st = sum_j F_j S_j^T and
// dfc2_b [k_h] = ft^T sv = sum_j F_j sv_j (F = A with (T, sdy), or dP with the state windows).
template <typename T>
void fc2_grads(const Mm<T>& mm, const T* ft, const T* st, const T* sv, int64_t rows, int64_t dh, int64_t kh,
               T* dfc2, T* dfc2_b) {
  // [k_h, nb * d_h] @ [nb * d_h, d_h] -> [k_h, d_h]
  mm(true, false, kh, dh, rows, ft, kh, st, dh, dfc2, dh, false);
  mm(true, false, kh, 1, rows, ft, kh, sv, 1, dfc2_b, 1, false);
}

// Per head, in fixed order: fc1 gradients = sum over (b, c) of the work-chunk partials [B][H][C],
// fc2 gradients = sum over b of the per-(b, h) ones [B][H][k_h * d_h + k_h]; written in the
// weights' own layouts.
template <typename T>
void reduce_generator_grads(const std::vector<T>& fc1_part, const std::vector<T>& fc2_part, int64_t B, int64_t H,
                            int64_t C, int64_t dh, int64_t kh, const GeneratorGrads& out, int nthreads) {
  const int64_t csz = Fc1Partial<T>::size(dh), fsz = kh * dh + kh;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t h = 0; h < H; ++h) {
    std::vector<T> a1(csz, T(0)), a2(fsz, T(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const T* src = fc1_part.data() + ((b * H + h) * C + c) * csz;
        for (int64_t i = 0; i < csz; ++i) a1[i] += src[i];
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

// Key pass, one work item: per tile and head, S^T, sv into the pieces (b, h, piece) of `part`
// (zero-initialised by the caller); in the backward (rk != nullptr: per (b, h, block) R^T
// [d_h(v), d_h(hid)] then r0 [d_h], has_r0 false without b2; rm: R per block) also, per block j of the rows,
// dvalue = hid R_j + m r0_j and dHd = value R_j^T, then the fc1 chain -> generator-1 fc1
// partials (b, h, c) and dkey.
template <typename T>
void key_item(const ProblemParams& pb, const Mm<T>& mm, const PassItems& items, const BlockMap& bm,
              const Pieces& pc, int64_t item, TileBuffers<T>& buf, T* part, T* fc1_part, const T* rk,
              const T* rm, bool has_r0, const T* fc1_t, T* dk, T* dv) {
  const int64_t H = pb.H, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d, C = items.C, nb = bm.nb();
  const int64_t ssz = state_size(dh), gsq = dh * dh;
  int64_t b, c, h0, h1, c0, c1;
  items.decode(item, H, &b, &c, &h0, &h1);
  chunk_range(N, C, c, &c0, &c1);
  const Stream<T> ks = make_stream<T>(pb, pb.k, pb.k_bstride, pb.k_rstride, pb.pe_k, pb.m_k, N, b);
  const T* vx = static_cast<const T*>(pb.v) + b * pb.v_bstride;
  for (int64_t t0 = c0; t0 < c1; t0 += kCpuTile) {
    const int64_t tn = std::min(kCpuTile, c1 - t0);
    load_z(ks, bm, t0, tn, h0 * dh, h1 * dh, d, buf.z.data());
    int64_t vrs = pb.v_rstride;
    const T* vtile = select_values(ks, vx, vrs, t0, tn, h0 * dh, h1 * dh, d, buf.v.data(), &vrs);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t bh = b * H + h;
      const HeadWeights<T> w = head_weights<T>(pb.g1, h, dh, kh);
      const T* z = buf.z.data() + h * dh;
      const T* vt = vtile + h * dh;
      hidden(mm, w, ks, t0, tn, dh, z, d, buf, rk != nullptr);
      for_block_runs(bm, t0, tn, [&](int64_t j, int64_t a, int64_t n) {
        const int64_t o = a - t0;
        T* sp = part + (bh * pc.count + pc.index(c, j)) * ssz;
        const T* hd = buf.hd.data() + o * dh;
        const T* va = vt + o * vrs;
        accumulate_state(mm, ks, a, n, dh, hd, va, vrs, sp, sp + gsq);
        if (!rk) return;
        const T* rt = rk + (bh * nb + j) * ssz;  // R^T, then r0
        // dvalue = hid R + m r0, into dv's rows
        mix_rows(mm, ks, a, n, dh, hd, rt, has_r0 ? rt + gsq : nullptr, dv + (b * N + a) * d + h * dh, d);
        // dHd = value R^T: [T, d_h(v)] @ [d_h(v), d_h(hid)] -> [T, d_h] (R as the transposed operand)
        mm(false, true, n, dh, dh, va, vrs, rm + (bh * nb + j) * gsq, dh, buf.dhd.data() + o * dh, dh, false);
      });
      if (!rk) continue;
      Fc1Partial<T> fp(fc1_part + (bh * C + c) * Fc1Partial<T>::size(dh), dh);
      fc1_backward(mm, fc1_t + h * gsq, tn, dh, ks.scale, z, d, buf, fp, dk + (b * N + t0) * d + h * dh, d);
    }
  }
}

// Per (b, h): the window sums of the token sums `part` (pieces) as stacks st [nb * d_h, d_h]
// (S_j^T rows) and sv [nb * d_h]; blk, win: [nb][d_h^2 + d_h] scratch of this (b, h).
template <typename T>
void state_windows(const T* part, const Pieces& pc, const BlockMap& bm, int64_t dh, T* blk, T* win, T* st, T* sv) {
  const int64_t ssz = state_size(dh), nb = bm.nb();
  block_sums(part, ssz, pc, nb, ssz, blk);
  window_sums(blk, bm, ssz, false, win);
  stack_rows(win, nb, dh, st, sv);
}

// The token-causal scan and the per-(b, h) block stages of chunked mixing (hmx_cpu_scan.h): they
// use the helpers above, so the file is included here, inside this namespace.
#include "hmx_cpu_scan.h"

template <typename T>
void forward_impl(const ForwardParams& fp, GemmFn<T> gemm, int nthreads, const Reducer& reduce) {
  const ProblemParams& pb = fp.pb;
  if (token_scan(pb)) return scan_forward_impl<T>(fp, gemm, nthreads);
  const int64_t B = pb.B, H = pb.H, M = pb.M, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Mm<T> mm{gemm};
  T* p = static_cast<T*>(fp.p);
  T* y = static_cast<T*>(fp.y);
  const BlockMap bm = make_blocks(pb);
  const int64_t nb = bm.nb(), NB = pb.num_blocks, psz = kh * dh;
  const PassItems kitems = pass_items(B, N, H, nthreads), qitems = pass_items(B, M, H, nthreads);
  const Pieces kpc = make_pieces(bm, N, kitems.C);
  const int64_t ssz = state_size(dh), gsq = dh * dh;
  Buffer<T> part(B * H * kpc.count * ssz);  // token sums per piece (zeroed: they accumulate)
  part.zero();
  // every buffer below is written before it is read (uninitialised, no zero pass over them)
  Buffer<T> blk(B * H * nb * ssz);                        // token sums per block
  Buffer<T> cmt(B * H * nb * gsq), c0(B * H * nb * dh);  // per block C^T (C = fc2_2^T A), c0 = A^T b2_2
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(d, dh);
    // key pass: S^T, sv per piece
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < kitems.count(B); ++item)
      key_item<T>(pb, mm, kitems, bm, kpc, item, buf, part.data(), nullptr, nullptr, nullptr, false, nullptr,
                  nullptr, nullptr);
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh)
      block_sums(part.data() + bh * kpc.count * ssz, ssz, kpc, nb, ssz, blk.data() + bh * nb * ssz);
  }
  reduce(blk.data(), B * H * nb * ssz);  // sequence parallel: every rank's keys
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(d, dh);
    BlockStageBuffers<T> sb(nb, dh, kh);  // one (b, h) at a time
    // per (b, h), in groups of blocks: P^T = (fc2 S + b2 sv^T)^T (+ a carried state; written to
    // p), A^T = GELU(P^T), C^T = A^T fc2_2, c0 = A^T b2_2
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const T* pi = fp.p_init ? static_cast<const T*>(fp.p_init) + bh * std::max<int64_t>(fp.n_init, 1) * psz
                              : nullptr;
      forward_block_stage(pb, mm, bm, bh % H, blk.data() + bh * nb * ssz, pi, fp.n_init, p + bh * NB * psz,
                          cmt.data() + bh * nb * gsq, c0.data() + bh * nb * dh, sb);
    }
    // query pass: Y = hid2 C_j + m c0_j, per block j of the rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qitems.count(B); ++item) {
      int64_t b, c, h0, h1, r0, r1;
      qitems.decode(item, H, &b, &c, &h0, &h1);
      chunk_range(M, qitems.C, c, &r0, &r1);
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b);
      for (int64_t t0 = r0; t0 < r1; t0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, r1 - t0);
        load_z(qs, bm, t0, tn, h0 * dh, h1 * dh, d, buf.z.data());
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t bh = b * H + h;
          const HeadWeights<T> w = head_weights<T>(pb.g2, h, dh, kh);
          hidden(mm, w, qs, t0, tn, dh, buf.z.data() + h * dh, d, buf, false);
          for_block_runs(bm, t0, tn, [&](int64_t j, int64_t a0, int64_t n) {
            const int64_t bj = bh * nb + j;
            mix_rows(mm, qs, a0, n, dh, buf.hd.data() + (a0 - t0) * dh, cmt.data() + bj * gsq,
                     w.fc2_b ? c0.data() + bj * dh : nullptr, y + (b * M + a0) * d + h * dh, d);
          });
        }
      }
    }
  }
}

template <typename T>
void backward_impl(const BackwardParams& bp, GemmFn<T> gemm, int nthreads, const Reducer& reduce) {
  const ProblemParams& pb = bp.pb;
  if (token_scan(pb)) return scan_backward_impl<T>(bp, gemm, nthreads);
  const int64_t B = pb.B, H = pb.H, M = pb.M, N = pb.N, dh = pb.d_h, kh = pb.k_h, d = pb.d;
  const Mm<T> mm{gemm};
  const T* p = static_cast<const T*>(bp.p);
  const BlockMap bm = make_blocks(pb);
  const int64_t nb = bm.nb(), NB = pb.num_blocks;
  const int64_t psz = kh * dh, gsq = dh * dh, fsz = kh * dh + kh, ssz = state_size(dh);
  // one carried term per block: p holds the blocks' own Q_j; P_j as the forward formed it
  const bool own = bp.n_init > 0;
  Buffer<T> pown(own ? B * H * NB * psz : 1);
  if (own) {
    const T* pi = static_cast<const T*>(bp.p_init);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t j = 0; j < nb; ++j)
        own_window(p + bh * NB * psz, bm, j, psz, pi + (bh * NB + j) * psz, pown.data() + (bh * NB + j) * psz);
    p = pown.data();
  }
  const int64_t f1sz = Fc1Partial<T>::size(dh);
  const PassItems kitems = pass_items(B, N, H, nthreads), qitems = pass_items(B, M, H, nthreads);
  const Pieces kpc = make_pieces(bm, N, kitems.C), qpc = make_pieces(bm, M, qitems.C);
  const int64_t Cq = qitems.C, Ck = kitems.C;
  // dpt, cm, rk are written before they are read (uninitialised)
  Buffer<T> dpt(B * H * nb * psz);  // dP_j^T per (b, h, block): [d_h, k_h]
  // C_j per block: the query pass takes it as the transposed right operand of dY C^T (the layout
  // the BLAS runs fastest here, see mix_rows); after the query pass the same buffer holds R_j
  Buffer<T> cm(B * H * nb * gsq);
  // per block, R^T then r0 (R = sum of R' = fc2^T dP over the blocks whose window holds it)
  Buffer<T> rk(B * H * nb * ssz);
  // token sums per piece and fc1 partials per (b, h, work chunk): zero, they accumulate
  Buffer<T> q_part(B * H * qpc.count * ssz), k_part(B * H * kpc.count * ssz);
  q_part.zero();
  k_part.zero();
  std::vector<T> q_fc1(B * H * Cq * f1sz, T(0)), k_fc1(B * H * Ck * f1sz, T(0));
  std::vector<T> g2_fc2(B * H * fsz), g1_fc2(B * H * fsz);
  Buffer<T> tblk(B * H * nb * ssz);  // T^T, sdy per block (summed over the ranks: tblk; own: tloc)
  const T* dy = static_cast<const T*>(bp.dy);
  T* dq = static_cast<T*>(bp.dq);
  T* dk = static_cast<T*>(bp.dk);
  T* dv = static_cast<T*>(bp.dv);
  const bool b2_1 = pb.g1.fc2_b != nullptr;
  const std::vector<T> fc1t_1 = fc1_transposed<T>(pb.g1, H, dh), fc1t_2 = fc1_transposed<T>(pb.g2, H, dh);

#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(d, dh);
    BlockStageBuffers<T> sb(nb, dh, kh);  // one (b, h) at a time
    // ---- per (b, h), in groups of blocks: C^T = GELU(P^T) fc2_2 ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh)
      backward_block_c(pb, mm, nb, bh % H, p + bh * NB * psz, cm.data() + bh * nb * gsq, sb);
    // ---- query pass: T^T, sdy per piece, generator-2 fc1 partials, dquery ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < qitems.count(B); ++item) {
      int64_t b, c, h0, h1, r0, r1;
      qitems.decode(item, H, &b, &c, &h0, &h1);
      chunk_range(M, Cq, c, &r0, &r1);
      const Stream<T> qs = make_stream<T>(pb, pb.q, pb.q_bstride, pb.q_rstride, pb.pe_q, pb.m_q, M, b);
      for (int64_t t0 = r0; t0 < r1; t0 += kCpuTile) {
        const int64_t tn = std::min(kCpuTile, r1 - t0);
        load_z(qs, bm, t0, tn, h0 * dh, h1 * dh, d, buf.z.data());
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t bh = b * H + h;
          const HeadWeights<T> w = head_weights<T>(pb.g2, h, dh, kh);
          const T* z = buf.z.data() + h * dh;
          const T* dyt = dy + (b * M + t0) * d + h * dh;  // rows of stride d
          hidden(mm, w, qs, t0, tn, dh, z, d, buf, true);
          for_block_runs(bm, t0, tn, [&](int64_t j, int64_t a0, int64_t n) {
            const int64_t o = a0 - t0;
            T* sp = q_part.data() + (bh * qpc.count + qpc.index(c, j)) * ssz;
            accumulate_state(mm, qs, a0, n, dh, buf.hd.data() + o * dh, dyt + o * d, d, sp, sp + gsq);
            // dHd2 = dY C^T: [T, d_h(y)] @ [d_h(y), d_h(hid)] -> [T, d_h]
            mm(false, true, n, dh, dh, dyt + o * d, d, cm.data() + (bh * nb + j) * gsq, dh,
               buf.dhd.data() + o * dh, dh, false);
          });
          Fc1Partial<T> fp(q_fc1.data() + (bh * Cq + c) * f1sz, dh);
          fc1_backward(mm, fc1t_2.data() + h * gsq, tn, dh, qs.scale, z, d, buf, fp, dq + (b * M + t0) * d + h * dh,
                       d);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh)  // T_j is its block only
      block_sums(q_part.data() + bh * qpc.count * ssz, ssz, qpc, nb, ssz, tblk.data() + bh * nb * ssz);
  }
  // sequence parallel: dA needs every rank's queries; this rank's generator-2 fc2 gradients its own
  std::vector<T> tloc;
  if (reduce) {
    tloc.assign(tblk.data(), tblk.data() + B * H * nb * ssz);
    reduce(tblk.data(), B * H * nb * ssz);
  }
  const T* town = reduce ? tloc.data() : tblk.data();
#pragma omp parallel num_threads(nthreads)
  {
    TileBuffers<T> buf(d, dh);
    // one (b, h) at a time; the buffers are written before they are read
    BlockStageBuffers<T> sb(nb, dh, kh);
    Buffer<T> blk(nb * ssz), st(nb * gsq), sv(nb * dh);
    // ---- per (b, h), in groups of blocks: dA^T = T^T fc2_2^T + sdy b2_2^T, generator-2 fc2
    //      grads, dP^T = dA^T * GELU'(P^T) (+ the saved state's own gradient), R'^T = dP^T fc2,
    //      r0' = dP^T b2; R, r0 per block; the carried state's gradient ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const T* de = bp.dp_extra ? static_cast<const T*>(bp.dp_extra) + bh * NB * psz : nullptr;
      T* di = bp.dp_init ? static_cast<T*>(bp.dp_init) + bh * std::max<int64_t>(bp.n_init, 1) * psz : nullptr;
      backward_block_grads(pb, mm, bm, bh % H, p + bh * NB * psz, tblk.data() + bh * nb * ssz,
                           town + bh * nb * ssz, de, di, bp.n_init, dpt.data() + bh * nb * psz,
                           g2_fc2.data() + bh * fsz, rk.data() + bh * nb * ssz, cm.data() + bh * nb * gsq, sb);
    }
    // ---- key pass: S^T, sv per piece, generator-1 fc1 partials, dkey, dvalue ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < kitems.count(B); ++item)
      key_item<T>(pb, mm, kitems, bm, kpc, item, buf, k_part.data(), k_fc1.data(), rk.data(), cm.data(), b2_1,
                  fc1t_1.data(),
                  dk, dv);
    // ---- per (b, h): generator-1 fc2 grads dfc2 = sum_j dP_j S_j^T, db2 = sum_j dP_j sv_j over
    //      the state windows ----
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; ++bh)
      backward_block_fc2(pb, mm, bm, kpc, k_part.data() + bh * kpc.count * ssz, dpt.data() + bh * nb * psz,
                         own && bp.dp_extra ? static_cast<const T*>(bp.dp_extra) + bh * NB * psz : nullptr,
                         g1_fc2.data() + bh * fsz, sb, blk.data(), st.data(), sv.data());
  }
  reduce_generator_grads<T>(q_fc1, g2_fc2, B, H, Cq, dh, kh, bp.dg2, nthreads);
  reduce_generator_grads<T>(k_fc1, g1_fc2, B, H, Ck, dh, kh, bp.dg1, nthreads);
}

}  // namespace

void forward_f32(const ForwardParams& p, GemmFn<float> gemm, int nthreads, const Reducer& reduce) {
  forward_impl<float>(p, gemm, nthreads, reduce);
}
void forward_f64(const ForwardParams& p, GemmFn<double> gemm, int nthreads, const Reducer& reduce) {
  forward_impl<double>(p, gemm, nthreads, reduce);
}
void backward_f32(const BackwardParams& p, GemmFn<float> gemm, int nthreads, const Reducer& reduce) {
  backward_impl<float>(p, gemm, nthreads, reduce);
}
void backward_f64(const BackwardParams& p, GemmFn<double> gemm, int nthreads, const Reducer& reduce) {
  backward_impl<double>(p, gemm, nthreads, reduce);
}

}  // namespace cpu
}  // namespace hmx
