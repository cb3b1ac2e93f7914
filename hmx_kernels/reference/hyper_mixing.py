"""Reference HyperMixing in plain PyTorch: the function every fast path is checked against.

Computes exactly the function of docs/HYPERMIXING.md for both variants, with every option, in
fp32 (half inputs are upcast; float64 stays float64 so gradcheck can use it) and returns the
input dtype. It materialises W1 [B, H, N, k_h] and W2 [B, H, M, k_h] like the public
implementations (O(N * k) memory, linear in N, no N x N tensor) and is written for clarity and
for matching the public implementations' arithmetic, not for speed.

Per batch element b and head h:
    V   = value * m_k                                   # [N, d]
    Zk  = s * (key * m_k) + PE(key positions)           # [N, d]
    Zq  = s * (query * m_q) + PE(query positions)       # [M, d]
    W1  = MLP1_h(Zk[:, h]) * m_k                        # [N, k_h]
    W2  = MLP2_h(Zq[:, h]) * m_q                        # [M, k_h]
(x * m here means "x where kept, 0 where padded", computed as a select so that a non-finite
value in a padded position cannot reach any kept result.)
    Y_h = W2 @ GELU(W1^T @ V[:, h])                     # [M, d_h]
    out = LayerNorm(Y)                                  # optional (idiap)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..causal import MixingMode
from ..variants import get_variant
from ..positional import cached_positional_encoding, positional_encoding

__all__ = ["hyper_mixing_ref", "generator_mlp_ref"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def generator_mlp_ref(
    z: Tensor,  # [B, L, d]
    fc1_weight: Tensor,  # [H, d_h, d_h]
    fc1_bias: Optional[Tensor],  # [H, d_h]
    fc2_weight: Tensor,  # [H, k_h, d_h]
    fc2_bias: Optional[Tensor],  # [H, k_h]
) -> Tensor:  # [B, H, L, k_h]
    """One hypernetwork: a per-head MLP d_h -> d_h -> k_h applied to each head's channels."""
    B, L, d = z.shape
    H, _, d_h = fc1_weight.shape
    zh = z.reshape(B, L, H, d_h)
    # [B, L, H, d_h] x [H, d_h(out), d_h(in)] -> [B, H, L, d_h]
    hidden = torch.einsum("blmf,mhf->bmlh", zh, fc1_weight)
    if fc1_bias is not None:
        hidden = hidden + fc1_bias.unsqueeze(0).unsqueeze(2)
    hidden = F.gelu(hidden)
    # [B, H, L, d_h] x [H, k_h, d_h] -> [B, H, L, k_h]
    w = torch.einsum("bmlh,mfh->bmlf", hidden, fc2_weight)
    if fc2_bias is not None:
        w = w + fc2_bias.unsqueeze(0).unsqueeze(2)
    return w


