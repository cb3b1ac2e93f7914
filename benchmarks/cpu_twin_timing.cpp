// The CPU twin's fused forward+backward alone (no Python, no LayerNorm), timed as thread CPU time:
// for comparing two versions of csrc/ side by side on a shared machine (build one binary per
// version, run them in turns). sb256's shape: d 256, H 8 (d_h 32), k_h 128, B 1, fp32, one thread;
// random tokens and weights; the gemm is torch's CPU BLAS (sgemm_ from libtorch_cpu), as in the
// extension.
//   TL=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   g++ -O3 -march=native -fopenmp -fno-trapping-math -std=c++17 -I. benchmarks/cpu_twin_timing.cpp -o /tmp/twin -L$TL -ltorch_cpu -lc10 -Wl,-rpath,$TL
// (-DHMX_SRC='"path/to/other/csrc/hmx_cpu.cpp"' builds another version)
//   OMP_NUM_THREADS=1 /tmp/twin N chunk_size left_context repeats   (chunk 0: non-causal, 1 -1: token-causal)
// Prints the median forward and backward ms.
#ifndef HMX_SRC
#define HMX_SRC "csrc/hmx_cpu.cpp"
#endif
#include HMX_SRC
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <random>
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
static void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}
static double cpu_now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char** argv) {
  const int64_t N = atoi(argv[1]), C = atoi(argv[2]), Lc = atoi(argv[3]), reps = atoi(argv[4]);
  const int64_t H = 8, dh = 32, kh = 128, d = H * dh, B = 1;
  std::mt19937 rng(1); std::normal_distribution<float> nd(0.f, 1.f);
  auto R = [&](int64_t n, float s) { std::vector<float> v(n); for (auto& x : v) x = s * nd(rng); return v; };
  auto x = R(N * d, 1.f), pe = R(N * d, 0.1f);
  auto f11 = R(H * dh * dh, 0.18f), b11 = R(H * dh, 0.1f), f21 = R(H * kh * dh, 0.18f), b21 = R(H * kh, 0.1f);
  auto f12 = R(H * dh * dh, 0.18f), b12 = R(H * dh, 0.1f), f22 = R(H * kh * dh, 0.18f), b22 = R(H * kh, 0.1f);
  hmx::ProblemParams pb{};
  pb.B = B; pb.M = N; pb.N = N; pb.d = d; pb.H = H; pb.d_h = dh; pb.k_h = kh; pb.scale = 1.0;
  pb.q = pb.k = pb.v = x.data();
  pb.q_bstride = pb.k_bstride = pb.v_bstride = N * d; pb.q_rstride = pb.k_rstride = pb.v_rstride = d;
  pb.pe_q = pb.pe_k = pe.data();
  pb.g1 = {f11.data(), b11.data(), f21.data(), b21.data()};
  pb.g2 = {f12.data(), b12.data(), f22.data(), b22.data()};
  pb.chunk_size = C; pb.left_context = Lc;
  const int64_t blocks = C > 0 ? (N + C - 1) / C : 1;
  pb.num_blocks = std::max<int64_t>(1, hmx::cpu::state_slots(N, C, Lc, blocks));
  std::vector<float> y(N * d), p(B * H * pb.num_blocks * kh * dh), dy = R(N * d, 1.f), dq(N * d), dk(N * d), dv(N * d);
  std::vector<float> g1a(H * dh * dh), g1b(H * dh), g1c(H * kh * dh), g1d(H * kh), g2a(H * dh * dh), g2b(H * dh), g2c(H * kh * dh), g2d(H * kh);
  hmx::ForwardParams fp{pb, y.data(), p.data()};
  hmx::BackwardParams bp{pb, p.data(), dy.data(), dq.data(), dk.data(), dv.data(),
                         {g1a.data(), g1b.data(), g1c.data(), g1d.data()}, {g2a.data(), g2b.data(), g2c.data(), g2d.data()}};
  std::vector<double> tf, tb;
  for (int64_t r = 0; r < reps; ++r) {
    double t0 = cpu_now();
    hmx::cpu::forward_f32(fp, gemm, 1);
    double t1 = cpu_now();
    hmx::cpu::backward_f32(bp, gemm, 1);
    double t2 = cpu_now();
    tf.push_back(t1 - t0); tb.push_back(t2 - t1);
  }
  std::sort(tf.begin(), tf.end()); std::sort(tb.begin(), tb.end());
  printf("N %ld C %ld L %ld: fwd %.1f ms bwd %.1f ms total %.1f ms\n", (long)N, (long)C, (long)Lc, tf[reps / 2] * 1e3, tb[reps / 2] * 1e3, (tf[reps / 2] + tb[reps / 2]) * 1e3);
}
