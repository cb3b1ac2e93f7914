"""Packed variable-length batches in flash-attn's convention: tokens [total, d] and cu_seqlens
(int32 [num_seqs + 1], cumulative lengths), every sequence mixed on its own, its positions from 0
(speechbrain) or 1 (idiap).

`unpad` / `pad` convert between a padded batch with a padding mask and the packed form.
`hyper_mixing_varlen` is the functional op on packed tokens. Backends that declare the
`packed` kind walk cu_seqlens in their kernels (each sequence is a mixing block of its own:
csrc/hmx_params.h) or, the reference, mix the sequences one by one; for the others the dispatcher
runs a padded [num_seqs, max_seqlen, d] view with a padding mask (hmx_kernels.dispatch.run: exact,
but it spends compute on the padding). The fused backends copy
cu_seqlens to the host once per call to build their tables: one host synchronisation per packed
call (plain and chunked mixing have none on the triton backend).

Empty sequences (equal neighbours in cu_seqlens, as `unpad` makes of a fully padded row) are
allowed: they hold no tokens and produce none. Checking cu_seqlens and sizing the work reads its
values on the host, so under torch.compile `hyper_mixing_varlen` breaks the graph, and
torch.compile(fullgraph=True) raises, saying so (`COMPILE_NOTE`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from .blocks import MixingBlocks
from .dispatch import check_backend_name, run
from .problem import check_inputs

__all__ = ["unpad", "pad", "hyper_mixing_varlen", "cu_seqlens_from_lengths", "COMPILE_NOTE"]

COMPILE_NOTE = (
    "hmx_kernels: packed sequences (cu_seqlens) are checked and sized from cu_seqlens' values on the host, "
    "which torch.compile cannot capture in the graph (graph breaks here; fullgraph=True cannot hold it); "
    "compile a padded batch with a key_padding_mask for one graph"
)


def cu_seqlens_from_lengths(lengths: Tensor) -> Tensor:
    """int32 [n + 1] cumulative lengths, starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def unpad(x: Tensor, padding_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, int, Tensor]:
    """[B, L, d] + padding mask [B, L] (True = padded; every sequence's padding at its end) ->
    (packed [total, d], cu_seqlens int32 [B + 1], max_seqlen, indices [total] into the B * L rows)."""
    B, L = x.shape[:2]
    if padding_mask is None:
        keep = torch.ones(B, L, dtype=torch.bool, device=x.device)
    else:
        keep = ~padding_mask.bool()
        lengths = keep.sum(1)
        if not torch.equal(keep, torch.arange(L, device=x.device)[None, :] < lengths[:, None]):
            raise ValueError("unpad needs each sequence's padding at its end (a prefix of kept tokens)")
    lengths = keep.sum(1)
    indices = torch.nonzero(keep.reshape(-1), as_tuple=False).squeeze(1)
    packed = x.reshape(B * L, *x.shape[2:]).index_select(0, indices)
    return packed, cu_seqlens_from_lengths(lengths), int(lengths.max()) if B else 0, indices


def pad(packed: Tensor, indices: Tensor, batch: int, length: int) -> Tensor:
    """Inverse of `unpad`: [total, d] -> [batch, length, d] with zeros at the padded positions."""
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    out = out.index_copy(0, indices, packed)
    return out.reshape(batch, length, *packed.shape[1:])


def _check_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int tensor [num_seqs + 1] of cumulative lengths")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    cu = cu_seqlens.to("cpu", torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the token count {total}, "
                         f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")
    return cu


def hyper_mixing_varlen(tokens: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int], *weights,
                        variant: str = "speechbrain", backend: str = "auto", **kwargs) -> Tensor:
    """HyperMixing of packed sequences: tokens [total, d], cu_seqlens [num_seqs + 1] -> [total, d].

    `weights` are `hyper_mixing`'s ten parameter tensors (w1 fc1/fc2 weight/bias, w2 the same or
    None for tied, ln weight/bias); every sequence mixes with itself only (self-mixing, both
    variants), its positional encoding from its own first position; other keyword arguments as in
    `hyper_mixing` (use_layer_norm, eps, causal, chunk_size, left_context_chunks: the causal
    modes apply per sequence).

    Backends that take packed sequences (`packed` in their Capabilities.blocks) run them as they
    are: no compute on padding. Any other backend runs a padded [num_seqs, max_seqlen, d] batch
    with a padding mask (same result; hmx_kernels.dispatch.run). backend="auto" takes the device's
    first backend (AUTO_ORDER) that can run the call either way."""
    return _varlen(tokens, cu_seqlens, max_seqlen, *weights, variant=variant, backend=backend, **kwargs)


def _varlen(tokens: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int], *weights, variant: str, backend: str,
            on_chosen=None, **kwargs) -> Tensor:
    """`hyper_mixing_varlen`, reporting the chosen backend to `on_chosen` (the layer)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        shape = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be packed [total, d], got {shape}")
    for bad in ("key_padding_mask", "query_padding_mask", "position_offset", "sequence_parallel_group"):
        if bad in kwargs and not (kwargs[bad] is None or (bad == "position_offset" and _is_zero(kwargs[bad]))):
            raise ValueError(f"hyper_mixing_varlen does not take {bad} (packed sequences have no padding: "
                             "cu_seqlens gives each sequence's length; a sequence-parallel slice is a padded batch)")
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=COMPILE_NOTE)
    cu = _check_cu_seqlens(cu_seqlens, tokens.shape[0])
    lengths = cu[1:] - cu[:-1]
    L = int(lengths.max())
    if L == 0:  # only empty sequences: nothing to mix (the weights are still checked)
        x = tokens.new_zeros(1, 1, tokens.shape[1])
        check_inputs(*((x, None, None) if variant == "speechbrain" else (x, x, x)), *weights, variant=variant,
                     **kwargs)
        return tokens.clone()  # [0, d]
    if max_seqlen is not None and int(max_seqlen) < L:
        raise ValueError(f"max_seqlen {max_seqlen} is smaller than the longest sequence ({L})")
    check_backend_name(backend)
    x = tokens.unsqueeze(0)  # [1, total, d]: one row holding every sequence
    tok = (x, None, None) if variant == "speechbrain" else (x, x, x)
    unpacked = check_inputs(*tok, *weights, variant=variant, **kwargs)
    packed = dataclasses.replace(unpacked, blocks=MixingBlocks(unpacked.mode, cu))
    return run(backend, packed, on_chosen)[0]  # packed, or padded where the backend takes no packing


def _is_zero(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == 0
