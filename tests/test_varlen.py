"""Packed variable-length batches (hmx_kernels.varlen): every sequence of a packed batch gets
exactly what it gets alone (and what the padded batch gives its non-padded rows), on every backend
that runs here; unpad/pad round-trip; bad cu_seqlens are refused. Tolerance: the same backend on
the same fp32 values through another layout: 1e-5 of the largest magnitude (the state's sums run
over a padded length, so BLAS blocks them differently: measured up to 1.1e-6)."""
from __future__ import annotations

import pytest
import torch

import hmx_kernels
from hmx_kernels.varlen import cu_seqlens_from_lengths, hyper_mixing_varlen, pad, unpad
from utils import WEIGHT_NAMES, assert_close, make_case

BACKENDS = [b for b in hmx_kernels.registered_backends()
            if not hmx_kernels.backend_reasons(hmx_kernels.check_inputs(
                **make_case(variant="speechbrain", B=1, M=2, d=8, H=2, k_h=4).kwargs()))[b]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_packed_sequences_are_independent(backend, variant):
    lengths = [5, 1, 13, 8]
    case = make_case(variant=variant, B=1, M=sum(lengths), N=sum(lengths), d=12, H=2, k_h=6,
                     input_scale=0.5, masks=False)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    tokens = case.tensors["query"][0]  # [total, d]
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    out = hyper_mixing_varlen(tokens, cu, max(lengths), *w, variant=variant, backend=backend)
    assert out.shape == tokens.shape
    for i, n in enumerate(lengths):
        seq = tokens[cu[i]:cu[i + 1]][None]
        alone = hmx_kernels.hyper_mixing(seq, None if variant == "speechbrain" else seq,
                                         None if variant == "speechbrain" else seq, *w,
                                         variant=variant, backend=backend)[0]
        assert_close(f"sequence {i}", out[cu[i]:cu[i + 1]], alone, 1e-5)
    # and the gradient flows to the packed tokens and every parameter
    grads = torch.autograd.grad(out.square().sum(), [tokens] + [t for t in w if t is not None])
    assert all(torch.isfinite(g).all() for g in grads)


def test_unpad_pad_round_trip_and_padded_batch_rows():
    case = make_case(variant="speechbrain", B=3, M=9, d=8, H=2, k_h=4)  # tail-padded masks
    x, mask = case.tensors["query"], case.key_padding_mask
    packed, cu, max_len, idx = unpad(x, mask)
    assert cu.dtype == torch.int32 and int(cu[-1]) == packed.shape[0] == int((~mask).sum())
    back = pad(packed, idx, 3, 9)
    assert torch.equal(back[~mask], x[~mask]) and (back[mask] == 0).all()
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    padded_out = hmx_kernels.hyper_mixing(x, None, None, *w, key_padding_mask=mask)
    packed_out = hyper_mixing_varlen(packed, cu, max_len, *w)
    assert_close("rows", packed_out, padded_out[~mask], 1e-5)


def test_bad_cu_seqlens():
    case = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="end at the token count 10"):
        hyper_mixing_varlen(x, torch.tensor([0, 4, 9], dtype=torch.int32), None, *w)
    with pytest.raises(ValueError, match="empty sequence"):
        hyper_mixing_varlen(x, torch.tensor([0, 4, 4, 10], dtype=torch.int32), None, *w)
    with pytest.raises(TypeError, match="int32"):
        hyper_mixing_varlen(x, torch.tensor([0.0, 10.0]), None, *w)
    with pytest.raises(ValueError, match="max_seqlen 3 is smaller"):
        hyper_mixing_varlen(x, torch.tensor([0, 4, 10], dtype=torch.int32), 3, *w)
