"""Launchers of the Triton HyperMixing backend, registered as torch.library triton ops
(hmx_kernels::triton_fwd / triton_bwd, schema and autograd in `hmx_kernels.ops`).

Forward (`triton_fwd`), reassociated (see hyper_mixing_fwd.py): state pass over key chunks
(per-chunk fp32 partials of S, sv) -> one finalize kernel (finalize.py, grid B*H): the chunk
partials summed in chunk order, P = fc2 S + b2 sv^T, A = GELU(P), C = fc2_2^T A, c0 = b2_2^T A ->
mix pass over query chunks, writing Y [B, M, d] fp32 (the LayerNorm is applied by the common
epilogue). The op returns P [B, H, k_h, d_h] fp32, which autograd saves: nothing of size [N, k_h].
Backward (`triton_bwd`), reassociated (see hyper_mixing_bwd.py): finalize (C, c0 from the saved P)
-> the query pass (partials of T, sdy, MLP2's fc1 gradients; dquery) -> finalize (T, sdy summed,
dA, dP = dA * GELU'(P), R, r0) -> the key pass (partials of S, sv, MLP1's fc1 gradients; dkey,
dvalue) -> finalize (every generator gradient, summed over the batch in batch order). Three
Triton launches forward, five backward, and no torch op between them. From d_h 128 on
(config.SPLIT_BLOCK_D) the state pass splits S's rows over two programs per (b, h, chunk), the
backward takes T, sdy from `hmx_bwd_kernel_tsum` and S, sv from the state pass run again, and the
query and key passes leave those sums out (ACC_T / ACC_S), so that every program fits its
registers; there the finalize stays in torch ops (the finalize kernels' two [128, 128] fp32 sums
per program would spill): chunk sums by torch.sum in a fixed order, products as torch matmuls on
[B, H, k_h, d_h] tensors (`_matmul`: fp32 as torch's float32 matmul precision allows, fp64 in
"high"). Every token reduction is a per-program fp32 partial ([D, D] and [D] per chunk), summed
in a fixed order (deterministic, no atomics). Tied hypernetworks and self-mixing (speechbrain:
query = key = value) need no special case: the same tensor appears in several argument slots and
autograd adds the gradients of those slots.

Host synchronisation: plain and chunked mixing read no tensor value on the host (the chunked
modes' block tables are built from sizes and kept per device, `_blocks`), so the step can be
captured in a CUDA graph after a warm-up call; packed sequences copy cu_seqlens to the host once
per call to build their table (tests/test_launch_count.py).

Precision and tensor cores: config.dot_precision (fp16 / bf16 operands, or fp32 in the dot
precision torch.get_float32_matmul_precision() asks for); C and R are passed divided by a power
of two per (b, h) (`_pow2_scale`), so that fp16 operands stay in range.

The sequence is split into n_chunks = min(64, ceil(L / CHUNK_MIN)) chunks (on a GPU also at most
about PROGRAMS_PER_SM programs per SM over the B*H rows, `_plain_chunking`), one program per
(batch, head, chunk); each program loops over its chunk in tiles of BLOCK_N tokens. The chunking
depends on the sizes only (not on the tuned BLOCK_N), so partial buffers are config-independent; a chunk's
partials (d_h^2 + d_h numbers per product) are smaller than its slice of an [L, k_h] tensor while
d_h^2 < CHUNK_MIN * k_h (at the limits d_h 128, k_h 512: 16K against 64K).

Mixing blocks (causal, chunk-causal and packed mixing; hmx_kernels.ops, csrc/hmx_params.h):
the same kernels with BLOCKED set run over pieces (token ranges inside one block, read from an
int32 table, `_Blocks`); each block's piece partials are summed in piece order, the states are
window sums of the blocks' own sums, and the finalize products of all blocks of a head run as one
matmul each (`_blocked_fwd`, `_blocked_bwd`). The op's state holds P_j per block slot. These
modes run through their own ops (TRITON_BLOCK_OPS, opaque custom ops; see there), which also take
what a streamed piece needs (hmx_kernels.streaming): its position offset (the PE table's rows
start there) and a carried state, the ops' initial_state (P^T) added to P_j before the GELU, its
gradient dP_j^T summed over the blocks (or per block), and the gradient of the state output added
to dP_j. The split head sizes split the same way with blocks: the state and tsum programs run
over (piece, b, h, row group), and the key pass takes its per-block S, sv from the state pass over
the pieces.

The launchers are written for `torch.library.triton_op`: kernels are launched through
`wrap_triton`, and the functions run on fake tensors too (torch.compile traces them to see the
kernels), which is why the positional-encoding table bypasses its cache under tracing. Under
TRITON_INTERPRET=1 the same functions are registered as opaque custom ops instead (see TRITON_OPS).

Debugging aid: with `hmx_kernels.config.set_poison(True)` (or HMX_KERNELS_POISON=1 at import)
every buffer allocated here is filled with NaN first, so an element a kernel forgets to write
shows up in tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..config import SETTINGS
from ..ops import define_fused_ops, define_layer_ops, flat_views, run_fused, state_blocks, weight_grad_layout
from ..positional import cached_positional_encoding, frequencies, positional_encoding
from ..problem import HyperMixingProblem
from ..variants import get_variant
from . import autotune as _config
from .autotune import INTERPRETED_KERNELS, block_d, dot_precision
from .hyper_mixing_bwd import hmx_bwd_kernel_key, hmx_bwd_kernel_query, hmx_bwd_kernel_tsum
from .finalize import BLOCK_K as FINALIZE_BLOCK_K
from .finalize import NUM_WARPS as FINALIZE_WARPS
from .finalize import weights_num_warps
from .finalize import hmx_bwd_finalize_mid, hmx_bwd_finalize_weights, hmx_fwd_finalize
from .hyper_mixing_fwd import hmx_fwd_kernel_mix, hmx_fwd_kernel_state
from .layer_norm_fused import hmx_bwd_kernel_query_ln, hmx_fwd_kernel_mix_ln

__all__ = ["TRITON_OPS", "triton_forward", "set_nan_poison"]

MAX_CHUNKS = 64  # most programs per (b, h) along the sequence
CHUNK_MIN = 128  # fewest tokens per chunk (a chunk's d_h x d_h partials stay below its [L_c, k_h] slice)

# Positional encodings: by default both variants read the fp32 table (bitwise the values the
# reference uses; the table is [L, d], shared by the batch). PE_ON_CHIP = True computes the
# speechbrain sinusoid on chip from position x frequency instead (no table read; the GPU's sin/cos
# may differ from torch's by a few ulp, more for angles in the thousands). It stays off because it
# does not fit without spills: compiled for every candidate of kernels.csv
# (benchmarks/results/kernels-pe-on-chip.csv, `python -m tools.kernels --pe-on-chip`), 48 of
# the 508 Triton rows spill (8 to 1048 bytes), and 6 (arch, shape, dtype, kernel) have no
# spill-free candidate left (d_h 64 fp32: mix, query, key; d_h 128 fp16 / bf16: key on sm_90);
# every kernel also gets a 32 to 344 byte stack frame (libdevice sinf / cosf keep their argument
# reduction in local memory). The table costs 4 d / B bytes per token and pass (kernels.md).
PE_ON_CHIP = False


def set_nan_poison(enabled: bool) -> None:
    """Fill every buffer the fused backends allocate with NaN (same as config.set_poison)."""
    from ..config import set_poison

    set_poison(enabled)


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if SETTINGS.poison:
        t.fill_(float("nan"))
    return t


def _is_fake(t: torch.Tensor) -> bool:
    """A fake (or functional-over-fake) tensor: torch.compile/export are tracing the op."""
    return is_fake(t)


def _launch(kernel, grid, *args, **kwargs):
    wrap_triton(kernel)[grid](*args, **kwargs)


def _cdiv(a: int, b: int) -> int:
    # integer ceil division (triton.cdiv costs about 2 us a call in triton 3.9; these run per launch)
    return -(-a // b)


def _chunking(length):
    n = max(1, min(MAX_CHUNKS, _cdiv(length, CHUNK_MIN)))
    chunk_len = _cdiv(length, n)
    return _cdiv(length, chunk_len), chunk_len


_SM_COUNTS = {}


def _sm_count(device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _plain_chunking(s, length, rows=None):
    """(n_chunks, chunk_len) of plain mixing. On a GPU the chunk count fills the device: about
    two programs per SM over the B*H rows (`PROGRAMS_PER_SM`; `rows`: another count of program
    rows, B for the all-heads passes of layer_norm_fused.py), never more than `_chunking`'s
    (MAX_CHUNKS, at least CHUNK_MIN tokens per chunk), so short or many-row inputs write fewer
    partials. Elsewhere (CPU tensors, the interpreter) `_chunking`'s fixed count."""
    n, chunk_len = _chunking(length)
    device = s.dummy.device
    if device.type != "cuda" or INTERPRETED_KERNELS:
        return n, chunk_len
    fill = _cdiv(PROGRAMS_PER_SM * _sm_count(device), s.B * s.H if rows is None else rows)
    n = max(1, min(n, fill))
    chunk_len = _cdiv(length, n)
    return _cdiv(length, chunk_len), chunk_len


