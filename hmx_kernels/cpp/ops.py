"""The C++ extension as torch.library ops (hmx_kernels::cpp_fwd / cpp_bwd); the backends that run
them are registered in cpp/cpu.py ("cpu") and cpp/cuda.py ("cuda").

The extension computes Y = W2 GELU(W1^T V) per head in fused tiled passes (no [N, k] tensor) and
its backward; `hmx_kernels.ops` gives the ops their schema, fake (meta) implementation and
autograd, and applies the LayerNorm. The op implementations below resolve the extension once per
process (first call: build or load from the cache) and then only call it: no lock, no environment
read, no file-system access per call. They compute the positional-encoding rows themselves (from
the process-wide cache of `hmx_kernels.positional`, so the rows equal the reference's;
with a position offset only the slice's own rows, computed as the reference computes them).

- "cpu": CPU tensors. float32 and float64 natively; float16 / bfloat16 (e.g. under autocast) are
  computed in float32 (inputs upcast, result cast back), which is also what the reference does.
  The meta device runs the ops' shape functions.
- "cuda": CUDA tensors, float32 / float16 / bfloat16 (fp32 accumulation), where torch has CUDA
  (and nvcc exists, unless a finished build is found).
The extension is found prebuilt or in the cache (no compiler needed), else built; if neither
works, both backends report why; "auto" falls back to the reference and warns once.
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

import torch
from torch import Tensor

from ..config import SETTINGS, on_change
from ..dispatch import constant_result
from ..ops import (define_fused_ops, fused_stream_forward, run_fused, slots_holding_p, slots_holding_p_t,
                   state_blocks, stream_forward_of)
from ..positional import cached_positional_encoding, positional_encoding
from ..problem import HyperMixingProblem
from ..variants import get_variant
from . import build

__all__ = ["CPP_OPS", "cpp_forward", "extension", "extension_reasons", "HALF_DTYPES"]

HALF_DTYPES = (torch.float16, torch.bfloat16)

_EXTENSIONS: Dict[bool, object] = {}  # with_cuda -> loaded module (resolved once)
_REASONS: Dict[str, Tuple[str, ...]] = {}  # device type -> () or why the extension is unusable


def _apply_settings(settings) -> None:
    for module in _EXTENSIONS.values():
        module.set_options(settings.poison, settings.allow_mma)


def loaded_extensions():
    """The extension modules loaded so far (none is built or loaded here)."""
    return list(_EXTENSIONS.values())


def extension(device_type: str):
    """The extension module for tensors of `device_type` (built or loaded on first use)."""
    with_cuda = device_type == "cuda"
    module = _EXTENSIONS.get(with_cuda)
    if module is None:
        module = build.load_extension(with_cuda=with_cuda)
        module.set_options(SETTINGS.poison, SETTINGS.allow_mma)
        _EXTENSIONS[with_cuda] = module
    return module


on_change(_apply_settings)


@constant_result
def extension_reasons(device_type: str) -> Tuple[str, ...]:
    """() when the extension for `device_type` tensors loads (building it if needed), else why
    not (and a warning, once). Memoised; under torch.compile it runs at trace time."""
    reasons = _REASONS.get(device_type)
    if reasons is None:
        reasons = ()
        if device_type == "cuda":
            why = build.cuda_run_possible()  # nvcc is needed only if no finished build exists
            if why:
                reasons = ("CUDA kernels unavailable: " + "; ".join(why),)
        if not reasons:
            try:
                extension(device_type)
            except build.ExtensionBuildError as e:
                warnings.warn(f"{e}\nhmx_kernels falls back to another backend (backend='auto' uses the reference).",
                              RuntimeWarning, stacklevel=2)
                reasons = (str(e),)
        _REASONS[device_type] = reasons
    return reasons


def _tokens(t: Tensor) -> Tensor:
    # the kernels take any batch stride, a unit channel stride and rows at least d apart (BLAS
    # leading dimensions; the binding checks it and fixes a single row's stride); anything else
    # (expand, unfold windows, transposed views) is copied
    if t.stride(-1) != 1 or (t.shape[1] > 1 and t.stride(1) < t.shape[2]):
        return t.contiguous()
    return t


def _c(t):
    return None if t is None else t.contiguous()


def _pe_rows(variant: str, q: Tensor, k: Tensor, dtype: torch.dtype, rows=None, offset: int = 0):
    # rows: PE rows for packed sequences (the longest sequence), else one per token; offset: the
    # first token's global position (a sequence-parallel slice): rows offset .. offset + L - 1
    v = get_variant(variant)
    M, N, d = q.shape[1], k.shape[1], q.shape[2]

    def table(length):
        if offset:  # only the slice's rows: the cache's tables start at position 0 (O(offset) rows)
            return positional_encoding(v, length, d, start=v.first_position + offset,
                                       device=q.device).to(dtype).contiguous()
        return cached_positional_encoding(v, length, d, q.device).to(dtype).contiguous()

    pe_k = table(rows or N)  # [N, d]
    pe_q = pe_k if (rows or M == N) else table(M)
    return pe_q, pe_k, v.input_scale(d)


def _reducer(sp_group: str):
    """The extension's `reduce` callback for sequence parallelism: an in-place sum over the group."""
    if not sp_group:
        return None
    import torch.distributed as dist

    group = dist.distributed_c10d._resolve_process_group(sp_group)

    def reduce(t: Tensor) -> None:
        dist.all_reduce(t, group=group)
    return reduce


