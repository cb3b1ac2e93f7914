"""Registers the fused Triton kernels as the `triton` backend (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1). Importing this module is cheap: triton is imported only when a call runs
or when support is checked."""
from __future__ import annotations

import os
import sys
from typing import List

import torch
from torch import Tensor

from ..dispatch import Backend, register_backend
from ..validation import HyperMixingProblem

MAX_HEAD_DIM = 64  # d_h: one [BLOCK_D, BLOCK_D] fc1 block and [BLOCK_K, BLOCK_D] states per program
MAX_HYPERNET_PER_HEAD = 256  # k_h
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError or a broken installation
        return f"triton is not installed or cannot be imported ({type(exc).__name__}: {exc}); pip install triton"
    return ""


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 now, and also when the kernels were created (if they already were)."""
    now = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    config = sys.modules.get(__package__ + ".config")
    return now and (config is None or config.INTERPRETED_KERNELS)


def triton_not_supported_reasons(p: HyperMixingProblem) -> List[str]:
    reasons = []
    dev = p.device.type
    if dev == "cpu":
        if not _interpreting():
            reasons.append(
                "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before triton is "
                "imported; slow, for testing); use backend='cpu' or 'reference' for CPU tensors"
            )
    elif dev != "cuda":
        reasons.append(f"runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {p.device}")
    if p.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {p.dtype} is not supported (float32, float16, bfloat16); use backend='reference' for float64")
    if p.d_h > MAX_HEAD_DIM:
        reasons.append(f"head size d/H = {p.d_h} exceeds the limit {MAX_HEAD_DIM} (use more heads, or another backend)")
    if p.k_h > MAX_HYPERNET_PER_HEAD:
        reasons.append(f"hypernetwork size per head k_h = {p.k_h} exceeds the limit {MAX_HYPERNET_PER_HEAD}")
    if not reasons:
        err = _triton_import_error()
        if err:
            reasons.append(err)
    return reasons


def triton_forward(p: HyperMixingProblem) -> Tensor:
    from .function import hyper_mixing_triton

    return hyper_mixing_triton(p)


register_backend(
    Backend(
        name="triton",
        description="fused Triton kernels, linear time, O(B*H*k_h*d_h) state, fused backward; CUDA",
        forward=triton_forward,
        not_supported_reasons=triton_not_supported_reasons,
    )
)
