"""Causal and chunk-causal mixing modes.

A mode is (chunk_size C, left_context_chunks L), docs/HYPERMIXING.md "Causal and chunked mixing":
a token t in chunk c = t // C mixes with the state summed over the tokens of chunks
max(0, c - L) .. c (its own whole chunk included); L = None means every earlier chunk.
- non-causal (the default): no mode (`None`), the limit C >= N;
- token-causal (`causal=True`): C = 1, L = None: P_t sums the tokens s <= t;
- chunk-causal (speechbrain's Dynamic Chunk Training, `DynChunkTrainConfig(chunk_size,
  left_context_size)`): C = chunk_size, L = left_context_size (None: infinite left context).

`hmx_kernels.blocks.MixingBlocks` carries a mode (and packed sequences) from the API to the
kernels. Recognising speechbrain's attention masks as a mode is speechbrain-specific and lives in
`hmx_kernels.integrations.speechbrain` (`mode_from_attn_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MixingMode", "resolve_mode", "allowed_matrix"]


@dataclass(frozen=True)
class MixingMode:
    chunk_size: int  # C >= 1
    left_context_chunks: Optional[int] = None  # L >= 0, None = all earlier chunks

    def __post_init__(self):
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        L = self.left_context_chunks
        if L is not None and (isinstance(L, bool) or not isinstance(L, int) or L < 0):
            raise ValueError(f"left_context_chunks must be None or an int >= 0, got {L!r}")

    @property
    def token_causal(self) -> bool:
        return self.chunk_size == 1 and self.left_context_chunks is None

    def describe(self) -> str:
        if self.token_causal:
            return "token-causal"
        left = "all earlier chunks" if self.left_context_chunks is None else f"{self.left_context_chunks} chunks of left context"
        return f"chunk-causal (chunk_size {self.chunk_size}, {left})"


def resolve_mode(causal: bool = False, chunk_size: Optional[int] = None,
                 left_context_chunks: Optional[int] = None) -> Optional[MixingMode]:
    """The mode of the functional/layer arguments, or None for non-causal mixing."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if chunk_size is None:
        if left_context_chunks is not None:
            raise ValueError("left_context_chunks needs chunk_size (the chunk it counts in)")
        return MixingMode(1) if causal else None
    if causal and chunk_size != 1:
        raise ValueError(
            f"causal=True means token-causal (chunk_size 1); for chunk-causal mixing pass chunk_size={chunk_size} "
            "without causal=True"
        )
    return MixingMode(chunk_size, left_context_chunks)


def allowed_matrix(mode: Optional[MixingMode], n: int, device=None) -> Tensor:
    """[n, n] bool: allowed[t, s] = token t mixes with token s (O(n^2): for tests and checks)."""
    idx = torch.arange(n, device=device)
    if mode is None:
        return torch.ones(n, n, dtype=torch.bool, device=device)
    ct, cs = (idx // mode.chunk_size)[:, None], (idx // mode.chunk_size)[None, :]
    allowed = cs <= ct
    if mode.left_context_chunks is not None:
        allowed &= cs >= ct - mode.left_context_chunks
    return allowed


def __getattr__(name):
    # mode_from_attn_mask (and its compile note) moved to hmx_kernels.integrations.speechbrain
    if name in ("mode_from_attn_mask", "COMPILE_NOTE"):
        import warnings

        from .integrations import speechbrain as _sb

        warnings.warn(f"hmx_kernels.causal.{name} moved to hmx_kernels.integrations.speechbrain",
                      DeprecationWarning, stacklevel=2)
        return getattr(_sb, "HONOUR_COMPILE_NOTE" if name == "COMPILE_NOTE" else name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
