"""The one place that knows which backend serves which call, and says why when none does.

Each backend registers a `Backend`: a name, a `forward(problem) -> Tensor` and its
`Capabilities` as data (device types, operand dtypes it takes natively, dtypes it takes by
upcasting to float32, head-size limits, whether a generator may have one bias without the other)
plus an optional availability probe (e.g. "the C++ extension builds"). `not_supported_reasons`
is derived from that data, so every backend reads a problem the same way.

`backend="auto"` tries, in order, the backends listed in AUTO_ORDER for the inputs' device type
and takes the first that supports the call; an explicit name runs that backend or raises an error
that lists its reasons. `backend_reasons(problem)` reports every backend and its reasons.

`run(name, problem)` is the one route every call takes (hyper_mixing, the layer, packed
sequences): it chooses (`choose`) and runs. It also owns the packed-to-padded fallback: a packed
problem (cu_seqlens) goes to the first candidate that takes packed sequences, or to one that
declares no `packed` kind but takes everything else, which then runs a padded
[num_seqs, max_len, d] batch with a padding mask (`_run_padded`: same result, compute spent on the
padding). Sequence-parallel calls choose first, agree with the other ranks, then run
(hmx_kernels.functional).

The availability probes run once per process and key (they may build the extension: a lock, the
file system); they are marked with `constant_result` (= torch.compiler.assume_constant_result),
so under torch.compile they run at trace time, outside the graph, and the call itself has no
graph break.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

from .blocks import CHUNK_CAUSAL, FULL, PACKED, TOKEN_CAUSAL, MixingBlocks
from .problem import FLOAT_DTYPES, HyperMixingProblem

__all__ = [
    "Backend",
    "Capabilities",
    "Tolerance",
    "register_backend",
    "registered_backends",
    "get_backend",
    "select_backend",
    "choose",
    "run",
    "backend_reasons",
    "check_backend_name",
    "AUTO_ORDER",
    "BackendNotSupportedError",
    "constant_result",
]


def constant_result(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo (which imports triton
    and costs about a second at `import hmx_kernels`): it sets the same marker attribute, which
    tests/test_ops.py checks against torch's own decorator."""
    fn._dynamo_marked_constant = True
    return fn


