"""The one place that knows which backend serves which call, and says why when none does.

Each backend is registered with a name, a `not_supported_reasons(problem)` function (empty list =
it can run this call) and a `forward(problem)` function. Heavy imports (triton, the C++ extension)
happen inside those functions, so `import hmx_kernels` stays cheap.

`backend="auto"` tries, in order, the backends listed in AUTO_ORDER for the inputs' device type
and takes the first that supports the call; an explicit name runs that backend or raises an error
that lists its reasons. `available_backends(problem)` reports every backend and its reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List

from torch import Tensor

from .validation import HyperMixingProblem

__all__ = [
    "Backend",
    "register_backend",
    "registered_backends",
    "select_backend",
    "backend_reasons",
    "AUTO_ORDER",
    "BackendNotSupportedError",
]


class BackendNotSupportedError(RuntimeError):
    """No backend (or not the requested one) can run this call; the message lists why."""


@dataclass
class Backend:
    name: str
    description: str
    forward: Callable[[HyperMixingProblem], Tensor]
    not_supported_reasons: Callable[[HyperMixingProblem], List[str]] = field(default=lambda p: [])


_REGISTRY: Dict[str, Backend] = {}

# auto preference per device type; names not registered are skipped
AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "reference"],
    "cpu": ["cpu", "reference"],
}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def registered_backends() -> List[str]:
    return list(_REGISTRY)


def backend_reasons(problem: HyperMixingProblem) -> Dict[str, List[str]]:
    """For every registered backend, why it cannot run `problem` (empty list: it can)."""
    return {name: list(b.not_supported_reasons(problem)) for name, b in _REGISTRY.items()}


def _format_reasons(reasons: Dict[str, List[str]]) -> str:
    lines = []
    for name, rs in reasons.items():
        lines.append(f"  {name}: " + ("; ".join(rs) if rs else "supported"))
    return "\n".join(lines)


def select_backend(name: str, problem: HyperMixingProblem) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        order = AUTO_ORDER.get(problem.device.type, ["reference"])
        for candidate in order:
            backend = _REGISTRY.get(candidate)
            if backend is not None and not backend.not_supported_reasons(problem):
                return backend
        raise BackendNotSupportedError(
            f"no HyperMixing backend supports inputs on {problem.device} with dtype {problem.dtype}:\n"
            + _format_reasons(backend_reasons(problem))
        )
    backend = _REGISTRY.get(name)
    if backend is None:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {['auto'] + registered_backends()}"
        )
    reasons = backend.not_supported_reasons(problem)
    if reasons:
        raise BackendNotSupportedError(
            f"backend {name!r} cannot run this call: " + "; ".join(reasons)
            + "\nall backends:\n" + _format_reasons(backend_reasons(problem))
        )
    return backend
