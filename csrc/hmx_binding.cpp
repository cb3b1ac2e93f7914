// Python binding of the fused HyperMixing passes: the only source that includes torch headers.
// It checks every tensor (device, dtype, layout, shape), allocates outputs, fills the launcher
// structs of hmx_params.h and dispatches to the CPU twin (CPU tensors) or, when compiled with
// HMX_WITH_CUDA, to the CUDA kernels (CUDA tensors) on the current stream.
//
//   forward(q, k, v, pe_q, pe_k, m_q, m_k, w1 fc1_w, fc1_b, fc2_w, fc2_b, w2 (same 4), scale,
//           chunk_size, left_context, cu_seqlens, num_blocks)
//       -> (y [B, M, d] before LayerNorm, p [B, H, num_blocks * k_h, d_h] saved for the backward)
//   backward(dy, q, k, v, pe_q, pe_k, m_q, m_k, w1 x4, w2 x4, p, scale, chunk_size, left_context,
//            cu_seqlens, num_blocks)
//       -> [dq, dk, dv, dw1 fc1_w, fc1_b, fc2_w, fc2_b, dw2 (same 4), dp_init] (None for absent biases;
//          dp_init None unless want_dp_init)
//   p_init (forward), dp_extra / want_dp_init / n_init / p_init (backward), keywords, CPU twin,
//   chunk-causal: a carried state added to every block's P (streaming), the gradient of the saved
//   state added to dP, and the carried state's gradient; with one term per block the state holds
//   the blocks' own partial states and the backward takes the forward's p_init (hmx_params.h).
//   chunk_size, left_context, cu_seqlens (int64 CPU or None), num_blocks: the mixing blocks of
//   hmx_params.h (0, -1, None, 1: non-causal). The CUDA kernels take chunk-causal and packed
//   mixing (any left context; not token-causal): the binding builds their piece table
//   (hmx_pieces.h) and copies it to the device once per call.
//   _piece_table(N, chunk_size, cu_seqlens, piece_len) -> (int32 table, n_pieces, nb): that table on
//   the CPU, for tests.
//   reduce (keyword, non-causal unpacked mixing, CPU twin and CUDA kernels): a callable that sums a
//   1-D tensor in place over the ranks of a sequence-parallel group (hmx_params.h, Reducer; on CUDA
//   an fp32 tensor on the device, called after the work before it on the current stream); None:
//   no sequence parallelism. reduce_count(B, H, d_h, cuda) -> the values it sums per call.
#include <torch/extension.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "hmx_cpu.h"
#include "hmx_params.h"
#include "hmx_pieces.h"
#ifdef HMX_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hmx_cuda.h"
#endif

