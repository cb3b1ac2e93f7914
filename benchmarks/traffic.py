"""Traffic and launch account of the HyperMixing layer, without a GPU.

    python -m benchmarks.traffic                     # the three recipe shapes, bf16 + fp32, N 4096 + 16384
    python -m benchmarks.traffic --shapes sb256 --lengths 1024 --dtypes bfloat16

Runs `FusedHyperMixing` forward + backward (self-mixing, as benchmarks/contenders.py times it:
`layer(x, x, x)`, tied=False, speechbrain variant, B 4, no padding mask unless --mask) on the
**meta device**, so nothing is computed and no GPU is needed, and records what the GPU would be
asked to do:

- every kernel launch: the Triton backend's launches through its launcher
  (`hmx_kernels.triton.launch._launch`, hooked: recorded, not run) and every aten op, through a
  `TorchDispatchMode` that also steps into the hmx_kernels custom ops (their Python impls run under
  the mode, so the torch ops of the finalize are seen one by one, attributed to the op);
- the bytes each launch reads and writes, from its tensor arguments: every distinct tensor once per
  launch, at its footprint (elements with a non-zero stride, times the element size); Triton
  pointer arguments by name and flags (outputs: y, dx / dk / dv, the per-chunk partials; an unused
  dummy pointer is not counted). A kernel that re-reads a tensor through the caches is counted
  once: these are the bytes a perfect cache would move, a lower bound of each launch's traffic;
- every host synchronisation: `aten._local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`),
  data-dependent shapes (`nonzero`, `masked_select`, `unique`, `repeat_interleave` without
  `output_size`), device-to-host copies; host-to-device copies are counted apart (no sync, but
  a pageable copy inside CUDA-graph capture is not allowed). A recorded sync gets a stand-in
  value (1 / True / an empty result) so the run goes on. Work on CPU tensors only (a piece table
  built on the host) is neither a launch nor a sync.

Besides plain mixing, the chunk-causal (chunk 32) and token-causal layer are accounted (--modes,
sb256, bf16): their launches, bytes, syncs and host-to-device copies.

The triton backend runs exactly the launch sequence it runs on CUDA (the same Python: the ops'
impls, the finalize, the layer's LayerNorm, casts and autograd); the meta device stands in for the
CUDA device (the backend is allowed on "meta" for the run). aten ops are counted one launch each,
except `native_layer_norm_backward` (2 on CUDA: dX, and dgamma / dbeta) and `ldexp` (2: pow, mul;
composite ops are seen decomposed, the others as one launch); views, allocations and metadata ops
launch nothing. The cpu backend (the C++ twin) is accounted too: each of its ops is one
opaque call whose bytes are its arguments and results.

Minimum bytes of the layer (per fwd+bwd, in the tensors' own dtypes): forward reads x, the mask
and the weights once, writes the output and the saved state P [B, H, k_h, d_h] (fp32) once;
backward reads d(out), x, the mask, the weights and P once, writes dx and the weight gradients
once. The two-pass floor adds what the reassociated algorithm must read again: x a second time in
each direction (state + mix pass, query + key pass).

Host time: `host_time_us` runs the same layer on real CPU tensors at d_h 32 (sb256), B 1, N 64 with
the Triton launches counted but not run (no dispatch mode), one torch thread, median of
--host-repeats steps of this thread's CPU time: the Python and torch overhead of one eager fwd+bwd
on this CPU (the torch ops run on tiny tensors; forward and backward apart too). `host_floor_us` times, beside it, an
eager step of a bare torch.autograd.Function with the same inputs, outputs and parameter gradients:
what autograd alone costs here, below which no layer with these 10 parameters can go.

GPU estimates (`gpu_estimate`, README "GPU estimates"): from the account, time = bytes / (achieved
HBM bandwidth) + launches x per-launch gap, bytes linear in N (fitted through the two lengths), and
FlashAttention-3 at 4 N^2 d_pad FLOPs per head forward, 3.5x for fwd+bwd (d_pad = max(d_h, 64):
FA3's Hopper kernels start at head dim 64) at a sustained rate; the crossover N solves
hmx(N) = fa3(N). All parameters are in GPU_MODEL and printed with the results: estimates, not
measurements.

Outputs: benchmarks/results/traffic.csv (one row per configuration), traffic-launches.csv (one
row per recorded event of every configuration), traffic.md (tables, the host time and the GPU
estimates).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.config import SHAPES, Shape, cpu_model, git_sha  # noqa: E402

aten = torch.ops.aten
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# ---- events ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """One recorded launch, call or synchronisation."""

    phase: str  # "fwd" or "bwd"
    scope: str  # "layer" (outside the hmx ops) or the op's name (e.g. "triton_fwd")
    kind: str  # "triton", "aten", "extension" (an opaque C++ op call), "sync", "h2d"
    name: str
    launches: int
    read_bytes: int
    write_bytes: int


class Account:
    """The events of one run, with sums."""

    def __init__(self) -> None:
        self.events: List[Event] = []
        self.phase = "fwd"
        self.scopes: List[str] = ["layer"]

    @property
    def scope(self) -> str:
        return self.scopes[-1]

    def add(self, kind: str, name: str, launches: int = 1, read: int = 0, write: int = 0) -> None:
        self.events.append(Event(self.phase, self.scope, kind, name, launches, read, write))

    def select(self, phase: Optional[str] = None, kind: Optional[str] = None, scope: Optional[str] = None,
               inside_ops: Optional[bool] = None) -> List[Event]:
        out = []
        for e in self.events:
            if phase is not None and e.phase != phase:
                continue
            if kind is not None and e.kind != kind:
                continue
            if scope is not None and e.scope != scope:
                continue
            if inside_ops is not None and (e.scope != "layer") != inside_ops:
                continue
            out.append(e)
        return out

    def launches(self, **kw) -> int:
        return sum(e.launches for e in self.select(**kw) if e.kind in ("triton", "aten"))

    def bytes(self, **kw) -> int:
        return sum(e.read_bytes + e.write_bytes for e in self.select(**kw))

    def syncs(self) -> List[Event]:
        return [e for e in self.events if e.kind == "sync"]

    def h2d(self) -> List[Event]:
        return [e for e in self.events if e.kind == "h2d"]


# ---- bytes of tensor arguments -----------------------------------------------------------------


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view addresses (broadcast dimensions count once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _key(t: torch.Tensor) -> tuple:
    try:
        storage = t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001  (a tensor without storage: count it by identity)
        storage = id(t)
    return storage, t.storage_offset(), tuple(t.shape), tuple(t.stride())


def _tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


def _distinct_bytes(tensors: Iterable[torch.Tensor], seen: Optional[set] = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        k = _key(t)
        if k not in seen:
            seen.add(k)
            total += footprint(t)
    return total


# ---- aten ops ------------------------------------------------------------------------------------

# ops that allocate or describe without touching memory on the device
_NO_LAUNCH = {
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.empty_like.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.is_same_size.default, aten.resize_.default, aten._unsafe_view.default, aten._reshape_alias.default,
}
# ops whose written argument is overwritten, not read
_OVERWRITE = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}
# kernels per op where CUDA launches more than one
_MULTI_LAUNCH = {aten.native_layer_norm_backward.default: 2, aten.ldexp.Tensor: 2}
# host synchronisations: data-dependent scalars and shapes
_SYNC_SCALAR = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_SYNC_SHAPE = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


def _stand_in(func, args):
    """A value for a recorded sync, so the run can go on (the data are not known)."""
    if func in _SYNC_SCALAR:
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        return True
    t = args[0]
    if func is aten.nonzero.default:
        return t.new_empty((0, t.dim()), dtype=torch.long)
    if func is aten.repeat_interleave.Tensor:
        return t.new_empty((0,), dtype=t.dtype)
    if func in (aten._unique2.default,):
        return t.new_empty((0,)), t.new_empty((0,), dtype=torch.long), t.new_empty((0,), dtype=torch.long)
    return t.new_empty((0,))


def _copy_devices(func, args, kwargs):
    """(source tensor, destination device or None) of a copy or conversion op."""
    if func.overloadpacket is aten.copy_:
        return args[1], args[0].device
    device = kwargs.get("device")
    if func is aten.to.device:
        device = args[1]
    elif func is aten.to.other:
        device = args[1].device
    return args[0], None if device is None else torch.device(device)


def _op_name(func) -> str:
    name = func.__name__  # e.g. "add.Tensor"
    return name[:-len(".default")] if name.endswith(".default") else name


class _Recorder(TorchDispatchMode):
    """Records every aten op (and steps into hmx_kernels ops whose Python impl is available)."""

    def __init__(self, account: Account, device: torch.device, step_into=("triton_fwd", "triton_bwd",
                                                                           "triton_blocks_fwd", "triton_blocks_bwd",
                                                                           "triton_layer_fwd", "triton_layer_bwd")):
        super().__init__()
        self.account = account
        self.device = device
        self.step_into = set(step_into)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        acc = self.account
        ns = getattr(func, "namespace", "")
        if ns == "hmx_kernels":
            from torch._library.custom_ops import OPDEFS

            op = func._schema.name.split("::", 1)[1]
            opdef = OPDEFS.get(func._schema.name)
            if op in self.step_into and opdef is not None:
                acc.scopes.append(op)
                try:
                    with self:
                        return opdef._init_fn(*args, **kwargs)
                finally:
                    acc.scopes.pop()
            out = func(*args, **kwargs)
            read = _distinct_bytes(t for a in list(args) + list(kwargs.values()) for t in _tensors(a))
            acc.add("extension", op, launches=0, read=read, write=_distinct_bytes(_tensors(out)))
            return out
        if func.overloadpacket in (aten._to_copy, aten.to, aten.copy_):
            src, dst_device = _copy_devices(func, args, kwargs)
            if isinstance(src, torch.Tensor) and dst_device is not None:
                if src.device.type == self.device.type and dst_device.type == "cpu":
                    acc.add("sync", "device_to_host_copy", launches=0, read=footprint(src))
                    if func is aten.copy_.default:
                        return args[0]
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
                    # (a stand-in: the data are not known)
                if src.device.type == "cpu" and dst_device.type == self.device.type:
                    out = func(*args, **kwargs)
                    acc.add("h2d", _op_name(func), launches=0, read=footprint(src), write=footprint(src))
                    return out
        on_device = any(t.device.type == self.device.type for a in list(args) + list(kwargs.values())
                        for t in _tensors(a))
        factory = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == self.device.type
        if not (on_device or factory):
            return func(*args, **kwargs)  # host-side work on CPU tensors (e.g. a piece table): no launch, no sync
        if func in _SYNC_SCALAR or func in _SYNC_SHAPE:
            acc.add("sync", _op_name(func), launches=0)
            return _stand_in(func, args)
        if func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:  # decomposed as on any device (e.g. matmul -> expand, bmm, view): see those
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func.is_view or func in _NO_LAUNCH or not isinstance(out, (torch.Tensor, list, tuple)):
            return out
        schema = func._schema
        read_set, write_set = set(), set()
        read = write = 0
        for i, a in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(a.name)
            written = a.alias_info is not None and a.alias_info.is_write
            for t in _tensors(value):
                if written:
                    write += _distinct_bytes([t], write_set)
                    if func not in _OVERWRITE and a.name != "out" and not a.name.startswith("out"):
                        read += _distinct_bytes([t], read_set)
                else:
                    read += _distinct_bytes([t], read_set)
        write += _distinct_bytes((t for t in _tensors(out)), write_set)
        if read == 0 and write == 0:
            return out
        acc.add("aten", _op_name(func), launches=_MULTI_LAUNCH.get(func, 1), read=read, write=write)
        return out


# ---- Triton launches -----------------------------------------------------------------------------

_TRITON_OUTPUTS = ("y_ptr", "dx_ptr", "dk_ptr", "dv_ptr", "s_part_ptr", "sv_part_ptr", "t_part_ptr",
                   "sdy_part_ptr", "dfc1w_ptr", "dfc1b_ptr", "stats_ptr", "rows_ptr", "dlnw_part_ptr",
                   "dlnb_part_ptr")
# the per-(b, h) finalize kernels (hmx_kernels/triton/finalize.py) write these and read the rest
_FINALIZE_OUTPUTS = {
    "hmx_fwd_finalize": ("p_ptr", "c_ptr", "cscale_ptr", "c0_ptr"),
    "hmx_bwd_finalize_mid": ("t_ptr", "sdy_ptr", "dp_ptr", "r_ptr", "rscale_ptr", "r0_ptr"),
    "hmx_bwd_finalize_weights": ("dfc2w_ptr", "dfc2b_ptr", "dfc2w2_ptr", "dfc2b2_ptr", "dfc1w_ptr", "dfc1b_ptr",
                                 "dfc1w2_ptr", "dfc1b2_ptr", "dlnw_ptr", "dlnb_ptr"),
}


def _triton_unused(name: str, flags: dict) -> bool:
    """A pointer argument the kernel does not touch under these flags (a dummy)."""
    if name == "mask_ptr":
        return not flags.get("HAS_MASK", True)
    if name == "fc1b_ptr":
        return not flags.get("HAS_FC1_BIAS", True)
    if name == "pieces_ptr":
        return not flags.get("BLOCKED", True)
    if name == "freq_ptr":
        return flags.get("PE_TABLE", False)
    if name == "pe_ptr":
        return not flags.get("PE_TABLE", True)
    if name in ("r0_ptr", "c0_ptr"):
        return not flags.get("HAS_FC2_BIAS", True)
    if name == "dv_ptr" or name == "dq_ptr":  # the key pass with one token gradient: dx in dk_ptr, dq read
        return flags.get("ADD_DQ", False) == (name == "dv_ptr")
    if name in ("t_part_ptr", "sdy_part_ptr"):
        return "ACC_T" in flags and not flags["ACC_T"]
    if name in ("s_part_ptr", "sv_part_ptr") and "ACC_S" in flags:
        return not flags["ACC_S"]
    return False


def triton_launch_bytes(kernel, args, flags) -> Tuple[str, int, int]:
    """(kernel name, bytes read, bytes written) of one launch, from its pointer arguments."""
    jf = kernel  # autotuner -> JIT (or interpreted) function; a plain JIT function has its names
    while not hasattr(jf, "arg_names") and hasattr(jf, "fn"):
        jf = jf.fn
    names = list(jf.arg_names)  # the positional arguments are the leading, non-constexpr ones
    kernel_name = getattr(jf, "__name__", None) or jf.fn.__name__
    outputs = _FINALIZE_OUTPUTS.get(kernel_name, _TRITON_OUTPUTS)
    if kernel_name == "hmx_fwd_finalize" and flags.get("FROM_P"):
        outputs = tuple(n for n in outputs if n != "p_ptr")  # P read back from the saved state
    read_set, write_set = set(), set()
    read = write = 0
    pointers = list(zip(names, args)) + [(k, v) for k, v in flags.items() if k.endswith("_ptr")]
    for name, value in pointers:
        if not isinstance(value, torch.Tensor) or _triton_unused(name, flags):
            continue
        if name in outputs:
            write += _distinct_bytes([value], write_set)
        else:
            read += _distinct_bytes([value], read_set)
    return kernel_name, read, write


@contextlib.contextmanager
def triton_on(device_type: str, account: Optional[Account] = None, counter: Optional[List[int]] = None):
    """The triton backend allowed on `device_type` tensors (meta: the GPU path's Python without a
    GPU), its launches recorded into `account` (or counted into counter[0]) instead of run."""
    from hmx_kernels import dispatch
    from hmx_kernels.triton import launch as fn

    backend = dispatch.get_backend("triton")
    caps = backend.capabilities
    patched = dataclasses.replace(backend, capabilities=dataclasses.replace(
        caps, devices=tuple(sorted(set(caps.devices) | {device_type})), available=lambda device_type: ()))

    def record(kernel, grid, *args, **kwargs):
        if counter is not None:
            counter[0] += 1
        if account is not None:
            name, read, write = triton_launch_bytes(kernel, args, kwargs)
            account.add("triton", name, 1, read, write)

    saved = dispatch._REGISTRY["triton"], fn._launch
    dispatch._REGISTRY["triton"], fn._launch = patched, record
    try:
        yield
    finally:
        dispatch._REGISTRY["triton"], fn._launch = saved


# ---- one configuration ----------------------------------------------------------------------------


# mixing modes accounted besides the plain (non-causal) layer: FusedHyperMixing arguments
MODES = {"chunk32": dict(chunk_size=32), "causal": dict(causal=True)}


def make_layer(shape: Shape, dtype: torch.dtype, device, backend: str, mode: str = ""):
    import hmx_kernels

    layer = hmx_kernels.FusedHyperMixing(shape.d, shape.k, tied=False, num_heads=shape.H, backend=backend,
                                         **MODES.get(mode, {}))
    return layer.to(device=device, dtype=dtype)


def account_layer(shape: Shape, dtype: torch.dtype, N: int, B: int = 4, backend: str = "triton",
                  mask: bool = False, step=None, mode: str = "") -> Account:
    """The account of one forward + backward of the layer on the meta device (see the module
    docstring); mode: "" (plain mixing) or a key of MODES. `step(layer, x, mask, account)`
    replaces the default step (out = layer(x, x, x); out.backward(grad)) for tests."""
    device = torch.device("meta")
    layer = make_layer(shape, dtype, device, backend, mode)
    x = torch.empty(B, N, shape.d, dtype=dtype, device=device, requires_grad=True)
    kpm = torch.zeros(B, N, dtype=torch.bool, device=device) if mask else None
    grad = torch.empty(B, N, shape.d, dtype=dtype, device=device)

    def default_step(layer, x, kpm, account):
        out, _ = layer(x, x, x, key_padding_mask=kpm)
        account.phase = "bwd"
        out.backward(grad)

    step = step or default_step
    account = Account()
    ctx = triton_on("meta", account) if backend == "triton" else contextlib.nullcontext()
    with ctx:
        # warm-up, through the ops' impls: positional-encoding caches filled, as after a first step
        with torch.no_grad(), _Recorder(Account(), device):
            layer(x.detach(), x.detach(), x.detach(), key_padding_mask=kpm)
        account.events.clear()
        with _Recorder(account, device):
            step(layer, x, kpm, account)
    return account


def param_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Bytes of the layer's parameters (two generators with biases, the LayerNorm)."""
    gen = shape.H * (shape.d_h * shape.d_h + shape.d_h + shape.k_h * shape.d_h + shape.k_h)
    return (2 * gen + 2 * shape.d) * torch.empty(0, dtype=dtype).element_size()


