"""Triton kernels that fuse the layer's LayerNorm into the token passes (plain mixing, d_h < 128).

The LayerNorm normalises each token's output row over all d = H d_h channels, but the mixing
kernels (hyper_mixing_fwd.py, hyper_mixing_bwd.py) run one head per program. These kernels run
one (batch b, chunk of tokens) per program and loop over the heads inside it:

- `hmx_fwd_kernel_mix_ln` (grid [B, n_chunks]), per token tile: sweep 1 computes every head's
  Y_h = m (hid2_h C_h + c0_h) and merges the heads' row means and squared deviations (Chan's
  pairwise update: no E[y^2] - E[y]^2 cancellation); sweep 2 computes Y_h again and writes
  out = (Y - mean) rstd w + b in the output dtype. Y never goes to memory; (mean, rstd) [B, M, 2]
  fp32 are saved for the backward.
- `hmx_bwd_kernel_query_ln` (grid [B, n_chunks]): phase 1, per token tile and over all heads,
  recomputes Y, xhat = (Y - mean) rstd and g = d(out) w, and writes the row means mean(g),
  mean(g xhat) [B, M, 2] (a scratch the program reads back after a barrier); phase 2, per head,
  runs the query pass of hyper_mixing_bwd.py with dY = rstd (g - mean(g) - xhat mean(g xhat))
  formed on chip instead of loaded, and writes the LayerNorm weight and bias gradients of its
  tokens as per-(b, chunk) partials [B, n_chunks, d] (summed in a fixed order by
  hmx_bwd_finalize_weights).

Trade-off: the programs recompute Y (one fc1 product, the GELU and one C product per head and
token) once more in the forward and twice in the backward instead of writing fp32 Y and dY to
memory and reading them back: the passes are memory-bound at the recipe head sizes, and HBM traffic
drops by 4 x 4 bytes per channel and token in each direction (benchmarks/traffic.py). The grid
has B x n_chunks programs instead of B x H x n_chunks (the launcher raises n_chunks to fill the
GPU). At d_h 128 (autotune.SPLIT_BLOCK_D) the launcher keeps the unfused path.
Precision and scaling as in the mixing kernels; the statistics and dY are fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotuned
from .hyper_mixing_bwd import _BWD_LEN_ARGS, _query_tile
from .hyper_mixing_fwd import (_LEN_ARGS, _hidden, _load_fc1, _load_hyper_input, _load_square, _op, _select_rows,
                               _store_square)


@triton.jit
def _mix_operands(c_ptr, c0_ptr, cscale_ptr, slot, o_c, like_ptr, D_H: tl.constexpr, HAS_FC2_BIAS: tl.constexpr,
                  OPERAND: tl.constexpr, BLOCK_D: tl.constexpr):
    """C / c_scale of (b, h) row `slot` as a dot operand, c_scale, and c0 [BD] fp32 (0 without the bias)."""
    b_c = _op(_load_square(c_ptr + slot * D_H * D_H, o_c, D_H), like_ptr, OPERAND)
    c_scale = tl.load(cscale_ptr + slot)
    if HAS_FC2_BIAS:
        b_c0 = tl.load(c0_ptr + slot * D_H + o_c, mask=o_c < D_H, other=0.0)
    else:
        b_c0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    return b_c, c_scale, b_c0


@triton.jit
def _head_y(b_z, b_keep, b_fc1w, b_fc1b, b_c, c_scale, b_c0, like_ptr, OPERAND: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """One head's tile: (z as a dot operand, pre, hid2, Y = m (hid2 C + c0)) [BN, BD] (Y 0 in padded channels)."""
    b_zo, b_pre, b_hid = _hidden(b_z, b_fc1w, b_fc1b, like_ptr, OPERAND, DOT_PREC)
    # Y = m (hid2 C + c0): [BN, BD] @ [BD, BD] -> [BN, BD]
    b_y = tl.dot(_op(b_hid, like_ptr, OPERAND), b_c, input_precision=DOT_PREC) * c_scale
    return b_zo, b_pre, b_hid, (b_y + b_c0[None, :]) * b_keep[:, None]