namespace {

using OptT = std::optional<at::Tensor>;

// Options set once from Python (hmx_kernels.config, via set_options): nothing here reads the
// environment on a call.
// - poison: outputs and workspaces (uninitialised, at::empty) are filled with NaN (workspaces with
//   0xFF bytes, a NaN pattern too), so an element a kernel forgets to write shows up in a comparison.
// - allow_mma: tensor-core products for half types in the CUDA kernels; off, fp16 / bf16 problems
//   run through the fp32 kernels on fp32 copies (cuda_fma_fallback).
bool g_poison = false;
bool g_allow_mma = true;

bool poison_requested() { return g_poison; }

void set_options(bool poison, bool allow_mma) {
  g_poison = poison;
  g_allow_mma = allow_mma;
}

at::Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (poison_requested()) {
    if (options.dtype() == at::kByte) {
      t.fill_(255);
    } else {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
  return t;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_shape(const char* name, const at::Tensor& t, std::vector<int64_t> shape) {
  TORCH_CHECK(t.sizes().vec() == shape, "hmx_kernels: ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", shape_str(t));
}

void check_same(const char* name, const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == ref.device(), "hmx_kernels: ", name, " is on ", t.device(), " but query is on ",
              ref.device());
  TORCH_CHECK(t.scalar_type() == dtype, "hmx_kernels: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

void check_contiguous(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "hmx_kernels: ", name, " must be contiguous (call .contiguous())");
}

// [B, L, d] tokens: last dimension contiguous, any batch stride, rows at least d apart (the row
// stride is the leading dimension of the CPU twin's BLAS calls, which reject anything smaller and
// then compute nothing). Overlapping or broadcast rows must be copied by the caller.
void check_tokens(const char* name, const at::Tensor& t, const at::Tensor& ref, int64_t B, int64_t L,
                  int64_t d) {
  check_same(name, t, ref, ref.scalar_type());
  check_shape(name, t, {B, L, d});
  TORCH_CHECK(t.stride(2) == 1, "hmx_kernels: ", name, " must have a contiguous last dimension, got strides ",
              t.strides());
  TORCH_CHECK(L == 1 || t.stride(1) >= d, "hmx_kernels: ", name, " rows must be at least d = ", d,
              " elements apart (no overlapping or broadcast rows), got strides ", t.strides(), "; pass a copy");
}

// The row stride handed to the kernels: with one row it is never stepped, but it is still a BLAS
// leading dimension, so it is at least d (a [B, 1, d] view may carry any stride there).
int64_t row_stride(const at::Tensor& t, int64_t d) { return t.size(1) == 1 ? std::max(t.stride(1), d) : t.stride(1); }

// Side inputs (PE rows, masks, saved P, weight gradients) are in the compute type: the input type on
// the CPU (fp32/fp64), fp32 on CUDA.
at::ScalarType compute_type(const at::Tensor& q) {
  return q.is_cuda() ? at::kFloat : q.scalar_type();
}

struct Problem {
  hmx::ProblemParams pb;
  at::Tensor q, k, v;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pe_q,
                     const at::Tensor& pe_k, const OptT& m_q, const OptT& m_k, const at::Tensor& w1_fc1_w,
                     const OptT& w1_fc1_b, const at::Tensor& w1_fc2_w, const OptT& w1_fc2_b,
                     const at::Tensor& w2_fc1_w, const OptT& w2_fc1_b, const at::Tensor& w2_fc2_w,
                     const OptT& w2_fc2_b, double scale, int64_t chunk_size, int64_t left_context,
                     const OptT& cu_seqlens, int64_t num_blocks) {
  TORCH_CHECK(q.dim() == 3, "hmx_kernels: query must be [B, M, d], got ", shape_str(q));
  TORCH_CHECK(k.dim() == 3, "hmx_kernels: key must be [B, N, d], got ", shape_str(k));
  TORCH_CHECK(w1_fc1_w.dim() == 3 && w1_fc2_w.dim() == 3,
              "hmx_kernels: fc1 weights must be [H, d_h, d_h] and fc2 weights [H, k_h, d_h]");
  const auto dtype = q.scalar_type();
  const auto ctype = compute_type(q);
  if (q.is_cuda()) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                "hmx_kernels cuda: supported dtypes are float32, float16 and bfloat16, got ", dtype);
  } else {
    TORCH_CHECK(q.device().is_cpu(), "hmx_kernels: unsupported device ", q.device());
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
                "hmx_kernels cpu: supported dtypes are float32 and float64, got ", dtype);
  }
  const int64_t B = q.size(0), M = q.size(1), d = q.size(2), N = k.size(1);
  const int64_t H = w1_fc1_w.size(0), d_h = w1_fc1_w.size(2), k_h = w1_fc2_w.size(1);
  TORCH_CHECK(B > 0 && M > 0 && N > 0 && d > 0 && k_h > 0, "hmx_kernels: empty input");
  TORCH_CHECK(H * d_h == d, "hmx_kernels: H * d_h = ", H, " * ", d_h, " must equal d = ", d);
  check_tokens("key", k, q, B, N, d);
  check_tokens("value", v, q, B, N, d);
  check_tokens("query", q, q, B, M, d);
  check_same("pe_q", pe_q, q, ctype);
  check_same("pe_k", pe_k, q, ctype);
  // mixing blocks (hmx_params.h): chunk size, left context, packed sequences
  TORCH_CHECK(chunk_size >= 0, "hmx_kernels: chunk_size must be >= 0 (0: none), got ", chunk_size);
  TORCH_CHECK(left_context >= -1, "hmx_kernels: left_context must be >= -1 (-1: unbounded), got ", left_context);
  int64_t max_len = N, blocks = 1;
  if (cu_seqlens) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.numel() >= 2 &&
                    cu.is_contiguous(),
                "hmx_kernels: cu_seqlens must be a contiguous 1-D int64 CPU tensor [num_seqs + 1], got ",
                cu.scalar_type(), " ", shape_str(cu), " on ", cu.device());
    TORCH_CHECK(B == 1 && M == N, "hmx_kernels: packed sequences need query, key and value [1, total, d], got B = ",
                B, ", M = ", M, ", N = ", N);
    const int64_t* c = cu.data_ptr<int64_t>();
    const int64_t ns = cu.numel() - 1;
    TORCH_CHECK(c[0] == 0 && c[ns] == N, "hmx_kernels: cu_seqlens must start at 0 and end at the token count ", N);
    max_len = 0;
    blocks = 0;
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t len = c[s + 1] - c[s];
      TORCH_CHECK(len >= 0, "hmx_kernels: cu_seqlens must not decrease");
      max_len = std::max(max_len, len);
      blocks += chunk_size > 0 ? (len + chunk_size - 1) / chunk_size : (len > 0 ? 1 : 0);
    }
  } else if (chunk_size > 0) {
    blocks = (N + chunk_size - 1) / chunk_size;
  }
  TORCH_CHECK(chunk_size == 0 || M == N, "hmx_kernels: causal / chunked mixing needs as many queries as keys, got M = ",
              M, ", N = ", N);
  TORCH_CHECK(!(q.is_cuda() && chunk_size == 1 && left_context < 0),
              "hmx_kernels cuda: token-causal mixing (chunk_size 1, unbounded left context) is not implemented by the "
              "CUDA kernels (chunk-causal and packed mixing are; use backend='triton' or 'reference')");
  const int64_t slots = q.is_cuda() ? blocks : hmx::cpu::state_slots(N, chunk_size, left_context, blocks);
  TORCH_CHECK(num_blocks >= std::max<int64_t>(slots, 1), "hmx_kernels: num_blocks = ", num_blocks,
              " is smaller than the ", slots, " state slots these mixing blocks need");
  if (cu_seqlens) {
    TORCH_CHECK(pe_q.dim() == 2 && pe_q.size(0) >= max_len && pe_q.size(1) == d && pe_k.dim() == 2 &&
                    pe_k.size(0) >= max_len && pe_k.size(1) == d,
                "hmx_kernels: with packed sequences the PE tables need at least max_seqlen = ", max_len,
                " rows of d = ", d, ", got ", shape_str(pe_q), " and ", shape_str(pe_k));
  } else {
    check_shape("pe_q", pe_q, {M, d});
    check_shape("pe_k", pe_k, {N, d});
  }
  check_contiguous("pe_q", pe_q);
  check_contiguous("pe_k", pe_k);
  if (m_q) {
    check_same("m_q", *m_q, q, ctype);
    check_shape("m_q", *m_q, {B, M});
    check_contiguous("m_q", *m_q);
  }
  if (m_k) {
    check_same("m_k", *m_k, q, ctype);
    check_shape("m_k", *m_k, {B, N});
    check_contiguous("m_k", *m_k);
  }
  const at::Tensor* ws[4] = {&w1_fc1_w, &w1_fc2_w, &w2_fc1_w, &w2_fc2_w};
  const char* wn[4] = {"w1_fc1_weight", "w1_fc2_weight", "w2_fc1_weight", "w2_fc2_weight"};
  for (int i = 0; i < 4; ++i) {
    check_same(wn[i], *ws[i], q, dtype);
    check_contiguous(wn[i], *ws[i]);
    check_shape(wn[i], *ws[i], i % 2 == 0 ? std::vector<int64_t>{H, d_h, d_h} : std::vector<int64_t>{H, k_h, d_h});
  }
  const OptT* bs[4] = {&w1_fc1_b, &w1_fc2_b, &w2_fc1_b, &w2_fc2_b};
  const char* bn[4] = {"w1_fc1_bias", "w1_fc2_bias", "w2_fc1_bias", "w2_fc2_bias"};
  for (int i = 0; i < 4; ++i) {
    if (!*bs[i]) continue;
    check_same(bn[i], **bs[i], q, dtype);
    check_contiguous(bn[i], **bs[i]);
    check_shape(bn[i], **bs[i], i % 2 == 0 ? std::vector<int64_t>{H, d_h} : std::vector<int64_t>{H, k_h});
  }
  auto ptr = [](const OptT& t) -> const void* { return t ? t->data_ptr() : nullptr; };
  Problem pr;
  hmx::ProblemParams& pb = pr.pb;
  pb.B = B; pb.M = M; pb.N = N; pb.d = d; pb.H = H; pb.d_h = d_h; pb.k_h = k_h;
  pb.scale = scale;
  pb.allow_mma = g_allow_mma;
  pr.q = q; pr.k = k; pr.v = v;
  pb.q = q.data_ptr(); pb.k = k.data_ptr(); pb.v = v.data_ptr();
  pb.q_bstride = q.stride(0); pb.q_rstride = row_stride(q, d);
  pb.k_bstride = k.stride(0); pb.k_rstride = row_stride(k, d);
  pb.v_bstride = v.stride(0); pb.v_rstride = row_stride(v, d);
  pb.pe_q = pe_q.data_ptr(); pb.pe_k = pe_k.data_ptr();
  pb.m_q = ptr(m_q); pb.m_k = ptr(m_k);
  pb.g1 = {w1_fc1_w.data_ptr(), ptr(w1_fc1_b), w1_fc2_w.data_ptr(), ptr(w1_fc2_b)};
  pb.g2 = {w2_fc1_w.data_ptr(), ptr(w2_fc1_b), w2_fc2_w.data_ptr(), ptr(w2_fc2_b)};
  pb.chunk_size = chunk_size;
  pb.left_context = left_context;
  pb.cu_seqlens = cu_seqlens ? cu_seqlens->data_ptr<int64_t>() : nullptr;
  pb.num_seqs = cu_seqlens ? cu_seqlens->numel() - 1 : 0;
  pb.num_blocks = num_blocks;
  return pr;
}

