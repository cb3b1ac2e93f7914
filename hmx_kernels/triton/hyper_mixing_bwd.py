"""Triton backward kernels of HyperMixing, fused like the forward (linear time, no [N, k] tensors).

Per (batch b, head h), with dY the gradient of Y (the LayerNorm, applied by torch outside these
kernels, has already been differentiated by autograd):
- query pass (`hmx_bwd_kernel_query`, grid [B*H, n_chunks]): recomputes W2 per query tile
  (MLP2 on chip), accumulates the chunk's partial dA = W2^T dY [k_h, d_h], forms
  dW2 = dY A^T * m_q, back-propagates it through MLP2 (weight gradients accumulated per program)
  and writes dquery = s * m_q * dZq.
- key pass (`hmx_bwd_kernel_key`, grid [B*H, n_chunks]): with dP = dA * GELU'(P) (tiny, computed
  by the launcher), recomputes W1 per key tile, writes dvalue = m_k * (W1 dP), forms
  dW1 = m_k * (V dP^T), back-propagates it through MLP1 and writes dkey = s * m_k * dZk.
Every reduction over tokens (dA and all weight gradients) is written as per-program fp32 partials
that the launcher sums in a fixed order: no atomics, so two runs give bitwise equal gradients.
Trade-off: W1/W2 and the hidden activations are recomputed (one extra hypernetwork evaluation per
token and pass) instead of being stored (O(N * k) memory).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .config import autotuned
from .hyper_mixing_fwd import _LEN_ARGS, _gelu, _gelu_grad

_BWD_LEN_ARGS = _LEN_ARGS + ["sgb", "sgn", "sdb"]


@triton.jit
def _load_hyper_input(
    x_ptr,  # tokens of batch b: [L, d] with strides (sxn, sxc)
    sxn, sxc,
    mask_ptr,  # keep vector of batch b: [L] fp32 (1 = kept, 0 = padded), stride smn
    smn,
    pe_ptr,  # PE table [>= L, d] fp32 contiguous (PE_TABLE) ...
    freq_ptr,  # ... or per-channel angular frequency [d] fp32 (sin even / cos odd channels)
    o_n,  # [BLOCK_N] token indices
    o_c,  # [BLOCK_D] channel indices inside the head
    ch0,  # first channel of the head
    L, d_h, d, scale, first_pos,
    HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr,
):
    """Zk/Zq tile = scale * x * m + PE, the masked token tile x * m, and the row mask m (fp32)."""
    m_n = o_n < L
    m_c = o_c < d_h
    m_nc = m_n[:, None] & m_c[None, :]
    o_n64 = o_n.to(tl.int64)
    b_x = tl.load(x_ptr + o_n64[:, None] * sxn + (ch0 + o_c)[None, :] * sxc, mask=m_nc, other=0.0).to(tl.float32)
    if HAS_MASK:
        b_keep = tl.load(mask_ptr + o_n64 * smn, mask=m_n, other=0.0).to(tl.float32)
    else:
        b_keep = tl.where(m_n, 1.0, 0.0)
    b_x = b_x * b_keep[:, None]
    if PE_TABLE:
        b_pe = tl.load(pe_ptr + o_n64[:, None] * d + (ch0 + o_c)[None, :], mask=m_nc, other=0.0)
    else:
        b_freq = tl.load(freq_ptr + ch0 + o_c, mask=m_c, other=0.0)
        b_ang = (o_n + first_pos).to(tl.float32)[:, None] * b_freq[None, :]  # fp32 product, as the table
        even = ((ch0 + o_c) % 2) == 0
        b_pe = tl.where(even[None, :], tl.sin(b_ang), tl.cos(b_ang))
    b_z = tl.where(m_nc, scale * b_x + b_pe, 0.0)
    return b_z, b_x, b_keep


@triton.jit
def _load_mlp(fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, i_h, d_h, k_h, o_c, o_k,
              HAS_FC1_BIAS: tl.constexpr, HAS_FC2_BIAS: tl.constexpr):
    """One head's generator MLP as zero-padded fp32 blocks: fc1 [BD(out), BD(in)], fc2 [BK, BD]."""
    m_c = o_c < d_h
    m_k = o_k < k_h
    i_h64 = i_h.to(tl.int64)
    b_fc1w = tl.load(fc1w_ptr + i_h64 * d_h * d_h + o_c[:, None] * d_h + o_c[None, :],
                     mask=m_c[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    b_fc2w = tl.load(fc2w_ptr + i_h64 * k_h * d_h + o_k[:, None] * d_h + o_c[None, :],
                     mask=m_k[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    if HAS_FC1_BIAS:
        b_fc1b = tl.load(fc1b_ptr + i_h64 * d_h + o_c, mask=m_c, other=0.0).to(tl.float32)
    else:
        b_fc1b = tl.zeros([o_c.shape[0]], dtype=tl.float32)
    if HAS_FC2_BIAS:
        b_fc2b = tl.load(fc2b_ptr + i_h64 * k_h + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        b_fc2b = tl.zeros([o_k.shape[0]], dtype=tl.float32)
    return b_fc1w, b_fc1b, b_fc2w, b_fc2b


@triton.jit
def _mlp_fwd(b_z, b_fc1w, b_fc1b, b_fc2w, b_fc2b):
    """Generator MLP on a tile: pre = z fc1^T + b1, hid = GELU(pre), w = hid fc2^T + b2."""
    # [BN, BD] @ [BD(in), BD(out)] -> [BN, BD]
    b_pre = tl.dot(b_z, tl.trans(b_fc1w), input_precision="ieee") + b_fc1b[None, :]
    b_hid = _gelu(b_pre)
    # [BN, BD] @ [BD, BK] -> [BN, BK]
    b_w = tl.dot(b_hid, tl.trans(b_fc2w), input_precision="ieee") + b_fc2b[None, :]
    return b_pre, b_hid, b_w


@triton.jit
def _mlp_bwd(b_dw, b_z, b_pre, b_hid, b_fc1w, b_fc2w):
    """Back-propagate dW [BN, BK] (already row-masked) through fc2 -> GELU -> fc1 on one tile."""
    # [BK, BN] @ [BN, BD] -> [BK, BD]
    d_fc2w = tl.dot(tl.trans(b_dw), b_hid, input_precision="ieee")
    d_fc2b = tl.sum(b_dw, axis=0)
    # [BN, BK] @ [BK, BD] -> [BN, BD]
    b_dhid = tl.dot(b_dw, b_fc2w, input_precision="ieee")
    b_dpre = b_dhid * _gelu_grad(b_pre)
    # [BD(out), BN] @ [BN, BD(in)] -> [BD(out), BD(in)]
    d_fc1w = tl.dot(tl.trans(b_dpre), b_z, input_precision="ieee")
    d_fc1b = tl.sum(b_dpre, axis=0)
    # [BN, BD(out)] @ [BD(out), BD(in)] -> [BN, BD(in)]
    b_dz = tl.dot(b_dpre, b_fc1w, input_precision="ieee")
    return b_dz, d_fc1w, d_fc1b, d_fc2w, d_fc2b


@triton.jit
def _store_mlp_partials(dfc1w_ptr, dfc1b_ptr, dfc2w_ptr, dfc2b_ptr, i_part, d_h, k_h, o_c, o_k,
                        acc_fc1w, acc_fc1b, acc_fc2w, acc_fc2b):
    """Store one program's weight-gradient partials at slot i_part of the partial buffers."""
    m_c = o_c < d_h
    m_k = o_k < k_h
    tl.store(dfc1w_ptr + i_part * d_h * d_h + o_c[:, None] * d_h + o_c[None, :], acc_fc1w,
             mask=m_c[:, None] & m_c[None, :])
    tl.store(dfc1b_ptr + i_part * d_h + o_c, acc_fc1b, mask=m_c)
    tl.store(dfc2w_ptr + i_part * k_h * d_h + o_k[:, None] * d_h + o_c[None, :], acc_fc2w,
             mask=m_k[:, None] & m_c[None, :])
    tl.store(dfc2b_ptr + i_part * k_h + o_k, acc_fc2b, mask=m_k)


@autotuned(key=["d_h", "k_h"], do_not_specialize=_BWD_LEN_ARGS)
def hmx_bwd_kernel_query(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr,  # MLP2
    p_ptr,  # [B*H, k_h, d_h] fp32 state P
    g_ptr, sgb, sgn,  # dY [B, M, d] (channel stride 1; any float dtype)
    dx_ptr, sdb,  # out: dquery from the MLP2 path [B, M, d] fp32 contiguous (row stride d)
    da_part_ptr,  # out: [B*H, n_chunks, k_h, d_h] fp32
    dfc1w_ptr, dfc1b_ptr, dfc2w_ptr, dfc2b_ptr,  # out: [B*H*n_chunks, (d_h, d_h) | d_h | (k_h, d_h) | k_h]
    L, chunk_len, n_chunks, H, d_h, k_h, d, scale, first_pos,
    HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr, HAS_FC2_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_chunk = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_c = tl.arange(0, BLOCK_D)
    o_k = tl.arange(0, BLOCK_K)
    m_c = o_c < d_h
    m_kc = (o_k < k_h)[:, None] & m_c[None, :]
    b_fc1w, b_fc1b, b_fc2w, b_fc2b = _load_mlp(fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, i_h, d_h, k_h,
                                               o_c, o_k, HAS_FC1_BIAS, HAS_FC2_BIAS)
    b_a = _gelu(tl.load(p_ptr + i_bh.to(tl.int64) * k_h * d_h + o_k[:, None] * d_h + o_c[None, :],
                        mask=m_kc, other=0.0))  # [BK, BD]
    acc_da = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc_fc1w = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_fc1b = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_fc2w = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc_fc2b = tl.zeros([BLOCK_K], dtype=tl.float32)
    start = i_chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        b_z, b_x, b_keep = _load_hyper_input(q_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                             pe_ptr, freq_ptr, o_n, o_c, i_h * d_h, end, d_h, d,
                                             scale, first_pos, HAS_MASK, PE_TABLE)
        b_pre, b_hid, b_w2 = _mlp_fwd(b_z, b_fc1w, b_fc1b, b_fc2w, b_fc2b)
        b_w2 = b_w2 * b_keep[:, None]
        b_dy = tl.load(g_ptr + i_b * sgb + o_n64[:, None] * sgn + (i_h * d_h + o_c)[None, :],
                       mask=m_nc, other=0.0).to(tl.float32)
        # [BK, BN] @ [BN, BD] -> [BK, BD]
        acc_da += tl.dot(tl.trans(b_w2), b_dy, input_precision="ieee")
        # [BN, BD] @ [BD, BK] -> [BN, BK]
        b_dw2 = tl.dot(b_dy, tl.trans(b_a), input_precision="ieee") * b_keep[:, None]
        b_dz, d_fc1w, d_fc1b, d_fc2w, d_fc2b = _mlp_bwd(b_dw2, b_z, b_pre, b_hid, b_fc1w, b_fc2w)
        acc_fc1w += d_fc1w
        acc_fc1b += d_fc1b
        acc_fc2w += d_fc2w
        acc_fc2b += d_fc2b
        b_dx = b_dz * (scale * b_keep)[:, None]
        tl.store(dx_ptr + i_b * sdb + o_n64[:, None] * d + (i_h * d_h + o_c)[None, :], b_dx, mask=m_nc)
    i_part = i_bh.to(tl.int64) * n_chunks + i_chunk
    tl.store(da_part_ptr + i_part * k_h * d_h + o_k[:, None] * d_h + o_c[None, :], acc_da, mask=m_kc)
    _store_mlp_partials(dfc1w_ptr, dfc1b_ptr, dfc2w_ptr, dfc2b_ptr, i_part, d_h, k_h, o_c, o_k,
                        acc_fc1w, acc_fc1b, acc_fc2w, acc_fc2b)


@autotuned(key=["d_h", "k_h"], do_not_specialize=_BWD_LEN_ARGS)
def hmx_bwd_kernel_key(
    k_ptr, sxb, sxn, sxc,  # key [B, N, d]
    v_ptr, svb, svn, svc,  # value [B, N, d]
    mask_ptr, smb, smn,  # key keep vector [B, N] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr,  # MLP1
    dp_ptr,  # [B*H, k_h, d_h] fp32 dP = dA * GELU'(P)
    dk_ptr, dv_ptr, sdb,  # out: dkey, dvalue [B, N, d] fp32 contiguous (row stride d)
    dfc1w_ptr, dfc1b_ptr, dfc2w_ptr, dfc2b_ptr,  # out: partials as in hmx_bwd_kernel_query
    L, chunk_len, n_chunks, H, d_h, k_h, d, scale, first_pos,
    HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr, HAS_FC2_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_chunk = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    o_c = tl.arange(0, BLOCK_D)
    o_k = tl.arange(0, BLOCK_K)
    m_c = o_c < d_h
    m_kc = (o_k < k_h)[:, None] & m_c[None, :]
    b_fc1w, b_fc1b, b_fc2w, b_fc2b = _load_mlp(fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, i_h, d_h, k_h,
                                               o_c, o_k, HAS_FC1_BIAS, HAS_FC2_BIAS)
    b_dp = tl.load(dp_ptr + i_bh.to(tl.int64) * k_h * d_h + o_k[:, None] * d_h + o_c[None, :],
                   mask=m_kc, other=0.0)  # [BK, BD]
    acc_fc1w = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_fc1b = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_fc2w = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc_fc2b = tl.zeros([BLOCK_K], dtype=tl.float32)
    start = i_chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        b_z, b_x, b_keep = _load_hyper_input(k_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                             pe_ptr, freq_ptr, o_n, o_c, i_h * d_h, end, d_h, d,
                                             scale, first_pos, HAS_MASK, PE_TABLE)
        b_pre, b_hid, b_w1 = _mlp_fwd(b_z, b_fc1w, b_fc1b, b_fc2w, b_fc2b)
        b_w1 = b_w1 * b_keep[:, None]
        b_v = tl.load(v_ptr + i_b * svb + o_n64[:, None] * svn + (i_h * d_h + o_c)[None, :] * svc,
                      mask=m_nc, other=0.0).to(tl.float32) * b_keep[:, None]
        # dV = W1 dP: [BN, BK] @ [BK, BD] -> [BN, BD]
        b_dv = tl.dot(b_w1, b_dp, input_precision="ieee") * b_keep[:, None]
        # dW1 = V dP^T: [BN, BD] @ [BD, BK] -> [BN, BK]
        b_dw1 = tl.dot(b_v, tl.trans(b_dp), input_precision="ieee") * b_keep[:, None]
        b_dz, d_fc1w, d_fc1b, d_fc2w, d_fc2b = _mlp_bwd(b_dw1, b_z, b_pre, b_hid, b_fc1w, b_fc2w)
        acc_fc1w += d_fc1w
        acc_fc1b += d_fc1b
        acc_fc2w += d_fc2w
        acc_fc2b += d_fc2b
        b_dk = b_dz * (scale * b_keep)[:, None]
        o_out = i_b * sdb + o_n64[:, None] * d + (i_h * d_h + o_c)[None, :]
        tl.store(dk_ptr + o_out, b_dk, mask=m_nc)
        tl.store(dv_ptr + o_out, b_dv, mask=m_nc)
    i_part = i_bh.to(tl.int64) * n_chunks + i_chunk
    _store_mlp_partials(dfc1w_ptr, dfc1b_ptr, dfc2w_ptr, dfc2b_ptr, i_part, d_h, k_h, o_c, o_k,
                        acc_fc1w, acc_fc1b, acc_fc2w, acc_fc2b)
