// The CPU twin's GELU loops alone, fp32, one thread: ns per element of `gelu` and of `gelu_both`
// (GELU and GELU' from one evaluation) over a [k_h, d_h] = [128, 32] array that stays in L1, as
// thread CPU time. The token-causal scan evaluates one of each per state entry, token and head
// (csrc/hmx_cpu_scan.h), so these rates give its floor (benchmarks/README.md, "Causal modes side by side").
//   g++ -O3 -march=native -fopenmp -fno-trapping-math -std=c++17 -Icsrc benchmarks/cpu_gelu_rate.cpp -o /tmp/gelu_rate
//   /tmp/gelu_rate
#include "../csrc/hmx_cpu.cpp"

#include <cstdio>
#include <ctime>

static double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main() {
  using namespace hmx::cpu;
  const int n = 128 * 32, reps = 100000;
  std::vector<float> x(n), a(n), b(n);
  for (int i = 0; i < n; ++i) x[i] = (i % 97) * 0.07f - 3.0f;
  double best_g = 1e9, best_gb = 1e9;
  for (int trial = 0; trial < 5; ++trial) {
    const double t0 = thread_seconds();
    for (int r = 0; r < reps; ++r) {
      float* __restrict__ pa = a.data();
      const float* __restrict__ px = x.data();
#pragma omp simd
      for (int i = 0; i < n; ++i) pa[i] = gelu(px[i]);
      asm volatile("" ::: "memory");
    }
    const double t1 = thread_seconds();
    for (int r = 0; r < reps; ++r) {
      float* __restrict__ pa = a.data();
      float* __restrict__ pb = b.data();
      const float* __restrict__ px = x.data();
#pragma omp simd
      for (int i = 0; i < n; ++i) gelu_both(px[i], &pa[i], &pb[i]);
      asm volatile("" ::: "memory");
    }
    const double t2 = thread_seconds();
    best_g = std::min(best_g, (t1 - t0) / (double(reps) * n) * 1e9);
    best_gb = std::min(best_gb, (t2 - t1) / (double(reps) * n) * 1e9);
  }
  std::printf("gelu %.3f ns/element, gelu_both %.3f ns/element (fastest of 5 trials)\n", best_g, best_gb);
  return 0;
}
