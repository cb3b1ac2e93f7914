"""Registers the fused Triton kernels as the `triton` backend (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1). Importing this module is cheap: triton and the kernels are imported on the
first call (or support check) and then kept."""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import torch
from torch import Tensor

from ..config import SETTINGS
from ..blocks import ALL_KINDS
from ..dispatch import Backend, Capabilities, Tolerance, constant_result, register_backend
from ..ops import fused_stream_forward, slots_holding_p
from ..problem import HyperMixingProblem

MAX_HEAD_DIM = 128  # d_h: [D, D] accumulators and operands per program (D = d_h padded to a power of two)
MAX_HYPERNET_PER_HEAD = 512  # k_h: appears only in the per-(b, h) finalize products (torch)
MAX_FP32_HEAD_DIM = 64  # fp32 inputs on a GPU (benchmarks/results/kernels.md, the limit shape)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# fp32 inputs on a GPU, per torch.get_float32_matmul_precision() (the "highest" one is the
# ("cuda", torch.float32) entry of the backend's tolerances)
FP32_MODE_TOLERANCES = {
    "highest": None,  # filled below from the registered tolerances
    "high": Tolerance(
        1e-4, 1e-4,
        "3xTF32 dots (hi/lo TF32 split of both operands, three tensor-core products): emulated under "
        "the interpreter <= 6.9e-7 (output), 4.7e-6 (gradients) incl. d_h 64; GPU exp/erf and order",
    ),
    "medium": Tolerance(
        1e-2, 2.5e-2,
        "TF32 dots: operands truncated to a 10-bit mantissa (Triton emits no cvt.rna for tf32 "
        "mma: the tensor core drops the low 13 bits), ~1e-3 relative per product, up to four "
        "truncated operands in a chain: emulated under the interpreter <= 3.6e-3 (output), 9.7e-3 "
        "(gradients) over the conformance cases and two d_h 64 cases",
    ),
}

# The torch this backend needs: 2.6 brought torch.library.wrap_triton / triton_op (the launchers are
# written for them) and the device property shared_memory_per_block_optin (the fit check). An older
# torch imports hmx_kernels (2.4+) and runs the other backends; this one then reports itself
# unavailable with the reason, so `auto` moves on instead of failing on the first call.
TORCH_FOR_TRITON = "2.6"

_AVAILABLE: Dict[str, Tuple[str, ...]] = {}
_function = None  # hmx_kernels.triton.launch, once imported


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


def torch_missing_for_triton(torch_module=torch) -> str:
    """"" when `torch_module` has what the Triton launchers use, else which names it lacks."""
    missing = [f"torch.library.{name}" for name in ("wrap_triton", "triton_op")
               if not hasattr(torch_module.library, name)]
    props = getattr(torch_module._C, "_CudaDeviceProperties", None)  # None in CPU-only builds
    if props is not None and not hasattr(props, "shared_memory_per_block_optin"):
        missing.append("torch.cuda device property shared_memory_per_block_optin")
    if not missing:
        return ""
    return (f"torch {torch_module.__version__} lacks {', '.join(missing)}: the triton backend needs "
            f"torch >= {TORCH_FOR_TRITON}")


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
            err = torch_missing_for_triton() or _import_error()
            reasons = (err,) if err else ()
        _AVAILABLE[device_type] = reasons
    return reasons


def fit_reasons(p: HyperMixingProblem):
    """Shapes whose kernels cannot fit the GPU, refused here instead of failing inside the
    autotuner: fp32 inputs at d_h > MAX_FP32_HEAD_DIM, and any shape for which every autotune
    candidate of some kernel spills registers under the installed triton or needs more shared
    memory per block than the device gives (config.unfit_reason; consumer GPUs give 99 KB); in the mixing-block modes (causal, chunked,
    packed), more (b, h) programs per piece than CUDA's grid axis 1 takes (B*H*ROW_SPLIT <= 65535,
    ROW_SPLIT 2 from d_h 128 on: config.row_split)."""
    if p.device.type != "cuda":
        return []
    if getattr(p, "mode", None) is not None or getattr(p, "cu_seqlens", None) is not None:
        from .autotune import row_split

        programs = p.B * p.H * row_split(p.d_h)
        if programs > 65535:
            return [f"causal / chunked / packed mixing launches B*H*{row_split(p.d_h)} = {programs} programs per "
                    "piece along CUDA's grid axis 1, whose limit is 65535; split the batch"]
    if p.dtype == torch.float32 and p.d_h > MAX_FP32_HEAD_DIM:
        return [f"float32 inputs with head size d_h = {p.d_h} > {MAX_FP32_HEAD_DIM}: the backward kernels' "
                "[128, 128] fp32 dot operands need 240 KB or more of shared memory per block (H100 gives "
                "227 KB, A100 163 KB); use bfloat16 / float16 inputs or more heads"]
    from .autotune import device_limits, unfit_reason

    blocked = getattr(p, "mode", None) is not None or getattr(p, "cu_seqlens", None) is not None
    why = unfit_reason(p.dtype, p.d_h, torch.get_float32_matmul_precision(), *device_limits(p.device.index or 0),
                       blocked=blocked)
    return [why] if why else []