@triton.jit
def _sweep_head_y(h, i_b, H, q_b, sxn, sxc, keep_b, smn, pe_ptr, freq_ptr, fc1w_ptr, fc1b_ptr, c_ptr, c0_ptr,
                  cscale_ptr, o_n, o_c, end, d, scale, first_pos, D_H: tl.constexpr, HAS_MASK: tl.constexpr,
                  PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr, HAS_FC2_BIAS: tl.constexpr,
                  OPERAND: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Head h's Y [BN, BD] on a token tile of batch row i_b, inside a sweep over the heads: loads the
    head's fc1 and (b, h)'s C, c0, builds z, returns (the head's channels, Y)."""
    i_h = i_b * 0 + h  # an int64 tensor (the loop variable is a plain int under the interpreter)
    b_fc1w, b_fc1b = _load_fc1(fc1w_ptr, fc1b_ptr, i_h, o_c, o_c, D_H, HAS_FC1_BIAS, OPERAND)
    b_c, c_scale, b_c0 = _mix_operands(c_ptr, c0_ptr, cscale_ptr, i_b * H + i_h, o_c, fc1w_ptr, D_H,
                                       HAS_FC2_BIAS, OPERAND, BLOCK_D)
    b_z, b_keep = _load_hyper_input(q_b, sxn, sxc, keep_b, smn, pe_ptr, freq_ptr, o_n, o_c, i_h * D_H,
                                    end, d, scale, first_pos, D_H, HAS_MASK, PE_TABLE)
    _, _, _, b_y = _head_y(b_z, b_keep, b_fc1w, b_fc1b, b_c, c_scale, b_c0, fc1w_ptr, OPERAND, DOT_PREC)
    return i_h * D_H + o_c, b_y


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC"], do_not_specialize=_LEN_ARGS)
def hmx_fwd_kernel_mix_ln(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr,  # MLP2 fc1: [H, d_h, d_h], [H, d_h]
    c_ptr, c0_ptr, cscale_ptr,  # [B*H, d_h, d_h] fp32 C / c_scale; [B*H, d_h] c0 (HAS_FC2_BIAS); [B*H] c_scale
    lnw_ptr, lnb_ptr,  # LayerNorm weight, bias [d]
    y_ptr, syb, syn,  # out: [B, M, d] in its own dtype (channel stride 1)
    stats_ptr,  # out: [B, M, 2] fp32 (mean, rstd) per token
    L, chunk_len, n_chunks, H, d, scale, first_pos, eps,
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    HAS_FC2_BIAS: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_chunk = tl.program_id(1)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D_H
    start = i_chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)
    q_b = q_ptr + i_b * sxb
    keep_b = mask_ptr + i_b * smb
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        m_n = o_n < end
        # sweep 1: row mean and sum of squared deviations over all heads (Chan's pairwise merge)
        mean = tl.zeros([BLOCK_N], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for h in range(0, H):
            ch, b_y = _sweep_head_y(h, i_b, H, q_b, sxn, sxc, keep_b, smn, pe_ptr, freq_ptr, fc1w_ptr, fc1b_ptr,
                                    c_ptr, c0_ptr, cscale_ptr, o_n, o_c, end, d, scale, first_pos, D_H, HAS_MASK,
                                    PE_TABLE, HAS_FC1_BIAS, HAS_FC2_BIAS, OPERAND, DOT_PREC, BLOCK_D)
            h_mean = tl.sum(b_y, axis=1) / D_H
            b_dev = tl.where(m_c[None, :], b_y - h_mean[:, None], 0.0)
            h_m2 = tl.sum(b_dev * b_dev, axis=1)
            n_a = (h * D_H) * 1.0  # channels merged so far
            n_ab = n_a + D_H
            delta = h_mean - mean
            mean += delta * (D_H / n_ab)
            m2 += h_m2 + delta * delta * (n_a * D_H / n_ab)
        rstd = 1.0 / tl.sqrt(m2 / d + eps)
        tl.store(stats_ptr + (i_b * L + o_n64) * 2, mean, mask=m_n)
        tl.store(stats_ptr + (i_b * L + o_n64) * 2 + 1, rstd, mask=m_n)
        # sweep 2: Y again, normalised, in the output dtype
        for h in range(0, H):
            ch, b_y = _sweep_head_y(h, i_b, H, q_b, sxn, sxc, keep_b, smn, pe_ptr, freq_ptr, fc1w_ptr, fc1b_ptr,
                                    c_ptr, c0_ptr, cscale_ptr, o_n, o_c, end, d, scale, first_pos, D_H, HAS_MASK,
                                    PE_TABLE, HAS_FC1_BIAS, HAS_FC2_BIAS, OPERAND, DOT_PREC, BLOCK_D)
            b_w = tl.load(lnw_ptr + ch, mask=m_c, other=0.0).to(tl.float32)
            b_b = tl.load(lnb_ptr + ch, mask=m_c, other=0.0).to(tl.float32)
            b_out = (b_y - mean[:, None]) * rstd[:, None] * b_w[None, :] + b_b[None, :]
            tl.store(y_ptr + i_b * syb + o_n64[:, None] * syn + ch[None, :], b_out.to(y_ptr.dtype.element_ty),
                     mask=m_n[:, None] & m_c[None, :])


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC"], do_not_specialize=_BWD_LEN_ARGS)
def hmx_bwd_kernel_query_ln(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,  # PE table [>= M, d] fp32, or frequencies [d] fp32
    fc1w_ptr, fc1b_ptr,  # MLP2 fc1: [H, d_h, d_h], [H, d_h]
    c_ptr, c0_ptr, cscale_ptr,  # [B*H, d_h, d_h] fp32 C / c_scale; [B*H, d_h] c0 (HAS_FC2_BIAS); [B*H] c_scale
    lnw_ptr,  # LayerNorm weight [d]
    stats_ptr,  # [B, M, 2] fp32 (mean, rstd): the forward's
    g_ptr, sgb, sgn,  # d(out) [B, M, d] (channel stride 1), the output's dtype
    rows_ptr,  # scratch [B, M, 2] fp32: mean(g), mean(g xhat) per token (phase 1 -> phase 2)
    dx_ptr, sdb,  # out: dquery [B, M, d] contiguous (row stride d), its own dtype
    t_part_ptr, sdy_part_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: T, sdy
    dfc1w_ptr, dfc1b_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: MLP2 fc1 grads
    dlnw_part_ptr, dlnb_part_ptr,  # out: [B, n_chunks, d] fp32: LayerNorm weight / bias gradient partials
    L, chunk_len, n_chunks, H, d, scale, first_pos,
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    HAS_FC2_BIAS: tl.constexpr, SCALE_TILES: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_chunk = tl.program_id(1)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D_H
    start = i_chunk * chunk_len
    end = tl.minimum(start + chunk_len, L)
    q_b = q_ptr + i_b * sxb
    keep_b = mask_ptr + i_b * smb
    # phase 1: mean(g) and mean(g xhat) over all d channels of every token of the chunk
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        m_n = o_n < end
        m_nc = m_n[:, None] & m_c[None, :]
        mean = tl.load(stats_ptr + (i_b * L + o_n64) * 2, mask=m_n, other=0.0)
        rstd = tl.load(stats_ptr + (i_b * L + o_n64) * 2 + 1, mask=m_n, other=0.0)
        sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
        sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
        for h in range(0, H):
            ch, b_y = _sweep_head_y(h, i_b, H, q_b, sxn, sxc, keep_b, smn, pe_ptr, freq_ptr, fc1w_ptr, fc1b_ptr,
                                    c_ptr, c0_ptr, cscale_ptr, o_n, o_c, end, d, scale, first_pos, D_H, HAS_MASK,
                                    PE_TABLE, HAS_FC1_BIAS, HAS_FC2_BIAS, OPERAND, DOT_PREC, BLOCK_D)
            b_xhat = tl.where(m_c[None, :], (b_y - mean[:, None]) * rstd[:, None], 0.0)
            b_w = tl.load(lnw_ptr + ch, mask=m_c, other=0.0).to(tl.float32)
            b_g = tl.load(g_ptr + i_b * sgb + o_n64[:, None] * sgn + ch[None, :], mask=m_nc,
                          other=0.0).to(tl.float32) * b_w[None, :]
            sum_g += tl.sum(b_g, axis=1)
            sum_gx += tl.sum(b_g * b_xhat, axis=1)
        tl.store(rows_ptr + (i_b * L + o_n64) * 2, sum_g / d, mask=m_n)
        tl.store(rows_ptr + (i_b * L + o_n64) * 2 + 1, sum_gx / d, mask=m_n)
    tl.debug_barrier()  # phase 2 reads rows other threads of this program wrote
    # phase 2: the query pass per head, with dY formed from d(out) on chip
    for h in range(0, H):
        i_h = i_b * 0 + h  # an int64 tensor (the loop variable is a plain int under the interpreter)
        slot = i_b * H + i_h
        ch = i_h * D_H + o_c
        b_fc1w, b_fc1b = _load_fc1(fc1w_ptr, fc1b_ptr, i_h, o_c, o_c, D_H, HAS_FC1_BIAS, OPERAND)
        b_c, c_scale, b_c0 = _mix_operands(c_ptr, c0_ptr, cscale_ptr, slot, o_c, fc1w_ptr, D_H,
                                           HAS_FC2_BIAS, OPERAND, BLOCK_D)
        b_w = tl.load(lnw_ptr + ch, mask=m_c, other=0.0).to(tl.float32)
        acc_t = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        acc_sdy = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_fc1w = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)  # in units of c_scale
        acc_fc1b = tl.zeros([BLOCK_D], dtype=tl.float32)  # in units of c_scale
        acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t in range(start, end, BLOCK_N):
            o_n = t + tl.arange(0, BLOCK_N)
            o_n64 = o_n.to(tl.int64)
            m_n = o_n < end
            m_nc = m_n[:, None] & m_c[None, :]
            b_z, b_keep = _load_hyper_input(q_b, sxn, sxc, keep_b, smn, pe_ptr, freq_ptr, o_n, o_c, i_h * D_H,
                                            end, d, scale, first_pos, D_H, HAS_MASK, PE_TABLE)
            b_zo, b_pre, b_hid, b_y = _head_y(b_z, b_keep, b_fc1w, b_fc1b, b_c, c_scale, b_c0, fc1w_ptr,
                                              OPERAND, DOT_PREC)
            mean = tl.load(stats_ptr + (i_b * L + o_n64) * 2, mask=m_n, other=0.0)
            rstd = tl.load(stats_ptr + (i_b * L + o_n64) * 2 + 1, mask=m_n, other=0.0)
            mean_g = tl.load(rows_ptr + (i_b * L + o_n64) * 2, mask=m_n, other=0.0)
            mean_gx = tl.load(rows_ptr + (i_b * L + o_n64) * 2 + 1, mask=m_n, other=0.0)
            b_xhat = tl.where(m_nc, (b_y - mean[:, None]) * rstd[:, None], 0.0)
            b_go = tl.load(g_ptr + i_b * sgb + o_n64[:, None] * sgn + ch[None, :], mask=m_nc, other=0.0).to(tl.float32)
            acc_dw += tl.sum(b_go * b_xhat, axis=0)
            acc_db += tl.sum(b_go, axis=0)
            b_dy = (b_go * b_w[None, :] - mean_g[:, None] - b_xhat * mean_gx[:, None]) * rstd[:, None]
            b_dy = _select_rows(tl.where(m_nc, b_dy, 0.0), b_keep)  # m dY
            acc_t, acc_sdy, acc_fc1w, acc_fc1b, b_dz, g_scale = _query_tile(
                acc_t, acc_sdy, acc_fc1w, acc_fc1b, b_dy, b_zo, b_pre, b_hid, b_c, b_fc1w, fc1w_ptr,
                SCALE_TILES, True, OPERAND, DOT_PREC)
            b_dx = b_dz * ((g_scale * c_scale * scale) * b_keep)[:, None]
            tl.store(dx_ptr + i_b * sdb + o_n64[:, None] * d + ch[None, :], b_dx.to(dx_ptr.dtype.element_ty),
                     mask=m_nc)
        i_part = slot * n_chunks + i_chunk
        _store_square(t_part_ptr + i_part * D_H * D_H, acc_t, o_c, D_H)
        tl.store(sdy_part_ptr + i_part * D_H + o_c, acc_sdy, mask=m_c)
        _store_square(dfc1w_ptr + i_part * D_H * D_H, acc_fc1w * c_scale, o_c, D_H)
        tl.store(dfc1b_ptr + i_part * D_H + o_c, acc_fc1b * c_scale, mask=m_c)
        i_ln = (i_b * n_chunks + i_chunk) * d + ch
        tl.store(dlnw_part_ptr + i_ln, acc_dw, mask=m_c)
        tl.store(dlnb_part_ptr + i_ln, acc_db, mask=m_c)
