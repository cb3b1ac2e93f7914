"""Sequence parallelism helpers: each rank of a group holds one contiguous slice of every sequence.

HyperMixing's whole cross-token state is P = sum_t m_t W1_t^T V_t, [B, H, k_h, d_h] per layer: the
ranks all-reduce it in the forward (and autograd all-reduces its gradient in the backward), so a
layer communicates 2 x B x H x k_h x d_h values per step whatever the sequence length. A slice's
positional encoding continues from its global offset, the number of tokens on lower ranks.
"""
from __future__ import annotations

import torch

__all__ = ["sequence_parallel_offset"]


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
