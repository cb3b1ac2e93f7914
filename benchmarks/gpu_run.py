"""One short, self-recording GPU run: the evidence a lent GPU machine can give in about 8 minutes.

    python -m benchmarks.gpu_run [--out-root DIR] [--budget 480]    # a CUDA machine (.ci/gpu_run.sh)
    python -m benchmarks.gpu_run --dry-run --out-root /tmp/gpu-dry   # CPU: TRITON_INTERPRET=1, tiny shapes
    python -m benchmarks.gpu_report DIR [--readme README.md]         # the results as Markdown tables

Needs only the repository, torch and triton (and nvcc for the `cuda` backend): the checkout is
imported through PYTHONPATH, nothing is installed. Results go to DIR = <out-root>/<device slug>/
(default out-root benchmarks/results/gpu), one JSON line per finished case, flushed and fsynced:

| step        | limit | file                | what one row is |
|-------------|-------|---------------------|-----------------|
| build       | (bg)  | build.jsonl         | the C++/CUDA extension build, started at t = 0 in the background |
| env         |  20 s | env.jsonl           | versions; nvidia-smi clocks, power limit; nvcc; git SHA and a source fingerprint; settings |
| correctness | 170 s | correctness.jsonl   | one backend x dtype x case: forward and every gradient against the float64 reference (a worker per Triton dtype and one for cuda, in parallel) |
| sanitizer   |  70 s | sanitizer.jsonl     | compute-sanitizer memcheck / racecheck on one tiny forward+backward per backend |
| timings     | 150 s | timings.jsonl       | contender x shape x N x pass x eager/graph: median time, peak memory |
| breakdown   |  30 s | breakdown.jsonl     | torch.profiler GPU time per kernel at N 16384 sb256, GB/s, the autotuner's configs |
| pytest      | rest  | pytest.jsonl        | one test (plus one row per file); junit-<file>.xml per finished file |
|             |       | steps.jsonl         | one row per step: limit, wall time, exit, the case in flight when it was killed |

The step limits add up to the budget (480 s; pytest gets what the others left). Each step is a
subprocess with its own limit: a killed or crashed step keeps every row it finished, the case in
flight is recorded as killed / crashed, and a crashed step is started again and resumes after it.
Correctness, sanitizer and pytest run with HMX_KERNELS_TRITON_PIN=1 (one tested config per
Triton kernel, no tuning); timings and breakdown let the autotuner choose and share its choices
through Triton's disk cache (TRITON_CACHE_AUTOTUNING=1). The dry run takes the same code path
with tiny shapes; what needs a GPU (CUDA graphs, nvidia-smi, compute-sanitizer, the extension
build, the cuda backend) is recorded as a "skipped" row with the reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 480
# (step, limit in seconds; None: what the budget has left)
STEPS = (("env", 20), ("correctness", 170), ("sanitizer", 70), ("timings", 150), ("breakdown", 30), ("pytest", None))
RESTARTS = 3  # a crashed step is started again at most this often (resuming after the crashed case)
# tests: "stall:N" / "exit:N": after N rows, the next case of a step process hangs (as a hung kernel
# would) / kills the process (as an illegal memory access does)
FAULT_ENV = "HMX_GPU_RUN_FAULT"

# GPU test files, most GPU-specific first (pytest step)
PYTEST_FILES = ("tests/test_cuda_backend.py", "tests/test_triton.py", "tests/test_causal.py",
                "tests/test_varlen.py", "tests/test_conformance.py", "tests/test_ops.py")
DRY_PYTEST_FILES = ("tests/test_autotune_pin.py",)


# ------------------------------------------------------------------------------------ rows on disk
class Rows:
    """Appends one JSON line per finished case to <dir>/<step>.jsonl (flushed and fsynced), keeps
    the case in flight in <dir>/<step>.current, and knows the ids already written (a restarted
    step skips them)."""

    def __init__(self, directory: Path, step: str, worker: Optional[str] = None):
        self.path = directory / f"{step}.jsonl"
        self.current = directory / (f"{step}.{worker}.current" if worker else f"{step}.current")
        self.step = step
        self.t0 = time.time()
        self.done = {r.get("id") for r in read_rows(self.path)}
        self.fault = ("", 0)  # tests (FAULT_ENV): ("stall" or "exit", after this many rows)
        self._written = 0

    def start(self, case_id: str) -> None:
        self.current.write_text(case_id)
        kind, after = self.fault
        if after and self._written >= after:  # tests: the case now in flight hangs / kills the process
            if kind == "stall":
                time.sleep(3600)
            elif kind == "exit":
                os._exit(3)

    def add(self, row: dict) -> dict:
        row = {"step": self.step, **row, "t_s": round(time.time() - self.t0, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(row.get("id"))
        self.current.write_text("")
        print(f"[{self.step}] {row.get('id')}: {row.get('status')}", flush=True)
        self._written += 1
        return row

    def case(self, case_id: str, make_row: Callable[[], dict]) -> None:
        """Write make_row()'s row for case_id unless a row of that id exists (a restarted step)."""
        if case_id not in self.done:
            self.start(case_id)
            self.add({"id": case_id, **make_row()})


