"""Launchers and the autograd Function of the Triton HyperMixing backend.

Forward: state pass over key chunks -> P = sum of the chunk partials (fixed order) -> mix pass over
query chunks -> LayerNorm kernel. Saved for backward: the inputs, P [B*H, k_h, d_h] fp32 and the
LayerNorm mean/rstd [B*M]; nothing of size [N, k_h].
Backward: the mix pass recomputes Y into a transient fp32 buffer for the LayerNorm backward, then
the query pass (dA partials, MLP2 gradients, dquery) and the key pass (dvalue, MLP1 gradients,
dkey). All token reductions are per-program fp32 partials summed here with torch.sum in a fixed
order (deterministic, no atomics). Tied hypernetworks and self-mixing (speechbrain: query = key =
value) need no special case: the same tensor appears in several argument slots and autograd adds
the gradients of those slots.

The sequence is split into n_chunks = min(64, ceil(L / CHUNK_MIN)) chunks, one program per
(batch, head, chunk); each program loops over its chunk in tiles of BLOCK_N tokens. The chunking
depends on L only (not on the tuned BLOCK_N), so partial buffers are config-independent and stay
smaller than an [L, k_h] tensor per (b, h) while d_h < CHUNK_MIN.

Debugging aid: with `set_nan_poison(True)` (or HMX_KERNELS_POISON=1 in the environment, the switch
the C++ backends read too) every buffer this module allocates is filled with NaN first, so an
element a kernel forgets to write shows up in tests.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch
import triton
from torch.autograd.function import once_differentiable

from ..reference.positional import cached_positional_encoding, frequencies
from .hyper_mixing_bwd import (
    hmx_bwd_kernel_key,
    hmx_bwd_kernel_layer_norm,
    hmx_bwd_kernel_query,
)
from .hyper_mixing_fwd import hmx_fwd_kernel_layer_norm, hmx_fwd_kernel_mix, hmx_fwd_kernel_state

__all__ = ["HyperMixingTritonFunction", "hyper_mixing_triton", "set_nan_poison"]

MAX_CHUNKS = 64  # most programs per (b, h) along the sequence
CHUNK_MIN = 128  # fewest tokens per chunk (keeps partial buffers below [L, k_h] for d_h < 128)

# Positional encodings: by default both variants read the cached fp32 table (bitwise the values
# the reference uses; the table is [L, d], shared by the batch). PE_ON_CHIP = True computes the
# speechbrain sinusoid on chip from position x frequency instead (no table read; the GPU's sin/cos
# may differ from torch's by a few ulp, more for angles in the thousands).
PE_ON_CHIP = False

_POISON = False


def set_nan_poison(enabled: bool) -> None:
    """Fill every buffer this module allocates with NaN before the kernels run (tests)."""
    global _POISON
    _POISON = bool(enabled)


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON or os.environ.get("HMX_KERNELS_POISON") == "1":  # read per call, as the C++ binding does
        t.fill_(float("nan"))
    return t


def _chunking(length: int):
    n = max(1, min(MAX_CHUNKS, triton.cdiv(length, CHUNK_MIN)))
    chunk_len = triton.cdiv(length, n)
    return triton.cdiv(length, chunk_len), chunk_len


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _mask_args(mask: Optional[torch.Tensor], fallback: torch.Tensor):
    """(pointer tensor, stride_b, stride_n, has_mask) for a bool [B, L] padding mask."""
    if mask is None:
        return fallback, 0, 0, False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _pe_args(meta, device):
    """(pe table [L, d] or frequency vector [d], pe_table flag)."""
    v = meta.variant
    if v.name == "speechbrain" and PE_ON_CHIP:
        freq = frequencies(v, meta.d, torch.float32).to(device)  # [d] exact fp32 frequencies
        return freq, False
    # the variant's fp32 table (idiap: float64-computed), rows 0.. = positions first_position..
    return cached_positional_encoding(v, max(meta.M, meta.N), meta.d, device), True


def _weight_args(fc1w, fc1b, fc2w, fc2b):
    fc1w = fc1w.contiguous()
    fc2w = fc2w.contiguous()
    has_bias = fc1b is not None
    fc1b = fc1b.contiguous() if has_bias else fc1w
    fc2b = fc2b.contiguous() if has_bias else fc2w
    return (fc1w, fc1b, fc2w, fc2b), has_bias


def _ln_blocks(d: int):
    block_f = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_f))
    return block_r, block_f


def _state(meta, key, value, w1, pe, pe_table):
    B, H, N, d_h, k_h, d = meta.B, meta.H, meta.N, meta.d_h, meta.k_h, meta.d
    n_chunks, chunk_len = _chunking(N)
    (fc1w, fc1b, fc2w, fc2b), has_bias = w1
    mask, smb, smn, has_mask = _mask_args(meta.key_padding_mask, key)
    p_part = _empty((B * H, n_chunks, k_h, d_h), torch.float32, key.device)
    hmx_fwd_kernel_state[(B * H, n_chunks)](
        key, key.stride(0), key.stride(1), key.stride(2),
        value, value.stride(0), value.stride(1), value.stride(2),
        mask, smb, smn, pe, pe,
        fc1w, fc1b, fc2w, fc2b, p_part,
        N, chunk_len, n_chunks, H, d_h, k_h, d, meta.scale, meta.variant.first_position,
        HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_BIAS=has_bias,
        BLOCK_D=_block(d_h), BLOCK_K=_block(k_h),
    )
    return p_part.sum(dim=1)  # [B*H, k_h, d_h], fixed-order sum over the chunks


def _mix(meta, query, w2, p, pe, pe_table, y):
    B, H, M, d_h, k_h, d = meta.B, meta.H, meta.M, meta.d_h, meta.k_h, meta.d
    n_chunks, chunk_len = _chunking(M)
    (fc1w, fc1b, fc2w, fc2b), has_bias = w2
    mask, smb, smn, has_mask = _mask_args(meta.query_padding_mask, query)
    hmx_fwd_kernel_mix[(B * H, n_chunks)](
        query, query.stride(0), query.stride(1), query.stride(2),
        mask, smb, smn, pe, pe,
        fc1w, fc1b, fc2w, fc2b, p,
        y, y.stride(0), y.stride(1),
        M, chunk_len, n_chunks, H, d_h, k_h, d, meta.scale, meta.variant.first_position,
        HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_BIAS=has_bias,
        BLOCK_D=_block(d_h), BLOCK_K=_block(k_h),
    )


def _mlp_grads(parts, meta, n_chunks):
    """Sum the per-program partials of one generator's weight gradients (fixed order)."""
    B, H, d_h, k_h = meta.B, meta.H, meta.d_h, meta.k_h
    dfc1w, dfc1b, dfc2w, dfc2b = parts
    return (
        dfc1w.view(B, H, n_chunks, d_h, d_h).sum(dim=(0, 2)),
        dfc1b.view(B, H, n_chunks, d_h).sum(dim=(0, 2)),
        dfc2w.view(B, H, n_chunks, k_h, d_h).sum(dim=(0, 2)),
        dfc2b.view(B, H, n_chunks, k_h).sum(dim=(0, 2)),
    )


