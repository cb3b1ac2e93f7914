// Launcher interface shared by the CPU twin (hmx_cpu.cpp) and the CUDA kernels (hmx_cuda_*.cu).
//
// Plain C++ only: no torch, no CUDA headers, so every .cu and .cpp can include it and plain nvcc
// compiles the kernels on machines without torch's CUDA headers. Launchers take raw pointers,
// sizes and strides; the binding (hmx_binding.cpp) fills these structs from checked tensors.
//
// Element types, by backend:
//   CPU twin: every pointer is `scalar_t` (float or double), the compute type.
//   CUDA:     tokens, weights, dq/dk/dv are the input type T (float, half, bfloat16); y, dy
//             (fp16's range: Y can exceed 65504, dY fall below 2^-14), pe_*, m_*, p and every
//             weight-gradient output are float (fp32 accumulation).
// Layouts (row-major, last dimension contiguous):
//   q [B, M, d], k and v [B, N, d]: batch and row strides given, channel stride 1
//   pe_q [M, d], pe_k [N, d]: positional-encoding rows already shifted to the variant's positions
//   m_q [B, M], m_k [B, N]: 1 = token kept, 0 = padded; nullptr = no mask
//   fc1_w [H, d_h(out), d_h(in)], fc1_b [H, d_h] (nullptr = none), fc2_w [H, k_h, d_h],
//   fc2_b [H, k_h] (nullptr = none): generator 1 makes W1 from keys, generator 2 W2 from queries
//   y, dy, dq [B, M, d], dk, dv [B, N, d]: contiguous
//   p [B, H, num_blocks, k_h, d_h]: P = W1^T V per (batch, head, mixing block), saved by the
//     forward for the backward (num_blocks = 1 unless the mixing is blocked, see below; the CPU
//     twin keeps P^T per slot)
// Mixing blocks (CPU twin: every kind; CUDA kernels: chunk-causal and packed, not token-causal,
// through the piece table of hmx_pieces.h):
//   a sequence is a batch row or, with cu_seqlens (B = 1, M = N), one of the packed sequences
//   [cu_seqlens[s], cu_seqlens[s + 1]) whose PE positions restart at its first token. Each
//   sequence is cut into blocks of chunk_size tokens (0: one block); the tokens of block j
//   mix with the state summed over blocks max(first block of the sequence, j - left_context) .. j
//   (left_context -1: every earlier block of the sequence). Non-causal = one block per sequence;
//   token-causal = chunk_size 1 (docs/HYPERMIXING.md, "Causal and chunked mixing").
#pragma once
#include <cstdint>

// callable from host and device code when compiled by nvcc
#ifdef __CUDACC__
#define HMX_HD __host__ __device__
#else
#define HMX_HD
#endif

