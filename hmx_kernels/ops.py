"""The fused-op contract: every fast backend is a pair of `torch.library` ops with one schema.

    hmx_kernels::<backend>_fwd(query, key, value, query_keep?, key_keep?, 8 generator tensors,
                               variant, chunk_size, left_context, cu_seqlens?) -> (y, state)
        y      [B, M, d]       Y = W2 GELU(W1^T V) per head, before the LayerNorm, compute dtype
        state  [B, H, nb * k_h, d_h] P = sum_t m_t W1_t^T V_t per mixing block (fp32 / fp64),
                               saved for the backward; nb = `state_blocks(...)`, 1 when non-causal
    hmx_kernels::<backend>_bwd(grad_y, query, key, value, query_keep?, key_keep?, 8 generator
                               tensors, state, variant, chunk_size, left_context, cu_seqlens?)
                               -> 11 tensors
        dquery, dkey, dvalue (compute dtype) and the 8 generator gradients (compute dtype; an
        absent bias gets an empty tensor)
    Mixing blocks (csrc/hmx_params.h, docs/HYPERMIXING.md "Causal and chunked mixing"):
        chunk_size C (0: none) and left_context L (-1: unbounded) give the causal / chunk-causal
        modes (token-causal: C = 1); cu_seqlens (int [num_seqs + 1], with B = 1 and M = N) packs
        several sequences into the one row, each mixed on its own with positions from its start.
        A backend defined with blocks=False takes only the defaults (0, -1, None).
    Sequence parallelism: position_offset (global position of the first token) and sp_group (the
        name of a torch.distributed group whose ranks hold the other slices, "" = none), after the
        block arguments; only backends defined with sequence_parallel=True take non-defaults.
    Carried state (streaming, hmx_kernels.streaming), last: the forward's initial_state, in one
        layout for every backend, P^T (d_h before k_h, compute dtype): [B, H, d_h, k_h] (the P of
        the chunks before these tokens) is added to every block's P (unbounded left context; a
        token scan starts from it), or [B, H, num_blocks, d_h, k_h] one term per block (any left
        context; not token-causal); the backward takes initial_state (whether to return its
        gradient, as a 12th tensor) and grad_state, the gradient of the forward's state output
        (added to dP), so the state output is differentiable and a piece's final state (its last
        slot) can feed the next piece. Only backends defined with carried_state=... take them, in
        the modes that function accepts (the cpp and Triton mixing-block ops: causal /
        chunk-causal mixing, no packed sequences, no sequence-parallel group). The state output's
        slot layout is the backend's: the cpp ops on CPU tensors (the twin) keep P^T per
        [k_h, d_h]-sized slot, the cpp ops on CUDA tensors and the Triton ops P;
        `fused_stream_forward` takes that as a parameter (`slots_holding_p_t`, `slots_holding_p`).
        With one term per block, the twin's and the Triton ops' state holds each block's own
        partial state Q_j (Q_j^T in the twin's slots, csrc/hmx_params.h) instead of P_j, which their
        one-pass streaming of limited windows uses (`fused_stream_forward`, own_per_block); the
        cpp ops on CUDA tensors keep P_j (two calls per piece).

Shapes and dtypes of both are given by shared fake implementations (`make_fwd_fake`, `bwd_fake`), which
also serves the meta device; autograd is registered on the forward op (its backward calls the
backward op), and the backward op's own autograd raises a clear error: double backward is not
supported by the fused backends (use backend="reference"). The op implementations compute the
positional encoding from `variant` themselves, so no length-dependent table crosses the graph.

`run_fused(op, problem)` is what a backend's `forward` calls: the op, then one epilogue for all
fused backends (LayerNorm in fp32 with torch, cast to the problem's output dtype), so the
LayerNorm is applied in exactly one way outside the kernels.

Layer ops (`define_layer_ops`, `FusedOps.layer`): a backend may also define a pair of ops that run
the whole layer for the problems it accepts (the Triton backend: plain mixing at d_h < 128): the
LayerNorm, the output dtype, the gradients' dtypes and, for self-mixing, the one token gradient
inside its kernels; `run_fused` takes them where `accepts(problem)` says so. Their schema is in
`define_layer_ops`; their results equal the ops + epilogue up to the rounding order.

This module avoids `from __future__ import annotations`: torch.library reads the signatures'
annotations to infer the schemas.
"""
import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .problem import WEIGHT_NAMES, HyperMixingProblem, check_position_range, compute_dtype_of

__all__ = ["define_fused_ops", "run_fused", "FusedOps", "DOUBLE_BACKWARD_ERROR", "state_blocks", "flat_views",
           "fused_stream_forward", "stream_forward_of", "slots_holding_p", "slots_holding_p_t"]

NAMESPACE = "hmx_kernels"
DOUBLE_BACKWARD_ERROR = (
    "hmx_kernels: the fused HyperMixing backends do not support double backward (a gradient of a "
    "gradient, e.g. create_graph=True for a gradient penalty); use backend='reference' for that call"
)


def _sizes(query: Tensor, key: Tensor, fc2_w: Tensor):
    B, M, d = query.shape
    N = key.shape[1]
    H, k_h, d_h = fc2_w.shape
    return B, M, N, d, H, d_h, k_h


def state_blocks(N, chunk_size: int, cu_seqlens: Optional[Tensor], left_context: int = -1):
    """Block slots of the state per batch row: 1 (non-causal), ceil(N / C) with chunks of C, the
    sequence count for packed sequences, and N // C + num_seqs (an upper bound of
    sum_s ceil(len_s / C); unused slots hold zeros) for packed sequences in chunks."""
    if cu_seqlens is None:
        return 1 if chunk_size <= 0 else (N + chunk_size - 1) // chunk_size
    num_seqs = cu_seqlens.shape[0] - 1
    return num_seqs if chunk_size <= 0 else N // chunk_size + num_seqs