# The CPU twin's token tile (csrc/hmx_cpu.h kCpuTile; the extension's CPU_TILE, checked in tests).
CPU_TILE = 256


def cpu_state_slots(N, chunk_size: int, cu_seqlens, left_context: int = -1):
    """[k_h, d_h] state slots per (b, h) of the cpp ops: one per mixing block (`state_blocks`),
    except token-causal mixing, which the twin runs as a scan keeping one checkpoint of P per tile
    of CPU_TILE tokens (csrc/hmx_cpu_scan.h) and, last, the state after the last token."""
    if chunk_size == 1 and left_context < 0:
        return (N + CPU_TILE - 1) // CPU_TILE + 1
    return state_blocks(N, chunk_size, cu_seqlens, left_context)


def _blocks(query: Tensor, key: Tensor, chunk_size: int, left_context: int, cu_seqlens):
    """The binding's block arguments and the PE row count (None: one row per token)."""
    N = key.shape[1]
    if cu_seqlens is None:
        return (chunk_size, left_context, None, cpu_state_slots(N, chunk_size, None, left_context)), None
    cu = cu_seqlens.to("cpu", torch.int64).contiguous()
    rows = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 1
    return (chunk_size, left_context, cu, cpu_state_slots(N, chunk_size, cu, left_context)), max(rows, 1)


def _ctype(q: Tensor) -> torch.dtype:
    # the extension's side inputs and state: the input type on the CPU, fp32 on CUDA
    return torch.float32 if q.is_cuda else q.dtype


def _sum_size(query: Tensor, fc2_w: Tensor) -> int:
    """Values per all-reduce of the extension (forward: key sums S, sv; backward: query sums T, sdy):
    the twin's B H (d_h^2 + d_h), the CUDA kernels' B H (D^2 + D) with d_h padded to their head
    block D (csrc/hmx_params.h, Reducer)."""
    B, (H, _, d_h) = query.shape[0], fc2_w.shape
    return extension(query.device.type).reduce_count(B, H, d_h, query.is_cuda)


def _empty_slice_fwd(query, gen, sp_group):
    """A sequence-parallel rank without tokens (the extension refuses empty inputs): it adds zero
    sums to the group's all-reduce, as the twin's forward would, and returns an empty output."""
    B, _, d = query.shape
    H, k_h, d_h = gen[2].shape
    ctype = _ctype(query)
    reduce = _reducer(sp_group)
    if reduce is not None:
        reduce(query.new_zeros(_sum_size(query, gen[2]), dtype=ctype))
    return query.new_zeros((B, 0, d), dtype=ctype), query.new_zeros((B, H, k_h, d_h), dtype=ctype)


def _empty_slice_bwd(query, key, value, gen, sp_group):
    """The backward of `_empty_slice_fwd`: zero sums to the backward's all-reduce, zero gradients."""
    ctype = _ctype(query)
    reduce = _reducer(sp_group)
    if reduce is not None:
        reduce(query.new_zeros(_sum_size(query, gen[2]), dtype=ctype))
    out = [t.new_zeros(t.shape, dtype=ctype) for t in (query, key, value)]
    return out + [query.new_empty((0,), dtype=ctype) if w is None else w.new_zeros(w.shape, dtype=ctype) for w in gen]


def _cpp_fwd_impl(query, key, value, query_keep, key_keep, *rest):
    *gen, variant, chunk_size, left_context, cu_seqlens, position_offset, sp_group, initial_state = rest
    if query.shape[1] == 0 and key.shape[1] == 0:
        return _empty_slice_fwd(query, gen, sp_group)
    ext = extension(query.device.type)
    ctype = _ctype(query)
    blocks, rows = _blocks(query, key, chunk_size, left_context, cu_seqlens)
    pe_q, pe_k, scale = _pe_rows(variant, query, key, ctype, rows, position_offset)
    q, k, v = _tokens(query), _tokens(key), _tokens(value)
    y, state = ext.forward(q, k, v, pe_q, pe_k, _c(query_keep), _c(key_keep), *[_c(w) for w in gen], float(scale),
                           *blocks, reduce=_reducer(sp_group), p_init=_c(initial_state))
    return y.to(ctype), state