class BackendNotSupportedError(RuntimeError):
    """No backend (or not the requested one) can run this call; the message lists why."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend takes, as data. `available(device_type)` returns () or the reasons why the
    backend cannot run at all here (missing compiler, triton, ...); it is consulted last."""

    devices: Tuple[str, ...]  # device types; "*" = any
    dtypes: Tuple[torch.dtype, ...]
    upcast_dtypes: Tuple[torch.dtype, ...] = ()  # taken by computing in float32, result cast back
    max_d_h: Optional[int] = None
    max_k_h: Optional[int] = None
    partial_biases: bool = True
    # the mixing-block kinds it runs (hmx_kernels.blocks: full, token-causal, chunk-causal, packed);
    # a call is taken when every kind of its MixingBlocks is listed
    blocks: FrozenSet[str] = frozenset({FULL})
    sequence_parallel: bool = False  # takes a sequence-parallel group (and so position offsets)
    position_offset: bool = False  # takes a global position for the first token (a slice of a sequence)
    # streaming (hmx_kernels.streaming): mode -> whether it computes a piece with a carried state in
    # that causal mode (Backend.stream_forward); None: it takes no carried state
    carried_state: Optional[Callable] = None
    device_note: str = ""  # appended to the device reason
    available: Optional[Callable[[str], Tuple[str, ...]]] = None

    @property
    def causal(self) -> bool:
        """Runs token-causal and chunk-causal mixing."""
        return {TOKEN_CAUSAL, CHUNK_CAUSAL} <= self.blocks

    @property
    def varlen(self) -> bool:
        """Runs packed sequences (cu_seqlens) without padding them."""
        return PACKED in self.blocks

    def reasons(self, p: HyperMixingProblem) -> List[str]:
        out = []
        if "*" not in self.devices and p.device.type not in self.devices:
            out.append(f"runs on {', '.join(self.devices)} tensors, got {p.device}{self.device_note}")
        if p.dtype not in self.dtypes + self.upcast_dtypes:
            names = ", ".join(str(t).replace("torch.", "") for t in self.dtypes + self.upcast_dtypes)
            out.append(f"takes {names}, not {p.dtype}")
        if self.max_d_h is not None and p.d_h > self.max_d_h:
            out.append(f"head size d_h = d/H = {p.d_h} exceeds its limit {self.max_d_h} (use more heads)")
        if self.max_k_h is not None and p.k_h > self.max_k_h:
            out.append(f"hypernetwork size per head k_h = {p.k_h} exceeds its limit {self.max_k_h}")
        missing = p.blocks.kinds - self.blocks
        if missing & {TOKEN_CAUSAL, CHUNK_CAUSAL}:
            out.append(f"{p.mode.describe()} mixing is not implemented by this backend yet (backend='reference' has it)")
        if not self.sequence_parallel and p.sequence_parallel_group is not None:
            out.append("sequence parallelism is not implemented by this backend yet (backend='reference' and "
                       "'cpu' have it)")
        elif not (self.sequence_parallel or self.position_offset) and p.position_offset:
            out.append("position offsets are not implemented by this backend yet (backend='reference' has them)")
        if PACKED in missing:
            out.append("packed sequences (cu_seqlens) are not implemented by this backend yet (the dispatcher "
                       "runs it on a padded batch instead)")
        if not self.partial_biases and p.partial_biases:
            out.append("a generator with an fc1 bias but no fc2 bias (or the reverse) is not supported")
        if not out and self.available is not None:
            out.extend(self.available(p.device.type))
        return out


@dataclass(frozen=True)
class Tolerance:
    """How close a backend's results must be to the reference's on the same inputs, scale-relative:
    max |backend - reference| <= out (or grad) * max |reference|, per output / per gradient.
    `why` says what both sides compute, what differs and what was measured."""

    out: float
    grad: float
    why: str


@dataclass
class Backend:
    name: str
    description: str
    forward: Callable[[HyperMixingProblem], Tensor]
    capabilities: Capabilities = Capabilities(devices=("*",), dtypes=FLOAT_DTYPES)
    # extra problem-dependent reasons beyond the capabilities (rarely needed)
    extra_reasons: Callable[[HyperMixingProblem], List[str]] = field(default=lambda p: [])
    # (device type, operand dtype) -> the tolerance the conformance suite checks against the reference
    tolerances: Dict[Tuple[str, torch.dtype], Tolerance] = field(default_factory=dict)
    # (problem, carried state or None) -> (output, the next carried state): one streamed piece, in the
    # modes capabilities.carried_state accepts (hmx_kernels.streaming)
    stream_forward: Optional[Callable] = None

    def not_supported_reasons(self, p: HyperMixingProblem) -> List[str]:
        reasons = self.capabilities.reasons(p)
        return reasons if reasons else list(self.extra_reasons(p))


_REGISTRY: Dict[str, Backend] = {}

