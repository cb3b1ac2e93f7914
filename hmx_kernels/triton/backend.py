"""Registers the fused Triton kernels as the `triton` backend (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1). Importing this module is cheap: triton and the kernels are imported on the
first call (or support check) and then kept."""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import torch
from torch import Tensor

from ..config import SETTINGS
from ..dispatch import Backend, Capabilities, Tolerance, constant_result, register_backend
from ..validation import HyperMixingProblem

MAX_HEAD_DIM = 64  # d_h: one [BLOCK_D, BLOCK_D] fc1 block and [BLOCK_K, BLOCK_D] states per program
MAX_HYPERNET_PER_HEAD = 256  # k_h
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_AVAILABLE: Dict[str, Tuple[str, ...]] = {}
_function = None  # hmx_kernels.triton.function, once imported


def _import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "triton":  # not a dependency of `pip install hmx_kernels`: the `triton` extra
            return (f"triton is not installed: {sys.executable} -m pip install triton "
                    "(or the extra: pip install 'hmx_kernels[triton]')")
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a broken installation
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return ""


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 at import, and the kernels (if already created) were created under it."""
    config = sys.modules.get(__package__ + ".config")
    return SETTINGS.triton_interpret and (config is None or config.INTERPRETED_KERNELS)


@constant_result
def triton_available(device_type: str) -> Tuple[str, ...]:
    """() when the Triton kernels can run on `device_type` tensors here, else why not (memoised)."""
    reasons = _AVAILABLE.get(device_type)
    if reasons is None:
        if device_type == "cpu" and not _interpreting():
            reasons = ("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before triton is "
                       "imported; slow, for testing); use backend='cpu' or 'reference' for CPU tensors",)
        else:
            err = _import_error()
            reasons = (err,) if err else ()
        _AVAILABLE[device_type] = reasons
    return reasons


def triton_forward(p: HyperMixingProblem) -> Tensor:
    global _function
    if _function is None:
        from . import function

        _function = function
    return _function.triton_forward(p)


register_backend(
    Backend(
        name="triton",
        description="fused Triton kernels, linear time, O(B*H*k_h*d_h) state, fused backward; CUDA",
        forward=triton_forward,
        capabilities=Capabilities(
            devices=("cuda", "cpu"),
            dtypes=SUPPORTED_DTYPES,
            max_d_h=MAX_HEAD_DIM,
            max_k_h=MAX_HYPERNET_PER_HEAD,
            available=triton_available,
        ),
        tolerances={
            ("cpu", torch.float32): Tolerance(
                2e-5, 2e-5,
                "interpreter: both sides compute in fp32 (every tl.dot in IEEE fp32, no TF32); only "
                "the summation order differs: measured <= 7.6e-7 (output), 1.6e-6 (gradients)",
            ),
            ("cpu", torch.float16): Tolerance(
                4e-3, 4e-3,
                "interpreter: the same fp16 inputs on both sides, both computed in fp32 (tiles upcast "
                "before every dot); output and gradients are rounded to fp16 at the end (ulp ~1e-3 "
                "relative), which dominates: measured <= 4.6e-4 (output), 8.4e-4 (gradients)",
            ),
            ("cpu", torch.bfloat16): Tolerance(
                3e-2, 3e-2,
                "interpreter: as fp16, with bf16's 8-bit mantissa (ulp ~8e-3 relative) at the end: "
                "measured <= 1.6e-3 (output), 7.1e-3 (gradients)",
            ),
            ("cuda", torch.float32): Tolerance(
                1e-4, 1e-4,
                "GPU: both compute in fp32 (IEEE dots, no TF32; reference with TF32 off); summation "
                "order differs and the GPU's exp/erf are a few ulp off. Not yet measured on a GPU",
            ),
            ("cuda", torch.float16): Tolerance(
                4e-3, 4e-3,
                "GPU: as on the interpreter, fp32 arithmetic on the same fp16 inputs, rounded to fp16 "
                "(ulp ~1e-3 relative) at the end. Not yet measured on a GPU",
            ),
            ("cuda", torch.bfloat16): Tolerance(
                3e-2, 3e-2,
                "GPU: fp32 arithmetic on the same bf16 inputs, rounded to bf16 (ulp ~8e-3 relative) "
                "at the end. Not yet measured on a GPU",
            ),
        },
    )
)
