"""Streaming causal HyperMixing: a sequence processed in consecutive pieces, with a carried state.

In a causal mode (hmx_kernels.causal) the output of a chunk depends only on its own and earlier
chunks, through sums of per-chunk partial states Q_j = sum_{s in chunk j} m_s W1_s^T V_s. The
`StreamingState` carries exactly what the next piece needs: the position of its first token (the
positional encoding continues), and the running sum of every earlier chunk's Q (L = None) or the
last L chunks' Q (L chunks of left context) — O(1) memory in the number of pieces. Feeding a
sequence piece by piece gives the result of one pass over the whole sequence.

A state also remembers what it belongs to: the variant and mode it was started for, and, from
its first piece on, the batch size, heads, d_h, k_h, operand dtype and device. A piece that does
not fit (another batch size, a layer with another k_h, fp32 tokens after an fp64 state, another
device, the other variant) raises `StreamingStateMismatch` naming the state and every mismatch,
instead of broadcasting the carried sums onto the wrong shape or failing deep inside torch.

A chunk's output depends on its whole chunk, so every piece but the last must hold whole chunks
(a multiple of chunk_size tokens; any length for the token-causal mode). Layers stream with
`FusedHyperMixing.stream()` or `layer(piece, state=state)`.

Which backend computes a piece: backends declare the modes in which they take a carried state
(`Capabilities.carried_state`) and compute a piece with `Backend.stream_forward`; backend="auto"
takes the first of the device's auto order that can. The fused backends share one streamed-piece
function over their ops (hmx_kernels.ops.fused_stream_forward): with unbounded left context the
state enters every chunk's window (or starts the token scan) and the next state is the op state's
last slot; with L chunks of left context one call (cpu, triton: their state then holds every
chunk's own partial state Q_j) or two (cuda: a first call gives the Q_j, a second adds each
chunk's window terms); forward and backward pass through the state either way. The `cpu` backend (the C++ twin) and the `triton` backend (CUDA tensors; CPU tensors
under TRITON_INTERPRET=1; float32 / float16 / bfloat16) stream every causal mode this way, the
`reference` every mode with its own code. All keep the state in the same form (P, compute dtype),
so a stream may change backend between pieces. The `cuda` backend (the cpp ops on CUDA tensors,
`cuda_stream_forward` in hmx_kernels/cpp/ops.py) streams chunk-causal mixing the same way; it
declines token-causal mixing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .causal import MixingMode, resolve_mode
from .dispatch import AUTO_ORDER, BackendNotSupportedError, check_backend_name, get_backend, registered_backends
from .problem import HyperMixingProblem, check_inputs
from .variants import get_variant

__all__ = ["StreamingState", "StreamingStateMismatch", "LayerStream", "hyper_mixing_stream"]


class StreamingStateMismatch(ValueError):
    """A streaming state was handed a piece (or a layer) it does not belong to."""


@dataclass(frozen=True, eq=False)  # compared by identity: it holds a tensor
class StreamingState:
    """What the next piece of a streamed sequence needs, and what it belongs to.

    Identity fields left None (a fresh state) are taken from the first piece; after that every
    piece must match them. `carry` is in the compute dtype (float64 for float64 pieces, else
    float32): [B, H, k_h, d_h] (unlimited left context) or [B, H, r <= L, k_h, d_h]."""

    mode: MixingMode
    position: int = 0  # tokens consumed so far = position of the next piece's first token
    carry: Optional[Tensor] = None
    finished: bool = False  # the last piece ended inside a chunk: nothing may follow
    variant: Optional[str] = None
    batch: Optional[int] = None
    heads: Optional[int] = None
    head_dim: Optional[int] = None  # d_h
    hidden_per_head: Optional[int] = None  # k_h
    dtype: Optional[torch.dtype] = None  # operand dtype of the pieces (after autocast)
    device: Optional[torch.device] = None

    def __post_init__(self):
        if not isinstance(self.mode, MixingMode):
            raise TypeError(f"StreamingState.mode must be a MixingMode, got {self.mode!r}")
        if isinstance(self.position, bool) or not isinstance(self.position, int) or self.position < 0:
            raise ValueError(f"StreamingState.position must be an int >= 0, got {self.position!r}")
        if self.variant is not None:
            object.__setattr__(self, "variant", get_variant(self.variant).name)
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))

    def describe(self) -> str:
        """One line naming the state: mode, variant, shapes, dtype, device and next position."""
        parts = [self.mode.describe()]
        if self.variant is not None:
            parts.append(f"variant {self.variant!r}")
        for label, value in (("batch", self.batch), ("H", self.heads), ("d_h", self.head_dim),
                             ("k_h", self.hidden_per_head)):
            if value is not None:
                parts.append(f"{label} {value}")
        if self.dtype is not None:
            parts.append(str(self.dtype).replace("torch.", ""))
        if self.device is not None:
            parts.append(f"on {self.device}")
        parts.append(f"next position {self.position}")
        return f"streaming state ({', '.join(parts)})"

    def detach(self) -> "StreamingState":
        """The same state cut from the autograd graph (truncated backpropagation, inference)."""
        return dataclasses.replace(self, carry=None if self.carry is None else self.carry.detach())

    def check_fits(self, p: HyperMixingProblem) -> None:
        """Raise StreamingStateMismatch unless a piece described by `p` may continue this state."""
        wrong: List[str] = []
        if self.variant is not None and self.variant != p.variant.name:
            wrong.append(f"variant: the state is {self.variant!r}, the piece {p.variant.name!r}")
        for label, mine, theirs in (("batch size", self.batch, p.B), ("heads", self.heads, p.H),
                                    ("d_h", self.head_dim, p.d_h), ("k_h", self.hidden_per_head, p.k_h)):
            if mine is not None and mine != theirs:
                wrong.append(f"{label}: the state has {mine}, the piece {theirs}")
        if self.dtype is not None and self.dtype != p.dtype:
            wrong.append(f"dtype: the state is {self.dtype}, the piece {p.dtype}")
        if self.device is not None and self.device != p.device:
            wrong.append(f"device: the state is on {self.device}, the piece on {p.device}")
        wrong += self._carry_mismatches(p)
        if wrong:
            raise StreamingStateMismatch(f"the {self.describe()} does not fit this piece: " + "; ".join(wrong))

    def _carry_mismatches(self, p: HyperMixingProblem) -> List[str]:
        """The carried tensor itself against the piece (guards a state built by hand)."""
        c = self.carry
        if c is None:
            return []
        if not isinstance(c, Tensor):
            return [f"carry must be a tensor, got {type(c).__name__}"]
        L = self.mode.left_context_chunks
        wrong = []
        if L is None:
            want = (p.B, p.H, p.k_h, p.d_h)
            if tuple(c.shape) != want:
                wrong.append(f"carry shape: {list(c.shape)}, the piece needs [B, H, k_h, d_h] = {list(want)}")
        elif c.dim() != 5 or tuple(c.shape[:2]) != (p.B, p.H) or tuple(c.shape[3:]) != (p.k_h, p.d_h) \
                or c.shape[2] > L:
            wrong.append(f"carry shape: {list(c.shape)}, the piece needs [B, H, r <= {L}, k_h, d_h] with "
                         f"B={p.B}, H={p.H}, k_h={p.k_h}, d_h={p.d_h}")
        if c.dtype != p.compute_dtype:
            wrong.append(f"carry dtype: {c.dtype}, the piece accumulates in {p.compute_dtype}")
        if c.device != p.device:
            wrong.append(f"carry device: {c.device}, the piece is on {p.device}")
        return wrong


def hyper_mixing_stream(
    piece: Tensor,  # [B, n, d]: the next n tokens of every sequence
    *weights,
    state: Optional[StreamingState] = None,
    variant: str = "speechbrain",
    causal: bool = False,
    chunk_size: Optional[int] = None,
    left_context_chunks: Optional[int] = None,
    key_padding_mask: Optional[Tensor] = None,  # [B, n] for this piece
    use_layer_norm: bool = True,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tuple[Tensor, StreamingState]:
    """Mix the next piece of a sequence causally; returns (output [B, n, d], the new state).

    `weights` are `hyper_mixing`'s ten parameter tensors; self-mixing (both variants). The first
    call takes state=None and the mode arguments (or a fresh `StreamingState(mode)`); later calls
    take the returned state (its mode wins; passing a different mode is an error). A state that
    does not fit the piece raises StreamingStateMismatch. backend: "auto" (the first backend of
    the device's auto order that streams this mode, see the module docstring) or a name.

    Example (token-causal, pieces of any length):
        >>> import torch, hmx_kernels
        >>> from hmx_kernels.streaming import hyper_mixing_stream
        >>> H, d_h, k_h = 2, 4, 6
        >>> w = [torch.randn(H, d_h, d_h), torch.randn(H, d_h), torch.randn(H, k_h, d_h), torch.randn(H, k_h)]
        >>> ln = [torch.ones(8), torch.zeros(8)]
        >>> x = torch.randn(1, 10, 8)
        >>> y1, s = hyper_mixing_stream(x[:, :3], *w, None, None, None, None, *ln, causal=True)
        >>> y2, s = hyper_mixing_stream(x[:, 3:], *w, None, None, None, None, *ln, state=s)
        >>> full = hmx_kernels.hyper_mixing(x, None, None, *w, None, None, None, None, *ln, causal=True)
        >>> torch.allclose(torch.cat([y1, y2], 1), full, atol=1e-5)
        True
    """
    mode = resolve_mode(causal, chunk_size, left_context_chunks)
    if state is None:
        if mode is None:
            raise ValueError("streaming needs a causal mode: causal=True or chunk_size=...")
        state = StreamingState(mode)
    elif not isinstance(state, StreamingState):
        raise TypeError(f"state must be a hmx_kernels.streaming.StreamingState or None, got {type(state).__name__}")
    elif mode is not None and mode != state.mode:
        raise StreamingStateMismatch(f"the {state.describe()} was started for {state.mode.describe()} mixing, "
                                     f"not {mode.describe()}")
    if state.finished:
        raise ValueError(f"the {state.describe()} ended inside a chunk, so its piece was the last one: "
                         "start a new state")
    mode = state.mode
    n = piece.shape[1] if isinstance(piece, Tensor) and piece.dim() == 3 else None
    p = check_inputs(piece, piece, piece, *weights, variant=variant, key_padding_mask=key_padding_mask,
                     query_padding_mask=key_padding_mask if variant != "speechbrain" else None,
                     use_layer_norm=use_layer_norm, eps=eps, chunk_size=mode.chunk_size,
                     left_context_chunks=mode.left_context_chunks, position_offset=state.position)
    state.check_fits(p)
    y, carry = select_stream_backend(backend, p).stream_forward(p, state.carry)
    new = StreamingState(mode, state.position + n, carry, finished=n % mode.chunk_size != 0,
                         variant=p.variant.name, batch=p.B, heads=p.H, head_dim=p.d_h, hidden_per_head=p.k_h,
                         dtype=p.dtype, device=p.device)
    return y.to(p.out_dtype), new


def stream_reasons(name: str, p: HyperMixingProblem) -> List[str]:
    """Why backend `name` cannot compute the streamed piece `p` with a carried state ([]: it can)."""
    b = get_backend(name)
    caps = b.capabilities
    if caps.carried_state is None or b.stream_forward is None:
        return ["takes no carried state (streaming) yet"]
    if not caps.carried_state(p.mode):
        return [f"takes no carried state in {p.mode.describe()} mixing"]
    if "*" not in caps.devices and p.dtype not in caps.dtypes:
        names = ", ".join(str(t).replace("torch.", "") for t in caps.dtypes)
        return [f"streams {names} only, not {p.dtype}"]
    # a streaming backend continues the positions itself (its stream_forward passes the piece's
    # position offset to its ops), whether or not it takes position offsets otherwise (sequence
    # parallelism, Capabilities.sequence_parallel)
    return b.not_supported_reasons(dataclasses.replace(p, position_offset=0) if p.position_offset else p)


def select_stream_backend(name: str, p: HyperMixingProblem):
    """The backend that computes streamed piece `p`: for "auto" the first of the device's auto order
    that can, else the named one or BackendNotSupportedError with its reasons."""
    check_backend_name(name)
    if name == "auto":
        for candidate in AUTO_ORDER.get(p.device.type, ["reference"]):
            if candidate in registered_backends() and not stream_reasons(candidate, p):
                return get_backend(candidate)
        name = "reference"
    reasons = stream_reasons(name, p)
    if reasons:
        raise BackendNotSupportedError(f"backend {name!r} cannot stream this piece: " + "; ".join(reasons)
                                       + " (backend='auto' picks one that can; 'reference' streams every mode)")
    return get_backend(name)


class LayerStream:
    """A FusedHyperMixing layer streaming one batch of sequences: `y = stream(piece)` per piece.

    Holds the layer and the current `state` (readable, and replaceable, e.g. by `state.detach()`
    between pieces for truncated backpropagation). Built by `FusedHyperMixing.stream()`."""

    def __init__(self, layer, state: StreamingState) -> None:
        self.layer = layer
        self.state = state

    def __call__(self, piece: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        out = self.layer(piece, key_padding_mask=key_padding_mask, state=self.state)
        y, self.state = out
        return y

    def __repr__(self) -> str:
        return f"LayerStream({self.state.describe()})"
