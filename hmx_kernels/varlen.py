"""Packed variable-length batches in flash-attn's convention: tokens [total, d] and cu_seqlens
(int32 [num_seqs + 1], cumulative lengths), every sequence mixed on its own, its positions from 0
(speechbrain) or 1 (idiap).

`unpad` / `pad` convert between a padded batch with a padding mask and the packed form.
`hyper_mixing_varlen` is the functional op on packed tokens. Today it runs any backend through a
padded [num_seqs, max_seqlen, d] view with a padding mask, so it is exact on every backend but
still spends compute on the padding (the same as the padded batch); kernels that walk cu_seqlens
directly are the next step.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import hyper_mixing

__all__ = ["unpad", "pad", "hyper_mixing_varlen", "cu_seqlens_from_lengths"]


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
    if bool((cu[1:] == cu[:-1]).any()):
        raise ValueError("cu_seqlens has an empty sequence")
    return cu


def hyper_mixing_varlen(tokens: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int], *weights,
                        variant: str = "speechbrain", backend: str = "auto", **kwargs) -> Tensor:
    """HyperMixing of packed sequences: tokens [total, d], cu_seqlens [num_seqs + 1] -> [total, d].

    `weights` are `hyper_mixing`'s ten parameter tensors (w1 fc1/fc2 weight/bias, w2 the same or
    None for tied, ln weight/bias); every sequence mixes with itself only (self-mixing, both
    variants), its positional encoding from its own first position; other keyword arguments as in
    `hyper_mixing` (use_layer_norm, eps, causal, chunk_size, left_context_chunks)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be packed [total, d], got {list(tokens.shape)}")
    cu = _check_cu_seqlens(cu_seqlens, tokens.shape[0])
    lengths = cu[1:] - cu[:-1]
    n, L = lengths.numel(), int(lengths.max())
    if max_seqlen is not None and int(max_seqlen) < L:
        raise ValueError(f"max_seqlen {max_seqlen} is smaller than the longest sequence ({L})")
    pos = torch.arange(L)
    keep = pos[None, :] < lengths[:, None]  # [n, L]
    indices = torch.nonzero(keep.reshape(-1), as_tuple=False).squeeze(1).to(tokens.device)
    x = pad(tokens, indices, n, L)  # [n, L, d]
    padding = (~keep).to(tokens.device)
    if variant == "speechbrain":
        y = hyper_mixing(x, None, None, *weights, variant=variant, key_padding_mask=padding, backend=backend,
                         **kwargs)
    else:
        y = hyper_mixing(x, x, x, *weights, variant=variant, key_padding_mask=padding,
                         query_padding_mask=padding, backend=backend, **kwargs)
    return y.reshape(n * L, -1).index_select(0, indices)
