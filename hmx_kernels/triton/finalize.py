"""Finalize kernels of the Triton backend: the per-(b, h) work between the token passes, one
launch each instead of a chain of small torch ops (launch.py, plain mixing).

Reassociated form (docs/HYPERMIXING.md; S, T are d_h x d_h token sums of the passes):
- `hmx_fwd_finalize` (grid B*H): S, sv = fixed-order sums of the state pass's chunk partials;
  per k-block of BLOCK_K rows: P = fc2 S + b2 sv^T (written: the op's saved state), A = GELU(P),
  C += fc2_2^T A, c0 += b2_2^T A; then C / 2^e with 2^e the frexp power of max |C| (fp16-safe
  dot operand, exact). FROM_P: read P instead (the backward's C, c0 from the saved state).
- `hmx_bwd_finalize_mid` (grid B*H): T, sdy = sums of the query pass's chunk partials (written
  for the weight kernel); per k-block: A = GELU(P), dA = fc2_2 T + b2_2 sdy^T, dP = dA GELU'(P)
  (written), R += fc2^T dP, r0 += b2^T dP; R scaled as C.
- `hmx_bwd_finalize_weights` (grid H x (2 n_kb + 1), HAS_LN: + 2): the weight gradients summed over the
  batch in batch order: programs j < n_kb: fc2_2 rows of k-block j, A T^T and A sdy; n_kb <= j <
  2 n_kb: fc2 rows, dP S^T and dP sv (S, sv summed from the key pass's chunk partials); j = 2 n_kb:
  both generators' fc1 gradients, their partials summed over (batch, chunk), and with HAS_LN the
  LayerNorm weight and bias gradients of head h's channels (layer_norm_fused.py's partials) in
  one more program, j = 2 n_kb + 1 (in the fc1 program they made ptxas spill on sm_90).
  Each gradient is stored in its output's dtype (the parameter's).

Every sum runs in a fixed order in one program (deterministic, no atomics). Products are fp32
dots at IEEE precision (as exact as the fp32 torch matmuls they replace; the tiles are tiny, so
the tensor cores would buy nothing). Trade-off: the chunk partials are re-read by the weight
kernel's k-block programs (n_kb times S's partials, a few KB per (b, h)) rather than stored
summed, which would cost one more launch in the backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .hyper_mixing_fwd import _gelu, _gelu_grad


BLOCK_K = 32  # rows of fc2 per step: [BLOCK_K, BLOCK_D] fp32 tiles beside [BLOCK_D, BLOCK_D] sums
NUM_WARPS = 8  # hmx_fwd_finalize, hmx_bwd_finalize_mid


def weights_num_warps(block_d: int) -> int:
    """hmx_bwd_finalize_weights: 4 warps at BLOCK_D 32 (with 8, ptxas keeps 64 registers and spills
    8 B on sm_90), 8 at 64 (with 4, 255 registers and 52 B of spills on sm_80)."""
    return 4 if block_d <= 32 else 8


# Compiled for sm_90 / sm_80 at (d_h, k_h) = (18, 72), (32, 128), (64, 256) in bf16 and fp32: no
# spills (the backward's middle kernel, the largest, at 128 / 190 registers for BLOCK_D 32 / 64;
# figures: `capture_launches(..., finalize=True)` in tools/kernels.py).
# At BLOCK_D 128 two [128, 128] fp32 sums per program spill whatever the warps, so the split head
# sizes (autotune.SPLIT_BLOCK_D) keep the torch finalize (launch.py).


@triton.jit
def _sum_chunks(part_ptr, row, n_chunks, o_r, o_c, D_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum over chunks 0.. n_chunks - 1 (in order) of a [n_chunks, D_H, D_H] fp32 partial block
    of program row `row`: a zero-padded [BLOCK_D, BLOCK_D] tile."""
    m = (o_r < D_H)[:, None] & (o_c < D_H)[None, :]
    base = part_ptr + row * n_chunks * D_H * D_H + o_r[:, None] * D_H + o_c[None, :]
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for c in range(n_chunks):
        acc += tl.load(base + c * D_H * D_H, mask=m, other=0.0)
    return acc


