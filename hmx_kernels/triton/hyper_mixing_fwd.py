"""Triton forward kernels of HyperMixing, reassociated so that k_h never enters a token loop.

Per (batch b, head h), with the keep mask m_t, z_t the hypernetwork input (s * x_t * m_t + PE_t)
and hid_t = GELU(z_t fc1^T + b1) ([d_h]) of each generator:
    W1_t = (hid_t fc2^T + b2) m_t  is linear in hid_t, so
    P = sum_t W1_t^T V_t = fc2 S + b2 sv^T,   S = sum_t m_t hid_t^T V_t  [d_h, d_h],  sv = sum_t m_t V_t
    Y_t = m_t W2_t A = m_t (hid2_t C + c0),   A = GELU(P),  C = fc2_2^T A  [d_h, d_h],  c0 = b2_2^T A
- state pass (`hmx_fwd_kernel_state`, grid [B*H, n_chunks]): each program streams the key tiles of
  one chunk of the sequence, builds z on chip, runs fc1 -> GELU and accumulates the chunk's S and
  sv (fp32, [D, D] and [D]). Two tile products: z fc1^T and hid^T V.
  From d_h 128 on (config.SPLIT_BLOCK_D) the rows of S are split over ROW_SPLIT = 2 programs by
  hidden unit (each computes half of hid from half of fc1's rows and holds a [D / 2, D]
  accumulator): two [D, D] fp32 tiles per program do not fit the registers without spilling.
- finalize (torch, in the launcher, on [B*H, ...] tensors): S, sv = fixed-order sums of the chunk
  partials; P = fc2 S + b2 sv^T [k_h, d_h]; A = GELU(P); C = fc2_2^T A; c0 = b2_2^T A. k_h (72,
  128, 256, ... any size, no padding) appears only here.
- mix pass (`hmx_fwd_kernel_mix`, grid [B*H, n_chunks]): streams query tiles and writes
  Y = m (hid2 C + c0) for the head's d_h channels. Two tile products: z fc1^T and hid2 C.
Mixing blocks (BLOCKED, causal / chunked / packed mixing, `_piece`): the grid is
[n_pieces, B*H] ([n_pieces, B*H*ROW_SPLIT] for the state programs, row split included) and a
program reads its token range, its block and its sequence's first token from the launcher's piece
table; the mix pass reads its block's C_j, c0_j. Plain mixing (BLOCKED False) compiles exactly as
without blocks.
The LayerNorm is not part of these kernels: the layer's plain mixing (d_h < 128) runs the mix pass
of layer_norm_fused.py instead, which applies it on chip; the modes, d_h 128 and the other
backends apply it after the op (hmx_kernels.ops: torch's LayerNorm in fp32 on the [B, M, d] output).

Trade-off: per token and head a forward pass does 2 d_h^2 multiply-adds instead of
d_h^2 + 2 d_h k_h (forward + backward: 15 d_h^2 instead of 73 d_h^2 at k_h = 4 d_h, 4.9x fewer),
and a program holds [D, D] accumulators instead of [k_h, d_h] ones, so the kernels compile without
register spills at the recipe head sizes (benchmarks/results/kernels.md).
The price is the finalize step (a few per-(b, h) [k_h, d_h] products, negligible against N tokens)
and that P is formed from the sums S and sv, not token by token: in fp32 the result equals the
direct form up to summation order.

Precision (constexprs chosen by the launcher: config.dot_precision):
- fp16 / bf16 inputs (OPERAND "half"): every tl.dot takes fp16 / bf16 operands (tokens and weights
  as given; z, hid and C rounded to the input dtype) and accumulates in fp32: tensor cores (HMMA
  on sm_80, HGMMA / HMMA on sm_90). C is passed pre-divided by a power of two (its scale, per
  (b, h), applied back in fp32) so it fits fp16's range however large A grows with N. Under the
  interpreter, whose bf16 x bf16 tl.dot is broken, bf16 operands are rounded to bf16 and held in
  fp32 ("bf16-as-fp32": the same products); fp16 runs the "half" path itself.
- fp32 inputs (OPERAND "fp32"): DOT_PREC follows torch.get_float32_matmul_precision(): "ieee"
  (FMA; "highest" at padded d_h <= 32), "tf32x3" ("highest" above, "high"), "tf32" ("medium").
Block sizes are powers of two >= 16 (tl.dot's minimum); d_h (the constexpr D_H) is padded to
BLOCK_D and masked, so d_h 18 runs as 32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotuned

# arguments whose value changes with the sequence length: never specialised, so a new length
# neither recompiles nor re-tunes
_LEN_ARGS = ["L", "chunk_len", "n_chunks", "n_blocks", "sxb", "svb", "smb", "syb"]


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def _piece(pieces_ptr, i_piece, pe_ptr, first_pos, d, i_bh64, n_blocks):
    """A BLOCKED program's piece (causal / chunked / packed mixing; grid [n_pieces, B*H]): row
    i_piece of the int32 piece table [n_pieces, 4] = (start, end, block, seq0). Returns its token
    range [start, end), the PE table and the on-chip first position shifted so that token seq0
    (the first of the piece's sequence) has position 0, and slot = (b, h) * n_blocks + block,
    which indexes the per-block operands [B*H, n_blocks, ...]. Only BLOCKED kernels call it: the
    plain kernels keep their own program ids, chunk range and (b, h) offsets inline, so that they
    compile exactly as without blocks."""
    start = tl.load(pieces_ptr + i_piece * 4)
    end = tl.load(pieces_ptr + i_piece * 4 + 1)
    blk = tl.load(pieces_ptr + i_piece * 4 + 2)
    seq0 = tl.load(pieces_ptr + i_piece * 4 + 3)
    pe_ptr = pe_ptr - seq0.to(tl.int64) * d
    first_pos = first_pos - seq0
    slot = i_bh64 * n_blocks + blk
    return start, end, pe_ptr, first_pos, slot


@triton.jit
def _op(x, like_ptr, OPERAND: tl.constexpr):
    """x as a tl.dot operand. OPERAND "half": the element type of `like_ptr` (the inputs' fp16 /
    bf16; tensor cores); "fp32": fp32 (fp32 inputs, DOT_PREC applies); "bf16-as-fp32": rounded
    to bf16 and held in fp32, the interpreter's stand-in for bf16 operands (its bf16 x bf16
    tl.dot is broken; the exact fp32 products of bf16 values are what tensor cores form)."""
    if OPERAND == "half":
        return x.to(like_ptr.dtype.element_ty)
    elif OPERAND == "bf16-as-fp32":
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x.to(tl.float32)


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
    L, d, scale, first_pos,
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr,
):
    """The hypernetwork input z = scale * x * m + PE [BN, BD] fp32 (0 outside the tile's valid
    rows / channels) and the keep mask m [BN] fp32 (0 for rows past L). A padded row's x is
    selected away (z = PE there), not multiplied by 0, which would turn a NaN or inf in it into
    NaN; every later use of the row is then finite, and masking by multiplication is exact."""
    m_n = o_n < L
    m_c = o_c < D_H
    m_nc = m_n[:, None] & m_c[None, :]
    o_n64 = o_n.to(tl.int64)
    b_x = tl.load(x_ptr + o_n64[:, None] * sxn + (ch0 + o_c)[None, :] * sxc, mask=m_nc, other=0.0).to(tl.float32)
    if HAS_MASK:
        b_keep = tl.load(mask_ptr + o_n64 * smn, mask=m_n, other=0.0).to(tl.float32)
    else:
        b_keep = tl.where(m_n, 1.0, 0.0)
    if PE_TABLE:
        b_pe = tl.load(pe_ptr + o_n64[:, None] * d + (ch0 + o_c)[None, :], mask=m_nc, other=0.0)
    else:
        b_freq = tl.load(freq_ptr + ch0 + o_c, mask=m_c, other=0.0)
        b_ang = (o_n + first_pos).to(tl.float32)[:, None] * b_freq[None, :]  # fp32 product, as the table
        even = ((ch0 + o_c) % 2) == 0
        b_pe = tl.where(even[None, :], tl.sin(b_ang), tl.cos(b_ang))
    b_z = tl.where(m_nc, scale * tl.where(b_keep[:, None] != 0.0, b_x, 0.0) + b_pe, 0.0)
    return b_z, b_keep


@triton.jit
def _select_rows(b_x, b_keep):
    """x [BN, BD] with the rows of padded tokens (keep 0) set to 0: a select, so that a NaN or inf
    in a padded value or gradient row does not survive as NaN * 0."""
    return tl.where(b_keep[:, None] != 0.0, b_x, 0.0)


@triton.jit
def _load_fc1(fc1w_ptr, fc1b_ptr, i_h, o_r, o_c, D_H: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
              OPERAND: tl.constexpr):
    """Rows o_r (output units) of one head's fc1 as a zero-padded [BR(out), BD(in)] dot operand
    and their bias [BR] fp32 (o_r = o_c: the whole [BD, BD] weight)."""
    m_r = o_r < D_H
    m_c = o_c < D_H
    i_h64 = i_h.to(tl.int64)
    b_fc1w = tl.load(fc1w_ptr + i_h64 * D_H * D_H + o_r[:, None] * D_H + o_c[None, :],
                     mask=m_r[:, None] & m_c[None, :], other=0.0)
    b_fc1w = _op(b_fc1w, fc1w_ptr, OPERAND)
    if HAS_FC1_BIAS:
        b_fc1b = tl.load(fc1b_ptr + i_h64 * D_H + o_r, mask=m_r, other=0.0).to(tl.float32)
    else:
        b_fc1b = tl.zeros([o_r.shape[0]], dtype=tl.float32)
    return b_fc1w, b_fc1b


@triton.jit
def _hidden(b_z, b_fc1w, b_fc1b, like_ptr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr):
    """fc1 on a tile: z as a dot operand, pre = z fc1^T + b1 and hid = GELU(pre) (fp32)."""
    b_zo = _op(b_z, like_ptr, OPERAND)
    # [BN, BD(in)] @ [BD(in), BD(out)] -> [BN, BD]
    b_pre = tl.dot(b_zo, tl.trans(b_fc1w), input_precision=DOT_PREC) + b_fc1b[None, :]
    return b_zo, b_pre, _gelu(b_pre)


@triton.jit
def _load_square(ptr, o_c, D_H: tl.constexpr):
    """A [D_H, D_H] fp32 matrix (row-major) as a zero-padded [BD, BD] block."""
    m_c = o_c < D_H
    return tl.load(ptr + o_c[:, None] * D_H + o_c[None, :], mask=m_c[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _store_square(ptr, b_x, o_c, D_H: tl.constexpr):
    m_c = o_c < D_H
    tl.store(ptr + o_c[:, None] * D_H + o_c[None, :], b_x, mask=m_c[:, None] & m_c[None, :])


@triton.jit
def _pow2_of_max(b_x):
    """The power of two of max |x| over a tile (its exponent bits; 1 for an all-zero tile)."""
    amax = tl.max(tl.max(tl.abs(b_x), axis=1), axis=0)
    p2 = (amax.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(p2 > 0.0, p2, 1.0)


@triton.jit
def _state_program(
    k_ptr, sxb, sxn, sxc, v_ptr, svb, svn, svc, mask_ptr, smb, smn, pe_ptr, freq_ptr, fc1w_ptr, fc1b_ptr,
    s_part_ptr, sv_part_ptr, L, chunk_len, n_chunks, H, d, scale, first_pos, pieces_ptr, n_blocks,
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    SCALE_TILES: tl.constexpr, ROW_SPLIT: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program of a state pass (the forward's, and the backward's T = sum m hid2^T dY at the
    split head sizes): the rows o_r of one chunk's S = sum_t m hid_t^T V_t and, in row group 0,
    sv = sum_t m V_t. Program axis 0 = (b, h) x ROW_SPLIT row groups: S row j needs only hidden
    unit j, so a row group computes BLOCK_D / ROW_SPLIT hidden units from the same rows of fc1 and
    holds a [BLOCK_D / ROW_SPLIT, BLOCK_D] accumulator (no work is repeated but the token loads).
    SCALE_TILES: each V tile is divided by the power of two of its largest element before it is
    rounded to a half operand (for fp32 dY tiles in fp16). BLOCKED (mixing blocks): the grid is
    [n_pieces, B*H*ROW_SPLIT] and the program's tokens are its piece (`_piece`); the partials are
    per piece, summed per block by the launcher."""
    BLOCK_R: tl.constexpr = BLOCK_D // ROW_SPLIT
    if BLOCKED:
        i_bh = tl.program_id(1) // ROW_SPLIT
        i_row = tl.program_id(1) % ROW_SPLIT
        i_chunk = tl.program_id(0)
    else:
        i_bh = tl.program_id(0) // ROW_SPLIT
        i_row = tl.program_id(0) % ROW_SPLIT
        i_chunk = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    if BLOCKED:
        start, end, pe_ptr, first_pos, _slot = _piece(pieces_ptr, i_chunk, pe_ptr, first_pos, d,
                                                      i_bh.to(tl.int64), n_blocks)
    o_c = tl.arange(0, BLOCK_D)
    o_r = i_row * BLOCK_R + tl.arange(0, BLOCK_R)
    m_c = o_c < D_H
    b_fc1w, b_fc1b = _load_fc1(fc1w_ptr, fc1b_ptr, i_h, o_r, o_c, D_H, HAS_FC1_BIAS, OPERAND)
    if not BLOCKED:
        start = i_chunk * chunk_len
        end = tl.minimum(start + chunk_len, L)
    acc_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_sv = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        b_z, b_keep = _load_hyper_input(k_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                        pe_ptr, freq_ptr, o_n, o_c, i_h * D_H, end, d, scale,
                                        first_pos, D_H, HAS_MASK, PE_TABLE)
        # hidden units o_r: [BN, BD(in)] @ [BD(in), BR] -> [BN, BR]
        _, _, b_hid = _hidden(b_z, b_fc1w, b_fc1b, fc1w_ptr, OPERAND, DOT_PREC)
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        b_v = _select_rows(tl.load(v_ptr + i_b * svb + o_n.to(tl.int64)[:, None] * svn
                                   + (i_h * D_H + o_c)[None, :] * svc, mask=m_nc, other=0.0).to(tl.float32),
                           b_keep)  # V = v m
        if SCALE_TILES:
            v_scale = _pow2_of_max(b_v)
        else:
            v_scale = 1.0
        b_hm = _op(b_hid * b_keep[:, None], fc1w_ptr, OPERAND)
        # S[o_r] += (m hid)^T V: [BR, BN] @ [BN, BD] -> [BR, BD]
        acc_s += tl.dot(tl.trans(b_hm), _op(b_v / v_scale, fc1w_ptr, OPERAND), input_precision=DOT_PREC) * v_scale
        acc_sv += tl.sum(b_v * b_keep[:, None], axis=0)
    i_part = i_bh.to(tl.int64) * n_chunks + i_chunk
    m_r = o_r < D_H
    tl.store(s_part_ptr + i_part * D_H * D_H + o_r[:, None] * D_H + o_c[None, :], acc_s,
             mask=m_r[:, None] & m_c[None, :])
    if i_row == 0:
        tl.store(sv_part_ptr + i_part * D_H + o_c, acc_sv, mask=m_c)


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC", "ROW_SPLIT", "BLOCKED"], do_not_specialize=_LEN_ARGS)
def hmx_fwd_kernel_state(
    k_ptr, sxb, sxn, sxc,  # key [B, N, d]
    v_ptr, svb, svn, svc,  # value [B, N, d]
    mask_ptr, smb, smn,  # key keep vector [B, N] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,  # PE table [>= N, d] fp32, or frequencies [d] fp32
    fc1w_ptr, fc1b_ptr,  # MLP1 fc1: [H, d_h, d_h], [H, d_h]
    s_part_ptr,  # out: [B*H, n_chunks, d_h, d_h] fp32, S per chunk
    sv_part_ptr,  # out: [B*H, n_chunks, d_h] fp32, sv per chunk
    L, chunk_len, n_chunks, H, d, scale, first_pos,
    pieces_ptr, n_blocks,  # BLOCKED: piece table [n_pieces, 4] int32, block slots per (b, h)
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    ROW_SPLIT: tl.constexpr,  # row groups of S per (b, h): grid axis 0 (BLOCKED: 1) is B*H*ROW_SPLIT
    OPERAND: tl.constexpr, DOT_PREC: tl.constexpr, BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _state_program(k_ptr, sxb, sxn, sxc, v_ptr, svb, svn, svc, mask_ptr, smb, smn, pe_ptr, freq_ptr,
                   fc1w_ptr, fc1b_ptr, s_part_ptr, sv_part_ptr, L, chunk_len, n_chunks, H, d, scale,
                   first_pos, pieces_ptr, n_blocks, D_H, HAS_MASK, PE_TABLE, HAS_FC1_BIAS, False, ROW_SPLIT,
                   OPERAND, DOT_PREC, BLOCKED, BLOCK_N, BLOCK_D)


@autotuned(key=["BLOCK_D", "OPERAND", "DOT_PREC", "BLOCKED"], do_not_specialize=_LEN_ARGS)
def hmx_fwd_kernel_mix(
    q_ptr, sxb, sxn, sxc,  # query [B, M, d]
    mask_ptr, smb, smn,  # query keep vector [B, M] fp32 (1 kept, 0 padded)
    pe_ptr, freq_ptr,
    fc1w_ptr, fc1b_ptr,  # MLP2 fc1: [H, d_h, d_h], [H, d_h]
    c_ptr,  # [B*H, d_h, d_h] fp32: C / c_scale, C = fc2_2^T A
    c0_ptr,  # [B*H, d_h] fp32: c0 = b2_2^T A (read if HAS_FC2_BIAS)
    cscale_ptr,  # [B*H] fp32: the power of two C was divided by
    y_ptr, syb, syn,  # out: Y [B, M, d] (channel stride 1)
    L, chunk_len, n_chunks, H, d, scale, first_pos,
    pieces_ptr, n_blocks,  # BLOCKED: piece table [n_pieces, 4] int32, block slots per (b, h)
    D_H: tl.constexpr, HAS_MASK: tl.constexpr, PE_TABLE: tl.constexpr, HAS_FC1_BIAS: tl.constexpr,
    HAS_FC2_BIAS: tl.constexpr, OPERAND: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    if HAS_FC2_BIAS:
        b_c0 = tl.load(c0_ptr + i_slot * D_H + o_c, mask=m_c, other=0.0)
    else:
        b_c0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    if not BLOCKED:
        start = i_chunk * chunk_len
        end = tl.minimum(start + chunk_len, L)
    for t in range(start, end, BLOCK_N):
        o_n = t + tl.arange(0, BLOCK_N)
        b_z, b_keep = _load_hyper_input(q_ptr + i_b * sxb, sxn, sxc, mask_ptr + i_b * smb, smn,
                                        pe_ptr, freq_ptr, o_n, o_c, i_h * D_H, end, d, scale,
                                        first_pos, D_H, HAS_MASK, PE_TABLE)
        _, _, b_hid = _hidden(b_z, b_fc1w, b_fc1b, fc1w_ptr, OPERAND, DOT_PREC)
        # Y = m (hid2 C + c0): [BN, BD] @ [BD, BD] -> [BN, BD]
        b_y = tl.dot(_op(b_hid, fc1w_ptr, OPERAND), b_c, input_precision=DOT_PREC) * c_scale
        b_y = (b_y + b_c0[None, :]) * b_keep[:, None]
        m_nc = (o_n < end)[:, None] & m_c[None, :]
        tl.store(y_ptr + i_b * syb + o_n.to(tl.int64)[:, None] * syn + (i_h * D_H + o_c)[None, :],
                 b_y.to(y_ptr.dtype.element_ty), mask=m_nc)
