"""Shared test helpers: random HyperMixing problems, forward+backward with one upstream gradient,
comparisons that report which output or gradient differs and by how much, non-contiguous copies
of a problem, and `check_against_reference` (one backend against the reference, output and every
gradient), which tests/test_conformance.py and the backend-specific tests share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch

import hmx_kernels
from hmx_kernels.problem import WEIGHT_NAMES  # noqa: F401  (the one spelling of the ten names)


@dataclass
class Case:
    """One HyperMixing call: tensors (leaves that require grad) and options."""

    tensors: Dict[str, Optional[torch.Tensor]]
    variant: str
    key_padding_mask: Optional[torch.Tensor]
    query_padding_mask: Optional[torch.Tensor]
    use_layer_norm: bool
    tied: bool
    extra: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        kw = dict(self.tensors)
        kw.update(
            variant=self.variant,
            key_padding_mask=self.key_padding_mask,
            query_padding_mask=self.query_padding_mask,
            use_layer_norm=self.use_layer_norm,
        )
        return kw

    def leaves(self) -> Dict[str, torch.Tensor]:
        """Every distinct tensor that requires grad, by name (tied w2 names are left out)."""
        out, seen = {}, set()
        for name, t in self.tensors.items():
            if t is not None and t.requires_grad and id(t) not in seen:
                out[name] = t
                seen.add(id(t))
        return out

    def cast(self, dtype: torch.dtype, device=None) -> "Case":
        """A copy with the same values in another dtype/device (new leaves)."""
        mapping, tensors = {}, {}
        for name, t in self.tensors.items():
            if t is None:
                tensors[name] = None
            elif id(t) in mapping:
                tensors[name] = mapping[id(t)]
            else:
                c = t.detach().to(dtype=dtype, device=device).requires_grad_(t.requires_grad)
                mapping[id(t)] = c
                tensors[name] = c
        mv = lambda m: None if m is None else m.to(device)  # noqa: E731
        kpm = mv(self.key_padding_mask)
        qpm = kpm if self.query_padding_mask is self.key_padding_mask else mv(self.query_padding_mask)
        return Case(tensors, self.variant, kpm, qpm, self.use_layer_norm, self.tied, dict(self.extra))


def make_case(
    *,
    variant: str = "speechbrain",
    B: int = 2,
    M: int = 7,
    N: Optional[int] = None,
    d: int = 8,
    H: int = 2,
    k_h: int = 6,
    bias: bool = True,
    tied: bool = False,
    masks: bool = True,
    all_padded_batch: bool = False,
    use_layer_norm: bool = True,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    input_scale: float = 1.0,
) -> Case:
    """A random problem. speechbrain: self-mixing (N = M, one mask). idiap: N keys, M queries.

    masks=True pads the tail of every batch element but the first (a different length each);
    all_padded_batch=True pads the last batch element entirely.
    """
    g = torch.Generator().manual_seed(seed)
    N = M if (N is None or variant == "speechbrain") else N
    d_h = d // H

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device).requires_grad_(True)

    t: Dict[str, Optional[torch.Tensor]] = {}
    t["query"] = rnd(B, M, d, scale=input_scale)
    if variant == "speechbrain":
        t["key"] = t["value"] = None
    else:
        t["key"] = rnd(B, N, d, scale=input_scale)
        t["value"] = rnd(B, N, d, scale=input_scale)
    w_scale = 1.0 / d_h**0.5
    for gen in ("w1", "w2"):
        if gen == "w2" and tied:
            for part in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                t[f"w2_{part}"] = None
            continue
        t[f"{gen}_fc1_weight"] = rnd(H, d_h, d_h, scale=w_scale)
        t[f"{gen}_fc1_bias"] = rnd(H, d_h, scale=0.5) if bias else None
        t[f"{gen}_fc2_weight"] = rnd(H, k_h, d_h, scale=w_scale)
        t[f"{gen}_fc2_bias"] = rnd(H, k_h, scale=0.5) if bias else None
    if use_layer_norm:
        t["ln_weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype=dtype, device=device).requires_grad_(True)
        t["ln_bias"] = rnd(d, scale=0.1)
    else:
        t["ln_weight"] = t["ln_bias"] = None

    def tail_mask(length):
        m = torch.zeros(B, length, dtype=torch.bool)
        if masks:
            for b in range(1, B):
                m[b, max(1, length - (b * length) // (B + 1)):] = True
        if all_padded_batch:
            m[-1] = True
        return m.to(device)

    kpm = tail_mask(N) if (masks or all_padded_batch) else None
    if variant == "speechbrain":
        qpm = kpm
    else:
        qpm = tail_mask(M) if (masks or all_padded_batch) else None
    return Case(t, variant, kpm, qpm if variant != "speechbrain" else None, use_layer_norm, tied)


def forward_backward(case: Case, backend: str, grad_out: Optional[torch.Tensor] = None, fn=None):
    """Run the case through `fn` (default hmx_kernels.hyper_mixing with `backend`), backpropagate
    `grad_out` (default: a fixed random tensor), and return (out, {leaf name: grad})."""
    for leaf in case.leaves().values():
        leaf.grad = None
    if fn is None:
        out = hmx_kernels.hyper_mixing(**case.kwargs(), backend=backend)
    else:
        out = fn(**case.kwargs())
    if grad_out is None:
        g = torch.Generator().manual_seed(1234)
        grad_out = torch.randn(out.shape, generator=g).to(dtype=out.dtype, device=out.device)
    leaves = case.leaves()
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    return out.detach(), {name: gr for name, gr in zip(leaves, grads)}


def assert_close(name: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], rtol: float, atol_scale: float = None):
    """|actual - expected| <= rtol * max|expected| elementwise (a scale-relative bound: gradients
    and outputs are sums whose near-zero elements have no meaningful elementwise relative error).
    Also fails on NaN/Inf and on shape/None mismatches."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: one gradient is None ({actual is None}, {expected is None})"
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    scale = e.abs().max().item()
    tol = rtol * max(scale, 1e-30) if atol_scale is None else atol_scale
    err = (a - e).abs().max().item()
    assert err <= tol, f"{name}: max |diff| {err:.3e} > {tol:.3e} (rtol {rtol:g} x max|ref| {scale:.3e})"


