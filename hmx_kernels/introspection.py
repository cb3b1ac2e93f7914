"""Which backend a FusedHyperMixing call runs, and why the others do not.

`layer.last_backend` names the backend of the layer's last forward (kept by the layer itself, also
under torch.compile). `explain(layer, *args, **kwargs)` runs `layer(*args, **kwargs)` once, without
autograd, and returns a BackendReport for that call: the backend that ran and, for every
registered backend, `dispatch.backend_reasons`' reasons why it cannot run the call or, for one
that could, why it was not the one chosen (a backend earlier in the auto order, or an explicit
backend=). Given a model instead of a layer, it reports every FusedHyperMixing inside that ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Union

import torch
from torch import nn

from .dispatch import AUTO_ORDER, backend_reasons
from .layer import FusedHyperMixing

__all__ = ["BackendReport", "explain"]


@dataclass(frozen=True)
class BackendReport:
    requested: str  # the layer's backend argument ("auto" or a name)
    backend: str  # the backend that ran
    device_type: str
    reasons: Dict[str, List[str]]  # every registered backend -> why it cannot run the call ([] = it can)
    auto_order: List[str]  # the backends "auto" tries for this device type, in order

    def why_not(self, name: str) -> str:
        """Why backend `name` did not run this call ("" for the one that ran)."""
        if name == self.backend:
            return ""
        if name not in self.reasons:
            return f"{name!r} is not a registered backend"
        if self.reasons[name]:
            return "; ".join(self.reasons[name])
        if self.requested != "auto":
            return f"it could run the call, but backend={self.requested!r} was requested"
        if name not in self.auto_order:
            return (f"it could run the call, but 'auto' does not try it on {self.device_type} "
                    f"(backend={name!r} selects it)")
        return (f"it could run the call, but {self.backend!r} comes before it in the auto order for "
                f"{self.device_type} ({', '.join(self.auto_order)})")

    def __str__(self) -> str:
        how = ("the first backend of the auto order for " + self.device_type + " that supports the call"
               if self.requested == "auto" else "requested by name")
        lines = [f"ran: {self.backend} (backend={self.requested!r}: {how})"]
        lines += [f"  {name}: {self.why_not(name)}" for name in self.reasons if name != self.backend]
        return "\n".join(lines)


def explain(module: nn.Module, *args, **kwargs) -> Union[BackendReport, Dict[str, BackendReport]]:
    """Run `module(*args, **kwargs)` once under torch.no_grad() and report which backend each
    FusedHyperMixing call ran and why the others did not.

    module: a FusedHyperMixing (returns one BackendReport, for its last call in the run) or any
    model containing some (returns {qualified name: BackendReport} for those that ran). Every call
    is reported: padded batches, packed sequences (cu_seqlens; `reasons` are those of the packed
    problem, and a backend without the `packed` kind runs them padded) and sequence-parallel calls."""
    if isinstance(module, FusedHyperMixing):
        layers = {"": module}
    else:
        layers = {name: m for name, m in module.named_modules() if isinstance(m, FusedHyperMixing)}
        if not layers:
            raise ValueError(f"{type(module).__name__} contains no FusedHyperMixing layer to explain")
    reports: Dict[str, BackendReport] = {}

    def probe_for(name, layer):
        def probe(problem, chosen):
            device_type = problem.device.type
            reports[name] = BackendReport(
                requested=layer.backend, backend=chosen, device_type=device_type,
                reasons=backend_reasons(problem), auto_order=list(AUTO_ORDER.get(device_type, ["reference"])))
        return probe

    try:
        for name, layer in layers.items():
            layer._dispatch_probe = probe_for(name, layer)
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for layer in layers.values():
            layer._dispatch_probe = None
    if isinstance(module, FusedHyperMixing):
        if not reports:
            raise ValueError("the call ran no HyperMixing")
        return reports[""]
    if not reports:
        raise ValueError("no FusedHyperMixing layer of the model ran")
    return reports
