"""Every bad input gets a clear error that names the problem."""
import pytest
import torch

import hmx_kernels
from hmx_kernels import FusedHyperMixing
from utils import make_case


def _kw(variant="idiap", **over):
    case = make_case(variant=variant, B=2, M=5, N=6, d=8, H=2, k_h=4, masks=False)
    kw = case.kwargs()
    kw.update(over)
    return kw


def _raises(exc, match, **over):
    variant = over.pop("variant", "idiap")
    with pytest.raises(exc, match=match):
        hmx_kernels.hyper_mixing(**_kw(variant, **over))


def test_wrong_rank():
    _raises(ValueError, "query must have 3 dimensions", query=torch.randn(5, 8))
    _raises(ValueError, "key must have 3 dimensions", key=torch.randn(2, 6, 2, 4))


def test_not_a_tensor_and_integer_input():
    _raises(TypeError, "query must be a torch.Tensor", query=[[1.0]])
    _raises(TypeError, "must be a floating tensor", query=torch.ones(2, 5, 8, dtype=torch.int64))


def test_width_not_split_by_heads():
    kw = _kw()
    for name in ("query", "key", "value"):
        kw[name] = kw[name][..., :7].contiguous()
    # the error names the tokens (the odd one out), not the weights that agree with each other
    with pytest.raises(ValueError, match=r"tokens' width d=7 does not match.*query, key and value must have "
                                         r"last dimension H \* d_h = 8"):
        hmx_kernels.hyper_mixing(**kw)
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        FusedHyperMixing(10, 16, num_heads=4)
    with pytest.raises(ValueError, match="hypernet_size"):
        FusedHyperMixing(16, 10, num_heads=4)


def test_batch_length_and_width_mismatches():
    _raises(ValueError, "batch sizes differ", key=torch.randn(3, 6, 8), value=torch.randn(3, 6, 8))
    _raises(ValueError, "key and value must have the same shape", value=torch.randn(2, 7, 8))
    _raises(ValueError, "widths differ", key=torch.randn(2, 6, 6), value=torch.randn(2, 6, 6))


