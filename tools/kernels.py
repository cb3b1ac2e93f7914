"""Kernel resource report: compile every fused kernel for sm_80 and sm_90 without a GPU and read
what the compiler gives each one.

    python -m tools.kernels [--jobs 2] [--out benchmarks/results]

For each architecture (sm_80, sm_90), shape (d_h, k_h) in SHAPES (the recipe shapes) and
LIMIT_SHAPES (d_h 128, k_h 512: the backends' limit), input dtype (fp32 in each dot precision the
launcher can pick for it, fp16, bf16), kernel and autotune candidate, the Triton kernel is
compiled (fresh, no cache) with exactly the arguments, constexprs and specialisations the launcher
passes for B = 4, N = 16384, H = 8 (the launch is captured by running the launcher on meta
tensors), and
- registers, spill bytes (stores + loads): ptxas -v, as run by triton;
- smem_bytes: the compiled kernel's shared memory (metadata.shared);
- tensor_core_instructions: HGMMA + HMMA instructions in `cuobjdump -sass` of the cubin.
The CUDA C++ kernels (csrc/hmx_cuda_*.cu) are compiled with nvcc for the same archs, shapes and
dtypes by tools/cuda_resources.py (ROW_SOURCES["cuda"]; backend column "cuda").

Outputs (benchmarks/results), one set per triton version: the names below under the dev
environment's triton (PRIMARY_TRITON, 3.9), which also carries the CUDA rows; under another triton
the Triton rows only, with the version in the name (kernels-triton3.6.csv, kernels-limit-triton3.6.csv,
kernels-triton3.6.md: `report_name`). hmx_kernels.triton.autotune keeps the spill table and the
shared-memory model per measured version; the report says when the installed version's differ
from what it measured, and prints the measured ones.
- kernels.csv: every row a backend may run, both backends, columns COLUMNS: the Triton candidates
  the autotuner may run there (hmx_kernels.triton.autotune.kept_candidates) and every CUDA kernel
  the CUDA backend does not decline;
- kernels-limit.csv: rows compiled but never run, with the reason (COLUMNS + reason): Triton fp32
  at d_h 128 (refused by hmx_kernels/triton/backend.py; its TF32 kernels compiled to show why) and
  the CUDA kernels the CUDA backend declines (cuda_resources.decline_reason);
- kernels.md: the invariants, the pruned Triton candidates with the measured reason, the CUDA
  kernels per shape, and a roofline estimate per shape;
- with --pe-on-chip (only): kernels-pe-on-chip.csv, the Triton rows of kernels.csv compiled again
  with the positional encoding computed on chip (COLUMNS + stack_bytes).

This module must run without TRITON_INTERPRET (kernels decorated for the interpreter do not
compile); it refuses otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Iterable, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "benchmarks", "results")  # the reports live with the other results

COLUMNS = ["arch", "shape", "dtype", "backend", "kernel", "config", "registers", "spill_bytes",
           "smem_bytes", "tensor_core_instructions"]
ARCHS = (80, 90)
SHAPES = ((18, 72), (32, 128), (64, 256))  # (d_h, k_h) of the speechbrain recipes / a transformer layer
LIMIT_SHAPES = ((128, 512),)  # the backends' limit: Triton runs fp16 / bf16 there and refuses fp32
LIMIT_FP32_PRECISIONS = ("tf32x3", "tf32")  # Triton fp32 compiled there to show why (IEEE FMA dots: not compiled)
HALF_DTYPES = ("fp16", "bf16")
DTYPES = ("fp32", "fp16", "bf16")
FP32_MODES = ("highest", "high", "medium")  # torch.get_float32_matmul_precision() values
ROOFLINE = dict(B=4, N=16384, H=8)
HBM_TBPS = {"H100": 3.35, "H200": 4.8}
SMEM_LIMIT_KB = {"sm_80": 163, "sm_90": 227}  # opt-in shared memory per block (hmx_kernels.triton.autotune.SMEM_LIMIT)
PRIMARY_TRITON = (3, 9)  # the dev environment's triton: its report keeps the plain file names


def report_name(base: str, version: Optional[Tuple[int, int]] = None) -> str:
    """The file name of report `base` (kernels.csv, kernels-limit.csv, kernels.md) for triton
    `version` (default: the installed one): `base` under PRIMARY_TRITON, else with -triton<M.m>."""
    from hmx_kernels.triton.autotune import INSTALLED_TRITON

    version = version or INSTALLED_TRITON
    if version == PRIMARY_TRITON:
        return base
    stem, ext = os.path.splitext(base)
    return f"{stem}-triton{version[0]}.{version[1]}{ext}"

# backends other than Triton (whose candidates, pruning and fp32 precisions this module handles
# itself): name -> function(archs, shapes) -> row dicts with COLUMNS and "reason" (None, or why
# the backend never runs that row: it goes to kernels-limit.csv); "cuda" below
ROW_SOURCES: Dict[str, Callable[[Tuple[int, ...], Tuple[Tuple[int, int], ...]], List[dict]]] = {}


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the launcher makes it: kernel name, positional arguments (tensors
    replaced by their dtype name), constexpr keywords."""

    kernel: str
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs


