"""Autograd Function over the C++ extension and the "cpu" / "cuda" backends it registers.

The extension computes Y = W2 GELU(W1^T V) per head in fused tiled passes (no [N, k] tensor) and
its backward; the final LayerNorm is applied here with torch (it is [B, M, d]-sized, like the
output, and autograd differentiates it). Positional encodings come from
`hmx_kernels.reference.positional.cached_positional_encoding`, so the twin adds exactly the rows
the reference adds.

- "cpu": CPU tensors, float32 and float64. float16 / bfloat16 are not taken: CPUs have no fast
  half arithmetic, and upcasting the inputs would cost memory and time for no gain over the
  reference, which upcasts too; "auto" then uses the reference.
- "cuda": CUDA tensors, float32 / float16 / bfloat16 (fp32 accumulation), where torch has CUDA
  and nvcc exists.
If the extension cannot be built, both backends report why; "auto" falls back to the reference
and warns once.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import Backend, register_backend
from ..reference.positional import cached_positional_encoding
from ..validation import HyperMixingProblem
from . import build

__all__ = ["HyperMixingCppFunction", "cpp_forward"]

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _extension_reasons(with_cuda: bool) -> List[str]:
    """Builds the extension if needed; [] when it loads, else why not (and warns once)."""
    try:
        build.load_extension(with_cuda=with_cuda)
        return []
    except build.ExtensionBuildError as e:
        _warn_once(
            f"build-{with_cuda}",
            f"{e}\nhmx_kernels falls back to another backend (backend='auto' uses the reference).",
        )
        return [str(e)]


def _prepare_tokens(t: Tensor) -> Tensor:
    # the kernels take any batch/row strides but need unit channel stride
    return t if t.stride(-1) == 1 else t.contiguous()


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


class HyperMixingCppFunction(torch.autograd.Function):
    """Y (before LayerNorm) = fused HyperMixing of (query, key, value) with both generators.

    Inputs: query [B, M, d], key / value [B, N, d], 8 generator tensors (biases may be None),
    pe_q [M, d], pe_k [N, d], m_q [B, M] / m_k [B, N] (1 = kept) or None, the input scale.
    The same tensor may be passed several times (self-mixing, tied generators): autograd adds
    the gradients of its uses.
    """

    @staticmethod
    def forward(ctx, query, key, value, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, pe_q, pe_k, m_q, m_k, scale, with_cuda):
        ext = build.load_extension(with_cuda=with_cuda)
        q, k, v = _prepare_tokens(query), _prepare_tokens(key), _prepare_tokens(value)
        ws = [_c(w) for w in (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b)]
        y, p = ext.forward(q, k, v, pe_q, pe_k, m_q, m_k, *ws, float(scale))
        ctx.save_for_backward(q, k, v, pe_q, pe_k, m_q, m_k, p, *ws)
        ctx.scale = float(scale)
        ctx.with_cuda = with_cuda
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        q, k, v, pe_q, pe_k, m_q, m_k, p, *ws = ctx.saved_tensors
        ext = build.load_extension(with_cuda=ctx.with_cuda)
        grads = ext.backward(dy.contiguous(), q, k, v, pe_q, pe_k, m_q, m_k, *ws, p, ctx.scale)
        dq, dk, dv = grads[:3]
        wgrads = [None if g is None else g.to(w.dtype) for g, w in zip(grads[3:], ws)]
        return (dq, dk, dv, *wgrads) + (None,) * 6


def cpp_forward(p: HyperMixingProblem) -> Tensor:
    """Runs `p` through the extension (CPU twin or CUDA kernels, by the tensors' device)."""
    on_cuda = p.device.type == "cuda"
    # the side inputs are in the compute type: the input type on the CPU, fp32 on CUDA
    ctype = torch.float32 if on_cuda else p.dtype
    pe_k = cached_positional_encoding(p.variant, p.N, p.d, p.device).to(ctype).contiguous()  # [N, d]
    pe_q = pe_k if p.self_mixing else cached_positional_encoding(p.variant, p.M, p.d, p.device).to(ctype).contiguous()
    m_k = None if p.key_padding_mask is None else torch.logical_not(p.key_padding_mask).to(ctype).contiguous()
    if p.query_padding_mask is p.key_padding_mask:
        m_q = m_k
    else:
        m_q = None if p.query_padding_mask is None else torch.logical_not(p.query_padding_mask).to(ctype).contiguous()
    scale = p.variant.input_scale(p.d)
    y = HyperMixingCppFunction.apply(
        p.query, p.key, p.value,
        p.w1_fc1_weight, p.w1_fc1_bias, p.w1_fc2_weight, p.w1_fc2_bias,
        p.w2_fc1_weight, p.w2_fc1_bias, p.w2_fc2_weight, p.w2_fc2_bias,
        pe_q, pe_k, m_q, m_k, scale, on_cuda,
    )  # [B, M, d] in the input dtype
    if p.use_layer_norm:
        if y.dtype in (torch.float16, torch.bfloat16):  # LayerNorm statistics in fp32, as the reference
            y = F.layer_norm(y.float(), (p.d,), p.ln_weight.float(), p.ln_bias.float(), p.eps).to(p.dtype)
        else:
            y = F.layer_norm(y, (p.d,), p.ln_weight, p.ln_bias, p.eps)
    return y


def cpu_reasons(p: HyperMixingProblem) -> List[str]:
    if p.device.type != "cpu":
        return [f"the cpu backend runs CPU tensors only (got {p.device})"]
    if p.dtype not in CPU_DTYPES:
        return [
            f"the cpu backend takes float32 and float64, not {p.dtype}: CPUs lack fast half-precision "
            "arithmetic and upcasting would only add memory traffic (use float32)"
        ]
    return _extension_reasons(with_cuda=False)


def cuda_reasons(p: HyperMixingProblem) -> List[str]:
    if p.device.type != "cuda":
        return [f"the cuda backend runs CUDA tensors only (got {p.device})"]
    reasons = []
    if p.dtype not in CUDA_DTYPES:
        reasons.append(f"the cuda backend takes float32, float16 and bfloat16, not {p.dtype}")
    if p.d_h > 64:
        reasons.append(f"the cuda kernels support d_h <= 64 (got {p.d_h})")
    if p.k_h > 256:
        reasons.append(f"the cuda kernels support k_h <= 256 (got {p.k_h})")
    if reasons:
        return reasons
    why = build.cuda_build_possible()
    if why:
        return ["CUDA kernels unavailable: " + "; ".join(why)]
    return _extension_reasons(with_cuda=True)


register_backend(
    Backend(
        name="cpu",
        description="C++ CPU twin of the fused kernels (OpenMP, tiled, no [N, k] tensor); float32/float64",
        forward=cpp_forward,
        not_supported_reasons=cpu_reasons,
    )
)
register_backend(
    Backend(
        name="cuda",
        description="CUDA C++ fused kernels (tiles in shared memory, fp32 accumulation); float32/float16/bfloat16",
        forward=cpp_forward,
        not_supported_reasons=cuda_reasons,
    )
)