def check_op_args(query, key, value, query_keep, key_keep, gen, state=None, grad_y=None, chunk_size=0,
                  left_context=-1, cu_seqlens=None, state_slots=state_blocks) -> None:
    """The ops' own input check (they are public: torch.ops.hmx_kernels.*), so that no call, even
    one that bypasses `check_inputs`, makes a kernel read or write out of bounds. Raises
    ValueError / TypeError naming the argument."""
    def fail(msg, kind=ValueError):
        raise kind(f"hmx_kernels op: {msg}")

    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        fail(f"query, key and value must be [B, L, d], got {list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    B, M, d = query.shape
    N = key.shape[1]
    if tuple(key.shape) != (B, N, d) or tuple(value.shape) != (B, N, d):
        fail(f"key and value must be [B, N, d] = [{B}, N, {d}], got {list(key.shape)} and {list(value.shape)}")
    for name, t in zip(WEIGHT_NAMES[:8], gen):
        if t is None and name.endswith("weight"):
            fail(f"{name} is required (a tensor; only the biases may be None)", TypeError)
    fc1_w = gen[0]
    if fc1_w.dim() != 3 or gen[2].dim() != 3:
        fail("fc1 weights must be [H, d_h, d_h] and fc2 weights [H, k_h, d_h]")
    H, d_h, k_h = fc1_w.shape[0], fc1_w.shape[2], gen[2].shape[1]
    if H * d_h != d:
        fail(f"H * d_h = {H} * {d_h} must equal the tokens' width d = {d}")
    shapes = [(H, d_h, d_h), (H, d_h), (H, k_h, d_h), (H, k_h)] * 2
    names = WEIGHT_NAMES[:8]
    tensors = [("query", query), ("key", key), ("value", value)]
    for name, t, shape in zip(names, gen, shapes):
        if t is None:
            if name.endswith("weight"):
                fail(f"{name} is required")
            continue
        if tuple(t.shape) != shape:
            fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        tensors.append((name, t))
    cdt = compute_dtype_of(query.dtype)
    for name, keep, length in (("query_keep", query_keep, M), ("key_keep", key_keep, N)):
        if keep is None:
            continue
        if tuple(keep.shape) != (B, length):
            fail(f"{name} must have shape [{B}, {length}], got {list(keep.shape)}")
        if keep.dtype != cdt:
            fail(f"{name} must have dtype {cdt} (1 = kept, 0 = padded), got {keep.dtype}", TypeError)
        if keep.device != query.device:
            fail(f"{name} is on {keep.device} but query is on {query.device}")
    if chunk_size < 0 or left_context < -1:
        fail(f"chunk_size must be >= 0 (0: none) and left_context >= -1 (-1: unbounded), got {chunk_size}, "
             f"{left_context}")
    if (chunk_size > 0 or cu_seqlens is not None) and M != N:
        fail(f"causal, chunked and packed mixing need as many queries as keys, got M = {M}, N = {N}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            fail(f"cu_seqlens must be a 1-D int32/int64 tensor [num_seqs + 1], got {cu_seqlens.dtype} "
                 f"{list(cu_seqlens.shape)}")
        if B != 1:
            fail(f"packed sequences (cu_seqlens) need tokens [1, total, d], got B = {B}")
    nb = state_slots(N, chunk_size, cu_seqlens, left_context)
    if state is not None and tuple(state.shape) != (B, H, nb * k_h, d_h):
        fail(f"state must have shape [{B}, {H}, {nb} * {k_h}, {d_h}], got {list(state.shape)}")
    if grad_y is not None and tuple(grad_y.shape) != (B, M, d):
        fail(f"grad_y must have shape [{B}, {M}, {d}], got {list(grad_y.shape)}")
    for name, t in tensors:
        if t.dtype != query.dtype:
            fail(f"{name} has dtype {t.dtype}, query has {query.dtype}", TypeError)
        if t.device != query.device:
            fail(f"{name} is on {t.device} but query is on {query.device}")


def make_fwd_fake(state_slots=state_blocks):
    """The forward's fake (meta) implementation for a backend whose state has
    `state_slots(N, chunk_size, cu_seqlens, left_context)` [k_h, d_h] slots per (b, h)."""
    def fwd_fake(query, key, value, query_keep, key_keep, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                 w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, variant, chunk_size=0, left_context=-1, cu_seqlens=None,
                 position_offset=0, sp_group="", initial_state=None):
        B, M, N, d, H, d_h, k_h = _sizes(query, key, w1_fc2_w)
        cdt = compute_dtype_of(query.dtype)
        nb = state_slots(N, chunk_size, cu_seqlens, left_context)
        return query.new_empty((B, M, d), dtype=cdt), query.new_empty((B, H, nb * k_h, d_h), dtype=cdt)
    return fwd_fake


def bwd_fake(grad_y, query, key, value, query_keep, key_keep, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
             w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, state, variant, chunk_size=0, left_context=-1,
             cu_seqlens=None, position_offset=0, sp_group="", initial_state=None, grad_state=None):
    cdt = compute_dtype_of(query.dtype)
    out = [query.new_empty(query.shape, dtype=cdt), key.new_empty(key.shape, dtype=cdt),
           value.new_empty(value.shape, dtype=cdt)]
    for w in (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b):
        out.append(query.new_empty((0,), dtype=cdt) if w is None else w.new_empty(w.shape, dtype=cdt))
    if initial_state is not None:
        out.append(initial_state.new_empty(initial_state.shape, dtype=cdt))
    return out


class FusedOps:
    """The forward and backward op of one fused backend, and `forward`: the forward op, or in plain
    eager calls the same implementations through a torch.autograd.Function (`eager_path_allowed`)."""

    def __init__(self, fwd, bwd, eager=None, device_types=(), fwd_function=None, validated=None):
        self.fwd = fwd
        self.bwd = bwd
        self._eager = eager  # the autograd.Function over the ops' Python implementations
        # the same without the ops' own argument check (check_op_args), for arguments taken from a
        # problem `check_inputs` built (forward(..., validated=True))
        self._validated = validated if validated is not None else eager
        self.layer: Optional["LayerOps"] = None  # ops with the epilogue fused, where the backend has them
        self._eager_devices = frozenset(device_types)  # where the impls run (meta: the fake impl)
        # autograd.Function.apply takes every argument: the trailing defaults of the forward's own
        # signature (`fwd_function`, the op's schema) fill what a call leaves out
        self._defaults = (fwd_function.__defaults__ or ()) if fwd_function is not None else ()
        self._required = fwd_function.__code__.co_argcount - len(self._defaults) if fwd_function is not None else 0

    def forward(self, *args, validated: bool = False):
        """(y, state) of the forward op for `args` (its schema, trailing defaults optional).
        validated=True: the arguments come from a problem `check_inputs` built (its shapes, dtypes
        and devices agree by construction), so the eager path skips the ops' own check of them
        (about 15 us a call each way); the op path checks as always."""
        if self._eager is not None and eager_path_allowed(args[0]) and args[0].device.type in self._eager_devices:
            function = self._validated if validated else self._eager
            return function.apply(*args, *self._defaults[len(args) - self._required:])
        return self.fwd(*args)


# The eager path. A torch.library op call in eager mode costs host time of its own: the custom-op
# autograd wrapper, the dispatcher's redispatch and the schema's default filling, for the forward
# and again for the backward op (measured on the 2-core EPYC VM, d_h 32, B 1, N 64, triton
# backend with launches counted but not run: about 330 us of a 470 us forward op call and 245 us
# of a 400 us backward op call). A plain eager call does not need the op: it runs the same
# Python implementations (argument checks, impls, the same setup_context and backward) through a
# torch.autograd.Function. Anything that needs the op itself takes the op: torch.compile and
# export tracing, fake or subclass tensors, functorch transforms (vmap, grad), a dispatch mode
# (e.g. the launch and traffic accounts). Both paths compute the same values
# (tests/test_ops.py checks bitwise equality).
EAGER_PATH = True  # module switch (tests compare both paths)


def eager_path_allowed(query) -> bool:
    """Whether a forward call on `query` may skip the torch.library op (see above)."""
    return (EAGER_PATH and type(query) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active())


def define_fused_ops(
    backend: str,
    fwd_impl: Callable,
    bwd_impl: Callable,
    *,
    device_types: Sequence[str] = ("cpu", "cuda"),
    triton: bool = False,
    blocks: bool = False,
    sequence_parallel: bool = False,
    state_slots: Callable = state_blocks,
    carried_state: Optional[Callable] = None,
) -> FusedOps:
    """Define hmx_kernels::<backend>_fwd / _bwd over `fwd_impl` / `bwd_impl` (same signatures as
    `make_fwd_fake`'s function / `bwd_fake`), with the shared fake implementations and autograd.

    blocks=True: the impls take the mixing-block arguments (chunk_size, left_context, cu_seqlens)
    after `variant`; blocks=False: they are called without them, and the ops refuse anything
    but the defaults. sequence_parallel=True: the impls also take (position_offset, sp_group)
    last: the first token's global position and the name of the torch.distributed group to sum
    the cross-slice token sums over ("" = none; `group.group_name`); the ops' own backward then
    sums the gradient's sums over the same group. state_slots(N, chunk_size, cu_seqlens,
    left_context): the [k_h, d_h] slots per (b, h) of the state (default `state_blocks`).
    carried_state(chunk_size, left_context, cu_seqlens) -> bool: the modes in which the impls take
    a carried state (initial_state last in the forward; initial_state, grad_state last in the
    backward); None: the ops refuse one.

    triton=True: `torch.library.triton_op` (the impls launch kernels through `wrap_triton`, and
    torch.compile can see into them); the impls then double as their own fake implementations
    and must run on fake tensors."""

    def fwd(query: Tensor, key: Tensor, value: Tensor, query_keep: Optional[Tensor], key_keep: Optional[Tensor],
            w1_fc1_w: Tensor, w1_fc1_b: Optional[Tensor], w1_fc2_w: Tensor, w1_fc2_b: Optional[Tensor],
            w2_fc1_w: Tensor, w2_fc1_b: Optional[Tensor], w2_fc2_w: Tensor, w2_fc2_b: Optional[Tensor],
            variant: str, chunk_size: int = 0, left_context: int = -1,
            cu_seqlens: Optional[Tensor] = None, position_offset: int = 0,
            sp_group: str = "", initial_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        check_op_args(query, key, value, query_keep, key_keep,
                      (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b),
                      chunk_size=chunk_size, left_context=left_context, cu_seqlens=cu_seqlens,
                      state_slots=state_slots)
        return fwd_validated(query, key, value, query_keep, key_keep, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                             w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, variant, chunk_size, left_context, cu_seqlens,
                             position_offset, sp_group, initial_state)

    def fwd_validated(*inputs):
        """fwd without check_op_args (every argument given, in fwd's order)."""
        *args, chunk_size, left_context, cu_seqlens, position_offset, sp_group, initial_state = inputs
        query, key, variant = args[0], args[1], args[13]
        return fwd_impl(*args, *_block_args(chunk_size, left_context, cu_seqlens),
                        *_sp_args(position_offset, sp_group, variant, max(query.shape[1], key.shape[1])),
                        *_state_args(query, args[7], chunk_size, left_context, cu_seqlens, sp_group,
                                     initial_state))

    def bwd(grad_y: Tensor, query: Tensor, key: Tensor, value: Tensor, query_keep: Optional[Tensor],
            key_keep: Optional[Tensor], w1_fc1_w: Tensor, w1_fc1_b: Optional[Tensor], w1_fc2_w: Tensor,
            w1_fc2_b: Optional[Tensor], w2_fc1_w: Tensor, w2_fc1_b: Optional[Tensor], w2_fc2_w: Tensor,
            w2_fc2_b: Optional[Tensor], state: Tensor, variant: str, chunk_size: int = 0,
            left_context: int = -1, cu_seqlens: Optional[Tensor] = None, position_offset: int = 0,
            sp_group: str = "", initial_state: Optional[Tensor] = None,
            grad_state: Optional[Tensor] = None) -> List[Tensor]:
        check_op_args(query, key, value, query_keep, key_keep,
                      (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b),
                      state=state, grad_y=grad_y, chunk_size=chunk_size, left_context=left_context,
                      cu_seqlens=cu_seqlens, state_slots=state_slots)
        return bwd_validated(grad_y, query, key, value, query_keep, key_keep, w1_fc1_w, w1_fc1_b, w1_fc2_w,
                             w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, state, variant, chunk_size,
                             left_context, cu_seqlens, position_offset, sp_group, initial_state, grad_state)

    def bwd_validated(*inputs):
        """bwd without check_op_args (its arguments in order, all but initial_state and grad_state given)."""
        inputs = inputs + (None,) * (23 - len(inputs))
        *args, chunk_size, left_context, cu_seqlens, position_offset, sp_group, initial_state, grad_state = inputs
        query, key, state, variant = args[1], args[2], args[14], args[15]
        extra = _state_args(query, args[8], chunk_size, left_context, cu_seqlens, sp_group, initial_state,
                            grad_state, state)
        return bwd_impl(*args, *_block_args(chunk_size, left_context, cu_seqlens),
                        *_sp_args(position_offset, sp_group, variant, max(query.shape[1], key.shape[1])), *extra)

    def _block_args(chunk_size, left_context, cu_seqlens):
        if blocks:
            return (chunk_size, left_context, cu_seqlens)
        if chunk_size != 0 or left_context != -1 or cu_seqlens is not None:
            raise ValueError(f"hmx_kernels op: the {backend} ops do not implement causal, chunked or packed mixing "
                             "(chunk_size, left_context, cu_seqlens)")
        return ()

    def _sp_args(position_offset, sp_group, variant, length):
        if position_offset < 0:
            raise ValueError(f"hmx_kernels op: position_offset must be >= 0, got {position_offset}")
        if position_offset:
            check_position_range(variant, position_offset, length, where="hmx_kernels op: ")
        if sequence_parallel:
            return (position_offset, sp_group)
        if position_offset != 0 or sp_group:
            raise ValueError(f"hmx_kernels op: the {backend} ops do not implement position offsets or sequence "
                             "parallelism (position_offset, sp_group)")
        return ()

    def _state_args(query, fc2_w, chunk_size, left_context, cu_seqlens, sp_group, initial_state,
                    grad_state=None, state=None):
        """The impls' carried-state arguments: (initial_state,) in the forward, (initial_state,
        grad_state) in the backward (state given), () for a backend without carried_state."""
        is_backward = state is not None
        if initial_state is None and grad_state is None:
            if carried_state is None:
                return ()
            return (None, None) if is_backward else (None,)
        if carried_state is None or not carried_state(chunk_size, left_context, cu_seqlens) or sp_group:
            raise ValueError(f"hmx_kernels op: the {backend} ops take a carried state (initial_state, grad_state) "
                             "only in causal and chunk-causal mixing, without packed sequences or sequence "
                             "parallelism" if carried_state is not None else
                             f"hmx_kernels op: the {backend} ops do not take a carried state (initial_state, "
                             "grad_state)")
        B, N = query.shape[0], query.shape[1]
        H, k_h, d_h = fc2_w.shape
        cdt = compute_dtype_of(query.dtype)
        init_shape = (B, H, d_h, k_h)  # one state in every block's window
        if initial_state is not None and initial_state.dim() == 5:  # one term per block
            if chunk_size == 1 and left_context < 0:
                raise ValueError("hmx_kernels op: token-causal mixing takes one carried state [B, H, d_h, k_h], "
                                 "not one per block")
            init_shape = (B, H, state_slots(N, chunk_size, cu_seqlens, left_context), d_h, k_h)
        elif initial_state is not None and left_context >= 0:
            raise ValueError("hmx_kernels op: one carried state in every block's window [B, H, d_h, k_h] needs "
                             "unbounded left context; with limited windows pass one term per block "
                             "[B, H, num_blocks, d_h, k_h]")
        for name, t, shape in (("initial_state", initial_state, init_shape),
                               ("grad_state", grad_state, None if state is None else tuple(state.shape))):
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ValueError(f"hmx_kernels op: {name} must have shape {list(shape)}, got {list(t.shape)}")
            if t.dtype != cdt:
                raise TypeError(f"hmx_kernels op: {name} must have dtype {cdt}, got {t.dtype}")
            if t.device != query.device:
                raise ValueError(f"hmx_kernels op: {name} is on {t.device} but query is on {query.device}")
        return (initial_state, grad_state) if is_backward else (initial_state,)

    fwd_name, bwd_name = f"{NAMESPACE}::{backend}_fwd", f"{NAMESPACE}::{backend}_bwd"
    if triton:
        fwd_op = torch.library.triton_op(fwd_name, fwd, mutates_args=())
        bwd_op = torch.library.triton_op(bwd_name, bwd, mutates_args=())
    else:
        fwd_op = torch.library.custom_op(fwd_name, fwd, mutates_args=(), device_types=tuple(device_types))
        bwd_op = torch.library.custom_op(bwd_name, bwd, mutates_args=(), device_types=tuple(device_types))
        fwd_op.register_fake(make_fwd_fake(state_slots))
        bwd_op.register_fake(bwd_fake)

    n_tensors = 13  # query, key, value, 2 keeps, 8 generator tensors

    def setup_context(ctx, inputs, output):
        initial_state = inputs[n_tensors + 6] if len(inputs) > n_tensors + 6 else None
        ctx.save_for_backward(*inputs[:n_tensors], output[1], inputs[n_tensors + 3], initial_state)
        ctx.variant, ctx.chunk_size, ctx.left_context = inputs[n_tensors:n_tensors + 3]
        ctx.position_offset, ctx.sp_group = inputs[n_tensors + 4:n_tensors + 6]
        ctx.dtypes = [None if t is None else t.dtype for t in inputs[:n_tensors]]
        # an unused output's gradient comes as None, not zeros: the state's gradient is passed to the
        # backward op only where the state output was used (streaming)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, grad_state, bwd_call=None):
        saved = ctx.saved_tensors
        tensors, state, cu_seqlens = saved[:n_tensors], saved[n_tensors], saved[n_tensors + 1]
        initial_state = saved[n_tensors + 2]
        if grad_y is None:
            grad_y = torch.zeros(tensors[0].shape, dtype=compute_dtype_of(tensors[0].dtype), device=tensors[0].device)
        extra = ()
        # the state output's gradient counts where the ops carry a state (elsewhere the state holds
        # saved intermediates only, e.g. the token scan's checkpoints, and its gradient is dropped,
        # as it is when tracing materialises it as zeros)
        if carried_state is not None and not ctx.sp_group and carried_state(ctx.chunk_size, ctx.left_context,
                                                                             cu_seqlens):
            if initial_state is not None or grad_state is not None:
                extra = (initial_state, None if grad_state is None else grad_state.contiguous())
        grads = (bwd_call or bwd_op)(grad_y.contiguous(), *tensors, state, ctx.variant, ctx.chunk_size,
                                     ctx.left_context, cu_seqlens, ctx.position_offset, ctx.sp_group, *extra)
        dq, dk, dv = grads[:3]
        gen = [None if t is None else g for g, t in zip(grads[3:11], tensors[5:])]
        out = [dq, dk, dv, None, None] + gen
        out = [None if g is None else g.to(dt) for g, dt in zip(out, ctx.dtypes)]
        d_init = grads[11] if initial_state is not None else None
        return (*out, None, None, None, None, None, None, d_init)

    def bwd_setup_context(ctx, inputs, output):
        pass

    def bwd_backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    bwd_op.register_autograd(bwd_backward, setup_context=bwd_setup_context)

    def eager_function(fwd_call, bwd_call):
        class EagerFunction(torch.autograd.Function):
            """The same implementations, saved tensors and backward as the ops, without the op
            dispatch (FusedOps.forward; the inputs come with every default filled in)."""

            @staticmethod
            def forward(ctx, *inputs):
                output = fwd_call(*inputs)
                setup_context(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, grad_y, grad_state):
                # create_graph=True: through the backward op, whose own autograd raises the clear
                # error if that graph is differentiated again (as on the op path)
                return backward(ctx, grad_y, grad_state, bwd_call=None if torch.is_grad_enabled() else bwd_call)
        return EagerFunction

    return FusedOps(fwd_op, bwd_op, eager_function(fwd, bwd), device_types, fwd_function=fwd,
                    validated=eager_function(fwd_validated, bwd_validated))


# ---- layer ops: the mixing with the layer's epilogue fused (plain mixing) -----------------------
class LayerOps(FusedOps):
    """A forward and backward op that run the whole layer: the mixing, the LayerNorm (optional) and
    the cast to the output dtype, in the kernels of one backend (`define_layer_ops`); `accepts(p)`
    says which problems they take (the others go through the backend's FusedOps and the torch
    epilogue). `forward` (FusedOps') returns (out, state, ln_stats, saved)."""

    def __init__(self, fwd, bwd, eager, accepts: Callable[[HyperMixingProblem], bool], fwd_function, validated=None):
        super().__init__(fwd, bwd, eager, ("cuda", "cpu"), fwd_function, validated)
        self.accepts = accepts

    def run(self, p: HyperMixingProblem) -> Tensor:
        """The layer's output for problem `p` (one this object accepts)."""
        ln = (p.ln_weight, p.ln_bias) if p.use_layer_norm else (None, None)
        one_tensor = p.key is p.query and p.value is p.query  # self-mixing: one token gradient
        out, _state, _stats, _saved = self.forward(p.query, p.key, p.value, p.query_keep, p.key_keep,
                                                   *p.generator_weights(), *ln, p.variant.name, p.eps, one_tensor,
                                                   validated=True)
        return out


def define_layer_ops(backend: str, fwd_impl: Callable, bwd_impl: Callable,
                     accepts: Callable[[HyperMixingProblem], bool], saved_size: Callable[..., int],
                     triton: bool = True) -> LayerOps:
    """hmx_kernels::<backend>_layer_fwd / _layer_bwd for plain mixing with the layer's epilogue
    fused; triton=True: torch.library.triton_op (the impls double as their fake implementations),
    else opaque custom ops with `layer_fwd_fake` / `layer_bwd_fake` (the Triton interpreter):

        fwd(query, key, value, query_keep?, key_keep?, 8 generator tensors, ln_weight?, ln_bias?,
            variant, eps, one_tensor) -> (out [B, M, d] in query's dtype (LayerNorm applied when
            ln_weight is given), state P [B, H, k_h, d_h] fp32, ln_stats [B, M, 2] fp32 (mean,
            rstd; empty without the LayerNorm), saved: the backend's per-(b, h) values the backward
            reuses, fp32 [saved_size(B, H, d_h, has w2 fc2 bias)])
        bwd(grad_out, the forward's tensors, state, ln_stats, saved, variant, eps, one_tensor) -> 4 tensors:
            dquery, dkey, dvalue in the tokens' dtype, and one fp32 buffer holding the 8 generator
            gradients and those of ln_weight, ln_bias (`weight_grad_layout`; the autograd
            function casts it once per parameter dtype). one_tensor (query is key is value, the
            self-mixing layer call): dquery is the whole token gradient and dkey, dvalue are empty.
    """

    def fwd(query: Tensor, key: Tensor, value: Tensor, query_keep: Optional[Tensor], key_keep: Optional[Tensor],
            w1_fc1_w: Tensor, w1_fc1_b: Optional[Tensor], w1_fc2_w: Tensor, w1_fc2_b: Optional[Tensor],
            w2_fc1_w: Tensor, w2_fc1_b: Optional[Tensor], w2_fc2_w: Tensor, w2_fc2_b: Optional[Tensor],
            ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], variant: str, eps: float = 1e-5,
            one_tensor: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        gen = (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b)
        check_op_args(query, key, value, query_keep, key_keep, gen)
        _check_ln_args(query, ln_weight, ln_bias, eps)
        return fwd_impl(query, key, value, query_keep, key_keep, *gen, ln_weight, ln_bias, variant, eps)

    def fwd_validated(*inputs):  # fwd without its argument checks (every argument given, in order)
        return fwd_impl(*inputs[:-1])  # (one_tensor: the backward's)

    def bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, query_keep: Optional[Tensor],
            key_keep: Optional[Tensor], w1_fc1_w: Tensor, w1_fc1_b: Optional[Tensor], w1_fc2_w: Tensor,
            w1_fc2_b: Optional[Tensor], w2_fc1_w: Tensor, w2_fc1_b: Optional[Tensor], w2_fc2_w: Tensor,
            w2_fc2_b: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], state: Tensor,
            ln_stats: Tensor, saved: Tensor, variant: str, eps: float = 1e-5,
            one_tensor: bool = False) -> List[Tensor]:
        gen = (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b)
        check_op_args(query, key, value, query_keep, key_keep, gen, state=state, grad_y=grad_out)
        _check_ln_args(query, ln_weight, ln_bias, eps)
        B, H, d_h = query.shape[0], w1_fc1_w.shape[0], w1_fc1_w.shape[-1]
        size = saved_size(B, H, d_h, w2_fc2_b is not None)
        if saved.dtype != torch.float32 or tuple(saved.shape) != (size,):
            raise ValueError(f"hmx_kernels op: saved must be the forward's fp32 [{size}], got {saved.dtype} "
                             f"{list(saved.shape)}")
        if grad_out.dtype != query.dtype:
            raise TypeError(f"hmx_kernels op: grad_out must have the output's dtype {query.dtype}, got "
                            f"{grad_out.dtype}")
        if one_tensor and not _one_tensor(query, key, value):
            raise ValueError("hmx_kernels op: one_tensor=True needs query, key and value to be one tensor")
        return bwd_impl(grad_out, query, key, value, query_keep, key_keep, *gen, ln_weight, ln_bias, state,
                        ln_stats, saved, variant, eps, one_tensor)

    fwd_name, bwd_name = f"{NAMESPACE}::{backend}_layer_fwd", f"{NAMESPACE}::{backend}_layer_bwd"
    if triton:
        fwd_op = torch.library.triton_op(fwd_name, fwd, mutates_args=())
        bwd_op = torch.library.triton_op(bwd_name, bwd, mutates_args=())
    else:
        fwd_op = torch.library.custom_op(fwd_name, fwd, mutates_args=(), device_types=("cpu", "cuda"))
        bwd_op = torch.library.custom_op(bwd_name, bwd, mutates_args=(), device_types=("cpu", "cuda"))
        fwd_op.register_fake(layer_fwd_fake(saved_size))
        bwd_op.register_fake(layer_bwd_fake)
    n_tensors = 15  # query, key, value, 2 keeps, 8 generator tensors, ln weight and bias

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors], output[1], output[2], output[3])
        ctx.variant, ctx.eps, ctx.one_tensor = inputs[n_tensors:n_tensors + 3]
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_state, grad_stats, grad_saved, bwd_call=None):
        saved = ctx.saved_tensors
        tensors, state, stats, kept = saved[:n_tensors], saved[n_tensors], saved[n_tensors + 1], saved[n_tensors + 2]
        if grad_out is None:
            grad_out = torch.zeros_like(tensors[0])
        grads = (bwd_call or bwd_op)(grad_out.contiguous(), *tensors, state, stats, kept, ctx.variant, ctx.eps,
                                     ctx.one_tensor)
        params = tensors[5:]
        weights = split_weight_grads(grads[3], params[:8], params[8], params[9])
        tokens = [grads[0], None, None] if ctx.one_tensor else list(grads[:3])
        return (*tokens, None, None, *weights, None, None, None)

    def bwd_backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    bwd_op.register_autograd(bwd_backward, setup_context=lambda ctx, inputs, output: None)

    def eager_function(fwd_call, bwd_call):
        class EagerFunction(torch.autograd.Function):
            """The layer ops' implementations without the op dispatch (as FusedOps' eager path)."""

            @staticmethod
            def forward(ctx, *inputs):
                output = fwd_call(*inputs)
                setup_context(ctx, inputs, output)
                ctx.mark_non_differentiable(output[2], output[3])
                return output

            @staticmethod
            def backward(ctx, grad_out, grad_state, grad_stats, grad_saved):
                return backward(ctx, grad_out, grad_state, grad_stats, grad_saved,
                                bwd_call=None if torch.is_grad_enabled() else bwd_call)
        return EagerFunction

    # the validated backward: bwd_impl itself (bwd's checks are of the saved forward tensors and of
    # grad_out, whose shape and dtype autograd matches to the output's)
    return LayerOps(fwd_op, bwd_op, eager_function(fwd, bwd), accepts, fwd,
                    validated=eager_function(fwd_validated, bwd_impl))


