"""Sinusoidal positional encodings of both HyperMixing variants, for any length.

The public implementations precompute a table of `max_length` rows (3000 by default) and fail on
longer inputs. The encoding is a fixed function, so here it is computed for whatever positions are
asked for, with exactly the arithmetic of each implementation so that results match bit for bit
on the CPU:

- speechbrain: angle = float32(p) * float32(exp(float32(2i) * -(ln(10000) / d))), rounded to fp32,
  then sin for channel 2i and cos for channel 2i+1 (fp32 throughout). Odd d is rejected.
- idiap: channel c uses sin (c even) or cos (c odd) of p / 10000 ** (2c / d), in float64, stored
  as fp32 (so channels 2i and 2i+1 use different frequencies). Odd d is allowed.

`frequencies` gives the per-channel angular frequency vector that kernels use to compute the
encoding on chip (speechbrain: the exact fp32 values; idiap: float64 values).
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Optional

import torch

from .variants import Variant, get_variant

__all__ = ["positional_encoding", "frequencies", "PositionalEncodingCache", "cached_positional_encoding",
           "positional_encoding_cache"]


def frequencies(variant: "str | Variant", d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Angular frequency of each of the d channels: PE[p, c] = sin/cos(p * freq[c]).

    speechbrain's frequencies are computed in fp32 as speechbrain does (returned in `dtype`,
    exactly representable); idiap's in float64.
    """
    return _frequencies(get_variant(variant).name, d, dtype).clone()


@functools.lru_cache(maxsize=64)
def _frequencies(name: str, d: int, dtype: torch.dtype) -> torch.Tensor:
    # kept per (variant, d, dtype): a streamed piece at a position offset builds its rows from them
    # on every call (positional_encoding below; never modified in place there)
    v = get_variant(name)
    if v.name == "speechbrain":
        if d % 2 != 0:
            raise ValueError(
                f"the speechbrain variant's sin/cos positional encoding needs an even width, got d={d}"
            )
        half = torch.exp(
            torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d)
        )  # [d/2] fp32, as speechbrain computes it
        return half.repeat_interleave(2).to(dtype)  # channel c uses frequency c // 2
    channels = torch.arange(d, dtype=torch.float64)
    return (1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2.0 * channels / d)).to(dtype)


def positional_encoding(
    variant: "str | Variant",
    length: int,
    d: int,
    *,
    start: int | None = None,
    device: "torch.device | str | None" = None,
) -> torch.Tensor:
    """PE rows for positions start .. start + length - 1, as an fp32 tensor [length, d].

    `start` defaults to the variant's first position (speechbrain 0, idiap 1), i.e. the rows that
    the variant adds to a sequence of `length` tokens. The table is computed on the CPU (so that it
    matches the public implementations bit for bit) and moved to `device`.
    """
    v = get_variant(variant)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if start is None:
        start = v.first_position
    if v.name == "speechbrain":
        freq = _frequencies(v.name, d, torch.float32)[0::2]  # [d/2] fp32
        # integer positions rounded to fp32 as speechbrain does (arange(...).float()); a float32
        # arange miscounts its rows near 2**24
        positions = torch.arange(start, start + length).to(torch.float32).unsqueeze(1)  # [L, 1]
        angle = positions * freq  # [L, d/2] fp32 product, as in speechbrain
        pe = torch.empty(length, d, dtype=torch.float32)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle)
    else:
        channels = torch.arange(d, dtype=torch.float64)
        denom = torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2.0 * channels / d)  # [d]
        angle = torch.arange(start, start + length).to(torch.float64).unsqueeze(1) / denom  # [L, d]
        even = (torch.arange(d) % 2 == 0)
        pe = torch.where(even, torch.sin(angle), torch.cos(angle)).to(torch.float32)
    if device is not None:
        pe = pe.to(device)
    return pe


class PositionalEncodingCache:
    """One growing PE table per (variant, d, device), so repeated calls do not recompute it.

    Bounded: each device holds at most `max_bytes` of tables (default from
    HMX_KERNELS_PE_CACHE_MB, 64 MiB; 0 disables caching). A request whose table would not fit is
    computed for that call only and not kept, so one very long input cannot pin memory (GPU memory,
    on CUDA) for the life of the process; when a table of another (variant, d) does not fit next to
    the others, the least recently used ones on that device are dropped. Tables grow by doubling up
    to the bound. `clear()` (or `hmx_kernels.clear_caches()`) empties it.
    """

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self._tables: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        if self._max_bytes is not None:
            return self._max_bytes
        from .config import SETTINGS

        return SETTINGS.pe_cache_bytes

    def set_max_bytes(self, max_bytes: Optional[int]) -> None:
        """Set the per-device bound (None: the configured default) and drop what no longer fits."""
        self._max_bytes = None if max_bytes is None else int(max_bytes)
        for device in {k[2] for k in self._tables}:
            self._evict(device, 0)

    def bytes_used(self, device: "torch.device | str | None" = None) -> int:
        return sum(t.numel() * t.element_size() for k, t in self._tables.items()
                   if device is None or k[2] == str(torch.device(device)))

    def _evict(self, device: str, incoming: int) -> None:
        for key in [k for k in self._tables if k[2] == device]:
            if self.bytes_used(device) + incoming <= self.max_bytes:
                break
            del self._tables[key]  # least recently used first

    def get(self, variant: "str | Variant", length: int, d: int, device: torch.device) -> torch.Tensor:
        v = get_variant(variant)
        device = torch.device(device)
        key = (v.name, d, str(device))
        need = v.first_position + length
        table = self._tables.get(key)
        if table is not None and table.shape[0] >= need:
            self._tables.move_to_end(key)
            return table[v.first_position : need]
        row_bytes = 4 * d  # fp32
        if need * row_bytes > self.max_bytes:  # too large to keep: this call only
            return positional_encoding(v, length, d, device=device)
        rows = max(need, min(2 * (table.shape[0] if table is not None else 0), self.max_bytes // row_bytes), 1024)
        rows = min(rows, max(need, self.max_bytes // row_bytes))
        self._tables.pop(key, None)
        self._evict(str(device), rows * row_bytes)
        table = positional_encoding(v, rows, d, start=0, device=device)
        self._tables[key] = table
        return table[v.first_position : need]

    def clear(self) -> None:
        self._tables.clear()


_DEFAULT_CACHE = PositionalEncodingCache()


def cached_positional_encoding(variant, length: int, d: int, device) -> torch.Tensor:
    """The variant's PE rows for a sequence of `length` tokens, from the process-wide bounded cache."""
    return _DEFAULT_CACHE.get(variant, length, d, torch.device(device))


def positional_encoding_cache() -> PositionalEncodingCache:
    """The process-wide cache behind `cached_positional_encoding` (to bound, inspect or clear it)."""
    return _DEFAULT_CACHE
