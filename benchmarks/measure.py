"""Timing and peak-memory measurement of one built case.

Timing: each repetition is timed on its own (CUDA events on GPU, perf_counter on CPU) after
warm-up calls (which absorb compilation and autotuning); we report the median and the 20th/80th
percentiles. forward runs with autograd recording (a training forward); backward is timed alone on
a retained graph (gradients cleared between repetitions, outside the timed region);
forward+backward is one training step of the op.

Peak memory is the largest number of bytes allocated during the pass above what was allocated
just before it (inputs, weights and, for backward, the forward's saved tensors are not counted):
- GPU: torch.cuda.max_memory_allocated() - memory_allocated() before, after reset_peak_memory_stats.
- CPU: every allocation and free of PyTorch's CPU allocator during the pass, recorded by
  torch.profiler (profile_memory=True, the "[memory]" events, which include a C++ extension's
  own at::empty scratch buffers), replayed in time order; the peak of the running sum. malloc'd
  memory outside PyTorch's allocator (the cpu backend's std::vector working buffers, which do not
  grow with N beyond 16 chunks) is not seen: see benchmarks/README.md.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from .contenders import Case


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def percentiles(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    if len(s) == 1:
        return {"p20": s[0], "p50": s[0], "p80": s[0]}
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return {"p20": q[1], "p50": statistics.median(s), "p80": q[7]}


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def time(self, fn: Callable[[], object], before: Optional[Callable[[], None]] = None) -> float:
        """Seconds for one call of fn (before() runs untimed first)."""
        if before is not None:
            before()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def time_passes(case: Case, grad: torch.Tensor, device: torch.device, repeats: int,
                budget_s: float, min_repeats: int = 3) -> Dict[str, Dict[str, float]]:
    """Times of 'fwd', 'bwd' and 'fwd_bwd' (seconds, p20/p50/p80, and the repetition count).

    Repetitions per pass: `repeats`, fewer (not under min_repeats) when they would exceed budget_s.
    """
    timer = Timer(device)
    out: Dict[str, Dict[str, float]] = {}

    def reps(first: float) -> int:
        return max(min_repeats, min(repeats, int(budget_s / max(first, 1e-9))))

    def run(pass_fn, before=None):
        first = timer.time(pass_fn, before)
        samples = [first] + [timer.time(pass_fn, before) for _ in range(reps(first) - 1)]
        d = percentiles(samples)
        d["reps"] = len(samples)
        return d

    out["fwd"] = run(case.forward)
    out["fwd_bwd"] = run(lambda: case.forward().backward(grad), lambda: clear_grads(case.leaves))
    y = case.forward()
    try:
        out["bwd"] = run(lambda: y.backward(grad, retain_graph=True), lambda: clear_grads(case.leaves))
    except RuntimeError:
        # a backward that cannot run twice on one graph: derive it from the other two
        out["bwd"] = {k: max(out["fwd_bwd"][k] - out["fwd"][k], 0.0) for k in ("p20", "p50", "p80")}
        out["bwd"]["reps"] = 0
    del y
    clear_grads(case.leaves)
    return out


def peak_memory(case: Case, grad: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """Peak extra bytes of the forward (graph kept for backward) and of forward+backward."""
    clear_grads(case.leaves)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        y = case.forward()
        torch.cuda.synchronize(device)
        fwd = torch.cuda.max_memory_allocated(device) - base
        y.backward(grad)
        torch.cuda.synchronize(device)
        both = torch.cuda.max_memory_allocated(device) - base
        del y
        clear_grads(case.leaves)
        return {"fwd": float(fwd), "fwd_bwd": float(max(both, fwd))}
    return _cpu_peak_memory(case, grad)


def _cpu_peak_memory(case: Case, grad: torch.Tensor) -> Dict[str, float]:
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = case.forward()
        with record_function("benchmarks::backward"):
            y.backward(grad)
        del y
    clear_grads(case.leaves)
    events = prof.profiler.kineto_results.events()
    boundary = min((e.start_ns() for e in events if e.name() == "benchmarks::backward"), default=None)
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak_fwd = peak = 0
    for ts, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
        if boundary is None or ts < boundary:
            peak_fwd = max(peak_fwd, cur)
    return {"fwd": float(peak_fwd), "fwd_bwd": float(peak)}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler library's start/stop lines (written to file descriptor 2 from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
