"""The benchmark suite's logic on tiny sizes: files and metadata, rejection of wrong outputs,
out-of-memory and timeout handling, crossover computation, FLOP accounting, backend discovery."""
from __future__ import annotations

import csv
import json
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmarks/ is a folder of the repository, not an installed package

from hmx_kernels import dispatch
from hmx_kernels.flops import attention_flops, hyper_mixing_flops, hyper_mixing_flops_reassociated, mha_layer_flops

from benchmarks import report
from benchmarks.cli import main
from benchmarks.config import Shape, parse_shape
from benchmarks.contenders import Case, Contender, all_contenders, hypermixing_contender
from benchmarks.sweep import SweepConfig, run_sweep

TINY = Shape("tiny", 16, 32, 2)  # d 16, k 32, H 2: d_h 8, k_h 16


def _cfg(**kw):
    base = dict(device=torch.device("cpu"), dtype=torch.float32, shapes=[TINY], lengths=[8, 16, 32],
                batch_modes=["fixed"], batch=2, tokens=64, repeats=2, warmup=1, time_cap=5.0,
                measure_budget=0.05, memory=False, device_name="test-cpu")
    base.update(kw)
    return SweepConfig(**base)


def _by(rows):
    return {(r["contender"], r["N"]): r for r in rows}


def _quiet(_):
    pass


def _reference_like(name, transform=lambda y, N: y, before=lambda N: None, flops=None):
    """A contender that runs the reference HyperMixing layer, with its output passed through
    transform(y, N) and before(N) called in each forward (to inject faults)."""
    ref = hypermixing_contender("reference")

    def build(shape, B, N, dtype, device):
        case = ref.build(shape, B, N, dtype, device)
        fwd = case.forward

        def forward():
            before(N)
            return transform(fwd(), N)

        return Case(forward, case.leaves, case.check)

    return Contender(name, "hypermixing", flops or ref.flops, build)