def _launchers():
    global _function
    if _function is None:
        from . import launch as function

        _function = function
    return _function


def triton_forward(p: HyperMixingProblem) -> Tensor:
    return _launchers().triton_forward(p)


def triton_stream_forward(p: HyperMixingProblem, carry):
    """One streamed piece (hmx_kernels.streaming) through the mixing-block ops, one call: their state
    slots hold P, or with one carried term per block each block's own Q_j
    (hmx_kernels.ops.fused_stream_forward, own_per_block)."""
    return fused_stream_forward(_launchers().TRITON_BLOCK_OPS, p, carry, slots_holding_p, own_per_block=True)


def _triton_carries(mode) -> bool:
    """Streams every causal mode: token-causal and chunk-causal with unbounded left context by the
    ops' carried state in every window, limited left context by two calls (one term per block)."""
    return mode.chunk_size >= 1


_BACKEND = Backend(
    name="triton",
    description="fused Triton kernels, linear time, O(B*H*k_h*d_h) state, fused backward; CUDA",
    forward=triton_forward,
    stream_forward=triton_stream_forward,
    capabilities=Capabilities(
        devices=("cuda", "cpu"),
        dtypes=SUPPORTED_DTYPES,
        max_d_h=MAX_HEAD_DIM,
        max_k_h=MAX_HYPERNET_PER_HEAD,
        blocks=ALL_KINDS,
        position_offset=True,  # through the mixing-block ops, which take a streamed piece's offset
        carried_state=_triton_carries,
        available=triton_available,
    ),
    extra_reasons=fit_reasons,
    tolerances={
        ("cpu", torch.float32): Tolerance(
            2e-5, 2e-5,
            "interpreter: the same fp32 arithmetic as the reference (the interpreter computes every "
            "tl.dot exactly in fp32, whatever its input_precision), the reassociated sums in another "
            "order: measured <= 1.2e-6 (output), 3.6e-6 (gradients) over the conformance cases",
        ),
        ("cpu", torch.float16): Tolerance(
            4e-3, 4e-3,
            "interpreter: the kernels' fp16 path as on a GPU (every dot operand rounded to fp16: "
            "z, hid, V, C, dY, dpre, R; unit roundoff 2^-11 = 4.9e-4, up to four roundings in a "
            "chain, fp32 products and sums), output and gradients rounded to fp16 at the end: "
            "measured <= 1.5e-3 (output), 2.8e-3 (gradients) over every conformance case",
        ),
        ("cpu", torch.bfloat16): Tolerance(
            4e-2, 1.5e-1,
            "interpreter: every dot operand rounded to bf16 exactly as the GPU's tensor-core path "
            "does (held in fp32: the interpreter's bf16 tl.dot is broken), unit roundoff 2^-9 = "
            "2e-3, up to four roundings in a chain, amplified where the LayerNorm removes a large "
            "common part of Y (long sequences): measured <= 2.2e-2 (output), 3.4e-2 (gradients) "
            "over every conformance case (the largest at N = 4500); the generated mode tests "
            "(tests/test_causal.py: d 12, d_h 6, k_h 5, tied idiap generators, a fully padded row) "
            "measured 3.1e-2 (output, non-causal too) and 1.23e-1 (gradients: the W1 generator's "
            "fc1-bias gradient, a token sum whose largest element is small against its terms, in "
            "chunk-causal and token-causal mixing; fp16 on the same cases: <= 3.3e-3)",
        ),
        ("cuda", torch.float32): Tolerance(
            1e-4, 1e-4,
            "GPU, torch.get_float32_matmul_precision() 'highest' (the conformance suite turns TF32 "
            "off): IEEE fp32 dots at d_h <= 32, 3xTF32 above (config.dot_precision); 3xTF32 "
            "emulated under the interpreter (operands split into two RN-rounded TF32 parts, three "
            "products): <= 6.9e-7 (output), 4.7e-6 (gradients) incl. d_h 64; plus the GPU's "
            "exp/erf ulps and summation order. Not yet measured on a GPU. Other modes: "
            "FP32_MODE_TOLERANCES",
        ),
        ("cuda", torch.float16): Tolerance(
            5e-3, 5e-3,
            "GPU: the fp16 tensor-core path the interpreter runs (measured there <= 1.5e-3 output, "
            "2.8e-3 gradients, every case incl. N = 4500), with fp32 sums in another order and the "
            "GPU's exp/erf. Not yet measured on a GPU",
        ),
        ("cuda", torch.bfloat16): Tolerance(
            4e-2, 1.5e-1,
            "GPU: the bf16 tensor-core path the interpreter emulates bit for bit in its operands "
            "(measured there <= 2.2e-2 output, 3.4e-2 gradients over the conformance cases; 3.1e-2 "
            "and 1.23e-1 in the generated mode tests, see the interpreter's entry), fp32 sums in "
            "another order. Not yet measured on a GPU",
        ),
    },
)
register_backend(_BACKEND)

FP32_MODE_TOLERANCES["highest"] = _BACKEND.tolerances[("cuda", torch.float32)]
