"""examples/train_sequence_parallel.py runs under torchrun with 2 processes and with 1, and
sequence parallelism changes nothing: the per-step losses of the 2-process run (each process one
uneven slice of every sequence) equal the 1-process run's on the same data (fp32; the state is
summed in another order and the 1-process run may use another backend, so 1e-4 relative)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_sequence_parallel.py"
TINY = ["--steps", "3", "--batch", "2", "--length", "45", "--features", "6", "--width", "16",
        "--hypernet-size", "32", "--heads", "2", "--layers", "2", "--outputs", "3", "--lr", "3e-2",
        "--threads", "1"]


def _run(cmd, tmp_path, name):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(cmd + [str(SCRIPT)] + TINY + ["--losses-json", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_sequence_parallel_example_matches_one_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    single, out1 = _run([sys.executable], tmp_path, "single")
    multi, out2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                       tmp_path, "multi")
    assert single["world"] == 1 and multi["world"] == 2
    assert "step    3  loss" in out1 and "step    3  loss" in out2  # prints the loss each step
    assert len(single["losses"]) == len(multi["losses"]) == 3
    assert all(math.isfinite(v) for v in single["losses"] + multi["losses"])
    assert single["losses"][-1] != single["losses"][0]  # the model trains (parameters change)
    for a, b in zip(single["losses"], multi["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a), (single, multi)
