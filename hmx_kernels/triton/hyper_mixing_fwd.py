"""Triton forward kernels of HyperMixing: two linear-time passes over the sequence.

Per (batch b, head h):
- state pass (`hmx_fwd_kernel_state`, grid [B*H, n_chunks]): each program streams the key tiles of
  one chunk of the sequence, builds the hypernetwork input Zk = s * key * m_k + PE on chip, runs
  MLP1 (fc1 -> GELU -> fc2) on the tile, masks the rows and accumulates P_c = W1^T V into an fp32
  [k_h, d_h] block. The launcher sums the <= 64 chunk partials in a fixed order (deterministic).
- mix pass (`hmx_fwd_kernel_mix`, grid [B*H, n_chunks]): streams query tiles, builds W2 rows on
  chip from Zq with MLP2 and writes Y = W2 @ GELU(P) for the head's d_h channels.
The LayerNorm is not part of these kernels: every fused backend applies it the same way
(hmx_kernels.fused: torch's LayerNorm in fp32 on the [B, M, d] output of the mix pass).
No [N, k_h] (W1, W2) or [N, d_h] hidden tensor reaches memory; the state kept between passes is
[B*H, n_chunks, k_h, d_h] fp32. Trade-off: the hypernetworks are evaluated on chip per tile, so
the backward recomputes them instead of reading them back (MLP2 in the query pass, MLP1 in the
key pass), trading FLOPs for O(N * k) memory and traffic.

Precision: every tile is upcast to fp32 on load and every tl.dot runs with
input_precision="ieee" (true fp32, no TF32), so fp16/bf16 inputs get fp32 arithmetic and fp32
inputs match the reference to ~1e-6 relative. This also sidesteps the interpreter's bf16 dot bug.
Block sizes are powers of two >= 16 (tl.dot's minimum); d_h and k_h are padded and masked.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .config import autotuned

# arguments whose value changes with the sequence length: never specialised, so a new length
# neither recompiles nor re-tunes
_LEN_ARGS = ["L", "chunk_len", "n_chunks", "sxb", "svb", "smb", "syb"]


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


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


@autotuned(key=["d_h", "k_h"], do_not_specialize=_LEN_ARGS)
def hmx_fwd_kernel_state(
    k_ptr, sxb, sxn, sxc,  # key [B, N, d]
    v_ptr, svb, svn, svc,  # value [B, N, d]
    mask_ptr, smb, smn,  # key keep vector [B, N] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr,  # MLP1: [H, d_h, d_h], [H, d_h], [H, k_h, d_h], [H, k_h]
    p_part_ptr,  # out: [B*H, n_chunks, k_h, d_h] fp32 partial P per chunk
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
    b_fc1w, b_fc1b, b_fc2w, b_fc2b = _load_mlp(fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, i_h, d_h, k_h,
                                               o_c, o_k, HAS_FC1_BIAS, HAS_FC2_BIAS)
    start = i_chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)
    b_p = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        b_z, b_x, b_keep = _load_hyper_input(k_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                             pe_ptr, freq_ptr, o_n, o_c, i_h * d_h, end, d_h, d,
                                             scale, first_pos, HAS_MASK, PE_TABLE)
        _, _, b_w1 = _mlp_fwd(b_z, b_fc1w, b_fc1b, b_fc2w, b_fc2b)
        b_w1 = b_w1 * b_keep[:, None]
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        b_v = tl.load(v_ptr + i_b * svb + o_n.to(tl.int64)[:, None] * svn + (i_h * d_h + o_c)[None, :] * svc,
                      mask=m_nc, other=0.0).to(tl.float32) * b_keep[:, None]
        # [BK, BN] @ [BN, BD] -> [BK, BD]
        b_p += tl.dot(tl.trans(b_w1), b_v, input_precision="ieee")
    p_base = p_part_ptr + (i_bh.to(tl.int64) * n_chunks + i_chunk) * k_h * d_h
    tl.store(p_base + o_k[:, None] * d_h + o_c[None, :], b_p, mask=(o_k < k_h)[:, None] & m_c[None, :])


@autotuned(key=["d_h", "k_h"], do_not_specialize=_LEN_ARGS)
def hmx_fwd_kernel_mix(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr,  # MLP2
    p_ptr,  # [B*H, k_h, d_h] fp32 summed state P
    y_ptr, syb, syn,  # out: Y [B, M, d] (channel stride 1)
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
    b_fc1w, b_fc1b, b_fc2w, b_fc2b = _load_mlp(fc1w_ptr, fc1b_ptr, fc2w_ptr, fc2b_ptr, i_h, d_h, k_h,
                                               o_c, o_k, HAS_FC1_BIAS, HAS_FC2_BIAS)
    b_a = _gelu(tl.load(p_ptr + i_bh.to(tl.int64) * k_h * d_h + o_k[:, None] * d_h + o_c[None, :],
                        mask=(o_k < k_h)[:, None] & m_c[None, :], other=0.0))  # [BK, BD]
    start = i_chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        b_z, b_x, b_keep = _load_hyper_input(q_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                             pe_ptr, freq_ptr, o_n, o_c, i_h * d_h, end, d_h, d,
                                             scale, first_pos, HAS_MASK, PE_TABLE)
        _, _, b_w2 = _mlp_fwd(b_z, b_fc1w, b_fc1b, b_fc2w, b_fc2b)
        b_w2 = b_w2 * b_keep[:, None]
        # [BN, BK] @ [BK, BD] -> [BN, BD]
        b_y = tl.dot(b_w2, b_a, input_precision="ieee")
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        tl.store(y_ptr + i_b * syb + o_n.to(tl.int64)[:, None] * syn + (i_h * d_h + o_c)[None, :],
                 b_y.to(y_ptr.dtype.element_ty), mask=m_nc)