def test_cli_quick_run_writes_results_with_metadata(tmp_path):
    out = tmp_path / "res"
    rc = main(["--device", "cpu", "--shapes", "16:32:2", "--lengths", "8,16", "--batch-mode", "fixed,tokens",
               "--batch", "2", "--tokens", "32", "--repeats", "2", "--warmup", "1", "--measure-budget", "0.02",
               "--out", str(out), "--contenders", "hmx-reference,sdpa,mha"])
    assert rc == 0
    files = sorted(os.listdir(out))
    stem = [f for f in files if f.endswith(".json")][0][: -len(".json")]
    assert stem.startswith("cpu-") and stem.endswith("-float32")
    for suffix in (".csv", ".json", "-crossover.csv", "-time.png", "-memory.png"):
        assert stem + suffix in files, files
        assert (out / (stem + suffix)).stat().st_size > 0
    for suffix in ("-time.png", "-memory.png"):
        assert (out / (stem + suffix)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / (stem + ".json")).read_text())
    meta = data["meta"]
    for key in ("date_utc", "git_sha", "device_name", "cpu_model", "torch_threads", "dtype", "memory_method"):
        assert meta[key] not in (None, ""), key
    for lib in ("torch", "python", "hmx_kernels", "triton"):
        assert lib in meta["versions"]
    assert meta["versions"]["torch"] == torch.__version__
    rows = list(csv.DictReader(open(out / (stem + ".csv"))))
    assert len(rows) == 3 * 2 * 2  # contenders x lengths x batch modes
    assert {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert float(r["max_err"]) <= float(r["tol"])
        assert float(r["fwd_ms_p20"]) <= float(r["fwd_ms_p50"]) <= float(r["fwd_ms_p80"])
        assert float(r["mem_fwd_bwd_mib"]) > 0  # the CPU allocator saw the pass's tensors
        B, N = int(r["B"]), int(r["N"])
        assert B == (2 if r["batch_mode"] == "fixed" else 32 // N)
        assert float(r["fwd_bwd_tokens_per_s"]) == pytest.approx(B * N / (float(r["fwd_bwd_ms_p50"]) / 1e3), rel=1e-6)
    cross = list(csv.DictReader(open(out / (stem + "-crossover.csv"))))
    assert len(cross) == 2 * 2 * 2  # batch modes x passes x baselines (sdpa, mha)
    from benchmarks.markdown import tables

    md = tables(data)
    assert "| N | B | hmx-reference | sdpa | mha |" in md and "| d16k32h2 | tokens | fwd_bwd |" in md


def test_wrong_output_is_rejected_and_not_reported():
    wrong = _reference_like("wrong", transform=lambda y, N: y + 0.05 * y.detach().abs().max())
    rows = run_sweep(_cfg(lengths=[8, 16]), [hypermixing_contender("reference"), wrong], _quiet)
    by = _by(rows)
    for N in (8, 16):  # checked (and rejected) at every length
        r = by[("wrong", N)]
        assert r["status"] == "mismatch" and r["max_err"] > r["tol"]
        assert all(r[f"{p}_ms_p50"] is None for p in ("fwd", "bwd", "fwd_bwd"))
        assert r["fwd_tflops"] is None and r["fwd_tokens_per_s"] is None
        assert by[("hmx-reference", N)]["status"] == "ok"


def test_nan_output_is_rejected():
    nan = _reference_like("nan", transform=lambda y, N: y * float("nan"))
    rows = run_sweep(_cfg(lengths=[8]), [nan], _quiet)
    assert rows[0]["status"] == "mismatch"


def test_out_of_memory_is_recorded_and_the_sweep_continues():
    def before(N):
        if N >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 PiB")

    rows = run_sweep(_cfg(), [_reference_like("oomy", before=before), hypermixing_contender("reference")], _quiet)
    by = _by(rows)
    assert by[("oomy", 8)]["status"] == "ok"
    assert by[("oomy", 16)]["status"] == "oom"
    assert by[("oomy", 32)]["status"] == "skipped" and "memory" in by[("oomy", 32)]["note"]
    assert all(by[("hmx-reference", N)]["status"] == "ok" for N in (8, 16, 32))


def test_timeout_is_recorded_and_larger_lengths_skipped():
    def before(N):
        if N >= 16:
            time.sleep(0.2)

    rows = run_sweep(_cfg(time_cap=0.1), [_reference_like("slow", before=before), hypermixing_contender("reference")],
                     _quiet)
    by = _by(rows)
    assert by[("slow", 8)]["status"] == "ok"
    assert by[("slow", 16)]["status"] == "timeout" and by[("slow", 16)]["fwd_ms_p50"] is None
    assert by[("slow", 32)]["status"] == "skipped"
    assert all(by[("hmx-reference", N)]["status"] == "ok" for N in (8, 16, 32))


def test_predicted_time_over_the_cap_is_skipped():
    # claims a huge FLOP growth: the time predicted from N=8 exceeds the cap at N=16
    grows = _reference_like("grows", flops=lambda s, B, N, p: 10 ** N)
    rows = run_sweep(_cfg(time_cap=1.0), [grows], _quiet)
    by = _by(rows)
    assert by[("grows", 8)]["status"] == "ok"
    assert by[("grows", 16)]["status"] == "skipped" and "predicted" in by[("grows", 16)]["note"]
    assert by[("grows", 32)]["status"] == "skipped"


def test_other_errors_are_recorded():
    def before(N):
        raise ValueError("broken kernel")

    rows = run_sweep(_cfg(lengths=[8, 16]), [_reference_like("broken", before=before)], _quiet)
    assert rows[0]["status"] == "error" and "broken kernel" in rows[0]["note"]
    assert rows[1]["status"] == "skipped"


# ---- crossover ---------------------------------------------------------------------------------
def _row(name, family, N, ms, status="ok"):
    return {"shape": "s", "batch_mode": "fixed", "contender": name, "family": family, "N": N,
            "status": status, "fwd_ms_p50": ms if status == "ok" else None}


def _cross(hm, att, Ns=(128, 256, 512, 1024)):
    rows = []
    for N in Ns:
        t, status = (hm(N), "ok") if not isinstance(hm(N), str) else (None, hm(N))
        rows.append(_row("hm", "hypermixing", N, t, status))
        t, status = (att(N), "ok") if not isinstance(att(N), str) else (None, att(N))
        rows.append(_row("sdpa", "attention", N, t, status))
    (c,) = report.crossovers(rows, passes=("fwd",))
    return c


def test_crossover_interpolates_log_log():
    # hm ~ N, attention ~ N^2 / 300: equal at N = 300 exactly (both power laws: log-log is exact)
    c = _cross(lambda N: float(N), lambda N: N * N / 300.0)
    assert c["relation"] == "="
    assert c["crossover_N"] == pytest.approx(300.0, rel=1e-9)
    assert c["speedup_at_largest_N"] == pytest.approx(1024 / 300.0)
    assert c["largest_N"] == 1024


def test_crossover_bounds_and_failed_baselines():
    assert _cross(lambda N: 1.0, lambda N: 2.0)["relation"] == "<="
    never = _cross(lambda N: 2.0, lambda N: 1.0)
    assert never["relation"] == ">" and never["crossover_N"] == 1024
    # faster at small N by chance, slower in the middle: the crossover is the last sign change
    c = _cross(lambda N: {128: 1.0, 256: 4.0, 512: 2.0, 1024: 1.0}[N], lambda N: 2.0)
    assert c["relation"] == "=" and 256 < c["crossover_N"] < 512
    # baseline timed out at 1024 while HyperMixing ran: faster there; bound only
    c = _cross(lambda N: 1.0 * N, lambda N: "timeout" if N == 1024 else 1.0)
    assert c["relation"] == "~" and c["crossover_N"] == 1024
    # HyperMixing failed: no claim at that length
    c = _cross(lambda N: "oom" if N == 1024 else 2.0, lambda N: 1.0)
    assert c["relation"] == ">" and c["crossover_N"] == 512
    assert _cross(lambda N: "mismatch", lambda N: 1.0)["relation"] == "no common lengths"


# ---- FLOPs -------------------------------------------------------------------------------------
def test_flop_accounting_uses_hmx_kernels_flops():
    s = parse_shape("sb144")
    assert (s.d, s.k, s.H, s.d_h, s.k_h) == (144, 576, 8, 18, 72)
    c = all_contenders(torch.device("cpu"))
    B, N = 3, 1000
    for p in ("fwd", "bwd", "fwd_bwd"):
        assert c["hmx-reference"].flops(s, B, N, p) == hyper_mixing_flops(B, N, N, 144, 8, 72, p)
        assert c["sdpa"].flops(s, B, N, p) == attention_flops(B, N, N, 144, p)
        assert c["mha"].flops(s, B, N, p) == mha_layer_flops(B, N, N, 144, p)
    # the hand count: hypernetworks on 2N tokens and two [N, k_h] x [k_h, d_h]-sized matmuls per head
    d_h, k_h = 18, 72
    fwd = B * 8 * (2 * N * 2 * (d_h * d_h + d_h * k_h) + 4 * N * k_h * d_h)
    assert hyper_mixing_flops(B, N, N, 144, 8, 72, "fwd") == fwd
    assert hyper_mixing_flops(B, N, N, 144, 8, 72, "fwd_bwd") == 3 * fwd


def test_reported_tflops_match_flops_over_median():
    rows = run_sweep(_cfg(lengths=[16]), [hypermixing_contender("reference")], _quiet)
    r = rows[0]
    assert r["status"] == "ok"
    for p in ("fwd", "fwd_bwd"):
        assert r[f"{p}_flops"] == hyper_mixing_flops(2, 16, 16, 16, 2, 16, p)
        assert r[f"{p}_tflops"] == pytest.approx(r[f"{p}_flops"] / (r[f"{p}_ms_p50"] / 1e3) / 1e12)
    # CPU: one measured peak (config.measured_cpu_peak_tflops) for both passes
    assert r["fwd_peak_share"] / r["fwd_tflops"] == pytest.approx(r["fwd_bwd_peak_share"] / r["fwd_bwd_tflops"])


def test_reassociated_flops_hand_count():
    # the cpu backend's products: 2 per key and 2 per query forward, 5 per query and 6 per key
    # backward ([T, d_h] x [d_h, d_h]-sized), plus 2 forward and 5 backward [k_h, d_h] x [d_h, d_h]
    # per batch element and head; a multiply-add is 2 FLOPs
    B, M, N, d, H, k_h = 3, 300, 1000, 144, 8, 72
    d_h = 18
    fwd = B * H * 2 * ((2 * N + 2 * M) * d_h * d_h + 2 * k_h * d_h * d_h)
    bwd = B * H * 2 * ((5 * M + 6 * N) * d_h * d_h + 5 * k_h * d_h * d_h)
    assert hyper_mixing_flops_reassociated(B, M, N, d, H, k_h, "fwd") == fwd
    assert hyper_mixing_flops_reassociated(B, M, N, d, H, k_h, "bwd") == bwd
    assert hyper_mixing_flops_reassociated(B, M, N, d, H, k_h, "fwd_bwd") == fwd + bwd
    # k = 4 d: the direct form does about 3.6x the reassociated form's work at sb256
    ratio = hyper_mixing_flops(1, 8192, 8192, 256, 8, 128, "fwd_bwd") / hyper_mixing_flops_reassociated(
        1, 8192, 8192, 256, 8, 128, "fwd_bwd")
    assert 3.5 < ratio < 3.6


def test_cpu_twin_side_by_side_report():
    """benchmarks/cpu_twin_vs_reference.py --side-by-side at a tiny size: the report's lines."""
    import argparse

    from benchmarks.cpu_twin_vs_reference import side_by_side

    n_threads = torch.get_num_threads()
    try:
        report = side_by_side(argparse.Namespace(B=1, N=40, d=16, k=32, H=2, reps=2, warmup=1))
    finally:
        torch.set_num_threads(n_threads)  # the run sets one thread
    assert "B=1 N=40 d=16 k=32 (d_h=8, k_h=16) H=2" in report
    assert report.count("time ratio cpu / reference") == 2
    assert "reassociated form" in report and "direct-form equivalent" in report
    err = float(report.split("scale-relative max error ")[1].split()[0])
    assert err < 1e-5


# ---- discovery ---------------------------------------------------------------------------------
def test_registered_backends_join_and_their_reasons_are_honoured():
    fake = dispatch.Backend("benchfake", "test backend", forward=lambda p: None,
                            extra_reasons=lambda p: ["only on Tuesdays"] if p.N > 8 else [])
    dispatch.register_backend(fake)
    try:
        available = all_contenders(torch.device("cpu"))
        assert "hmx-benchfake" in available
        assert "hmx-reference" in available
        c = available["hmx-benchfake"]
        assert c.unsupported(TINY, 1, 16, torch.float32, torch.device("cpu")) == "only on Tuesdays"
        assert c.unsupported(TINY, 1, 8, torch.float32, torch.device("cpu")) is None
        rows = run_sweep(_cfg(lengths=[16]), [c], _quiet)
        assert rows[0]["status"] == "unsupported" and "Tuesdays" in rows[0]["note"]
    finally:
        dispatch._REGISTRY.pop("benchfake", None)
    assert "hmx-benchfake" not in all_contenders(torch.device("cpu"))


def test_first_call_of_a_series_may_compile_beyond_the_time_cap():
    calls = []

    def before(N):
        calls.append(N)
        if len(calls) == 1:
            time.sleep(0.3)  # a JIT build on first use

    rows = run_sweep(_cfg(time_cap=0.2, lengths=[8, 16]), [_reference_like("jit", before=before)], _quiet)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["series_first_call_s"] >= 0.3 and rows[1]["series_first_call_s"] is None
    rows = run_sweep(_cfg(time_cap=0.2, compile_cap=0.1, lengths=[8, 16]),
                     [_reference_like("jit", before=lambda N: time.sleep(0.3))], _quiet)
    assert rows[0]["status"] == "timeout" and "compile" in rows[0]["note"]
    assert rows[1]["status"] == "skipped"


def test_sdpa_backend_contenders_probe_their_kernel():
    # the per-backend SDPA contenders of the GPU sweep; on CPU, "math" and "flash" (the CPU flash
    # kernel) run and "efficient" refuses: recorded as unsupported with PyTorch's reason
    from benchmarks.contenders import sdpa_contender

    cpu = torch.device("cpu")
    assert sdpa_contender("efficient").unsupported(TINY, 1, 8, torch.float32, cpu).startswith("sdpa efficient")
    rows = run_sweep(_cfg(lengths=[8, 16]), [sdpa_contender("math"), sdpa_contender("efficient")], _quiet)
    by = _by(rows)
    assert by[("sdpa-math", 16)]["status"] == "ok" and by[("sdpa-math", 16)]["max_err"] < 1e-5
    assert by[("sdpa-efficient", 16)]["status"] == "unsupported"


def test_benchmark_cases_are_not_collected_by_the_test_suite(capsys):
    # `pytest tests` / plain `pytest` must not run benchmarks/test_bench_cases.py
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'testpaths = ["tests"]' in f.read()
    assert main(["--device", "cpu", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "hmx-reference " in listing and "hmx-reference-compiled" in listing and "opt-in" in listing


def test_backends_made_for_other_devices_are_not_contenders():
    cpu = all_contenders(torch.device("cpu"))
    assert "hmx-reference" in cpu and "hmx-cpu" in cpu
    assert "hmx-cuda" not in cpu and "hmx-triton" not in cpu
    gpu = all_contenders(torch.device("cuda"))  # discovery only: nothing runs
    assert {"hmx-triton", "hmx-cuda", "hmx-reference"} <= set(gpu) and "hmx-cpu" not in gpu


def test_speechbrain_layer_is_a_contender_and_its_memory_is_reported():
    from utils import import_speechbrain

    import_speechbrain("speechbrain.nnet.hypermixing")  # skips (outside CI) without speechbrain
    available = all_contenders(torch.device("cpu"))
    assert "speechbrain" in available
    rows = run_sweep(_cfg(lengths=[16, 64], memory=True), [available["speechbrain"], hypermixing_contender("cpu")], _quiet)
    by = {(r["contender"], r["N"]): r for r in rows}
    for N in (16, 64):
        assert by[("speechbrain", N)]["status"] == "ok", by[("speechbrain", N)]
        assert by[("speechbrain", N)]["max_err"] < 1e-4
    # its [B, N, N] attention-weights tensor: memory grows at least quadratically from 16 to 64
    assert by[("speechbrain", 64)]["mem_fwd_mib"] > by[("speechbrain", 16)]["mem_fwd_mib"]


def test_cpu_peak_share_is_reported_against_a_measured_peak():
    rows = run_sweep(_cfg(lengths=[32]), [hypermixing_contender("cpu")], _quiet)
    r = rows[0]
    assert r["status"] == "ok" and 0 < r["fwd_bwd_peak_share"] < 1.5