def weight_grad_layout(gen, ln_weight=None, ln_bias=None) -> List[Optional[Tuple[int, ...]]]:
    """The shapes of the weight gradients in the layer ops' one fp32 buffer, in order (the 8
    generator tensors, then ln_weight, ln_bias if given): None for an absent tensor, which takes no
    space."""
    H, d_h, k_h = gen[0].shape[0], gen[0].shape[-1], gen[2].shape[1]
    shapes = [(H, d_h, d_h), (H, d_h), (H, k_h, d_h), (H, k_h)] * 2
    out = [None if t is None else shape for t, shape in zip(gen, shapes)]
    if ln_weight is not None:
        out += [tuple(ln_weight.shape), tuple(ln_bias.shape)]
    return out


def _strides_of(shape) -> Tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


_cached_strides = functools.lru_cache(maxsize=256)(_strides_of)


def _contiguous_strides(shape) -> Tuple[int, ...]:
    try:
        return _cached_strides(shape)
    except TypeError:  # symbolic sizes (torch.compile with dynamic shapes): not hashable
        return _strides_of(shape)


def flat_views(buffer: Tensor, shapes: Sequence) -> List[Optional[Tensor]]:
    """Consecutive contiguous views of the 1-D `buffer`, one per shape (None: no space, gives
    None; an int: a gap of that many elements, gives None), one as_strided each (a slice and a
    view are two ops: about twice the host time)."""
    need = sum(shape if isinstance(shape, int) else math.prod(shape) for shape in shapes if shape is not None)
    if need > buffer.numel():  # checked first: no view may reach past the buffer
        raise ValueError(f"hmx_kernels: {need} elements do not fit a buffer of {buffer.numel()}")
    out, offset = [], buffer.storage_offset()
    for shape in shapes:
        if shape is None or isinstance(shape, int):
            offset += shape or 0
            out.append(None)
            continue
        out.append(buffer.as_strided(shape, _contiguous_strides(shape), offset))
        offset += math.prod(shape)
    return out


