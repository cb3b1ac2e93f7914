"""Sequence parallelism helpers: each rank of a group holds one contiguous slice of every sequence.

HyperMixing's whole cross-token state is a sum over tokens, so the ranks all-reduce sums in the
forward and the backward, and a layer's communication per step does not depend on the sequence
length. How much it is depends on the backend: the reference all-reduces its state
P = sum_t m_t W1_t^T V_t and autograd its gradient, 2 x B x H x k_h x d_h values per step; the
`cpu` backend (reassociated form) all-reduces the key sums S = sum m hid^T V and sv in the forward
and the query sums T and sdy in the backward, 2 x B x H x (d_h^2 + d_h) values, about k_h / d_h times
less (tests/test_sp_comm.py counts both); the `cuda` backend the same sums with d_h padded to its
head block D (32, 64 or 128), 2 x B x H x (D^2 + D) fp32 values. A slice's
positional encoding continues from its global offset, the number of tokens on lower ranks.

Before those all-reduces, every call with a group runs one small all-gather (`agree_on_slices`):
each rank sends its slice lengths and a signature of the call (backend, variant, dtype, B, H,
d_h, k_h, mode, whether a backward follows). The ranks then issue the same collectives, or all of
them raise the same error naming what differs: a mismatch would otherwise abort the process inside
gloo, or, where the tensor sizes happen to agree, silently return garbage on every rank. A rank
whose own inputs were refused takes part in the gather too, so the others stop with it instead of
waiting for the process group's timeout. The gather also gives each rank its slice offset, and
checks that queries and keys start at the same global position (one offset serves both).
"""
from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["sequence_parallel_offset", "agree_on_slices", "RankMismatchError", "AGREEMENT_BYTES_PER_RANK"]


class RankMismatchError(RuntimeError):
    """The ranks of a sequence-parallel group made calls that cannot run together (raised on every rank)."""


def sequence_parallel_offset(local_length: int, group=None, device=None) -> int:
    """The global position of this rank's first token: the sum of the slice lengths of the ranks
    below it in `group` (one all-gather of one integer; slices may be uneven)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor([int(local_length)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(lengths, mine, group=group)
    return int(sum(int(t) for t in lengths[:rank]))


# the signature's fields, in the order they are sent; names for the error message
SIGNATURE_FIELDS = ("backend", "variant", "dtype", "B", "H", "d_h", "k_h", "chunk_size", "left_context", "backward")
# what each rank sends in the one all-gather per call: its two slice lengths and the signature
AGREEMENT_BYTES_PER_RANK = (2 + len(SIGNATURE_FIELDS)) * 8
_KNOWN_NAMES = ("reference", "cpu", "cuda", "triton", "speechbrain", "idiap", "torch.float16", "torch.bfloat16",
                "torch.float32", "torch.float64")
_REFUSED = -1  # the first slot of a rank whose own inputs were refused


def _code(name: str) -> int:
    """A string as an int64 that is the same in every process (Python's hash() is salted)."""
    return zlib.crc32(name.encode())


def _decode(code: int) -> str:
    for name in _KNOWN_NAMES:
        if _code(name) == code:
            return name
    return f"#{code}"


def call_signature(backend: str, p, needs_grad: bool) -> Tuple[int, ...]:
    """The fields of SIGNATURE_FIELDS for problem `p` run by `backend`."""
    chunk, left = 0, -1
    if p.mode is not None:
        chunk = p.mode.chunk_size
        left = -1 if p.mode.left_context_chunks is None else p.mode.left_context_chunks
    return (_code(backend), _code(p.variant.name), _code(str(p.dtype)), p.B, p.H, p.d_h, p.k_h, chunk, left,
            int(needs_grad))


def agree_on_slices(query_length: int, key_length: int, signature: Optional[Sequence[int]], group,
                    device=None, variant: Optional[str] = None) -> int:
    """One all-gather over `group` of (query length, key length, signature) per rank; returns this
    rank's position offset (the key tokens on lower ranks). `signature` None: this rank refused
    its inputs and raises its own error after this returns (the others raise RankMismatchError).

    Raises RankMismatchError, with the same message on every rank, when a rank refused its inputs,
    when the signatures differ, or when a rank's queries and keys start at different global
    positions (cross-mixing whose query and key slices do not line up). `variant`: also check,
    on every rank, that each rank's slice (at the offsets the lengths give) stays within the
    positions the variant's encoding computes exactly."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    width = 2 + len(SIGNATURE_FIELDS)
    if signature is None:
        row = [_REFUSED] + [0] * (width - 1)
    else:
        row = [int(query_length), int(key_length), *signature]
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table: List[List[int]] = [r.tolist() for r in rows]
    refused = [r for r, row in enumerate(table) if row[0] == _REFUSED]
    if refused:
        if signature is None:
            return 0  # this rank raises its own error
        raise RankMismatchError(
            f"rank(s) {refused} of the sequence-parallel group refused their inputs (see the error raised there); "
            "every rank stops at this call"
        )
    differ = []
    for i, name in enumerate(SIGNATURE_FIELDS):
        values = [row[2 + i] for row in table]
        if len(set(values)) > 1:
            shown = [_decode(v) if name in ("backend", "variant", "dtype") else v for v in values]
            differ.append(f"{name}: " + ", ".join(f"rank {r} {v}" for r, v in enumerate(shown)))
    if differ:
        raise RankMismatchError(
            "the ranks of the sequence-parallel group made different HyperMixing calls, which cannot be "
            "summed over the group (every rank must run the same backend, variant, dtype, batch and head "
            "sizes and mode; with backend='auto' a rank may have fallen back to another backend): "
            + "; ".join(differ)
        )
    query_offsets = [sum(row[0] for row in table[:r]) for r in range(world)]
    key_offsets = [sum(row[1] for row in table[:r]) for r in range(world)]
    if query_offsets != key_offsets:
        raise RankMismatchError(
            "sequence-parallel cross-mixing needs the query and key slices to start at the same global "
            f"position on every rank (one position offset serves both): query slices "
            f"{[row[0] for row in table]} start at {query_offsets}, key slices {[row[1] for row in table]} "
            f"at {key_offsets}; split queries and keys alike on every rank but the last"
        )
    if variant is not None:
        from .problem import check_position_range

        for r, row in enumerate(table):
            try:
                check_position_range(variant, key_offsets[r], max(row[0], row[1]))
            except ValueError as e:
                raise RankMismatchError(f"rank {r} of the sequence-parallel group: {e}") from None
    return key_offsets[rank]
