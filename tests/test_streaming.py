"""Streaming (hmx_kernels.streaming): a sequence fed in consecutive pieces with the carried state
gives the one-pass result, in every causal mode, for outputs and every gradient (float64, 1e-12 of
the largest magnitude: the same sums, grouped by piece); the state's size does not grow with the
number of pieces; misuse is refused."""
from __future__ import annotations

import random

import pytest
import torch

import hmx_kernels
from hmx_kernels.streaming import hyper_mixing_stream
from utils import WEIGHT_NAMES, assert_close, make_case

MODES = {"token": dict(causal=True), "chunk3": dict(chunk_size=3), "chunk2_L1": dict(chunk_size=2, left_context_chunks=1),
         "chunk4_L0": dict(chunk_size=4, left_context_chunks=0), "chunk3_L3": dict(chunk_size=3, left_context_chunks=3)}


@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_pieces_equal_one_pass(variant, mode_name):
    kw = MODES[mode_name]
    C = kw.get("chunk_size", 1)
    N = 29
    case = make_case(variant=variant, B=2, M=N, N=N, d=12, H=2, k_h=5, dtype=torch.float64, input_scale=0.5)
    x = case.tensors["query"]
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    pad = case.key_padding_mask
    q = None if variant == "speechbrain" else x
    full = hmx_kernels.hyper_mixing(x, q, q, *w, variant=variant, key_padding_mask=pad,
                                    query_padding_mask=None if variant == "speechbrain" else pad, **kw)
    rng = random.Random(len(mode_name))
    outs, state, start, sizes = [], None, 0, []
    while start < N:  # pieces of random whole-chunk sizes, the last one ragged
        n = min(N - start, C * rng.randint(1, 4))
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, variant=variant,
                                       key_padding_mask=pad[:, start:start + n], **(kw if state is None else {}))
        outs.append(y)
        sizes.append(0 if state.carry is None else state.carry.numel())
        start += n
    streamed = torch.cat(outs, dim=1)
    assert_close("out", streamed, full, 1e-12)
    assert len(set(sizes[1:])) <= 1  # O(1) state in the number of pieces
    g = torch.randn_like(full)
    leaves = [x] + [t for t in w if t is not None]
    ga = torch.autograd.grad(full, leaves, g)
    gb = torch.autograd.grad(streamed, leaves, g)
    for i, (a, b) in enumerate(zip(gb, ga)):
        assert_close(f"grad {i}", a, b, 1e-12)


def test_streaming_misuse():
    case = make_case(variant="speechbrain", B=1, M=8, d=8, H=2, k_h=4, masks=False)
    x = case.tensors["query"]
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    with pytest.raises(ValueError, match="needs a causal mode"):
        hyper_mixing_stream(x, *w)
    _, s = hyper_mixing_stream(x[:, :3], *w, chunk_size=2)  # ends inside a chunk
    with pytest.raises(ValueError, match="ended inside a chunk"):
        hyper_mixing_stream(x[:, 3:], *w, state=s)
    _, s = hyper_mixing_stream(x[:, :4], *w, chunk_size=2)
    with pytest.raises(ValueError, match="was started for"):
        hyper_mixing_stream(x[:, 4:], *w, state=s, causal=True)
