"""The idiap variant against its formulas (its package is not on PyPI).

`IdiapStyleHyperMixing` below is a test-local module written from docs/HYPERMIXING.md with the
idiap implementation's attribute and state_dict names (hyper.w{1,2}_gen.fc{1,2}_weights, optional
biases, layer_norm, token_information.pe) and its arithmetic: a PE table computed in float64 with
Python's math and stored in fp32, read from row 1; input scaled by sqrt(d); separate query and key
masks; cross-mixing with M != N. Tied mode, which crashes in the idiap code, is defined as in the
specification: the one hypernetwork generates W2 from the queries.
"""
import math

import pytest
import torch
from torch import nn

from hmx_kernels import FusedHyperMixing
from utils import assert_close


class _Gen(nn.Module):
    def __init__(self, H, d_h, k_h, bias):
        super().__init__()
        self.fc1_weights = nn.Parameter(torch.randn(H, d_h, d_h) / math.sqrt(d_h))
        self.fc2_weights = nn.Parameter(torch.randn(H, k_h, d_h) / math.sqrt(d_h))
        if bias:
            self.fc1_biases = nn.Parameter(torch.randn(H, d_h) * 0.3)
            self.fc2_biases = nn.Parameter(torch.randn(H, k_h) * 0.3)
        self.bias = bias

    def forward(self, z):  # z [B, L, d] -> [B, H, L, k_h]
        B, L, d = z.shape
        H, _, d_h = self.fc1_weights.shape
        zh = z.view(B, L, H, d_h).permute(0, 2, 1, 3)  # [B, H, L, d_h]
        h = zh @ self.fc1_weights.transpose(1, 2).unsqueeze(0)  # [B, H, L, d_h] @ [1, H, d_h, d_h]
        if self.bias:
            h = h + self.fc1_biases[None, :, None, :]
        h = torch.nn.functional.gelu(h)
        w = h @ self.fc2_weights.transpose(1, 2).unsqueeze(0)  # [B, H, L, d_h] @ [1, H, d_h, k_h]
        if self.bias:
            w = w + self.fc2_biases[None, :, None, :]
        return w


class _Hyper(nn.Module):
    def __init__(self, H, d_h, k_h, tied, bias):
        super().__init__()
        self.tied = tied
        self.w1_gen = _Gen(H, d_h, k_h, bias)
        self.w2_gen = self.w1_gen if tied else _Gen(H, d_h, k_h, bias)