def make_noncontiguous(case: Case, layout: str = "channels") -> Case:
    """Same values, stored as strided views.

    layout="channels": every token tensor is every other channel of a wider tensor stored
    batch-last (non-unit channel stride: neither contiguous nor dense); weights are stored with
    their last two dims swapped (transposed views); 1-D tensors are every other element.
    layout="rows": token tensors keep a unit channel stride but sit in a tensor twice as wide (row
    stride 2d, which the C++ twin takes without a copy); weights and 1-D tensors as above.
    """
    tensors, seen = {}, {}
    for name, t in case.tensors.items():
        if t is None:
            tensors[name] = None
            continue
        if id(t) in seen:
            tensors[name] = seen[id(t)]
            continue
        x = t.detach()
        if name in ("query", "key", "value"):
            B, L, d = x.shape
            if layout == "channels":
                wide = torch.zeros(L, 2 * d, B, dtype=x.dtype, device=x.device)
                wide[:, ::2, :] = x.permute(1, 2, 0)
                v = wide[:, ::2, :].permute(2, 0, 1)
            elif layout == "rows":
                wide = torch.zeros(B, L, 2 * d, dtype=x.dtype, device=x.device)
                wide[:, :, d:] = x
                v = wide[:, :, d:]
            else:
                raise ValueError(f"unknown layout {layout!r}")
        elif x.dim() >= 2:
            v = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        else:
            v = x.repeat_interleave(2)[::2]
        assert torch.equal(v, x) and (v.numel() <= 1 or not v.is_contiguous()), name
        v = v.detach().requires_grad_(t.requires_grad)
        seen[id(t)] = v
        tensors[name] = v
    return Case(tensors, case.variant, case.key_padding_mask, case.query_padding_mask,
                case.use_layer_norm, case.tied, dict(case.extra))


def _tolerance_pair(tol) -> Tuple[float, float]:
    """(output, gradient) rtol from a hmx_kernels.dispatch.Tolerance, a float or a pair."""
    if hasattr(tol, "out") and hasattr(tol, "grad"):
        return float(tol.out), float(tol.grad)
    if isinstance(tol, (tuple, list)):
        return float(tol[0]), float(tol[1])
    return float(tol), float(tol)


