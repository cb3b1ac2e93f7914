"""Registers the fused Triton kernels as the `triton` backend (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1). Importing this module is cheap: triton and the kernels are imported on the
first call (or support check) and then kept."""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import torch
from torch import Tensor

from ..config import SETTINGS
from ..dispatch import Backend, Capabilities, constant_result, register_backend
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
    )
)