@triton.jit
def _sum_chunks_vec(part_ptr, row, n_chunks, o_c, D_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [n_chunks, D_H] analogue of `_sum_chunks`: a zero-padded [BLOCK_D] vector."""
    m = o_c < D_H
    base = part_ptr + row * n_chunks * D_H + o_c
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c in range(n_chunks):
        acc += tl.load(base + c * D_H, mask=m, other=0.0)
    return acc


@triton.jit
def _frexp_scale(b_x):
    """2^e with max |x| = m 2^e, m in [0.5, 1) (torch.frexp's exponent; 1 for an all-zero tile)."""
    amax = tl.max(tl.max(tl.abs(b_x), axis=1), axis=0)
    p2 = (amax.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(p2 > 0.0, 2.0 * p2, 1.0)


@triton.jit
def _store_scaled(out_ptr, scale_ptr, row, b_x, o_r, o_c, D_H: tl.constexpr):
    """x / 2^e into the [D_H, D_H] block of `row`, 2^e into scale[row] (`_frexp_scale`)."""
    scale = _frexp_scale(b_x)
    m = (o_r < D_H)[:, None] & (o_c < D_H)[None, :]
    tl.store(out_ptr + row * D_H * D_H + o_r[:, None] * D_H + o_c[None, :], b_x / scale, mask=m)
    tl.store(scale_ptr + row, scale)


@triton.jit
def hmx_fwd_finalize(
    s_part_ptr, sv_part_ptr,  # [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32 (unused with FROM_P)
    p_ptr,  # [B*H, k_h, d_h] fp32: written (the op's state), or read with FROM_P
    fc2w_ptr, fc2b_ptr,  # generator 1: [H, k_h, d_h], [H, k_h]
    fc2w2_ptr, fc2b2_ptr,  # generator 2
    c_ptr, cscale_ptr, c0_ptr,  # [B*H, d_h, d_h] C / 2^e, [B*H] 2^e, [B*H, d_h] c0
    n_chunks, H, K,
    D_H: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, FROM_P: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_h = i_bh % H
    o_r = tl.arange(0, BLOCK_D)
    o_c = tl.arange(0, BLOCK_D)
    o_k = tl.arange(0, BLOCK_K)
    m_c = o_c < D_H
    if not FROM_P:
        b_s = _sum_chunks(s_part_ptr, i_bh, n_chunks, o_r, o_c, D_H, BLOCK_D)  # [BD, BD]
        b_sv = _sum_chunks_vec(sv_part_ptr, i_bh, n_chunks, o_c, D_H, BLOCK_D)  # [BD]
    acc_c = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc_c0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + o_k
        m_k = k < K
        m_kc = m_k[:, None] & m_c[None, :]
        offs = k[:, None] * D_H + o_c[None, :]
        p_offs = i_bh * K * D_H + offs
        if FROM_P:
            b_p = tl.load(p_ptr + p_offs, mask=m_kc, other=0.0)
        else:
            b_w = tl.load(fc2w_ptr + i_h * K * D_H + offs, mask=m_kc, other=0.0).to(tl.float32)
            b_p = tl.dot(b_w, b_s, input_precision="ieee")  # [BK, BD] = [BK, BD] @ [BD, BD]
            if HAS_B1:
                b_b = tl.load(fc2b_ptr + i_h * K + k, mask=m_k, other=0.0).to(tl.float32)
                b_p += b_b[:, None] * b_sv[None, :]
            tl.store(p_ptr + p_offs, b_p, mask=m_kc)
        b_a = _gelu(b_p)  # zero on padded rows / columns (GELU(0) = 0)
        b_w2 = tl.load(fc2w2_ptr + i_h * K * D_H + offs, mask=m_kc, other=0.0).to(tl.float32)
        acc_c += tl.dot(tl.trans(b_w2), b_a, input_precision="ieee")  # [BD, BD] = [BD, BK] @ [BK, BD]
        if HAS_B2:
            b_b2 = tl.load(fc2b2_ptr + i_h * K + k, mask=m_k, other=0.0).to(tl.float32)
            acc_c0 += tl.sum(b_b2[:, None] * b_a, axis=0)
    _store_scaled(c_ptr, cscale_ptr, i_bh, acc_c, o_r, o_c, D_H)
    if HAS_B2:
        tl.store(c0_ptr + i_bh * D_H + o_c, acc_c0, mask=m_c)


@triton.jit
def hmx_bwd_finalize_mid(
    t_part_ptr, sdy_part_ptr,  # [B*H, n_chunks, d_h, d_h], [B*H, n_chunks, d_h] fp32
    t_ptr, sdy_ptr,  # out: [B*H, d_h, d_h], [B*H, d_h] their chunk sums
    p_ptr, dp_ptr,  # [B*H, k_h, d_h] fp32: the saved P; out: dP
    fc2w_ptr, fc2b_ptr,  # generator 1: [H, k_h, d_h], [H, k_h]
    fc2w2_ptr, fc2b2_ptr,  # generator 2
    r_ptr, rscale_ptr, r0_ptr,  # out: [B*H, d_h, d_h] R / 2^e, [B*H] 2^e, [B*H, d_h] r0
    n_chunks, H, K,
    D_H: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_h = i_bh % H
    o_r = tl.arange(0, BLOCK_D)
    o_c = tl.arange(0, BLOCK_D)
    o_k = tl.arange(0, BLOCK_K)
    m_c = o_c < D_H
    b_t = _sum_chunks(t_part_ptr, i_bh, n_chunks, o_r, o_c, D_H, BLOCK_D)  # [BD, BD]
    b_sdy = _sum_chunks_vec(sdy_part_ptr, i_bh, n_chunks, o_c, D_H, BLOCK_D)  # [BD]
    tl.store(t_ptr + i_bh * D_H * D_H + o_r[:, None] * D_H + o_c[None, :], b_t,
             mask=(o_r < D_H)[:, None] & m_c[None, :])
    tl.store(sdy_ptr + i_bh * D_H + o_c, b_sdy, mask=m_c)
    acc_r = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc_r0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + o_k
        m_k = k < K
        m_kc = m_k[:, None] & m_c[None, :]
        offs = k[:, None] * D_H + o_c[None, :]
        p_offs = i_bh * K * D_H + offs
        b_p = tl.load(p_ptr + p_offs, mask=m_kc, other=0.0)
        b_w2 = tl.load(fc2w2_ptr + i_h * K * D_H + offs, mask=m_kc, other=0.0).to(tl.float32)
        b_da = tl.dot(b_w2, b_t, input_precision="ieee")  # [BK, BD] = [BK, BD] @ [BD, BD]
        if HAS_B2:
            b_b2 = tl.load(fc2b2_ptr + i_h * K + k, mask=m_k, other=0.0).to(tl.float32)
            b_da += b_b2[:, None] * b_sdy[None, :]
        b_dp = b_da * _gelu_grad(b_p)  # zero on padded rows / columns (dA is)
        tl.store(dp_ptr + p_offs, b_dp, mask=m_kc)
        b_w = tl.load(fc2w_ptr + i_h * K * D_H + offs, mask=m_kc, other=0.0).to(tl.float32)
        acc_r += tl.dot(tl.trans(b_w), b_dp, input_precision="ieee")  # [BD, BD] = [BD, BK] @ [BK, BD]
        if HAS_B1:
            b_b = tl.load(fc2b_ptr + i_h * K + k, mask=m_k, other=0.0).to(tl.float32)
            acc_r0 += tl.sum(b_b[:, None] * b_dp, axis=0)
    _store_scaled(r_ptr, rscale_ptr, i_bh, acc_r, o_r, o_c, D_H)
    if HAS_B1:
        tl.store(r0_ptr + i_bh * D_H + o_c, acc_r0, mask=m_c)


@triton.jit
def _sum_fc1(part_ptr, bpart_ptr, dw_ptr, db_ptr, i_h, B, H, n_chunks, o_r, o_c,
             D_H: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """One generator's fc1 gradients of head i_h: its [B*H, n_chunks, ...] partials summed over
    batch, then chunk (batch-major order)."""
    acc_w = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for b in range(B):
        row = (b * H + i_h).to(tl.int64)
        acc_w += _sum_chunks(part_ptr, row, n_chunks, o_r, o_c, D_H, BLOCK_D)
        if HAS_B:
            acc_b += _sum_chunks_vec(bpart_ptr, row, n_chunks, o_c, D_H, BLOCK_D)
    m_c = o_c < D_H
    tl.store(dw_ptr + i_h * D_H * D_H + o_r[:, None] * D_H + o_c[None, :], acc_w,
             mask=(o_r < D_H)[:, None] & m_c[None, :])
    if HAS_B:
        tl.store(db_ptr + i_h * D_H + o_c, acc_b, mask=m_c)


@triton.jit
def hmx_bwd_finalize_weights(
    p_ptr, dp_ptr,  # [B*H, k_h, d_h] fp32: the saved P (A = GELU(P)) and dP
    t_ptr, sdy_ptr,  # [B*H, d_h, d_h], [B*H, d_h]: the query pass's sums (hmx_bwd_finalize_mid)
    s_part_ptr, sv_part_ptr,  # [B*H, s_chunks, d_h, d_h], [B*H, s_chunks, d_h]: the key pass's S, sv partials
    f1w_part_ptr, f1b_part_ptr, f2w_part_ptr, f2b_part_ptr,  # [B*H, n_chunks1|2, ...] fc1 gradient partials
    dfc2w_ptr, dfc2b_ptr, dfc2w2_ptr, dfc2b2_ptr,  # out: [H, k_h, d_h], [H, k_h] per generator
    dfc1w_ptr, dfc1b_ptr, dfc1w2_ptr, dfc1b2_ptr,  # out: [H, d_h, d_h], [H, d_h] per generator
    B, H, K, s_chunks, n_chunks1, n_chunks2,
    D_H: tl.constexpr, HAS_FC1_B1: tl.constexpr, HAS_FC1_B2: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    lnw_part_ptr=None, lnb_part_ptr=None,  # HAS_LN: [B, n_ln_chunks, d] fp32 LayerNorm gradient partials
    dlnw_ptr=None, dlnb_ptr=None,  # HAS_LN, out: LayerNorm weight and bias gradients [d]
    n_ln_chunks=1, HAS_LN: tl.constexpr = False,
):
    i_h = tl.program_id(0)
    j = tl.program_id(1)
    n_kb = tl.cdiv(K, BLOCK_K)
    o_r = tl.arange(0, BLOCK_D)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D_H
    if j == 2 * n_kb:
        _sum_fc1(f1w_part_ptr, f1b_part_ptr, dfc1w_ptr, dfc1b_ptr, i_h, B, H, n_chunks1, o_r, o_c,
                 D_H, HAS_FC1_B1, BLOCK_D)
        _sum_fc1(f2w_part_ptr, f2b_part_ptr, dfc1w2_ptr, dfc1b2_ptr, i_h, B, H, n_chunks2, o_r, o_c,
                 D_H, HAS_FC1_B2, BLOCK_D)
    elif HAS_LN and j == 2 * n_kb + 1:  # head i_h's channels of the LayerNorm gradients: partials over
        # (batch, chunk), in order
        ch = i_h * D_H + o_c
        acc_lw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_lb = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r in range(B * n_ln_chunks):
            acc_lw += tl.load(lnw_part_ptr + (r * H).to(tl.int64) * D_H + ch, mask=m_c, other=0.0)
            acc_lb += tl.load(lnb_part_ptr + (r * H).to(tl.int64) * D_H + ch, mask=m_c, other=0.0)
        tl.store(dlnw_ptr + ch, acc_lw, mask=m_c)
        tl.store(dlnb_ptr + ch, acc_lb, mask=m_c)
    else:
        gen1 = j >= n_kb  # generator 1: dP against S, sv; generator 2: A = GELU(P) against T, sdy
        k = (j % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = k < K
        m_kc = m_k[:, None] & m_c[None, :]
        offs = k[:, None] * D_H + o_c[None, :]
        acc_w = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for b in range(B):
            row = (b * H + i_h).to(tl.int64)
            if gen1:
                b_x = tl.load(dp_ptr + row * K * D_H + offs, mask=m_kc, other=0.0)
                b_sq = _sum_chunks(s_part_ptr, row, s_chunks, o_r, o_c, D_H, BLOCK_D)
                b_vec = _sum_chunks_vec(sv_part_ptr, row, s_chunks, o_c, D_H, BLOCK_D)
            else:
                b_x = _gelu(tl.load(p_ptr + row * K * D_H + offs, mask=m_kc, other=0.0))
                b_sq = tl.load(t_ptr + row * D_H * D_H + o_r[:, None] * D_H + o_c[None, :],
                               mask=(o_r < D_H)[:, None] & m_c[None, :], other=0.0)
                b_vec = tl.load(sdy_ptr + row * D_H + o_c, mask=m_c, other=0.0)
            acc_w += tl.dot(b_x, tl.trans(b_sq), input_precision="ieee")  # [BK, BD] = [BK, BD] @ [BD, BD]
            acc_b += tl.sum(b_x * b_vec[None, :], axis=1)
        if gen1:
            tl.store(dfc2w_ptr + i_h * K * D_H + offs, acc_w, mask=m_kc)
            if HAS_B1:
                tl.store(dfc2b_ptr + i_h * K + k, acc_b, mask=m_k)
        else:
            tl.store(dfc2w2_ptr + i_h * K * D_H + offs, acc_w, mask=m_kc)
            if HAS_B2:
                tl.store(dfc2b2_ptr + i_h * K + k, acc_b, mask=m_k)