def _check_not_interpreting() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("tools.kernels compiles for GPUs: run it without TRITON_INTERPRET=1")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@lru_cache(maxsize=None)
def capture_launches(d_h: int, k_h: int, dtype: str, mode: str = "highest",
                     finalize: bool = False) -> Tuple[Launch, ...]:
    """The launches of one forward + backward (speechbrain, masks, biases) at d_h, k_h, B = 4,
    N = 16384, H = 8, under torch.set_float32_matmul_precision(mode): the launchers of
    hmx_kernels.triton.launch run on meta tensors with the launch recorded instead of made.
    The token passes only (the autotuned kernels this report is about), unless `finalize`: then
    only the per-(b, h) finalize kernels (hmx_kernels.triton.finalize: one fixed config each, its
    num_warps among the launch keywords; fp32 IEEE dots, so no tensor-core instructions)."""
    import torch

    from hmx_kernels.triton import launch as fn
    from hmx_kernels.triton.autotune import split_state

    recorded: List[Launch] = []

    def record(kernel, grid, *args, **kwargs):
        def plain(a):
            return ("tensor", str(a.dtype).replace("torch.", "")) if isinstance(a, torch.Tensor) else a

        args = tuple(plain(a) for a in args)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        if (kernel.fn.__name__ in FINALIZE_KERNELS) == finalize:
            recorded.append(Launch(kernel.fn.__name__, args, tuple(sorted(kwargs.items()))))

    B, N, H = ROOFLINE["B"], ROOFLINE["N"], ROOFLINE["H"]
    dt = _torch_dtype(dtype)

    def meta(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    q, keep = meta(B, N, H * d_h), meta(B, N, dtype=torch.float32)
    gen = [meta(H, d_h, d_h), meta(H, d_h), meta(H, k_h, d_h), meta(H, k_h)] * 2
    ln = [meta(H * d_h), meta(H * d_h)]
    old_mode = torch.get_float32_matmul_precision()
    saved = fn._launch, fn._is_fake
    fn._launch, fn._is_fake = record, (lambda t: True)  # meta tensors: no PE cache
    try:
        torch.set_float32_matmul_precision(mode)
        # the layer's plain mixing (LayerNorm fused, self-mixing: one token gradient), where it runs ...
        if not split_state(d_h):
            _, state, stats, kept = fn._layer_fwd_impl(q, q, q, keep, keep, *gen, *ln, "speechbrain", 1e-5)
            fn._layer_bwd_impl(meta(B, N, H * d_h), q, q, q, keep, keep, *gen, *ln, state, stats, kept,
                               "speechbrain", 1e-5, True)
        # ... and the per-head passes (no LayerNorm, the mixing-block modes, d_h 128): their mix and
        # query kernels (a kernel both launch appears once, as the layer launches it: distinct_launches)
        _, state = fn._triton_fwd_impl(q, q, q, keep, keep, *gen, "speechbrain")
        fn._triton_bwd_impl(meta(B, N, H * d_h, dtype=torch.float32), q, q, q, keep, keep, *gen, state,
                            "speechbrain")
    finally:
        fn._launch, fn._is_fake = saved
        torch.set_float32_matmul_precision(old_mode)
    return tuple(recorded)


FINALIZE_KERNELS = ("hmx_fwd_finalize", "hmx_bwd_finalize_mid", "hmx_bwd_finalize_weights")


def _kernel(name: str):
    """The kernel's JITFunction."""
    from hmx_kernels.triton import finalize, hyper_mixing_bwd, hyper_mixing_fwd, layer_norm_fused

    if name in FINALIZE_KERNELS:
        return getattr(finalize, name)
    return (getattr(hyper_mixing_fwd, name, None) or getattr(layer_norm_fused, name, None)
            or getattr(hyper_mixing_bwd, name)).fn


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(launch: Launch, config: Tuple[int, int, int], arch: int) -> dict:
    """Compile one launch with one (BLOCK_N, num_warps, num_stages) for sm_<arch>, fresh; returns
    registers, spill_bytes, smem_bytes, tensor_core_instructions."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import MockTensor, native_specialize_impl

    jf = _kernel(launch.kernel)
    block_n, num_warps, num_stages = config
    kwargs = dict(launch.kwargs, BLOCK_N=block_n)
    num_warps = kwargs.pop("num_warps", num_warps)  # a fixed-config kernel's own (the finalize kernels)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(jf.params):
        default = p._param.default  # a parameter with a default (a mode's extra pointer) may be left out
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", kwargs.get(p.name, default)
            continue
        v = launch.args[i] if i < len(launch.args) else kwargs.get(p.name, default)
        if v is None:  # an unused optional pointer
            signature[p.name], constexprs[p.name] = "constexpr", None
            continue
        if isinstance(v, tuple) and v[0] == "tensor":
            v = MockTensor(getattr(torch, {"bf16": "bfloat16"}.get(v[1], v[1])))  # a 16-byte aligned pointer
        ty, key = native_specialize_impl(CUDABackend, v, False, not p.do_not_specialize, True)
        if ty == "constexpr":  # an integer 1 (a unit stride)
            signature[p.name], constexprs[p.name] = "constexpr", key
        else:
            signature[p.name] = ty
            if key == "D":
                attrs[(i,)] = CUDABackend.parse_attr("D")
    src = triton.compiler.ASTSource(fn=jf, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    if regs is None:
        raise RuntimeError(f"no ptxas report for {launch.kernel}: {text[-500:]}")
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    stack = re.search(r"(\d+) bytes stack frame", text)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    tensor_core = sum(1 for line in sass.splitlines() if re.search(r"\b(HGMMA|HMMA)\b", line))
    return dict(registers=int(regs.group(1)), spill_bytes=spills, smem_bytes=int(compiled.metadata.shared),
                tensor_core_instructions=tensor_core, stack_bytes=int(stack.group(1)) if stack else 0)


def config_name(config: Tuple[int, int, int], precision: str) -> str:
    """BLOCK_N, warps, stages and, for fp32 operands, the dot precision: e.g. BN32-w8-s2-tf32x3."""
    name = f"BN{config[0]}-w{config[1]}-s{config[2]}"
    return name if precision == "half" else f"{name}-{precision}"


@dataclass(frozen=True)
class Job:
    arch: int
    shape: Tuple[int, int]
    dtype: str
    kernel: str
    precision: str  # "half", or the fp32 dot precision compiled
    config: Tuple[int, int, int]


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")


def jobs(shapes: Iterable[Tuple[int, int]], dtypes: Iterable[str], archs: Iterable[int] = ARCHS,
         candidates: Optional[Callable[[str], Iterable[Tuple[int, int, int]]]] = None,
         kernels: Optional[Iterable[str]] = None, precisions: Iterable[str] = FP32_PRECISIONS) -> List[Job]:
    """Every (arch, shape, dtype, kernel, precision, candidate) to compile: fp32 in each dot
    precision of `precisions` (the ones the launcher does not pick are compiled too: their spills
    are what config.SPILLING and the fallback of config.dot_precision rest on)."""
    from hmx_kernels.triton.autotune import KERNEL_CANDIDATES

    out = []
    for shape in shapes:
        for dtype in dtypes:
            for launch in distinct_launches(shape, dtype):
                if kernels is not None and launch.kernel not in kernels:
                    continue
                for prec in (precisions if dtype == "fp32" else ("half",)):
                    for config in (candidates or KERNEL_CANDIDATES.get)(launch.kernel):
                        for arch in archs:
                            out.append(Job(arch, shape, dtype, launch.kernel, prec, tuple(config)))
    return out


def distinct_launches(shape: Tuple[int, int], dtype: str, mode: str = "highest") -> List[Launch]:
    """The launches of capture_launches, one per kernel: the first (the layer's, where both the
    layer and the per-head passes launch a kernel: the key pass, with the one-gradient sum and the
    input-dtype stores, is the larger of its two variants)."""
    out: Dict[str, Launch] = {}
    for lc in capture_launches(shape[0], shape[1], dtype, mode):
        out.setdefault(lc.kernel, lc)
    return list(out.values())


def _precision_of(launch: Launch) -> str:
    from hmx_kernels.triton.autotune import precision_name

    kw = dict(launch.kwargs)
    return precision_name(kw["OPERAND"], kw["DOT_PREC"])


def chosen_precisions(shape: Tuple[int, int], dtype: str, kernel: str) -> List[str]:
    """The precisions the launcher picks for `kernel` under the float32 matmul modes the backend
    does not decline at this shape (config.unfit_reason: some kernel spills in every candidate)."""
    from hmx_kernels.triton.autotune import unfit_reason

    modes = [m for m in (FP32_MODES if dtype == "fp32" else ("highest",))
             if unfit_reason(_torch_dtype(dtype), shape[0], m, None) is None]
    return list(dict.fromkeys(_precision_of(lc) for m in modes for lc in capture_launches(*shape, dtype, m)
                              if lc.kernel == kernel))


def run_job(job: Job) -> dict:
    """Compile one job; the row plus `precision`, `candidate`, `chosen` (the launcher picks this
    precision for some float32 matmul mode) and `kept` (chosen, and the autotuner may run the
    candidate there)."""
    launch = next(lc for lc in capture_launches(job.shape[0], job.shape[1], job.dtype) if lc.kernel == job.kernel)
    if job.precision != "half":
        launch = Launch(launch.kernel, launch.args,
                        tuple(sorted(dict(launch.kwargs, OPERAND="fp32", DOT_PREC=job.precision).items())))
    res = compile_launch(launch, job.config, job.arch)
    row = dict(arch=f"sm_{job.arch}", shape=f"{job.shape[0]},{job.shape[1]}", dtype=job.dtype, backend="triton",
               kernel=job.kernel, config=config_name(job.config, job.precision), **res,
               precision=job.precision, candidate=list(job.config))
    return classify(row)


def classify(row: dict) -> dict:
    """Set row["chosen"] and row["kept"] from the current hmx_kernels.triton.autotune."""
    from hmx_kernels.triton.autotune import SMEM_LIMIT, kept_candidates

    shape = tuple(int(x) for x in row["shape"].split(","))
    arch = int(row["arch"].removeprefix("sm_"))
    row["chosen"] = row["precision"] in chosen_precisions(shape, row["dtype"], row["kernel"])
    row["kept"] = row["chosen"] and tuple(row["candidate"]) in kept_candidates(
        row["kernel"], shape[0], row["precision"], SMEM_LIMIT[arch], arch)
    return row


def set_pe_on_chip(on: bool) -> None:
    """Compile the kernels with the positional encoding computed on chip (hmx_kernels.triton.launch
    PE_ON_CHIP) or read from the table (the default), in this process."""
    from hmx_kernels.triton import launch as fn

    if fn.PE_ON_CHIP != on:
        fn.PE_ON_CHIP = on
        capture_launches.cache_clear()


def run_jobs(job_list: List[Job], n_jobs: int = 1, progress: bool = True, pe_on_chip: bool = False) -> List[dict]:
    t0 = time.time()
    set_pe_on_chip(pe_on_chip)
    if n_jobs <= 1:
        rows = []
        for i, job in enumerate(job_list):
            rows.append(run_job(job))
            if progress:
                print(f"[{i + 1}/{len(job_list)} {time.time() - t0:.0f}s] {_describe(rows[-1])}", flush=True)
        return rows
    import multiprocessing

    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"), initializer=set_pe_on_chip,
                             initargs=(pe_on_chip,)) as pool:
        rows = []
        for i, row in enumerate(pool.map(run_job, job_list, chunksize=4)):
            rows.append(row)
            if progress:
                print(f"[{i + 1}/{len(job_list)} {time.time() - t0:.0f}s] {_describe(row)}", flush=True)
    return rows


def _describe(r: dict) -> str:
    return (f"{r['arch']} ({r['shape']}) {r['dtype']} {r['kernel']} {r['config']}: {r['registers']} regs, "
            f"{r['spill_bytes']} B spilled, {r['smem_bytes']} B smem, {r['tensor_core_instructions']} TC"
            + ("" if r["kept"] else " (pruned)" if r["chosen"] else " (precision not picked)"))


def write_csv(path: str, rows: List[dict], columns: List[str] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def triton_limit_reason(row: dict) -> str:
    """Why the Triton backend never runs a row of the limit shape's fp32 kernels."""
    from hmx_kernels.triton.backend import MAX_FP32_HEAD_DIM

    return (f"refused: the triton backend declines float32 inputs at d_h > {MAX_FP32_HEAD_DIM} "
            "(hmx_kernels/triton/backend.py fit_reasons): its backward kernels' fp32 operands need more "
            "shared memory than a block gets")


# ---------------------------------------------------------------- roofline (estimates)

def token_flops(d_h: int) -> Dict[str, int]:
    """FLOPs per token, head and pass of the reassociated kernels at padded head size D (a
    multiply-add is 2): the tile products of each pass are [*, D] @ [D, D]. From
    config.SPLIT_BLOCK_D on, the backward's token sums T and S have passes of their own (two
    products each) and leave the query and key passes (one product fewer each)."""
    from hmx_kernels.triton.autotune import block_d, split_state

    D = block_d(d_h)
    if split_state(d_h):
        products = {"fwd state": 2, "fwd mix": 2, "bwd tsum": 2, "bwd query": 4, "bwd state": 2, "bwd key": 5}
    else:
        products = {"fwd state": 2, "fwd mix": 2, "bwd query": 5, "bwd key": 6}
    return {k: 2 * n * D * D for k, n in products.items()}


def finalize_flops(d_h: int, k_h: int) -> int:
    """Per (b, h): P = fc2 S, C = fc2_2^T A (forward); C again, dA, dfc2_2, R, dfc2 (backward)."""
    return 7 * 2 * k_h * d_h * d_h


def token_bytes(d_h: int, H: int, elem: int, pe_table: bool = True) -> Dict[str, float]:
    """HBM bytes per token (all heads) and pass: token tensors in the input dtype (elem bytes),
    dY read and dQ / dK / dV / Y written in fp32, the keep mask (4 B); the fp32 PE table [N, d] is
    shared by the batch and counted once per batch of ROOFLINE["B"] tokens. The passes of
    token_flops; the state pass's row groups (config.row_split) read the same tiles, counted once
    (the two programs of a (b, h, chunk) are neighbours in the grid, so the second read should hit
    L2: an assumption, not measured)."""
    from hmx_kernels.triton.autotune import split_state

    d = H * d_h
    pe = 4 * d / ROOFLINE["B"] if pe_table else 0.0
    out = {"fwd state": 2 * d * elem + 4 + pe, "fwd mix": d * elem + 4 * d + 4 + pe,
           "bwd query": d * elem + 8 * d + 4 + pe, "bwd key": 2 * d * elem + 8 * d + 4 + pe}
    if split_state(d_h):
        out.update({"bwd tsum": d * elem + 4 * d + 4 + pe, "bwd state": 2 * d * elem + 4 + pe})
    return out


def roofline(d_h: int, k_h: int, dtype: str, precision: str, gpu: str, pe_table: bool = True) -> dict:
    from benchmarks.config import PEAK_TFLOPS

    B, N, H = ROOFLINE["B"], ROOFLINE["N"], ROOFLINE["H"]
    elem = 4 if dtype == "fp32" else 2
    flops = B * H * (N * sum(token_flops(d_h).values()) + finalize_flops(d_h, k_h))
    nbytes = B * N * sum(token_bytes(d_h, H, elem, pe_table).values())
    peaks = PEAK_TFLOPS[gpu]
    peak = {"half": peaks["bfloat16"], "tf32": peaks["tf32"], "tf32x3": peaks["tf32"] / 3,
            "ieee": peaks["float32"]}[precision]
    t_compute = flops / (peak * 1e12)
    t_memory = nbytes / (HBM_TBPS[gpu] * 1e12)
    return dict(flops=flops, bytes=nbytes, intensity=flops / nbytes, ridge=peak * 1e12 / (HBM_TBPS[gpu] * 1e12),
                t_compute_us=t_compute * 1e6, t_memory_us=t_memory * 1e6, bound_us=max(t_compute, t_memory) * 1e6,
                limit="memory" if t_memory >= t_compute else "compute")


def _cuda_cell(r: dict) -> str:
    return f"{r['config'].split('-')[0]} {r['registers']}/{r['spill_bytes']}/{r['smem_bytes'] / 1024:.1f}/{r['tensor_core_instructions']}"


def _invariant_lines(rows: List[dict], tc_rows: Callable[[dict], bool], tc_note: str) -> List[str]:
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        sel = [r for r in rows if r["arch"] == arch]
        tc = [r["tensor_core_instructions"] for r in sel if tc_rows(r)]
        out.append(f"- {arch}: {len(sel)} rows, registers <= {max(r['registers'] for r in sel)}, "
                   f"spill bytes max {max(r['spill_bytes'] for r in sel)}, shared memory max "
                   f"{max(r['smem_bytes'] for r in sel) / 1024:.1f} KB (limit {SMEM_LIMIT_KB[arch]} KB), "
                   f"tensor-core instructions {min(tc)}..{max(tc)} per kernel {tc_note}")
    return out


def write_markdown(path: str, rows: List[dict], limit_rows: List[dict], other: Dict[str, List[dict]],
                   meta: dict) -> None:
    """kernels.md: invariants of both backends' rows, per shape a roofline estimate, the best kept
    Triton candidate per kernel and the CUDA kernels, the pruned Triton candidates, the fp32 dot
    precisions not picked, and the declined rows (kernels-limit.csv)."""
    from tools import cuda_resources as cr

    kept = [r for r in rows if r["kept"]]
    pruned = [r for r in rows if r["chosen"] and not r["kept"]]
    unpicked = [r for r in rows if not r["chosen"]]
    cuda = other.get("cuda", [])
    cuda_run = [r for r in cuda if not r["reason"]]
    csv_name, limit_name = meta.get("csv", "kernels.csv"), meta.get("limit_csv", "kernels-limit.csv")
    out = [f"# Kernel resources: Triton{' and CUDA C++' if cuda else ''} (compiled for sm_80 and sm_90, no GPU)", "",
           f"`python -m tools.kernels`: triton {meta['triton']}, ptxas {meta['ptxas']}"
           + (f", nvcc {meta['nvcc']}" if meta.get("nvcc") and cuda else "") + f", git {meta['git'][:10]}, "
           f"{meta['date']}, {meta['wall_s']:.0f} s. Nothing here ran on a GPU.", "",
           "Triton: every kernel x autotune candidate x shape (d_h, k_h) x input dtype (fp32 in each dot "
           "precision the launcher picks for some torch.get_float32_matmul_precision(): "
           "hmx_kernels.triton.autotune.dot_precision) x arch, compiled with the launcher's own arguments for "
           "B = 4, N = 16384, H = 8. Registers and spills from ptxas -v, shared memory from the compiled "
           f"kernel, tensor-core instructions = HGMMA + HMMA in cuobjdump -sass. {csv_name} holds the "
           "candidates the autotuner may run (hmx_kernels.triton.autotune.kept_candidates); the pruned ones "
           "are listed below with the reason.", "",
           *([] if not cuda else ["CUDA C++ (backend `cuda`, tools/cuda_resources.py): every kernel of csrc/hmx_cuda_*.cu x shape "
           "x dtype x arch, compiled by nvcc with the build's flags and -Xptxas -v; shared memory = the "
           "launcher's dynamic size (the kernels' own size function, run on the host) + ptxas' static size; "
           "one configuration per kernel (config: token tile T, 8 warps). The kernels depend on d_h through "
           "its head block (32, 64, 128) only.", ""]),
           f"{limit_name} holds the rows compiled but never run, with the reason (last section).", ""]
    out += [f"## Invariants of {csv_name}", "", "Triton:"]
    out += _invariant_lines(kept, lambda r: "ieee" not in r["config"],
                            "outside IEEE fp32 (IEEE rows: FFMA only, "
                            f"{max((r['tensor_core_instructions'] for r in kept if 'ieee' in r['config']), default=0)} TC)")
    if cuda_run:
        out += ["", "CUDA C++:"]
        out += _invariant_lines(cuda_run, lambda r: r["dtype"] != "fp32" and r["kernel"] in cr.MATMUL_KERNELS,
                                "for fp16 / bf16 kernels that multiply matrices (fp32 kernels: FFMA only, "
                                f"{max(r['tensor_core_instructions'] for r in cuda_run if r['dtype'] == 'fp32')} TC; "
                                "sum_parts, block_window and row_sums only add)")
    stack = [r.get("stack_bytes", 0) for r in kept]
    if any(stack):
        what = ("local arrays of libdevice's sin/cos argument reduction, touched only for angles beyond its fast "
                "range" if not meta.get("pe_table", True) else "spill slots")
        out += ["", f"Triton stack frames (ptxas -v: {what}): up to {max(stack)} B."]
    out += ["", "## Per shape: roofline estimate, best kept Triton candidate per kernel, CUDA kernels", "",
            "Roofline = max(FLOPs / peak, bytes / HBM bandwidth) for one forward + backward at "
            "B = 4, N = 16384, H = 8: an **estimate** from the algorithm's counts, not a measurement. "
            "FLOPs: the tile products of the Triton token passes at the padded head size D "
            "(2 + 2 + 5 + 6 products of [*, D] @ [D, D] per token and head; from d_h 128 on 2 + 2 + 2 + 4 + 2 "
            "+ 5 over six passes, tools/kernels.py token_flops) plus the per-(b, h) finalize products; "
            "GELU, masks and the LayerNorm epilogue are not counted. Bytes: token tensors "
            "read in the input dtype, dY read and Y / dQ / dK / dV written in fp32, keep masks"
            + (", the PE table once per batch" if meta.get("pe_table", True) else " (the positional encoding is computed on chip)")
            + "; the LayerNorm epilogue and the casts around the op are not counted. "
            "Peaks: benchmarks/config.py PEAK_TFLOPS (dense; 3xTF32 at a third of TF32), HBM 3.35 TB/s "
            "(H100), 4.8 TB/s (H200). The CUDA kernels compute the same reassociated passes (fp32 on FMA: "
            "the IEEE line applies).", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        d_h, k_h = map(int, shape.split(","))
        out += [f"### (d_h, k_h) = ({d_h}, {k_h})", ""]
        out += ["| dtype / precision | GPU | GFLOP | GB | FLOP/B | ridge | bound (us) | limited by |",
                "|---|---|---|---|---|---|---|---|"]
        for dtype in DTYPES:
            for prec in dict.fromkeys(r["precision"] for r in kept if r["shape"] == shape and r["dtype"] == dtype):
                for gpu in ("H100", "H200"):
                    rf = roofline(d_h, k_h, dtype, prec, gpu, meta.get("pe_table", True))
                    out.append(f"| {dtype}{' ' + prec if dtype == 'fp32' else ''} | {gpu} | {rf['flops'] / 1e9:.1f} | "
                               f"{rf['bytes'] / 1e9:.2f} | {rf['intensity']:.0f} | {rf['ridge']:.0f} | "
                               f"{rf['bound_us']:.0f} | {rf['limit']} |")
        out += ["", "Triton, best kept candidate per kernel (fewest registers):", "",
                "| arch | dtype | kernel | config | registers | spill B | smem KB | TC instr |",
                "|---|---|---|---|---|---|---|---|"]
        for arch in sorted({r["arch"] for r in kept}):
            for dtype in DTYPES:
                for prec in dict.fromkeys(r["precision"] for r in kept if r["shape"] == shape and r["dtype"] == dtype):
                    for kernel in dict.fromkeys(r["kernel"] for r in kept):
                        sel = [r for r in kept if (r["arch"], r["shape"], r["dtype"], r["precision"], r["kernel"])
                               == (arch, shape, dtype, prec, kernel)]
                        if sel:
                            b = min(sel, key=lambda r: r["registers"])
                            out.append(f"| {arch} | {dtype} | {kernel} | {b['config']} | {b['registers']} | "
                                       f"{b['spill_bytes']} | {b['smem_bytes'] / 1024:.1f} | "
                                       f"{b['tensor_core_instructions']} |")
        sel = [r for r in cuda if r["shape"] == shape]
        if sel:
            cols = [(a, dt) for a in sorted({r["arch"] for r in sel}) for dt in DTYPES]
            out += ["", "CUDA C++, per kernel: tile, registers / spill bytes / shared memory KB / tensor-core "
                    "instructions (declined: not run there, see the last section):", "",
                    "| kernel | " + " | ".join(f"{a} {dt}" for a, dt in cols) + " |",
                    "|---|" + "---|" * len(cols)]
            for kernel in dict.fromkeys(r["kernel"] for r in sel):
                cells = []
                for a, dt in cols:
                    r = next((r for r in sel if (r["arch"], r["dtype"], r["kernel"]) == (a, dt, kernel)), None)
                    cells.append("" if r is None else "declined" if r["reason"] else _cuda_cell(r))
                out.append(f"| {kernel} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Pruned Triton candidates (the autotuner never runs them)", ""]
    if pruned:
        from hmx_kernels.triton.autotune import SPILLING, block_d

        out += ["| arch | shape | dtype | kernel | config | registers | spill B | smem KB | why |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in pruned:
            key = (r["kernel"], block_d(int(r["shape"].split(",")[0])), r["precision"])
            why = "spills (here or on the other arch)" if tuple(r["candidate"]) in SPILLING.get(key, ()) \
                else "shared memory bound above the arch's limit"
            out.append(f"| {r['arch']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['config']} | "
                       f"{r['registers']} | {r['spill_bytes']} | {r['smem_bytes'] / 1024:.1f} | {why} |")
    else:
        out.append("None.")
    out += ["", "A candidate is pruned for every arch when it spills on either (config.SPILLING), and per "
            "device when its shared-memory bound exceeds what the device gives a block (config.smem_bound).",
            "", "## fp32 dot precisions the launcher does not pick (compiled for config.SPILLING)", "",
            "config.dot_precision falls back to the next more precise dot precision where every "
            "candidate of the asked one spills; precisions used only by a mode the backend declines (last "
            "sections) are listed here too. Fewest spill bytes over the candidates, per arch:", "",
            "| shape | kernel | precision | sm_80 | sm_90 |", "|---|---|---|---|---|"]
    for key in dict.fromkeys((r["shape"], r["kernel"], r["precision"]) for r in unpicked):
        sel = [r for r in unpicked if (r["shape"], r["kernel"], r["precision"]) == key]
        cells = [f"{min(r['spill_bytes'] for r in sel if r['arch'] == a)} B" for a in ("sm_80", "sm_90")]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {cells[0]} | {cells[1]} |")
    refused = declined_fp32_modes(dict.fromkeys(tuple(map(int, r["shape"].split(","))) for r in rows))
    if refused:
        out += ["", "## fp32 configurations the triton backend declines under this triton", "",
                "Every candidate of some kernel spills in every dot precision the mode may use (the table "
                "above, config.SPILLING_BY_TRITON); the backend refuses them with the reason "
                "(config.unfit_reason), so `auto` moves on to the next backend:", ""]
        out += [f"- (d_h, k_h) = {shape}, torch.get_float32_matmul_precision() '{mode}': {why}"
                for shape, mode, why in refused]
    declined = [r for r in cuda if r["reason"]]
    if limit_rows or declined:
        out += ["", f"## Compiled but never run ({limit_name})", ""]
    if limit_rows:
        out += [f"Triton, fp32 at d_h 128: {triton_limit_reason(limit_rows[0])}. Smallest shared memory over the "
                "TF32 / 3xTF32 candidates of the backward kernels:"]
        for arch in ("sm_80", "sm_90"):
            for kernel in ("hmx_bwd_kernel_query", "hmx_bwd_kernel_key"):
                sel = [r for r in limit_rows if r["arch"] == arch and r["kernel"] == kernel]
                if sel:
                    out.append(f"- {arch} {kernel}: {min(r['smem_bytes'] for r in sel) / 1024:.0f} KB (limit "
                               f"{SMEM_LIMIT_KB[arch]} KB); spill bytes {min(r['spill_bytes'] for r in sel)}.."
                               f"{max(r['spill_bytes'] for r in sel)}")
        out.append("")
    if declined:
        out += ["CUDA C++:", "", "| arch | shape | dtype | kernel | config | registers | spill B | smem KB | TC instr |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in declined:
            out.append(f"| {r['arch']} | {r['shape']} | {r['dtype']} | {r['kernel']} | {r['config']} | {r['registers']} | "
                       f"{r['spill_bytes']} | {r['smem_bytes'] / 1024:.1f} | {r['tensor_core_instructions']} |")
        out += [""] + [f"Reason: {why}" for why in dict.fromkeys(r["reason"] for r in declined)]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def declined_fp32_modes(shapes: Iterable[Tuple[int, int]]) -> List[Tuple[Tuple[int, int], str, str]]:
    """(shape, float32 matmul mode, reason) of every fp32 configuration the triton backend declines
    under the installed triton for spills (config.unfit_reason without a shared-memory limit)."""
    import torch

    from hmx_kernels.triton.backend import MAX_FP32_HEAD_DIM
    from hmx_kernels.triton.autotune import unfit_reason

    return [(shape, mode, why) for shape in shapes if shape[0] <= MAX_FP32_HEAD_DIM for mode in FP32_MODES
            for why in [unfit_reason(torch.float32, shape[0], mode, None)] if why]


def measured_spilling(rows: List[dict]) -> dict:
    """(kernel, BLOCK_D, precision) -> candidates that spill on some arch, from compiled rows
    (recipe shapes and the limit shape's fp16 / bf16). Where every fp16 / bf16 candidate spills,
    the one with the fewest spill bytes (on its worse arch) is left out, so that one stays
    runnable; fp32 kernels fall back to another dot precision instead (config.dot_precision)."""
    from hmx_kernels.triton.autotune import KERNEL_CANDIDATES, block_d

    worst: Dict[tuple, Dict[tuple, int]] = {}
    for r in rows:
        key = (r["kernel"], block_d(int(r["shape"].split(",")[0])), r["precision"])
        c = tuple(r["candidate"])
        worst.setdefault(key, {})[c] = max(worst.get(key, {}).get(c, 0), r["spill_bytes"])
    out = {}
    for key, by_candidate in sorted(worst.items()):
        spilling = {c for c, b in by_candidate.items() if b}
        if key[2] == "half" and spilling and spilling >= set(KERNEL_CANDIDATES[key[0]]):
            spilling.discard(min(by_candidate, key=by_candidate.get))
        if spilling:
            out[key] = frozenset(spilling)
    return out


def format_spilling(spilling: dict) -> str:
    lines = ["SPILLING = {"]
    for (kernel, bd, prec), v in spilling.items():
        lines.append(f'    ("{kernel}", {bd}, "{prec}"): frozenset({{{", ".join(map(str, sorted(v)))}}}),')
    return "\n".join(lines + ["}"])


def fit_smem_model(rows: List[dict]) -> Dict[Tuple[str, str], Dict[int, Tuple[float, float]]]:
    """(kernel, precision) -> {arch: (squares, tiles)} of config.smem_bound fitted to compiled rows:
    per arch the counts on a 0.25 grid whose bound covers every row's shared memory with the
    smallest mean ratio bound / measured (the form of config._SMEM_MODEL_BY_TRITON)."""
    from hmx_kernels.triton.autotune import block_d

    groups: Dict[Tuple[str, str], Dict[int, List[Tuple[int, int, int, int]]]] = {}
    for r in rows:
        n, _, stages = r["candidate"]
        arch = int(r["arch"].removeprefix("sm_"))
        groups.setdefault((r["kernel"], r["precision"]), {}).setdefault(arch, []).append(
            (n, block_d(int(r["shape"].split(",")[0])), stages, int(r["smem_bytes"])))
    grid = [q / 4 for q in range(0, 49)]
    out = {}
    for (kernel, prec), by_arch in sorted(groups.items()):
        width = 2 if prec == "half" else 4
        fits = {}
        for arch, pts in sorted(by_arch.items()):
            best = None
            for sq in grid:
                for ti in grid:
                    bounds = [width * (sq * d * d + ti * n * d * st) + 1024 for n, d, st, _ in pts]
                    if all(b >= m for b, (*_, m) in zip(bounds, pts)):
                        score = sum(b / max(m, 1) for b, (*_, m) in zip(bounds, pts)) / len(pts)
                        if best is None or score < best[0]:
                            best = (score, sq, ti)
                        break  # a larger tile count only loosens the bound
            if best is None:
                raise RuntimeError(f"no smem model on the grid covers {kernel} {prec} sm_{arch}")
            fits[arch] = (best[1], best[2])
        out[(kernel, prec)] = fits
    return out


def format_smem_model(model: dict) -> str:
    return "\n".join(["{"] + [f'    ("{k}", "{p}"): {{{", ".join(f"{a}: {v}" for a, v in fits.items())}}},'
                              for (k, p), fits in model.items()] + ["}"])


def smem_above_model(rows: List[dict]) -> List[dict]:
    """The rows whose shared memory exceeds config.smem_bound (the installed triton's model)."""
    from hmx_kernels.triton.autotune import block_d, smem_bound

    out = []
    for r in rows:
        n, _, stages = r["candidate"]
        bound = smem_bound(r["kernel"], n, block_d(int(r["shape"].split(",")[0])), stages, r["precision"],
                           int(r["arch"].removeprefix("sm_")))
        if int(r["smem_bytes"]) > bound:
            out.append(r)
    return out


def _meta(wall_s: float) -> dict:
    import datetime

    import triton

    from hmx_kernels.triton import launch as fn

    from tools import cuda_resources as cr
    from benchmarks.config import git_sha

    try:  # the ptxas triton runs per arch (3.9: ptxas for sm_80, ptxas-blackwell for sm_90)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = ", ".join(f"{get_ptxas(a).version.strip().splitlines()[-1]} (sm_{a})" for a in ARCHS)
    except (ImportError, AttributeError, TypeError):
        ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True,
                               text=True).stdout.strip().splitlines()[-1]
    nvcc = cr.find_nvcc()
    if nvcc:
        nvcc = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return dict(triton=triton.__version__, ptxas=ptxas, nvcc=nvcc, git=git_sha(), wall_s=wall_s,
                pe_table=not fn.PE_ON_CHIP, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))


def cuda_rows(archs: Tuple[int, ...], shapes: Tuple[Tuple[int, int], ...]) -> List[dict]:
    """Every CUDA C++ kernel at `shapes` x DTYPES x `archs` (tools/cuda_resources.py), with the
    reason the CUDA backend declines a row (None where it runs it)."""
    from tools import cuda_resources as cr

    rows = cr.cuda_kernel_rows(tuple(str(a) for a in archs), shapes)
    for r in rows:
        r["reason"] = cr.decline_reason(r)
    return rows


ROW_SOURCES["cuda"] = cuda_rows


def pe_on_chip_rows(kernels_csv: str, n_jobs: int = 1) -> List[dict]:
    """The Triton rows of `kernels_csv` (the candidates the autotuner may run) compiled again with
    the positional encoding computed on chip (PE_ON_CHIP) instead of read from the fp32 table:
    the same columns plus stack_bytes (ptxas' stack frame: libdevice's sin / cos keep their
    argument reduction's array in local memory)."""
    wanted = []
    for r in read_csv(kernels_csv):
        if r["backend"] != "triton":
            continue
        parts = r["config"].split("-")
        wanted.append(Job(int(r["arch"].removeprefix("sm_")), tuple(int(x) for x in r["shape"].split(",")),
                          r["dtype"], r["kernel"], parts[3] if len(parts) > 3 else "half",
                          (int(parts[0][2:]), int(parts[1][1:]), int(parts[2][1:]))))
    return run_jobs(wanted, n_jobs, pe_on_chip=True)


def main(argv: Optional[List[str]] = None) -> int:
    _check_not_interpreting()
    p = argparse.ArgumentParser(prog="python -m tools.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes")
    p.add_argument("--out", default=RESULTS, help="folder for kernels.csv, kernels-limit.csv, kernels.md")
    p.add_argument("--no-limit", action="store_true", help="leave out the limit shape (d_h 128)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to report (default: all under PRIMARY_TRITON, else triton "
                        "only: the other backends do not depend on triton; cuda needs nvcc)")
    p.add_argument("--pe-on-chip", action="store_true",
                   help="only compile the Triton rows of OUT/kernels.csv again with the positional encoding "
                        "computed on chip (hmx_kernels.triton.launch.PE_ON_CHIP) and write "
                        "OUT/kernels-pe-on-chip.csv (the evidence for keeping the table)")
    p.add_argument("--save-json", default=None, help="also write every compiled row (pruned ones too) here")
    p.add_argument("--from-json", default=None,
                   help="rewrite the reports from rows saved by --save-json (no compiling, except backends "
                        "missing there), classified by the current config (after editing config.SPILLING, say)")
    a = p.parse_args(argv)
    from hmx_kernels.triton.autotune import INSTALLED_TRITON

    if a.backends is None:
        a.backends = "triton," + ",".join(ROW_SOURCES) if INSTALLED_TRITON == PRIMARY_TRITON else "triton"
    backends = [b for b in a.backends.split(",") if b]
    names = {base: report_name(base) for base in ("kernels.csv", "kernels-limit.csv", "kernels.md")}
    unknown = set(backends) - {"triton", *ROW_SOURCES}
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}")
    shapes = SHAPES + (() if a.no_limit else LIMIT_SHAPES)
    if a.pe_on_chip:
        rows = pe_on_chip_rows(os.path.join(a.out, names["kernels.csv"]), a.jobs)
        write_csv(os.path.join(a.out, "kernels-pe-on-chip.csv"), rows, COLUMNS + ["stack_bytes"])
        print(f"wrote {a.out}/kernels-pe-on-chip.csv: {len(rows)} rows, {sum(1 for r in rows if r['spill_bytes'])} "
              "with spills")
        return 0
    t0 = time.time()
    main_rows: List[dict] = []
    limit_rows: List[dict] = []
    other: Dict[str, List[dict]] = {}
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        main_rows = [classify(r) for r in saved["main"]] if "triton" in backends else []
        limit_rows = [classify(r) for r in saved["limit"]] if "triton" in backends else []
        other = {k: v for k, v in saved.get("other", {}).items() if k in backends}
        t0 -= saved["wall_s"]
    elif "triton" in backends:
        job_list = jobs(SHAPES, DTYPES) + ([] if a.no_limit else jobs(LIMIT_SHAPES, HALF_DTYPES))
        limit_jobs = [] if a.no_limit else jobs(LIMIT_SHAPES, ("fp32",), precisions=LIMIT_FP32_PRECISIONS)
        rows = run_jobs(job_list + limit_jobs, a.jobs, pe_on_chip=a.pe_on_chip)
        main_rows, limit_rows = rows[:len(job_list)], rows[len(job_list):]
    for r in limit_rows:
        r["reason"] = triton_limit_reason(r)
    for name in backends:
        if name != "triton" and name not in other:
            print(f"compiling the {name} kernels", flush=True)
            other[name] = ROW_SOURCES[name](ARCHS, shapes)
    if a.save_json:
        with open(a.save_json, "w") as f:
            json.dump(dict(main=main_rows, limit=limit_rows, other=other, wall_s=time.time() - t0,
                           triton="%d.%d" % INSTALLED_TRITON), f)
    os.makedirs(a.out, exist_ok=True)
    other_rows = [r for name in other for r in other[name]]
    write_csv(os.path.join(a.out, names["kernels.csv"]),
              [r for r in main_rows if r["kept"]] + [r for r in other_rows if not r["reason"]])
    write_csv(os.path.join(a.out, names["kernels-limit.csv"]), limit_rows + [r for r in other_rows if r["reason"]],
              COLUMNS + ["reason"])
    write_markdown(os.path.join(a.out, names["kernels.md"]), main_rows, limit_rows, other,
                   dict(_meta(time.time() - t0), csv=names["kernels.csv"], limit_csv=names["kernels-limit.csv"]))
    bad = [r for r in main_rows if r["kept"] and r["spill_bytes"]]
    for r in bad:
        print("SPILLS (add to config.SPILLING or fix the kernel): " + _describe(r), file=sys.stderr)
    bad_other = [r for r in other_rows if not r["reason"] and r["spill_bytes"]]
    for r in bad_other:
        print(f"SPILLS ({r['backend']}): {r}", file=sys.stderr)
    if main_rows:
        spilling = measured_spilling(main_rows)
        from hmx_kernels.triton.autotune import SPILLING

        if spilling != SPILLING:
            print(f"config.SPILLING_BY_TRITON[{INSTALLED_TRITON}] differs from these measurements; measured:\n"
                  + format_spilling(spilling), file=sys.stderr)
    above = smem_above_model(main_rows + limit_rows)
    for r in above:
        print("SHARED MEMORY ABOVE config.smem_bound: " + _describe(r), file=sys.stderr)
    if above:
        print(f"fitted to these measurements (config._SMEM_MODEL_BY_TRITON[{INSTALLED_TRITON}]):\n"
              + format_smem_model(fit_smem_model(main_rows + limit_rows)), file=sys.stderr)
    n = sum(r["kept"] for r in main_rows) + sum(not r["reason"] for r in other_rows)
    print(f"wrote {a.out}/{names['kernels.csv']} ({n} rows), {names['kernels-limit.csv']}, {names['kernels.md']} "
          f"in {time.time() - t0:.0f} s")
    return 1 if bad or bad_other or above else 0


if __name__ == "__main__":
    sys.exit(main())
