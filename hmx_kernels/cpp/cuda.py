"""Backend "cuda": the CUDA kernels of csrc/ on CUDA tensors (hmx_kernels/cpp/ops.py runs them),
float32 / float16 / bfloat16 with fp32 accumulation, where torch has CUDA (and nvcc exists, unless
a finished build is found). Its limits and tolerances, with their derivation, are declared here.

Mixing blocks: full, chunk-causal (any left context) and packed sequences, alone or together
(csrc/README.md "Mixing blocks on CUDA"), and a carried state in chunk-causal mixing (streaming:
cuda_stream_forward, the CPU twin's logic on the CUDA op). Sequence parallelism in plain mixing
(with it, position offsets): the kernels' key sums S, sv (forward) and query sums T, sdy (backward)
are summed per (b, h) and all-reduced over the group between the passes (hmx_cuda.h), as the CPU
twin does. Not yet: token-causal mixing (chunk_size 1 with every earlier token); the dispatcher
declines it with a reason."""
from __future__ import annotations

from typing import List

import torch

from ..config import SETTINGS
from ..blocks import CHUNK_CAUSAL, FULL, PACKED
from ..dispatch import Backend, Capabilities, Tolerance, register_backend
from ..problem import HyperMixingProblem
from .ops import HALF_DTYPES, _cuda_carries, cpp_forward, cuda_stream_forward, extension_reasons


# hmx::cuda::not_supported gives the same verdict on the device.
CUDA_WIDE_FP32_SMEM_BYTES = 170112


def _cuda_extra_reasons(p: HyperMixingProblem) -> List[str]:
    if p.device.type != "cuda" or p.d_h <= 64:
        return []
    if p.dtype in HALF_DTYPES and SETTINGS.allow_mma:
        return []
    props = torch.cuda.get_device_properties(p.device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # older torch: sm_90 allows 227 KB, sm_80 163 KB, others less
        optin = 232448 if props.major >= 9 else 166912 if (props.major, props.minor) == (8, 0) else 101376
    if optin >= CUDA_WIDE_FP32_SMEM_BYTES:
        return []
    return [f"d_h = {p.d_h} > 64 with fp32 kernels (float32, or tensor cores off) needs "
            f"{CUDA_WIDE_FP32_SMEM_BYTES} bytes of shared memory per block, this GPU allows {optin} "
            "(an sm_90-class GPU has enough; fp16 / bf16 with tensor cores fit)"]



register_backend(
    Backend(
        name="cuda",
        description="CUDA C++ fused kernels (reassociated form, tiles in shared memory, tensor cores for "
                    "float16/bfloat16, fp32 accumulation); float32/float16/bfloat16",
        forward=cpp_forward,
        stream_forward=cuda_stream_forward,
        capabilities=Capabilities(
            devices=("cuda",),
            dtypes=(torch.float32, torch.float16, torch.bfloat16),
            max_d_h=128,
            blocks=frozenset({FULL, CHUNK_CAUSAL, PACKED}),
            sequence_parallel=True,  # plain mixing; a mode with a group is refused before any collective
            carried_state=_cuda_carries,
            available=extension_reasons,
        ),
        extra_reasons=_cuda_extra_reasons,
        tolerances={
            ("cuda", torch.float32): Tolerance(
                1e-4, 1e-4,
                "plain fp32 FMA in the kernels (no TF32), reference with TF32 off (tests/conftest.py); "
                "the kernels sum in the reassociated order (fc2 applied to token sums, "
                "docs/HYPERMIXING.md), so summation orders differ, over up to ~5000 tokens. Not yet "
                "measured on a GPU",
            ),
            ("cuda", torch.float16): Tolerance(
                2e-2, 5e-2,
                "inputs and outputs rounded to 11 significant bits; both accumulate in fp32, but the "
                "reference rounds its intermediates differently and the LayerNorm backward amplifies "
                "the rounding of Y's operands (Y itself is written in fp32). On sm_80+ the token "
                "kernels' tensor-core operands are fp16 (z, GELU(U), m dY, dU and the d_h x d_h "
                "matrices C, R, each <= 2^-11 relative; C, R, m dY and dU scaled by powers of two to "
                "stay in fp16's range); the finalize kernels split their fp32 operands into bf16 hi + "
                "lo (~2^-16). Emulating these roundings on the CPU (tests/test_cuda_math.py: d_h 18, "
                "k_h 72, 450 keys, through LayerNorm) used 0.02 (output) and 0.02 (gradients) of these "
                "tolerances; not yet measured on a GPU. The FMA path (tensor cores off: fp32 kernels on upcast copies) "
                "has the same tolerances",
            ),
            ("cuda", torch.bfloat16): Tolerance(
                5e-2, 1e-1,
                "as fp16 with 8 significant bits (token-kernel tensor-core operands <= 2^-8 relative "
                "per element; finalize operands as bf16 hi + lo); the emulated roundings used 0.07 "
                "(output) and 0.07 (gradients) of these tolerances",
            ),
        },
    )
)