def read_rows(path: Path) -> List[dict]:
    """Every complete JSON line of a rows file (a line cut by a kill is left out)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return out


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = text.split("\nall backends:")[0]
    return text[:limit]


def _fatal_cuda_error(exc: BaseException) -> bool:
    """An error after which the CUDA context is unusable: the step exits, and is restarted."""
    text = str(exc).lower()
    return any(s in text for s in ("illegal memory access", "unspecified launch failure", "misaligned address",
                                   "device-side assert", "an illegal instruction"))


# ------------------------------------------------------------------------------------ orchestration
def _nvidia_smi(*query: str) -> Optional[List[str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [c.strip() for c in out.stdout.splitlines()[0].split(",")]


def device_slug(dry_run: bool) -> str:
    """File-name-safe device name (as benchmarks.config.device_slug), found without importing torch."""
    if dry_run:
        return "dry-run-cpu"
    name = _nvidia_smi("name")
    if name:
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name[0].lower()).strip("-")
    import torch  # no nvidia-smi: ask torch

    from .config import device_slug as slug

    return slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def step_env(step: str, dry_run: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    pinned = step in ("correctness", "sanitizer", "pytest")
    env["HMX_KERNELS_TRITON_PIN"] = "1" if pinned else "0"
    if step in ("timings", "breakdown"):
        env["TRITON_CACHE_AUTOTUNING"] = "1"
    return env


class Build:
    """`python -m hmx_kernels.build` in the background from t = 0; one build.jsonl row when it ends
    and a build.done marker that the correctness step waits for before its cuda cases."""

    def __init__(self, directory: Path, dry_run: bool):
        self.dir = directory
        self.rows = Rows(directory, "build")
        self.proc = None
        self.t0 = time.time()
        if "build" in self.rows.done:
            return
        if dry_run:
            self.rows.add({"id": "build", "status": "skipped",
                           "reason": "dry run: the CUDA extension needs nvcc and a GPU (the GPU run builds it here)"})
            return
        (directory / "build.started").write_text(str(self.t0))
        log = open(directory / "build.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "hmx_kernels.build"], cwd=str(REPO),
                                     env=step_env("build", dry_run), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.rows.start("build")
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        rc = self.proc.wait()
        if rc < 0:  # killed by stop()
            return
        self.rows.add({"id": "build", "status": "ok" if rc == 0 else "failed", "rc": rc,
                       "seconds": round(time.time() - self.t0, 1),
                       "arch": os.environ.get("HMX_KERNELS_CUDA_ARCH"), "log": "build.log"})
        (self.dir / "build.done").write_text(str(rc))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill(self.proc)
            self.rows.add({"id": "build", "status": "killed", "seconds": round(time.time() - self.t0, 1),
                           "reason": "still building when the run's budget ended"})


def _spawn(ctx, cmd, log, env=None) -> subprocess.Popen:
    """A step's child (compute-sanitizer, pytest) in a process group of its own, noted in
    <step>.child so that the orchestrator can end it too when it kills the step at its limit."""
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    (ctx.dir / f"{ctx.rows.step}.child").write_text(str(proc.pid))
    return proc


def _wait_child(ctx, proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """The child's exit status, or None when it ran past `timeout` (then its group is killed)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        rc = None
    (ctx.dir / f"{ctx.rows.step}.child").unlink(missing_ok=True)
    return rc


