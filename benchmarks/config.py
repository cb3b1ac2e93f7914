"""Shapes, per-device defaults, device description and the peak-throughput table.

Shapes are the speechbrain HyperConformer recipe sizes (d = 144 / k = 576 and d = 256 / k = 1024,
8 heads) and a transformer-sized one (d = 512, k = 2048, 8 heads); k is the hypernetwork's total
hidden size (k_h = k / H per head), as in speechbrain's `hypernet_size`.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    d: int  # token width
    k: int  # hypernetwork hidden size over all heads
    H: int  # heads

    @property
    def d_h(self) -> int:
        return self.d // self.H

    @property
    def k_h(self) -> int:
        return self.k // self.H


SHAPES: Dict[str, Shape] = {
    "sb144": Shape("sb144", 144, 576, 8),
    "sb256": Shape("sb256", 256, 1024, 8),
    "tf512": Shape("tf512", 512, 2048, 8),
}


def parse_shape(spec: str) -> Shape:
    """A named shape, or a custom one written d:k:H (e.g. 16:32:2)."""
    if spec in SHAPES:
        return SHAPES[spec]
    m = re.fullmatch(r"(\d+):(\d+):(\d+)", spec)
    if not m:
        raise ValueError(f"unknown shape {spec!r}: use one of {list(SHAPES)} or d:k:H")
    d, k, H = map(int, m.groups())
    if d % H or k % H:
        raise ValueError(f"shape {spec!r}: d and k must be divisible by H")
    return Shape(f"d{d}k{k}h{H}", d, k, H)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# Defaults per device type. CPU: fits `make bench` in a few minutes on 2 cores (fixed batch 1,
# N 128..8192, the three shapes, one torch thread: single-core kernels compared, and timings that
# stay stable when other processes share the cores; --threads 0 uses all of them); GPU: the full sweep.
DEFAULTS = {
    "cpu": dict(shapes=["sb144", "sb256", "tf512"], lengths=[2 ** i for i in range(7, 14)],
                batch_modes=["fixed"], batch=1, tokens=16384, dtype="float32", repeats=10,
                warmup=1, time_cap=4.0, measure_budget=1.0, threads=1),
    "cuda": dict(shapes=["sb144", "sb256", "tf512"], lengths=[2 ** i for i in range(8, 18)],
                 batch_modes=["fixed", "tokens"], batch=4, tokens=65536, dtype="bfloat16",
                 repeats=30, warmup=3, time_cap=10.0, measure_budget=2.0, threads=0),
}
QUICK = {
    "cpu": dict(shapes=["sb144"], lengths=[128, 256, 512], repeats=3, time_cap=2.0, measure_budget=0.2),
    "cuda": dict(shapes=["sb144"], lengths=[256, 1024, 4096], repeats=5, time_cap=5.0, measure_budget=0.5),
}


# Dense peak TFLOP/s (vendor data sheets, no sparsity), by a substring of the device name.
# "float32" is the CUDA-core rate (TF32 off, as this suite runs by default), "tf32" the tensor-core rate.
PEAK_TFLOPS = {
    "H200": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
    "H100 PCIe": {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0},
    "H100": {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
    "A100": {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
}


def peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool) -> Optional[float]:
    key = "tf32" if (dtype == torch.float32 and tf32) else dtype_name(dtype)
    for name, table in PEAK_TFLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if name in device_name:
            return table.get(key)
    return None


def measured_cpu_peak_tflops(dtype: torch.dtype, threads: Optional[int] = None) -> Optional[float]:
    """The CPU's practical matrix-multiply peak at the sweep's thread count, measured: the best of
    7 torch.mm of 1024 x 1024 x 1024 in `dtype` (float32/float64) with `threads` torch threads.
    That is the BLAS (MKL / OpenBLAS) sgemm/dgemm rate, close to the cores' FMA peak (2 FMA units x
    vector width x 2 FLOP x clock x cores on current x86), and the fraction the `cpu` backend reaches
    of it is reported as {pass}_peak_share. None for half types (no fast CPU path to compare with)."""
    if dtype not in (torch.float32, torch.float64):
        return None
    import time

    old = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(7):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * 1024 ** 3 / best / 1e12


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """File-name-safe device name, e.g. 'cpu-amd-epyc' or 'cuda-nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{device.type}-{slug}"


def git_sha() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> Dict[str, str]:
    import hmx_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "hmx_kernels": hmx_kernels.__version__}
    for mod in ("triton", "flash_attn"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001  (any import failure: not available)
            out[mod] = "not installed"
    return out
