"""Functional HyperMixing: validate, pick a backend, run it."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from .dispatch import BackendNotSupportedError, check_backend_name, run, select_backend
from .parallel import agree_on_slices, call_signature
from .problem import check_inputs

__all__ = ["hyper_mixing", "mix"]


def hyper_mixing(
    query: Tensor,
    key: Optional[Tensor],
    value: Optional[Tensor],
    w1_fc1_weight: Tensor,
    w1_fc1_bias: Optional[Tensor],
    w1_fc2_weight: Tensor,
    w1_fc2_bias: Optional[Tensor],
    w2_fc1_weight: Optional[Tensor] = None,
    w2_fc1_bias: Optional[Tensor] = None,
    w2_fc2_weight: Optional[Tensor] = None,
    w2_fc2_bias: Optional[Tensor] = None,
    ln_weight: Optional[Tensor] = None,
    ln_bias: Optional[Tensor] = None,
    *,
    variant: str = "speechbrain",
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    use_layer_norm: bool = True,
    eps: float = 1e-5,
    backend: str = "auto",
    causal: bool = False,
    chunk_size: Optional[int] = None,
    left_context_chunks: Optional[int] = None,
    position_offset: Optional[int] = None,
    sequence_parallel_group=None,
) -> Tensor:
    """HyperMixing token mixing (docs/HYPERMIXING.md), differentiable in every tensor argument.

    Shapes (B batch, M queries, N keys, d width, H heads, d_h = d / H, k_h hypernet size per head):
        query [B, M, d]; key, value [B, N, d] (speechbrain variant: ignored, query is used; pass None)
        w*_fc1_weight [H, d_h, d_h], w*_fc1_bias [H, d_h] or None,
        w*_fc2_weight [H, k_h, d_h], w*_fc2_bias [H, k_h] or None
        w2_* all None: tied (the w1 hypernetwork generates W2 too)
        ln_weight, ln_bias [d] (needed when use_layer_norm)
        key_padding_mask [B, N], query_padding_mask [B, M]: bool, True = padded (uint8: non-zero)
          (speechbrain variant: one mask, passed as key_padding_mask)
    Returns [B, M, d] in the dtype of query; computation is accumulated in fp32.

    backend: "auto" (best available for the device), "reference", or a fast backend's name
    (see `hmx_kernels.registered_backends()`).

    causal=True: token-causal mixing (query t mixes keys s <= t); chunk_size=C (with optional
    left_context_chunks=L): chunk-causal mixing, a token in chunk c mixes the keys of chunks
    max(0, c - L) .. c (speechbrain's Dynamic Chunk Training). Both need M == N; see
    hmx_kernels.causal. Backends that do not implement a mode say so (the reference does).

    position_offset: global position of the first token, for a slice of a longer sequence
    (None: 0, or with a group the number of tokens on the lower ranks).
    sequence_parallel_group: a torch.distributed group whose ranks each hold one contiguous slice
    of every sequence (non-causal): the cross-token sums are all-reduced over it (one all-reduce
    in the forward and one in the backward: B x H x (d_h^2 + d_h) values each on the cpu backend,
    B x H x (D^2 + D) fp32 on cuda (d_h padded to its head block D), the [B, H, k_h, d_h] state on
    the reference), and each rank gets its slice of the unsplit result.
    Before them, one small all-gather (hmx_kernels.parallel.agree_on_slices) gives each rank its
    offset and checks that every rank makes the same call (backend, variant, dtype, B, H, d_h,
    k_h, mode): otherwise, or when any rank's inputs are refused, every rank raises. A rank may hold
    an empty slice (no queries and no keys). Cross-mixing (idiap, M queries, N keys) runs when the
    query and key slices start at the same global position on every rank; otherwise every rank raises.

    Dtypes: parameters must have the tokens' dtype, except under torch.autocast, where tokens and
    hypernetwork weights are cast to the autocast dtype and the result has that dtype (the rule
    is in `hmx_kernels.problem`). Works under torch.compile (fullgraph, dynamic lengths; with a
    sequence_parallel_group the agreement all-gather breaks the graph) and torch.export: the fused backends are torch.library ops (`torch.ops.hmx_kernels.*`).

    Example:
        >>> import torch, hmx_kernels
        >>> H, d_h, k_h = 2, 4, 8
        >>> x = torch.randn(2, 5, H * d_h)
        >>> w = [torch.randn(H, d_h, d_h), torch.randn(H, d_h), torch.randn(H, k_h, d_h), torch.randn(H, k_h)]
        >>> ln = [torch.ones(H * d_h), torch.zeros(H * d_h)]
        >>> hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln).shape
        torch.Size([2, 5, 8])
    """
    check_backend_name(backend)
    return mix((query, key, value, w1_fc1_weight, w1_fc1_bias, w1_fc2_weight, w1_fc2_bias,
                w2_fc1_weight, w2_fc1_bias, w2_fc2_weight, w2_fc2_bias, ln_weight, ln_bias),
               backend=backend, position_offset=position_offset, sequence_parallel_group=sequence_parallel_group,
               variant=variant, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
               use_layer_norm=use_layer_norm, eps=eps, causal=causal, chunk_size=chunk_size,
               left_context_chunks=left_context_chunks)


def mix(tensors, *, backend: str, position_offset: Optional[int] = None, sequence_parallel_group=None,
        on_chosen: Optional[Callable] = None, **options) -> Tensor:
    """The one route of `hyper_mixing` and the layer: the 13 tensors, validated into a problem,
    run by the dispatcher (hmx_kernels.dispatch.run) or, with a sequence-parallel group, agreed
    with the other ranks first. `on_chosen(problem, backend_name)` sees the choice before the run."""
    group = sequence_parallel_group
    if group is not None:
        return _sequence_parallel(*tensors, backend=backend, position_offset=position_offset, group=group,
                                  on_chosen=on_chosen, **options)
    problem = check_inputs(*tensors, **options, position_offset=0 if position_offset is None else position_offset)
    return run(backend, problem, on_chosen)


# what a rank's own input check raises; such a rank still joins the group's all-gather
_REFUSALS = (ValueError, TypeError, NotImplementedError, BackendNotSupportedError)


SEQUENCE_PARALLEL_COMPILE_NOTE = (
    "hmx_kernels: with a sequence_parallel_group every call first agrees with the other ranks in one "
    "all-gather read on the host (slice lengths, offsets, call signature), which torch.compile cannot "
    "capture in the graph"
)


def _sequence_parallel(*tensors, backend: str, position_offset: Optional[int], group, on_chosen=None,
                       **options) -> Tensor:
    """hyper_mixing over a sequence-parallel group: check locally, agree with the other ranks in
    one all-gather (every rank raises together on any refusal or mismatch), then run."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=SEQUENCE_PARALLEL_COMPILE_NOTE)
    refusal = None
    try:
        problem = check_inputs(*tensors, **options, position_offset=position_offset or 0,
                               sequence_parallel_group=group)
        chosen = select_backend(backend, problem)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors)
        signature = call_signature(chosen.name, problem, needs_grad)
    except _REFUSALS as e:
        refusal, signature = e, None
    query = tensors[0]
    lengths = (0, 0) if refusal is not None else (problem.M, problem.N)
    device = query.device if isinstance(query, Tensor) and query.is_cuda else None
    variant = None if refusal is not None else problem.variant.name  # same on every rank, or a mismatch
    offset = agree_on_slices(*lengths, signature, group, device=device, variant=variant)
    if refusal is not None:
        raise refusal
    if position_offset is None and offset != problem.position_offset:
        problem = dataclasses.replace(problem, position_offset=offset)
    if on_chosen is not None:
        on_chosen(problem, chosen.name)
    return chosen.forward(problem)
