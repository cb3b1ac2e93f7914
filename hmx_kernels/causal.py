"""Causal and chunk-causal mixing modes, and recognising speechbrain's attention masks as one.

A mode is (chunk_size C, left_context_chunks L), docs/HYPERMIXING.md "Causal and chunked mixing":
a token t in chunk c = t // C mixes with the state summed over the tokens of chunks
max(0, c - L) .. c (its own whole chunk included); L = None means every earlier chunk.
- non-causal (the default): no mode (`None`), the limit C >= N;
- token-causal (`causal=True`): C = 1, L = None: P_t sums the tokens s <= t;
- chunk-causal (speechbrain's Dynamic Chunk Training, `DynChunkTrainConfig(chunk_size,
  left_context_size)`): C = chunk_size, L = left_context_size (None: infinite left context).

speechbrain passes such masks to its layers as `attn_mask` ([N, N]; float with -inf where a query
may not see a key, or bool with True there). `mode_from_attn_mask` recognises the masks of
`get_lookahead_mask` and `make_transformer_src_mask` and returns the mode; any other mask is an
error (HyperMixing's state is a sum over tokens: it can only restrict which tokens enter the sum
in these chunk patterns), and so is a mask of another size than the sequence's. Recognition reads
the mask once (it is [N, N] already) and remembers the result for that tensor version, since every
layer of an encoder gets the same mask; an inference tensor (made under torch.inference_mode) has
no version counter and is read on every call. The mode depends on the mask's values, so under
torch.compile the recognition runs outside the graph (graph breaks), and
torch.compile(fullgraph=True) raises, saying so (build the layer with causal= / chunk_size=).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["MixingMode", "resolve_mode", "mode_from_attn_mask", "allowed_matrix"]


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


# mask tensor -> (its version when read, mode); weak: a freed mask leaves, and a new tensor at the
# same address is never mistaken for it
_RECOGNISED = WeakIdKeyDictionary()


COMPILE_NOTE = (
    "hmx_kernels: attn_mask_policy='honour' reads the attn_mask's values to find the mixing mode, which "
    "torch.compile cannot capture in the graph; build the layer with causal=True or chunk_size=... (and "
    "left_context_chunks=...) for one graph"
)


def mode_from_attn_mask(attn_mask: Tensor, length: Optional[int] = None) -> Optional[MixingMode]:
    """The mode an [N, N] speechbrain attention mask describes (None: it blocks nothing).

    Accepts float masks (0 = allowed, -inf = blocked) and bool masks (True = blocked), as
    speechbrain's get_lookahead_mask and make_transformer_src_mask build them; raises ValueError
    for any other pattern, and for a mask that is not [length, length] when `length` (the
    sequence's N) is given."""
    if not isinstance(attn_mask, Tensor) or attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1]:
        shape = list(attn_mask.shape) if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
        raise ValueError(f"attn_mask must be an [N, N] tensor, got {shape}")
    if length is not None and attn_mask.shape[0] != length:
        raise ValueError(
            f"attn_mask is {list(attn_mask.shape)} but the sequence has N = {length} tokens: an honoured attn_mask "
            f"must be [N, N] = [{length}, {length}] (one row per query, one column per key)"
        )
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=COMPILE_NOTE)
    if attn_mask.is_inference():  # no version counter: read it every time
        return _recognise(attn_mask)
    seen = _RECOGNISED.get(attn_mask)
    if seen is not None and seen[0] == attn_mask._version:
        return seen[1]
    mode = _recognise(attn_mask)
    _RECOGNISED[attn_mask] = (attn_mask._version, mode)
    return mode


def _recognise(attn_mask: Tensor) -> Optional[MixingMode]:
    if attn_mask.dtype == torch.bool:
        allowed = ~attn_mask
    elif attn_mask.is_floating_point():
        if not bool(((attn_mask == 0) | (attn_mask == float("-inf"))).all()):
            raise ValueError("a float attn_mask must hold only 0 (allowed) and -inf (blocked): HyperMixing cannot "
                             "weight tokens, only leave them out of its sum")
        allowed = attn_mask == 0
    else:
        raise TypeError(f"attn_mask must be float (0 / -inf) or bool (True = blocked), got {attn_mask.dtype}")
    n = allowed.shape[0]
    allowed = allowed.cpu()
    if bool(allowed.all()):
        mode = None
    else:
        first_row = allowed[0]
        C = int(first_row.sum())  # chunk 0 sees exactly its own chunk
        if C < 1 or not bool(first_row[:C].all()):
            raise ValueError(_UNRECOGNISED)
        lo = allowed.int().argmax(dim=1)  # first allowed key of each query
        ct = torch.arange(n) // C
        if bool((lo == 0).all()):
            L = None
        else:
            L = int((ct - lo // C).max())
        mode = MixingMode(C, L)
        if not torch.equal(allowed, allowed_matrix(mode, n)):
            raise ValueError(_UNRECOGNISED)
    return mode


_UNRECOGNISED = (
    "attn_mask is not a causal or chunk-causal mask: HyperMixing honours speechbrain's causal mask "
    "(get_lookahead_mask) and its Dynamic Chunk Training masks (make_transformer_src_mask with a chunk "
    "size and left context), where every query sees whole chunks up to its own; other masks cannot be "
    "expressed as a restriction of its token sum"
)