def _cpp_bwd_impl(grad_y, query, key, value, query_keep, key_keep, *rest):
    *gen, state, variant, chunk_size, left_context, cu_seqlens, position_offset, sp_group, initial_state, \
        grad_state = rest
    if query.shape[1] == 0 and key.shape[1] == 0:
        grads = _empty_slice_bwd(query, key, value, gen, sp_group)
        return grads if initial_state is None else grads + [torch.zeros_like(initial_state)]
    ext = extension(query.device.type)
    ctype = _ctype(query)
    blocks, rows = _blocks(query, key, chunk_size, left_context, cu_seqlens)
    pe_q, pe_k, scale = _pe_rows(variant, query, key, ctype, rows, position_offset)
    q, k, v = _tokens(query), _tokens(key), _tokens(value)
    # one carried term per block: the state holds the blocks' own partial states, and the backward
    # forms P from it and the same terms (csrc/hmx_params.h, ForwardParams::p_init)
    n_init = initial_state.shape[2] if initial_state is not None and initial_state.dim() == 5 else 0
    # dY in the compute type: fp32 on CUDA, so a small dY is not flushed to zero in fp16
    grads = ext.backward(grad_y.to(ctype).contiguous(), q, k, v, pe_q, pe_k, _c(query_keep), _c(key_keep),
                         *[_c(w) for w in gen], state.contiguous(), float(scale), *blocks,
                         reduce=_reducer(sp_group), dp_extra=_c(grad_state),
                         want_dp_init=initial_state is not None, n_init=n_init,
                         p_init=_c(initial_state) if n_init else None)
    out = [g.to(ctype) for g in grads[:3]]
    out += [query.new_empty((0,), dtype=ctype) if g is None else g for g in grads[3:11]]
    if initial_state is not None:
        out.append(grads[11])
    return out


def cpu_carries_state(chunk_size: int, left_context: int, cu_seqlens) -> bool:
    """The cpp ops take a carried state (initial_state; streaming) and the gradient of their state
    output in causal and chunk-causal mixing without packed sequences (CUDA tensors: not
    token-causal): a state in every block's window [B, H, d_h, k_h] with unbounded left context
    (the CPU twin's token scan starts from it), or one term per block [B, H, num_blocks, d_h, k_h],
    with which the CPU twin's state output holds each block's own partial state Q_j^T instead of
    P_j^T (the CUDA kernels' keeps P_j; csrc/hmx_params.h, ForwardParams::p_init)."""
    return chunk_size >= 1 and cu_seqlens is None


CPP_OPS = define_fused_ops("cpp", _cpp_fwd_impl, _cpp_bwd_impl, device_types=("cpu", "cuda"), blocks=True,
                           sequence_parallel=True, state_slots=cpu_state_slots, carried_state=cpu_carries_state)


# One streamed piece on the cpp ops (hmx_kernels.streaming). The CUDA kernels' state slots hold P
# (chunk-causal only: they decline token-causal mixing): the generic fused version,
# hmx_kernels.ops.fused_stream_forward (two calls per piece with a limited left context). The CPU
# twin's slots hold P^T, and with one carried term per block its state holds the chunks' own
# partial states: one call per piece in every mode (cpu_stream_forward).
cuda_stream_forward = stream_forward_of(CPP_OPS, slots_holding_p)
_twin_stream_unbounded = stream_forward_of(CPP_OPS, slots_holding_p_t)


def cpu_stream_forward(p: HyperMixingProblem, carry):
    """One streamed piece on the CPU twin (hmx_kernels.streaming), one pass of the op. Unbounded
    left context: the generic function (the carried state P [B, H, k_h, d_h] enters every block's
    window, the token scan starts from it; the next state is the op state's last slot). L chunks of
    left context: the carry is the last L chunks' own partial states [B, H, r <= L, k_h, d_h]; with
    one term per block the op's state is each chunk's own Q_j^T (csrc/hmx_params.h), so the output
    and the next carry come from one pass (hmx_kernels.ops.fused_stream_forward, own_per_block)."""
    if p.mode.left_context_chunks is None:
        return _twin_stream_unbounded(p, carry)
    return fused_stream_forward(CPP_OPS, p, carry, slots_holding_p_t, own_per_block=True)


cpp_stream_forward = cpu_stream_forward  # the cpu backend's streamed-piece function


def _cpu_carries(mode) -> bool:
    return cpu_carries_state(mode.chunk_size, -1 if mode.left_context_chunks is None else mode.left_context_chunks,
                             None)  # every causal mode


def _cuda_carries(mode) -> bool:
    return _cpu_carries(mode) and not mode.token_causal  # the CUDA kernels: chunk-causal only


def cpp_forward(p: HyperMixingProblem) -> Tensor:
    """Runs `p` through the extension (CPU twin or CUDA kernels, by the tensors' device)."""
    upcast = p.device.type != "cuda" and p.dtype in HALF_DTYPES
    return run_fused(CPP_OPS, p, operand_dtype=torch.float32 if upcast else None)


# Shared memory per block of the largest CUDA kernel (query / key) when fp32 kernels run at
# 64 < d_h <= 128 (float32 inputs, or fp16 / bf16 with tensor cores off): more than an A100's
# 163 KB, within an H100's 227 KB. fp16 / bf16 on tensor cores need at most 131 KB (fit sm_80).
# The value is the kernels' own smem-size function (the sm_80 cuda rows of
# benchmarks/results/kernels-limit.csv; a test checks the two agree); csrc's
