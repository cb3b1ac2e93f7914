"""A deliberately naive HyperMixing, written from docs/HYPERMIXING.md independently of the package:
explicit loops over batch, heads and tokens, Python's math for the positional encoding and GELU,
float64 throughout. Slow; for tiny sizes only."""
from __future__ import annotations

import math

import torch


def naive_pe(variant: str, position: int, d: int) -> torch.Tensor:
    """PE row as the public implementations store it: speechbrain computes the angle in fp32
    arithmetic (fp32 position times fp32 frequency) and takes sin/cos in fp32; idiap computes in
    float64 and stores fp32."""
    row = torch.zeros(d, dtype=torch.float64)
    for c in range(d):
        if variant == "speechbrain":
            w = torch.tensor(float(2 * (c // 2)), dtype=torch.float32) * -(math.log(10000.0) / d)
            angle = torch.tensor(float(position), dtype=torch.float32) * torch.exp(w)  # fp32
            value = torch.sin(angle) if c % 2 == 0 else torch.cos(angle)
            row[c] = float(value)
        else:
            angle = position / (10000 ** ((2 * c) / d))
            value = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            row[c] = float(torch.tensor(value, dtype=torch.float32))
    return row


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def _mlp(z, fc1_w, fc1_b, fc2_w, fc2_b):
    """z [d_h] -> [k_h] with per-head weights fc1_w [d_h, d_h], fc2_w [k_h, d_h]."""
    hidden = torch.zeros(fc1_w.shape[0], dtype=torch.float64)
    for o in range(fc1_w.shape[0]):
        acc = 0.0
        for i in range(fc1_w.shape[1]):
            acc = acc + fc1_w[o, i] * z[i]
        hidden[o] = acc + (fc1_b[o] if fc1_b is not None else 0.0)
    hidden = _gelu(hidden)
    out = torch.zeros(fc2_w.shape[0], dtype=torch.float64)
    for o in range(fc2_w.shape[0]):
        out[o] = (fc2_w[o] * hidden).sum() + (fc2_b[o] if fc2_b is not None else 0.0)
    return out


def naive_hyper_mixing(
    query, key, value,
    w1_fc1_weight, w1_fc1_bias, w1_fc2_weight, w1_fc2_bias,
    w2_fc1_weight=None, w2_fc1_bias=None, w2_fc2_weight=None, w2_fc2_bias=None,
    ln_weight=None, ln_bias=None, *,
    variant="speechbrain", key_padding_mask=None, query_padding_mask=None, use_layer_norm=True, eps=1e-5,
):
    f64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    if w2_fc1_weight is None:
        w2_fc1_weight, w2_fc1_bias, w2_fc2_weight, w2_fc2_bias = w1_fc1_weight, w1_fc1_bias, w1_fc2_weight, w1_fc2_bias
    if variant == "speechbrain":
        key = value = query
        query_padding_mask = key_padding_mask
        scale, first = 1.0, 0
    else:
        scale, first = math.sqrt(query.shape[-1]), 1
    q, k, v = f64(query), f64(key), f64(value)
    B, M, d = q.shape
    N = k.shape[1]
    H = w1_fc1_weight.shape[0]
    d_h = d // H
    out = torch.zeros(B, M, d, dtype=torch.float64)
    for b in range(B):
        m_k = [0.0 if (key_padding_mask is not None and bool(key_padding_mask[b, t])) else 1.0 for t in range(N)]
        m_q = [0.0 if (query_padding_mask is not None and bool(query_padding_mask[b, t])) else 1.0 for t in range(M)]
        for h in range(H):
            sl = slice(h * d_h, (h + 1) * d_h)
            P = torch.zeros(w1_fc2_weight.shape[1], d_h, dtype=torch.float64)
            for t in range(N):
                z = scale * k[b, t] * m_k[t] + naive_pe(variant, first + t, d)
                w1_row = _mlp(z[sl], f64(w1_fc1_weight[h]), f64(None if w1_fc1_bias is None else w1_fc1_bias[h]),
                              f64(w1_fc2_weight[h]), f64(None if w1_fc2_bias is None else w1_fc2_bias[h])) * m_k[t]
                P += torch.outer(w1_row, v[b, t, sl] * m_k[t])
            A = _gelu(P)
            for t in range(M):
                z = scale * q[b, t] * m_q[t] + naive_pe(variant, first + t, d)
                w2_row = _mlp(z[sl], f64(w2_fc1_weight[h]), f64(None if w2_fc1_bias is None else w2_fc1_bias[h]),
                              f64(w2_fc2_weight[h]), f64(None if w2_fc2_bias is None else w2_fc2_bias[h])) * m_q[t]
                for j in range(A.shape[0]):
                    out[b, t, sl] += w2_row[j] * A[j]
        if use_layer_norm:
            for t in range(M):
                row = out[b, t]
                mean = row.mean()
                var = ((row - mean) ** 2).mean()
                out[b, t] = (row - mean) / math.sqrt(var + eps) * f64(ln_weight) + f64(ln_bias)
    return out


def masked_hyper_mixing(query, key, value, w1, w2, ln, *, variant, allowed, key_padding_mask=None,
                        query_padding_mask=None, use_layer_norm=True, eps=1e-5):
    """HyperMixing with an explicit [M, N] bool matrix `allowed[t, s]` (query t mixes key s):
    P_t = sum_s allowed[t, s] m_s W1_s^T V_s per token, Y_t = W2_t GELU(P_t). O(M N k d_h):
    the direct definition of the causal modes, differentiable, for tiny sizes. w1, w2: the four
    generator tensors each (w2 = w1 when tied); ln: (weight, bias)."""
    import torch.nn.functional as F

    from hmx_kernels.reference import generator_mlp_ref, positional_encoding

    if variant == "speechbrain":
        key = value = query
        query_padding_mask = key_padding_mask
        scale, first = 1.0, 0
    else:
        scale, first = math.sqrt(query.shape[-1]), 1
    B, M, d = query.shape
    N = key.shape[1]
    H, _, d_h = w1[0].shape
    m_k = torch.ones(B, N, 1, dtype=query.dtype) if key_padding_mask is None else (~key_padding_mask).to(query.dtype)[..., None]
    m_q = torch.ones(B, M, 1, dtype=query.dtype) if query_padding_mask is None else (~query_padding_mask).to(query.dtype)[..., None]
    pe_k = positional_encoding(variant, N, d, start=first).to(query.dtype)
    pe_q = positional_encoding(variant, M, d, start=first).to(query.dtype)
    W1 = generator_mlp_ref(scale * key * m_k + pe_k, *w1) * m_k[:, None]  # [B, H, N, k_h]
    W2 = generator_mlp_ref(scale * query * m_q + pe_q, *w2) * m_q[:, None]  # [B, H, M, k_h]
    V = (value * m_k).reshape(B, N, H, d_h).transpose(1, 2)  # [B, H, N, d_h]
    # P_t = sum_s allowed[t, s] W1_s (x) V_s: [B, H, M, k_h, d_h]
    P = torch.einsum("ts,bhsk,bhsd->bhtkd", allowed.to(query.dtype), W1, V)
    Y = torch.einsum("bhtk,bhtkd->bhtd", W2, F.gelu(P))  # [B, H, M, d_h]
    Y = Y.transpose(1, 2).reshape(B, M, d)
    if use_layer_norm:
        Y = F.layer_norm(Y, (d,), ln[0], ln[1], eps)
    return Y