def split_weight_grads(buffer: Tensor, gen, ln_weight=None, ln_bias=None) -> List[Optional[Tensor]]:
    """The layer ops' fp32 weight-gradient buffer as one gradient per tensor of (gen, ln_weight,
    ln_bias), each in its tensor's dtype (one cast of the buffer per distinct dtype), None for an
    absent tensor."""
    params = list(gen) + [ln_weight, ln_bias]
    layout = weight_grad_layout(gen, ln_weight, ln_bias)
    layout += [None] * (len(params) - len(layout))
    dtypes = {t.dtype for t in params if t is not None}
    if dtypes == {buffer.dtype}:  # the usual case (fp32 parameters, autocast too): views only
        return flat_views(buffer, layout)
    casts = {dtype: buffer if dtype == buffer.dtype else buffer.to(dtype) for dtype in dtypes}
    views = {dtype: flat_views(cast, layout) for dtype, cast in casts.items()}
    return [None if t is None else views[t.dtype][i] for i, t in enumerate(params)]


def layer_fwd_fake(saved_size):
    """The layer forward's fake implementation, its `saved` output saved_size(B, H, d_h, has_c0) long."""
    def fake(query, key, value, query_keep, key_keep, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
             w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, ln_weight, ln_bias, variant, eps=1e-5, one_tensor=False):
        B, M, N, d, H, d_h, k_h = _sizes(query, key, w1_fc2_w)
        stats = (B, M, 2) if ln_weight is not None else (0,)
        return (query.new_empty((B, M, d)), query.new_empty((B, H, k_h, d_h), dtype=torch.float32),
                query.new_empty(stats, dtype=torch.float32),
                query.new_empty((saved_size(B, H, d_h, w2_fc2_b is not None),), dtype=torch.float32))
    return fake


