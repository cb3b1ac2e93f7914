"""The GPU run's checks (benchmarks/gpu_run.py runs each as a step process): the environment,
correctness of both backends against the float64 reference, compute-sanitizer, and the GPU test
files. Each writes one row per finished case through the step's `Rows`.

- env: versions, nvidia-smi (clocks, power limit), nvcc, the git SHA and a source fingerprint;
- correctness: forward and every gradient of each case against the reference on the same rounded
  inputs (NaN poisoning on, TF32 off), the error and the backend's declared tolerance per case;
  one worker process per Triton dtype and one for cuda, in parallel;
- sanitizer: memcheck and racecheck over `--sanitize-case`, one tiny forward+backward;
- pytest: the GPU test files, a junit file each, one row per test (gpu_pytest_rows).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional

from .gpu_run import (REPO, RESTARTS, _fatal_cuda_error, _nvidia_smi, _short, _spawn, _wait_child)

# GPU test files, most GPU-specific first (pytest step); PYTEST_SELECT: a file's `-k` expression
# where only some of its tests use the GPU
PYTEST_FILES = ("tests/test_cuda_backend.py", "tests/test_triton.py", "tests/test_causal.py",
                "tests/test_varlen.py", "tests/test_conformance.py", "tests/test_ops.py", "tests/test_streaming.py",
                "tests/test_sequence_parallel.py")
PYTEST_SELECT = {"tests/test_sequence_parallel.py": "cuda"}
DRY_PYTEST_FILES = ("tests/test_autotune_pin.py",)


# ------------------------------------------------------------------------------------ step: env
def step_env_info(ctx) -> None:
    import datetime
    import platform

    import torch

    def versions():
        v = {"status": "ok", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
        for mod in ("triton", "flash_attn", "pytest"):
            try:
                v[mod] = getattr(__import__(mod), "__version__", "installed")
            except Exception as e:  # noqa: BLE001  (absent or broken: say so)
                v[mod] = f"not importable ({type(e).__name__})"
        import hmx_kernels

        v["hmx_kernels"] = hmx_kernels.__version__
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            v.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                     sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
        else:
            v.update(device=f"cpu: {platform.processor() or platform.machine()}", capability=None)
        return v

    def smi():
        query = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
                 "power.limit", "power.default_limit", "power.max_limit", "power.draw", "temperature.gpu",
                 "memory.total", "compute_cap", "persistence_mode", "ecc.mode.current")
        values = _nvidia_smi(*query)
        if values is None:
            return {"status": "skipped", "reason": "nvidia-smi not found or failed"}
        return {"status": "ok", **dict(zip(query, values))}

    def nvcc():
        exe = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                       if os.environ.get("CUDA_HOME") else None)
        if not (exe and os.path.exists(exe)):
            return {"status": "skipped", "reason": "nvcc not found"}
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
        return {"status": "ok", "path": exe, "version": out.strip().splitlines()[-1:]}

    def sanitizer():
        tool = sanitizer_path()
        return {"status": "ok" if tool else "skipped", "path": tool,
                **({} if tool else {"reason": "compute-sanitizer not found"})}

    def settings():
        from hmx_kernels.config import SETTINGS

        return {"status": "ok", "triton_pin": SETTINGS.triton_pin,
                "env": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith(("HMX_", "TRITON_", "CUDA_", "PYTORCH_"))},
                "float32_matmul_precision": torch.get_float32_matmul_precision()}

    for case_id, make in (("versions", versions), ("nvidia-smi", smi), ("nvcc", nvcc),
                          ("source", lambda: {"status": "ok", **source_identity()}),
                          ("compute-sanitizer", sanitizer), ("settings", settings)):
        ctx.rows.case(case_id, make)


def source_identity() -> dict:
    """The git SHA (git, else $HMX_GIT_SHA, else unknown) and a fingerprint of the sources that
    does not need .git: sha256 over the package, csrc, benchmarks, tests and .ci files."""
    sha, dirty = None, None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(REPO), capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            sha = out.stdout.strip()
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(REPO),
                                capture_output=True, text=True, timeout=10)
            dirty = bool(st.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    how = "git"
    if sha is None:
        sha, how = os.environ.get("HMX_GIT_SHA") or "unknown", "HMX_GIT_SHA" if os.environ.get("HMX_GIT_SHA") else "none"
    h = hashlib.sha256()
    for folder, pattern in (("hmx_kernels", "**/*.py"), ("csrc", "**/*"), ("benchmarks", "*.py"),
                            ("tests", "*.py"), (".ci", "*")):
        for path in sorted((REPO / folder).glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return {"git_sha": sha, "sha_from": how, "dirty": dirty, "source_sha256": h.hexdigest()[:16]}


# ------------------------------------------------------------------------------------ step: correctness
def _problem(variant, B, M, N, d, H, k_h, seed, input_scale=1.0, masks=True, bias=True) -> Dict[str, object]:
    """A random HyperMixing call as float32 CPU tensors (no grad) and bool masks (True = padded):
    speechbrain (self-mixing, one mask) or idiap (M queries, N keys, a mask each)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d_h = d // H
    t: Dict[str, object] = {"query": torch.randn(B, M, d, generator=g) * input_scale}
    if variant == "idiap":
        t["key"] = torch.randn(B, N, d, generator=g) * input_scale
        t["value"] = torch.randn(B, N, d, generator=g) * input_scale
    for gen in ("w1", "w2"):
        t[f"{gen}_fc1_weight"] = torch.randn(H, d_h, d_h, generator=g) / d_h ** 0.5
        t[f"{gen}_fc1_bias"] = torch.randn(H, d_h, generator=g) * 0.5 if bias else None
        t[f"{gen}_fc2_weight"] = torch.randn(H, k_h, d_h, generator=g) / d_h ** 0.5
        t[f"{gen}_fc2_bias"] = torch.randn(H, k_h, generator=g) * 0.5 if bias else None
    t["ln_weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    t["ln_bias"] = 0.1 * torch.randn(d, generator=g)

    def tail(length):  # batch element b > 0 loses its last b * length / (B + 1) tokens
        m = torch.zeros(B, length, dtype=torch.bool)
        if masks:
            for b in range(1, B):
                m[b, max(1, length - (b * length) // (B + 1)):] = True
        return m

    t["key_padding_mask"] = tail(N if variant == "idiap" else M)
    if variant == "idiap":
        t["query_padding_mask"] = tail(M)
    return t


def _cast(t: Dict[str, object], dtype, device) -> Dict[str, object]:
    """Float tensors in `dtype` on `device` as leaves that require grad; masks moved."""
    import torch

    out = {}
    for k, v in t.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(device=device, dtype=dtype).requires_grad_(True)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out


def _forward_backward(call, tensors, backend, grad):
    import torch

    leaves = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    out = call(tensors, backend)
    grads = torch.autograd.grad(out, list(leaves.values()), grad.to(out.dtype), allow_unused=True)
    return out.detach(), dict(zip(leaves, grads))


def _rel_err(actual, expected) -> float:
    import torch

    if actual is None or expected is None:
        return 0.0 if actual is None and expected is None else float("inf")
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30)) if e.numel() else 0.0


def backend_refusal(backend: str, t, **mode) -> str:
    """Why `backend` declines the dense call on tensors `t` ("" if it takes it), from that backend's
    own reasons: the dispatcher's error lists every backend's, and probing the `cpu` backend could
    start a build of the extension in the middle of a timed step."""
    import hmx_kernels
    from hmx_kernels.dispatch import get_backend

    if "key" in t:
        problem = hmx_kernels.check_inputs(t["query"], t["key"], t["value"], *_weights(t), variant="idiap",
                                           key_padding_mask=t["key_padding_mask"],
                                           query_padding_mask=t["query_padding_mask"], **mode)
    else:
        problem = hmx_kernels.check_inputs(t["query"], None, None, *_weights(t), variant="speechbrain",
                                           key_padding_mask=t.get("key_padding_mask"), **mode)
    return "; ".join(get_backend(backend).not_supported_reasons(problem))


def _weights(t):
    from hmx_kernels.problem import WEIGHT_NAMES

    return [t[k] for k in WEIGHT_NAMES]


def _call_dense(t, backend, **mode):
    import hmx_kernels

    if "key" in t:
        return hmx_kernels.hyper_mixing(t["query"], t["key"], t["value"], *_weights(t), variant="idiap",
                                        key_padding_mask=t["key_padding_mask"],
                                        query_padding_mask=t["query_padding_mask"], backend=backend, **mode)
    return hmx_kernels.hyper_mixing(t["query"], None, None, *_weights(t), variant="speechbrain",
                                    key_padding_mask=t.get("key_padding_mask"), backend=backend, **mode)


def _call_packed(lengths, **mode):
    def call(t, backend):
        import torch

        from hmx_kernels.varlen import cu_seqlens_from_lengths, hyper_mixing_varlen

        cu = cu_seqlens_from_lengths(torch.tensor(lengths)).to(t["query"].device)
        return hyper_mixing_varlen(t["query"][0], cu, max(lengths), *_weights(t), variant="speechbrain",
                                   backend=backend, **mode)

    return call


def correctness_cases(dry: bool) -> List[dict]:
    """The step's cases: per backend the dense grid (dtype, d_h, N), the idiap cross-mixing case,
    the mode cases and the fp16 range case; each worker (correctness_group) runs its share in order."""
    import torch

    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    # dry run: the same case kinds at sizes the interpreter runs in about a second each (token-causal
    # mixing has a block per token there, so its case is shorter)
    d_hs, lengths, H = ((18,), (20,), 2) if dry else ((18, 32, 64, 128), (1000, 4500), 2)
    n_mode, n_causal = (20, 7) if dry else (1000, 1000)
    chunk = 8 if dry else 64
    packed = [7, 1, 9, 3] if dry else [300, 1, 457, 242]
    packed_empty = [9, 0, 6, 5] if dry else [300, 0, 457, 242]  # with an empty sequence, for the chunked case
    mode_dtypes = (torch.float32,) if dry else (torch.bfloat16, torch.float32)
    cases = []
    for backend in ("triton", "cuda"):
        for dtype in dtypes:
            for d_h in d_hs:
                for N in lengths:
                    cases.append(dict(backend=backend, dtype=dtype, case=f"sb_dh{d_h}_N{N}", kind="dense",
                                      problem=dict(variant="speechbrain", B=2, M=N, N=N, d=H * d_h, H=H, k_h=4 * d_h)))
        for dtype in (dtypes if not dry else (torch.float32,)):
            cases.append(dict(backend=backend, dtype=dtype, case=f"idiap_cross_masked_M{n_mode}", kind="dense",
                              problem=dict(variant="idiap", B=2, M=n_mode, N=n_mode * 7 // 9 + 1, d=64, H=2,
                                           k_h=128, input_scale=0.3)))
        for dtype in mode_dtypes:
            base = dict(variant="speechbrain", B=2, M=n_mode, N=n_mode, d=64, H=2, k_h=128)
            cases.append(dict(backend=backend, dtype=dtype, case=f"causal_N{n_causal}", kind="dense",
                              mode=dict(causal=True), problem=dict(base, M=n_causal, N=n_causal)))
            cases.append(dict(backend=backend, dtype=dtype, case=f"chunk{chunk}_left2_N{n_mode}", kind="dense",
                              mode=dict(chunk_size=chunk, left_context_chunks=2), problem=base))
            cases.append(dict(backend=backend, dtype=dtype, case=f"chunk{chunk}_all_N{n_mode}", kind="dense",
                              mode=dict(chunk_size=chunk), problem=base))
            cases.append(dict(backend=backend, dtype=dtype, case=f"packed_{'-'.join(map(str, packed))}",
                              kind="packed", lengths=packed,
                              problem=dict(variant="speechbrain", B=1, M=sum(packed), N=sum(packed), d=64, H=2,
                                           k_h=128, masks=False)))
            cases.append(dict(backend=backend, dtype=dtype,
                              case=f"packed_chunk{chunk}_left1_{'-'.join(map(str, packed_empty))}", kind="packed",
                              lengths=packed_empty, mode=dict(chunk_size=chunk, left_context_chunks=1),
                              problem=dict(variant="speechbrain", B=1, M=sum(packed_empty), N=sum(packed_empty),
                                           d=64, H=2, k_h=128, masks=False)))
        cases.append(dict(backend=backend, dtype=torch.float16, case="fp16_large_state", kind="fp16_range",
                          problem=dict(variant="idiap", B=1, M=9, N=40, d=16, H=2, k_h=12, input_scale=0.3)))
    for c in cases:
        c["id"] = f"{c['backend']}/{str(c['dtype']).replace('torch.', '')}/{c['case']}"
    return cases


def correctness_group(case: dict, dry: bool = False) -> str:
    """The worker a case runs in: one per Triton dtype (each compiles its own kernels, so three
    compile at once on the machine's cores) and one for cuda (no JIT; waits for the build). The dry
    run has two (triton, cuda): the interpreter compiles nothing, and each worker imports torch."""
    if case["backend"] == "cuda" or dry:
        return case["backend"]
    return f"triton-{str(case['dtype']).replace('torch.', '')}"


def step_correctness(ctx) -> None:
    """The parent starts one worker process per group, in parallel; a worker that dies (a broken
    CUDA context) gets a crashed row for its case in flight and is started again, resuming."""
    if ctx.worker is not None:
        return _correctness_worker(ctx)
    groups = list(dict.fromkeys(correctness_group(c, ctx.dry) for c in correctness_cases(ctx.dry)))
    env = dict(os.environ)
    log = open(ctx.dir / "correctness.workers.log", "a")
    procs: Dict[str, subprocess.Popen] = {}
    restarts: Dict[str, int] = {g: 0 for g in groups}

    def start(group):
        cmd = [sys.executable, "-m", "benchmarks.gpu_run", "--step", "correctness", "--worker", group,
               "--dir", str(ctx.dir), "--deadline", f"{ctx.deadline:.3f}"] + (["--dry-run"] if ctx.dry else [])
        procs[group] = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)

    for group in groups:
        start(group)
    while procs:
        time.sleep(0.2)
        for group, proc in list(procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del procs[group]
            if rc == 0:
                continue
            current = ctx.dir / f"correctness.{group}.current"
            died_on = current.read_text().strip() if current.exists() else ""
            if died_on:
                ctx.rows.add({"id": died_on, "status": "crashed", "rc": rc, "worker": group,
                              "reason": "the worker process died on it"})
            restarts[group] += 1
            if restarts[group] <= RESTARTS and ctx.deadline - time.time() > 5:
                print(f"[correctness] worker {group} exited {rc}; restarting", flush=True)
                start(group)


def _correctness_worker(ctx) -> None:
    import torch

    import hmx_kernels
    from hmx_kernels import config as hmx_config
    from hmx_kernels.dispatch import get_backend

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 tolerances are for "highest" (no TF32)
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    hmx_config.set_poison(True)  # a buffer element a kernel leaves unwritten shows as NaN
    for case in correctness_cases(ctx.dry):
        if correctness_group(case, ctx.dry) != ctx.worker or case["id"] in ctx.rows.done:
            continue
        if case["backend"] == "cuda":
            ctx.wait_for_build()
        _correctness_case(ctx, case, ctx.device, hmx_kernels, get_backend)


def _correctness_case(ctx, case, device, hmx_kernels, get_backend) -> None:
    import torch

    rows = ctx.rows
    rows.start(case["id"])
    p = dict(case["problem"])
    row = {"id": case["id"], "backend": case["backend"], "dtype": str(case["dtype"]).replace("torch.", ""),
           "case": case["case"], **{k: p[k] for k in ("variant", "B", "M", "N", "H", "k_h")}, "d_h": p["d"] // p["H"]}
    if case["backend"] == "cuda" and ctx.build_failed():
        rows.add({**row, "status": "skipped", "reason": "the extension build failed (build.log)"})
        return
    seed = zlib.crc32(case["id"].encode()) % 10000
    t = _problem(seed=seed, **p)
    if case["kind"] == "fp16_range":  # tests/test_triton.py's case: C and the pre-LayerNorm Y exceed
        t["value"] = t["value"] * 64  # fp16's range, and dY falls below its normal range
        t["w2_fc2_weight"] = t["w2_fc2_weight"] * 256
    call = _call_packed(case["lengths"], **case.get("mode", {})) if case["kind"] == "packed" else (
        lambda tt, b, _m=case.get("mode", {}): _call_dense(tt, b, **_m))
    dtype = case["dtype"]
    tol = get_backend(case["backend"]).tolerances.get((device.type, dtype))
    t0 = time.time()
    try:
        test = _cast(t, dtype, device)
        # packed cases: the same tokens as one dense sequence (a backend without packing runs them padded)
        why = backend_refusal(case["backend"], test, **case.get("mode", {}))
        if why:
            rows.add({**row, "status": "unsupported", "reason": why})
            return
        out_shape = (p["B"], p["M"], p["d"]) if case["kind"] != "packed" else (p["M"], p["d"])
        g = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1))
        if case["kind"] == "fp16_range":
            g = g * 2.0 ** -10
        g = g.to(device=device, dtype=dtype)
        out, grads = _forward_backward(call, test, case["backend"], g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        backend_s = time.time() - t0
        ref = {k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                   else v) for k, v in test.items()}  # the same rounded values, in float64
        ref_out, ref_grads = _forward_backward(call, ref, "reference", g.double())
    except hmx_kernels.BackendNotSupportedError as e:
        rows.add({**row, "status": "unsupported", "reason": _short(e)})
        return
    except Exception as e:  # noqa: BLE001  (recorded; a broken CUDA context ends the step)
        rows.add({**row, "status": "error", "error": _short(e), "seconds": round(time.time() - t0, 2)})
        if _fatal_cuda_error(e):
            raise SystemExit(3)
        return
    errs = {name: _rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    worst = max(errs, key=errs.get) if errs else None
    out_err = _rel_err(out, ref_out)
    grad_err = errs[worst] if worst else 0.0
    ok = tol is not None and out_err <= tol.out and grad_err <= tol.grad
    rows.add({**row, "status": "pass" if ok else "fail", "out_err": out_err, "out_tol": tol and tol.out,
              "grad_err": grad_err, "grad_worst": worst, "grad_tol": tol and tol.grad,
              "grads": {k: float(f"{v:.3e}") for k, v in errs.items()}, "backend_s": round(backend_s, 2),
              "seconds": round(time.time() - t0, 2), "device": str(device),
              "triton_pin": _pin_setting()})


def _pin_setting() -> bool:
    from hmx_kernels.config import SETTINGS

    return SETTINGS.triton_pin


# ------------------------------------------------------------------------------------ step: sanitizer
def sanitizer_path() -> Optional[str]:
    for cand in (shutil.which("compute-sanitizer"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer"),
                 "/usr/local/cuda/bin/compute-sanitizer"):
        if cand and os.path.exists(cand):
            return cand
    return None


def sanitize_case(backend: str) -> int:
    """The sanitizer's payload: one tiny masked forward+backward of `backend` (speechbrain, B 1,
    N 37, d_h 18, k_h 72), checked finite. Exit 0 when it ran."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = _cast(_problem("speechbrain", 2, 37, 37, 36, 2, 72, seed=5), dtype, device)
    g = torch.randn(2, 37, 36, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    out, grads = _forward_backward(lambda tt, b: _call_dense(tt, b), t, backend, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    finite = bool(torch.isfinite(out).all()) and all(x is None or bool(torch.isfinite(x).all()) for x in grads.values())
    print(f"sanitize-case {backend}: ran, finite={finite}")
    return 0 if finite else 4


def step_sanitizer(ctx) -> None:
    tool = sanitizer_path()
    runs = [(tool_name, backend) for tool_name in ("memcheck", "racecheck") for backend in ("triton", "cuda")]
    runs = [r for r in runs if f"{r[0]}/{r[1]}" not in ctx.rows.done]
    for i, (tool_name, backend) in enumerate(runs):
        case_id = f"{tool_name}/{backend}"
        ctx.rows.start(case_id)
        if backend == "cuda" and ctx.dry:
            ctx.rows.add({"id": case_id, "status": "skipped", "reason": "dry run: the cuda backend needs a GPU"})
            continue
        if tool is None and tool_name != "memcheck":
            ctx.rows.add({"id": case_id, "status": "skipped",
                          "reason": "compute-sanitizer not found (the payload ran once, under memcheck's row)"})
            continue
        if backend == "cuda" and (ctx.build_failed() or not ctx.wait_for_build()):
            ctx.rows.add({"id": case_id, "status": "skipped", "reason": "the extension is not built (build.log)"})
            continue
        cmd = [sys.executable, "-m", "benchmarks.gpu_run", "--sanitize-case", backend]
        if tool is not None:
            cmd = [tool, "--tool", tool_name, "--print-limit", "20", "--error-exitcode", "99"] + cmd
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # memcheck sees each allocation's bounds
        left = max(5.0, (ctx.deadline - time.time() - 2) / (len(runs) - i))
        log_name = f"sanitizer-{tool_name}-{backend}.log"
        t0 = time.time()
        with open(ctx.dir / log_name, "w") as log:  # the tool and its payload: one process group
            rc = _wait_child(ctx, _spawn(ctx, cmd, log, env), left)
        text = (ctx.dir / log_name).read_text(errors="replace")
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        row = {"id": case_id, "tool": tool_name, "backend": backend, "rc": rc, "seconds": round(time.time() - t0, 1),
               "errors": int(m.group(1)) if m else None, "log": log_name, "payload_ran": "sanitize-case" in text}
        if tool is None:
            row.update(status="skipped", reason="compute-sanitizer not found; the payload ran without it",
                       payload_ok=rc == 0)
        elif rc is None:
            row.update(status="timeout", reason=f"over its {left:.0f} s share of the step")
        else:
            row.update(status="clean" if rc == 0 and row["errors"] == 0 else "errors")
        ctx.rows.add(row)


# ------------------------------------------------------------------------------------ step: pytest
def step_pytest(ctx) -> None:
    files = DRY_PYTEST_FILES if ctx.dry else PYTEST_FILES
    try:
        import pytest  # noqa: F401
    except ImportError as e:
        ctx.rows.start("pytest")
        ctx.rows.add({"id": "pytest", "status": "skipped", "reason": _short(e)})
        return
    for i, path in enumerate(files):
        file_id = f"file:{path}"
        if file_id in ctx.rows.done:
            continue
        stem = Path(path).stem
        left = ctx.deadline - time.time() - 1
        if left < 5:
            ctx.rows.start(file_id)
            ctx.rows.add({"id": file_id, "status": "skipped", "reason": "no time left"})
            continue
        ctx.rows.start(file_id)
        junit = ctx.dir / f"junit-{stem}.xml"
        cmd = [sys.executable, "-m", "pytest", path, "-q", "-rfE", "--maxfail=1000", f"--junitxml={junit}",
               "-p", "benchmarks.gpu_pytest_rows", "-o", f"cache_dir={ctx.dir / '.pytest_cache'}"]
        if path in PYTEST_SELECT:
            cmd += ["-k", PYTEST_SELECT[path]]
        env = dict(os.environ, HMX_GPU_RUN_ROWS=str(ctx.rows.path))
        t0 = time.time()
        with open(ctx.dir / f"pytest-{stem}.log", "w") as log:
            rc = _wait_child(ctx, _spawn(ctx, cmd, log, env), left)
            status = "done" if rc is not None else "killed at the step's time limit"
        ctx.rows.add({"id": file_id, "status": status, "rc": rc, "seconds": round(time.time() - t0, 1),
                      "junit": junit.name if junit.exists() else None, "log": f"pytest-{stem}.log"})