# auto preference per device type; names not registered are skipped. "meta" runs the fused ops'
# shape functions (no data, no extension needed).
AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "reference"],
    "cpu": ["cpu", "reference"],
    "meta": ["cpu", "reference"],
}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def registered_backends() -> List[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    check_backend_name(name)
    return _REGISTRY[name]


def check_backend_name(name) -> str:
    """Raises a clear error for anything but "auto" or a registered backend's name."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {['auto'] + registered_backends()}")
    return name


def backend_reasons(problem: HyperMixingProblem) -> Dict[str, List[str]]:
    """For every registered backend, why it cannot run `problem` (empty list: it can)."""
    return {name: b.not_supported_reasons(problem) for name, b in _REGISTRY.items()}


def _format_reasons(reasons: Dict[str, List[str]]) -> str:
    return "\n".join(f"  {name}: " + ("; ".join(rs) if rs else "supported") for name, rs in reasons.items())


def select_backend(name: str, problem: HyperMixingProblem) -> Backend:
    check_backend_name(name)
    if name == "auto":
        for candidate in AUTO_ORDER.get(problem.device.type, ["reference"]):
            backend = _REGISTRY.get(candidate)
            if backend is not None and not backend.not_supported_reasons(problem):
                return backend
        raise BackendNotSupportedError(
            f"no HyperMixing backend supports inputs on {problem.device} with dtype {problem.dtype}:\n"
            + _format_reasons(backend_reasons(problem))
        )
    backend = _REGISTRY[name]
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        raise BackendNotSupportedError(
            f"backend {name!r} cannot run this call: " + "; ".join(reasons)
            + "\nall backends:\n" + _format_reasons(backend_reasons(problem))
        )
    return backend


def choose(name: str, problem: HyperMixingProblem) -> Tuple[Backend, bool]:
    """(the backend that runs `problem`, whether it runs a padded copy of a packed problem).

    Unpacked problems: `select_backend`. Packed problems (cu_seqlens): the candidates in order
    (AUTO_ORDER for "auto", else the one named); the first that takes them packed, or that takes
    no packed sequences but everything else, wins; none: the error of `select_backend`."""
    if problem.cu_seqlens is None:
        return select_backend(name, problem), False
    check_backend_name(name)
    unpacked = dataclasses.replace(problem, blocks=MixingBlocks(problem.mode))
    names = AUTO_ORDER.get(problem.device.type, ["reference"]) if name == "auto" else [name]
    for candidate in names:
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        if not backend.not_supported_reasons(problem):
            return backend, False
        if PACKED not in backend.capabilities.blocks and not backend.not_supported_reasons(unpacked):
            return backend, True
    return select_backend(name, problem), False  # raises, naming every backend's reasons


def run(name: str, problem: HyperMixingProblem, on_chosen: Optional[Callable] = None) -> Tensor:
    """Choose a backend for `problem` and run it; `on_chosen(problem, backend_name)`, if given, is
    called with the choice before the run (the layer's `last_backend`, hmx_kernels.explain)."""
    backend, padded = choose(name, problem)
    if on_chosen is not None:
        on_chosen(problem, backend.name)
    return _run_padded(backend, problem) if padded else backend.forward(problem)


def _run_padded(backend: Backend, problem: HyperMixingProblem) -> Tensor:
    """A packed problem (B = 1, self-mixing, cu_seqlens) through `backend` as a padded batch: the
    sequences as rows of [num_seqs, L, d] (L the longest), a keep mask, the same weights, mode and
    options; the kept rows of the result, in packed order [1, total, d]. Differentiable (index_copy
    and index_select). Empty sequences are fully padded rows."""
    from .varlen import pad  # here: varlen imports this module

    cu = problem.cu_seqlens.to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    n, L = lengths.numel(), max(int(lengths.max()), 1)
    keep = torch.arange(L)[None, :] < lengths[:, None]  # [n, L]
    rows = torch.nonzero(keep.reshape(-1), as_tuple=False).squeeze(1).to(problem.device)

    def padded(t: Tensor) -> Tensor:  # [1, total, d] -> [n, L, d], zeros at the padding
        return pad(t[0], rows, n, L)

    query = padded(problem.query)
    key = query if problem.key is problem.query else padded(problem.key)
    value = query if problem.value is problem.query else key if problem.value is problem.key else padded(problem.value)
    keep_c = keep.to(problem.device, problem.compute_dtype)
    rows_problem = dataclasses.replace(
        problem, query=query, key=key, value=value, query_keep=keep_c, key_keep=keep_c, B=n, M=L, N=L,
        blocks=MixingBlocks(problem.mode))
    y = backend.forward(rows_problem)  # [n, L, d]
    return y.reshape(n * L, -1).index_select(0, rows).unsqueeze(0)