namespace hmx {

// Sequence parallelism: each rank holds a slice of every sequence, and the token sums that cross
// the slices (the key sums S, sv in the forward; the query sums T, sdy in the backward) are summed
// over the ranks in place by this callback, called by the host code between the passes:
//   CPU twin: count values of the compute type, [B, H, blocks, d_h^2 + d_h];
//   CUDA:     count fp32 values in device memory, [B H][D * D] then [B H][D] with D =
//             padded_head_dim(d_h) (padding included), after the work before it on the stream.
// fn == nullptr: one process holds the whole sequence.
struct Reducer {
  void (*fn)(void* ctx, void* data, int64_t count) = nullptr;
  void* ctx = nullptr;
  explicit operator bool() const { return fn != nullptr; }
  void operator()(void* data, int64_t count) const {
    if (fn) fn(ctx, data, count);
  }
};

// The CUDA kernels' head block for d_h: 32, 64 or 128 (0: d_h > 128, too large)
inline int64_t padded_head_dim(int64_t dh) { return dh <= 32 ? 32 : dh <= 64 ? 64 : dh <= 128 ? 128 : 0; }

// fp32 values per call of a Reducer from the CUDA kernels (both directions): [B H][D * D] then
// [B H][D], D = padded_head_dim(d_h)
inline int64_t cuda_reduce_count(int64_t B, int64_t H, int64_t dh) {
  const int64_t D = padded_head_dim(dh);
  return B * H * (D * D + D);
}

struct GeneratorParams {
  const void* fc1_w;  // [H, d_h, d_h]
  const void* fc1_b;  // [H, d_h] or nullptr
  const void* fc2_w;  // [H, k_h, d_h]
  const void* fc2_b;  // [H, k_h] or nullptr
};

struct GeneratorGrads {
  void* fc1_w;  // [H, d_h, d_h]
  void* fc1_b;  // [H, d_h] or nullptr (not computed)
  void* fc2_w;  // [H, k_h, d_h]
  void* fc2_b;  // [H, k_h] or nullptr (not computed)
};

struct ProblemParams {
  int64_t B, M, N, d, H, d_h, k_h;
  double scale;  // input scale s of the hypernetwork input z = s * (x * m) + PE
  const void* q;
  const void* k;
  const void* v;
  int64_t q_bstride, q_rstride;
  int64_t k_bstride, k_rstride;
  int64_t v_bstride, v_rstride;
  const void* pe_q;  // [M, d]
  const void* pe_k;  // [N, d]
  const void* m_q;   // [B, M] or nullptr
  const void* m_k;   // [B, N] or nullptr
  GeneratorParams g1;  // W1 = MLP1(z_k) * m_k
  GeneratorParams g2;  // W2 = MLP2(z_q) * m_q
  bool allow_mma = true;  // CUDA: tensor-core products for half types where the device has them
  // mixing blocks (see the top of the file); the defaults are plain non-causal mixing
  int64_t chunk_size = 0;               // C >= 1, or 0: one block per sequence
  int64_t left_context = -1;            // L >= 0 blocks, or -1: all earlier blocks
  const int64_t* cu_seqlens = nullptr;  // [num_seqs + 1] host token offsets (packed, B = 1), or nullptr
  int64_t num_seqs = 0;
  int64_t num_blocks = 1;               // block slots per batch row in p (>= the blocks there are; extra slots zero)
  HMX_HD bool blocked() const { return chunk_size > 0 || cu_seqlens != nullptr; }
};

struct ForwardParams {
  ProblemParams pb;
  void* y;  // [B, M, d] output: Y = W2 GELU(P), before LayerNorm
  void* p;  // [B, H, k_h, d_h] output: P = W1^T V
  // CPU twin, causal / chunk-causal mixing without cu_seqlens: a carried state (streaming)
  // added to the blocks' P (before the GELU): n_init 0, [B, H, d_h, k_h], the state P_0^T of the
  // chunks before these tokens, added to every block (unbounded left context; the token scan starts
  // from it); n_init = the block count, [B, H, n_init, d_h, k_h], one term E_j per block (blocked
  // mixing, any window). nullptr = none.
  // CPU twin: with one term per block the state p holds each block's own partial state Q_j^T (its
  // own tokens' fc2 S + b2 sv^T), not P_j: P_j^T = (sum of Q_i^T over j's window, in block order) +
  // E_j, which the backward forms again from p and the same p_init (BackwardParams::p_init).
  // Streaming with a limited left context carries the last L chunks' Q_j, which no window sum
  // holds, so one pass gives both the output and the next carry.
  // CUDA kernels (chunk-causal, not token-causal): the same terms in P's own layout,
  // [B, H, k_h, d_h] or [B, H, n_init, k_h, d_h] (the binding transposes); their state p holds
  // P_j (terms included) either way, so streaming with a limited left context makes two calls there
  const void* p_init = nullptr;
  int64_t n_init = 0;
};

struct BackwardParams {
  ProblemParams pb;
  const void* p;   // [B, H, k_h, d_h] from the forward
  const void* dy;  // [B, M, d]
  void* dq;        // [B, M, d]
  void* dk;        // [B, N, d]
  void* dv;        // [B, N, d]
  GeneratorGrads dg1;
  GeneratorGrads dg2;
  // CPU twin: the gradient of the saved state p itself [B, H, num_blocks, d_h, k_h] (p's layout),
  // added to dP (the token scan: only its last slot, the state after the last token); nullptr =
  // none. dp_init: output, the gradient of ForwardParams::p_init in its layout (n_init 0: the sum
  // of every block's dP^T; else each block's own).
  // CPU twin with n_init > 0 (one term per block): p holds the blocks' own partial states Q_j (see
  // ForwardParams::p_init), p_init the forward's terms E_j, and dp_extra is the gradient of Q_j (it
  // enters block j's own token sums only, not dP); dp_init is each block's dP.
  // CUDA kernels: dp_extra in their p's layout [B, H, num_blocks, k_h, d_h]; dp_init receives every
  // block's dP [B, H, num_blocks, k_h, d_h] and the binding forms the gradient of p_init from it
  // (sum over blocks, transpose)
  const void* dp_extra = nullptr;
  void* dp_init = nullptr;
  int64_t n_init = 0;
  const void* p_init = nullptr;  // [B, H, n_init, d_h, k_h] with n_init > 0, else unused
};

// Token tiles and the split of a sequence into a fixed number of chunks: chunk c of L tokens
// covers tiles [c * tiles / C, (c + 1) * tiles / C). The split depends on L only (never on the
// number of threads or SMs), so partial sums are added in the same order on every machine:
// results are bitwise deterministic for a given build.
constexpr int64_t kTokenTile = 64;
constexpr int64_t kMaxChunks = 16;

HMX_HD inline int64_t num_tiles(int64_t L, int64_t tile) { return (L + tile - 1) / tile; }
HMX_HD inline int64_t num_chunks(int64_t L, int64_t tile) {
  const int64_t t = num_tiles(L, tile);
  return t < kMaxChunks ? t : kMaxChunks;
}

}  // namespace hmx
