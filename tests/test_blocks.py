"""MixingBlocks (hmx_kernels/blocks.py): the one typed value that says which tokens a token mixes
with, from check_inputs to the kernels, and the dispatcher's reading of the block kinds a backend
declares (Capabilities.blocks)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import hmx_kernels
from hmx_kernels.blocks import ALL_KINDS, CHUNK_CAUSAL, FULL, PACKED, TOKEN_CAUSAL, MixingBlocks
from hmx_kernels.causal import MixingMode, allowed_matrix
from hmx_kernels.dispatch import _REGISTRY, Backend, Capabilities, register_backend
from utils import make_case


def test_kinds_and_op_args():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cases = [
        (MixingBlocks(), {FULL}, (0, -1, None)),
        (MixingBlocks(MixingMode(1)), {TOKEN_CAUSAL}, (1, -1, None)),
        (MixingBlocks(MixingMode(4, 2)), {CHUNK_CAUSAL}, (4, 2, None)),
        (MixingBlocks(MixingMode(4)), {CHUNK_CAUSAL}, (4, -1, None)),
        (MixingBlocks(cu_seqlens=cu), {PACKED}, (0, -1, cu)),
        (MixingBlocks(MixingMode(2, 0), cu), {PACKED, CHUNK_CAUSAL}, (2, 0, cu)),
    ]
    for blocks, kinds, args in cases:
        assert blocks.kinds == kinds, blocks.describe()
        assert blocks.op_args() == args
    assert MixingBlocks().is_full and not MixingBlocks(MixingMode(1)).is_full
    assert "packed" in MixingBlocks(MixingMode(2, 0), cu).describe()


def test_packed_allowed_matrix_is_block_diagonal_with_the_inner_mode_per_sequence():
    cu = torch.tensor([0, 3, 3, 8])
    blocks = MixingBlocks(MixingMode(2, 0), cu)
    a = blocks.allowed_matrix(8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:3, 0:3] = allowed_matrix(MixingMode(2, 0), 3)
    expected[3:8, 3:8] = allowed_matrix(MixingMode(2, 0), 5)
    assert torch.equal(a, expected)
    assert not a[3, 2] and not a[2, 3]  # no mixing across sequences


def test_check_inputs_builds_the_blocks_once_and_backends_read_them():
    case = make_case(variant="speechbrain", B=1, M=9, d=8, H=2, k_h=4, masks=False, dtype=torch.float64)
    p = hmx_kernels.check_inputs(**case.kwargs(), chunk_size=3, left_context_chunks=1)
    assert p.blocks.kinds == {CHUNK_CAUSAL}
    assert p.mode == MixingMode(3, 1) and p.cu_seqlens is None
    assert hmx_kernels.check_inputs(**case.kwargs()).blocks.is_full


def test_every_registered_backend_declares_known_block_kinds():
    for name in hmx_kernels.registered_backends():
        kinds = hmx_kernels.dispatch.get_backend(name).capabilities.blocks
        assert FULL in kinds and kinds <= ALL_KINDS, (name, kinds)
    assert hmx_kernels.dispatch.get_backend("reference").capabilities.blocks == ALL_KINDS


@pytest.mark.skipif("cuda" not in hmx_kernels.registered_backends(), reason="cuda backend not registered")
def test_cuda_declares_what_its_kernels_run():
    """The CUDA kernels run full, chunk-causal and packed mixing (csrc/hmx_pieces.h, the *_blocked
    kernels), a carried state in chunk-causal modes and a sequence-parallel group (non-causal,
    the sums all-reduced between the launches); not token-causal mixing (declined with the
    dispatcher's reason)."""
    caps = hmx_kernels.dispatch.get_backend("cuda").capabilities
    assert caps.blocks == frozenset({FULL, CHUNK_CAUSAL, PACKED}) and TOKEN_CAUSAL not in caps.blocks
    assert caps.varlen and not caps.causal and caps.sequence_parallel
    assert caps.carried_state(MixingMode(4)) and caps.carried_state(MixingMode(3, 2))
    assert caps.carried_state(MixingMode(1, 2)) and not caps.carried_state(MixingMode(1))
    assert hmx_kernels.dispatch.get_backend("cuda").stream_forward is not None


@pytest.fixture
def full_only_backend():
    """A backend that runs only full mixing and packed sequences (no causal kinds)."""
    ran = []

    def forward(p):
        ran.append(p.blocks)
        return hmx_kernels.dispatch.get_backend("reference").forward(p)

    register_backend(Backend("blocks-test", "test", forward,
                             Capabilities(devices=("cpu",), dtypes=(torch.float64,), blocks=frozenset({FULL, PACKED}))))
    try:
        yield ran
    finally:
        _REGISTRY.pop("blocks-test", None)


def test_dispatch_compares_the_blocks_kinds_with_the_declared_ones(full_only_backend):
    case = make_case(variant="speechbrain", B=1, M=9, d=8, H=2, k_h=4, masks=False, dtype=torch.float64)
    p = hmx_kernels.check_inputs(**case.kwargs())
    assert hmx_kernels.backend_reasons(p)["blocks-test"] == []
    causal = hmx_kernels.check_inputs(**case.kwargs(), chunk_size=3)
    assert any("chunk-causal" in r for r in hmx_kernels.backend_reasons(causal)["blocks-test"])
    packed = dataclasses.replace(p, blocks=MixingBlocks(None, torch.tensor([0, 4, 9])))
    assert hmx_kernels.backend_reasons(packed)["blocks-test"] == []
    packed_causal = dataclasses.replace(p, blocks=MixingBlocks(MixingMode(1), torch.tensor([0, 4, 9])))
    assert any("token-causal" in r for r in hmx_kernels.backend_reasons(packed_causal)["blocks-test"])
    out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="blocks-test")
    assert full_only_backend and full_only_backend[-1].is_full and out.shape == (1, 9, 8)
