"""Mixing blocks: which tokens a token mixes with, as one typed value from the API to the kernels.

HyperMixing's state is a sum over tokens, so every mask it can honour cuts the tokens of a row
into blocks, each with its own partial sum, and lets a token read the sum over a window of blocks
(docs/HYPERMIXING.md "Causal and chunked mixing"; csrc/hmx_params.h BlockMap is the same idea in
the kernels). Four kinds, and their combinations:

  full          every token of the row (one block)                       MixingBlocks()
  token-causal  token t reads the tokens s <= t (blocks of 1)            MixingBlocks(MixingMode(1))
  chunk-causal  chunks of C, each reading its own and L earlier chunks   MixingBlocks(MixingMode(C, L))
                (L None: all earlier chunks)
  packed        cu_seqlens cuts the one row into sequences, each mixed   MixingBlocks(cu_seqlens=cu)
                on its own (with any of the kinds above inside)

`check_inputs` builds the value once (`HyperMixingProblem.blocks`); backends declare the kinds they
take (`Capabilities.blocks`), and the dispatcher compares the two; the fused ops receive
`op_args()`, the schema's (chunk_size, left_context, cu_seqlens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

import torch
from torch import Tensor

from .causal import MixingMode, allowed_matrix

__all__ = ["MixingBlocks", "BLOCK_KINDS", "FULL", "TOKEN_CAUSAL", "CHUNK_CAUSAL", "PACKED", "ALL_KINDS"]

FULL, TOKEN_CAUSAL, CHUNK_CAUSAL, PACKED = "full", "token-causal", "chunk-causal", "packed"
BLOCK_KINDS: Tuple[str, ...] = (FULL, TOKEN_CAUSAL, CHUNK_CAUSAL, PACKED)
ALL_KINDS: FrozenSet[str] = frozenset(BLOCK_KINDS)


@dataclass(frozen=True, eq=False)
class MixingBlocks:
    mode: Optional[MixingMode] = None  # None: non-causal (one block per row or per sequence)
    cu_seqlens: Optional[Tensor] = None  # int [num_seqs + 1] offsets into the one row, or None

    @property
    def kinds(self) -> FrozenSet[str]:
        """The kinds this value combines, e.g. {"packed", "chunk-causal"}."""
        inner = FULL if self.mode is None else TOKEN_CAUSAL if self.mode.token_causal else CHUNK_CAUSAL
        return frozenset({inner} if self.cu_seqlens is None else {inner, PACKED} - {FULL})

    @property
    def is_full(self) -> bool:
        return self.mode is None and self.cu_seqlens is None

    def op_args(self) -> Tuple[int, int, Optional[Tensor]]:
        """The fused ops' mixing-block arguments (chunk_size, left_context, cu_seqlens): chunk_size 0
        is no chunking, left_context -1 is every earlier chunk (hmx_kernels.ops)."""
        if self.mode is None:
            return 0, -1, self.cu_seqlens
        L = self.mode.left_context_chunks
        return self.mode.chunk_size, -1 if L is None else L, self.cu_seqlens

    def allowed_matrix(self, n: int, device=None) -> Tensor:
        """[n, n] bool, allowed[t, s] = token t mixes with token s: the O(n^2) definition the
        tests compare against (never used on a mixing path)."""
        if self.cu_seqlens is None:
            return allowed_matrix(self.mode, n, device)
        out = torch.zeros(n, n, dtype=torch.bool, device=device)
        cu = self.cu_seqlens.tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            out[a:b, a:b] = allowed_matrix(self.mode, b - a, device)
        return out

    def describe(self) -> str:
        inner = "non-causal" if self.mode is None else self.mode.describe()
        if self.cu_seqlens is None:
            return inner
        return f"{inner} over {self.cu_seqlens.numel() - 1} packed sequences"
