"""The sweep's cases as pytest-benchmark tests, for regression tracking:

    pytest benchmarks/ --benchmark-only --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare

One test per (contender, shape, length, pass); each checks the output against the float64
reference before timing it. Not collected by `pytest tests` (pyproject testpaths). CPU: one torch
thread (as `python -m benchmarks`), float32, N 256 and 1024; GPU: bfloat16, N 1024..16384.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks.config import SHAPES
from benchmarks.contenders import all_contenders, default_contender_names
from benchmarks.measure import clear_grads, sync_device
from benchmarks.sweep import TOLERANCE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
LENGTHS = [1024, 4096, 16384] if DEVICE.type == "cuda" else [256, 1024]
BATCH = 4 if DEVICE.type == "cuda" else 1
ROUNDS = 20 if DEVICE.type == "cuda" else 5
if DEVICE.type == "cpu":
    torch.set_num_threads(int(os.environ.get("HMX_BENCH_THREADS", "1")))

CONTENDERS = all_contenders(DEVICE)
NAMES = default_contender_names(DEVICE)


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_case(benchmark, name, shape, N, pass_):
    c, s = CONTENDERS[name], SHAPES[shape]
    reason = c.unsupported(s, BATCH, N, DTYPE, DEVICE)
    if reason:
        pytest.skip(reason)
    case = c.build(s, BATCH, N, DTYPE, DEVICE)
    y = case.forward()
    grad = torch.randn_like(y)
    err = case.check(y)
    assert err <= TOLERANCE[DTYPE], f"{name} output differs from the reference: {err:.2e}"
    del y

    def clear():
        clear_grads(case.leaves)

    if pass_ == "fwd":
        def run():
            case.forward()
            sync_device(DEVICE)
    else:
        def run():
            case.forward().backward(grad)
            sync_device(DEVICE)

    benchmark.extra_info.update(contender=name, family=c.family, d=s.d, k=s.k, H=s.H, B=BATCH, N=N,
                                dtype=str(DTYPE), flops=c.flops(s, BATCH, N, pass_), max_err=err)
    benchmark.pedantic(run, setup=clear, rounds=ROUNDS, warmup_rounds=1)
