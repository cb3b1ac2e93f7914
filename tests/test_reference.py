"""The reference against an independent naive formulation, gradcheck, PE and dtype behaviour."""
import math

import pytest
import torch

import hmx_kernels
from hmx_kernels.reference import frequencies, hyper_mixing_ref, positional_encoding
from naive import naive_hyper_mixing, naive_pe
from utils import WEIGHT_NAMES, assert_close, make_case

CASES = [
    # variant, B, M, N, d, H, k_h, bias, tied, masks, all_padded, ln
    ("speechbrain", 2, 5, None, 8, 2, 6, True, False, True, False, True),
    ("speechbrain", 2, 4, None, 6, 1, 5, True, True, True, True, True),
    ("speechbrain", 1, 1, None, 36, 2, 72, True, False, False, False, True),  # d_h 18, k_h 72, N 1
    ("idiap", 2, 3, 5, 8, 2, 4, False, False, True, False, True),  # M != N
    ("idiap", 2, 6, 2, 9, 3, 5, True, False, True, True, False),  # odd d (idiap allows), no LN
    ("idiap", 3, 4, 4, 8, 4, 3, False, True, True, False, True),  # tied cross-mixing formula
]


@pytest.mark.parametrize("variant,B,M,N,d,H,k_h,bias,tied,masks,all_padded,ln", CASES)
def test_reference_matches_naive_loops(variant, B, M, N, d, H, k_h, bias, tied, masks, all_padded, ln):
    case = make_case(variant=variant, B=B, M=M, N=N, d=d, H=H, k_h=k_h, bias=bias, tied=tied,
                     masks=masks, all_padded_batch=all_padded, use_layer_norm=ln, dtype=torch.float64)
    got = hmx_kernels.hyper_mixing(**case.kwargs(), backend="reference")
    want = naive_hyper_mixing(**case.kwargs())
    # both float64; only summation order differs
    assert_close("out", got, want, rtol=1e-10)


@pytest.mark.parametrize("variant,tied,bias,ln", [
    ("speechbrain", False, True, True),
    ("speechbrain", True, True, True),
    ("idiap", False, False, True),
    ("idiap", True, True, False),
])
def test_gradcheck_all_inputs_and_parameters(variant, tied, bias, ln):
    case = make_case(variant=variant, B=2, M=4, N=3, d=6, H=2, k_h=4, bias=bias, tied=tied,
                     masks=True, use_layer_norm=ln, dtype=torch.float64, seed=3)
    leaves = case.leaves()
    names = list(leaves)
    assert len(names) >= 6

    def fn(*tensors):
        kw = case.kwargs()
        replaced = dict(zip(names, tensors))
        for name in list(kw):
            t = kw[name]
            if isinstance(t, torch.Tensor) and t.requires_grad:
                # tied: w2 entries are None in the case; only leaves are replaced
                kw[name] = replaced.get(name, t)
        return hmx_kernels.hyper_mixing(**kw, backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_padded_query_rows_give_layer_norm_bias():
    case = make_case(variant="idiap", B=2, M=6, N=5, d=8, H=2, k_h=4, masks=True)
    out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="reference")
    qpm = case.query_padding_mask
    assert qpm.any()
    padded_rows = out[qpm]
    assert torch.allclose(padded_rows, case.tensors["ln_bias"].detach().expand_as(padded_rows), atol=1e-6)


def test_all_padded_keys_give_zero_mixing():
    case = make_case(variant="speechbrain", B=2, M=5, d=8, H=2, k_h=4, masks=False, all_padded_batch=True)
    out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="reference")
    assert torch.allclose(out[-1], case.tensors["ln_bias"].detach().expand(5, 8), atol=1e-6)
    assert torch.isfinite(out).all()


def test_key_padding_hides_padded_tokens():
    """Changing padded keys' values must not change the output (idiap, cross-mixing)."""
    case = make_case(variant="idiap", B=2, M=4, N=7, d=8, H=2, k_h=4, masks=True)
    kw = case.kwargs()
    out1 = hmx_kernels.hyper_mixing(**kw)
    kpm = case.key_padding_mask
    kw["key"] = torch.where(kpm[..., None], torch.randn_like(kw["key"]) * 100, kw["key"])
    kw["value"] = torch.where(kpm[..., None], torch.randn_like(kw["value"]) * 100, kw["value"])
    out2 = hmx_kernels.hyper_mixing(**kw)
    assert torch.equal(out1, out2)


def test_mixing_is_a_sum_over_tokens_not_a_mean():
    """Duplicating every key/value doubles P (no 1/N): check against the formula on a 1-token case."""
    case = make_case(variant="idiap", B=1, M=2, N=1, d=4, H=1, k_h=3, masks=False, use_layer_norm=False,
                     dtype=torch.float64)
    kw = case.kwargs()
    one = hmx_kernels.hyper_mixing(**kw)
    # two identical tokens at positions 1 and 2 differ in PE, so compare with the naive formula instead
    kw2 = dict(kw)
    kw2["key"] = kw["key"].repeat(1, 2, 1)
    kw2["value"] = kw["value"].repeat(1, 2, 1)
    two = hmx_kernels.hyper_mixing(**kw2)
    assert_close("out", two, naive_hyper_mixing(**kw2), rtol=1e-10)
    assert not torch.allclose(one, two)


