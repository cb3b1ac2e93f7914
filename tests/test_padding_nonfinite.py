"""Padded positions never influence kept results: NaN, +inf and -inf written into the padded
positions of query, key and value give exactly the outputs at kept positions, and exactly the
gradients w.r.t. kept tokens and every weight, that zeros there give; the gradients w.r.t. the
padded positions are finite zeros and every output is finite.

Generated, not hand-listed: every registered backend (the reference included) x every device
present x every mixing mode the backend declares (`Capabilities`: non-causal always; causal:
token-causal, chunk-causal, chunk-causal with a left context; varlen: packed sequences with a
padding mask inside them; sequence_parallel: a large position offset) x both variants, in the
first dtype the backend computes natively. A backend that cannot run a call here (no compiler,
no triton, no GPU) is skipped with its reasons.

The comparison is exact (same backend, same values after masking: the padded values are selected
away before any arithmetic, so both runs do the same operations on the same numbers). The masks
pad positions in the middle of a row and at its end, and one row entirely.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hmx_kernels.blocks import MixingBlocks

import hmx_kernels
from hmx_kernels.dispatch import get_backend
from utils import WEIGHT_NAMES, make_case

B, L_Q, L_K, D, H, K_H = 4, 11, 13, 12, 2, 10
L_TOKEN_CAUSAL = 7  # token-causal mixing: one block per token, the Triton interpreter's slowest mode
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _modes(caps):
    """(name, hyper_mixing keyword arguments, packed) for every mode the capabilities declare."""
    modes = [("noncausal", {}, False)]
    if caps.causal:
        modes += [("token_causal", dict(causal=True), False),
                  ("chunk3", dict(chunk_size=3), False),
                  ("chunk3_left1", dict(chunk_size=3, left_context_chunks=1), False)]
    if caps.varlen:
        modes.append(("packed", {}, True))
        if caps.causal:
            modes.append(("packed_chunk3", dict(chunk_size=3), True))
    if caps.sequence_parallel or caps.position_offset:
        modes.append(("offset", dict(position_offset=100_003), False))
    return modes


def _combos():
    out = []
    for name in hmx_kernels.registered_backends():
        caps = get_backend(name).capabilities
        dtype = caps.dtypes[1] if caps.dtypes[0] == torch.float64 and len(caps.dtypes) > 1 else caps.dtypes[0]
        dtype = torch.float32 if torch.float32 in caps.dtypes else dtype
        for device in _devices():
            if "*" not in caps.devices and device not in caps.devices:
                continue
            for mode, kw, packed in _modes(caps):
                for variant in ("speechbrain", "idiap"):
                    out.append(pytest.param(name, device, dtype, mode, kw, packed, variant,
                                            id=f"{name}-{device}-{mode}-{variant}"))
    return out


def _padding(batch: int, length: int, device) -> torch.Tensor:
    """Row 0 unpadded; row 1 padded in the middle and at the end; row 2 every other position;
    row 3 (if any) entirely."""
    m = torch.zeros(batch, length, dtype=torch.bool)
    if batch > 1:
        m[1, 2] = m[1, 5] = True
        m[1, length - 3:] = True
    if batch > 2:
        m[2, 1::2] = True
    if batch > 3:
        m[3] = True
    return m.to(device)


def _fill(x: torch.Tensor, padded: torch.Tensor, values) -> torch.Tensor:
    """x with its padded rows [B, L] replaced by `values` (a cycle of NaN / +inf / -inf, or 0)."""
    fill = torch.tensor(values, dtype=x.dtype, device=x.device).repeat(x.numel() // len(values) + 1)
    fill = fill[:x.numel()].reshape(x.shape)
    return torch.where(padded.unsqueeze(-1), fill, x.detach())


def _problem_and_run(backend, device, dtype, kw, packed, variant, fill_values):
    """Runs one call with `fill_values` in the padded positions; returns (out, {leaf: grad}, masks)."""
    if packed:  # one row of packed sequences, with padded positions inside them
        lengths = [5, 1, 9, 7]
        total = sum(lengths)
        case = make_case(variant=variant, B=1, M=total, d=D, H=H, k_h=K_H, input_scale=0.5, masks=False,
                         dtype=dtype, device=device, seed=3)
        pad = torch.zeros(1, total, dtype=torch.bool, device=device)
        pad[0, [2, 4, 5, 13, 14, 21]] = True  # middle and ends of sequences 0, 2, 3; sequence 1 kept
        kpm = qpm = pad
    else:
        same = variant == "speechbrain" or kw.get("causal") or kw.get("chunk_size")
        L = L_TOKEN_CAUSAL if kw.get("causal") else L_Q
        case = make_case(variant=variant, B=B, M=L, N=L if same else L_K, d=D, H=H, k_h=K_H,
                         input_scale=0.5, masks=False, dtype=dtype, device=device, seed=5)
        kpm = _padding(B, case.tensors["query"].shape[1] if variant == "speechbrain" else
                       (case.tensors["key"].shape[1]), device)
        qpm = kpm if variant == "speechbrain" else _padding(B, case.tensors["query"].shape[1], device).roll(1, 0)
    leaves = {}
    tensors = dict(case.tensors)
    for name in ("query", "key", "value"):
        t = tensors[name]
        if t is None:
            continue
        pm = qpm if name == "query" else kpm
        leaves[name] = tensors[name] = _fill(t, pm, fill_values).requires_grad_(True)
    for name in WEIGHT_NAMES:
        if tensors[name] is not None:
            leaves[name] = tensors[name]
    masks = dict(key_padding_mask=kpm, query_padding_mask=None if variant == "speechbrain" else qpm)
    args = [tensors[n] for n in ("query", "key", "value")] + [tensors[n] for n in WEIGHT_NAMES]
    if packed:
        problem = hmx_kernels.check_inputs(*args, variant=variant, **masks, **kw)
        cu = torch.tensor([0, 5, 6, 15, 22], dtype=torch.int64)
        problem = dataclasses.replace(problem, blocks=MixingBlocks(problem.mode, cu))
        reasons = get_backend(backend).not_supported_reasons(problem)
        if reasons:
            pytest.skip(f"{backend}: " + "; ".join(reasons))
        out = get_backend(backend).forward(problem)
    else:
        problem = hmx_kernels.check_inputs(*args, variant=variant, **masks, **kw)
        reasons = hmx_kernels.backend_reasons(problem)[backend]
        if reasons:
            pytest.skip(f"{backend}: " + "; ".join(reasons))
        out = hmx_kernels.hyper_mixing(*args, variant=variant, backend=backend, **masks, **kw)
    g = torch.Generator().manual_seed(11)
    grad_out = torch.randn(out.shape, generator=g).to(dtype=out.dtype, device=out.device)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out, allow_unused=True)
    return out.detach(), dict(zip(names, grads)), dict(query=qpm, key=kpm, value=kpm)


@pytest.mark.parametrize("backend,device,dtype,mode,kw,packed,variant", _combos())
def test_nonfinite_padding_does_not_reach_kept_results(backend, device, dtype, mode, kw, packed, variant):
    out0, grads0, pads = _problem_and_run(backend, device, dtype, kw, packed, variant, (0.0,))
    out1, grads1, _ = _problem_and_run(backend, device, dtype, kw, packed, variant, NONFINITE)
    assert torch.isfinite(out1).all(), "non-finite outputs (kept or padded positions)"
    kept_q = ~pads["query"]
    torch.testing.assert_close(out1[kept_q], out0[kept_q], rtol=0, atol=0,
                               msg=lambda m: f"outputs at kept positions differ:\n{m}")
    for name, g0 in grads0.items():
        g1 = grads1[name]
        assert (g0 is None) == (g1 is None), name
        if g1 is None:
            continue
        assert torch.isfinite(g1).all(), f"grad {name}: non-finite values"
        if name in pads:
            kept = ~pads[name]
            torch.testing.assert_close(g1[kept], g0[kept], rtol=0, atol=0,
                                       msg=lambda m, n=name: f"grad {n} at kept positions differs:\n{m}")
            assert not g1[pads[name]].any(), f"grad {name}: not zero at padded positions"
        else:
            torch.testing.assert_close(g1, g0, rtol=0, atol=0,
                                       msg=lambda m, n=name: f"grad {n} differs:\n{m}")


def test_speechbrain_leaks_padded_nan_the_converted_layer_does_not():
    """The documented difference (README, docs/HYPERMIXING.md): speechbrain's HyperMixing
    multiplies by the mask, so one NaN in a padded frame turns the kept outputs of its sequence
    into NaN; the same weights in FusedHyperMixing (default backend) give the zero-padding outputs,
    finite, and finite gradients."""
    from utils import import_speechbrain

    sb_mod = import_speechbrain("speechbrain.nnet.hypermixing")
    torch.manual_seed(0)
    sb = sb_mod.HyperMixing(16, 32, num_heads=2)
    fused = hmx_kernels.FusedHyperMixing.from_speechbrain(sb)
    x = torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    x_nan = x.clone()
    x_nan[1, 7] = float("nan")
    x_nan[1, 8, 3] = float("inf")
    with torch.no_grad():
        assert torch.isnan(sb(x_nan, x_nan, x_nan, key_padding_mask=pad)[0][1, :6]).all()
    zero = torch.where(pad[..., None], 0.0, x)
    y0 = fused(zero, zero, zero, key_padding_mask=pad)[0]
    xin = x_nan.clone().requires_grad_(True)
    y1 = fused(xin, xin, xin, key_padding_mask=pad)[0]
    assert torch.isfinite(y1).all()
    torch.testing.assert_close(y1[~pad], y0[~pad], rtol=0, atol=0)
    grads = torch.autograd.grad(y1.square().sum(), [xin] + list(fused.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert not grads[0][pad].any()
