"""The contract between the user-facing API and the backends: `check_inputs` -> `HyperMixingProblem`.

`check_inputs` validates ranks, sizes, dtypes, devices and masks, applies the dtype rule, fills in
what the variant implies, and returns one frozen `HyperMixingProblem` that already holds
everything a backend needs: the tokens and parameters in the operand dtype, the masks as keep
vectors, the input scale and first PE position, which biases each generator has, the compute and
output dtypes, and whether the LayerNorm is applied. Backends read only the problem; none of them
re-interprets the raw arguments.

The dtype rule (the same for every backend, applied here, before dispatch):
- query, key and value share one dtype T.
- Outside autocast every parameter (the eight hypernetwork tensors and the LayerNorm's two) must
  have dtype T too; otherwise a TypeError names the tensor and both dtypes (as nn.Linear would).
- Under `torch.autocast` on the tokens' device, with T one of float32/float16/bfloat16: the tokens
  and the eight hypernetwork tensors are cast to the autocast dtype A (like the matmuls of an
  nn.Linear), the LayerNorm runs in float32 with its own parameters (like autocast's layer_norm),
  and the result has dtype A. float64 tokens are left alone, as autocast leaves float64.
- Every backend accumulates in float32 (float64 for float64 operands): `compute_dtype`.

Everything here is plain Python over tensor metadata, so torch.compile traces it without a graph
break (the checks become guards on the shapes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .blocks import MixingBlocks
from .causal import MixingMode, resolve_mode
from .variants import Variant, get_variant

__all__ = [
    "HyperMixingProblem",
    "check_inputs",
    "FLOAT_DTYPES",
    "GENERATOR_PARTS",
    "WEIGHT_NAMES",
    "compute_dtype_of",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# one generator MLP's tensors, in the order every backend takes them
GENERATOR_PARTS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
# the ten parameter tensors of a HyperMixing call, in the order of every signature in the package
WEIGHT_NAMES = tuple(f"{g}_{p}" for g in ("w1", "w2") for p in GENERATOR_PARTS) + ("ln_weight", "ln_bias")
# the last position each variant's positional encoding computes exactly: speechbrain's positions
# are float32 (as in speechbrain), idiap's float64; integers beyond these are not representable
MAX_POSITION = {"speechbrain": 2**24, "idiap": 2**53}


def check_position_range(variant: str, position_offset: int, length: int, where: str = "") -> None:
    """ValueError naming position_offset when the last position of a slice of `length` tokens
    starting at `position_offset` exceeds what the variant's positional encoding computes exactly."""
    v = get_variant(variant)
    last = v.first_position + position_offset + max(length, 1) - 1
    limit = MAX_POSITION[v.name]
    if last > limit:
        raise ValueError(
            f"{where}position_offset {position_offset} with {length} tokens reaches position {last}, beyond "
            f"{limit} (2**{limit.bit_length() - 1}), the last position the {v.name} variant's positional "
            f"encoding computes exactly ({'float32' if v.name == 'speechbrain' else 'float64'} positions)"
        )


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for operands of `dtype`: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class HyperMixingProblem:
    """One validated HyperMixing call, resolved for the backends (see the module docstring)."""

    query: Tensor  # [B, M, d] operand dtype
    key: Tensor  # [B, N, d] (speechbrain: the query tensor itself)
    value: Tensor  # [B, N, d]
    w1_fc1_weight: Tensor  # [H, d_h, d_h] operand dtype
    w1_fc1_bias: Optional[Tensor]  # [H, d_h]
    w1_fc2_weight: Tensor  # [H, k_h, d_h]
    w1_fc2_bias: Optional[Tensor]  # [H, k_h]
    w2_fc1_weight: Tensor  # tied: the w1 tensors themselves
    w2_fc1_bias: Optional[Tensor]
    w2_fc2_weight: Tensor
    w2_fc2_bias: Optional[Tensor]
    ln_weight: Optional[Tensor]  # [d] (None when use_layer_norm is False)
    ln_bias: Optional[Tensor]  # [d]
    key_keep: Optional[Tensor]  # [B, N] compute dtype, 1 = kept, 0 = padded; None = no padding
    query_keep: Optional[Tensor]  # [B, M]; speechbrain: the key_keep tensor itself
    variant: Variant
    use_layer_norm: bool
    eps: float
    tied: bool  # one generator makes W1 and W2
    self_mixing: bool  # queries are the keys (same tensor, same mask): one PE table, one keep vector
    scale: float  # hypernetwork input scale s (z = s * x * m + PE)
    first_position: int  # position of the first token in the PE
    B: int
    M: int
    N: int
    d: int
    H: int
    d_h: int
    k_h: int
    dtype: torch.dtype  # operand dtype (the tokens' dtype after the dtype rule)
    compute_dtype: torch.dtype  # accumulation dtype
    out_dtype: torch.dtype  # dtype of the result
    autocast: bool  # the autocast part of the dtype rule applied
    # which tokens each token mixes with (hmx_kernels.blocks): full, token-causal, chunk-causal,
    # packed sequences (cu_seqlens into the one row, B = 1, self-mixing, each sequence from
    # position first_position) and their combinations; built here once, read by every backend
    blocks: MixingBlocks = MixingBlocks()
    position_offset: int = 0  # global position of the first token (a slice of a longer sequence)
    sequence_parallel_group: object = None  # torch.distributed group holding the other slices, or None

    @property
    def mode(self) -> Optional[MixingMode]:
        """The causal / chunk-causal mode of the blocks (None: non-causal)."""
        return self.blocks.mode

    @property
    def cu_seqlens(self) -> Optional[Tensor]:
        """The packed sequences' offsets of the blocks, or None."""
        return self.blocks.cu_seqlens

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def w1_biases(self) -> Tuple[bool, bool]:
        """(fc1 bias present, fc2 bias present) of the W1 generator."""
        return (self.w1_fc1_bias is not None, self.w1_fc2_bias is not None)

    @property
    def w2_biases(self) -> Tuple[bool, bool]:
        return (self.w2_fc1_bias is not None, self.w2_fc2_bias is not None)

    @property
    def partial_biases(self) -> bool:
        """Some generator has one of its two biases but not the other."""
        return len(set(self.w1_biases)) > 1 or len(set(self.w2_biases)) > 1

    def generator_weights(self) -> tuple:
        """The 8 hypernetwork tensors (w1 fc1 w/b, fc2 w/b, then w2), the order of every op."""
        return (
            self.w1_fc1_weight, self.w1_fc1_bias, self.w1_fc2_weight, self.w1_fc2_bias,
            self.w2_fc1_weight, self.w2_fc1_bias, self.w2_fc2_weight, self.w2_fc2_bias,
        )

    def weights(self) -> tuple:
        """The 10 parameter tensors in WEIGHT_NAMES order."""
        return self.generator_weights() + (self.ln_weight, self.ln_bias)


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
    """The padding mask as a bool tensor (True = padded), or None."""
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
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] != length:
        raise ValueError(
            f"{name} must have shape [B, length] = {[batch, length]}, got {list(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_generator(gen: str, tensors, d: int, device: torch.device) -> Tuple[int, int, int]:
    """Shapes and devices of one generator's four tensors; returns (H, d_h, k_h)."""
    fc1_w, fc1_b, fc2_w, fc2_b = tensors
    _check_tensor(f"{gen}_fc1_weight", fc1_w, 3)
    _check_tensor(f"{gen}_fc2_weight", fc2_w, 3)
    H, d_out, d_in = fc1_w.shape
    if d_out != d_in:
        raise ValueError(f"{gen}_fc1_weight must be [H, d_h, d_h], got {list(fc1_w.shape)}")
    if fc2_w.shape[0] != H or fc2_w.shape[2] != d_in or fc2_w.shape[1] == 0:
        raise ValueError(f"{gen}_fc2_weight must be [H, k_h, d_h] = [{H}, k_h, {d_in}], got {list(fc2_w.shape)}")
    k_h = fc2_w.shape[1]
    if fc1_b is not None:
        _check_tensor(f"{gen}_fc1_bias", fc1_b, 2)
        if tuple(fc1_b.shape) != (H, d_in):
            raise ValueError(f"{gen}_fc1_bias must be [H, d_h] = {[H, d_in]}, got {list(fc1_b.shape)}")
    if fc2_b is not None:
        _check_tensor(f"{gen}_fc2_bias", fc2_b, 2)
        if tuple(fc2_b.shape) != (H, k_h):
            raise ValueError(f"{gen}_fc2_bias must be [H, k_h] = {[H, k_h]}, got {list(fc2_b.shape)}")
    for part, t in zip(GENERATOR_PARTS, tensors):
        if t is not None and t.device != device:
            raise ValueError(f"{gen}_{part} is on {t.device} but the inputs are on {device}")
    return H, d_in, k_h


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


def _autocast_dtype(device: torch.device, token_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The autocast dtype that applies to this call, or None."""
    if token_dtype == torch.float64 or device.type not in _AUTOCAST_DEVICES:
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


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
    causal: bool = False,
    chunk_size: Optional[int] = None,
    left_context_chunks: Optional[int] = None,
    position_offset: int = 0,
    sequence_parallel_group=None,
) -> HyperMixingProblem:
    v = get_variant(variant)
    mode = resolve_mode(causal, chunk_size, left_context_chunks)
    if isinstance(position_offset, bool) or not isinstance(position_offset, int) or position_offset < 0:
        raise ValueError(f"position_offset must be an int >= 0, got {position_offset!r}")
    if sequence_parallel_group is not None:
        if mode is not None:
            raise ValueError("sequence parallelism is implemented for non-causal mixing only")

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
    device = query.device
    if key.device != device or value.device != device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    empty_slice = sequence_parallel_group is not None and M == 0 and N == 0  # a rank may hold no tokens
    if B == 0 or d == 0 or ((M == 0 or N == 0) and not empty_slice):
        raise ValueError(
            f"empty input: HyperMixing needs B, M, N, d >= 1, got B={B}, M={M}, N={N}, d={d}"
            + (" (a sequence-parallel rank may hold an empty slice: no queries and no keys)"
               if sequence_parallel_group is not None else "")
        )
    if position_offset:
        check_position_range(v.name, position_offset, max(M, N))
    if mode is not None and M != N:
        raise ValueError(
            f"{mode.describe()} mixing needs as many queries as keys (query t mixes keys up to its own "
            f"position), got M={M} queries and N={N} keys"
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
        tied = (w2_fc1_weight is w1_fc1_weight and w2_fc2_weight is w1_fc2_weight
                and w2_fc1_bias is w1_fc1_bias and w2_fc2_bias is w1_fc2_bias)
    g1 = (w1_fc1_weight, w1_fc1_bias, w1_fc2_weight, w1_fc2_bias)
    g2 = (w2_fc1_weight, w2_fc1_bias, w2_fc2_weight, w2_fc2_bias)
    H, d_h, k_h = _check_generator("w1", g1, d, device)
    H2, d_h2, k_h2 = _check_generator("w2", g2, d, device)
    if (H, d_h, k_h) != (H2, d_h2, k_h2):
        raise ValueError(
            f"w1 and w2 hypernetworks must have the same shapes, got fc1 {list(w1_fc1_weight.shape)} vs "
            f"{list(w2_fc1_weight.shape)}, fc2 {list(w1_fc2_weight.shape)} vs {list(w2_fc2_weight.shape)}"
        )
    if H * d_h != d:
        # the tokens are the odd one out when the two generators agree with each other
        raise ValueError(
            f"the tokens' width d={d} does not match the hypernetwork: its weights have H={H} heads of "
            f"d_h={d_h} channels (w1_fc1_weight {list(w1_fc1_weight.shape)}), so query, key and value "
            f"must have last dimension H * d_h = {H * d_h}"
        )

    if use_layer_norm:
        if ln_weight is None or ln_bias is None:
            raise ValueError("use_layer_norm=True needs ln_weight and ln_bias (both [d])")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            _check_tensor(name, t, 1)
            if t.shape[0] != d:
                raise ValueError(f"{name} must be [d] = [{d}], got {list(t.shape)}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")
    else:
        ln_weight = ln_bias = None
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")

    # ---- the dtype rule ------------------------------------------------------------------
    token_dtype = query.dtype
    cast_to = _autocast_dtype(device, token_dtype)
    if cast_to is None:
        named = [(f"w1_{p}", t) for p, t in zip(GENERATOR_PARTS, g1)]
        if not tied:
            named += [(f"w2_{p}", t) for p, t in zip(GENERATOR_PARTS, g2)]
        named += [("ln_weight", ln_weight), ("ln_bias", ln_bias)]
        for name, t in named:
            if t is not None and t.dtype != token_dtype:
                raise TypeError(
                    f"{name} has dtype {t.dtype} but the tokens (query) have dtype {token_dtype}: "
                    "HyperMixing takes parameters in the tokens' dtype; cast the module or the inputs "
                    "(e.g. layer.to(dtype)), or run under torch.autocast"
                )
        dtype = token_dtype
    else:
        dtype = cast_to

        def cast(t):
            return None if t is None or t.dtype == dtype else t.to(dtype)

        if v.self_mixing_only:
            query = key = value = cast(query)
        else:
            same_kv = value is key
            query, key = cast(query), cast(key)
            value = key if same_kv else cast(value)
        g1 = tuple(cast(t) for t in g1)
        g2 = g1 if tied else tuple(cast(t) for t in g2)
    cdt = compute_dtype_of(dtype)

    # ---- masks as keep vectors -----------------------------------------------------------
    key_pad = _check_mask("key_padding_mask", key_padding_mask, B, N, device)
    key_keep = None if key_pad is None else torch.logical_not(key_pad).to(cdt)
    if v.self_mixing_only:
        query_keep = key_keep
    else:
        query_pad = _check_mask("query_padding_mask", query_padding_mask, B, M, device)
        if query_pad is None:
            query_keep = None
        elif query_pad is key_pad:
            query_keep = key_keep
        else:
            query_keep = torch.logical_not(query_pad).to(cdt)
    self_mixing = query is key and query_keep is key_keep

    return HyperMixingProblem(
        query=query, key=key, value=value,
        w1_fc1_weight=g1[0], w1_fc1_bias=g1[1], w1_fc2_weight=g1[2], w1_fc2_bias=g1[3],
        w2_fc1_weight=g2[0], w2_fc1_bias=g2[1], w2_fc2_weight=g2[2], w2_fc2_bias=g2[3],
        ln_weight=ln_weight, ln_bias=ln_bias,
        key_keep=key_keep, query_keep=query_keep,
        variant=v, use_layer_norm=bool(use_layer_norm), eps=float(eps), tied=tied,
        self_mixing=self_mixing, scale=v.input_scale(d), first_position=v.first_position,
        B=B, M=M, N=N, d=d, H=H, d_h=d_h, k_h=k_h,
        dtype=dtype, compute_dtype=cdt, out_dtype=dtype, autocast=cast_to is not None, blocks=MixingBlocks(mode),
        position_offset=position_offset, sequence_parallel_group=sequence_parallel_group,
    )