def check_against_reference(case: Case, backend: str, device: Union[str, torch.device], dtype: torch.dtype,
                            tol, *, layout: Optional[str] = None, grad_seed: int = 7):
    """`backend` against the reference on `case` cast to `dtype` on `device` (the same rounded
    values on both sides), forward and backward with the same upstream gradient.

    Asserts: the output has dtype `dtype` on `device`; the backend returns a gradient for exactly
    the leaves the reference does, each in its leaf's dtype; output and every gradient within
    `tol` (a Tolerance, a float, or an (output, gradient) pair; scale-relative, see assert_close;
    NaN or Inf fails). layout: run the backend on a make_noncontiguous copy with that layout (the
    reference runs on the contiguous one). Returns the backend's (out, grads)."""
    tol_out, tol_grad = _tolerance_pair(tol)
    ref_case = case.cast(dtype, device)
    test_case = ref_case if layout is None else make_noncontiguous(ref_case, layout)
    query = ref_case.tensors["query"]
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(query.shape, generator=g).to(dtype=dtype, device=query.device)
    out, grads = forward_backward(test_case, backend, grad_out)
    ref_out, ref_grads = forward_backward(ref_case, "reference", grad_out)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    assert out.device.type == torch.device(device).type, f"output on {out.device}, inputs on {device}"
    assert_close("out", out, ref_out, tol_out)
    assert set(grads) == set(ref_grads), f"gradients for {sorted(grads)} vs reference {sorted(ref_grads)}"
    leaves = test_case.leaves()
    for name, ref_grad in ref_grads.items():
        grad = grads[name]
        if ref_grad is not None:
            assert grad is not None, f"grad {name}: the backend returned no gradient"
        if grad is not None:
            assert grad.dtype == leaves[name].dtype, f"grad {name}: dtype {grad.dtype} != leaf dtype {leaves[name].dtype}"
        assert_close(f"grad {name}", grad, ref_grad, tol_grad)
    return out, grads


def import_speechbrain(module: str):
    """Import a speechbrain module. speechbrain's package import pulls torchaudio, which has no
    release for the CPU torch used in development and which its HyperMixing and Conformer encoder
    never call: when it cannot be imported, an empty stand-in module is registered first. Skips
    when speechbrain is missing, except in CI (where `make test` installs it)."""
    import importlib
    import os
    import sys
    import types

    import pytest

    try:
        import torchaudio  # noqa: F401
    except Exception:
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        if os.environ.get("CI"):
            raise
        pytest.skip(f"speechbrain is not installed ({e}); `make test` installs it")


def fp16_range_case(M: int):
    """The fp16-range case of the fused backends (tests/test_triton.py, tests/test_cuda_backend.py;
    tests/test_cuda_math.py emulates it): large values and fc2 weights make C = fc2_2^T GELU(P)
    and the pre-LayerNorm Y exceed fp16's 65504, and the LayerNorm then scales the gradient of Y
    below fp16's normal range (2^-14). With M > 64 the upstream gradient of the rows from 64 on is
    2^-4 times smaller, so per-tile powers of two differ (64-token tiles). Returns (the case, the
    fp16 upstream gradient); asserts that the case does what it is for."""
    import hmx_kernels

    base = make_case(variant="idiap", B=1, M=M, N=40, d=16, H=2, k_h=12, seed=12, input_scale=0.3)
    with torch.no_grad():
        base.tensors["value"].mul_(64)
        base.tensors["w2_fc2_weight"].mul_(256)
    plain = base.cast(torch.float32)
    plain.use_layer_norm = False
    y = hmx_kernels.hyper_mixing(**plain.kwargs(), backend="reference")
    assert y.abs().max() > 65504, "the case should overflow fp16 if C or Y were not scaled"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) * 2.0 ** -10
    if M > 64:
        g[:, 64:] *= 2.0 ** -4
    g = g.to(torch.float16)
    y = y.detach().requires_grad_(True)  # the gradient the kernels receive: through the LayerNorm
    ln = torch.nn.functional.layer_norm(y, (y.shape[-1],), plain.tensors["ln_weight"], plain.tensors["ln_bias"])
    (dy,) = torch.autograd.grad(ln, y, g.float())
    assert dy.abs().max() < 2.0 ** -14, "the gradient of Y should be below fp16's normal range"
    if M > 64:
        tile_max = [dy[0, i:i + 64].abs().max() for i in (0, 64)]
        assert torch.frexp(tile_max[0])[1] != torch.frexp(tile_max[1])[1], "the tiles' powers of two should differ"
    return base, g