def test_mask_shape_dtype_device():
    _raises(ValueError, r"key_padding_mask must have shape \[B, length\] = \[2, 6\]",
            key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    _raises(ValueError, "query_padding_mask must have shape",
            query_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    _raises(TypeError, "float masks are additive attention masks",
            key_padding_mask=torch.zeros(2, 6))
    _raises(TypeError, "torch.bool", key_padding_mask=torch.zeros(2, 6, dtype=torch.int32))
    _raises(TypeError, "must be a torch.Tensor or None", key_padding_mask=[[True] * 6] * 2)
    _raises(ValueError, "key_padding_mask is on meta", key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device="meta"))


def test_uint8_mask_means_nonzero_is_padded():
    kw = _kw()
    m = torch.zeros(2, 6, dtype=torch.uint8)
    m[1, 3:] = 7
    a = hmx_kernels.hyper_mixing(**{**kw, "key_padding_mask": m})
    b = hmx_kernels.hyper_mixing(**{**kw, "key_padding_mask": m != 0})
    assert torch.equal(a, b)


def test_mixed_dtypes_and_devices():
    kw = _kw()
    _raises(TypeError, "share one dtype", key=kw["key"].double(), value=kw["value"].double())
    _raises(ValueError, "one device", key=torch.randn(2, 6, 8, device="meta"), value=torch.randn(2, 6, 8, device="meta"))
    _raises(ValueError, "w1_fc1_weight is on meta", w1_fc1_weight=torch.randn(2, 4, 4, device="meta"))


def test_empty_inputs():
    _raises(ValueError, "empty input", query=torch.randn(2, 0, 8))
    _raises(ValueError, "empty input", key=torch.randn(2, 0, 8), value=torch.randn(2, 0, 8))
    _raises(ValueError, "empty input", query=torch.randn(0, 5, 8), key=torch.randn(0, 6, 8), value=torch.randn(0, 6, 8))


def test_parameter_shapes():
    _raises(ValueError, r"w1_fc1_weight must be \[H, d_h, d_h\]", w1_fc1_weight=torch.randn(2, 4, 3))
    _raises(ValueError, r"w2_fc2_weight must be \[H, k_h, d_h\]", w2_fc2_weight=torch.randn(2, 4, 3))
    _raises(ValueError, r"w1_fc2_bias must be \[H, k_h\]", w1_fc2_bias=torch.randn(2, 5))
    _raises(ValueError, "same shapes", w2_fc2_weight=torch.randn(2, 5, 4), w2_fc2_bias=torch.randn(2, 5))
    _raises(ValueError, "needs ln_weight and ln_bias", ln_weight=None)
    _raises(ValueError, r"ln_bias must be \[d\]", ln_bias=torch.randn(7))
    _raises(ValueError, "pass both w2_fc1_weight and w2_fc2_weight", w2_fc2_weight=None, w2_fc2_bias=None)


def test_variant_and_backend_names():
    _raises(ValueError, "unknown HyperMixing variant", variant="nope")
    _raises(ValueError, "unknown backend 'nope'", backend="nope")
    with pytest.raises(ValueError, match="unknown HyperMixing variant"):
        FusedHyperMixing(8, 8, variant="bert")


def test_speechbrain_variant_rules():
    _raises(ValueError, "pass it as key_padding_mask", variant="speechbrain",
            query_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs an even input_output_dim"):
        FusedHyperMixing(9, 8, num_heads=1)
    _raises(ValueError, "needs key and value", key=None)


def test_layer_rejects_attn_mask_clearly():
    layer = FusedHyperMixing(8, 8, num_heads=2)
    x = torch.randn(1, 4, 8)
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    with pytest.raises(NotImplementedError, match="attn_mask_policy"):
        layer(x, x, x, attn_mask=causal)
    with pytest.raises(NotImplementedError, match="attn_mask_policy"):
        layer(x, x, x, causal)  # speechbrain's positional order
    idiap = FusedHyperMixing(8, 8, num_heads=2, variant="idiap")
    with pytest.raises(NotImplementedError, match="attn_mask_policy"):
        idiap(x, x, x, attn_mask=causal)
    with pytest.raises(TypeError, match="positional arguments"):
        idiap(x, x, x, None, None, None)


def test_op_with_a_required_weight_none_names_it():
    """torch.ops.hmx_kernels.cpp_fwd with a required weight None: a TypeError naming the weight
    (it was "AttributeError: 'NoneType' object has no attribute 'dim'")."""
    case = make_case(variant="speechbrain", B=1, M=5, d=8, H=2, k_h=4, masks=False)
    p = hmx_kernels.check_inputs(**case.kwargs())
    gen = list(p.generator_weights())
    for i, name in ((0, "w1_fc1_weight"), (2, "w1_fc2_weight"), (4, "w2_fc1_weight"), (6, "w2_fc2_weight")):
        args = list(gen)
        args[i] = None
        with pytest.raises(TypeError, match=f"{name} is required"):
            torch.ops.hmx_kernels.cpp_fwd(p.query, p.key, p.value, None, None, *args, "speechbrain")


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_position_offset_beyond_the_encodings_range_is_refused(variant):
    """position_offset=2**62 gave "Storage size calculation overflowed" (cpu) or a tensor-size
    mismatch (reference): now a ValueError naming position_offset and the last exact position
    (speechbrain: float32 positions, 2**24; idiap: float64, 2**53), from the functional op, the
    layer and the op itself."""
    limit = 2**24 if variant == "speechbrain" else 2**53
    for backend in ("reference", "cpu"):
        _raises(ValueError, r"position_offset 4611686018427387904 with [56] tokens reaches position .* beyond "
                rf"{limit} \(2\*\*{limit.bit_length() - 1}\)", variant=variant, backend=backend,
                position_offset=2**62)
    layer = FusedHyperMixing(8, 8, num_heads=2, variant=variant, backend="reference")
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="position_offset"):
        layer(x, position_offset=limit)
    layer(x, position_offset=limit - 4)  # the last four positions the encoding computes exactly
    p = hmx_kernels.check_inputs(**make_case(variant=variant, B=1, M=5, d=8, H=2, k_h=4, masks=False).kwargs())
    with pytest.raises(ValueError, match="hmx_kernels op: position_offset"):
        torch.ops.hmx_kernels.cpp_fwd(p.query, p.key, p.value, None, None, *p.generator_weights(), variant,
                                      0, -1, None, 2**62, "")
