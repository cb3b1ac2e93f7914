// Host entry points of the CUDA kernels (hmx_cuda_forward.cu, hmx_cuda_backward.cu).
// No torch headers: pointers, sizes and strides come in the structs of hmx_params.h, scratch
// memory in a caller-allocated workspace of *_workspace_bytes() bytes, work goes on `stream`.
// Return values are cudaError_t codes (0 = success).
//
// fp16 / bf16 run on tensor cores (sm_80+ code); the binding runs them through the fp32 kernels on
// upcast copies when tensor cores are switched off (HMX_KERNELS_CUDA_NO_MMA=1), so the `dtype`
// below is the one the kernels compute in. Sizes depend on the dtype (token tile) and on the
// current device (its SM count sets the number of token chunks), so pass the same dtype to the
// workspace functions as to forward / backward, on the same device.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "hmx_params.h"

namespace hmx {
namespace cuda {

enum class DType { kF32, kF16, kBF16 };

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kMaxHeadDim = 128;  // d_h is padded to a block of 32, 64 or 128

// nullptr when the kernels can run this problem on the current device, else the reason.
const char* not_supported(const ProblemParams& pb, DType dtype);
size_t forward_workspace_bytes(const ProblemParams& pb, DType dtype);
size_t backward_workspace_bytes(const ProblemParams& pb, DType dtype);
int forward(const ForwardParams& fp, DType dtype, void* workspace, cudaStream_t stream);
int backward(const BackwardParams& bp, DType dtype, void* workspace, cudaStream_t stream);
const char* error_string(int err);

}  // namespace cuda
}  // namespace hmx