def layer_bwd_fake(grad_out, query, key, value, query_keep, key_keep, w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b,
                   w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b, ln_weight, ln_bias, state, ln_stats, saved, variant,
                   eps=1e-5, one_tensor=False):
    gen = (w1_fc1_w, w1_fc1_b, w1_fc2_w, w1_fc2_b, w2_fc1_w, w2_fc1_b, w2_fc2_w, w2_fc2_b)
    size = sum(math.prod(shape) for shape in weight_grad_layout(gen, ln_weight, ln_bias) if shape is not None)
    return [query.new_empty(query.shape),
            query.new_empty((0,) if one_tensor else key.shape), query.new_empty((0,) if one_tensor else value.shape),
            query.new_empty((size,), dtype=torch.float32)]


def _one_tensor(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether query, key and value can be one tensor: the same shape, and where the storage can
    be read (not while tracing, which does not keep tensor identity), the same memory."""
    if key.shape != query.shape or value.shape != query.shape:
        return False
    try:
        return (query.data_ptr() == key.data_ptr() == value.data_ptr()
                and query.stride() == key.stride() == value.stride())
    except RuntimeError:  # fake / functional tensors have no storage to compare
        return True


def _check_ln_args(query: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float) -> None:
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("hmx_kernels op: pass both ln_weight and ln_bias (the LayerNorm), or neither")
    if ln_weight is None:
        return
    d = query.shape[-1]
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(t.shape) != (d,):
            raise ValueError(f"hmx_kernels op: {name} must have shape [{d}], got {list(t.shape)}")
        if t.dtype not in (query.dtype, torch.float32):
            raise TypeError(f"hmx_kernels op: {name} must have the tokens' dtype {query.dtype} or float32, got "
                            f"{t.dtype}")
        if t.device != query.device:
            raise ValueError(f"hmx_kernels op: {name} is on {t.device} but query is on {query.device}")
    if not eps > 0:
        raise ValueError(f"hmx_kernels op: eps must be > 0, got {eps}")


def layer_norm_epilogue(y: Tensor, p: HyperMixingProblem) -> Tensor:
    """The common epilogue of the fused backends: LayerNorm over d in fp32 (fp64 for fp64), then
    the problem's output dtype. y is the fused op's [B, M, d] output in the compute dtype."""
    if p.use_layer_norm:
        y = F.layer_norm(y, (p.d,), p.ln_weight.to(y.dtype), p.ln_bias.to(y.dtype), p.eps)
    return y.to(p.out_dtype)


def run_fused(ops: FusedOps, p: HyperMixingProblem, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Run problem `p` through a fused backend's ops, then the common epilogue.

    operand_dtype: cast tokens and generator tensors to this dtype first (a backend that takes
    half inputs by upcasting passes torch.float32); the cast is differentiable, so gradients come
    back in the caller's dtypes."""
    tokens = (p.query, p.key, p.value)
    gen = p.generator_weights()
    if operand_dtype is not None and operand_dtype != p.dtype:
        def cast(t):
            return None if t is None else t.to(operand_dtype)
        cq = cast(p.query)
        ck = cq if p.key is p.query else cast(p.key)
        cv = ck if p.value is p.key else (cq if p.value is p.query else cast(p.value))
        tokens = (cq, ck, cv)
        g1 = tuple(cast(t) for t in gen[:4])
        gen = g1 + (g1 if p.tied else tuple(cast(t) for t in gen[4:]))
    # The keep vectors are already in the compute dtype, which upcasting does not change. No
    # autocast context is needed: autocast does not touch custom ops, and it runs layer_norm in
    # fp32, as the epilogue does anyway.
    if operand_dtype is None and ops.layer is not None and ops.layer.accepts(p):
        return ops.layer.run(p)  # the epilogue in the backend's kernels
    y, _state = ops.forward(*tokens, p.query_keep, p.key_keep, *gen, p.variant.name, *p.blocks.op_args(),
                            p.position_offset, _group_name(p.sequence_parallel_group), validated=True)
    return layer_norm_epilogue(y, p)


# ---- one streamed piece on a fused backend (hmx_kernels.streaming) ---------------------------------
def slots_holding_p_t(state: Tensor, p: HyperMixingProblem) -> Tensor:
    """The op state [B, H, slots * k_h, d_h] of ops whose slots hold P^T (the cpp ops on CPU
    tensors: the twin) as P per slot, [B, H, slots, k_h, d_h] (a differentiable view)."""
    return state.view(p.B, p.H, -1, p.d_h, p.k_h).transpose(-1, -2)


def slots_holding_p(state: Tensor, p: HyperMixingProblem) -> Tensor:
    """The op state of ops whose slots hold P itself (the Triton ops; the cpp ops on CUDA tensors),
    [B, H, slots, k_h, d_h]."""
    return state.view(p.B, p.H, -1, p.k_h, p.d_h)


def fused_stream_forward(ops: FusedOps, p: HyperMixingProblem, carry: Optional[Tensor],
                         slot_states: Callable[[Tensor, HyperMixingProblem], Tensor] = slots_holding_p_t,
                         own_per_block: bool = False) -> Tuple[Tensor, Tensor]:
    """One streamed piece `p` (hmx_kernels.streaming; causal or chunk-causal, no packed sequences,
    p.position_offset = the piece's first position) through fused ops defined with
    carried_state=... Returns (output [B, n, d] after the common epilogue, the next carry).

    carry: None (the first piece) or the streaming state's carry in the compute dtype, P layout:
    [B, H, k_h, d_h] (unbounded left context: the sum of every earlier chunk's partial state Q_j)
    or [B, H, r <= L, k_h, d_h] (L chunks of left context: the last r chunks' own Q_j, oldest
    first). slot_states(state, p) -> [B, H, slots, k_h, d_h]: the op's state output as P per slot
    (`slots_holding_p_t` for the cpp ops, `slots_holding_p` for Triton's); its last slot must hold
    the state after the piece's last token (the last block's P, or a token scan's final P). The
    carry goes to the ops as initial_state in their shared layout, P^T, and the result is
    differentiable through it: the ops' backward returns the carry's gradient and takes the
    gradient of their state output.

    Unbounded left context: the carry enters every block's window (or starts the token scan),
    one op call; the next carry is the last slot. L chunks of left context: the next carry is the
    last L chunks' own Q_j, which no window sum holds. A first call with block-local windows
    (L = 0) gives every chunk's Q_j as its state; the window terms E_j = the L chunks before chunk
    j (carried and this piece's), summed explicitly in chunk order, go into a second call with
    block-local windows and one term per block, so that P_j = Q_j + E_j: about twice the cost of
    a call without a carried state (one call when L = 0).
    own_per_block=True (ops whose state holds each block's own Q_j when the initial state is one
    term per block: the twin, the Triton ops): one call instead, with this piece's windows of L
    chunks and E_j = the carried chunks within L of chunk j (`_one_pass_limited`)."""
    C, L = p.mode.chunk_size, p.mode.left_context_chunks
    args = (p.query, p.key, p.value, p.query_keep, p.key_keep, *p.generator_weights(), p.variant.name)
    if L is None:
        init = None if carry is None else carry.transpose(-1, -2).contiguous()
        y, state = ops.forward(*args, C, -1, None, p.position_offset, "", init)
        slots = slot_states(state, p)
        return layer_norm_epilogue(y, p), slots[:, :, slots.shape[2] - 1]
    if own_per_block:
        return _one_pass_limited(ops, p, carry, slot_states, args)
    nb = (p.N + C - 1) // C
    y, own = ops.forward(*args, C, 0, None, p.position_offset, "")  # y is final when L = 0
    q = slot_states(own, p)[:, :, :nb]  # Q_j of this piece's chunks
    r = 0 if carry is None else carry.shape[2]
    chunks = q if carry is None else torch.cat([carry, q], dim=2)  # [B, H, r + nb, k_h, d_h]
    if L > 0:
        terms = torch.zeros_like(q)
        for shift in range(1, L + 1):  # E_j += Q_{j - shift}, every chunk before j within L
            j0 = max(0, shift - r)
            if j0 < nb:
                terms[:, :, j0:] = terms[:, :, j0:] + chunks[:, :, r + j0 - shift:r + nb - shift]
        y, _ = ops.forward(*args, C, 0, None, p.position_offset, "", terms.transpose(-1, -2).contiguous())
    return layer_norm_epilogue(y, p), chunks[:, :, chunks.shape[2] - min(L, chunks.shape[2]):]


def _one_pass_limited(ops: FusedOps, p: HyperMixingProblem, carry: Optional[Tensor],
                      slot_states: Callable[[Tensor, HyperMixingProblem], Tensor], args: tuple) -> Tuple[Tensor, Tensor]:
    """One streamed piece with L chunks of left context in one op call, for ops whose state holds
    each block's own partial state Q_j when given one carried term per block: this piece's windows
    of L chunks, and E_j = the carried chunks within L of chunk j (summed here in chunk order; only
    the first chunks have any) as chunk j's term. The output and the next carry (the last L
    chunks' own Q_j, carried ones first) come from the one call."""
    C, L = p.mode.chunk_size, p.mode.left_context_chunks
    nb = (p.N + C - 1) // C
    r = 0 if carry is None else carry.shape[2]
    terms = p.query.new_zeros((p.B, p.H, nb, p.k_h, p.d_h), dtype=compute_dtype_of(p.query.dtype))
    for j in range(nb):
        lo = max(0, r + j - L)
        if lo >= r:
            break
        e = carry[:, :, lo]
        for i in range(lo + 1, r):
            e = e + carry[:, :, i]
        terms[:, :, j] = e
    y, own = ops.forward(*args, C, L, None, p.position_offset, "", terms.transpose(-1, -2).contiguous())
    q = slot_states(own, p)[:, :, :nb]  # Q_j [.., k_h, d_h] of this piece's chunks
    keep = min(L, r + nb)  # the next carry: the last L chunks, carried ones first
    from_carry = max(0, keep - nb)
    tail = q[:, :, nb - (keep - from_carry):]
    final = torch.cat([carry[:, :, r - from_carry:], tail], dim=2) if from_carry else tail
    return layer_norm_epilogue(y, p), final


def stream_forward_of(ops: FusedOps, slot_states: Callable[[Tensor, HyperMixingProblem], Tensor]) -> Callable:
    """A `Backend.stream_forward` (problem, carry) -> (output, next carry) over `ops`: what a fused
    backend registers, with `Capabilities.carried_state` saying in which modes its ops take one."""
    def stream_forward(p: HyperMixingProblem, carry: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return fused_stream_forward(ops, p, carry, slot_states)
    return stream_forward


def _group_name(group) -> str:
    """The ops' name for a torch.distributed group ("" = no sequence parallelism)."""
    if group is None:
        return ""
    import torch.distributed as dist

    if group is dist.group.WORLD:
        group = dist.distributed_c10d._get_default_group()
    return group.group_name