def _kill_child_of(directory: Path, step: str) -> None:
    note = directory / f"{step}.child"
    try:
        os.killpg(int(note.read_text()), signal.SIGKILL)
    except (OSError, ValueError):  # none, or already gone
        pass
    note.unlink(missing_ok=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def run_step(step: str, limit: float, directory: Path, dry_run: bool, steps: Rows) -> dict:
    """Runs one step as a subprocess under its time limit; restarts it after a crash."""
    t0 = time.time()
    deadline = t0 + limit
    rows = Rows(directory, step)
    before = len(read_rows(rows.path))
    status, rc, in_flight, restarts, crashed = "ok", 0, "", 0, []
    with open(directory / f"{step}.log", "a") as log:
        while True:
            cmd = [sys.executable, "-m", "benchmarks.gpu_run", "--step", step, "--dir", str(directory),
                   "--deadline", f"{deadline:.3f}"] + (["--dry-run"] if dry_run else [])
            proc = subprocess.Popen(cmd, cwd=str(REPO), env=step_env(step, dry_run), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _kill(proc)
                _kill_child_of(directory, step)
                rc, status = None, "killed at its time limit"
                flying = [p.read_text().strip() for p in sorted(directory.glob(f"{step}.*current"))]
                for case_id in filter(None, flying):  # the step's case, or each worker's
                    rows.add({"id": case_id, "status": "killed",
                              "reason": f"in flight when the step reached its {limit:.0f} s limit"})
                in_flight = ", ".join(filter(None, flying))
                break
            if rc == 0:
                status = "ok"
                break
            _kill_child_of(directory, step)
            died_on = rows.current.read_text().strip() if rows.current.exists() else ""
            if died_on:
                rows.add({"id": died_on, "status": "crashed", "rc": rc, "reason": "the step process died on it"})
            crashed.append(died_on or f"exit {rc} between cases")
            restarts += 1
            status = f"crashed (exit {rc})"
            if restarts > RESTARTS or deadline - time.time() < 5:
                break
            print(f"[{step}] restarting after exit {rc} (died on: {died_on or 'none'})", flush=True)
    after = read_rows(rows.path)
    row = steps.add({"id": step, "status": status, "rc": rc, "limit_s": round(limit, 1),
                     "wall_s": round(time.time() - t0, 1), "rows": len(after) - before, "restarts": restarts,
                     "in_flight": in_flight or None, "crashed_on": crashed or None})
    return row


def orchestrate(args) -> int:
    t0 = time.time()
    dry = args.dry_run
    if not dry and not os.environ.get("HMX_KERNELS_CUDA_ARCH"):
        cap = _nvidia_smi("compute_cap")
        if cap:
            os.environ["HMX_KERNELS_CUDA_ARCH"] = cap[0]  # the build and every step use the same arch
    directory = Path(args.dir) if args.dir else Path(args.out_root) / device_slug(dry)
    directory.mkdir(parents=True, exist_ok=True)
    limits = dict(STEPS)
    for item in filter(None, (args.limits or "").split(",")):
        name, value = item.split("=")
        limits[name] = float(value)
    only = set(filter(None, (args.only or "").split(","))) or {name for name, _ in STEPS}
    fixed = sum(v for k, v in limits.items() if v is not None and k in only)
    print(f"gpu_run: {directory} (budget {args.budget:.0f} s{', dry run' if dry else ''}; step limits "
          f"{fixed:.0f} s + pytest the rest; a step never runs past the budget)", flush=True)
    build = Build(directory, dry) if "correctness" in only or "build" in only else None
    steps = Rows(directory, "steps")
    try:
        for name, _ in STEPS:
            if name not in only:
                continue
            left = args.budget - (time.time() - t0) - 2
            limit = left if limits[name] is None else min(limits[name], left)  # pytest: the rest
            if limit < 3:
                steps.add({"id": name, "status": "skipped", "reason": f"{limit:.0f} s of the budget left"})
                continue
            row = run_step(name, limit, directory, dry, steps)
            print(f"gpu_run: step {name}: {row['status']}, {row['rows']} rows, {row['wall_s']} s of {row['limit_s']}",
                  flush=True)
    finally:
        if build is not None:
            build.stop()
        for marker in (*directory.glob("*.current"), *directory.glob("*.child"), directory / "build.started",
                       directory / "build.done"):
            marker.unlink(missing_ok=True)
        shutil.rmtree(directory / ".pytest_cache", ignore_errors=True)
    print(f"gpu_run: done in {time.time() - t0:.0f} s; results in {directory}", flush=True)
    return 0


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


def _weights(t):
    from hmx_kernels.validation import WEIGHT_NAMES

    return [t[k] for k in WEIGHT_NAMES]


def _call_dense(t, backend, **mode):
    import hmx_kernels

    if "key" in t:
        return hmx_kernels.hyper_mixing(t["query"], t["key"], t["value"], *_weights(t), variant="idiap",
                                        key_padding_mask=t["key_padding_mask"],
                                        query_padding_mask=t["query_padding_mask"], backend=backend, **mode)
    return hmx_kernels.hyper_mixing(t["query"], None, None, *_weights(t), variant="speechbrain",
                                    key_padding_mask=t.get("key_padding_mask"), backend=backend, **mode)


def _call_packed(lengths):
    def call(t, backend):
        import torch

        from hmx_kernels.varlen import cu_seqlens_from_lengths, hyper_mixing_varlen

        cu = cu_seqlens_from_lengths(torch.tensor(lengths)).to(t["query"].device)
        return hyper_mixing_varlen(t["query"][0], cu, max(lengths), *_weights(t), variant="speechbrain",
                                   backend=backend)

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
            cases.append(dict(backend=backend, dtype=dtype, case=f"packed_{'-'.join(map(str, packed))}",
                              kind="packed", lengths=packed,
                              problem=dict(variant="speechbrain", B=1, M=sum(packed), N=sum(packed), d=64, H=2,
                                           k_h=128, masks=False)))
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
    call = _call_packed(case["lengths"]) if case["kind"] == "packed" else (
        lambda tt, b, _m=case.get("mode", {}): _call_dense(tt, b, **_m))
    dtype = case["dtype"]
    tol = get_backend(case["backend"]).tolerances.get((device.type, dtype))
    t0 = time.time()
    try:
        test = _cast(t, dtype, device)
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


# ------------------------------------------------------------------------------------ step: timings
def timing_shapes(dry: bool):
    from .config import SHAPES, Shape

    if dry:
        return {"tiny": Shape("tiny", 36, 144, 2)}
    return {k: SHAPES[k] for k in ("sb144", "sb256", "tf512")}


GRAPH_MAX_EAGER_MS = 25.0  # slower eager calls are not captured: launch overhead is noise there
CONTENDERS = ("hmx-triton", "hmx-cuda", "sdpa-flash", "sdpa-cudnn", "flash-attn")
FA3_STAND_IN = ("sdpa-cudnn: cuDNN's fused attention (Hopper kernels), the FlashAttention-3-class contender; "
                "sdpa-flash is FlashAttention-2 as built into PyTorch; flash-attn only where the package imports")


def _build_contender(name: str, shape, B: int, N: int, dtype, device):
    """(forward closure, leaves, note) for one contender at one point. Attention runs d_h padded to a
    multiple of 8 (what the kernels take; d_h 18 runs as 24), as noted in the row."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    if name.startswith("hmx-"):
        import hmx_kernels

        torch.manual_seed(0)
        layer = hmx_kernels.FusedHyperMixing(shape.d, shape.k, tied=False, num_heads=shape.H,
                                             backend=name[4:]).to(device=device, dtype=dtype)
        x = torch.randn(B, N, shape.d, generator=g, device=device).to(dtype).requires_grad_(True)
        return (lambda: layer(x, x, x)[0]), [x] + list(layer.parameters()), {}
    dh = -(-shape.d_h // 8) * 8
    note = {"d_h_run": dh}
    if name == "flash-attn":
        from flash_attn import flash_attn_func  # ImportError -> skipped row

        q, k, v = (torch.randn(B, N, shape.H, dh, generator=g, device=device).to(dtype).requires_grad_(True)
                   for _ in range(3))
        return (lambda: flash_attn_func(q, k, v)), [q, k, v], note
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    q, k, v = (torch.randn(B, shape.H, N, dh, generator=g, device=device).to(dtype).requires_grad_(True)
               for _ in range(3))

    def fwd():
        with sdpa_kernel([which]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fwd, [q, k, v], note


def _percentiles(samples: List[float]) -> dict:
    s = sorted(samples)
    mid = s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
    return {"ms": mid * 1e3, "p20_ms": s[int(0.2 * (len(s) - 1))] * 1e3, "p80_ms": s[int(0.8 * (len(s) - 1) + 0.5)] * 1e3,
            "reps": len(s)}


def _time(fn: Callable[[], object], before: Callable[[], None], device, budget_s: float, max_reps: int,
          min_reps: int) -> dict:
    """Each call timed on its own (CUDA events; perf_counter on CPU), `before` untimed; at least
    min_reps calls, more while under budget_s, at most max_reps."""
    import torch

    samples: List[float] = []
    t_start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - t_start < budget_s):
        before()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def _capture(fn, before):
    """fn captured as a CUDA graph (two warm-up calls on a side stream first, as torch requires)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(s)
    before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def step_timings(ctx) -> None:
    import torch

    from hmx_kernels.triton.config import chosen_configs

    device, dry = ctx.device, ctx.dry
    dtype = torch.bfloat16 if not dry else torch.float32
    B, lengths = (1, (32,)) if dry else (4, (1024, 4096, 16384, 65536))
    tune_n = lengths[0] if dry else 16384
    shapes = timing_shapes(dry)
    budget, max_reps, min_reps = (0.0, 1, 1) if dry else (0.25, 20, 3)
    refused: Dict[tuple, str] = {}  # (contender, shape[, mode]) -> why; not tried again
    # the autotuner tunes once per (BLOCK_D, dtype, ...) at its first call: make that call at the
    # breakdown's length (B 4, N 16384), not at the sweep's first N, and for sb256 first: sb144 shares
    # its tuning (BLOCK_D 32), and the breakdown (sb256) then finds every candidate compiled
    order = sorted(shapes, key=lambda name: name != "sb256")
    for sname, shape in ((name, shapes[name]) for name in order):
        case_id = f"tune/{sname}"
        if case_id in ctx.rows.done:
            continue
        ctx.rows.start(case_id)
        t0 = time.time()
        leaves = None
        try:
            fwd, leaves, _ = _build_contender("hmx-triton", shape, B, tune_n, dtype, device)
            fwd().backward(torch.ones(B, tune_n, shape.d, device=device, dtype=dtype))
            ctx.sync()
            ctx.rows.add({"id": case_id, "status": "ok", "shape": sname, "N": tune_n, "B": B,
                          "seconds": round(time.time() - t0, 2), "configs": chosen_configs()})
        except Exception as e:  # noqa: BLE001
            ctx.rows.add({"id": case_id, "status": "error", "error": _short(e)})
            if _fatal_cuda_error(e):
                raise SystemExit(3)
        del leaves
    for N in lengths:
        for sname, shape in shapes.items():
            for name in CONTENDERS:
                _time_point(ctx, name, sname, shape, B, N, dtype, device, refused, budget, max_reps, min_reps)


def _time_point(ctx, name, sname, shape, B, N, dtype, device, refused, budget, max_reps, min_reps) -> None:
    import torch

    import hmx_kernels

    ids = {(p, m): f"{sname}/N{N}/{name}/{p}/{m}" for p in ("fwd", "fwd_bwd") for m in ("eager", "graph")}
    if all(i in ctx.rows.done for i in ids.values()):
        return
    base = {"contender": name, "shape": sname, "d": shape.d, "k": shape.k, "H": shape.H, "d_h": shape.d_h,
            "B": B, "N": N, "dtype": str(dtype).replace("torch.", "")}
    if (name, sname) in refused:
        for (p, m), i in ids.items():
            if i not in ctx.rows.done:
                ctx.rows.add({"id": i, **base, "pass": p, "mode": m, "status": "unsupported", "reason": refused[(name, sname)]})
        return
    ctx.rows.start(ids[("fwd", "eager")])
    try:
        fwd, leaves, note = _build_contender(name, shape, B, N, dtype, device)
        out = fwd()
        grad = torch.randn(out.shape, device=device, dtype=out.dtype)
        del out
    except Exception as e:  # noqa: BLE001
        why = _short(e)
        refusal = ("No available kernel", "No viable backend", "not supported")
        status = "unsupported" if isinstance(e, (ImportError, hmx_kernels.BackendNotSupportedError)) or \
            any(r.lower() in why.lower() for r in refusal) else "error"
        if status == "unsupported":
            refused[(name, sname)] = why
        for (p, m), i in ids.items():
            if i not in ctx.rows.done:
                ctx.rows.add({"id": i, **base, "pass": p, "mode": m, "status": status, "reason": why})
        if _fatal_cuda_error(e):
            raise SystemExit(3)
        return
    base.update(note)

    def clear():
        for t in leaves:
            t.grad = None

    passes = {"fwd": fwd, "fwd_bwd": lambda: fwd().backward(grad)}
    eager_ms: Dict[str, float] = {}
    for p, fn in passes.items():
        for mode in ("eager", "graph"):
            case_id = ids[(p, mode)]
            if case_id in ctx.rows.done:
                continue
            ctx.rows.start(case_id)
            row = {"id": case_id, **base, "pass": p, "mode": mode}
            if mode == "graph" and device.type != "cuda":
                ctx.rows.add({**row, "status": "skipped", "reason": "CUDA graphs need a GPU"})
                continue
            if mode == "graph" and (name, sname, "graph") in refused:
                ctx.rows.add({**row, "status": "skipped", "reason": refused[(name, sname, "graph")]})
                continue
            if mode == "graph" and eager_ms.get(p, 0.0) > GRAPH_MAX_EAGER_MS:
                ctx.rows.add({**row, "status": "skipped", "reason": f"eager call {eager_ms[p]:.0f} ms: host "
                              f"overhead negligible (graphs are replayed below {GRAPH_MAX_EAGER_MS:.0f} ms)"})
                continue
            t0 = time.time()
            try:
                if mode == "eager":
                    clear()
                    fn()  # warm-up
                    ctx.sync()
                    peak = None
                    if device.type == "cuda":
                        clear()
                        torch.cuda.synchronize()
                        start = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        fn()
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() - start
                    res = _time(fn, clear, device, budget, max_reps, min_reps)
                    res["peak_mib"] = None if peak is None else round(peak / 2**20, 1)
                    eager_ms[p] = res["ms"]
                else:
                    graph = _capture(fn, clear)
                    res = _time(graph.replay, lambda: None, device, budget, max_reps, min_reps)
                    del graph
                ctx.rows.add({**row, "status": "ok", **res, "seconds": round(time.time() - t0, 2)})
            except Exception as e:  # noqa: BLE001
                why = _short(e)
                if mode == "graph":
                    refused[(name, sname, "graph")] = f"capture failed earlier: {why}"
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001
                        pass
                ctx.rows.add({**row, "status": "error", "error": why, "seconds": round(time.time() - t0, 2)})
                if _fatal_cuda_error(e):
                    raise SystemExit(3)
    del leaves, grad, fwd, passes
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ step: breakdown
KERNEL_PASS = {"hmx_fwd_kernel_state": ("fwd state", "bwd state"), "hmx_fwd_kernel_mix": ("fwd mix",),
               "hmx_bwd_kernel_query": ("bwd query",), "hmx_bwd_kernel_key": ("bwd key",),
               "hmx_bwd_kernel_tsum": ("bwd tsum",)}


def step_breakdown(ctx) -> None:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from hmx_kernels.triton.config import chosen_configs

    from .kernels import token_bytes

    device, dry = ctx.device, ctx.dry
    shape = timing_shapes(dry)["tiny" if dry else "sb256"]
    B, N, iters, warm = (1, 32, 1, 0) if dry else (4, 16384, 3, 2)
    dtype = torch.bfloat16 if not dry else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    model = token_bytes(shape.d_h, shape.H, elem)
    for backend in ("triton", "cuda"):
        total_id = f"{backend}/total"
        if total_id in ctx.rows.done:
            continue
        ctx.rows.start(total_id)
        base = {"backend": backend, "shape": shape.name, "B": B, "N": N, "dtype": str(dtype).replace("torch.", "")}
        try:
            fwd, leaves, _ = _build_contender(f"hmx-{backend}", shape, B, N, dtype, device)
            grad = torch.randn(B, N, shape.d, device=device, dtype=dtype)

            def step():
                for t in leaves:
                    t.grad = None
                fwd().backward(grad)

            for _ in range(warm):
                step()
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            ctx.sync()
            wall_us = (time.perf_counter() - t0) / iters * 1e6
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(iters):
                    step()
                ctx.sync()
        except Exception as e:  # noqa: BLE001
            why = _short(e)
            status = "unsupported" if "cannot run this call" in why or "not supported" in why.lower() else "error"
            ctx.rows.add({"id": total_id, **base, "status": status, "reason": why})
            if _fatal_cuda_error(e):
                raise SystemExit(3)
            continue
        per_kernel: Dict[str, List[float]] = {}
        for e in prof.events():  # GPU: the kernels (and copies) with their device time; CPU: ops, self time
            if device.type == "cuda" and e.device_type != DeviceType.CUDA:
                continue
            t_us = e.time_range.elapsed_us() if device.type == "cuda" else e.self_cpu_time_total
            acc = per_kernel.setdefault(e.name, [0.0, 0])
            acc[0] += float(t_us)
            acc[1] += 1
        total = sum(v[0] for v in per_kernel.values()) / iters
        ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
        for name, (t_us, calls) in ranked[:40]:
            passes = KERNEL_PASS.get(name, ())
            nbytes = B * N * sum(model.get(p, 0.0) for p in passes) if passes else None
            us = t_us / iters
            ctx.rows.add({"id": f"{backend}/kernel/{name}", **base, "status": "ok", "kernel": name,
                          "time": "gpu" if device.type == "cuda" else "cpu self",
                          "us_per_iter": round(us, 2), "calls_per_iter": calls / iters,
                          "share": round(us / total, 4) if total else None,
                          "model_bytes": nbytes, "gbps": round(nbytes / us / 1e3, 1) if nbytes and us else None})
        ctx.rows.add({"id": total_id, **base, "status": "ok", "kernels_per_iter": sum(v[1] for v in per_kernel.values()) / iters,
                      "kernel_us_per_iter": round(total, 1), "wall_us_per_iter": round(wall_us, 1),
                      "byte_model": "benchmarks.kernels.token_bytes (the Triton kernels' own byte count)"})
        del leaves, grad, fwd
    if "triton/configs" not in ctx.rows.done:
        ctx.rows.start("triton/configs")
        ctx.rows.add({"id": "triton/configs", "status": "ok", "configs": chosen_configs()})


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
        env = dict(os.environ, HMX_GPU_RUN_ROWS=str(ctx.rows.path))
        t0 = time.time()
        with open(ctx.dir / f"pytest-{stem}.log", "w") as log:
            rc = _wait_child(ctx, _spawn(ctx, cmd, log, env), left)
            status = "done" if rc is not None else "killed at the step's time limit"
        ctx.rows.add({"id": file_id, "status": status, "rc": rc, "seconds": round(time.time() - t0, 1),
                      "junit": junit.name if junit.exists() else None, "log": f"pytest-{stem}.log"})


# ------------------------------------------------------------------------------------ step process
class StepContext:
    def __init__(self, step: str, directory: Path, dry: bool, deadline: float, worker: Optional[str] = None):
        import torch

        self.dir = directory
        self.dry = dry
        self.deadline = deadline
        self.worker = worker
        self.rows = Rows(directory, step, worker)
        fault = os.environ.get(FAULT_ENV, "")
        if fault:
            kind, after = fault.split(":")
            self.rows.fault = (kind, int(after))
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def build_finished(self) -> bool:
        return not (self.dir / "build.started").exists() or (self.dir / "build.done").exists()

    def build_failed(self) -> bool:
        done = self.dir / "build.done"
        return done.exists() and done.read_text().strip() != "0"

    def wait_for_build(self) -> bool:
        while not self.build_finished() and time.time() < self.deadline - 3:
            time.sleep(1.0)
        return self.build_finished()


STEP_FUNCTIONS = {"env": step_env_info, "correctness": step_correctness, "sanitizer": step_sanitizer,
                  "timings": step_timings, "breakdown": step_breakdown, "pytest": step_pytest}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--out-root", default=str(REPO / "benchmarks" / "results" / "gpu"),
                        help="results go to <out-root>/<device slug>/ (default benchmarks/results/gpu)")
    parser.add_argument("--dir", help="results folder (instead of <out-root>/<device slug>)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps (default 480)")
    parser.add_argument("--limits", help="override step limits, e.g. correctness=60,timings=90")
    parser.add_argument("--only", help="comma-separated steps to run (default: all, in order)")
    parser.add_argument("--step", choices=list(STEP_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sanitize-case", choices=("triton", "cuda"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sanitize_case:
        return sanitize_case(args.sanitize_case)
    if args.step:
        ctx = StepContext(args.step, Path(args.dir), args.dry_run, args.deadline or time.time() + 3600, args.worker)
        STEP_FUNCTIONS[args.step](ctx)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
