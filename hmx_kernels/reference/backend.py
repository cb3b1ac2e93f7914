"""Registers the reference implementation as the `reference` backend (any device, any float dtype)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..blocks import ALL_KINDS, MixingBlocks
from ..dispatch import Backend, Capabilities, register_backend
from ..problem import FLOAT_DTYPES, HyperMixingProblem
from .hyper_mixing import hyper_mixing_ref


def _padding(keep):
    return None if keep is None else keep == 0


def reference_forward(p: HyperMixingProblem) -> Tensor:
    if p.cu_seqlens is not None:
        return _packed_forward(p)
    key_pad = _padding(p.key_keep)
    query_pad = key_pad if p.query_keep is p.key_keep else _padding(p.query_keep)
    y = hyper_mixing_ref(
        p.query, p.key, p.value, *p.generator_weights(), p.ln_weight, p.ln_bias,
        variant=p.variant.name,
        key_padding_mask=key_pad,
        query_padding_mask=query_pad,
        use_layer_norm=p.use_layer_norm,
        eps=p.eps,
        mode=p.mode,
        position_offset=p.position_offset,
        sequence_parallel_group=p.sequence_parallel_group,
    )
    return y if y.dtype == p.out_dtype else y.to(p.out_dtype)


def _packed_forward(p: HyperMixingProblem) -> Tensor:
    """Packed sequences (B = 1): each sequence is mixed on its own, as a batch of one."""
    lengths = (p.cu_seqlens[1:] - p.cu_seqlens[:-1]).tolist()

    def pieces(t):
        return [None] * len(lengths) if t is None else torch.split(t, lengths, dim=1)

    parts = zip(pieces(p.query), pieces(p.key), pieces(p.value), pieces(p.query_keep), pieces(p.key_keep))
    outs = []
    for n, (q, k, v, qk, kk) in zip(lengths, parts):
        if n == 0:
            continue
        outs.append(reference_forward(dataclasses.replace(
            p, query=q, key=q if p.key is p.query else k, value=q if p.value is p.query else v,
            query_keep=qk, key_keep=qk if p.key_keep is p.query_keep else kk, M=n, N=n, blocks=MixingBlocks(p.mode))))
    return torch.cat(outs, dim=1)


def reference_stream_forward(p: HyperMixingProblem, carry):
    """One streamed piece (hmx_kernels.streaming): (output, the carried state after it)."""
    pad = _padding(p.key_keep)
    y, final = hyper_mixing_ref(
        p.query, p.key, p.value, *p.generator_weights(), p.ln_weight, p.ln_bias,
        variant=p.variant.name, key_padding_mask=pad, query_padding_mask=pad,
        use_layer_norm=p.use_layer_norm, eps=p.eps, mode=p.mode, position_offset=p.position_offset,
        initial_state=carry, output_final_state=True,
    )
    return (y if y.dtype == p.out_dtype else y.to(p.out_dtype)), final


register_backend(
    Backend(
        name="reference",
        description="plain PyTorch (fp32 compute, materialises W1/W2: O(N*k) memory); any device; "
                    "the only backend with double backward",
        forward=reference_forward,
        capabilities=Capabilities(devices=("*",), dtypes=FLOAT_DTYPES, blocks=ALL_KINDS,
                                  sequence_parallel=True, carried_state=lambda mode: True),
        stream_forward=reference_stream_forward,
    )
)
