"""Autotuning set-up shared by the Triton kernels.

The per-token kernels are tuned over a small set of (BLOCK_N, num_warps) configurations keyed on
the head sizes (d_h, k_h) only: the grid and the chunking of the sequence do not depend on the
configuration, and every sequence-length argument is excluded from specialisation, so a new
length neither recompiles nor re-tunes. Under TRITON_INTERPRET=1 (CPU tensors) one configuration
is used (tuning would only multiply the interpreter's run time).
"""
from __future__ import annotations

import os

import triton

# tile length (tokens) used under the interpreter
INTERPRET_BLOCK_N = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton decides interpreter vs compiler when a kernel is decorated: remember what this process
# decorated ours with (this module is imported just before the kernel modules)
INTERPRETED_KERNELS = interpreting()


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": INTERPRET_BLOCK_N}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bn, nw, ns in ((16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2))
    ]


def autotuned(key, do_not_specialize):
    """triton.jit (length arguments unspecialised) + triton.autotune keyed on `key`."""

    def wrap(fn):
        return triton.autotune(configs=_configs(), key=list(key))(
            triton.jit(do_not_specialize=list(do_not_specialize))(fn)
        )

    return wrap