def _chunk_causal_mix(w1: Tensor, w2: Tensor, v: Tensor, mode: MixingMode, past: Optional[Tensor] = None):
    """Y for a causal / chunk-causal mode. w1, w2 [B, H, N, k_h] (masked), v [B, H, N, d_h].

    Per chunk j of C tokens the partial state Q_j = sum_{s in chunk j} W1_s^T V_s; the chunk's
    state P_c = sum of Q_j over j = max(0, c - L) .. c (all j <= c when L is None); then
    Y_t = W2_t GELU(P_{c(t)}). Memory O(N / C * k_h * d_h) per (b, h): written for clarity (the
    token-causal mode, C = 1, keeps a [k_h, d_h] state per token).

    past: the carried state that earlier pieces of the same sequence left (streaming,
    hmx_kernels.streaming): L None: the sum of every earlier chunk's Q [B, H, k_h, d_h]; L given:
    the last r <= L chunks' Q [B, H, r, k_h, d_h]. Returns (Y [B, N, d], the same state for the
    chunks seen so far)."""
    B, H, N, k_h = w1.shape
    d_h = v.shape[-1]
    C = mode.chunk_size
    n_chunks = -(-N // C)
    pad = n_chunks * C - N
    if pad:
        w1 = F.pad(w1, (0, 0, 0, pad))
        w2 = F.pad(w2, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    w1c = w1.reshape(B, H, n_chunks, C, k_h)
    vc = v.reshape(B, H, n_chunks, C, d_h)
    # [B, H, n, C, k_h] x [B, H, n, C, d_h] -> [B, H, n, k_h, d_h]: each chunk's partial state
    q = torch.einsum("bhjsk,bhjsd->bhjkd", w1c, vc)
    L = mode.left_context_chunks
    if L is None:
        p = torch.cumsum(q, dim=2)
        if past is not None:
            p = p + past[:, :, None]
        carry = q.sum(dim=2) if past is None else past + q.sum(dim=2)
    else:  # window of the own chunk and L before it, summed explicitly (no cumsum differences)
        r = 0 if past is None else past.shape[2]
        q_ext = q if past is None else torch.cat([past, q], dim=2)  # [B, H, r + n, k_h, d_h]
        p = q_ext.clone()
        for shift in range(1, min(L, r + n_chunks - 1) + 1):
            p[:, :, shift:] = p[:, :, shift:] + q_ext[:, :, :-shift]
        p = p[:, :, r:]
        carry = q_ext[:, :, q_ext.shape[2] - min(L, q_ext.shape[2]):]
    a = F.gelu(p)  # [B, H, n, k_h, d_h]
    w2c = w2.reshape(B, H, n_chunks, C, k_h)
    # [B, H, n, C, k_h] x [B, H, n, k_h, d_h] -> [B, H, n, C, d_h]
    y = torch.einsum("bhjtk,bhjkd->bhjtd", w2c, a).reshape(B, H, n_chunks * C, d_h)[:, :, :N]
    return y.transpose(1, 2).reshape(B, N, H * d_h), carry  # [B, N, d]


def hyper_mixing_ref(
    query: Tensor,  # [B, M, d]
    key: Tensor,  # [B, N, d]
    value: Tensor,  # [B, N, d]
    w1_fc1_weight: Tensor,  # [H, d_h, d_h]
    w1_fc1_bias: Optional[Tensor],  # [H, d_h] or None
    w1_fc2_weight: Tensor,  # [H, k_h, d_h]
    w1_fc2_bias: Optional[Tensor],  # [H, k_h] or None
    w2_fc1_weight: Tensor,  # [H, d_h, d_h]   (tied: the w1 tensors)
    w2_fc1_bias: Optional[Tensor],
    w2_fc2_weight: Tensor,  # [H, k_h, d_h]
    w2_fc2_bias: Optional[Tensor],
    ln_weight: Optional[Tensor] = None,  # [d]
    ln_bias: Optional[Tensor] = None,  # [d]
    *,
    variant: str = "speechbrain",
    key_padding_mask: Optional[Tensor] = None,  # [B, N] bool, True = padded
    query_padding_mask: Optional[Tensor] = None,  # [B, M] bool, True = padded
    use_layer_norm: bool = True,
    eps: float = 1e-5,
    mode: Optional[MixingMode] = None,
    position_offset: int = 0,
    sequence_parallel_group=None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
):  # [B, M, d], dtype of query; with output_final_state: (that, the final state)
    """Reference HyperMixing (no input validation: use `hmx_kernels.hyper_mixing` for that).

    For the speechbrain variant pass query for key and value (as its module does) and the same
    mask for keys and queries; `hmx_kernels.hyper_mixing` does this for you.

    mode: None (every query mixes every key) or a `hmx_kernels.causal.MixingMode` (M == N): query
    t in chunk c uses the state summed over the keys of chunks max(0, c - L) .. c.

    position_offset: global position of the first token (a slice of a longer sequence: its
    positional encoding continues from there). sequence_parallel_group: a torch.distributed group
    whose ranks each hold one contiguous slice of every sequence (self-mixing, non-causal): the
    state P is summed over the group (a differentiable all-reduce, so the backward sums dP the same
    way), and every rank gets its slice of the unsplit result. Pass each rank's own offset.

    initial_state / output_final_state (a causal mode only; hmx_kernels.streaming wraps them with
    the checks): the carried state of the chunks before this piece, in the compute dtype — the sum
    of every earlier chunk's partial state Q_j = sum_s W1_s^T V_s, [B, H, k_h, d_h], when the left
    context is unlimited, or the last r <= L chunks' Q, [B, H, r, k_h, d_h] — and whether to return
    (output, the same state after this piece). The piece must start at a chunk boundary; its
    positions start at position_offset. Gradients flow into initial_state.
    """
    if mode is None and (initial_state is not None or output_final_state):
        raise ValueError("a carried state needs a causal or chunk-causal mode")
    v = get_variant(variant)
    out_dtype = query.dtype
    cdt = _compute_dtype(query.dtype)
    B, M, d = query.shape
    N = key.shape[1]
    H, _, d_h = w1_fc1_weight.shape

    def up(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(cdt)

    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k, val = up(query), up(key), up(value)
        s = v.input_scale(d)
        if position_offset:
            first = v.first_position + position_offset
            pe_k = positional_encoding(v, N, d, start=first, device=query.device).to(cdt)  # [N, d]
            pe_q = positional_encoding(v, M, d, start=first, device=query.device).to(cdt)  # [M, d]
        else:
            pe_k = cached_positional_encoding(v, N, d, query.device).to(cdt)  # [N, d]
            pe_q = cached_positional_encoding(v, M, d, query.device).to(cdt)  # [M, d]

        # Padding is selected away (torch.where), never multiplied by 0: NaN * 0 = NaN, so a NaN
        # or inf in a padded position would otherwise reach every kept output and gradient.
        # (speechbrain's module multiplies, and leaks them; docs/HYPERMIXING.md, "Padding".)
        # The backward of the select gives the padded positions exact zero gradients.
        if key_padding_mask is not None:
            pad_k = key_padding_mask.unsqueeze(-1)  # [B, N, 1]
            k = torch.where(pad_k, 0.0, k)
            val = torch.where(pad_k, 0.0, val)
        if query_padding_mask is not None:
            pad_q = query_padding_mask.unsqueeze(-1)  # [B, M, 1]
            q = torch.where(pad_q, 0.0, q)

        z_k = s * k + pe_k if s != 1.0 else k + pe_k
        z_q = s * q + pe_q if s != 1.0 else q + pe_q

        w1 = generator_mlp_ref(z_k, up(w1_fc1_weight), up(w1_fc1_bias), up(w1_fc2_weight), up(w1_fc2_bias))
        w2 = generator_mlp_ref(z_q, up(w2_fc1_weight), up(w2_fc1_bias), up(w2_fc2_weight), up(w2_fc2_bias))
        if key_padding_mask is not None:
            w1 = torch.where(pad_k.unsqueeze(1), 0.0, w1)  # [B, H, N, k_h], rows of padded keys 0
        if query_padding_mask is not None:
            w2 = torch.where(pad_q.unsqueeze(1), 0.0, w2)  # [B, H, M, k_h]

        if mode is None:
            v_heads = val.transpose(1, 2).reshape(B * H, d_h, N)  # [B*H, d_h, N]
            w1 = w1.reshape(B * H, N, w1.shape[-1])  # [B*H, N, k_h] (N may be 0: an empty slice)
            w2 = w2.reshape(B * H, M, w2.shape[-1])  # [B*H, M, k_h]
            p_t = torch.bmm(v_heads, w1)  # [B*H, d_h, N] @ [B*H, N, k_h] -> [B*H, d_h, k_h] = P^T
            if sequence_parallel_group is not None:  # every rank's keys enter the state
                from torch.distributed.nn.functional import all_reduce

                p_t = all_reduce(p_t, group=sequence_parallel_group)
            a = F.gelu(p_t)  # A^T
            y = torch.bmm(a, w2.transpose(1, 2))  # [B*H, d_h, k_h] @ [B*H, k_h, M] -> [B*H, d_h, M]
            y = y.reshape(B, d, M).transpose(1, 2)  # [B, M, d]
        else:
            y, carry = _chunk_causal_mix(w1, w2, val.reshape(B, N, H, d_h).transpose(1, 2), mode,
                                         up(initial_state))
        if use_layer_norm:
            y = F.layer_norm(y, (d,), up(ln_weight), up(ln_bias), eps)
    if output_final_state:
        return y.to(out_dtype), carry  # carry: what the next piece of this sequence starts from
    return y.to(out_dtype)
