"""The stand-alone benchmarks for packed batches, sequence parallelism and the causal modes:
tiny runs that check what they report (not how fast anything is)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import hmx_kernels
from benchmarks.config import Shape


def test_backend_recorder_reports_what_ran():
    from benchmarks.runinfo import record_run, resolved_backend

    layer = hmx_kernels.FusedHyperMixing(8, 16, num_heads=2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    for name in ("reference", "cpu"):
        layer.backend = name
        ran = record_run(lambda: layer(x)[0].sum().backward())
        assert ran["backends"] == [name]
        assert bool(ran["ops"]) == (name == "cpu")  # the fused backend's torch.library ops
    w = [*layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(), layer.layer_norm.weight, layer.layer_norm.bias]
    r = resolved_backend("auto", x, None, None, *w, position_offset=3)
    assert r["backend"] == "cpu"  # the cpu backend takes position offsets
    if "cuda" in hmx_kernels.registered_backends():  # CPU tensors: declined, with its reasons
        assert r["declined"]["cuda"]
    assert hmx_kernels.dispatch.get_backend("cpu").forward.__name__ != "wrapped"  # restored


def test_varlen_benchmark_reports_ratios_and_equality(tmp_path):
    from benchmarks import varlen

    varlen.main(["--batch", "3", "--min-length", "5", "--max-length", "30", "--d", "16", "--k", "32", "--heads", "2",
                 "--repeats", "3", "--measure-budget", "0.2", "--out", str(tmp_path), "--backends", "cpu,reference"])
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    s = data["meta"]["settings"]
    assert s["total_tokens"] == sum(s["lengths"]) and s["longest"] == max(s["lengths"])
    assert s["lengths"] == varlen.ragged_lengths(3, 5, 30, 0).tolist()  # the seeded draw
    for row in data["rows"]:
        assert row["packed_ran"]["backends"] == [row["backend_requested"]]
        assert row["max_err_out"] <= 1e-4 and row["max_err_token_grad"] <= 1e-4
        ideal = row["padded_fwd_bwd_ms"] * s["total_tokens"] / (3 * s["longest"])
        assert row["packed_over_ideal"] == pytest.approx(row["packed_fwd_bwd_ms"] / ideal)
        assert row["packed_peak_fwd_bwd_mib"] > 0
    assert (tmp_path / path.name.replace(".json", ".md")).exists()


def test_causal_contenders_check_against_causal_references():
    from benchmarks.causal import mode_contender, sdpa_causal_contender

    shape = Shape("t", 16, 32, 2)
    case = sdpa_causal_contender().build(shape, 1, 40, torch.float32, torch.device("cpu"))
    out = case.forward()
    assert case.check(out) < 1e-5
    q, k, v = case.leaves
    assert case.check(torch.nn.functional.scaled_dot_product_attention(q, k, v)) > 1e-2  # non-causal is caught
    c = mode_contender("hmx-chunk32", "auto", 4096)
    assert c.unsupported(shape, 1, 40, torch.float32, torch.device("cpu")) is None
    case = c.build(shape, 1, 40, torch.float32, torch.device("cpu"))
    assert case.check(case.forward()) < 1e-5
    capped = mode_contender("hmx-causal", "reference", 32)
    assert "token-causal-cap" in capped.unsupported(shape, 1, 40, torch.float32, torch.device("cpu"))
    assert capped.unsupported(shape, 1, 32, torch.float32, torch.device("cpu")) is None


def test_causal_summary_ratios():
    from benchmarks.causal import MODES, markdown, summarize

    times = {"hmx-cpu": 10.0, "hmx-reference": 40.0, "hmx-causal": 25.0, "hmx-chunk32": 12.0,
             "hmx-chunk32-left2": 14.0, "sdpa": 100.0, "sdpa-causal": 60.0}
    rows = [{"contender": c, "N": 4096, "status": "ok", "note": "", "fwd_bwd_ms_p50": t, "mem_fwd_bwd_mib": 1.0}
            for c, t in times.items()]
    s = summarize({"results": rows, "crossover": []}, "auto", 4096, {m: "reference" for m in MODES})
    (r,) = s["table"]
    assert r["hmx-chunk32/cpu"] == pytest.approx(1.2) and r["hmx-chunk32/same-backend"] == pytest.approx(0.3)
    assert s["targets"]["hmx-chunk32"]["met"] is True and s["targets"]["hmx-causal"]["met"] is True
    rows[2]["fwd_bwd_ms_p50"] = 31.0  # token-causal 3.1x the non-causal cpu time
    assert summarize({"results": rows, "crossover": []}, "auto", 4096, {m: "cpu" for m in MODES})[
        "targets"]["hmx-causal"]["met"] is False
    meta = {"device_name": "x", "torch_threads": 1, "dtype": "float32", "shapes": [{"name": "sb256"}], "batch": 1,
            "git_sha": "0" * 10, "versions": {"torch": "t"}, "date_utc": "d", "command": "c"}
    assert "| 4096 | 10.0 | 40.0 | 25.0 | 12.0 |" in markdown(meta, s)


def test_sequence_parallel_benchmark_one_and_two_processes(tmp_path):
    from benchmarks import sequence_parallel
    from hmx_kernels.parallel import SIGNATURE_FIELDS

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sequence_parallel.main(["--length", "64", "--worlds", "2", "--d", "16", "--k", "32", "--heads", "2",
                            "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)])
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    baseline, two = data["rows"]
    assert not baseline["grouped"] and baseline["bytes_per_step_per_rank"] == 0
    assert two["world"] == 2 and two["slices"] == [[0, 32], [32, 64]]
    d_h, k_h = 8, 16
    per_reduce = d_h * d_h + d_h if two["resolved_backend"] == "cpu" else k_h * d_h  # per (b, h); H = 2, B = 1
    agreement = (2 + len(SIGNATURE_FIELDS)) * 8  # the one all-gather per call: slice lengths and signature
    assert two["bytes_per_step_per_rank"] == data["meta"]["documented_bytes_per_step"] == 2 * 2 * per_reduce * 4 + agreement
    assert two["ran"]["backends"] == [two["resolved_backend"]]
    assert 0 <= two["comm_share_p50"] <= 1


def test_causal_side_by_side_reports_ratios_and_targets(tmp_path):
    """A tiny run writes one row per length with each contender's CPU and wall medians, ratios of
    the medians, and the targets' verdicts from them (a growing chunk ratio fails its target)."""
    from benchmarks import causal_side_by_side as sbs

    sbs.main(["--lengths", "40,48", "--repeats", "2", "--d", "8", "--k", "16", "--heads", "2", "--sdpa-max-n", "40",
              "--out", str(tmp_path)])
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith("-side-by-side.json")]
    data = json.load(open(tmp_path / name))
    rows = {r["N"]: r for r in data["rows"]}
    assert set(rows) == {40, 48} and "sdpa-causal" not in rows[48]["times"]
    t = rows[40]["times"]
    assert rows[40]["ratios"]["chunk32"] == pytest.approx(t["chunk32"]["cpu_ms_p50"] / t["full"]["cpu_ms_p50"])
    assert rows[40]["ratios"]["causal/sdpa-causal"] == pytest.approx(
        t["causal"]["cpu_ms_p50"] / t["sdpa-causal"]["cpu_ms_p50"])
    assert len(t["causal"]["cpu_ms"]) == 2
    assert (tmp_path / name.replace(".json", ".md")).exists()
    fake = [{"N": 4096, "ratios": {"chunk32": 2.0, "causal": 9.0, "causal/sdpa-causal": 0.5}},
            {"N": 16384, "ratios": {"chunk32": 2.4, "causal": 9.0, "causal/sdpa-causal": None}}]
    s = sbs.summarize(fake)
    assert s["chunk32"]["met"] is False  # under the limit, but growing with N
    assert s["causal"]["met"] is True and s["causal_vs_sdpa"]["met"] is True
    fake[1]["ratios"]["chunk32"] = 2.05
    assert sbs.summarize(fake)["chunk32"]["met"] is True