class _TokenInformation(nn.Module):
    def __init__(self, d, max_len):
        super().__init__()
        pe = torch.zeros(max_len, d)
        for p in range(max_len):
            for c in range(d):
                angle = p / (10000 ** ((2 * c) / d))
                pe[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
        self.register_buffer("pe", pe.unsqueeze(0))


class IdiapStyleHyperMixing(nn.Module):
    def __init__(self, d, k, tied=False, num_heads=1, max_length=64, use_layer_norm=True, hypernetwork_bias=False):
        super().__init__()
        self.input_output_dim = d
        self.num_heads = num_heads
        self.use_layer_norm = use_layer_norm
        self.hypernetwork_bias = hypernetwork_bias
        self.hyper = _Hyper(num_heads, d // num_heads, k // num_heads, tied, hypernetwork_bias)
        if use_layer_norm:
            self.layer_norm = nn.LayerNorm(d)
            with torch.no_grad():
                self.layer_norm.weight.add_(torch.randn(d) * 0.1)
                self.layer_norm.bias.add_(torch.randn(d) * 0.1)
        self.token_information = _TokenInformation(d, max_length)

    def forward(self, query, key, value, query_padding_mask=None, key_padding_mask=None):
        B, M, d = query.shape
        N = key.shape[1]
        H = self.num_heads
        if key_padding_mask is not None:
            mk = (~key_padding_mask).float()[..., None]
            key, value = key * mk, value * mk
        if query_padding_mask is not None:
            mq = (~query_padding_mask).float()[..., None]
            query = query * mq
        zk = key * math.sqrt(d) + self.token_information.pe[:, 1 : N + 1]
        zq = query * math.sqrt(d) + self.token_information.pe[:, 1 : M + 1]
        W1 = self.hyper.w1_gen(zk)  # [B, H, N, k_h]
        W2 = self.hyper.w2_gen(zq)  # [B, H, M, k_h]
        if key_padding_mask is not None:
            W1 = W1 * mk[:, None]
        if query_padding_mask is not None:
            W2 = W2 * mq[:, None]
        Vh = value.view(B, N, H, d // H).permute(0, 2, 1, 3)  # [B, H, N, d_h]
        A = torch.nn.functional.gelu(W1.transpose(2, 3) @ Vh)  # [B, H, k_h, N] @ [B, H, N, d_h]
        Y = (W2 @ A).permute(0, 2, 1, 3).reshape(B, M, d)  # [B, H, M, k_h] @ [B, H, k_h, d_h]
        return self.layer_norm(Y) if self.use_layer_norm else Y


def _masks(B, M, N):
    qpm = torch.zeros(B, M, dtype=torch.bool)
    kpm = torch.zeros(B, N, dtype=torch.bool)
    qpm[1, M - 2:] = True
    kpm[1, N - 3:] = True
    kpm[2, :] = True  # an all-padded key sequence
    return qpm, kpm


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("use_ln", [True, False])
@pytest.mark.parametrize("H,d,k,M,N", [(8, 144, 576, 11, 29), (1, 10, 12, 7, 7), (3, 27, 15, 5, 13)])
def test_idiap_variant_matches_formulas(tied, bias, use_ln, H, d, k, M, N):
    torch.manual_seed(0)
    idiap = IdiapStyleHyperMixing(d, k, tied=tied, num_heads=H, use_layer_norm=use_ln, hypernetwork_bias=bias)
    fused = FusedHyperMixing.from_idiap(idiap)
    assert fused.variant == "idiap" and fused.tied == tied and fused.use_layer_norm == use_ln
    assert sorted(fused.state_dict()) == sorted(idiap.state_dict())
    B = 3
    q, k_, v = torch.randn(B, M, d), torch.randn(B, N, d), torch.randn(B, N, d)
    qpm, kpm = _masks(B, M, N)
    leaves1 = [t.clone().requires_grad_(True) for t in (q, k_, v)]
    leaves2 = [t.clone().requires_grad_(True) for t in (q, k_, v)]
    y1 = idiap(*leaves1, qpm, kpm)
    y2 = fused(*leaves2, qpm, kpm)  # idiap's positional call: (query, key, value, query_mask, key_mask)
    assert isinstance(y2, torch.Tensor)
    # fp32 on both sides; the generator matmuls are ordered differently, so allow 1e-5 of the scale
    assert_close("out", y2, y1, 1e-5)
    g = torch.randn_like(y1)
    p1, p2 = dict(idiap.named_parameters()), dict(fused.named_parameters())
    names = sorted(p1)
    assert names == sorted(p2)
    g1 = torch.autograd.grad(y1, leaves1 + [p1[n] for n in names], g)
    g2 = torch.autograd.grad(y2, leaves2 + [p2[n] for n in names], g)
    for name, a, b in zip(["query", "key", "value"] + names, g2, g1):
        assert_close(f"grad {name}", a, b, 1e-5)


def test_idiap_keyword_masks_and_self_mixing_default():
    torch.manual_seed(1)
    fused = FusedHyperMixing(16, 32, num_heads=2, variant="idiap")
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    a = fused(x, x, x, query_padding_mask=kpm, key_padding_mask=kpm)
    b = fused(x, x, x, kpm, kpm)
    c = fused(x, query_padding_mask=kpm, key_padding_mask=kpm)  # key = value = query by default
    assert torch.equal(a, b) and torch.equal(a, c)


def test_idiap_state_dict_names_without_biases():
    fused = FusedHyperMixing(16, 32, num_heads=2, variant="idiap")
    assert sorted(fused.state_dict()) == sorted([
        "hyper.w1_gen.fc1_weights", "hyper.w1_gen.fc2_weights",
        "hyper.w2_gen.fc1_weights", "hyper.w2_gen.fc2_weights",
        "layer_norm.weight", "layer_norm.bias", "token_information.pe",
    ])
    fused_nol = FusedHyperMixing(16, 32, num_heads=2, variant="idiap", use_layer_norm=False)
    assert not any(k.startswith("layer_norm") for k in fused_nol.state_dict())
