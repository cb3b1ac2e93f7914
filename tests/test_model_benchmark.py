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