// The piece table of blocked mixing (hmx_pieces.h) as an int32 tensor on `device`, with its counts.
struct PieceTensor {
  at::Tensor table;
  int64_t n_pieces = 0, nb = 0;
};

PieceTensor piece_tensor(int64_t N, int64_t chunk_size, const int64_t* cu, int64_t num_seqs, int64_t piece_len,
                         const at::Device& device) {
  TORCH_CHECK(piece_len >= 1 && N <= INT32_MAX, "hmx_kernels: piece table needs piece_len >= 1 and N < 2^31");
  const hmx::PieceTable pt = hmx::build_piece_table(N, chunk_size, cu, num_seqs, piece_len);
  at::Tensor host = at::from_blob(const_cast<int32_t*>(pt.data.data()), {(int64_t)pt.data.size()},
                                  at::TensorOptions().dtype(at::kInt))
                        .clone();
  return {host.to(device), pt.n_pieces, pt.nb};
}

std::tuple<at::Tensor, int64_t, int64_t> piece_table_for_tests(int64_t N, int64_t chunk_size, const OptT& cu_seqlens,
                                                                int64_t piece_len) {
  const int64_t* cu = nullptr;
  int64_t ns = 0;
  if (cu_seqlens) {
    TORCH_CHECK(cu_seqlens->device().is_cpu() && cu_seqlens->scalar_type() == at::kLong && cu_seqlens->dim() == 1 &&
                    cu_seqlens->is_contiguous() && cu_seqlens->numel() >= 2,
                "hmx_kernels: cu_seqlens must be a contiguous 1-D int64 CPU tensor");
    cu = cu_seqlens->data_ptr<int64_t>();
    ns = cu_seqlens->numel() - 1;
  }
  PieceTensor t = piece_tensor(N, chunk_size, cu, ns, piece_len, at::Device(at::kCPU));
  return {t.table, t.n_pieces, t.nb};
}