PROGRAMS_PER_SM = 2  # token-pass programs per SM the GPU chunk count aims at (GPU_DESIGN.md section 5)


def _grid(s, length, bl, row_split=1):
    """(grid, chunk_len, n_chunks, (piece table, n_blocks, BLOCKED)) of a token pass over `length`
    tokens: plain mixing, (B*H*row_split, n_chunks) programs over the row's chunks (the
    piece-table argument is an unused stand-in); mixing blocks `bl`, (n_pieces, B*H*row_split)
    programs over its pieces (pieces first: grid dimension 0 has no 65535 limit, and token-causal
    mixing has one piece per token). row_split: the state programs' ROW_SPLIT row groups per
    (b, h) (config.row_split; 1 for the other passes)."""
    if bl is None:
        n_chunks, chunk_len = _plain_chunking(s, length)
        return (s.B * s.H * row_split, n_chunks), chunk_len, n_chunks, (s.dummy, 1, False)
    return (bl.n_pieces, s.B * s.H * row_split), 0, bl.n_pieces, (bl.table, bl.nb, True)


class _Blocks:
    """The mixing blocks of a row (the same for every batch row) and the pieces the token passes
    run over, built on the host from (N, chunk_size, left_context, cu_seqlens)
    (hmx_kernels.ops; csrc/hmx_params.h): a sequence (the row, or a packed sequence
    [cu[s], cu[s + 1])) is cut into blocks of chunk_size tokens (0: one block); block j's state
    sums the blocks max(first block of its sequence, j - left_context) .. j. A piece is a token
    range inside one block of at most the plain chunk length (`_chunking(N)`), so a long block
    still spreads over several programs; pieces are numbered in token order, so a block's
    pieces are consecutive.

    - table: int32 [n_pieces, 4] on the device: (start, end, block, first token of the sequence);
    - block_sums(part [B*H, n_pieces, ...]) -> [B*H, nb, ...]: each block's pieces added in
      piece order (gathers and in-place slice adds, no atomics: deterministic);
    - window(x [B*H, nb, ...]) -> the states' window sums, reverse_window(x) -> each block's sum
      over the blocks whose window holds it (the backward's), both by doubling: log2(window)
      shifted adds of whole [B*H, nb, ...] tensors, a fixed association."""

    def __init__(self, N: int, chunk_size: int, left_context: int, cu_seqlens, device):
        # Built with Python integers: no tensor value is read here except cu_seqlens (packed
        # sequences: one device-to-host copy per call, the one host sync of those modes).
        if cu_seqlens is None:
            cu = [0, N]
        else:
            cu = [int(c) for c in cu_seqlens.to("cpu", torch.int64).tolist()]
            if cu[0] != 0 or cu[-1] != N or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(f"hmx_kernels op: cu_seqlens must start at 0, never decrease and end at the token "
                                 f"count {N}, got {cu[:8]}")
        starts, lengths = cu[:-1], [b - a for a, b in zip(cu, cu[1:])]
        steps = [max(n, 1) if chunk_size <= 0 else chunk_size for n in lengths]
        nbs = [-(-n // st) for n, st in zip(lengths, steps)]  # blocks per sequence (none for an empty one)
        self.nb = nb = sum(nbs)
        self.slots = state_blocks(N, chunk_size, cu_seqlens, left_context)  # the op's state slots (>= nb)
        _, piece_len = _chunking(N)
        seq_first, seq_last, rows, per_block, pfirst = [], [], [], [], []
        j0 = 0
        for q, (start, n, st, nbq) in enumerate(zip(starts, lengths, steps, nbs)):
            for i in range(nbq):  # block j = j0 + i of sequence q
                bstart = start + i * st
                bend = min(bstart + st, start + n)
                count = -(-(bend - bstart) // piece_len)  # >= 1
                pfirst.append(len(rows))
                per_block.append(count)
                for r in range(count):
                    rows.append((bstart + r * piece_len, min(bstart + (r + 1) * piece_len, bend), j0 + i, start))
                seq_first.append(j0)
                seq_last.append(j0 + nbq - 1)
            j0 += nbq
        self.n_pieces = n_pieces = len(rows)
        self.table = torch.tensor(rows, dtype=torch.int32).reshape(n_pieces, 4).to(device)
        # block sums: blocks ordered by piece count (most first), so that the blocks with more
        # than r pieces are a prefix of that order for every r
        order = sorted(range(nb), key=lambda j: -per_block[j])  # stable
        unorder = [0] * nb
        for rank, j in enumerate(order):
            unorder[j] = rank
        first = [pfirst[j] for j in order]
        self._first = torch.tensor(first, dtype=torch.int64).to(device)
        self._unorder = torch.tensor(unorder, dtype=torch.int64).to(device)
        most = max(per_block) if per_block else 1
        self._ranks = []
        for r in range(1, most):
            count = sum(1 for c in per_block if c > r)
            self._ranks.append((count, torch.tensor([f + r for f in first[:count]], dtype=torch.int64).to(device)))
        self._trivial = n_pieces == nb
        # windows: width in blocks (no window needs more blocks than the longest sequence has)
        longest = max(nbs)
        self._width = (1 << max(longest - 1, 0).bit_length()) if left_context < 0 else min(left_context + 1, longest)
        self._pos = torch.arange(nb).to(device)
        self._seg_first = torch.tensor(seq_first, dtype=torch.int64).to(device)
        self._seg_first_rev = torch.tensor([nb - 1 - x for x in seq_last][::-1], dtype=torch.int64).to(device)

    def block_sums(self, part: torch.Tensor) -> torch.Tensor:
        if self._trivial:
            return part
        out = part.index_select(1, self._first)
        for count, index in self._ranks:
            out[:, :count] += part.index_select(1, index)
        return out.index_select(1, self._unorder)

    def _windows(self, x: torch.Tensor, seg_first: torch.Tensor) -> torch.Tensor:
        """y_j = sum of x_i over i = max(seg_first[j], j - width + 1) .. j (dimension 1)."""
        width = self._width
        if width <= 1:
            return x
        pos = self._pos
        shape = (1, -1) + (1,) * (x.dim() - 2)
        w, cur, out, step = x, pos, None, 1  # w_j: sum over the 2^k blocks ending at j (clipped)
        while True:
            if width & step:
                term = torch.where((cur >= seg_first).view(shape), w.index_select(1, cur.clamp(min=0)), 0.0)
                out = term if out is None else out + term
                cur = cur - step
            if 2 * step > width:
                return out
            src = pos - step
            w = w + torch.where((src >= seg_first).view(shape), w.index_select(1, src.clamp(min=0)), 0.0)
            step *= 2

    def window(self, x: torch.Tensor) -> torch.Tensor:
        return self._windows(x, self._seg_first)

    def reverse_window(self, x: torch.Tensor) -> torch.Tensor:
        return self._windows(x.flip(1), self._seg_first_rev).flip(1)


def _keep_args(keep, fallback: torch.Tensor):
    """(pointer tensor, stride_b, stride_n, has_mask) for an fp32 [B, L] keep vector."""
    if keep is None:
        return fallback, 0, 0, False
    return keep, keep.stride(0), keep.stride(1), True


def _pe_args(v, length, d, device, tracing: bool, offset: int = 0):
    """(pe table [L, d] or frequency vector [d], pe_table flag). offset: the global position of
    the first token (a streamed piece): the table's rows then start there (only the piece's rows,
    computed as the reference computes them; the cache holds tables from position 0 only)."""
    if v.name == "speechbrain" and PE_ON_CHIP:
        return frequencies(v, d, torch.float32).to(device), False  # [d] exact fp32 frequencies
    if offset:
        return positional_encoding(v, length, d, start=v.first_position + offset, device=device), True
    if tracing:  # fake tensors: no cache (a cached fake table would poison later eager calls)
        return positional_encoding(v, length, d, device=device), True
    # the variant's fp32 table (idiap: float64-computed), rows 0.. = positions first_position..
    return cached_positional_encoding(v, length, d, device), True


def _fc1_args(fc1w, fc1b):
    """fc1 weight and bias, contiguous (a missing bias is replaced by a dummy pointer), and the
    bias flag."""
    flags = dict(HAS_FC1_BIAS=fc1b is not None)
    fc1w = fc1w.contiguous()
    return fc1w, (fc1b.contiguous() if fc1b is not None else fc1w), flags


class _Sizes:
    def __init__(self, query, key, fc2w, variant, position_offset: int = 0):
        self.B, self.M, self.d = query.shape
        self.N = key.shape[1]
        self.H, self.k_h, self.d_h = fc2w.shape
        self.variant = get_variant(variant)
        self.scale = float(self.variant.input_scale(self.d))
        self.first_pos = self.variant.first_position + position_offset  # of the first token
        self.dummy = query  # stands in for the piece table of plain mixing (never read)


def _op_extras(extras):
    """The impls' arguments after `variant`: none (the plain ops), or (chunk_size, left_context,
    cu_seqlens, position_offset, sp_group, initial_state[, grad_state]) (the mixing-block ops,
    defined with sequence_parallel=True for the position offset of a streamed piece and with a
    carried state). Returns (block args, position_offset, initial_state, grad_state)."""
    extras = tuple(extras)
    block_args, offset = extras[:3], extras[3] if len(extras) > 3 else 0
    sp_group = extras[4] if len(extras) > 4 else ""
    if sp_group:
        raise ValueError("hmx_kernels op: the triton ops take a position offset (a streamed piece) but no "
                         "sequence-parallel group (sp_group); use backend='cpu' or 'reference' for that")
    init = extras[5] if len(extras) > 5 else None
    grad_state = extras[6] if len(extras) > 6 else None
    return block_args, offset, init, grad_state


def _precision(dtype: torch.dtype, d_h: int, kernel: str):
    """(OPERAND, DOT_PREC) of `kernel` for this call: config.dot_precision under the current
    torch.get_float32_matmul_precision()."""
    return dot_precision(dtype, d_h, torch.get_float32_matmul_precision(), kernel)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul for the per-(b, h) finalize products: fp32 as torch's float32 matmul precision
    allows, except in "high", where cuBLAS would take TF32, less precise than the 3xTF32 the
    kernels then use: there in fp64 (a few [k_h, d_h] x [d_h, d_h] products per (b, h))."""
    if torch.get_float32_matmul_precision() == "high":
        return torch.matmul(a.double(), b.double()).float()
    return torch.matmul(a, b)


def _pow2_scale(x: torch.Tensor, dims):
    """x divided by a power of two per leading index (the exponent of max |x| over `dims`), and
    that power: exact in fp32, and the quotient fits fp16's range as a dot operand."""
    _, exponent = torch.frexp(x.abs().amax(dim=dims, keepdim=True))
    scale = torch.ldexp(torch.ones_like(x[..., :1, :1]), exponent)
    return (x / scale).contiguous(), scale.reshape(-1).contiguous()


def _state(s, key, value, key_keep, w1, pe, pe_table, bl=None, raw=False):
    """S [B*H, d_h, d_h] and sv [B*H, d_h] (fp32): fixed-order sums of the state pass's chunk
    partials of S = sum_t m_t hid_t^T V_t and sv = sum_t m_t V_t. With mixing blocks `bl`: each
    block's own sums, [B*H, nb, d_h, d_h] and [B*H, nb, d_h]."""
    row_split = _config.row_split(s.d_h)
    grid, chunk_len, n_chunks, blocked = _grid(s, s.N, bl, row_split)
    fc1w, fc1b, flags = w1
    precision = _precision(key.dtype, s.d_h, "hmx_fwd_kernel_state")
    keep, smb, smn, has_mask = _keep_args(key_keep, key)
    s_part = _empty((s.B * s.H, n_chunks, s.d_h, s.d_h), torch.float32, key.device)
    sv_part = _empty((s.B * s.H, n_chunks, s.d_h), torch.float32, key.device)
    _launch(hmx_fwd_kernel_state, grid,
        key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, s_part, sv_part,
        s.N, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos, *blocked[:2],
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        ROW_SPLIT=row_split, OPERAND=precision[0], DOT_PREC=precision[1], BLOCKED=blocked[2],
        BLOCK_D=block_d(s.d_h),
    )
    if bl is not None:
        return bl.block_sums(s_part), bl.block_sums(sv_part)
    if raw:  # the chunk partials, for the finalize kernels
        return s_part, sv_part
    return s_part.sum(dim=1), sv_part.sum(dim=1)  # fixed-order sums over the chunks


def _state_to_p(s, S, sv, fc2w, fc2b):
    """Finalize: P = fc2 S + b2 sv^T, [B, H, k_h, d_h] fp32 (the op's saved state)."""
    P = _matmul(fc2w.float(), S.view(s.B, s.H, s.d_h, s.d_h))  # [H, k_h, d_h] @ [B, H, d_h, d_h]
    if fc2b is not None:
        P = P + fc2b.float()[None, :, :, None] * sv.view(s.B, s.H, 1, s.d_h)
    return P


def _mix_operands(s, A, fc2w, fc2b):
    """Finalize: C = fc2_2^T A [B*H, d_h, d_h] (divided by its power-of-two scale [B*H]) and
    c0 = b2_2^T A [B*H, d_h] (None without an fc2 bias), from A = GELU(P) [B, H, k_h, d_h]."""
    C = _matmul(fc2w.float().transpose(-1, -2), A)  # [H, d_h, k_h] @ [B, H, k_h, d_h]
    C, c_scale = _pow2_scale(C.reshape(s.B * s.H, s.d_h, s.d_h), dims=(-2, -1))
    c0 = None
    if fc2b is not None:
        c0 = _matmul(fc2b.float()[None, :, None, :], A).reshape(s.B * s.H, s.d_h).contiguous()
    return C, c_scale, c0


def _mix(s, query, query_keep, w2, mix_ops, pe, pe_table, y, bl=None):
    """y[b, :, head h] = m (hid2 C + c0) for every query token (C, c0 of its block with `bl`)."""
    grid, chunk_len, n_chunks, blocked = _grid(s, s.M, bl)
    fc1w, fc1b, flags = w2
    C, c_scale, c0 = mix_ops
    precision = _precision(query.dtype, s.d_h, "hmx_fwd_kernel_mix")
    keep, smb, smn, has_mask = _keep_args(query_keep, query)
    _launch(hmx_fwd_kernel_mix, grid,
        query, query.stride(0), query.stride(1), query.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, C, C if c0 is None else c0, c_scale,
        y, y.stride(0), y.stride(1),
        s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos, *blocked[:2],
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        HAS_FC2_BIAS=c0 is not None, OPERAND=precision[0], DOT_PREC=precision[1],
        BLOCKED=blocked[2], BLOCK_D=block_d(s.d_h),
    )


def _square_partials(s, n_chunks, device):
    """A [B*H, n_chunks, d_h, d_h] and a [B*H, n_chunks, d_h] fp32 partial buffer."""
    return (_empty((s.B * s.H, n_chunks, s.d_h, s.d_h), torch.float32, device),
            _empty((s.B * s.H, n_chunks, s.d_h), torch.float32, device))


def _fc1_grads(s, parts, has_bias):
    """Sum one generator's fc1 gradient partials over batch and chunks (fixed order): dfc1
    [H, d_h, d_h], db1 [H, d_h] (an empty tensor without the bias: the fused-op contract)."""
    dw, db = parts
    dw = dw.view(s.B, s.H, -1, s.d_h, s.d_h).sum(dim=(0, 2))
    db = db.view(s.B, s.H, -1, s.d_h).sum(dim=(0, 2)) if has_bias else dw.new_empty((0,))
    return dw, db


def _triton_fwd_impl(query, key, value, query_keep, key_keep, *rest):
    *gen, variant = rest[:9]
    block_args, offset, init, _ = _op_extras(rest[9:])
    s = _Sizes(query, key, gen[2], variant, offset)
    device = query.device
    pe, pe_table = _pe_args(s.variant, max(s.M, s.N), s.d, device, _is_fake(query), offset)
    bl = _blocks(s, block_args, device)
    if bl is not None:
        return _blocked_fwd(s, query, key, value, query_keep, key_keep, gen, pe, pe_table, bl, init)
    if _config.split_state(s.d_h):  # the torch finalize (finalize.py: its kernels would spill here)
        S, sv = _state(s, key, value, key_keep, _fc1_args(gen[0], gen[1]), pe, pe_table)
        P = _state_to_p(s, S, sv, gen[2], gen[3])  # [B, H, k_h, d_h] fp32
        mix_ops = _mix_operands(s, F.gelu(P), gen[6], gen[7])
    else:  # one finalize launch
        s_part, sv_part = _state(s, key, value, key_keep, _fc1_args(gen[0], gen[1]), pe, pe_table, raw=True)
        P = _empty((s.B, s.H, s.k_h, s.d_h), torch.float32, device)  # the op's saved state
        mix_ops = _finalize_fwd(s, s_part, sv_part, P, gen)
    y = _empty((s.B, s.M, s.d), torch.float32, device)
    _mix(s, query, query_keep, _fc1_args(gen[4], gen[5]), mix_ops, pe, pe_table, y)
    return y, P


def _query_pass(s, query, query_keep, w2, mix_ops, dy, pe, pe_table, bl=None, raw=False, grad_dtype=torch.float32):
    """dquery [B, M, d] (grad_dtype, fp32 by default), T [B, H, d_h, d_h], sdy [B, H, d_h] and the MLP2 fc1 gradients
    (with `bl`: T, sdy per block of its own queries, [B, H, nb, d_h, d_h], [B, H, nb, d_h])."""
    device = query.device
    grid, chunk_len, n_chunks, blocked = _grid(s, s.M, bl)
    fc1w, fc1b, flags = w2
    C, c_scale, _ = mix_ops
    precision = _precision(query.dtype, s.d_h, "hmx_bwd_kernel_query")
    keep, smb, smn, has_mask = _keep_args(query_keep, query)
    dq = _empty((s.B, s.M, s.d), grad_dtype, device)
    t_part, sdy_part = _square_partials(s, n_chunks, device)
    fc1_parts = _square_partials(s, n_chunks, device)
    split = _config.split_state(s.d_h)
    if split:  # T, sdy in a pass of their own (config.SPLIT_BLOCK_D)
        row_split = _config.row_split(s.d_h)
        tgrid = _grid(s, s.M, bl, row_split)[0]
        tprec = _precision(query.dtype, s.d_h, "hmx_bwd_kernel_tsum")
        _launch(hmx_bwd_kernel_tsum, tgrid,
            query, query.stride(0), query.stride(1), query.stride(2),
            dy, dy.stride(0), dy.stride(1),
            keep, smb, smn, pe, pe,
            fc1w, fc1b, t_part, sdy_part,
            s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos, *blocked[:2],
            D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
            SCALE_TILES=query.dtype == torch.float16, ROW_SPLIT=row_split, OPERAND=tprec[0],
            DOT_PREC=tprec[1], BLOCKED=blocked[2], BLOCK_D=block_d(s.d_h),
        )
    _launch(hmx_bwd_kernel_query, grid,
        query, query.stride(0), query.stride(1), query.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, C, c_scale,
        dy, dy.stride(0), dy.stride(1),
        dq, dq.stride(0),
        t_part, sdy_part, *fc1_parts,
        s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos, *blocked[:2],
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        SCALE_TILES=query.dtype == torch.float16, ACC_T=not split, OPERAND=precision[0],
        DOT_PREC=precision[1], BLOCKED=blocked[2], BLOCK_D=block_d(s.d_h),
    )
    if bl is not None:
        T = bl.block_sums(t_part).view(s.B, s.H, bl.nb, s.d_h, s.d_h)
        sdy = bl.block_sums(sdy_part).view(s.B, s.H, bl.nb, s.d_h)
        return dq, T, sdy, _fc1_grads(s, fc1_parts, flags["HAS_FC1_BIAS"])
    if raw:  # the chunk partials, for the finalize kernels
        return dq, t_part, sdy_part, fc1_parts
    T = t_part.sum(dim=1).view(s.B, s.H, s.d_h, s.d_h)  # fixed-order sums over the chunks
    sdy = sdy_part.sum(dim=1).view(s.B, s.H, s.d_h)
    return dq, T, sdy, _fc1_grads(s, fc1_parts, flags["HAS_FC1_BIAS"])


def _gelu_grad(x):
    cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


def _key_pass(s, key, value, key_keep, w1, key_ops, pe, pe_table, bl=None, raw=False, grad_dtype=torch.float32,
              dq=None):
    """dkey, dvalue [B, N, d] (grad_dtype, fp32 by default), S [B, H, d_h, d_h], sv [B, H, d_h] and the MLP1 fc1
    gradients (with `bl`: S, sv per block of its own keys, [B*H, nb, d_h, d_h], [B*H, nb, d_h]).
    dq (fp32 [B, N, d], self-mixing: query is key is value): dkey is then the whole token gradient
    dq + dkey + dvalue, and dvalue is None."""
    device = key.device
    grid, chunk_len, n_chunks, blocked = _grid(s, s.N, bl)
    fc1w, fc1b, flags = w1
    R, r_scale, r0 = key_ops
    precision = _precision(key.dtype, s.d_h, "hmx_bwd_kernel_key")
    keep, smb, smn, has_mask = _keep_args(key_keep, key)
    dk = _empty((s.B, s.N, s.d), grad_dtype, device)
    dv = None if dq is not None else _empty((s.B, s.N, s.d), grad_dtype, device)
    fc1_parts = _square_partials(s, n_chunks, device)
    split = _config.split_state(s.d_h)
    s_part, sv_part = fc1_parts if split else _square_partials(s, n_chunks, device)  # split: unused
    _launch(hmx_bwd_kernel_key, grid,
        key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, R, R if r0 is None else r0, r_scale,
        dk, dk if dv is None else dv, dk.stride(0),
        s_part, sv_part, *fc1_parts,
        s.N, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos, *blocked[:2],
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        HAS_FC2_BIAS=r0 is not None, ACC_S=not split, OPERAND=precision[0], DOT_PREC=precision[1],
        BLOCKED=blocked[2], BLOCK_D=block_d(s.d_h), **({} if dq is None else dict(dq_ptr=dq, ADD_DQ=True)),
    )
    if raw:  # the chunk partials, for the finalize kernels (split: from the state pass again)
        if split:
            s_part, sv_part = _state(s, key, value, key_keep, w1, pe, pe_table, raw=True)
        return dk, dv, s_part, sv_part, fc1_parts
    if split:  # S, sv from the state pass again (config.SPLIT_BLOCK_D; per block with `bl`)
        S, sv = _state(s, key, value, key_keep, w1, pe, pe_table, bl)
    elif bl is not None:
        S, sv = bl.block_sums(s_part), bl.block_sums(sv_part)
    else:
        S, sv = s_part.sum(dim=1), sv_part.sum(dim=1)  # fixed-order sums over the chunks
    if bl is not None:
        return dk, dv, S, sv, _fc1_grads(s, fc1_parts, flags["HAS_FC1_BIAS"])
    S, sv = S.view(s.B, s.H, s.d_h, s.d_h), sv.view(s.B, s.H, s.d_h)
    return dk, dv, S, sv, _fc1_grads(s, fc1_parts, flags["HAS_FC1_BIAS"])


def _fc2_grads(A, T, sdy, has_bias):
    """A generator's fc2 gradients from [B, H, k_h, d_h] A and its token sums T [B, H, d_h, d_h],
    sdy [B, H, d_h], summed over the batch: A T^T [H, k_h, d_h] and A sdy [H, k_h] (empty
    without the bias). Generator 2: (A, T, sdy); generator 1: (dP, S, sv)."""
    dw = _matmul(A, T.transpose(-1, -2)).sum(dim=0)
    db = _matmul(A, sdy.unsqueeze(-1)).squeeze(-1).sum(dim=0) if has_bias else A.new_empty((0,))
    return dw, db


def _key_operands(s, dP, fc2w, fc2b):
    """Finalize: R = fc2^T dP [B*H, d_h, d_h] (divided by its power-of-two scale [B*H]) and
    r0 = b2^T dP [B*H, d_h] (None without an fc2 bias)."""
    R = _matmul(fc2w.float().transpose(-1, -2), dP)  # [H, d_h, k_h] @ [B, H, k_h, d_h]
    R, r_scale = _pow2_scale(R.reshape(s.B * s.H, s.d_h, s.d_h), dims=(-2, -1))
    r0 = None
    if fc2b is not None:
        r0 = _matmul(fc2b.float()[None, :, None, :], dP).reshape(s.B * s.H, s.d_h).contiguous()
    return R, r_scale, r0


def _triton_bwd_impl(grad_y, query, key, value, query_keep, key_keep, *rest):
    *gen, state, variant = rest[:10]
    block_args, offset, init, grad_state = _op_extras(rest[10:])
    s = _Sizes(query, key, gen[2], variant, offset)
    pe, pe_table = _pe_args(s.variant, max(s.M, s.N), s.d, query.device, _is_fake(query), offset)
    bl = _blocks(s, block_args, query.device)
    if bl is not None:
        return _blocked_bwd(s, grad_y, query, key, value, query_keep, key_keep, gen, state, pe, pe_table, bl,
                            init, grad_state)
    P = state.float().contiguous()  # [B, H, k_h, d_h]
    if _config.split_state(s.d_h):  # the torch finalize (finalize.py: its kernels would spill here)
        return _torch_finalize_bwd(s, grad_y, query, key, value, query_keep, key_keep, gen, P, pe, pe_table)
    w1, w2 = _fc1_args(gen[0], gen[1]), _fc1_args(gen[4], gen[5])
    dq, t_part, sdy_part, fc1_parts2 = _query_pass(s, query, query_keep, w2, _finalize_fwd(s, None, None, P, gen),
                                                   grad_y.contiguous(), pe, pe_table, raw=True)
    dP, T, sdy, key_ops = _finalize_mid(s, t_part, sdy_part, P, gen)
    dk, dv, s_part, sv_part, fc1_parts1 = _key_pass(s, key, value, key_keep, w1, key_ops, pe, pe_table, raw=True)
    weights = _finalize_weights(s, P, dP, T, sdy, s_part, sv_part, fc1_parts1, fc1_parts2, gen)
    return [dq, dk, dv, *weights]


def _torch_finalize_bwd(s, grad_y, query, key, value, query_keep, key_keep, gen, P, pe, pe_table):
    """The backward with its finalize in torch ops (the split head sizes)."""
    A = F.gelu(P)
    fc2w2, fc2b2 = gen[6], gen[7]
    dq, T, sdy, (dfc1w2, dfc1b2) = _query_pass(s, query, query_keep, _fc1_args(gen[4], gen[5]),
                                               _mix_operands(s, A, fc2w2, fc2b2), grad_y.contiguous(),
                                               pe, pe_table)
    dA = _matmul(fc2w2.float(), T)  # [H, k_h, d_h] @ [B, H, d_h, d_h]
    if fc2b2 is not None:
        dA = dA + fc2b2.float()[None, :, :, None] * sdy.unsqueeze(-2)
    dfc2w2, dfc2b2 = _fc2_grads(A, T, sdy, fc2b2 is not None)
    dP = dA * _gelu_grad(P)
    fc2w1, fc2b1 = gen[2], gen[3]
    dk, dv, S, sv, (dfc1w1, dfc1b1) = _key_pass(s, key, value, key_keep, _fc1_args(gen[0], gen[1]),
                                                _key_operands(s, dP, fc2w1, fc2b1), pe, pe_table)
    dfc2w1, dfc2b1 = _fc2_grads(dP, S, sv, fc2b1 is not None)
    return [dq, dk, dv, dfc1w1, dfc1b1, dfc2w1, dfc2b1, dfc1w2, dfc1b2, dfc2w2, dfc2b2]


def _fin_flags(s, gen):
    return dict(HAS_B1=gen[3] is not None, HAS_B2=gen[7] is not None, D_H=s.d_h,
                BLOCK_K=FINALIZE_BLOCK_K, BLOCK_D=block_d(s.d_h), num_warps=FINALIZE_WARPS)


def _fc2_args(gen):
    """fc2 weights and biases of both generators, contiguous (a missing bias: a dummy pointer)."""
    w1, w2 = gen[2].contiguous(), gen[6].contiguous()
    return (w1, w1 if gen[3] is None else gen[3].contiguous(), w2, w2 if gen[7] is None else gen[7].contiguous())


def _mix_operand_views(s, buffer, has_c0):
    """C [B*H, d_h, d_h], c_scale [B*H], c0 [B*H, d_h] (or None) as views of one fp32 buffer (the
    layer ops save it for the backward), each segment starting on a 16-byte boundary."""
    rows = s.B * s.H
    pad_c, pad_s = -(-rows * s.d_h * s.d_h // 4) * 4 - rows * s.d_h * s.d_h, -(-rows // 4) * 4 - rows
    C, _, c_scale, _, c0 = flat_views(buffer, ((rows, s.d_h, s.d_h), pad_c, (rows,), pad_s,
                                               (rows, s.d_h) if has_c0 else None))
    return C, c_scale, c0


def mix_operands_size(B, H, d_h, has_c0) -> int:
    """The fp32 elements of `_mix_operand_views`' buffer."""
    rows = B * H
    return -(-rows * d_h * d_h // 4) * 4 + -(-rows // 4) * 4 + (rows * d_h if has_c0 else 0)


def _finalize_fwd(s, s_part, sv_part, P, gen, buffer=None):
    """One launch (hmx_fwd_finalize): P (written, or read when s_part is None), and the mix
    operands (C / 2^e [B*H, d_h, d_h], 2^e [B*H], c0 [B*H, d_h] or None); with `buffer`
    (mix_operands_size fp32 elements), as its views."""
    device = P.device
    rows = s.B * s.H
    if buffer is not None:
        C, c_scale, c0 = _mix_operand_views(s, buffer, gen[7] is not None)
    else:
        C = _empty((rows, s.d_h, s.d_h), torch.float32, device)
        c_scale = _empty((rows,), torch.float32, device)
        c0 = _empty((rows, s.d_h), torch.float32, device) if gen[7] is not None else None
    from_p = s_part is None
    _launch(hmx_fwd_finalize, (rows,),
        P if from_p else s_part, P if from_p else sv_part, P, *_fc2_args(gen),
        C, c_scale, C if c0 is None else c0,
        1 if from_p else s_part.shape[1], s.H, s.k_h,
        FROM_P=from_p, **_fin_flags(s, gen),
    )
    return C, c_scale, c0


def _finalize_mid(s, t_part, sdy_part, P, gen):
    """One launch (hmx_bwd_finalize_mid): dP [B, H, k_h, d_h], T, sdy (chunk sums) and the key
    pass's operands (R / 2^e, 2^e, r0 or None)."""
    device = P.device
    rows = s.B * s.H
    T = _empty((rows, s.d_h, s.d_h), torch.float32, device)
    sdy = _empty((rows, s.d_h), torch.float32, device)
    dP = _empty(P.shape, torch.float32, device)
    R = _empty((rows, s.d_h, s.d_h), torch.float32, device)
    r_scale = _empty((rows,), torch.float32, device)
    r0 = _empty((rows, s.d_h), torch.float32, device) if gen[3] is not None else None
    _launch(hmx_bwd_finalize_mid, (rows,),
        t_part, sdy_part, T, sdy, P, dP, *_fc2_args(gen),
        R, r_scale, R if r0 is None else r0,
        t_part.shape[1], s.H, s.k_h, **_fin_flags(s, gen),
    )
    return dP, T, sdy, (R, r_scale, r0)


def _finalize_weights(s, P, dP, T, sdy, s_part, sv_part, fc1_parts1, fc1_parts2, gen, ln=None, flat=False):
    """One launch (hmx_bwd_finalize_weights): the eight generator gradients of the fused-op
    contract, summed over the batch, fp32 (an absent bias: an empty tensor). ln = (ln_weight,
    ln_bias, weight partials, bias partials [B, n, d]): the LayerNorm gradients too. flat=True:
    every gradient in one fp32 buffer instead, laid out by ops.weight_grad_layout (the layer ops:
    their autograd casts it once per parameter dtype; the kernel writing fp16 / bf16 itself made
    ptxas spill 20-76 bytes at some (d_h, arch))."""
    device = P.device
    flags = dict(_fin_flags(s, gen), num_warps=weights_num_warps(block_d(s.d_h)))
    n_kb = _cdiv(s.k_h, flags["BLOCK_K"])
    layout = weight_grad_layout(gen, *(ln[:2] if ln is not None else (None, None)))
    if flat:
        buffer = _empty((sum(math.prod(shape) for shape in layout if shape is not None),), torch.float32, device)
        out = flat_views(buffer, layout)
    else:
        out = [None if shape is None else _empty(shape, torch.float32, device) for shape in layout]
    dfc1w1, dfc1b1, dfc2w1, dfc2b1, dfc1w2, dfc1b2, dfc2w2, dfc2b2 = out[:8]
    ln_args = {}
    if ln is not None:
        ln_args = dict(lnw_part_ptr=ln[2], lnb_part_ptr=ln[3], dlnw_ptr=out[8], dlnb_ptr=out[9],
                       n_ln_chunks=ln[2].shape[1], HAS_LN=True)
    _launch(hmx_bwd_finalize_weights, (s.H, 2 * n_kb + 1 + (ln is not None)),
        P, dP, T, sdy, s_part, sv_part, *fc1_parts1, *fc1_parts2,
        dfc2w1, dfc2w1 if dfc2b1 is None else dfc2b1, dfc2w2, dfc2w2 if dfc2b2 is None else dfc2b2,
        dfc1w1, dfc1w1 if dfc1b1 is None else dfc1b1, dfc1w2, dfc1w2 if dfc1b2 is None else dfc1b2,
        s.B, s.H, s.k_h, s_part.shape[1], fc1_parts1[0].shape[1], fc1_parts2[0].shape[1],
        HAS_FC1_B1=gen[1] is not None, HAS_FC1_B2=gen[5] is not None, **flags, **ln_args,
    )
    if flat:
        return buffer
    # an absent bias: an empty tensor of its own (returns may not alias)
    return [P.new_empty((0,)) if g is None else g for g in out]


# ---- the layer ops: plain mixing with the LayerNorm and the casts in the kernels --------------
def _mix_ln(s, query, query_keep, w2, mix_ops, pe, pe_table, ln_weight, ln_bias, eps, out, stats):
    """out = LayerNorm(Y) in out's dtype and stats [B, M, 2] (mean, rstd), one launch."""
    n_chunks, chunk_len = _plain_chunking(s, s.M, rows=s.B)
    fc1w, fc1b, flags = w2
    C, c_scale, c0 = mix_ops
    precision = _precision(query.dtype, s.d_h, "hmx_fwd_kernel_mix_ln")
    keep, smb, smn, has_mask = _keep_args(query_keep, query)
    _launch(hmx_fwd_kernel_mix_ln, (s.B, n_chunks),
        query, query.stride(0), query.stride(1), query.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, C, C if c0 is None else c0, c_scale,
        ln_weight.contiguous(), ln_bias.contiguous(),
        out, out.stride(0), out.stride(1), stats,
        s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos, float(eps),
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        HAS_FC2_BIAS=c0 is not None, OPERAND=precision[0], DOT_PREC=precision[1], BLOCK_D=block_d(s.d_h),
    )


def _query_pass_ln(s, query, query_keep, w2, mix_ops, grad_out, ln_weight, stats, pe, pe_table, grad_dtype):
    """The query pass with dY formed from d(out) through the LayerNorm on chip: dquery [B, M, d]
    (grad_dtype), the chunk partials of T, sdy and MLP2's fc1 gradients, and the LayerNorm
    gradients' partials [B, n_chunks, d] (weight, bias)."""
    device = query.device
    n_chunks, chunk_len = _plain_chunking(s, s.M, rows=s.B)
    fc1w, fc1b, flags = w2
    C, c_scale, c0 = mix_ops
    precision = _precision(query.dtype, s.d_h, "hmx_bwd_kernel_query_ln")
    keep, smb, smn, has_mask = _keep_args(query_keep, query)
    dq = _empty((s.B, s.M, s.d), grad_dtype, device)
    rows = _empty((s.B, s.M, 2), torch.float32, device)
    t_part, sdy_part = _square_partials(s, n_chunks, device)
    fc1_parts = _square_partials(s, n_chunks, device)
    ln_parts = (_empty((s.B, n_chunks, s.d), torch.float32, device),
                _empty((s.B, n_chunks, s.d), torch.float32, device))
    _launch(hmx_bwd_kernel_query_ln, (s.B, n_chunks),
        query, query.stride(0), query.stride(1), query.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, C, C if c0 is None else c0, c_scale,
        ln_weight.contiguous(), stats,
        grad_out, grad_out.stride(0), grad_out.stride(1), rows,
        dq, dq.stride(0),
        t_part, sdy_part, *fc1_parts, *ln_parts,
        s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos,
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        HAS_FC2_BIAS=c0 is not None, SCALE_TILES=query.dtype == torch.float16, OPERAND=precision[0],
        DOT_PREC=precision[1], BLOCK_D=block_d(s.d_h),
    )
    return dq, t_part, sdy_part, fc1_parts, ln_parts


def _layer_fwd_impl(query, key, value, query_keep, key_keep, *rest):
    *gen, ln_weight, ln_bias, variant, eps = rest
    s = _Sizes(query, key, gen[2], variant)
    device = query.device
    pe, pe_table = _pe_args(s.variant, max(s.M, s.N), s.d, device, _is_fake(query))
    s_part, sv_part = _state(s, key, value, key_keep, _fc1_args(gen[0], gen[1]), pe, pe_table, raw=True)
    P = _empty((s.B, s.H, s.k_h, s.d_h), torch.float32, device)  # the op's saved state
    # C, c_scale, c0 in one buffer, saved too: the backward does not form them again from P
    mix_buffer = _empty((mix_operands_size(s.B, s.H, s.d_h, gen[7] is not None),), torch.float32, device)
    mix_ops = _finalize_fwd(s, s_part, sv_part, P, gen, mix_buffer)
    out = _empty((s.B, s.M, s.d), query.dtype, device)
    w2 = _fc1_args(gen[4], gen[5])
    if ln_weight is None:  # no LayerNorm: the mix pass writes the output dtype itself
        _mix(s, query, query_keep, w2, mix_ops, pe, pe_table, out)
        return out, P, P.new_empty((0,)), mix_buffer
    stats = _empty((s.B, s.M, 2), torch.float32, device)
    _mix_ln(s, query, query_keep, w2, mix_ops, pe, pe_table, ln_weight, ln_bias, eps, out, stats)
    return out, P, stats, mix_buffer


def _layer_bwd_impl(grad_out, query, key, value, query_keep, key_keep, *rest):
    *gen, ln_weight, ln_bias, state, stats, mix_buffer, variant, eps, one_tensor = rest
    s = _Sizes(query, key, gen[2], variant)
    device = query.device
    pe, pe_table = _pe_args(s.variant, max(s.M, s.N), s.d, device, _is_fake(query))
    P = state.contiguous()
    w1, w2 = _fc1_args(gen[0], gen[1]), _fc1_args(gen[4], gen[5])
    mix_ops = _mix_operand_views(s, mix_buffer, gen[7] is not None)  # the forward's
    dq_dtype = torch.float32 if one_tensor else query.dtype  # one_tensor: summed into dx by the key pass
    grad_out = grad_out.contiguous()
    ln = None
    if ln_weight is None:
        dq, t_part, sdy_part, fc1_parts2 = _query_pass(s, query, query_keep, w2, mix_ops, grad_out, pe, pe_table,
                                                       raw=True, grad_dtype=dq_dtype)
    else:
        dq, t_part, sdy_part, fc1_parts2, ln_parts = _query_pass_ln(s, query, query_keep, w2, mix_ops, grad_out,
                                                                    ln_weight, stats, pe, pe_table, dq_dtype)
        ln = (ln_weight, ln_bias, *ln_parts)
    dP, T, sdy, key_ops = _finalize_mid(s, t_part, sdy_part, P, gen)
    dk, dv, s_part, sv_part, fc1_parts1 = _key_pass(s, key, value, key_keep, w1, key_ops, pe, pe_table, raw=True,
                                                    grad_dtype=key.dtype, dq=dq if one_tensor else None)
    weights = _finalize_weights(s, P, dP, T, sdy, s_part, sv_part, fc1_parts1, fc1_parts2, gen, ln=ln, flat=True)
    if one_tensor:  # dk holds the whole token gradient
        return [dk, P.new_empty((0,)), P.new_empty((0,)), weights]
    return [dq, dk, dv, weights]


def triton_layer_accepts(p: HyperMixingProblem) -> bool:
    """The layer ops take plain mixing (no mode, packed sequences, offset or group) at d_h < 128
    (the split head sizes keep the unfused path, autotune.SPLIT_BLOCK_D)."""
    return (p.mode is None and p.cu_seqlens is None and p.position_offset == 0
            and p.sequence_parallel_group is None and not _config.split_state(p.d_h))


# ---- mixing blocks (causal, chunk-causal, packed sequences) ----------------------------------
def _blocks(s, block_args, device):
    """The `_Blocks` of the ops' mixing-block arguments (chunk_size, left_context, cu_seqlens), or
    None for plain mixing (also when they are absent: the plain ops' impls)."""
    chunk_size, left_context, cu_seqlens = (tuple(block_args) + (0, -1, None)[len(block_args):])
    if chunk_size <= 0 and cu_seqlens is None:
        return None
    if cu_seqlens is not None:
        return _Blocks(s.N, chunk_size, left_context, cu_seqlens, device)
    # chunked modes: the blocks depend on sizes only; kept per device, so that repeated calls
    # (and a CUDA graph capture after a warm-up call) copy nothing to the device
    key = (s.N, chunk_size, left_context, str(device))
    blocks = _BLOCK_CACHE.get(key)
    if blocks is None or _is_fake(s.dummy):
        blocks = _Blocks(s.N, chunk_size, left_context, None, device)
        if not _is_fake(s.dummy):
            if len(_BLOCK_CACHE) >= 64:
                _BLOCK_CACHE.pop(next(iter(_BLOCK_CACHE)))
            _BLOCK_CACHE[key] = blocks
    return blocks


_BLOCK_CACHE = {}


def _head_mm(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [H, m, k] times every block of x [B, H, nb, k, n] -> [B, H, nb, m, n] (a view): one
    matmul per head, [m, k] @ [k, B * nb * n] (the finalize products of all blocks at once)."""
    B, H, nb, k, n = x.shape
    out = _matmul(w, x.permute(1, 3, 0, 2, 4).reshape(H, k, B * nb * n))
    return out.view(H, -1, B, nb, n).permute(2, 0, 3, 1, 4)


def _sum_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over batch and blocks of x y^T: x [B, H, nb, m, c], y [B, H, nb, n, c] -> [H, m, n],
    one matmul per head contracting over (b, block, c)."""
    B, H, nb, m, c = x.shape
    n = y.shape[-2]
    return _matmul(x.permute(1, 3, 0, 2, 4).reshape(H, m, B * nb * c),
                   y.permute(1, 0, 2, 4, 3).reshape(H, B * nb * c, n))


def _block_mix_operands(s, bl, A, fc2w, fc2b):
    """`_mix_operands` per block: C_j = fc2_2^T A_j [B*H*nb, d_h, d_h] (each divided by its power
    of two [B*H*nb]), c0_j = b2_2^T A_j [B*H*nb, d_h] (None without an fc2 bias), A [B, H, nb, k_h, d_h]."""
    rows = s.B * s.H * bl.nb
    C, c_scale = _pow2_scale(_head_mm(fc2w.float().transpose(-1, -2), A).reshape(rows, s.d_h, s.d_h), dims=(-2, -1))
    c0 = None
    if fc2b is not None:
        c0 = _head_mm(fc2b.float()[:, None, :], A).reshape(rows, s.d_h).contiguous()
    return C, c_scale, c0


def _carried_terms(init, nb):
    """The op's initial_state (P^T: [B, H, d_h, k_h] for every block, or [B, H, nb, d_h, k_h] one
    per block) as terms of P_j [B, H, nb or 1, k_h, d_h] (fp32)."""
    init = init.float()
    return init.transpose(-1, -2).unsqueeze(2) if init.dim() == 4 else init.transpose(-1, -2)


def _blocked_fwd(s, query, key, value, query_keep, key_keep, gen, pe, pe_table, bl, init=None):
    """The forward over mixing blocks: each block's own sums S_j, sv_j (state pass over the
    pieces, summed per block), their window sums, P_j = fc2 S^w_j + b2 sv^w_j^T (+ the carried
    state `init`: the ops' initial_state, added before the GELU), C_j, c0_j, and the mix pass
    reading its block's C_j, c0_j. Returns y and the state [B, H, slots * k_h, d_h] (P_j in block
    slot j, unused slots zero; with one carried term per block, each block's own Q_j instead, as
    the twin keeps it: a streamed piece's next carry, hmx_kernels.ops.fused_stream_forward)."""
    nb = bl.nb
    S, sv = _state(s, key, value, key_keep, _fc1_args(gen[0], gen[1]), pe, pe_table, bl)
    own_state = init is not None and init.dim() == 5  # one term per block: the state holds each Q_j
    if own_state:  # Q_j = fc2 S_j + b2 sv_j^T of each block's own tokens, then P_j = its window sum + E_j
        Q = _head_mm(gen[2].float(), S.view(s.B, s.H, nb, s.d_h, s.d_h))  # [B, H, nb, k_h, d_h]
        if gen[3] is not None:
            Q = Q + gen[3].float()[None, :, None, :, None] * sv.view(s.B, s.H, nb, 1, s.d_h)
        P = bl.window(Q.reshape(s.B * s.H, nb, s.k_h, s.d_h)).view(Q.shape) + _carried_terms(init, nb)
    else:
        S = bl.window(S).view(s.B, s.H, nb, s.d_h, s.d_h)
        sv = bl.window(sv).view(s.B, s.H, nb, 1, s.d_h)
        P = _head_mm(gen[2].float(), S)  # [B, H, nb, k_h, d_h]
        if gen[3] is not None:
            P = P + gen[3].float()[None, :, None, :, None] * sv
        if init is not None:
            P = P + _carried_terms(init, nb)
    y = _empty((s.B, s.M, s.d), torch.float32, query.device)
    _mix(s, query, query_keep, _fc1_args(gen[4], gen[5]), _block_mix_operands(s, bl, F.gelu(P), gen[6], gen[7]),
         pe, pe_table, y, bl)
    state = P.new_zeros((s.B, s.H, bl.slots, s.k_h, s.d_h))
    state[:, :, :nb] = Q if own_state else P
    return y, state.view(s.B, s.H, bl.slots * s.k_h, s.d_h)


def _blocked_bwd(s, grad_y, query, key, value, query_keep, key_keep, gen, state, pe, pe_table, bl, init=None,
                 grad_state=None):
    """The backward over mixing blocks (docs/HYPERMIXING.md, "Causal and chunked mixing"): T_j,
    sdy_j over block j's own queries; dA_j, dP_j (plus grad_state, the gradient of the op's state
    output, slot j); R'_j = fc2^T dP_j, r0'_j = b2^T dP_j; key block i reads R_i, r0_i = the sums
    of R'_j, r0'_j over the blocks j whose window holds i; the generator-1 fc2 gradients from dP_j
    and the window sums S^w_j, sv^w_j of the key pass. With a carried state `init` (the ops'
    initial_state) a 12th gradient: dP_j^T summed over the blocks in block order ([B, H, d_h, k_h],
    the state entered every block) or per block ([B, H, nb, d_h, k_h]); with one term per block
    the state holds each Q_j, P_j is formed again from it, and grad_state is the gradient of the
    Q_j (added to each block's R, r0 and the fc2 gradients outside the windows)."""
    nb, rows = bl.nb, s.B * s.H * bl.nb
    own_state = init is not None and init.dim() == 5  # the state holds each block's own Q_j (_blocked_fwd)
    P = state.float().view(s.B, s.H, bl.slots, s.k_h, s.d_h)[:, :, :nb]
    if own_state:
        P = bl.window(P.reshape(s.B * s.H, nb, s.k_h, s.d_h)).view(P.shape) + _carried_terms(init, nb)
    # the gradient of the state output: of P_j (added to dP), or with own_state of Q_j (added after
    # the reverse window: Q_i enters every P_j whose window holds i, and the state output once)
    g_state = None if grad_state is None else grad_state.float().view(s.B, s.H, bl.slots, s.k_h, s.d_h)[:, :, :nb]
    A = F.gelu(P)
    fc2w2, fc2b2 = gen[6], gen[7]
    dq, T, sdy, (dfc1w2, dfc1b2) = _query_pass(s, query, query_keep, _fc1_args(gen[4], gen[5]),
                                               _block_mix_operands(s, bl, A, fc2w2, fc2b2), grad_y.contiguous(),
                                               pe, pe_table, bl)
    sdy = sdy.unsqueeze(-2)  # [B, H, nb, 1, d_h]
    dA = _head_mm(fc2w2.float(), T)
    if fc2b2 is not None:
        dA = dA + fc2b2.float()[None, :, None, :, None] * sdy
    dfc2w2 = _sum_mm(A, T)
    dfc2b2 = _sum_mm(A, sdy).squeeze(-1) if fc2b2 is not None else A.new_empty((0,))
    dP = dA * _gelu_grad(P)
    if g_state is not None and not own_state:  # the state output P_j is used beyond this op (a streamed piece's final state)
        dP = dP + g_state
    d_init = None
    if init is not None:
        d_init = (dP.sum(dim=2) if init.dim() == 4 else dP).transpose(-1, -2).to(init.dtype).contiguous()
    fc2w1, fc2b1 = gen[2], gen[3]
    own_grad = g_state if own_state else None  # dQ_i from the state output, outside any window
    R = bl.reverse_window(_head_mm(fc2w1.float().transpose(-1, -2), dP).reshape(s.B * s.H, nb, s.d_h, s.d_h))
    if own_grad is not None:
        R = R + _head_mm(fc2w1.float().transpose(-1, -2), own_grad).reshape(R.shape)
    R, r_scale = _pow2_scale(R.reshape(rows, s.d_h, s.d_h), dims=(-2, -1))
    r0 = None
    if fc2b1 is not None:
        r0 = bl.reverse_window(_head_mm(fc2b1.float()[:, None, :], dP).reshape(s.B * s.H, nb, s.d_h))
        if own_grad is not None:
            r0 = r0 + _head_mm(fc2b1.float()[:, None, :], own_grad).reshape(r0.shape)
        r0 = r0.reshape(rows, s.d_h).contiguous()
    dk, dv, S, sv, (dfc1w1, dfc1b1) = _key_pass(s, key, value, key_keep, _fc1_args(gen[0], gen[1]),
                                                (R, r_scale, r0), pe, pe_table, bl)
    S_own, sv_own = S.view(s.B, s.H, nb, s.d_h, s.d_h), sv.view(s.B, s.H, nb, 1, s.d_h)
    S = bl.window(S).view(s.B, s.H, nb, s.d_h, s.d_h)
    sv = bl.window(sv).view(s.B, s.H, nb, 1, s.d_h)
    dfc2w1 = _sum_mm(dP, S)
    dfc2b1 = _sum_mm(dP, sv).squeeze(-1) if fc2b1 is not None else dP.new_empty((0,))
    if own_grad is not None:
        dfc2w1 = dfc2w1 + _sum_mm(own_grad, S_own)
        if fc2b1 is not None:
            dfc2b1 = dfc2b1 + _sum_mm(own_grad, sv_own).squeeze(-1)
    grads = [dq, dk, dv, dfc1w1, dfc1b1, dfc2w1, dfc2b1, dfc1w2, dfc1b2, dfc2w2, dfc2b2]
    return grads if d_init is None else grads + [d_init]


# Compiled kernels: a triton_op, which torch.compile traces into (wrap_triton turns each launch
# into a graph node that Inductor schedules). Under Triton's interpreter wrap_triton hands back the
# plain Python kernel, which cannot run on the fake tensors of a trace, so there the ops are opaque
# custom ops with the shared fake implementation (still compile- and export-safe, like the C++ ops).
TRITON_OPS = define_fused_ops("triton", _triton_fwd_impl, _triton_bwd_impl, device_types=("cuda", "cpu"),
                              triton=not INTERPRETED_KERNELS)
# Plain mixing as the layer runs it: the LayerNorm and the output / gradient dtypes in the kernels
# (hmx_kernels::triton_layer_fwd / _bwd; run_fused takes them for the problems they accept)
TRITON_OPS.layer = define_layer_ops("triton", _layer_fwd_impl, _layer_bwd_impl, triton_layer_accepts,
                                    mix_operands_size, triton=not INTERPRETED_KERNELS)
# Causal, chunk-causal and packed mixing (mixing blocks): the same impls and kernels as opaque
# custom ops (hmx_kernels::triton_blocks_fwd / _bwd, blocks=True) with the shared fake
# implementation. Their piece table is built on the host from the block arguments and the values
# of cu_seqlens, and the launch grid depends on it: a trace sees no values, so these ops are not
# traced into (torch.compile keeps them as one node each, like the C++ ops), and the plain ops
# above stay exactly as they were. They take what a streamed piece needs (hmx_kernels.streaming):
# a position offset (sequence_parallel=True for the argument; a sequence-parallel group is refused)
# and a carried state (initial_state, in the ops' P^T layout, added to P_j before the GELU; its
# gradient and that of the state output, `triton_carries_state`).


def triton_carries_state(chunk_size: int, left_context: int, cu_seqlens) -> bool:
    """The mixing-block ops take a carried state in causal and chunk-causal mixing without packed
    sequences: [B, H, d_h, k_h] in every block's window (unbounded left context), or one term per
    block [B, H, num_blocks, d_h, k_h] (any left context; not token-causal mixing), as the cpp ops."""
    return chunk_size >= 1 and cu_seqlens is None


TRITON_BLOCK_OPS = define_fused_ops("triton_blocks", _triton_fwd_impl, _triton_bwd_impl,
                                    device_types=("cuda", "cpu"), blocks=True, sequence_parallel=True,
                                    carried_state=triton_carries_state)


def triton_forward(p: HyperMixingProblem) -> torch.Tensor:
    """Run a validated problem through the Triton ops (differentiable): the plain ops (the layer
    ops where they accept it), or the mixing-block ops for a causal / chunked mode, packed
    sequences or a position offset (they take one; plain mixing runs there with the plain kernels)."""
    blocked = p.mode is not None or p.cu_seqlens is not None or p.position_offset != 0
    return run_fused(TRITON_BLOCK_OPS if blocked else TRITON_OPS, p)
