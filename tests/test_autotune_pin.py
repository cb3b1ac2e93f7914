"""The Triton autotuner's key and the pinned-config setting (hmx_kernels/triton/autotune.py).

- Every kernel tunes per padded head block (BLOCK_D), not per raw d_h: the key names BLOCK_D and
  not D_H, and the pruner keeps the same candidates for every d_h of one block.
- HMX_KERNELS_TRITON_PIN=1 (config.set_triton_pin) leaves exactly one candidate, the tested one
  (`pinned_candidate`), and the benchmark then runs nothing.
These run on CPU: the pruner and the benchmark hook are plain functions of the configs and the
call's arguments (under the interpreter the kernels carry one config, so the autotuner itself
never prunes here).
"""
from __future__ import annotations

import pytest
import torch
import triton

from hmx_kernels import config as hmx_config
from hmx_kernels.triton import autotune as tconfig
from hmx_kernels.triton import hyper_mixing_bwd, hyper_mixing_fwd, layer_norm_fused  # noqa: F401  (creates the autotuners)


@pytest.fixture
def pin():
    def set_pin(enabled):
        hmx_config.set_triton_pin(enabled)

    saved = hmx_config.SETTINGS.triton_pin
    yield set_pin
    hmx_config.set_triton_pin(saved)


def _all_configs(kernel):
    return [triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns)
            for bn, nw, ns in tconfig.KERNEL_CANDIDATES[kernel]]


def _prune(kernel, d_h, precision_args=("half", "ieee"), keywords_only=False, blocked=False):
    x = torch.zeros(2)
    operand, dot_prec = precision_args
    named = {} if keywords_only else {"q_ptr": x}
    extra = {"q_ptr": x} if keywords_only else {}
    kept = tconfig._pruner(kernel)(_all_configs(kernel), named, D_H=d_h, BLOCK_D=tconfig.block_d(d_h),
                                   OPERAND=operand, DOT_PREC=dot_prec, BLOCKED=blocked, **extra)
    return [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


def test_every_kernel_is_keyed_on_the_padded_block_not_d_h():
    assert set(tconfig.AUTOTUNED) == set(tconfig.KERNEL_CANDIDATES)
    for name, kernel in tconfig.AUTOTUNED.items():
        assert "BLOCK_D" in kernel.keys and "D_H" not in kernel.keys, (name, kernel.keys)
        # the LayerNorm-fused passes run plain mixing only: no BLOCKED constexpr
        modes = set() if name in tconfig.LAYER_NORM_KERNELS else {"BLOCKED"}
        assert {"OPERAND", "DOT_PREC"} | modes <= set(kernel.keys), (name, kernel.keys)


@pytest.mark.parametrize("kernel", list(tconfig.KERNEL_CANDIDATES))
def test_pruning_depends_on_the_block_only(kernel, pin):
    pin(False)
    for d_hs in ((17, 18, 32), (33, 50, 64), (65, 100, 128)):
        for prec in (("half", "ieee"), ("fp32", "ieee"), ("fp32", "tf32x3")):
            expected = tconfig.kept_candidates(kernel, d_hs[-1], tconfig.precision_name(*prec))
            for d_h in d_hs:
                if expected:
                    assert _prune(kernel, d_h, prec) == expected, (kernel, prec, d_h)
                else:  # every candidate spills there (dot_precision then picks another precision)
                    with pytest.raises(RuntimeError, match="no autotune candidate"):
                        _prune(kernel, d_h, prec)


@pytest.mark.parametrize("kernel", list(tconfig.KERNEL_CANDIDATES))
def test_pin_keeps_one_tested_candidate(kernel, pin):
    pin(True)
    for d_h in (18, 32, 64, 128):
        for blocked in (False, True):
            kept = _prune(kernel, d_h, blocked=blocked)
            assert kept == [tconfig.pinned_candidate(kernel, d_h, "half", blocked=blocked)], (kernel, d_h, kept)
            # fp16 / bf16: the interpreter's tile length wherever a spill-free candidate has it
            assert kept[0][0] == tconfig.INTERPRET_BLOCK_N
            # keyword-only launches (torch's wrap_triton replays them so) prune the same
            assert _prune(kernel, d_h, keywords_only=True, blocked=blocked) == kept
    pin(False)
    # unpinned: the autotuner chooses among several (at d_h 32 the LayerNorm-fused query pass keeps
    # one fp16 / bf16 candidate, at 64 two)
    assert max(len(_prune(kernel, d_h)) for d_h in (32, 64)) > 1


def test_pinned_benchmark_runs_nothing_and_the_setting_forgets_choices(pin):
    def must_not_run():
        raise AssertionError("the pinned autotuner ran a benchmark")

    pin(True)
    assert tconfig._bench(must_not_run, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    kernel = tconfig.AUTOTUNED["hmx_fwd_kernel_mix"]
    kernel.cache[("stale",)] = triton.Config({"BLOCK_N": 64}, num_warps=8)
    assert any(r["key"] == ["stale"] for r in tconfig.chosen_configs())
    pin(False)
    assert ("stale",) not in kernel.cache
    assert not any(r["key"] == ["stale"] for r in tconfig.chosen_configs())


def test_pin_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("HMX_KERNELS_TRITON_PIN", "1")
    assert hmx_config.Settings.from_env().triton_pin is True
    monkeypatch.setenv("HMX_KERNELS_TRITON_PIN", "0")
    assert hmx_config.Settings.from_env().triton_pin is False
    monkeypatch.delenv("HMX_KERNELS_TRITON_PIN")
    assert hmx_config.Settings.from_env().triton_pin is False
