"""The GPU run's driver (benchmarks/gpu_run.py) and its report (benchmarks/gpu_report.py), on CPU.

- The dry run (`--dry-run`: TRITON_INTERPRET=1, tiny shapes, the same steps and code) leaves rows
  in every step's file, in order, and every Triton case matches the float64 reference.
- A step killed at its time limit keeps the rows it finished and names the case in flight.
- The report turns the dry run's folder into tables labelled with device, date and SHA, and puts
  them between the README's markers without touching the rest.
The dry run takes about 35 s of CPU (six step processes, each importing torch; the interpreter runs
the Triton cases): 1 to 2.5 minutes of wall time on a shared 2-core machine. Marked slow; CI
(`make test`) runs them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_report import BEGIN, END
from benchmarks.gpu_run import BUDGET_S, FAULT_ENV, STEPS, read_rows

REPO = Path(__file__).resolve().parent.parent


def _gpu_run(*args, timeout, **env_extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run, with an empty extension cache: no step may start a build of the C++ extension
    (as the dispatcher's full list of reasons would, by probing the cpu backend), which would blow
    the step limits on a fresh machine."""
    out = tmp_path_factory.mktemp("gpu-dry")
    cache = tmp_path_factory.mktemp("ext") / "cache"
    proc = _gpu_run("--dry-run", "--dir", str(out), timeout=900, HMX_KERNELS_CACHE=str(cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not cache.exists(), "a step built the C++ extension"
    return out


def test_step_limits_fit_the_budget():
    assert BUDGET_S <= 8 * 60
    assert sum(limit for _, limit in STEPS if limit is not None) < BUDGET_S  # pytest gets the rest
    assert [name for name, _ in STEPS] == ["env", "correctness", "sanitizer", "timings", "breakdown", "pytest"]


@pytest.mark.slow
def test_dry_run_fills_every_step_in_order(dry_run):
    steps = read_rows(dry_run / "steps.jsonl")
    assert [r["id"] for r in steps] == [name for name, _ in STEPS]
    for r in steps:
        assert r["status"] == "ok" and r["rows"] > 0 and r["wall_s"] <= r["limit_s"], r
    for name, _ in STEPS:
        rows = read_rows(dry_run / f"{name}.jsonl")
        assert rows and all(r.get("id") and r.get("status") for r in rows), name
    assert read_rows(dry_run / "build.jsonl")[0]["status"] == "skipped"
    assert not list(dry_run.glob("*.current"))  # markers cleaned up at the end


@pytest.mark.slow
def test_dry_run_rows_say_what_ran(dry_run):
    env = {r["id"]: r for r in read_rows(dry_run / "env.jsonl")}
    assert env["versions"]["torch"] and env["source"]["git_sha"] and len(env["source"]["source_sha256"]) == 16
    assert env["nvidia-smi"]["status"] == "skipped" and env["settings"]["triton_pin"] is False

    correct = read_rows(dry_run / "correctness.jsonl")
    triton = [r for r in correct if r["backend"] == "triton"]
    assert {r["dtype"] for r in triton} == {"float32", "float16", "bfloat16"}
    kinds = " ".join(r["case"] for r in triton)
    for kind in ("sb_dh18", "idiap_cross_masked", "causal", "chunk", "packed", "fp16_large_state"):
        assert kind in kinds, kind
    for r in triton:  # every Triton case ran, pinned, within its declared tolerance
        assert r["status"] == "pass" and r["triton_pin"] is True, r
        assert 0 <= r["out_err"] <= r["out_tol"] and 0 <= r["grad_err"] <= r["grad_tol"], r
        assert r["grads"] and set(r["grads"]) >= {"query", "w1_fc1_weight", "ln_weight"}, r
    assert all(r["status"] == "unsupported" and "cuda" in r["reason"] for r in correct if r["backend"] == "cuda")

    sanitizer = {r["id"]: r for r in read_rows(dry_run / "sanitizer.jsonl")}
    assert sanitizer["memcheck/triton"]["payload_ok"] is True  # no tool here: the payload ran plain

    timings = read_rows(dry_run / "timings.jsonl")
    ok = [r for r in timings if r.get("contender") == "hmx-triton" and r["mode"] == "eager"]
    assert {r["pass"] for r in ok} == {"fwd", "fwd_bwd"} and all(r["status"] == "ok" and r["ms"] > 0 for r in ok)
    graph = [r for r in timings if r.get("mode") == "graph"]
    assert graph and all(r["status"] in ("skipped", "unsupported") for r in graph)
    assert all(r["reason"] == "CUDA graphs need a GPU" for r in graph if r["contender"] == "hmx-triton")
    contenders = {r.get("contender") for r in timings}
    assert {"hmx-triton", "hmx-cuda", "sdpa-flash", "sdpa-cudnn", "flash-attn"} <= contenders

    breakdown = {r["id"]: r for r in read_rows(dry_run / "breakdown.jsonl")}
    assert breakdown["triton/total"]["status"] == "ok" and breakdown["triton/total"]["kernels_per_iter"] > 0
    assert {c["kernel"] for c in breakdown["triton/configs"]["configs"]} >= {"hmx_fwd_kernel_state", "hmx_bwd_kernel_key"}

    tests = read_rows(dry_run / "pytest.jsonl")
    assert any(r["id"].startswith("file:") and r["status"] == "done" and r["rc"] == 0 for r in tests)
    assert sum(r["status"] == "passed" for r in tests) >= 5
    assert list(dry_run.glob("junit-*.xml"))


@pytest.mark.slow
def test_killed_step_keeps_its_finished_rows(tmp_path):
    """The env step's third case hangs (as a hung kernel would); its 30 s limit kills the step: the
    two finished rows stay, the case in flight is recorded as killed, and the step's row says so."""
    proc = _gpu_run("--dry-run", "--dir", str(tmp_path), "--only", "env", "--limits", "env=30", timeout=300,
                    **{FAULT_ENV: "stall:2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_rows(tmp_path / "env.jsonl")
    assert [r["id"] for r in rows] == ["versions", "nvidia-smi", "nvcc"], rows
    assert rows[2]["status"] == "killed" and "limit" in rows[2]["reason"]
    (step,) = read_rows(tmp_path / "steps.jsonl")
    assert step["status"] == "killed at its time limit" and step["rows"] == 3 and step["rc"] is None
    assert 30 <= step["wall_s"] < 50


@pytest.mark.slow
def test_crashed_step_restarts_after_the_case_it_died_on(tmp_path):
    """A step process that dies on a case (as after an illegal memory access) is started again and
    resumes after it: the rows written stay, the case is recorded as crashed, nothing runs twice."""
    proc = _gpu_run("--dry-run", "--dir", str(tmp_path), "--only", "env", "--limits", "env=200", timeout=300,
                    **{FAULT_ENV: "exit:2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_rows(tmp_path / "env.jsonl")
    # after two rows the next case kills the process: nvcc, then (after the restart) settings
    assert [(r["id"], r["status"]) for r in rows] == [
        ("versions", "ok"), ("nvidia-smi", "skipped"), ("nvcc", "crashed"), ("source", "ok"),
        ("compute-sanitizer", "skipped"), ("settings", "crashed")], rows
    (step,) = read_rows(tmp_path / "steps.jsonl")
    assert step["status"] == "ok" and step["restarts"] == 2 and step["rows"] == 6 and step["rc"] == 0
    assert step["crashed_on"] == ["nvcc", "settings"] and step["in_flight"] is None


@pytest.mark.slow
def test_report_labels_the_tables_and_fills_the_readme_block(dry_run, tmp_path):
    source = {r["id"]: r for r in read_rows(dry_run / "env.jsonl")}["source"]
    readme = tmp_path / "README.md"
    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    readme.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", str(dry_run), "--readme", str(readme)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = readme.read_text()
    block = new[new.index(BEGIN):new.index(END)]
    assert f"git {source['git_sha'][:12]}" in block and "**Measured on cpu" in block
    for heading in ("| step | limit s |", "| backend | dtype | pass |", "| tool | backend |", "| N | pass |",
                    "| kernel | us / iter |", "| file | passed |"):
        assert heading in block, heading
    assert new[:new.index(BEGIN)] == text[:text.index(BEGIN)]
    assert new[new.index(END):] == text[text.index(END):]
    assert (dry_run / "summary.md").read_text() in new