def minimum_bytes(shape: Shape, dtype: torch.dtype, N: int, B: int, mask: bool) -> Dict[str, int]:
    """The layer's minimum bytes per fwd+bwd and the two-pass floor (module docstring)."""
    es = torch.empty(0, dtype=dtype).element_size()
    tok = B * N * shape.d * es
    m = B * N if mask else 0
    w = param_bytes(shape, dtype)
    state = B * shape.H * shape.k_h * shape.d_h * 4
    fwd = tok + m + w + tok + state
    bwd = tok + tok + m + w + state + tok + w
    return {"min_fwd": fwd, "min_bwd": bwd, "min": fwd + bwd, "two_pass": fwd + bwd + 2 * tok + 2 * m}


def summarize(account: Account, shape: Shape, dtype: torch.dtype, N: int, B: int, backend: str,
              mask: bool, mode: str = "") -> dict:
    mins = minimum_bytes(shape, dtype, N, B, mask)
    total = account.bytes(kind=None)
    tokens = B * N
    row = dict(backend=backend, mode=mode, shape=shape.name, d=shape.d, k=shape.k, H=shape.H, d_h=shape.d_h,
               k_h=shape.k_h, dtype=str(dtype).replace("torch.", ""), B=B, N=N, mask=int(mask))
    for ph in ("fwd", "bwd"):
        row[f"{ph}_triton_launches"] = account.launches(phase=ph, kind="triton")
        row[f"{ph}_aten_in_op_launches"] = sum(e.launches for e in account.select(phase=ph, kind="aten",
                                                                                   inside_ops=True))
        row[f"{ph}_aten_layer_launches"] = sum(e.launches for e in account.select(phase=ph, kind="aten",
                                                                                   inside_ops=False))
        row[f"{ph}_extension_calls"] = len(account.select(phase=ph, kind="extension"))
        row[f"{ph}_bytes"] = account.bytes(phase=ph)
    row["launches"] = account.launches()
    row["triton_bytes"] = account.bytes(kind="triton")
    row["aten_in_op_bytes"] = sum(e.read_bytes + e.write_bytes for e in account.select(kind="aten", inside_ops=True))
    row["aten_layer_bytes"] = sum(e.read_bytes + e.write_bytes for e in account.select(kind="aten", inside_ops=False))
    row["extension_bytes"] = account.bytes(kind="extension")
    row["bytes"] = total - account.bytes(kind="sync") - account.bytes(kind="h2d")
    row["min_bytes"] = mins["min"]
    row["two_pass_bytes"] = mins["two_pass"]
    row["bytes_per_token"] = round(row["bytes"] / tokens, 1)
    row["min_bytes_per_token"] = round(mins["min"] / tokens, 1)
    row["ratio_to_min"] = round(row["bytes"] / mins["min"], 3)
    row["ratio_to_two_pass"] = round(row["bytes"] / mins["two_pass"], 3)
    row["host_syncs"] = len(account.syncs())
    row["sync_ops"] = " ".join(sorted({e.name for e in account.syncs()}))
    row["h2d_copies"] = len(account.h2d())
    return row