// The CPU twin's tile products: the Fortran BLAS sgemm_ / dgemm_ that torch's CPU library exports
// when it is built with MKL or OpenBLAS (LP64: int sizes), called directly (no tensor overhead).
// Weak references: with a torch that lacks them they are null and the twin uses its own loops.
// Called inside the twin's OpenMP region, where the BLAS runs single-threaded (no nesting).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

bool g_use_blas = true;  // tests switch it off to cover the loop fallback

template <typename T>
void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const int im = (int)m, in = (int)n, ik = (int)k, ilda = (int)lda, ildb = (int)ldb, ildc = (int)ldc;
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  else
    dgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

// The gemm for the twin, or nullptr (loops) without a BLAS or when sizes exceed int range.
template <typename T>
hmx::cpu::GemmFn<T> cpu_gemm(const hmx::ProblemParams& pb) {
  const bool have = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  const int64_t big = std::max({pb.d, pb.k_h, pb.q_rstride, pb.k_rstride, pb.v_rstride});
  if (!g_use_blas || !have || big > INT32_MAX) return nullptr;
  return &blas_gemm<T>;
}

bool set_cpu_blas(bool on) {
  g_use_blas = on;
  return sgemm_ != nullptr && dgemm_ != nullptr;
}

#ifdef HMX_WITH_CUDA
hmx::cuda::DType cuda_dtype(at::ScalarType t) {
  if (t == at::kHalf) return hmx::cuda::DType::kF16;
  if (t == at::kBFloat16) return hmx::cuda::DType::kBF16;
  return hmx::cuda::DType::kF32;
}

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "hmx_kernels cuda: ", what, " failed: ", hmx::cuda::error_string(err));
}

// The kernels' BlockPlan for pb (plain: the default, no table); `pieces` keeps the table alive
hmx::cuda::BlockPlan cuda_block_plan(const hmx::ProblemParams& pb, hmx::cuda::DType dt, const at::Device& device,
                                     PieceTensor* pieces) {
  hmx::cuda::BlockPlan plan;
  if (!pb.blocked()) return plan;
  *pieces = piece_tensor(pb.N, pb.chunk_size, pb.cu_seqlens, pb.num_seqs, hmx::cuda::piece_tokens(pb, dt), device);
  plan.table = pieces->table.data_ptr<int32_t>();
  plan.n_pieces = pieces->n_pieces;
  plan.nb = pieces->nb;
  plan.width = pb.left_context < 0 ? 0 : pb.left_context + 1;
  return plan;
}

