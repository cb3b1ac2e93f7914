"""What actually ran, for the stand-alone benchmarks (varlen, sequence_parallel, causal).

These benchmarks call the public API with `backend="auto"` (or a name) so that a backend that
learns a mode later is picked up without editing them; they record which backend served the call:

- `resolved_backend(...)`: the backend `hmx_kernels.select_backend` picks for a call (the
  dispatcher's own answer, with the reasons of every backend that declined);
- `BackendRecorder`: a context manager that wraps the `forward` of every registered backend and
  watches the dispatcher for `hmx_kernels::*` custom ops (the fused kernels), so it reports what
  ran even for entry points that do not go through `hyper_mixing` directly (e.g. a future fused
  varlen op).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional

import torch

import hmx_kernels
from hmx_kernels.dispatch import _REGISTRY, backend_reasons, select_backend

from .config import cpu_model, git_sha, library_versions

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOCAL_RESULTS = os.path.join(RESULTS, "local")  # gitignored: where a run writes unless told otherwise
UPDATE_ENV = "HMX_BENCH_UPDATE"


def resolved_backend(backend: str, *args, **kwargs) -> Dict[str, object]:
    """The backend `backend` ("auto" or a name) resolves to for `hyper_mixing(*args, **kwargs)`,
    and why the others decline: {"backend": name or None, "declined": {name: [reasons]}}."""
    problem = hmx_kernels.check_inputs(*args, **kwargs)
    declined = {k: v for k, v in backend_reasons(problem).items() if v}
    try:
        name = select_backend(backend, problem).name
    except Exception as e:  # noqa: BLE001  (nothing can run it: say why)
        return {"backend": None, "error": str(e).splitlines()[0], "declined": declined}
    return {"backend": name, "declined": declined}


class BackendRecorder:
    """Records the registered backends whose forward ran and the hmx_kernels custom ops dispatched
    inside the `with` block (forward and backward)."""

    def __init__(self):
        self.backends: List[str] = []
        self.ops: List[str] = []
        self._saved: Dict[str, object] = {}
        self._mode = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self
        for name, b in _REGISTRY.items():
            original = b.forward

            def wrapped(problem, _original=original, _name=name):
                if _name not in recorder.backends:
                    recorder.backends.append(_name)
                return _original(problem)

            self._saved[name] = original
            b.forward = wrapped

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(getattr(func, "name", lambda: func)())
                if name.startswith("hmx_kernels::") and name not in recorder.ops:
                    recorder.ops.append(name)
                return func(*args, **(kwargs or {}))

        self._mode = _Ops()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._saved.items():
            _REGISTRY[name].forward = original
        return False

    def summary(self) -> Dict[str, List[str]]:
        return {"backends": list(self.backends), "ops": list(self.ops)}


def record_run(fn) -> Dict[str, List[str]]:
    """Run fn() once (e.g. one forward+backward) and return what ran."""
    with BackendRecorder() as rec:
        fn()
    return rec.summary()


def add_output_options(p, sub: str = "") -> None:
    """--out / --update-results, shared by every benchmark that writes results."""
    p.add_argument("--out", default=None,
                   help=f"output folder (default: benchmarks/results/local/{sub}, untracked by git; "
                        f"--update-results: the committed benchmarks/results/{sub})")
    p.add_argument("--update-results", action="store_true",
                   help=f"write into the committed benchmarks/results/{sub} (also: {UPDATE_ENV}=1, "
                        f"`make bench UPDATE=1`), replacing the reference results there")


def output_dir(args, sub: str = "", smoke: bool = False) -> str:
    """Where results go: --out; a smoke run: benchmarks/results/quick/ (untracked); with
    --update-results or HMX_BENCH_UPDATE=1: the committed benchmarks/results/<sub>; otherwise
    benchmarks/results/local/<sub> (gitignored), so a first run leaves the repository clean."""
    if args.out:
        return args.out
    if smoke:
        return os.path.join(RESULTS, "quick", sub)
    if args.update_results or os.environ.get(UPDATE_ENV, "0") not in ("", "0"):
        return os.path.join(RESULTS, sub)
    return os.path.join(LOCAL_RESULTS, sub)


def check_load(threads: int, warn=None) -> List[float]:
    """The 1/5/15-minute load averages before a run; warns (stderr) when other work already keeps
    cores busy: load above cores - threads means the run's threads share cores with it and the
    timings are not comparable with a quiet machine's."""
    load = list(os.getloadavg())
    cores = os.cpu_count() or 1
    if load[0] > max(cores - threads, 0) + 0.5:
        msg = (f"WARNING: the machine is busy (load average {load[0]:.2f} over {cores} cores, this run uses "
               f"{threads} thread(s)): timings will be slower and noisier than on a quiet machine")
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
    return load


def machine_meta(threads: Optional[int] = None) -> Dict[str, object]:
    """Machine and software description written into every result file."""
    import datetime
    import os

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "versions": library_versions(),
    }


def write_results(out_dir: str, name: str, meta: dict, rows: List[dict],
                  markdown: Callable[[dict, List[dict]], str]) -> str:
    """Writes <out_dir>/<name>.json ({"meta", "rows"}) and <name>.md (markdown(meta, rows)), prints
    the markdown and says where both went. Returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(meta, rows)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {stem}.json, {stem}.md", file=sys.stderr)
    return stem