def _mlp_partials(meta, n_chunks, device):
    B, H, d_h, k_h = meta.B, meta.H, meta.d_h, meta.k_h
    n = B * H * n_chunks
    return (
        _empty((n, d_h, d_h), torch.float32, device),
        _empty((n, d_h), torch.float32, device),
        _empty((n, k_h, d_h), torch.float32, device),
        _empty((n, k_h), torch.float32, device),
    )


def _cast_grads(grads, tensors):
    out = []
    for g, t in zip(grads, tensors):
        if t is None or g is None:
            out.append(None)
        else:
            out.append(g.to(t.dtype))
    return out


class HyperMixingTritonFunction(torch.autograd.Function):
    """HyperMixing as fused Triton kernels (forward and backward). See `hyper_mixing_triton`."""

    @staticmethod
    def forward(ctx, meta, query, key, value,
                w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, ln_w, ln_b):
        B, M, d = meta.B, meta.M, meta.d
        device = query.device
        pe, pe_table = _pe_args(meta, device)
        w1 = _weight_args(w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b)
        w2 = _weight_args(w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b)
        p = _state(meta, key, value, w1, pe, pe_table)  # [B*H, k_h, d_h] fp32
        out = _empty((B, M, d), query.dtype, device)
        mean = rstd = None
        if meta.use_layer_norm:
            y = _empty((B, M, d), torch.float32, device)
            _mix(meta, query, w2, p, pe, pe_table, y)
            mean = _empty((B * M,), torch.float32, device)
            rstd = _empty((B * M,), torch.float32, device)
            block_r, block_f = _ln_blocks(d)
            hmx_fwd_kernel_layer_norm[(triton.cdiv(B * M, block_r),)](
                y, ln_w.contiguous(), ln_b.contiguous(), out, mean, rstd, B * M, d, meta.eps,
                BLOCK_R=block_r, BLOCK_F=block_f,
            )
            del y
        else:
            _mix(meta, query, w2, p, pe, pe_table, out)
        ctx.meta = meta
        ctx.save_for_backward(query, key, value, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                              w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, ln_w, ln_b, p, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        meta = ctx.meta
        (query, key, value, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
         w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, ln_w, ln_b, p, mean, rstd) = ctx.saved_tensors
        B, H, M, N, d, d_h, k_h = meta.B, meta.H, meta.M, meta.N, meta.d, meta.d_h, meta.k_h
        device = query.device
        pe, pe_table = _pe_args(meta, device)
        w1 = _weight_args(w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b)
        w2 = _weight_args(w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b)
        grad_out = grad_out.contiguous()
        d_ln_w = d_ln_b = None

        # ---- LayerNorm backward: dY [B, M, d] fp32 ------------------------------------------
        if meta.use_layer_norm:
            y = _empty((B, M, d), torch.float32, device)
            _mix(meta, query, w2, p, pe, pe_table, y)  # recompute Y (transient)
            block_r, block_f = _ln_blocks(d)
            n_prog = triton.cdiv(B * M, block_r)
            dy = _empty((B, M, d), torch.float32, device)
            dw_part = _empty((n_prog, d), torch.float32, device)
            db_part = _empty((n_prog, d), torch.float32, device)
            hmx_bwd_kernel_layer_norm[(n_prog,)](
                y, grad_out, ln_w.contiguous(), mean, rstd, dy, dw_part, db_part, B * M, d,
                BLOCK_R=block_r, BLOCK_F=block_f,
            )
            del y
            d_ln_w, d_ln_b = dw_part.sum(dim=0), db_part.sum(dim=0)
        else:
            dy = grad_out

        # ---- query pass: dA, MLP2 gradients, dquery ---------------------------------------
        n_chunks_q, chunk_len_q = _chunking(M)
        (fc1w, fc1b, fc2w, fc2b), has_bias = w2
        mask, smb, smn, has_mask = _mask_args(meta.query_padding_mask, query)
        dq = _empty((B, M, d), torch.float32, device)
        da_part = _empty((B * H, n_chunks_q, k_h, d_h), torch.float32, device)
        parts2 = _mlp_partials(meta, n_chunks_q, device)
        hmx_bwd_kernel_query[(B * H, n_chunks_q)](
            query, query.stride(0), query.stride(1), query.stride(2),
            mask, smb, smn, pe, pe,
            fc1w, fc1b, fc2w, fc2b, p,
            dy, dy.stride(0), dy.stride(1),
            dq, dq.stride(0),
            da_part, *parts2,
            M, chunk_len_q, n_chunks_q, H, d_h, k_h, d, meta.scale, meta.variant.first_position,
            HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_BIAS=has_bias,
            BLOCK_D=_block(d_h), BLOCK_K=_block(k_h),
        )
        del dy
        g2 = _mlp_grads(parts2, meta, n_chunks_q)
        d_a = da_part.sum(dim=1)  # [B*H, k_h, d_h], fixed order over the chunks
        # dP = dA * GELU'(P)  (tiny [B*H, k_h, d_h] tensors)
        cdf = 0.5 * (1.0 + torch.erf(p * 0.7071067811865476))
        pdf = torch.exp(-0.5 * p * p) * 0.3989422804014327
        d_p = (d_a * (cdf + p * pdf)).contiguous()

        # ---- key pass: dvalue, MLP1 gradients, dkey ---------------------------------------
        n_chunks_k, chunk_len_k = _chunking(N)
        (fc1w, fc1b, fc2w, fc2b), has_bias = w1
        mask, smb, smn, has_mask = _mask_args(meta.key_padding_mask, key)
        dk = _empty((B, N, d), torch.float32, device)
        dv = _empty((B, N, d), torch.float32, device)
        parts1 = _mlp_partials(meta, n_chunks_k, device)
        hmx_bwd_kernel_key[(B * H, n_chunks_k)](
            key, key.stride(0), key.stride(1), key.stride(2),
            value, value.stride(0), value.stride(1), value.stride(2),
            mask, smb, smn, pe, pe,
            fc1w, fc1b, fc2w, fc2b, d_p,
            dk, dv, dk.stride(0),
            *parts1,
            N, chunk_len_k, n_chunks_k, H, d_h, k_h, d, meta.scale, meta.variant.first_position,
            HAS_MASK=has_mask, PE_TABLE=pe_table, HAS_BIAS=has_bias,
            BLOCK_D=_block(d_h), BLOCK_K=_block(k_h),
        )
        g1 = _mlp_grads(parts1, meta, n_chunks_k)
        tensors = (query, key, value, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                   w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, ln_w, ln_b)
        grads = (dq, dk, dv, *g1, *g2, d_ln_w, d_ln_b)
        return (None, *_cast_grads(grads, tensors))


def hyper_mixing_triton(problem) -> torch.Tensor:
    """Run a validated `HyperMixingProblem` through the Triton kernels (differentiable)."""
    p = problem
    meta = SimpleNamespace(
        variant=p.variant, B=p.B, M=p.M, N=p.N, d=p.d, H=p.H, d_h=p.d_h, k_h=p.k_h,
        scale=float(p.variant.input_scale(p.d)), eps=float(p.eps), use_layer_norm=p.use_layer_norm,
        key_padding_mask=p.key_padding_mask, query_padding_mask=p.query_padding_mask,
    )
    ln_w = p.ln_weight if p.use_layer_norm else None
    ln_b = p.ln_bias if p.use_layer_norm else None
    with torch.autocast(device_type=p.device.type, enabled=False):
        return HyperMixingTritonFunction.apply(meta, p.query, p.key, p.value, *p.weights()[:8], ln_w, ln_b)