// fp16 / bf16 with tensor cores switched off (set_options allow_mma = false): the fp32 kernels
// (SIMT FMA) run on fp32 copies and the results are cast back to the input type
bool cuda_fma_fallback(const at::Tensor& q) {
  return !g_allow_mma && (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
}
at::Tensor up(const at::Tensor& t) { return t.to(at::kFloat); }
OptT up(const OptT& t) { return t ? OptT(t->to(at::kFloat)) : OptT(); }
#endif

// Sequence parallelism: the Reducer calls the Python callable `reduce` (e.g. a torch.distributed
// all_reduce over the group) with a tensor viewing the sums to add up in place: the twin's
// (compute type, CPU) or the CUDA kernels' (fp32, on q's device; the kernels before it are queued
// on the current stream, which a torch.distributed collective orders itself after). The host code
// calls it between its passes on this thread, which holds the GIL (pybind11 calls keep it).
struct PyReducer {
  py::object fn;
  at::TensorOptions options;  // dtype and device of the sums
  static void call(void* ctx, void* data, int64_t count) {
    auto* self = static_cast<PyReducer*>(ctx);
    at::Tensor view = at::from_blob(data, {count}, self->options);
    self->fn(view);
  }
  hmx::Reducer reducer() { return fn.is_none() ? hmx::Reducer() : hmx::Reducer{&PyReducer::call, this}; }
};

// values per call of a Reducer (both directions; the twin: per block, one block without blocks)
int64_t reduce_count(int64_t B, int64_t H, int64_t d_h, bool cuda) {
  return cuda ? hmx::cuda_reduce_count(B, H, d_h) : B * H * (d_h * d_h + d_h);
}

// Where a carried state is taken (causal / chunk-causal mixing, not packed sequences; CUDA: not
// token-causal, which make_problem refuses there): n_init 0: one state in every block's window
// (unbounded left context; the CPU twin's token scan starts from it); n_init = the block count:
// one term per block (blocked mixing, any window).
bool carried_state_ok(const at::Tensor& q, const hmx::ProblemParams& pb, int64_t n_init) {
  if (pb.chunk_size < 1 || pb.cu_seqlens != nullptr) return false;
  if (n_init == 0) return pb.left_context < 0;
  return (q.is_cuda() || !hmx::cpu::token_scan(pb)) && n_init == pb.num_blocks;
}

// The carried-state terms of a p_init tensor: [B, H, d_h, k_h] -> 0 (one state), [B, H, n, d_h, k_h] -> n.
int64_t init_terms(const OptT& p_init) { return p_init && p_init->dim() == 5 ? p_init->size(2) : 0; }

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& pe_q, const at::Tensor& pe_k, const OptT& m_q, const OptT& m_k,
                                const at::Tensor& w1_fc1_w, const OptT& w1_fc1_b, const at::Tensor& w1_fc2_w,
                                const OptT& w1_fc2_b, const at::Tensor& w2_fc1_w, const OptT& w2_fc1_b,
                                const at::Tensor& w2_fc2_w, const OptT& w2_fc2_b, double scale, int64_t chunk_size,
                                int64_t left_context, const OptT& cu_seqlens, int64_t num_blocks,
                                const py::object& reduce, const OptT& p_init) {
  Problem pr = make_problem(q, k, v, pe_q, pe_k, m_q, m_k, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w,
                            w2_fc1_b, w2_fc2_w, w2_fc2_b, scale, chunk_size, left_context, cu_seqlens, num_blocks);
  TORCH_CHECK(reduce.is_none() || !pr.pb.blocked(),
              "hmx_kernels: sequence parallelism (reduce) is implemented for non-causal, unpacked mixing");
  const auto& pb = pr.pb;
  const int64_t n_init = init_terms(p_init);
  if (p_init) {
    TORCH_CHECK(carried_state_ok(q, pb, n_init) && reduce.is_none(),
                "hmx_kernels: a carried state (p_init) is implemented for causal (CPU twin) and chunk-causal mixing "
                "without cu_seqlens: [B, H, d_h, k_h] with unbounded left context, [B, H, num_blocks, d_h, k_h] (one "
                "term per block) for chunks");
    check_same("p_init", *p_init, q, compute_type(q));
    check_shape("p_init", *p_init, n_init == 0 ? std::vector<int64_t>{pb.B, pb.H, pb.d_h, pb.k_h}
                                              : std::vector<int64_t>{pb.B, pb.H, n_init, pb.d_h, pb.k_h});
    check_contiguous("p_init", *p_init);
  }
#ifdef HMX_WITH_CUDA
  if (q.is_cuda() && cuda_fma_fallback(q)) {
    std::vector<at::Tensor> r = forward(up(q), up(k), up(v), pe_q, pe_k, m_q, m_k, up(w1_fc1_w), up(w1_fc1_b),
                                        up(w1_fc2_w), up(w1_fc2_b), up(w2_fc1_w), up(w2_fc1_b), up(w2_fc2_w),
                                        up(w2_fc2_b), scale, chunk_size, left_context, cu_seqlens, num_blocks,
                                        reduce, p_init);
    return r;  // y in fp32, the compute type
  }
#endif
  // y in the compute type (CUDA: fp32 for every input type, so fp16's range never clips Y)
  at::Tensor y = new_buffer({pb.B, pb.M, pb.d}, q.options().dtype(compute_type(q)));
  at::Tensor p = new_buffer({pb.B, pb.H, pb.num_blocks * pb.k_h, pb.d_h}, q.options().dtype(compute_type(q)));
  hmx::ForwardParams fp{pb, y.data_ptr(), p.data_ptr()};
  // the CUDA kernels take the carried state in P's layout [.., k_h, d_h] (hmx_params.h)
  const at::Tensor p_init_k = !p_init ? at::Tensor() : q.is_cuda() ? p_init->transpose(-1, -2).contiguous() : *p_init;
  fp.p_init = p_init ? p_init_k.data_ptr() : nullptr;
  fp.n_init = n_init;
  if (q.is_cuda()) {
#ifdef HMX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const hmx::cuda::DType dt = cuda_dtype(q.scalar_type());
    const char* why = hmx::cuda::not_supported(pb, dt);
    TORCH_CHECK(why == nullptr, "hmx_kernels cuda: ", why ? why : "");
    PieceTensor pieces;
    const hmx::cuda::BlockPlan plan = cuda_block_plan(pb, dt, q.device(), &pieces);
    PyReducer red{reduce, q.options().dtype(at::kFloat)};
    at::Tensor ws = new_buffer({(int64_t)hmx::cuda::forward_workspace_bytes(pb, plan, dt, !reduce.is_none())},
                               q.options().dtype(at::kByte));
    check_cuda(hmx::cuda::forward(fp, plan, dt, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream(),
                                  red.reducer()),
               "forward");
#else
    TORCH_CHECK(false, "hmx_kernels: this build of the extension has no CUDA kernels");
#endif
  } else {
    const int nt = at::get_num_threads();
    PyReducer red{reduce, at::TensorOptions().dtype(q.scalar_type())};
    if (q.scalar_type() == at::kFloat) hmx::cpu::forward_f32(fp, cpu_gemm<float>(pb), nt, red.reducer());
    else hmx::cpu::forward_f64(fp, cpu_gemm<double>(pb), nt, red.reducer());
  }
  return {y, p};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& pe_q, const at::Tensor& pe_k,
                                 const OptT& m_q, const OptT& m_k, const at::Tensor& w1_fc1_w,
                                 const OptT& w1_fc1_b, const at::Tensor& w1_fc2_w, const OptT& w1_fc2_b,
                                 const at::Tensor& w2_fc1_w, const OptT& w2_fc1_b, const at::Tensor& w2_fc2_w,
                                 const OptT& w2_fc2_b, const at::Tensor& p, double scale, int64_t chunk_size,
                                 int64_t left_context, const OptT& cu_seqlens, int64_t num_blocks,
                                const py::object& reduce, const OptT& dp_extra, bool want_dp_init,
                                int64_t n_init, const OptT& p_init) {
  Problem pr = make_problem(q, k, v, pe_q, pe_k, m_q, m_k, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w,
                            w2_fc1_b, w2_fc2_w, w2_fc2_b, scale, chunk_size, left_context, cu_seqlens, num_blocks);
  TORCH_CHECK(reduce.is_none() || !pr.pb.blocked(),
              "hmx_kernels: sequence parallelism (reduce) is implemented for non-causal, unpacked mixing");
  const auto& pb = pr.pb;
  const auto ctype = compute_type(q);
  check_same("grad_out", dy, q, ctype);  // the compute type (CUDA: fp32, fp16's range)
  check_shape("grad_out", dy, {pb.B, pb.M, pb.d});
  check_contiguous("grad_out", dy);
  check_same("p", p, q, ctype);
  check_shape("p", p, {pb.B, pb.H, pb.num_blocks * pb.k_h, pb.d_h});
  check_contiguous("p", p);
  if (dp_extra || want_dp_init) {
    const bool ok = want_dp_init ? carried_state_ok(q, pb, n_init) : pb.chunk_size >= 1 && pb.cu_seqlens == nullptr;
    TORCH_CHECK(ok && reduce.is_none(),
                "hmx_kernels: the gradient of the state (dp_extra, dp_init) is implemented for causal (CPU twin) and "
                "chunk-causal mixing without cu_seqlens (dp_init: one state with unbounded left context, or one "
                "term per block)");
  }
  if (dp_extra) {
    check_same("dp_extra", *dp_extra, q, ctype);
    check_shape("dp_extra", *dp_extra, {pb.B, pb.H, pb.num_blocks * pb.k_h, pb.d_h});
    check_contiguous("dp_extra", *dp_extra);
  }
  // one carried term per block: p holds the blocks' own states, P is formed again from p and p_init
  TORCH_CHECK(n_init == 0 || (p_init && carried_state_ok(q, pb, n_init)),
              "hmx_kernels: n_init > 0 (one carried term per block) needs the forward's p_init");
  if (n_init > 0) {
    check_same("p_init", *p_init, q, ctype);
    check_shape("p_init", *p_init, {pb.B, pb.H, n_init, pb.d_h, pb.k_h});
    check_contiguous("p_init", *p_init);
  }
#ifdef HMX_WITH_CUDA
  if (q.is_cuda() && cuda_fma_fallback(q)) {
    std::vector<at::Tensor> r =
        backward(up(dy), up(q), up(k), up(v), pe_q, pe_k, m_q, m_k, up(w1_fc1_w), up(w1_fc1_b), up(w1_fc2_w),
                 up(w1_fc2_b), up(w2_fc1_w), up(w2_fc1_b), up(w2_fc2_w), up(w2_fc2_b), p, scale, chunk_size,
                 left_context, cu_seqlens, num_blocks, reduce, dp_extra, want_dp_init, n_init, p_init);
    for (int i = 0; i < 3; ++i) r[i] = r[i].to(q.scalar_type());
    return r;
  }
#endif

  at::Tensor dq = new_buffer({pb.B, pb.M, pb.d}, q.options());
  at::Tensor dk = new_buffer({pb.B, pb.N, pb.d}, q.options());
  at::Tensor dv = new_buffer({pb.B, pb.N, pb.d}, q.options());
  auto gopt = q.options().dtype(ctype);
  auto make = [&](std::initializer_list<int64_t> shape, bool present) {
    return present ? new_buffer(shape, gopt) : at::Tensor();
  };
  std::vector<at::Tensor> g = {
      make({pb.H, pb.d_h, pb.d_h}, true), make({pb.H, pb.d_h}, w1_fc1_b.has_value()),
      make({pb.H, pb.k_h, pb.d_h}, true), make({pb.H, pb.k_h}, w1_fc2_b.has_value()),
      make({pb.H, pb.d_h, pb.d_h}, true), make({pb.H, pb.d_h}, w2_fc1_b.has_value()),
      make({pb.H, pb.k_h, pb.d_h}, true), make({pb.H, pb.k_h}, w2_fc2_b.has_value())};
  auto gp = [](const at::Tensor& t) -> void* { return t.defined() ? t.data_ptr() : nullptr; };
  hmx::BackwardParams bp;
  bp.pb = pb;
  bp.p = p.data_ptr();
  bp.dy = dy.data_ptr();
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  bp.dg1 = {gp(g[0]), gp(g[1]), gp(g[2]), gp(g[3])};
  bp.dg2 = {gp(g[4]), gp(g[5]), gp(g[6]), gp(g[7])};
  // CUDA: the kernels write every block's dP [B, H, num_blocks, k_h, d_h]; dp_init is formed below
  at::Tensor dp_blocks = want_dp_init && q.is_cuda() ? new_buffer({pb.B, pb.H, pb.num_blocks, pb.k_h, pb.d_h}, gopt)
                                                     : at::Tensor();
  at::Tensor dp_init = !want_dp_init || q.is_cuda() ? at::Tensor()
                       : n_init == 0               ? new_buffer({pb.B, pb.H, pb.d_h, pb.k_h}, gopt)
                                                   : new_buffer({pb.B, pb.H, n_init, pb.d_h, pb.k_h}, gopt);
  bp.n_init = n_init;
  bp.dp_extra = dp_extra ? dp_extra->data_ptr() : nullptr;
  bp.dp_init = q.is_cuda() ? gp(dp_blocks) : gp(dp_init);
  bp.p_init = n_init > 0 && !q.is_cuda() ? p_init->data_ptr() : nullptr;  // CPU twin: P_j formed again from it
  if (q.is_cuda()) {
#ifdef HMX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    const hmx::cuda::DType dt = cuda_dtype(q.scalar_type());
    const char* why = hmx::cuda::not_supported(pb, dt);
    TORCH_CHECK(why == nullptr, "hmx_kernels cuda: ", why ? why : "");
    PieceTensor pieces;
    const hmx::cuda::BlockPlan plan = cuda_block_plan(pb, dt, q.device(), &pieces);
    PyReducer red{reduce, q.options().dtype(at::kFloat)};
    at::Tensor ws = new_buffer({(int64_t)hmx::cuda::backward_workspace_bytes(pb, plan, dt, !reduce.is_none())},
                               q.options().dtype(at::kByte));
    check_cuda(hmx::cuda::backward(bp, plan, dt, ws.data_ptr(), c10::cuda::getCurrentCUDAStream().stream(),
                                   red.reducer()),
               "backward");
    if (want_dp_init)  // P_0's gradient: the sum of every block's dP (one state) or each block's, as P^T
      dp_init = (n_init == 0 ? dp_blocks.sum(2) : dp_blocks).transpose(-1, -2).contiguous();
#else
    TORCH_CHECK(false, "hmx_kernels: this build of the extension has no CUDA kernels");
#endif
  } else {
    const int nt = at::get_num_threads();
    PyReducer red{reduce, at::TensorOptions().dtype(q.scalar_type())};
    if (q.scalar_type() == at::kFloat) hmx::cpu::backward_f32(bp, cpu_gemm<float>(pb), nt, red.reducer());
    else hmx::cpu::backward_f64(bp, cpu_gemm<double>(pb), nt, red.reducer());
  }
  std::vector<at::Tensor> out = {dq, dk, dv};
  out.insert(out.end(), g.begin(), g.end());
  out.push_back(dp_init);  // undefined (None) unless want_dp_init
  return out;
}

