"""FusedHyperMixing against the real speechbrain HyperMixing (PyPI `speechbrain`): same weights,
outputs and every gradient, with padding masks.

speechbrain's package import pulls torchaudio, which has no release for the CPU torch used in
development and which the HyperMixing module never calls: when it cannot be imported, an empty
stand-in module is registered before the import. Tolerance: 1e-5 of the largest magnitude (fp32;
both compute in fp32 with the same operation order for the outputs, so differences come only
from the autograd summation order of gradients).
"""
import os
import sys
import types

import pytest
import torch

from hmx_kernels import FusedHyperMixing
from utils import assert_close

RTOL_FP32 = 1e-5


def _import_speechbrain():
    try:
        import torchaudio  # noqa: F401
    except Exception:
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    try:
        from speechbrain.nnet.hypermixing import HyperMixing
    except ImportError as e:  # pragma: no cover - depends on the environment
        if os.environ.get("CI"):
            raise
        pytest.skip(f"speechbrain is not installed ({e}); `make test` installs it")
    return HyperMixing


@pytest.fixture(scope="module")
def SBHyperMixing():
    return _import_speechbrain()


def _compare(sb, fused, x, mask, seed=0):
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y1, attn = sb(x1, x1, x1, key_padding_mask=mask)
    y2, none = fused(x2, x2, x2, key_padding_mask=mask)
    assert none is None
    assert attn.shape == (x.shape[0], x.shape[1], x.shape[1])  # speechbrain's dummy N x N tensor
    g = torch.randn(y1.shape, generator=torch.Generator().manual_seed(seed))
    p1 = dict(sb.named_parameters())
    p2 = dict(fused.named_parameters())
    assert sorted(p1) == sorted(p2)
    names = sorted(p1)
    g1 = torch.autograd.grad(y1, [x1] + [p1[n] for n in names], g)
    g2 = torch.autograd.grad(y2, [x2] + [p2[n] for n in names], g)
    assert_close("out", y2, y1, RTOL_FP32)
    for name, a, b in zip(["input"] + names, g2, g1):
        assert_close(f"grad {name}", a, b, RTOL_FP32)


def _mask(B, N):
    m = torch.zeros(B, N, dtype=torch.bool)
    for b in range(1, B):
        m[b, N - max(1, (b * N) // (B + 1)):] = True
    return m


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("H,d,k", [(1, 16, 32), (8, 144, 576)])  # (8, 144, 576): d_h 18, k_h 72
@pytest.mark.parametrize("N", [1, 61])
def test_outputs_and_gradients_match_speechbrain(SBHyperMixing, tied, H, d, k, N):
    torch.manual_seed(0)
    sb = SBHyperMixing(d, k, tied=tied, num_heads=H)
    fused = FusedHyperMixing(d, k, tied=tied, num_heads=H)
    fused.load_state_dict(sb.state_dict(), strict=True)
    x = torch.randn(3, N, d)
    _compare(sb, fused, x, _mask(3, N) if N > 1 else None)


def test_fix_tm_hidden_size_and_from_speechbrain(SBHyperMixing):
    torch.manual_seed(1)
    sb = SBHyperMixing(64, 48, num_heads=4, fix_tm_hidden_size=True)
    fused = FusedHyperMixing.from_speechbrain(sb)
    assert fused.hidden_per_head == 48 and fused.fix_tm_hidden_size
    _compare(sb, fused, torch.randn(2, 13, 64), _mask(2, 13))


@pytest.mark.slow
def test_beyond_speechbrains_default_max_length(SBHyperMixing):
    """N = 3500: our layer with its default max_length (3000) against speechbrain built larger."""
    torch.manual_seed(2)
    sb = SBHyperMixing(144, 576, num_heads=8, max_length=4000)
    fused = FusedHyperMixing(144, 576, num_heads=8)  # default max_length=3000
    assert fused.max_length == 3000
    fused.load_state_dict(sb.state_dict(), strict=True)  # a pe buffer of 4000 rows loads
    _compare(sb, fused, torch.randn(2, 3500, 144), _mask(2, 3500))
    with pytest.raises(RuntimeError):  # speechbrain itself cannot go past its table
        SBHyperMixing(16, 32, max_length=100)(torch.randn(1, 101, 16), None, None)


def test_state_dict_round_trip_both_ways(SBHyperMixing):
    sb = SBHyperMixing(32, 64, num_heads=4, tied=True)
    fused = FusedHyperMixing(32, 64, num_heads=4, tied=True)
    assert sorted(fused.state_dict()) == sorted(sb.state_dict())  # w2_gen keys present when tied
    sb2 = SBHyperMixing(32, 64, num_heads=4, tied=True)
    sb2.load_state_dict(fused.state_dict(), strict=True)


def test_drop_in_inside_a_speechbrain_encoder_layer(SBHyperMixing):
    from speechbrain.lobes.models.transformer.Transformer import TransformerEncoderLayer

    torch.manual_seed(3)
    layer = TransformerEncoderLayer(d_ffn=64, nhead=8, d_model=144, attention_type="hypermixing",
                                    normalize_before=True)
    layer.eval()
    x = torch.randn(2, 21, 144)
    mask = _mask(2, 21)
    want = layer(x, src_key_padding_mask=mask)[0]
    layer.self_att = FusedHyperMixing.from_speechbrain(layer.self_att)
    got = layer(x, src_key_padding_mask=mask)[0]
    assert_close("encoder layer out", got, want, RTOL_FP32)
