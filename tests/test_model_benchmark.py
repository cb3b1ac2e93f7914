"""The model-level benchmark (python -m benchmarks.model) still runs, and its correctness gate
holds and bites: a tiny speechbrain Conformer encoder, seconds."""
import json
import sys
from pathlib import Path

import pytest
import torch

from utils import import_speechbrain

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks folder
from benchmarks import model  # noqa: E402


@pytest.fixture(autouse=True)
def _speechbrain():
    import_speechbrain("speechbrain.lobes.models.transformer.Conformer")


def test_smoke_run_writes_every_contender_and_pass(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert model.main(["--smoke", "--no-plot", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("model-*.json")
    data = json.loads(path.read_text())
    rows, meta = data["rows"], data["meta"]
    assert {(r["contender"], r["pass"]) for r in rows} == {(c, p) for c in model.CONTENDERS
                                                          for p in ("train", "infer")}
    assert meta["complete"] and meta["size"] == model.SMOKE and len(meta["load"]["before"]) == 3
    for r in rows:
        assert r["ms"] > 0 and 0 < r["mixer_share"] < 1, r
        if r["pass"] == "train":
            assert r["peak_mib"] > 0 and r["mixer_bwd_ms"] > 0, r  # the backward is attributed too
        if r["contender"] == "hmx":
            assert r["gate_out_err"] <= model.GATE_RTOL and r["gate_dx_err"] <= model.GATE_RTOL
            assert r["backends"] == ["cpu"]
    assert "| 40 |" in (tmp_path / path.name.replace(".json", ".md")).read_text()


def test_gate_holds_past_speechbrains_position_table():
    """N 3001: speechbrain's table is rebuilt larger, the converted encoder still equals it."""
    enc = model.build_encoders(model.SMOKE, 3001)
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(1, 3001, 32, generator=g), torch.randn(1, 3001, 32, generator=g)
    errs = model.correctness_gate(enc["speechbrain"], enc["hmx"], x, grad)
    assert errs["out"] <= model.GATE_RTOL and errs["dx"] <= model.GATE_RTOL


def test_gate_rejects_a_converted_encoder_that_differs():
    enc = model.build_encoders(model.SMOKE, 20)
    with torch.no_grad():
        next(enc["hmx"].layers[1].mha_layer.parameters()).mul_(1.01)
    x = torch.randn(1, 20, 32)
    with pytest.raises(RuntimeError, match="correctness gate"):
        model.correctness_gate(enc["speechbrain"], enc["hmx"], x, torch.randn_like(x))


# ---- where results go, load warnings, efficiency in executed FLOPs ----------------------------
def test_results_go_to_an_untracked_folder_unless_asked(monkeypatch):
    import argparse

    from benchmarks import runinfo

    p = argparse.ArgumentParser()
    runinfo.add_output_options(p, "causal")
    monkeypatch.delenv(runinfo.UPDATE_ENV, raising=False)
    assert runinfo.output_dir(p.parse_args([]), "causal") == str(Path(runinfo.LOCAL_RESULTS) / "causal")
    assert runinfo.output_dir(p.parse_args(["--update-results"]), "causal") == str(Path(runinfo.RESULTS) / "causal")
    assert runinfo.output_dir(p.parse_args(["--out", "/x"]), "causal") == "/x"
    assert runinfo.output_dir(p.parse_args([]), smoke=True).startswith(str(Path(runinfo.RESULTS) / "quick"))
    monkeypatch.setenv(runinfo.UPDATE_ENV, "1")  # make bench UPDATE=1
    assert runinfo.output_dir(p.parse_args([]), "causal") == str(Path(runinfo.RESULTS) / "causal")
    monkeypatch.setenv(runinfo.UPDATE_ENV, "0")  # make bench
    assert runinfo.output_dir(p.parse_args([]), "causal") == str(Path(runinfo.LOCAL_RESULTS) / "causal")
    gitignore = (Path(runinfo.RESULTS).parent.parent / ".gitignore").read_text().split()
    assert "/benchmarks/results/local/" in gitignore


def test_busy_machine_is_warned_about(monkeypatch):
    from benchmarks import runinfo

    warnings = []
    monkeypatch.setattr(runinfo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runinfo.os, "getloadavg", lambda: (3.9, 2.0, 1.0))
    assert runinfo.check_load(1, warn=warnings.append) == [3.9, 2.0, 1.0]
    assert warnings and "busy" in warnings[0] and "3.90" in warnings[0]
    warnings.clear()
    monkeypatch.setattr(runinfo.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    runinfo.check_load(1, warn=warnings.append)
    assert not warnings


def test_efficiency_counts_the_flops_each_backend_executes():
    """hmx-cpu (reassociated) gets its executed FLOPs, the reference its direct-form FLOPs; the
    direct-form share is shown beside it."""
    from benchmarks.markdown import efficiency, executed_flops

    from hmx_kernels.flops import hyper_mixing_flops, hyper_mixing_flops_reassociated

    def row(contender, ms):
        return dict(contender=contender, family="hypermixing", status="ok", shape="sb256", B=1, N=4096, d=256,
                    H=8, k=1024, fwd_bwd_ms_p50=ms, fwd_bwd_flops=hyper_mixing_flops(1, 4096, 4096, 256, 8, 128,
                                                                                      "fwd_bwd"))
    rows = [row("hmx-cpu", 20.0), row("hmx-reference", 80.0)]
    reassociated = hyper_mixing_flops_reassociated(1, 4096, 4096, 256, 8, 128, "fwd_bwd")
    assert executed_flops(rows[0]) == reassociated and executed_flops(rows[1]) == rows[1]["fwd_bwd_flops"]
    assert 3 < rows[0]["fwd_bwd_flops"] / reassociated < 4.5
    table = efficiency({"results": rows, "meta": {"peak_tflops": 0.2}}, 4096)
    cpu_line = next(ln for ln in table.splitlines() if "hmx-cpu" in ln)
    cells = [c.strip() for c in cpu_line.strip("|").split("|")]
    direct = rows[0]["fwd_bwd_flops"] / 0.02 / 1e12 / 0.2
    assert float(cells[3]) == pytest.approx(reassociated / 0.02 / 1e12 / 0.2, abs=0.006)
    assert float(cells[4]) == pytest.approx(direct, abs=0.006)


def test_sweep_rows_carry_executed_flops():
    from benchmarks.contenders import hypermixing_contender
    from benchmarks.config import SHAPES

    c = hypermixing_contender("cpu")
    assert c.executed_flops(SHAPES["sb144"], 1, 512, "fwd") < c.flops(SHAPES["sb144"], 1, 512, "fwd")
    assert hypermixing_contender("reference").executed_flops is None
