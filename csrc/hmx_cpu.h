// Entry points of the CPU twin (hmx_cpu.cpp): the fused forward and backward passes for fp32 and
// fp64, parallel over (batch, head, token chunk) with `nthreads` OpenMP threads. Pointers and
// layouts as described in hmx_params.h (every pointer is the compute type).
#pragma once
#include "hmx_params.h"

namespace hmx {
namespace cpu {
void forward_f32(const ForwardParams& p, int nthreads);
void forward_f64(const ForwardParams& p, int nthreads);
void backward_f32(const BackwardParams& p, int nthreads);
void backward_f64(const BackwardParams& p, int nthreads);
}  // namespace cpu
}  // namespace hmx