# ---- host time ----------------------------------------------------------------------------------------


def host_time_us(shape: Shape = SHAPES["sb256"], B: int = 1, N: int = 64, repeats: int = 30,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 parts: Optional[dict] = None) -> Tuple[float, int]:
    """Median host time (us) of one eager forward + backward of the layer, with the Triton
    launches counted but not run, and the Triton launches per step. device "cpu": CPU tensors (the
    torch ops run, on tiny tensors; the figure reported); "meta" is no cheaper (many meta kernels
    are Python functions: about 5x the CPU time here). One torch thread; the time is this
    thread's CPU time (time.thread_time), so that other processes on a shared machine do not
    inflate it (wall time would include their share of the cores). parts: filled with the
    forward's and the backward's medians ("fwd", "bwd"). The garbage of the accounts run before it
    is collected first (their event lists made the cyclic collector's passes in the timed steps
    cost up to 50 % more)."""
    gc.collect()
    torch.manual_seed(0)
    layer = make_layer(shape, dtype, device, "triton")
    x = torch.randn(B, N, shape.d, dtype=dtype).to(device).requires_grad_(True)
    grad = torch.randn(B, N, shape.d, dtype=dtype).to(device)
    counter = [0]
    times, fwd_times = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one host thread drives a GPU; no thread pool contending for tiny ops
    with triton_on(device, counter=counter), contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        for i in range(repeats + 3):
            counter[0] = 0
            layer.zero_grad(set_to_none=True)
            x.grad = None
            t0 = time.thread_time()
            out, _ = layer(x, x, x)
            tf = time.thread_time()
            out.backward(grad)
            t1 = time.thread_time()
            if i >= 3:
                times.append((t1 - t0) * 1e6)
                fwd_times.append((tf - t0) * 1e6)
    if parts is not None:
        parts["fwd"] = statistics.median(fwd_times)
        parts["bwd"] = statistics.median(t - f for t, f in zip(times, fwd_times))
    return statistics.median(times), counter[0]


