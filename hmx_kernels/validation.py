"""Input checking shared by every backend: one place that turns bad input into a clear error.

`check_inputs` validates ranks, sizes, dtypes, devices and masks, fills in the variant's implied
arguments (speechbrain: key = value = query, one mask for both) and returns a `HyperMixingProblem`
that the backends consume. Backends may assume everything checked here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .variants import Variant, get_variant

__all__ = ["HyperMixingProblem", "check_inputs", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class HyperMixingProblem:
    """Validated inputs of one HyperMixing call, with its sizes."""

    query: Tensor  # [B, M, d]
    key: Tensor  # [B, N, d]
    value: Tensor  # [B, N, d]
    w1_fc1_weight: Tensor  # [H, d_h, d_h]
    w1_fc1_bias: Optional[Tensor]  # [H, d_h]
    w1_fc2_weight: Tensor  # [H, k_h, d_h]
    w1_fc2_bias: Optional[Tensor]  # [H, k_h]
    w2_fc1_weight: Tensor
    w2_fc1_bias: Optional[Tensor]
    w2_fc2_weight: Tensor
    w2_fc2_bias: Optional[Tensor]
    ln_weight: Optional[Tensor]  # [d]
    ln_bias: Optional[Tensor]  # [d]
    key_padding_mask: Optional[Tensor]  # [B, N] bool, True = padded
    query_padding_mask: Optional[Tensor]  # [B, M] bool
    variant: Variant
    use_layer_norm: bool
    eps: float
    tied: bool
    B: int
    M: int
    N: int
    d: int
    H: int
    d_h: int
    k_h: int

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def self_mixing(self) -> bool:
        """True when queries and keys are the same tokens (W2 = W1 when tied)."""
        return self.query is self.key and self.query_padding_mask is self.key_padding_mask

    def weights(self) -> tuple:
        """The 12 parameter tensors in the order every backend's autograd Function takes them."""
        return (
            self.w1_fc1_weight, self.w1_fc1_bias, self.w1_fc2_weight, self.w1_fc2_bias,
            self.w2_fc1_weight, self.w2_fc1_bias, self.w2_fc2_weight, self.w2_fc2_bias,
            self.ln_weight, self.ln_bias,
        )


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {t.dim()} ({_describe(t)})")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def _check_mask(name: str, mask, batch: int, length: int, device: torch.device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(
            f"{name} must be a boolean padding mask (True = padded) of shape [B, length], got dtype "
            f"{mask.dtype}; float masks are additive attention masks, which HyperMixing does not take"
        )
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(
            f"{name} must have dtype torch.bool (True = padded) or torch.uint8 (non-zero = padded), "
            f"got {mask.dtype}"
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape [B, length] = {[batch, length]}, got {list(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_inputs(
    query,
    key,
    value,
    w1_fc1_weight,
    w1_fc1_bias,
    w1_fc2_weight,
    w1_fc2_bias,
    w2_fc1_weight=None,
    w2_fc1_bias=None,
    w2_fc2_weight=None,
    w2_fc2_bias=None,
    ln_weight=None,
    ln_bias=None,
    *,
    variant="speechbrain",
    key_padding_mask=None,
    query_padding_mask=None,
    use_layer_norm: bool = True,
    eps: float = 1e-5,
) -> HyperMixingProblem:
    v = get_variant(variant)

    # ---- tokens --------------------------------------------------------------------------
    _check_tensor("query", query, 3)
    if v.self_mixing_only:
        # speechbrain: key and value are ignored, the query is used for all three
        if query_padding_mask is not None:
            raise ValueError(
                "the speechbrain variant takes one padding mask for all tokens: pass it as "
                "key_padding_mask, not query_padding_mask"
            )
        key = value = query
        query_padding_mask = key_padding_mask
    else:
        if key is None or value is None:
            raise ValueError(f"the {v.name} variant needs key and value tensors (pass query for self-mixing)")
        _check_tensor("key", key, 3)
        _check_tensor("value", value, 3)
    B, M, d = query.shape
    N = key.shape[1]
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape [B, N, d], got {list(key.shape)} and {list(value.shape)}"
        )
    if key.shape[0] != B:
        raise ValueError(f"batch sizes differ: query has {B}, key/value have {key.shape[0]}")
    if key.shape[2] != d:
        raise ValueError(f"widths differ: query has d={d}, key/value have d={key.shape[2]}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if B == 0 or M == 0 or N == 0 or d == 0:
        raise ValueError(
            f"empty input: HyperMixing needs B, M, N, d >= 1, got B={B}, M={M}, N={N}, d={d}"
        )

    # ---- parameters ----------------------------------------------------------------------
    tied = w2_fc1_weight is None and w2_fc2_weight is None
    if tied:
        if w2_fc1_bias is not None or w2_fc2_bias is not None:
            raise ValueError("tied hypernetworks (no w2 weights) cannot take w2 biases")
        w2_fc1_weight, w2_fc1_bias, w2_fc2_weight, w2_fc2_bias = (
            w1_fc1_weight, w1_fc1_bias, w1_fc2_weight, w1_fc2_bias,
        )
    elif w2_fc1_weight is None or w2_fc2_weight is None:
        raise ValueError("pass both w2_fc1_weight and w2_fc2_weight, or neither (tied)")
    else:
        tied = w2_fc1_weight is w1_fc1_weight and w2_fc2_weight is w1_fc2_weight

    for gen in ("w1", "w2"):
        fc1_w, fc1_b, fc2_w, fc2_b = (
            (w1_fc1_weight, w1_fc1_bias, w1_fc2_weight, w1_fc2_bias)
            if gen == "w1"
            else (w2_fc1_weight, w2_fc1_bias, w2_fc2_weight, w2_fc2_bias)
        )
        _check_tensor(f"{gen}_fc1_weight", fc1_w, 3)
        _check_tensor(f"{gen}_fc2_weight", fc2_w, 3)
        H, d_out, d_in = fc1_w.shape
        if d_out != d_in:
            raise ValueError(f"{gen}_fc1_weight must be [H, d_h, d_h], got {list(fc1_w.shape)}")
        if H == 0 or d % H != 0 or d // H != d_in:
            raise ValueError(
                f"{gen}_fc1_weight has shape {list(fc1_w.shape)}, which does not split d={d} into "
                f"heads: expected [H, d/H, d/H] with d divisible by H"
            )
        if fc2_w.shape[0] != H or fc2_w.shape[2] != d_in or fc2_w.shape[1] == 0:
            raise ValueError(f"{gen}_fc2_weight must be [H, k_h, d_h] = [{H}, k_h, {d_in}], got {list(fc2_w.shape)}")
        if fc1_b is not None:
            _check_tensor(f"{gen}_fc1_bias", fc1_b, 2)
            if tuple(fc1_b.shape) != (H, d_in):
                raise ValueError(f"{gen}_fc1_bias must be [H, d_h] = {[H, d_in]}, got {list(fc1_b.shape)}")
        if fc2_b is not None:
            _check_tensor(f"{gen}_fc2_bias", fc2_b, 2)
            if tuple(fc2_b.shape) != (H, fc2_w.shape[1]):
                raise ValueError(
                    f"{gen}_fc2_bias must be [H, k_h] = {[H, fc2_w.shape[1]]}, got {list(fc2_b.shape)}"
                )
        for name, t in (("fc1_weight", fc1_w), ("fc1_bias", fc1_b), ("fc2_weight", fc2_w), ("fc2_bias", fc2_b)):
            if t is not None and t.device != query.device:
                raise ValueError(f"{gen}_{name} is on {t.device} but the inputs are on {query.device}")
    if w1_fc1_weight.shape != w2_fc1_weight.shape or w1_fc2_weight.shape != w2_fc2_weight.shape:
        raise ValueError(
            f"w1 and w2 hypernetworks must have the same shapes, got fc1 {list(w1_fc1_weight.shape)} vs "
            f"{list(w2_fc1_weight.shape)}, fc2 {list(w1_fc2_weight.shape)} vs {list(w2_fc2_weight.shape)}"
        )
    if (w1_fc1_bias is None) != (w2_fc1_bias is None) or (w1_fc2_bias is None) != (w2_fc2_bias is None):
        raise ValueError("w1 and w2 hypernetworks must both have biases or both have none")
    H, d_h, _ = w1_fc1_weight.shape
    k_h = w1_fc2_weight.shape[1]

    if use_layer_norm:
        if ln_weight is None or ln_bias is None:
            raise ValueError("use_layer_norm=True needs ln_weight and ln_bias (both [d])")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            _check_tensor(name, t, 1)
            if t.shape[0] != d:
                raise ValueError(f"{name} must be [d] = [{d}], got {list(t.shape)}")
            if t.device != query.device:
                raise ValueError(f"{name} is on {t.device} but the inputs are on {query.device}")
    else:
        ln_weight = ln_bias = None
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")

    # ---- masks ---------------------------------------------------------------------------
    key_padding_mask = _check_mask("key_padding_mask", key_padding_mask, B, N, query.device)
    if v.self_mixing_only:
        query_padding_mask = key_padding_mask
    else:
        query_padding_mask = _check_mask("query_padding_mask", query_padding_mask, B, M, query.device)

    return HyperMixingProblem(
        query=query, key=key, value=value,
        w1_fc1_weight=w1_fc1_weight, w1_fc1_bias=w1_fc1_bias,
        w1_fc2_weight=w1_fc2_weight, w1_fc2_bias=w1_fc2_bias,
        w2_fc1_weight=w2_fc1_weight, w2_fc1_bias=w2_fc1_bias,
        w2_fc2_weight=w2_fc2_weight, w2_fc2_bias=w2_fc2_bias,
        ln_weight=ln_weight, ln_bias=ln_bias,
        key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
        variant=v, use_layer_norm=bool(use_layer_norm), eps=float(eps), tied=tied,
        B=B, M=M, N=N, d=d, H=H, d_h=d_h, k_h=k_h,
    )