def test_speechbrain_pe_is_speechbrains_fp32_table():
    d = 144
    pe = positional_encoding("speechbrain", 5000, d)
    # speechbrain's own arithmetic, restated: fp32 positions times fp32 frequencies
    positions = torch.arange(0, 5000).unsqueeze(1).float()
    denominator = torch.exp(torch.arange(0, d, 2).float() * -(math.log(10000.0) / d))
    assert torch.equal(pe[:, 0::2], torch.sin(positions * denominator))
    assert torch.equal(pe[:, 1::2], torch.cos(positions * denominator))
    # and close to the exact float64 formula (fp32 rounding of the angle grows with position)
    for p in (0, 1, 17, 2999):
        exact = torch.tensor([
            (math.sin if c % 2 == 0 else math.cos)(p * math.exp(-(2 * (c // 2)) * math.log(10000.0) / d))
            for c in range(d)
        ], dtype=torch.float64)
        assert torch.allclose(pe[p].double(), exact, atol=3e-4)
        assert torch.equal(pe[p].double(), naive_pe("speechbrain", p, d))


def test_idiap_pe_matches_its_formula_and_starts_at_one():
    d = 9  # odd widths are allowed for idiap
    pe = positional_encoding("idiap", 4, d)  # rows for a 4-token sequence: positions 1..4
    for row, p in enumerate(range(1, 5)):
        assert torch.allclose(pe[row].double(), naive_pe("idiap", p, d), atol=1e-7)
    assert torch.equal(positional_encoding("idiap", 3, d, start=0)[1:], positional_encoding("idiap", 2, d))


def test_pe_beyond_3000_positions_and_frequencies():
    pe = positional_encoding("speechbrain", 3, 16, start=70000)
    assert pe.shape == (3, 16) and torch.isfinite(pe).all()
    f = frequencies("speechbrain", 16)
    assert torch.equal(f[0::2], f[1::2])  # sin/cos pairs share a frequency
    f_i = frequencies("idiap", 16)
    assert not torch.equal(f_i[0::2], f_i[1::2])  # idiap's pairs do not
    with pytest.raises(ValueError, match="even"):
        positional_encoding("speechbrain", 3, 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32_and_returned_in_input_dtype(dtype):
    case32 = make_case(variant="idiap", B=2, M=5, N=6, d=8, H=2, k_h=4, dtype=torch.float32)
    case_h = case32.cast(dtype)
    out_h = hmx_kernels.hyper_mixing(**case_h.kwargs())
    assert out_h.dtype == dtype
    # same half-rounded inputs in fp32 give the fp32 result of which out_h is the rounding
    out_32 = hmx_kernels.hyper_mixing(**case_h.cast(torch.float32).kwargs())
    assert torch.equal(out_h, out_32.to(dtype))


def test_autocast_rule_on_the_reference():
    # the dtype rule (hmx_kernels.problem): under autocast the tokens and hypernetwork weights
    # are cast to the autocast dtype, the computation stays fp32 and the result has that dtype;
    # exactly the fp32 result for the bf16-rounded operands, rounded to bf16 once
    case = make_case(variant="speechbrain", B=2, M=9, d=8, H=2, k_h=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="reference")
    assert out.dtype == torch.bfloat16
    rounded = {k: (None if t is None else (t.to(torch.bfloat16).float() if not k.startswith("ln") else t))
               for k, t in case.tensors.items()}
    kw = {**case.kwargs(), **rounded}
    expected = hmx_kernels.hyper_mixing(**kw, backend="reference")
    assert torch.equal(out, expected.to(torch.bfloat16))
    # called directly, the reference itself keeps fp32 whatever the autocast state
    t = case.tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = hyper_mixing_ref(t["query"], t["query"], t["query"], *[t[k] for k in WEIGHT_NAMES],
                                  key_padding_mask=case.key_padding_mask, query_padding_mask=case.key_padding_mask)
    assert direct.dtype == torch.float32


def test_long_sequence_has_no_length_cap():
    case = make_case(variant="idiap", B=1, M=3, N=5000, d=8, H=2, k_h=4, masks=False)
    out = hmx_kernels.hyper_mixing(**case.kwargs())
    assert out.shape == (1, 3, 8) and torch.isfinite(out).all()


def test_reference_is_importable_and_matches_functional():
    case = make_case(variant="speechbrain", B=2, M=5, d=8, H=2, k_h=4)
    kw = case.kwargs()
    t = case.tensors
    direct = hyper_mixing_ref(
        t["query"], t["query"], t["query"],
        *[t[k] for k in WEIGHT_NAMES],
        variant="speechbrain", key_padding_mask=kw["key_padding_mask"], query_padding_mask=kw["key_padding_mask"],
    )
    assert torch.equal(direct, hmx_kernels.hyper_mixing(**kw, backend="reference"))