def host_floor_us(shape: Shape = SHAPES["sb256"], B: int = 1, N: int = 64, repeats: int = 30) -> float:
    """Median host time (us) of the smallest eager step with the layer ops' autograd shape: one
    torch.autograd.Function over the same 15 inputs (the layer's 10 parameters) that allocates its
    4 outputs, saves 18 tensors, and in its backward allocates the token gradient and one buffer
    viewed as the 10 parameter gradients, which autograd then accumulates; no checks, no kernels.
    The layer's host time cannot go below it on this machine (the same thread-time measure as
    host_time_us)."""
    gc.collect()
    layer = make_layer(shape, torch.float32, "cpu", "triton")
    params = list(layer.parameters())
    x = torch.randn(B, N, shape.d).requires_grad_(True)
    grad = torch.randn(B, N, shape.d)
    from hmx_kernels.ops import flat_views

    class Skeleton(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            out, state, stats, saved = (torch.empty_like(inputs[0]), torch.empty(4), torch.empty(4), torch.empty(4))
            ctx.save_for_backward(*[t for t in inputs if t is not None], state, stats, saved)
            ctx.mark_non_differentiable(stats, saved)
            return out, state, stats, saved

        @staticmethod
        def backward(ctx, grad_out, *unused):
            ctx.saved_tensors
            buffer = torch.empty(sum(p.numel() for p in params))
            return (torch.empty_like(grad_out), None, None, None, None,
                    *flat_views(buffer, [tuple(p.shape) for p in params]))

    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(repeats + 3):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            t0 = time.thread_time()
            out = Skeleton.apply(x, x, x, None, None, *params)[0]
            out.backward(grad)
            if i >= 3:
                times.append((time.thread_time() - t0) * 1e6)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


# ---- GPU estimates (README "GPU estimates") -------------------------------------------------------------

GPU_MODEL = {
    "H100": dict(hbm_tb_s=3.35, fa3_tflop_s=670.0),  # HBM as tools/kernels.py HBM_TBPS
    "H200": dict(hbm_tb_s=4.8, fa3_tflop_s=670.0),  # FA3 bf16 fwd+bwd sustained, same chip (H200: same SMs)
    "bandwidth_share": 0.70,  # achieved / peak HBM bandwidth for these small-tile token kernels
    "launch_gap_us": 4.5,  # GPU time per launch beyond its bytes (launch latency, tail, small kernels)
    "fa_fwd_bwd_factor": 3.5,  # FA fwd+bwd FLOPs = 3.5 x the forward's 4 N^2 d per head
    "fa_min_head_dim": 64,  # FA3's Hopper kernels: head dims from 64
}


def gpu_estimate(bytes_at: Dict[int, int], launches: int, shape: Shape, B: int, gpu: str,
                 host_us: Optional[float] = None) -> dict:
    """Times (ms) at N from the account's bytes (linear fit through the lengths given) and
    launches, FA3's time, and the crossover N (hmx faster above it). With host_us, also the
    eager, host-bound variant: max(GPU time, host time)."""
    Ns = sorted(bytes_at)
    (n0, b0), (n1, b1) = (Ns[0], bytes_at[Ns[0]]), (Ns[-1], bytes_at[Ns[-1]])
    slope = (b1 - b0) / (n1 - n0)
    const = b0 - slope * n0
    g = GPU_MODEL[gpu]
    bw = g["hbm_tb_s"] * 1e12 * GPU_MODEL["bandwidth_share"]
    fixed_s = launches * GPU_MODEL["launch_gap_us"] * 1e-6
    d_pad = max(shape.d_h, GPU_MODEL["fa_min_head_dim"])
    fa_coef = GPU_MODEL["fa_fwd_bwd_factor"] * 4 * d_pad * B * shape.H / (g["fa3_tflop_s"] * 1e12)  # s per N^2

    def hmx_s(N, host=None):
        t = (slope * N + const) / bw + fixed_s
        return max(t, host * 1e-6) if host else t

    def crossover(host=None):
        lo, hi = 1.0, 1e7  # fa - hmx grows with N above the crossover: bisection on the sign
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if fa_coef * mid * mid > hmx_s(mid, host):
                hi = mid
            else:
                lo = mid
        return hi

    out = dict(gpu=gpu, bytes_per_token_slope=slope / B, fixed_bytes=const, launches=launches,
               crossover=round(crossover()))
    for N in (1024, 4096, 16384, 65536):
        out[f"hmx_ms_{N}"] = hmx_s(N) * 1e3
        out[f"fa3_ms_{N}"] = fa_coef * N * N * 1e3
    if host_us is not None:
        out["crossover_eager"] = round(crossover(host_us))
    return out


def layer_estimates(rows: List[dict]) -> List[dict]:
    """Per (shape, dtype) of the triton rows of traffic.csv (two lengths at least) and GPU: the
    layer (its LayerNorm fused since the layer ops), eager on this CPU's host time too; with the
    kernels-only bound of kernels.md for comparison."""
    from tools import kernels as K

    out = []
    keys = sorted({(r["shape"], r["dtype"]) for r in rows}, key=lambda k: (list(SHAPES).index(k[0]), k[1]))
    for sname, dname in keys:
        cfg = {int(r["N"]): r for r in rows if (r["shape"], r["dtype"]) == (sname, dname)}
        Ns = sorted(cfg)
        shape, B = SHAPES[sname], int(cfg[Ns[0]]["B"])
        host = float(cfg[Ns[0]]["host_us"])
        for gpu in ("H100", "H200"):
            now = gpu_estimate({N: int(cfg[N]["bytes"]) for N in Ns}, int(cfg[Ns[0]]["launches"]), shape, B, gpu,
                               host if math.isfinite(host) else None)
            kdt, prec = ("bf16", "half") if dname in ("bfloat16", "float16") else ("fp32", "tf32")
            kernels_us = K.roofline(shape.d_h, shape.k_h, kdt, prec, gpu)["bound_us"]
            out.append(dict(shape=sname, dtype=dname, **now, kernels_bound_ms_16384=kernels_us / 1e3))
    return out


# ---- output ------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [
    "backend", "mode", "shape", "d", "k", "H", "d_h", "k_h", "dtype", "B", "N", "mask",
    "fwd_triton_launches", "fwd_aten_in_op_launches", "fwd_aten_layer_launches", "fwd_extension_calls",
    "bwd_triton_launches", "bwd_aten_in_op_launches", "bwd_aten_layer_launches", "bwd_extension_calls",
    "launches", "fwd_bytes", "bwd_bytes", "triton_bytes", "aten_in_op_bytes", "aten_layer_bytes", "extension_bytes",
    "bytes", "min_bytes", "two_pass_bytes", "bytes_per_token", "min_bytes_per_token", "ratio_to_min",
    "ratio_to_two_pass", "host_syncs", "sync_ops", "h2d_copies", "host_us",
]
EVENT_COLUMNS = ["backend", "mode", "shape", "dtype", "N", "index", "phase", "scope", "kind", "name", "launches",
                 "read_bytes", "write_bytes"]


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f}"


