"""The contenders: HyperMixing per registered backend, and attention to compare against.

A `Contender` builds a `Case` for one (shape, batch, length, dtype, device): a forward closure, the
leaves whose gradients backward fills, and a `check` that returns the forward output's largest
scale-relative error against a float64 reference on batch element 0.

- hmx-<backend>: FusedHyperMixing (speechbrain variant, untied, LayerNorm) with that backend, for
  every backend in `hmx_kernels.registered_backends()` whose `not_supported_reasons` accept the
  inputs; new backends join when they register. A backend that the dispatcher's AUTO_ORDER lists
  only for other device types is left out (on CPU: cuda, and triton, whose CPU mode is the
  interpreter, a correctness tool, not a speed one).
- speechbrain: speechbrain's own HyperMixing layer (what its users run today), where speechbrain
  is installed; built with max_length = max(3000, N), and it allocates the [B, N, N] tensor it
  returns, which its peak memory shows.
- hmx-reference-compiled: the reference layer under torch.compile (dynamic shapes, one compile per
  shape and dtype). Default on GPU, opt-in on CPU (Inductor's C++ compile takes minutes on 2 cores).
- sdpa[-flash|-efficient|-cudnn|-math]: scaled_dot_product_attention, the core attention op, on
  [B, H, N, d_h]; on GPU once per SDPA backend (torch.nn.attention.sdpa_kernel), on CPU PyTorch's pick.
- mha: nn.MultiheadAttention(d, H) with its q/k/v/out projections: the like-for-like layer.
- flash-attn: flash_attn_func when the flash-attn package is installed (CUDA, fp16/bf16).

The attention references are exact float64 attention for 64 query rows (all keys), so the check
stays O(N) in memory.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hmx_kernels
from hmx_kernels.config import SETTINGS
from hmx_kernels.dispatch import backend_reasons
from hmx_kernels.flops import attention_flops, hyper_mixing_flops, hyper_mixing_flops_reassociated, mha_layer_flops

from .config import Shape

CHECK_ROWS = 64  # query rows checked for attention contenders


@dataclass
class Case:
    forward: Callable[[], Tensor]
    leaves: List[Tensor]
    check: Callable[[Tensor], float]  # max |out - ref| / max |ref| on batch element 0


@dataclass
class Contender:
    name: str
    family: str  # "hypermixing" | "attention" (core op) | "layer" (full attention layer)
    flops: Callable[[Shape, int, int, str], int]  # (shape, B, N, pass) -> FLOPs
    build: Callable[[Shape, int, int, torch.dtype, torch.device], Case]
    # why it cannot run this (shape, B, N, dtype, device); None = it can
    unsupported: Callable[[Shape, int, int, torch.dtype, torch.device], Optional[str]] = field(
        default=lambda *a: None)
    # the FLOPs it executes, where that differs from `flops` (the yardstick every contender of its
    # family is quoted in): the fused HyperMixing backends compute the reassociated form
    executed_flops: Optional[Callable[[Shape, int, int, str], int]] = None


def _hm_flops(shape: Shape, B: int, N: int, pass_: str) -> int:
    return hyper_mixing_flops(B, N, N, shape.d, shape.H, shape.k_h, pass_)


def _hm_flops_reassociated(shape: Shape, B: int, N: int, pass_: str) -> int:
    return hyper_mixing_flops_reassociated(B, N, N, shape.d, shape.H, shape.k_h, pass_)


# backends that compute the reassociated form (README: every fused backend does); the reference
# computes the direct form
REASSOCIATED_BACKENDS = ("cpu", "triton", "cuda")


def _attn_flops(shape: Shape, B: int, N: int, pass_: str) -> int:
    return attention_flops(B, N, N, shape.d, pass_)


def _mha_flops(shape: Shape, B: int, N: int, pass_: str) -> int:
    return mha_layer_flops(B, N, N, shape.d, pass_)


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def _tokens(B: int, N: int, d: int, dtype, device, seed: int = 0) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: fast at large N
    return torch.randn(B, N, d, generator=g, device=device).to(dtype).requires_grad_(True)


# ---- HyperMixing ---------------------------------------------------------------------------------
_LAYERS: Dict[tuple, nn.Module] = {}  # one layer (and one compiled function) per contender/shape/dtype


def _hm_layer(backend: str, shape: Shape, dtype, device) -> nn.Module:
    key = ("layer", backend, shape, dtype, str(device))
    if key not in _LAYERS:
        torch.manual_seed(0)
        layer = hmx_kernels.FusedHyperMixing(shape.d, shape.k, tied=False, num_heads=shape.H,
                                             backend=backend)
        _LAYERS[key] = layer.to(device=device, dtype=dtype)
    return _LAYERS[key]


def _hm_check(layer: nn.Module, x: Tensor) -> Callable[[Tensor], float]:
    def check(out: Tensor) -> float:
        ref = copy.deepcopy(layer).to(dtype=torch.float64)
        ref.backend = "reference"
        with torch.no_grad():
            expected = ref(x[:1].detach().double())[0]
        return _rel_err(out[:1], expected)
    return check


def _hm_reasons(backend: str, shape: Shape, B: int, N: int, dtype, device) -> Optional[str]:
    if device.type == "cpu" and backend == "triton":
        return "Triton on CPU runs in the interpreter (a correctness tool, not benchmarked)"
    layer = _hm_layer("reference", shape, dtype, device)
    x = torch.empty(B, N, shape.d, dtype=dtype, device=device)
    w1 = layer.hyper.w1_gen.tensors()
    w2 = layer.hyper.w2_gen.tensors()
    problem = hmx_kernels.check_inputs(x, None, None, *w1, *w2, layer.layer_norm.weight,
                                       layer.layer_norm.bias, variant="speechbrain")
    reasons = backend_reasons(problem).get(backend)
    if reasons is None:
        return f"backend {backend!r} is not registered"
    return "; ".join(reasons) or None


def hypermixing_contender(backend: str) -> Contender:
    def build(shape, B, N, dtype, device):
        layer = _hm_layer(backend, shape, dtype, device)
        x = _tokens(B, N, shape.d, dtype, device)
        return Case(lambda: layer(x, x, x)[0], [x] + list(layer.parameters()), _hm_check(layer, x))

    return Contender(f"hmx-{backend}", "hypermixing", _hm_flops, build,
                     lambda shape, B, N, dtype, device: _hm_reasons(backend, shape, B, N, dtype, device),
                     executed_flops=_hm_flops_reassociated if backend in REASSOCIATED_BACKENDS else None)


def compiled_reference_contender() -> Contender:
    def build(shape, B, N, dtype, device):
        layer = _hm_layer("reference", shape, dtype, device)
        key = ("compiled", shape, dtype, str(device))
        if key not in _LAYERS:
            _LAYERS[key] = torch.compile(lambda t: layer(t, t, t)[0], dynamic=True)
        fn = _LAYERS[key]
        x = _tokens(B, N, shape.d, dtype, device)
        return Case(lambda: fn(x), [x] + list(layer.parameters()), _hm_check(layer, x))

    def unsupported(shape, B, N, dtype, device):
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return "torch.compile on CUDA needs triton"
        return None

    return Contender("hmx-reference-compiled", "hypermixing", _hm_flops, build, unsupported)


def speechbrain_contender() -> Optional[Contender]:
    """speechbrain's own HyperMixing layer (what its users run today), where speechbrain is
    installed. Built with max_length = max(3000, N) (its positional table stops at max_length), and
    it allocates the [B, N, N] zero tensor it returns as attention weights: the sweep's peak memory
    shows that honestly. Checked against this package's float64 reference with the same weights."""
    try:
        import sys
        import types

        try:
            import torchaudio  # noqa: F401
        except Exception:  # noqa: BLE001 - speechbrain's package import pulls torchaudio, which
            # its HyperMixing never calls; an empty stand-in lets the import through
            sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
        from speechbrain.nnet.hypermixing import HyperMixing
    except Exception:  # noqa: BLE001 - not installed or broken: leave it out
        return None

    _mods: Dict[tuple, nn.Module] = {}

    def build(shape, B, N, dtype, device):
        max_length = max(3000, N)
        key = (shape, max_length, dtype, str(device))
        if key not in _mods:
            torch.manual_seed(0)
            _mods.clear()  # one at a time: the PE table is [max_length, d]
            _mods[key] = HyperMixing(shape.d, shape.k, tied=False, num_heads=shape.H,
                                     max_length=max_length).to(device=device, dtype=dtype)
        sb = _mods[key]
        x = _tokens(B, N, shape.d, dtype, device)

        def check(out):
            ref = hmx_kernels.FusedHyperMixing.from_speechbrain(sb, backend="reference").to(torch.float64)
            with torch.no_grad():
                expected = ref(x[:1].detach().double())[0]
            return _rel_err(out[:1], expected)

        return Case(lambda: sb(x, x, x)[0], [x] + list(sb.parameters()), check)

    return Contender("speechbrain", "hypermixing", _hm_flops, build)