bool has_cuda() {
#ifdef HMX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hmx_kernels fused HyperMixing passes (CPU twin, and CUDA kernels when built with them)";
  // the tensor arguments by position; the mixing-block arguments default to non-causal mixing
  m.def("forward", &forward, "fused HyperMixing forward: (y before LayerNorm, P)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("pe_q"), py::arg("pe_k"), py::arg("m_q"), py::arg("m_k"), py::arg("w1_fc1_w"),
        py::arg("w1_fc1_b"), py::arg("w1_fc2_w"), py::arg("w1_fc2_b"), py::arg("w2_fc1_w"), py::arg("w2_fc1_b"),
        py::arg("w2_fc2_w"), py::arg("w2_fc2_b"), py::arg("scale"), py::arg("chunk_size") = 0,
        py::arg("left_context") = -1, py::arg("cu_seqlens") = py::none(), py::arg("num_blocks") = 1,
        py::arg("reduce") = py::none(), py::arg("p_init") = py::none());
  m.def("backward", &backward, "fused HyperMixing backward: [dq, dk, dv, 4 generator-1 grads, 4 generator-2 grads]",
        py::arg("dy"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pe_q"), py::arg("pe_k"), py::arg("m_q"),
        py::arg("m_k"), py::arg("w1_fc1_w"), py::arg("w1_fc1_b"), py::arg("w1_fc2_w"), py::arg("w1_fc2_b"),
        py::arg("w2_fc1_w"), py::arg("w2_fc1_b"), py::arg("w2_fc2_w"), py::arg("w2_fc2_b"), py::arg("p"),
        py::arg("scale"), py::arg("chunk_size") = 0, py::arg("left_context") = -1, py::arg("cu_seqlens") = py::none(),
        py::arg("num_blocks") = 1, py::arg("reduce") = py::none(), py::arg("dp_extra") = py::none(),
        py::arg("want_dp_init") = false, py::arg("n_init") = 0, py::arg("p_init") = py::none());
  m.def("_set_cpu_blas", &set_cpu_blas,
        "use the BLAS gemm for the CPU twin's tile products (default) or its plain loops; returns whether a BLAS "
        "is available");
  m.def("set_options", &set_options, "set_options(poison, allow_mma): NaN-fill outputs/workspaces; tensor cores");
  m.def("_piece_table", &piece_table_for_tests,
        "the CUDA kernels' piece table of blocked mixing (hmx_pieces.h) on the CPU: (int32 table, n_pieces, nb)",
        py::arg("N"), py::arg("chunk_size"), py::arg("cu_seqlens"), py::arg("piece_len"));
  m.def("has_cuda", &has_cuda, "whether this build contains the CUDA kernels");
  m.def("release_buffers", &hmx::cpu::release_buffers,
        "free the CPU twin's pooled working buffers of the calling thread; returns the bytes they held");
  m.def("pooled_bytes", &hmx::cpu::pooled_bytes, "bytes the CPU twin's buffer pool of the calling thread holds");
  m.def("reduce_count", &reduce_count, "values per call of the sequence-parallel reduce callback",
        py::arg("B"), py::arg("H"), py::arg("d_h"), py::arg("cuda"));
  m.attr("CPU_TILE") = hmx::cpu::kCpuTile;  // the CPU twin's token tile (token-causal checkpoints)
}
