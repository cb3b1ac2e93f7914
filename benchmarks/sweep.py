"""The sweep: every contender at every (shape, batch mode, length), with statuses, never aborting.

Per point: applicability (the backend's not_supported_reasons, SDPA kernel availability), a
predicted-time skip, one warm-up forward+backward (timed against the time cap), the output check
against the float64 reference, more warm-ups, then timing and peak memory. Numbers are reported
only with status "ok" (the output matched). Statuses:
  ok           measured, output within the dtype's tolerance
  mismatch     output differs from the reference by more than the tolerance: no numbers reported
  oom          ran out of memory; larger N of this contender and series are skipped
  timeout      the warm-up forward+backward took longer than the time cap (the first call of a
               series, which may compile, has the compile cap instead); larger N skipped
  skipped      not run: a smaller N timed out / ran out of memory, or the time predicted from the
               last measured N (scaled by the FLOP ratio) exceeds the time cap
  unsupported  the contender cannot run this shape/dtype/device (reason in `note`)
  error        any other exception (message in `note`); larger N skipped
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .config import Shape, dtype_name, measured_cpu_peak_tflops, peak_tflops
from .contenders import Contender
from .measure import clear_grads, peak_memory, sync_device, time_passes

# Largest scale-relative output error (max |out - ref| / max |ref|, ref in float64) accepted.
TOLERANCE = {
    # fp32 without TF32: different summation orders over N and k give ~1e-6 relative error; 2e-3
    # leaves room for long reductions (N up to 1e5) and is far below any real bug (O(1) errors)
    torch.float32: 2e-3,
    # fp16 (10-bit mantissa, unit roundoff 4.9e-4): output rounding plus fp16 operands in the matmuls
    torch.float16: 1e-2,
    # bf16 (7-bit mantissa, unit roundoff 3.9e-3): several rounded intermediates
    torch.bfloat16: 5e-2,
    torch.float64: 1e-9,
}

PASSES = ("fwd", "bwd", "fwd_bwd")


@dataclass
class SweepConfig:
    device: torch.device
    dtype: torch.dtype
    shapes: List[Shape]
    lengths: List[int]
    batch_modes: List[str]  # "fixed" (B = batch) and/or "tokens" (B = tokens // N, at least 1)
    batch: int
    tokens: int
    repeats: int
    warmup: int
    time_cap: float  # seconds for one warm-up forward+backward
    measure_budget: float  # seconds per pass before repetitions are cut (not below 3)
    # seconds for the first call of each series (JIT builds: the C++ twin on first use, Triton
    # kernels, torch.compile), which is not held to time_cap
    compile_cap: float = 300.0
    memory: bool = True
    tf32: bool = False
    device_name: str = ""
    extra: dict = field(default_factory=dict)

    def batch_size(self, mode: str, N: int) -> int:
        if mode == "fixed":
            return self.batch
        if mode == "tokens":
            return max(1, self.tokens // N)
        raise ValueError(f"batch mode must be 'fixed' or 'tokens', got {mode!r}")


def is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, (MemoryError,) + oom_types) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _empty_row(cfg: SweepConfig, c: Contender, shape: Shape, mode: str, B: int, N: int) -> dict:
    row = {
        "shape": shape.name, "d": shape.d, "k": shape.k, "H": shape.H, "batch_mode": mode, "B": B,
        "N": N, "contender": c.name, "family": c.family, "dtype": dtype_name(cfg.dtype),
        "status": "", "note": "", "max_err": None, "tol": TOLERANCE[cfg.dtype],
        "series_first_call_s": None, "first_call_s": None,
    }
    for p in PASSES:
        row.update({f"{p}_ms_p50": None, f"{p}_ms_p20": None, f"{p}_ms_p80": None, f"{p}_reps": None})
    row.update({"mem_fwd_mib": None, "mem_fwd_bwd_mib": None})
    for p in ("fwd", "fwd_bwd"):
        row.update({f"{p}_flops": c.flops(shape, B, N, p), f"{p}_tokens_per_s": None,
                    f"{p}_tflops": None, f"{p}_peak_share": None,
                    f"{p}_exec_flops": (c.executed_flops or c.flops)(shape, B, N, p),
                    f"{p}_exec_tflops": None, f"{p}_exec_peak_share": None})
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sweep(cfg: SweepConfig, contenders: List[Contender],
              progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    progress = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    if cfg.device.type == "cuda":
        peak = peak_tflops(cfg.device_name, cfg.dtype, cfg.tf32)
    else:  # measured BLAS matmul rate at the sweep's thread count (see config.measured_cpu_peak_tflops)
        peak = measured_cpu_peak_tflops(cfg.dtype, torch.get_num_threads())
    points = [(s, m, N) for s in cfg.shapes for m in cfg.batch_modes for N in sorted(cfg.lengths)]
    total = len(points) * len(contenders)
    rows: List[dict] = []
    stop: Dict[tuple, str] = {}  # series -> why larger N are skipped
    last_ok: Dict[tuple, tuple] = {}  # series -> (fwd_bwd seconds, fwd_bwd flops)
    warmed: set = set()  # series whose first (compiling) call is done
    i = 0
    t_start = time.perf_counter()
    for shape, mode, N in points:
        B = cfg.batch_size(mode, N)
        for c in contenders:
            i += 1
            series = (c.name, shape.name, mode)
            row = _empty_row(cfg, c, shape, mode, B, N)
            _run_point(cfg, c, shape, B, N, row, series, stop, last_ok, peak, warmed)
            rows.append(row)
            _free(cfg.device)
            t = row["fwd_bwd_ms_p50"]
            what = f"fwd+bwd {t:9.2f} ms" if t is not None else row["note"][:60]
            err = f" err {row['max_err']:.1e}" if row["max_err"] is not None else ""
            progress(f"[{i:3d}/{total}] {time.perf_counter() - t_start:6.0f}s {shape.name} {mode} B={B} "
                     f"N={N} {c.name:<24} {row['status']:<11} {what}{err}")
    return rows


def _run_point(cfg, c: Contender, shape, B, N, row, series, stop, last_ok, peak, warmed) -> None:
    try:
        reason = c.unsupported(shape, B, N, cfg.dtype, cfg.device)
    except Exception as e:  # noqa: BLE001  (a failing capability probe means: cannot run)
        reason = f"{type(e).__name__}: {e}"
    if reason:
        row.update(status="unsupported", note=reason)
        return
    if series in stop:
        row.update(status="skipped", note=stop[series])
        return
    if series in last_ok:
        t_prev, f_prev = last_ok[series]
        predicted = t_prev * row["fwd_bwd_flops"] / max(f_prev, 1)
        if predicted > cfg.time_cap:
            row.update(status="skipped", note=f"predicted {predicted:.1f} s > time cap {cfg.time_cap:g} s")
            stop[series] = f"skipped from N={N} on: predicted over the time cap"
            return
    case = y = grad = None
    try:
        case = c.build(shape, B, N, cfg.dtype, cfg.device)
        if series not in warmed:
            warmed.add(series)
            t0 = time.perf_counter()
            for _ in range(2):  # the second call catches a re-compilation (e.g. of the backward graph)
                y = case.forward()
                y.backward(torch.ones_like(y))
                y = None
            sync_device(cfg.device)
            spent = time.perf_counter() - t0
            row["series_first_call_s"] = spent
            if spent > cfg.compile_cap:
                row.update(status="timeout", note=f"compiling took {spent:.0f} s > compile cap {cfg.compile_cap:g} s")
                stop[series] = f"first call (compile) timed out at N={N}"
                return
        t0 = time.perf_counter()
        y = case.forward()
        grad = torch.randn(y.shape, generator=torch.Generator(device=y.device).manual_seed(1),
                           device=y.device).to(y.dtype)
        y.backward(grad)
        sync_device(cfg.device)
        first = time.perf_counter() - t0
        row["first_call_s"] = first
        if first > cfg.time_cap:
            row.update(status="timeout", note=f"first forward+backward took {first:.1f} s > cap {cfg.time_cap:g} s")
            stop[series] = f"timed out at N={N}"
            return
        err = row["max_err"] = case.check(y)
        y = None
        if not (err <= row["tol"]):
            row.update(status="mismatch", note=f"output differs from the float64 reference: {err:.2e} > {row['tol']:g}")
            return
        for _ in range(cfg.warmup - 1):
            clear_grads(case.leaves)
            case.forward().backward(grad)
        times = time_passes(case, grad, cfg.device, cfg.repeats, cfg.measure_budget)
        mem = peak_memory(case, grad, cfg.device) if cfg.memory else None
    except Exception as e:  # noqa: BLE001  (record and go on)
        case = y = grad = None
        if is_oom(e):
            row.update(status="oom", note=str(e).splitlines()[0][:200] if str(e) else "out of memory")
            stop[series] = f"out of memory at N={N}"
        else:
            row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            stop[series] = f"error at N={N}"
        return
    row["status"] = "ok"
    for p in PASSES:
        for q in ("p20", "p50", "p80"):
            row[f"{p}_ms_{q}"] = times[p][q] * 1e3
        row[f"{p}_reps"] = times[p]["reps"]
    if mem is not None:
        row["mem_fwd_mib"] = mem["fwd"] / 2 ** 20
        row["mem_fwd_bwd_mib"] = mem["fwd_bwd"] / 2 ** 20
    for p in ("fwd", "fwd_bwd"):
        s = times[p]["p50"]
        if s > 0:
            row[f"{p}_tokens_per_s"] = B * N / s
            row[f"{p}_tflops"] = row[f"{p}_flops"] / s / 1e12
            row[f"{p}_exec_tflops"] = row[f"{p}_exec_flops"] / s / 1e12
            if peak:
                row[f"{p}_peak_share"] = row[f"{p}_tflops"] / peak
                row[f"{p}_exec_peak_share"] = row[f"{p}_exec_tflops"] / peak
    last_ok[series] = (times["fwd_bwd"]["p50"], row["fwd_bwd_flops"])