def breakdown(events: List[dict]) -> List[dict]:
    """Launches and MB of one configuration's events, grouped: each Triton kernel; the ops' torch
    finalize (by phase); the layer's torch ops by name (by phase)."""
    groups: Dict[tuple, List[int]] = {}
    for e in events:
        if e["kind"] not in ("triton", "aten"):
            continue
        if e["kind"] == "triton":
            key = (e["phase"], "Triton kernel", e["name"])
        elif e["scope"] != "layer":
            key = (e["phase"], "finalize (torch ops in " + e["scope"] + ")", "")
        else:
            key = (e["phase"], "layer (torch)", e["name"])
        g = groups.setdefault(key, [0, 0])
        g[0] += int(e["launches"])
        g[1] += int(e["read_bytes"]) + int(e["write_bytes"])
    return [dict(phase=k[0], what=k[1], name=k[2], launches=v[0], bytes=v[1]) for k, v in groups.items()]


def markdown(meta: dict, rows: List[dict], estimates: List[dict],
             events: Optional[List[dict]] = None) -> str:
    L = ["# Traffic and launch account of the layer (no GPU: meta device, launches recorded, not run)", ""]
    L.append(f"`python -m benchmarks.traffic` at {meta['git']}, torch {meta['torch']}, {meta['when']}. "
             "FusedHyperMixing forward + backward, self-mixing `layer(x, x, x)`, tied=False, speechbrain "
             f"variant, B {meta['B']}, {'a padding mask' if meta['mask'] else 'no padding mask'}. Bytes: each "
             "launch's distinct tensor arguments once (a lower bound of its traffic); minimum: x, weights and "
             "state read once, output and gradients written once per direction (see benchmarks/traffic.py).")
    L.append("")
    L.append("| backend | shape | dtype | N | launches fwd (triton + aten op + aten layer) | launches bwd | "
             "total | MB | B/token | min B/token | x min | x two-pass | syncs | H2D |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = f"{r['fwd_triton_launches']} + {r['fwd_aten_in_op_launches']} + {r['fwd_aten_layer_launches']}"
        b = f"{r['bwd_triton_launches']} + {r['bwd_aten_in_op_launches']} + {r['bwd_aten_layer_launches']}"
        if r["backend"] != "triton":
            f += f" (+{r['fwd_extension_calls']} C++ op)"
            b += f" (+{r['bwd_extension_calls']} C++ op)"
        L.append(f"| {r['backend']}{' ' + r['mode'] if r['mode'] else ''} | {r['shape']} | {r['dtype']} | {r['N']} | {f} | {b} | {r['launches']} | "
                 f"{_mb(r['bytes'])} | {r['bytes_per_token']:.0f} | {r['min_bytes_per_token']:.0f} | "
                 f"{r['ratio_to_min']:.2f} | {r['ratio_to_two_pass']:.2f} | {r['host_syncs']}"
                 f"{' (' + r['sync_ops'] + ')' if r['sync_ops'] else ''} | {r['h2d_copies']} |")
    L.append("")
    L.append(f"Host time per fwd+bwd, launches counted but not run (triton backend on CPU tensors, d_h 32 "
             f"(sb256), B 1, N 64, fp32, 1 torch thread, thread CPU time, {meta['cpu']}): median "
             f"{meta['host_us']:.0f} us over {meta['host_repeats']} steps ({meta['host_launches']} Triton "
             f"launches per step; the torch ops ran, on tiny tensors): forward {meta['host_fwd_us']:.0f} us, "
             f"backward {meta['host_bwd_us']:.0f} us. Target: 150 us. Floor: {meta['host_floor_us']:.0f} us, an "
             f"eager step of one torch.autograd.Function with the layer ops' inputs, outputs, saved tensors "
             f"and 10 parameter gradients but no checks and no kernels (`host_floor_us`), measured beside it.")
    L.append("")
    if events:
        L.append("## Where the launches and bytes go (triton, bf16, N 16384)")
        L.append("")
        shapes = list(dict.fromkeys(r["shape"] for r in rows if r["backend"] == "triton" and not r["mode"]))
        L.append("| phase | what | op | " + " | ".join(f"{s}: launches | MB" for s in shapes) + " |")
        L.append("|---|---|---|" + "---|---|" * len(shapes))
        per = {s: {(b["phase"], b["what"], b["name"]): b for b in breakdown(
            [e for e in events if e["backend"] == "triton" and not e["mode"] and e["shape"] == s
             and e["dtype"] == "bfloat16" and int(e["N"]) == 16384])} for s in shapes}
        keys = list(dict.fromkeys(k for s in shapes for k in per[s]))
        for k in keys:
            cells = []
            for s in shapes:
                b = per[s].get(k)
                cells.append(f"{b['launches']} | {_mb(b['bytes'])}" if b else " | ")
            L.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
        L.append("")
    if estimates:
        L.append("## GPU estimates from this account (estimates, not measurements)")
        L.append("")
        m = GPU_MODEL
        L.append(f"Model: time = bytes / ({m['bandwidth_share']:.0%} of peak HBM bandwidth) + launches x "
                 f"{m['launch_gap_us']} us; bytes linear in N through the account's two lengths. FA3: "
                 f"{m['fa_fwd_bwd_factor']} x 4 N^2 max(d_h, {m['fa_min_head_dim']}) FLOPs per head at "
                 f"{m['H100']['fa3_tflop_s']:.0f} TFLOP/s; crossover: the N above which the layer is faster. "
                 f"Eager: the step cannot be faster than its host time ({meta['host_us']:.0f} us on this CPU; a "
                 "GPU host's differs). Kernels-only bound: "
                 "benchmarks/results/kernels.md (the kernels' own byte and FLOP model at peak bandwidth).")
        L.append("")
        L.append(estimates_table(estimates))
        L.append("")
    return "\n".join(L)


def estimates_table(estimates: List[dict]) -> str:
    """The GPU-estimate table (also README "GPU estimates"; B 4, H 8, fwd+bwd, ms)."""
    L = ["| shape | dtype | GPU | kernels-only bound, N 16384 | layer: launches | layer N 4096 | N 16384 | "
         "N 65536 | FA3 N 4096 | N 16384 | crossover vs FA3 | eager, this CPU's host time |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        L.append(f"| {e['shape']} | {e['dtype']} | {e['gpu']} | {e['kernels_bound_ms_16384']:.2f} | {e['launches']} | "
                 f"{e['hmx_ms_4096']:.2f} | {e['hmx_ms_16384']:.2f} | {e['hmx_ms_65536']:.2f} | "
                 f"{e['fa3_ms_4096']:.2f} | {e['fa3_ms_16384']:.1f} | {e['crossover']} | "
                 f"{e.get('crossover_eager', '')} |")
    return "\n".join(L)


def write_csv(path: str, rows: List[dict], columns: List[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run(shapes: List[str], dtypes: List[str], lengths: List[int], backends: List[str], B: int, mask: bool,
        host_repeats: int, out_dir: Optional[str], modes: Iterable[str] = (), mode_shapes: Iterable[str] = ("sb256",),
        ) -> Tuple[List[dict], List[dict], List[dict], dict]:
    rows, events, estimates = [], [], []
    per_config: Dict[tuple, dict] = {}
    for backend in backends:
        for sname in shapes:
            shape = SHAPES[sname]
            for dname in dtypes:
                dtype = DTYPES[dname]
                for N in lengths:
                    acc = account_layer(shape, dtype, N, B, backend, mask)
                    row = summarize(acc, shape, dtype, N, B, backend, mask)
                    rows.append(row)
                    per_config[(backend, sname, dname, N)] = row
                    for i, e in enumerate(acc.events):
                        events.append(dict(backend=backend, mode="", shape=sname, dtype=row["dtype"], N=N,
                                           index=i, **dataclasses.asdict(e)))
                    print(f"{backend} {sname} {dname} N {N}: {row['launches']} launches, "
                          f"{row['bytes_per_token']:.0f} B/token ({row['ratio_to_min']:.2f}x min), "
                          f"{row['host_syncs']} syncs", file=sys.stderr, flush=True)
    for mode in modes if "triton" in backends else ():
        for sname in mode_shapes:
            for N in lengths:
                acc = account_layer(SHAPES[sname], torch.bfloat16, N, B, "triton", mask, mode=mode)
                row = summarize(acc, SHAPES[sname], torch.bfloat16, N, B, "triton", mask, mode)
                rows.append(row)
                for i, e in enumerate(acc.events):
                    events.append(dict(backend="triton", mode=mode, shape=sname, dtype=row["dtype"], N=N, index=i,
                                       **dataclasses.asdict(e)))
                print(f"triton {mode} {sname} bfloat16 N {N}: {row['launches']} launches, {row['host_syncs']} syncs, "
                      f"{row['h2d_copies']} host-to-device copies", file=sys.stderr, flush=True)
    host_parts = {"fwd": float("nan"), "bwd": float("nan")}
    host_us, host_launches = host_time_us(repeats=host_repeats, parts=host_parts) if host_repeats else (float("nan"), 0)
    host_floor = host_floor_us(repeats=host_repeats) if host_repeats else float("nan")
    for row in rows:
        row["host_us"] = round(host_us, 1)
    if "triton" in backends and len(lengths) >= 2:
        estimates = layer_estimates([r for r in rows if r["backend"] == "triton" and not r["mode"]])
    meta = dict(git=git_sha()[:12], torch=torch.__version__, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                B=B, mask=mask, host_us=host_us, host_fwd_us=host_parts["fwd"], host_bwd_us=host_parts["bwd"], host_repeats=host_repeats,
                host_launches=host_launches, host_floor_us=host_floor,
                cpu=cpu_model())
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_csv(os.path.join(out_dir, "traffic.csv"), rows, SUMMARY_COLUMNS)
        write_csv(os.path.join(out_dir, "traffic-launches.csv"), events, EVENT_COLUMNS)
        with open(os.path.join(out_dir, "traffic.md"), "w") as f:
            f.write(markdown(meta, rows, estimates, events))
    return rows, events, estimates, meta


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="sb144,sb256,tf512")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--lengths", default="4096,16384")
    p.add_argument("--backends", default="triton,cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--mask", action="store_true", help="a key padding mask (speechbrain training)")
    p.add_argument("--modes", default="chunk32,causal", help="mixing modes accounted too (triton, bf16; '' for none)")
    p.add_argument("--mode-shapes", default="sb256")
    p.add_argument("--host-repeats", type=int, default=30, help="steps of the host-time median (0: skip)")
    p.add_argument("--out", default=RESULTS, help="folder for traffic.csv, traffic-launches.csv, traffic.md")
    a = p.parse_args(argv)
    rows, _, _, meta = run(a.shapes.split(","), a.dtypes.split(","), [int(n) for n in a.lengths.split(",")],
                              a.backends.split(","), a.batch, a.mask, a.host_repeats, a.out,
                              [m for m in a.modes.split(",") if m], a.mode_shapes.split(","))
    with open(os.path.join(a.out, "traffic.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
