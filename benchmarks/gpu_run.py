"""One short, self-recording GPU run: the evidence a lent GPU machine can give in about 8 minutes.

    python -m benchmarks.gpu_run [--out-root DIR] [--budget 480]    # a CUDA machine (.ci/gpu_run.sh)
    python -m benchmarks.gpu_run --dry-run --out-root /tmp/gpu-dry   # CPU: TRITON_INTERPRET=1, tiny shapes
    python -m benchmarks.gpu_report DIR [--readme README.md]         # the results as Markdown tables

This module runs the steps (each a subprocess under its own limit) and keeps their rows; the steps
themselves are in benchmarks/gpu_checks.py (env, correctness, sanitizer, pytest) and
benchmarks/gpu_timings.py (timings, breakdown).

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
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
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


def step_function(step: str) -> Callable:
    """The function that runs `step` in a step process (gpu_checks: env, correctness, sanitizer,
    pytest; gpu_timings: timings, breakdown)."""
    from . import gpu_checks, gpu_timings

    return {"env": gpu_checks.step_env_info, "correctness": gpu_checks.step_correctness,
            "sanitizer": gpu_checks.step_sanitizer, "timings": gpu_timings.step_timings,
            "breakdown": gpu_timings.step_breakdown, "pytest": gpu_checks.step_pytest}[step]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--out-root", default=str(REPO / "benchmarks" / "results" / "gpu"),
                        help="results go to <out-root>/<device slug>/ (default benchmarks/results/gpu)")
    parser.add_argument("--dir", help="results folder (instead of <out-root>/<device slug>)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps (default 480)")
    parser.add_argument("--limits", help="override step limits, e.g. correctness=60,timings=90")
    parser.add_argument("--only", help="comma-separated steps to run (default: all, in order)")
    parser.add_argument("--step", choices=[name for name, _ in STEPS], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sanitize-case", choices=("triton", "cuda"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sanitize_case:
        from .gpu_checks import sanitize_case

        return sanitize_case(args.sanitize_case)
    if args.step:
        ctx = StepContext(args.step, Path(args.dir), args.dry_run, args.deadline or time.time() + 3600, args.worker)
        step_function(args.step)(ctx)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
