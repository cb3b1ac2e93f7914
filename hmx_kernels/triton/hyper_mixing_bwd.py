"""Triton backward kernels of HyperMixing, reassociated like the forward (k_h stays out of the
token loops; see hyper_mixing_fwd.py for S, sv, C, c0).

Per (batch b, head h), with dY the gradient of Y (here loaded: the LayerNorm has been
differentiated outside the kernel; layer_norm_fused.py's query pass forms it on chip instead), m
the keep masks and V_t = v_t m_t:
    T = sum_t m_t hid2_t^T dY_t [d_h, d_h],  sdy = sum_t m_t dY_t
    dA = fc2_2 T + b2_2 sdy^T,  dfc2_2 = A T^T,  db2_2 = A sdy          (finalize, [k_h, d_h])
    dhid2_t = m_t dY_t C^T                                               (query pass, per token)
    dP = dA * GELU'(P),  R = fc2^T dP [d_h, d_h],  r0 = b2^T dP          (finalize)
    dV_t = m_t (m_t hid_t R + m_t r0),  dhid_t = m_t V_t R^T             (key pass, per token)
    dfc2 = dP S^T,  db2 = dP sv                                          (finalize, S re-accumulated)
and per generator the fc1/GELU chain on each tile: dpre = dhid * GELU'(pre), dfc1 = sum dpre^T z,
db1 = sum dpre, dz = dpre fc1, dx = s m dz.
- query pass (`hmx_bwd_kernel_query`, grid [B*H, n_chunks]): recomputes hid2 per query tile,
  accumulates T, sdy and the fc1 gradients of MLP2, writes dquery. Five tile products:
  z fc1^T, hid2^T dY, dY C^T, dpre^T z, dpre fc1.
- key pass (`hmx_bwd_kernel_key`, grid [B*H, n_chunks]): recomputes hid per key tile, accumulates
  S, sv (for dfc2, db2: the op saves only P) and the fc1 gradients of MLP1, writes dvalue and
  dkey. Six tile products: z fc1^T, hid^T V, hid R, V R^T, dpre^T z, dpre fc1. ADD_DQ
  (self-mixing, query is key is value: the layer ops): it reads the query pass's fp32 dquery and
  writes the one token gradient dq + dk + dv in the tokens' dtype instead of dkey and dvalue.
- from d_h 128 on (autotune.SPLIT_BLOCK_D), T and sdy come from a pass of their own
  (`hmx_bwd_kernel_tsum`: the forward's state program on query and dY, rows split) and S, sv from
  the forward's state pass run again; the query and key passes then hold one [D, D] accumulator
  (the fc1 gradient) instead of two (ACC_T / ACC_S False), which is what keeps them spill-free.
- finalize (the finalize kernels, finalize.py; torch in launch.py at d_h 128): the [k_h, d_h] products above, on the chunk
  partials summed in a fixed order.
Mixing blocks (BLOCKED, see hyper_mixing_fwd.py): a program covers a piece of one block and reads
that block's C_j (query pass) or R_i, r0_i (key pass); its partials are summed per block by the
launcher.
Every reduction over tokens is written as per-program fp32 partials [D, D] / [D] that the launcher
sums in a fixed order: no atomics, so two runs give bitwise equal gradients.
Trade-off: hid and hid2 are recomputed (fc1 + GELU per token and pass) instead of being stored, and
the key pass re-accumulates S (one [D, BN] @ [BN, D] product per tile) instead of the forward
saving it, so that the op's saved state stays P.

Precision as in the forward. Half operands stay in fp16's range: C and R arrive divided by a power
of two per (b, h) (C_SCALE, R_SCALE applied back in fp32; everything downstream of them is linear
in them), and with SCALE_TILES (fp16 inputs) each dY tile is divided by the power of two of its
largest element before it is rounded, so small gradients do not flush to fp16 zero.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotuned
from .hyper_mixing_fwd import (_LEN_ARGS, _gelu_grad, _hidden, _load_fc1, _load_hyper_input, _load_square,
                               _op, _piece, _pow2_of_max, _select_rows, _state_program, _store_square)

_BWD_LEN_ARGS = _LEN_ARGS + ["sgb", "sdb"]


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC", "ROW_SPLIT", "BLOCKED"], do_not_specialize=_BWD_LEN_ARGS)
def hmx_bwd_kernel_tsum(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    g_ptr, sgb, sgn,  # dY [B, M, d] fp32 (channel stride 1)
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr,  # MLP2 fc1: [H, d_h, d_h], [H, d_h]
    t_part_ptr, sdy_part_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: T, sdy
    L, chunk_len, n_chunks, H, d, scale, first_pos,
    pieces_ptr, n_blocks,  # BLOCKED: piece table [n_pieces, 4] int32, block slots per (b, h)
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    SCALE_TILES: tl.constexpr, ROW_SPLIT: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """T = sum_t m hid2_t^T dY_t and sdy = sum_t m dY_t per chunk (BLOCKED: per piece), for the
    head sizes at which the query pass leaves them out (ACC_T = False): the forward's state
    program on (query, dY) instead of (key, value), rows of T split over ROW_SPLIT programs."""
    _state_program(q_ptr, sxb, sxn, sxc, g_ptr, sgb, sgn, 1, mask_ptr, smb, smn, pe_ptr, freq_ptr,
                   fc1w_ptr, fc1b_ptr, t_part_ptr, sdy_part_ptr, L, chunk_len, n_chunks, H, d, scale,
                   first_pos, pieces_ptr, n_blocks, D_H, HAS_MASK, PE_TABLE, HAS_FC1_BIAS, SCALE_TILES,
                   ROW_SPLIT, OPERAND, DOT_PREC, BLOCKED, BLOCK_N, BLOCK_D)


@triton.jit
def _query_tile(acc_t, acc_sdy, acc_fc1w, acc_fc1b, b_dy, b_zo, b_pre, b_hid, b_c, b_fc1w, like_ptr,
                SCALE_TILES: tl.constexpr, ACC_T: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr):
    """The query pass on one tile of m dY [BN, BD] fp32 (hmx_bwd_kernel_query, and the LayerNorm-fused
    pass, which forms dY on chip): T, sdy (ACC_T) and MLP2's fc1 gradients (in units of c_scale)
    accumulated, and dz = dpre fc1 with the tile's scale g_scale (dquery = dz g_scale c_scale s m).
    SCALE_TILES: the tile is divided by the power of two of its largest element before it is rounded
    to a half operand."""
    if SCALE_TILES:
        g_scale = _pow2_of_max(b_dy)
    else:
        g_scale = 1.0
    b_dyo = _op(b_dy / g_scale, like_ptr, OPERAND)
    if ACC_T:
        # T += hid2^T (m dY): [BD, BN] @ [BN, BD] -> [BD, BD]
        acc_t += tl.dot(tl.trans(_op(b_hid, like_ptr, OPERAND)), b_dyo, input_precision=DOT_PREC) * g_scale
        acc_sdy += tl.sum(b_dy, axis=0)
    # dhid2 = m dY C^T (units g_scale * c_scale): [BN, BD] @ [BD, BD] -> [BN, BD]
    b_dpre = tl.dot(b_dyo, tl.trans(b_c), input_precision=DOT_PREC) * _gelu_grad(b_pre)
    b_dpreo = _op(b_dpre, like_ptr, OPERAND)
    # dfc1 += dpre^T z: [BD(out), BN] @ [BN, BD(in)] -> [BD(out), BD(in)]
    acc_fc1w += tl.dot(tl.trans(b_dpreo), b_zo, input_precision=DOT_PREC) * g_scale
    acc_fc1b += tl.sum(b_dpre, axis=0) * g_scale
    # dz = dpre fc1: [BN, BD(out)] @ [BD(out), BD(in)] -> [BN, BD(in)]
    b_dz = tl.dot(b_dpreo, b_fc1w, input_precision=DOT_PREC)
    return acc_t, acc_sdy, acc_fc1w, acc_fc1b, b_dz, g_scale


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC", "BLOCKED"], do_not_specialize=_BWD_LEN_ARGS)
def hmx_bwd_kernel_query(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,  # PE table [>= M, d] fp32, or frequencies [d] fp32
    fc1w_ptr, fc1b_ptr,  # MLP2 fc1: [H, d_h, d_h], [H, d_h]
    c_ptr, cscale_ptr,  # [B*H, d_h, d_h] fp32 C / c_scale, C = fc2_2^T A; [B*H] fp32 c_scale
    g_ptr, sgb, sgn,  # dY [B, M, d] fp32 (channel stride 1)
    dx_ptr, sdb,  # out: dquery [B, M, d] fp32 contiguous (row stride d)
    t_part_ptr, sdy_part_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: T, sdy
    dfc1w_ptr, dfc1b_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: MLP2 fc1 grads
    L, chunk_len, n_chunks, H, d, scale, first_pos,
    pieces_ptr, n_blocks,  # BLOCKED: piece table [n_pieces, 4] int32, block slots per (b, h)
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    SCALE_TILES: tl.constexpr, ACC_T: tl.constexpr,  # ACC_T False: T, sdy left to hmx_bwd_kernel_tsum
    OPERAND: tl.constexpr, DOT_PREC: tl.constexpr, BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if BLOCKED:
        i_bh = tl.program_id(1)
        i_chunk = tl.program_id(0)
    else:
        i_bh = tl.program_id(0)
        i_chunk = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    i_slot = i_bh64  # the per-(b, h) operands' row; BLOCKED: per block
    if BLOCKED:
        start, end, pe_ptr, first_pos, i_slot = _piece(pieces_ptr, i_chunk, pe_ptr, first_pos, d, i_bh64, n_blocks)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D_H
    b_fc1w, b_fc1b = _load_fc1(fc1w_ptr, fc1b_ptr, i_h, o_c, o_c, D_H, HAS_FC1_BIAS, OPERAND)
    b_c = _op(_load_square(c_ptr + i_slot * D_H * D_H, o_c, D_H), fc1w_ptr, OPERAND)
    c_scale = tl.load(cscale_ptr + i_slot)
    acc_t = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_sdy = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_fc1w = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)  # in units of c_scale
    acc_fc1b = tl.zeros([BLOCK_D], dtype=tl.float32)  # in units of c_scale
    if not BLOCKED:
        start = i_chunk * chunk_len
        end = tl.minimum(start + chunk_len, L)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        b_z, b_keep = _load_hyper_input(q_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                        pe_ptr, freq_ptr, o_n, o_c, i_h * D_H, end, d, scale,
                                        first_pos, D_H, HAS_MASK, PE_TABLE)
        b_zo, b_pre, b_hid = _hidden(b_z, b_fc1w, b_fc1b, fc1w_ptr, OPERAND, DOT_PREC)
        b_dy = _select_rows(tl.load(g_ptr + i_b * sgb + o_n64[:, None] * sgn + (i_h * D_H + o_c)[None, :],
                                    mask=m_nc, other=0.0).to(tl.float32), b_keep)  # m dY
        acc_t, acc_sdy, acc_fc1w, acc_fc1b, b_dz, g_scale = _query_tile(
            acc_t, acc_sdy, acc_fc1w, acc_fc1b, b_dy, b_zo, b_pre, b_hid, b_c, b_fc1w, fc1w_ptr,
            SCALE_TILES, ACC_T, OPERAND, DOT_PREC)
        b_dx = b_dz * ((g_scale * c_scale * scale) * b_keep)[:, None]
        tl.store(dx_ptr + i_b * sdb + o_n64[:, None] * d + (i_h * D_H + o_c)[None, :], b_dx, mask=m_nc)
    i_part = i_bh64 * n_chunks + i_chunk
    if ACC_T:
        _store_square(t_part_ptr + i_part * D_H * D_H, acc_t, o_c, D_H)
        tl.store(sdy_part_ptr + i_part * D_H + o_c, acc_sdy, mask=m_c)
    _store_square(dfc1w_ptr + i_part * D_H * D_H, acc_fc1w * c_scale, o_c, D_H)
    tl.store(dfc1b_ptr + i_part * D_H + o_c, acc_fc1b * c_scale, mask=m_c)


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC", "BLOCKED"], do_not_specialize=_BWD_LEN_ARGS)
def hmx_bwd_kernel_key(
    k_ptr, sxb, sxn, sxc,  # key [B, N, d]
    v_ptr, svb, svn, svc,  # value [B, N, d]
    mask_ptr, smb, smn,  # key keep vector [B, N] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr,  # MLP1 fc1: [H, d_h, d_h], [H, d_h]
    r_ptr, r0_ptr, rscale_ptr,  # [B*H, d_h, d_h] fp32 R / r_scale, R = fc2^T dP; [B*H, d_h] r0 = b2^T dP
                                # (read if HAS_FC2_BIAS); [B*H] fp32 r_scale
    dk_ptr, dv_ptr, sdb,  # out: dkey, dvalue [B, N, d] contiguous (row stride d), their own dtype
    s_part_ptr, sv_part_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: S, sv
    dfc1w_ptr, dfc1b_ptr,  # out: [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32: MLP1 fc1 grads
    L, chunk_len, n_chunks, H, d, scale, first_pos,
    pieces_ptr, n_blocks,  # BLOCKED: piece table [n_pieces, 4] int32, block slots per (b, h)
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    HAS_FC2_BIAS: tl.constexpr, ACC_S: tl.constexpr,  # ACC_S False: S, sv left to hmx_fwd_kernel_state
    OPERAND: tl.constexpr, DOT_PREC: tl.constexpr, BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    dq_ptr=None,  # ADD_DQ: dquery [B, N, d] fp32, same layout as dkey (self-mixing: query is key is value)
    ADD_DQ: tl.constexpr = False,  # write dx = dq + dk + dv to dk_ptr (one gradient, no dv), not dk and dv
):
    if BLOCKED:
        i_bh = tl.program_id(1)
        i_chunk = tl.program_id(0)
    else:
        i_bh = tl.program_id(0)
        i_chunk = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_bh64 = i_bh.to(tl.int64)
    i_slot = i_bh64  # the per-(b, h) operands' row; BLOCKED: per block
    if BLOCKED:
        start, end, pe_ptr, first_pos, i_slot = _piece(pieces_ptr, i_chunk, pe_ptr, first_pos, d, i_bh64, n_blocks)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D_H
    b_fc1w, b_fc1b = _load_fc1(fc1w_ptr, fc1b_ptr, i_h, o_c, o_c, D_H, HAS_FC1_BIAS, OPERAND)
    b_r = _op(_load_square(r_ptr + i_slot * D_H * D_H, o_c, D_H), fc1w_ptr, OPERAND)
    r_scale = tl.load(rscale_ptr + i_slot)
    if HAS_FC2_BIAS:
        b_r0 = tl.load(r0_ptr + i_slot * D_H + o_c, mask=m_c, other=0.0)
    else:
        b_r0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    acc_sv = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_fc1w = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)  # in units of r_scale
    acc_fc1b = tl.zeros([BLOCK_D], dtype=tl.float32)  # in units of r_scale
    if not BLOCKED:
        start = i_chunk * chunk_len
        end = tl.minimum(start + chunk_len, L)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        o_n64 = o_n.to(tl.int64)
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        b_z, b_keep = _load_hyper_input(k_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                        pe_ptr, freq_ptr, o_n, o_c, i_h * D_H, end, d, scale,
                                        first_pos, D_H, HAS_MASK, PE_TABLE)
        b_zo, b_pre, b_hid = _hidden(b_z, b_fc1w, b_fc1b, fc1w_ptr, OPERAND, DOT_PREC)
        b_v = _select_rows(tl.load(v_ptr + i_b * svb + o_n64[:, None] * svn + (i_h * D_H + o_c)[None, :] * svc,
                                   mask=m_nc, other=0.0).to(tl.float32), b_keep)  # V = v m
        b_vo = _op(b_v, fc1w_ptr, OPERAND)
        b_hmo = _op(b_hid * b_keep[:, None], fc1w_ptr, OPERAND)
        if ACC_S:
            # S += (m hid)^T V: [BD, BN] @ [BN, BD] -> [BD, BD]
            acc_s += tl.dot(tl.trans(b_hmo), b_vo, input_precision=DOT_PREC)
            acc_sv += tl.sum(b_v * b_keep[:, None], axis=0)
        # dV = m (m hid R + m r0): [BN, BD] @ [BD, BD] -> [BN, BD]
        b_dv = tl.dot(b_hmo, b_r, input_precision=DOT_PREC) * r_scale + b_keep[:, None] * b_r0[None, :]
        b_dv = b_dv * b_keep[:, None]
        # dhid = m V R^T (units r_scale): [BN, BD] @ [BD, BD] -> [BN, BD]
        b_dpre = tl.dot(b_vo, tl.trans(b_r), input_precision=DOT_PREC) * (b_keep[:, None] * _gelu_grad(b_pre))
        b_dpreo = _op(b_dpre, fc1w_ptr, OPERAND)
        # dfc1 += dpre^T z: [BD(out), BN] @ [BN, BD(in)] -> [BD(out), BD(in)]
        acc_fc1w += tl.dot(tl.trans(b_dpreo), b_zo, input_precision=DOT_PREC)
        acc_fc1b += tl.sum(b_dpre, axis=0)
        # dz = dpre fc1: [BN, BD(out)] @ [BD(out), BD(in)] -> [BN, BD(in)]
        b_dz = tl.dot(b_dpreo, b_fc1w, input_precision=DOT_PREC)
        b_dk = b_dz * ((r_scale * scale) * b_keep)[:, None]
        o_out = i_b * sdb + o_n64[:, None] * d + (i_h * D_H + o_c)[None, :]
        if ADD_DQ:
            b_dq = tl.load(dq_ptr + o_out, mask=m_nc, other=0.0)
            tl.store(dk_ptr + o_out, (b_dq + b_dk + b_dv).to(dk_ptr.dtype.element_ty), mask=m_nc)
        else:
            tl.store(dk_ptr + o_out, b_dk.to(dk_ptr.dtype.element_ty), mask=m_nc)
            tl.store(dv_ptr + o_out, b_dv.to(dv_ptr.dtype.element_ty), mask=m_nc)
    i_part = i_bh64 * n_chunks + i_chunk
    if ACC_S:
        _store_square(s_part_ptr + i_part * D_H * D_H, acc_s, o_c, D_H)
        tl.store(sv_part_ptr + i_part * D_H + o_c, acc_sv, mask=m_c)
    _store_square(dfc1w_ptr + i_part * D_H * D_H, acc_fc1w * r_scale, o_c, D_H)
    tl.store(dfc1b_ptr + i_part * D_H + o_c, acc_fc1b * r_scale, mask=m_c)
