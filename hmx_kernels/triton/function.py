"""Launchers of the Triton HyperMixing backend, registered as torch.library triton ops
(hmx_kernels::triton_fwd / triton_bwd, schema and autograd in `hmx_kernels.fused`).

Forward (`triton_fwd`), reassociated (see hyper_mixing_fwd.py): state pass over key chunks ->
S, sv = sums of the chunk partials (fixed order) -> finalize with torch on [B, H, ...] tensors:
P = fc2 S + b2 sv^T, A = GELU(P), C = fc2_2^T A, c0 = b2_2^T A -> mix pass over query chunks,
writing Y [B, M, d] fp32 (the LayerNorm is applied by the common epilogue). The op returns
P [B, H, k_h, d_h] fp32, which autograd saves: nothing of size [N, k_h].
Backward (`triton_bwd`), reassociated (see hyper_mixing_bwd.py): A, C from the saved P; the query
pass (T, sdy, MLP2's fc1 gradients, dquery) -> finalize: dA, MLP2's fc2 gradients, dP = dA * GELU'(P),
R, r0 -> the key pass (S, sv, MLP1's fc1 gradients, dkey, dvalue) -> finalize: MLP1's fc2
gradients. From d_h 128 on (config.SPLIT_BLOCK_D) the state pass splits S's rows over two programs
per (b, h, chunk), the backward takes T, sdy from `hmx_bwd_kernel_tsum` and S, sv from the state
pass run again, and the query and key passes leave those sums out (ACC_T / ACC_S), so that every
program fits its registers. All token reductions are per-program fp32 partials ([D, D] and [D] per chunk) summed
here with torch.sum in a fixed order (deterministic, no atomics); the finalize products are torch
matmuls on [B, H, k_h, d_h] tensors (`_matmul`: fp32 as torch's float32 matmul precision allows,
fp64 in "high"). Tied hypernetworks and self-mixing (speechbrain: query = key = value) need no
special case: the same tensor appears in several argument slots and autograd adds the gradients
of those slots.

Precision and tensor cores: config.dot_precision (fp16 / bf16 operands, or fp32 in the dot
precision torch.get_float32_matmul_precision() asks for); C and R are passed divided by a power
of two per (b, h) (`_pow2_scale`), so that fp16 operands stay in range.

The sequence is split into n_chunks = min(64, ceil(L / CHUNK_MIN)) chunks, one program per
(batch, head, chunk); each program loops over its chunk in tiles of BLOCK_N tokens. The chunking
depends on L only (not on the tuned BLOCK_N), so partial buffers are config-independent; a chunk's
partials (d_h^2 + d_h numbers per product) are smaller than its slice of an [L, k_h] tensor while
d_h^2 < CHUNK_MIN * k_h (at the limits d_h 128, k_h 512: 16K against 64K).

The launchers are written for `torch.library.triton_op`: kernels are launched through
`wrap_triton`, and the functions run on fake tensors too (torch.compile traces them to see the
kernels), which is why the positional-encoding table bypasses its cache under tracing. Under
TRITON_INTERPRET=1 the same functions are registered as opaque custom ops instead (see TRITON_OPS).

Debugging aid: with `hmx_kernels.config.set_poison(True)` (or HMX_KERNELS_POISON=1 at import)
every buffer allocated here is filled with NaN first, so an element a kernel forgets to write
shows up in tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..config import SETTINGS
from ..fused import define_fused_ops, run_fused
from ..reference.positional import cached_positional_encoding, frequencies, positional_encoding
from ..validation import HyperMixingProblem
from ..variants import get_variant
from . import config as _config
from .config import INTERPRETED_KERNELS, block_d, dot_precision
from .hyper_mixing_bwd import hmx_bwd_kernel_key, hmx_bwd_kernel_query, hmx_bwd_kernel_tsum
from .hyper_mixing_fwd import hmx_fwd_kernel_mix, hmx_fwd_kernel_state

__all__ = ["TRITON_OPS", "triton_forward", "set_nan_poison"]

MAX_CHUNKS = 64  # most programs per (b, h) along the sequence
CHUNK_MIN = 128  # fewest tokens per chunk (a chunk's d_h x d_h partials stay below its [L_c, k_h] slice)

# Positional encodings: by default both variants read the fp32 table (bitwise the values the
# reference uses; the table is [L, d], shared by the batch). PE_ON_CHIP = True computes the
# speechbrain sinusoid on chip from position x frequency instead (no table read; the GPU's sin/cos
# may differ from torch's by a few ulp, more for angles in the thousands). It stays off because it
# does not fit without spills: compiled for every candidate of kernels.csv
# (benchmarks/results/kernels-pe-on-chip.csv, `python -m benchmarks.kernels --pe-on-chip`), 48 of
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


def _chunking(length):
    n = max(1, min(MAX_CHUNKS, triton.cdiv(length, CHUNK_MIN)))
    chunk_len = triton.cdiv(length, n)
    return triton.cdiv(length, chunk_len), chunk_len


def _keep_args(keep, fallback: torch.Tensor):
    """(pointer tensor, stride_b, stride_n, has_mask) for an fp32 [B, L] keep vector."""
    if keep is None:
        return fallback, 0, 0, False
    return keep, keep.stride(0), keep.stride(1), True


def _pe_args(v, length, d, device, tracing: bool):
    """(pe table [L, d] or frequency vector [d], pe_table flag)."""
    if v.name == "speechbrain" and PE_ON_CHIP:
        return frequencies(v, d, torch.float32).to(device), False  # [d] exact fp32 frequencies
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
    def __init__(self, query, key, fc2w, variant):
        self.B, self.M, self.d = query.shape
        self.N = key.shape[1]
        self.H, self.k_h, self.d_h = fc2w.shape
        self.variant = get_variant(variant)
        self.scale = float(self.variant.input_scale(self.d))
        self.first_pos = self.variant.first_position


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


def _state(s, key, value, key_keep, w1, pe, pe_table):
    """S [B*H, d_h, d_h] and sv [B*H, d_h] (fp32): fixed-order sums of the state pass's chunk
    partials of S = sum_t m_t hid_t^T V_t and sv = sum_t m_t V_t."""
    n_chunks, chunk_len = _chunking(s.N)
    fc1w, fc1b, flags = w1
    precision = _precision(key.dtype, s.d_h, "hmx_fwd_kernel_state")
    keep, smb, smn, has_mask = _keep_args(key_keep, key)
    s_part = _empty((s.B * s.H, n_chunks, s.d_h, s.d_h), torch.float32, key.device)
    sv_part = _empty((s.B * s.H, n_chunks, s.d_h), torch.float32, key.device)
    row_split = _config.row_split(s.d_h)
    _launch(hmx_fwd_kernel_state, (s.B * s.H * row_split, n_chunks),
        key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, s_part, sv_part,
        s.N, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos,
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        ROW_SPLIT=row_split, OPERAND=precision[0], DOT_PREC=precision[1], BLOCK_D=block_d(s.d_h),
    )
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


def _mix(s, query, query_keep, w2, mix_ops, pe, pe_table, y):
    """y[b, :, head h] = m (hid2 C + c0) for every query token."""
    n_chunks, chunk_len = _chunking(s.M)
    fc1w, fc1b, flags = w2
    C, c_scale, c0 = mix_ops
    precision = _precision(query.dtype, s.d_h, "hmx_fwd_kernel_mix")
    keep, smb, smn, has_mask = _keep_args(query_keep, query)
    _launch(hmx_fwd_kernel_mix, (s.B * s.H, n_chunks),
        query, query.stride(0), query.stride(1), query.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, C, C if c0 is None else c0, c_scale,
        y, y.stride(0), y.stride(1),
        s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos,
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        HAS_FC2_BIAS=c0 is not None, OPERAND=precision[0], DOT_PREC=precision[1],
        BLOCK_D=block_d(s.d_h),
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
    *gen, variant = rest
    s = _Sizes(query, key, gen[2], variant)
    device = query.device
    pe, pe_table = _pe_args(s.variant, max(s.M, s.N), s.d, device, _is_fake(query))
    S, sv = _state(s, key, value, key_keep, _fc1_args(gen[0], gen[1]), pe, pe_table)
    P = _state_to_p(s, S, sv, gen[2], gen[3])  # [B, H, k_h, d_h] fp32
    mix_ops = _mix_operands(s, F.gelu(P), gen[6], gen[7])
    y = _empty((s.B, s.M, s.d), torch.float32, device)
    _mix(s, query, query_keep, _fc1_args(gen[4], gen[5]), mix_ops, pe, pe_table, y)
    return y, P


def _query_pass(s, query, query_keep, w2, mix_ops, dy, pe, pe_table):
    """dquery [B, M, d] fp32, T [B, H, d_h, d_h], sdy [B, H, d_h] and the MLP2 fc1 gradients."""
    device = query.device
    n_chunks, chunk_len = _chunking(s.M)
    fc1w, fc1b, flags = w2
    C, c_scale, _ = mix_ops
    precision = _precision(query.dtype, s.d_h, "hmx_bwd_kernel_query")
    keep, smb, smn, has_mask = _keep_args(query_keep, query)
    dq = _empty((s.B, s.M, s.d), torch.float32, device)
    t_part, sdy_part = _square_partials(s, n_chunks, device)
    fc1_parts = _square_partials(s, n_chunks, device)
    split = _config.split_state(s.d_h)
    if split:  # T, sdy in a pass of their own (config.SPLIT_BLOCK_D)
        row_split = _config.row_split(s.d_h)
        tprec = _precision(query.dtype, s.d_h, "hmx_bwd_kernel_tsum")
        _launch(hmx_bwd_kernel_tsum, (s.B * s.H * row_split, n_chunks),
            query, query.stride(0), query.stride(1), query.stride(2),
            dy, dy.stride(0), dy.stride(1),
            keep, smb, smn, pe, pe,
            fc1w, fc1b, t_part, sdy_part,
            s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos,
            D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
            SCALE_TILES=query.dtype == torch.float16, ROW_SPLIT=row_split, OPERAND=tprec[0],
            DOT_PREC=tprec[1], BLOCK_D=block_d(s.d_h),
        )
    _launch(hmx_bwd_kernel_query, (s.B * s.H, n_chunks),
        query, query.stride(0), query.stride(1), query.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, C, c_scale,
        dy, dy.stride(0), dy.stride(1),
        dq, dq.stride(0),
        t_part, sdy_part, *fc1_parts,
        s.M, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos,
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        SCALE_TILES=query.dtype == torch.float16, ACC_T=not split, OPERAND=precision[0],
        DOT_PREC=precision[1], BLOCK_D=block_d(s.d_h),
    )
    T = t_part.sum(dim=1).view(s.B, s.H, s.d_h, s.d_h)  # fixed-order sums over the chunks
    sdy = sdy_part.sum(dim=1).view(s.B, s.H, s.d_h)
    return dq, T, sdy, _fc1_grads(s, fc1_parts, flags["HAS_FC1_BIAS"])


def _gelu_grad(x):
    cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


def _key_pass(s, key, value, key_keep, w1, key_ops, pe, pe_table):
    """dkey, dvalue [B, N, d] fp32, S [B, H, d_h, d_h], sv [B, H, d_h] and the MLP1 fc1
    gradients."""
    device = key.device
    n_chunks, chunk_len = _chunking(s.N)
    fc1w, fc1b, flags = w1
    R, r_scale, r0 = key_ops
    precision = _precision(key.dtype, s.d_h, "hmx_bwd_kernel_key")
    keep, smb, smn, has_mask = _keep_args(key_keep, key)
    dk = _empty((s.B, s.N, s.d), torch.float32, device)
    dv = _empty((s.B, s.N, s.d), torch.float32, device)
    fc1_parts = _square_partials(s, n_chunks, device)
    split = _config.split_state(s.d_h)
    s_part, sv_part = fc1_parts if split else _square_partials(s, n_chunks, device)  # split: unused
    _launch(hmx_bwd_kernel_key, (s.B * s.H, n_chunks),
        key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2),
        keep, smb, smn, pe, pe,
        fc1w, fc1b, R, R if r0 is None else r0, r_scale,
        dk, dv, dk.stride(0),
        s_part, sv_part, *fc1_parts,
        s.N, chunk_len, n_chunks, s.H, s.d, s.scale, s.first_pos,
        D_H=s.d_h, HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_FC1_BIAS=flags["HAS_FC1_BIAS"],
        HAS_FC2_BIAS=r0 is not None, ACC_S=not split, OPERAND=precision[0], DOT_PREC=precision[1],
        BLOCK_D=block_d(s.d_h),
    )
    if split:  # S, sv from the state pass again (config.SPLIT_BLOCK_D)
        S, sv = _state(s, key, value, key_keep, w1, pe, pe_table)
    else:
        S, sv = s_part.sum(dim=1), sv_part.sum(dim=1)  # fixed-order sums over the chunks
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
    *gen, state, variant = rest
    s = _Sizes(query, key, gen[2], variant)
    pe, pe_table = _pe_args(s.variant, max(s.M, s.N), s.d, query.device, _is_fake(query))
    P = state.float()  # [B, H, k_h, d_h]
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


# Compiled kernels: a triton_op, which torch.compile traces into (wrap_triton turns each launch
# into a graph node that Inductor schedules). Under Triton's interpreter wrap_triton hands back the
# plain Python kernel, which cannot run on the fake tensors of a trace, so there the ops are opaque
# custom ops with the shared fake implementation (still compile- and export-safe, like the C++ ops).
TRITON_OPS = define_fused_ops("triton", _triton_fwd_impl, _triton_bwd_impl, device_types=("cuda", "cpu"),
                              triton=not INTERPRETED_KERNELS)


def triton_forward(p: HyperMixingProblem) -> torch.Tensor:
    """Run a validated problem through the Triton ops (differentiable)."""
    return run_fused(TRITON_OPS, p)
