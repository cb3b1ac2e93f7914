// Host entry points of the CUDA kernels (hmx_cuda_forward.cu, hmx_cuda_backward.cu).
// No torch headers: pointers, sizes and strides come in the structs of hmx_params.h, scratch
// memory in a caller-allocated workspace of *_workspace_bytes() bytes, work goes on `stream`.
// Return values are cudaError_t codes (0 = success).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "hmx_params.h"

namespace hmx {
namespace cuda {

enum class DType { kF32, kF16, kBF16 };

// Token tile of the CUDA kernels (smaller than the CPU twin's, to fit shared memory).
constexpr int64_t kCudaTile = 32;
constexpr int kThreads = 256;

// nullptr when the kernels can run this problem on the current device, else the reason.
const char* not_supported(const ProblemParams& pb);
size_t forward_workspace_bytes(const ProblemParams& pb);
size_t backward_workspace_bytes(const ProblemParams& pb);
int forward(const ForwardParams& fp, DType dtype, void* workspace, cudaStream_t stream);
int backward(const BackwardParams& bp, DType dtype, void* workspace, cudaStream_t stream);
const char* error_string(int err);

}  // namespace cuda
}  // namespace hmx