# ---- attention -----------------------------------------------------------------------------------
def _rows(N: int) -> Tensor:
    return torch.linspace(0, N - 1, min(N, CHECK_ROWS)).round().long().unique()


def _attention_rows_f64(q: Tensor, k: Tensor, v: Tensor, rows: Tensor) -> Tensor:
    """Exact softmax(q k^T / sqrt(d_h)) v for the given query rows; q, k, v [H, N, d_h]."""
    q, k, v = q.double(), k.double(), v.double()
    s = q[:, rows] @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [H, R, d_h] @ [H, d_h, N] -> [H, R, N]
    return torch.softmax(s, dim=-1) @ v  # [H, R, N] @ [H, N, d_h] -> [H, R, d_h]


def _sdpa_backend_enum(which: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[which]


def sdpa_contender(which: Optional[str] = None) -> Contender:
    """which: None = PyTorch's own choice; else one SDPA backend name (GPU)."""

    def call(q, k, v):
        if which is None:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_sdpa_backend_enum(which)]):
            return F.scaled_dot_product_attention(q, k, v)

    def build(shape, B, N, dtype, device):
        q, k, v = (_tokens(B, N, shape.d, dtype, device, seed=i).detach()
                   .view(B, N, shape.H, shape.d_h).transpose(1, 2).contiguous().requires_grad_(True)
                   for i in range(3))  # [B, H, N, d_h]

        def check(out):
            rows = _rows(N).to(device)
            return _rel_err(out[0][:, rows], _attention_rows_f64(q[0], k[0], v[0], rows))

        return Case(lambda: call(q, k, v), [q, k, v], check)

    probed: Dict[tuple, Optional[str]] = {}

    def unsupported(shape, B, N, dtype, device):
        if which is None:
            return None
        key = (shape.H, shape.d_h, dtype, str(device))
        if key not in probed:  # one small call; PyTorch says why a kernel refuses in warnings
            q = torch.zeros(1, shape.H, 128, shape.d_h, dtype=dtype, device=device, requires_grad=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    call(q, q, q).sum().backward()
                    probed[key] = None
                except RuntimeError as e:
                    why = [str(w.message).splitlines()[0] for w in caught] or [str(e).splitlines()[0]]
                    probed[key] = f"sdpa {which}: " + " | ".join(why)[:300]
        return probed[key]

    return Contender("sdpa" if which is None else f"sdpa-{which}", "attention", _attn_flops, build,
                     unsupported)


def mha_contender() -> Contender:
    _mods: Dict[tuple, nn.Module] = {}

    def build(shape, B, N, dtype, device):
        key = (shape, dtype, str(device))
        if key not in _mods:
            torch.manual_seed(0)
            _mods[key] = nn.MultiheadAttention(shape.d, shape.H, batch_first=True).to(device=device, dtype=dtype)
        mha = _mods[key]
        x = _tokens(B, N, shape.d, dtype, device)

        def check(out):
            rows = _rows(N).to(device)
            w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
            qkv = x[0].detach().double() @ w.t() + b  # [N, d] @ [d, 3d] -> [N, 3d]
            q, k, v = (t.view(N, shape.H, shape.d_h).transpose(0, 1) for t in qkv.chunk(3, dim=-1))
            o = _attention_rows_f64(q, k, v, rows).transpose(0, 1).reshape(len(rows), shape.d)
            ref = o @ mha.out_proj.weight.double().t() + mha.out_proj.bias.double()  # [R, d] @ [d, d]
            return _rel_err(out[0][rows], ref)

        return Case(lambda: mha(x, x, x, need_weights=False)[0], [x] + list(mha.parameters()), check)

    return Contender("mha", "layer", _mha_flops, build)


def flash_attn_contender() -> Optional[Contender]:
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001  (not installed or built for another torch: leave it out)
        return None

    def build(shape, B, N, dtype, device):
        q, k, v = (_tokens(B, N, shape.d, dtype, device, seed=i).detach()
                   .view(B, N, shape.H, shape.d_h).requires_grad_(True) for i in range(3))  # [B, N, H, d_h]

        def check(out):
            rows = _rows(N).to(device)
            ref = _attention_rows_f64(*(t[0].transpose(0, 1) for t in (q, k, v)), rows)  # [H, R, d_h]
            return _rel_err(out[0][rows].transpose(0, 1), ref)

        return Case(lambda: flash_attn_func(q, k, v), [q, k, v], check)

    def unsupported(shape, B, N, dtype, device):
        if device.type != "cuda":
            return "flash-attn is CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return "flash-attn takes fp16/bf16 only"
        return None

    return Contender("flash-attn", "attention", _attn_flops, build, unsupported)


# ---- discovery -----------------------------------------------------------------------------------
def _made_for_other_devices(backend: str, device: torch.device) -> bool:
    """True for a backend that the dispatcher's auto order lists for other device types only."""
    from hmx_kernels.dispatch import AUTO_ORDER

    listed_for = {dev for dev, names in AUTO_ORDER.items() if backend in names}
    return bool(listed_for) and device.type not in listed_for


def all_contenders(device: torch.device) -> Dict[str, Contender]:
    """Every contender that can exist here, by name (applicability per shape/dtype is checked later)."""
    out: Dict[str, Contender] = {}
    for backend in hmx_kernels.registered_backends():
        if _made_for_other_devices(backend, device):
            continue  # e.g. cuda/triton on CPU (triton there is the interpreter), cpu on a GPU
        out[f"hmx-{backend}"] = hypermixing_contender(backend)
    out["hmx-reference-compiled"] = compiled_reference_contender()
    sb = speechbrain_contender()
    if sb is not None:
        out[sb.name] = sb
    if device.type == "cuda":
        for which in ("flash", "efficient", "cudnn", "math"):
            c = sdpa_contender(which)
            out[c.name] = c
    else:
        out["sdpa"] = sdpa_contender(None)
    out["mha"] = mha_contender()
    fa = flash_attn_contender()
    if fa is not None and device.type == "cuda":
        out[fa.name] = fa
    return out


def default_contender_names(device: torch.device) -> List[str]:
    names = list(all_contenders(device))
    if device.type == "cpu":
        names.remove("hmx-reference-compiled")  # opt-in on CPU: see the module docstring
    if SETTINGS.triton_interpret and "hmx-triton" in names:
        names.remove("hmx-triton")  # interpreter: never benchmarked
    return names
