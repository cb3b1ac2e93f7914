"""Autotuning set-up shared by the Triton kernels: candidate configurations and their pruning.

The per-token kernels are tuned over (BLOCK_N, num_warps, num_stages) candidates keyed on the
padded head size and the dot precision (BLOCK_D, OPERAND, DOT_PREC, and the mode constexprs; the
autotuner adds the tensors' dtypes, so fp16 and bf16 tune apart): the code depends on d_h only
through BLOCK_D and masks, so d_h 18 and 32 share one tuning (each still compiles for its own D_H),
and pruning reads BLOCK_D too. The grid and the chunking of the sequence do not depend on the
configuration, and every sequence-length argument is excluded from specialisation, so a new length
neither recompiles nor re-tunes. Under TRITON_INTERPRET=1 (CPU tensors) one configuration is used
(tuning would only multiply the interpreter's run time).

HMX_KERNELS_TRITON_PIN=1 (hmx_kernels.config.set_triton_pin) pins one tested config per kernel
(`pinned_candidate`: the first kept candidate, BLOCK_N 16 wherever it is kept, the tile length the
interpreter tests run) and replaces the benchmark by a no-op, so nothing is timed and only that
config compiles: for tests and short GPU runs, where tuning costs more than it gains.

Before tuning, `early_config_prune` drops the candidates that
- spill registers on sm_80 or sm_90 (SPILLING: measured by compiling every candidate for both,
  `python -m tools.kernels`; benchmarks/results/kernels.md lists the bytes), or
- need more shared memory than the device gives one block (`smem_bound`: an upper bound fitted
  to the same measurements, checked against every one of them by tests/test_kernel_resources.py),
so no call fails inside the autotuner. `unfit_reason` says when no candidate of a kernel is left
for a shape and device; the backend reports that as a reason before any kernel is launched.

Both tables depend on the triton (and so ptxas) version: the same kernel and candidate can take
100 more registers, spill, or use a quarter more shared memory under another release. They are
kept per measured version (SPILLING_BY_TRITON, _SMEM_MODEL_BY_TRITON; TRITON_REPORTS names each
version's report) and the installed triton's are used (TABLES_TRITON); an unmeasured version takes
the nearest measured one, with a warning. Where every candidate of some kernel spills under the
installed version (fp32 d_h 33..64 under triton 3.6: the backward key pass in IEEE and 3xTF32),
the backend declines that configuration with the reason (unfit_reason), so `auto` moves on.
"""
from __future__ import annotations

import inspect
import re
import warnings
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import triton

from ..config import SETTINGS, on_change

# tile length (tokens) used under the interpreter
INTERPRET_BLOCK_N = 16

# (BLOCK_N, num_warps, num_stages) candidates of the forward (2 tile products per token) and the
# backward kernels (5 and 6 tile products, two [D, D] accumulators)
FWD_CANDIDATES = ((16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2))
BWD_CANDIDATES = ((16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2))
KERNEL_CANDIDATES = {
    "hmx_fwd_kernel_state": FWD_CANDIDATES,
    "hmx_fwd_kernel_mix": FWD_CANDIDATES,
    "hmx_bwd_kernel_tsum": FWD_CANDIDATES,
    "hmx_bwd_kernel_query": BWD_CANDIDATES,
    "hmx_bwd_kernel_key": BWD_CANDIDATES,
    # the LayerNorm-fused passes of plain mixing (layer_norm_fused.py): the mix and query passes'
    # per-head work with all heads of a tile in one program
    "hmx_fwd_kernel_mix_ln": FWD_CANDIDATES,
    "hmx_bwd_kernel_query_ln": BWD_CANDIDATES,
}
LAYER_NORM_KERNELS = ("hmx_fwd_kernel_mix_ln", "hmx_bwd_kernel_query_ln")

# From this padded head size on, a program cannot hold two [D, D] fp32 accumulators next to its
# [D, D] operands without spilling (D 128: 56 to 204 spill bytes in the fewest-spilling candidate
# of the state, query and key kernels, benchmarks/results/kernels.md), so the launcher splits:
# - the state pass's S over ROW_SPLIT programs by rows (hidden units): [D / 2, D] accumulators;
# - the backward's token sums move out of the query and key passes (ACC_T / ACC_S False): T, sdy
#   come from hmx_bwd_kernel_tsum (the state program on query and dY), S, sv from the state pass
#   run again on key and value. Cost: one more read of query + dY and of key + value, and the
#   fc1 product once more per token in each of the two extra passes.
SPLIT_BLOCK_D = 128


def split_state(d_h: int) -> bool:
    """Whether the launcher runs the split kernels at head size d_h (SPLIT_BLOCK_D)."""
    return block_d(d_h) >= SPLIT_BLOCK_D


def row_split(d_h: int) -> int:
    """ROW_SPLIT of the state programs at head size d_h."""
    return 2 if split_state(d_h) else 1


def launched_kernels(d_h: int) -> Tuple[str, ...]:
    """The kernels a forward + backward may launch at head size d_h (the layer's plain mixing with
    and without the LayerNorm, and the mixing-block modes)."""
    return tuple(k for k in KERNEL_CANDIDATES if (k != "hmx_bwd_kernel_tsum" or split_state(d_h))
                 and (k not in LAYER_NORM_KERNELS or not split_state(d_h)))

# (kernel, BLOCK_D, precision) -> candidates that spill registers on sm_80 or sm_90, measured by
# compiling all of them at the recipe head sizes (d_h 18, 32 -> D 32; 64 -> D 64) and at the limit
# d_h 128 in fp16 / bf16 (see the module docstring; `python -m tools.kernels` prints this
# table when it no longer matches); precision: "half" (fp16 / bf16 operands) or the fp32 dot
# precision. At D 128 the split kernels (SPLIT_BLOCK_D) leave at least one spill-free candidate
# of every kernel on both archs (BN16 w8 for the query and key passes); where every candidate of
# an fp32 dot precision spills, dot_precision falls back to another. D 16 was not measured.
SPILLING_BY_TRITON = {
    # triton 3.9.0 (ptxas 12.9 for sm_80, 13.4 for sm_90): benchmarks/results/kernels.md
    (3, 9): {
        ("hmx_bwd_kernel_key", 32, "half"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_key", 32, "ieee"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_key", 32, "tf32"): frozenset({(32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 32, "tf32x3"): frozenset({(32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 64, "half"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_key", 64, "ieee"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 64, "tf32"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_key", 64, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 128, "half"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 32, "ieee"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_query", 32, "tf32"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_query", 32, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 64, "half"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_query", 64, "ieee"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 64, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_query", 128, "half"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "half"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "ieee"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "tf32"): frozenset({(32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "tf32x3"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "half"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "ieee"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "tf32"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_fwd_kernel_mix", 64, "ieee"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix", 64, "tf32x3"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_mix", 128, "half"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "half"): frozenset({(16, 8, 2), (32, 4, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "ieee"): frozenset({(16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "tf32"): frozenset({(16, 8, 2), (32, 4, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "tf32x3"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "half"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "ieee"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "tf32"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_state", 32, "tf32"): frozenset({(32, 8, 2)}),
        ("hmx_fwd_kernel_state", 32, "tf32x3"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_state", 64, "ieee"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_state", 64, "tf32"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_state", 64, "tf32x3"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2)}),
    },
    # triton 3.6.0 (ptxas 12.8 for both archs): benchmarks/results/kernels-triton3.6.md. Every candidate
    # of the backward key pass spills at D 64 in IEEE and 3xTF32: unfit_reason declines those.
    (3, 6): {
        ("hmx_bwd_kernel_key", 32, "ieee"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 32, "tf32"): frozenset({(16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 32, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 64, "half"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_key", 64, "ieee"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 64, "tf32"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_key", 64, "tf32x3"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_key", 128, "half"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 32, "ieee"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_query", 32, "tf32x3"): frozenset({(32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 64, "ieee"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 64, "tf32"): frozenset({(32, 4, 2)}),
        ("hmx_bwd_kernel_query", 64, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query", 128, "half"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "half"): frozenset({(32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "ieee"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "tf32"): frozenset({(32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 32, "tf32x3"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "half"): frozenset({(16, 4, 2), (32, 4, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "ieee"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "tf32"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_bwd_kernel_query_ln", 64, "tf32x3"): frozenset({(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2)}),
        ("hmx_fwd_kernel_mix", 64, "tf32x3"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "half"): frozenset({(16, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "ieee"): frozenset({(16, 8, 2), (32, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 32, "tf32x3"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "half"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "ieee"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "tf32"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_mix_ln", 64, "tf32x3"): frozenset({(16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_state", 32, "ieee"): frozenset({(16, 4, 2)}),
        ("hmx_fwd_kernel_state", 32, "tf32"): frozenset({(32, 8, 2)}),
        ("hmx_fwd_kernel_state", 64, "ieee"): frozenset({(32, 4, 2), (64, 8, 2)}),
        ("hmx_fwd_kernel_state", 64, "tf32"): frozenset({(64, 8, 2)}),
        ("hmx_fwd_kernel_state", 64, "tf32x3"): frozenset({(16, 8, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2)}),
    },
}

# The same for the kernels as the mixing-block modes launch them (BLOCKED: piece-table loads and
# per-block operand rows; the plain launches are unaffected), on top of SPILLING: the candidates
# that SPILLING keeps, compiled with BLOCKED at (18, 72) and (64, 256) in fp32 (the precision
# "highest" picks) and bf16 and at (128, 512) in bf16, for sm_80 and sm_90; the autotuner prunes
# these for BLOCKED launches.
BLOCKED_SPILLING_BY_TRITON = {
    (3, 9): {  # 32 bytes on sm_90
        ("hmx_bwd_kernel_query", 32, "ieee"): frozenset({(32, 8, 2)}),
    },
    (3, 6): {  # 8 bytes on sm_90 (the 3.9 entry's candidate compiles without spills here)
        ("hmx_fwd_kernel_mix", 128, "half"): frozenset({(16, 4, 2)}),
    },
}

# triton (major, minor) -> its resource report (benchmarks/results): the versions measured
TRITON_REPORTS = {(3, 9): "kernels.md", (3, 6): "kernels-triton3.6.md"}


def triton_version(text: Optional[str] = None) -> Tuple[int, int]:
    """(major, minor) of a triton version string (default: the installed triton's)."""
    m = re.match(r"(\d+)\.(\d+)", text if text is not None else triton.__version__)
    if m is None:
        raise ValueError(f"not a triton version: {text!r}")
    return int(m.group(1)), int(m.group(2))


def tables_version(version: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """The measured version whose tables serve triton `version` (default: the installed one):
    itself if measured, else the nearest measured release (by minor version within a major, else
    the newest of the nearest major)."""
    version = version or INSTALLED_TRITON
    if version in TRITON_REPORTS:
        return version
    return min(TRITON_REPORTS, key=lambda v: (abs(v[0] - version[0]), abs(v[1] - version[1]) if v[0] == version[0] else 0,
                                              -v[0], -v[1]))


def warn_if_unmeasured(version: Tuple[int, int]) -> None:
    """Warn when triton `version` has no tables of its own (tables_version)."""
    used = tables_version(version)
    if used != version:
        warnings.warn(f"hmx_kernels: the Triton spill and shared-memory tables were measured with triton "
                      f"{', '.join('%d.%d' % v for v in sorted(TRITON_REPORTS))}; triton {'%d.%d' % version} uses "
                      f"{'%d.%d' % used}'s, so its autotune candidates may spill: measure them with "
                      "`python -m tools.kernels` (hmx_kernels/triton/autotune.py SPILLING_BY_TRITON)", stacklevel=3)


INSTALLED_TRITON = triton_version()
TABLES_TRITON = tables_version(INSTALLED_TRITON)
warn_if_unmeasured(INSTALLED_TRITON)

# the installed triton's table: (kernel, BLOCK_D, precision) -> candidates that spill
SPILLING = SPILLING_BY_TRITON[TABLES_TRITON]


BLOCKED_SPILLING = BLOCKED_SPILLING_BY_TRITON[TABLES_TRITON]


def _spilling(version: Optional[Tuple[int, int]], blocked: bool = False) -> dict:
    if blocked:
        return BLOCKED_SPILLING_BY_TRITON[tables_version(version)] if version else BLOCKED_SPILLING
    return SPILLING_BY_TRITON[tables_version(version)] if version else SPILLING


SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes per block (opt-in): 163 KB (A100), 227 KB (H100)

# torch.get_float32_matmul_precision() -> the tl.dot input_precision asked for fp32 inputs, and the
# order in which a kernel falls back when every candidate of the asked one spills (SPILLING). Under
# triton 3.9, at D = 64 the IEEE (FMA) query pass spills in every candidate (ptxas even falls back
# to 32 registers and kilobytes of spills) and takes 3xTF32, which meets the fp32 tolerance; the
# 3xTF32 state pass spills on sm_80 in every candidate and takes IEEE. Under triton 3.6 the IEEE
# query pass keeps BN16-w8, and the key pass spills in every IEEE and 3xTF32 candidate (declined).
FP32_DOT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
FP32_FALLBACK = {"ieee": ("ieee", "tf32x3"), "tf32x3": ("tf32x3", "ieee"), "tf32": ("tf32", "tf32x3", "ieee")}


def interpreting() -> bool:
    """TRITON_INTERPRET now, read as triton reads it (hmx_kernels.config, the one reading)."""
    from ..config import triton_interpret_from_env

    return triton_interpret_from_env()


# triton decides interpreter vs compiler when a kernel is decorated: remember what this process
# decorated ours with (this module is imported just before the kernel modules)
INTERPRETED_KERNELS = interpreting()


@lru_cache(maxsize=512)  # pure function of its arguments and fixed tables; runs per launch
def dot_precision(dtype, d_h: int, matmul_precision: str, kernel: str,
                  version: Optional[Tuple[int, int]] = None) -> Tuple[str, str]:
    """(OPERAND, DOT_PREC) constexprs of `kernel` (hyper_mixing_fwd._op) for inputs of torch
    `dtype`: fp16 / bf16 inputs multiply half operands on tensor cores ("half"; bf16 rounded and
    held in fp32 under the interpreter, whose bf16 x bf16 tl.dot is broken); fp32 inputs follow
    `matmul_precision` (torch.get_float32_matmul_precision()) through FP32_DOT_PRECISION, falling
    back along FP32_FALLBACK where every candidate of that precision spills at this head size
    (under triton `version`, default the installed one; where every precision spills, the asked
    one: the backend declines that configuration, unfit_reason)."""
    import torch

    if dtype == torch.float32:
        asked = FP32_DOT_PRECISION[matmul_precision]
        for prec in FP32_FALLBACK[asked]:
            if kept_candidates(kernel, d_h, prec, None, version=version):
                return "fp32", prec
        return "fp32", asked
    if dtype == torch.bfloat16 and INTERPRETED_KERNELS:
        return "bf16-as-fp32", "ieee"
    return "half", "ieee"  # DOT_PREC: unused by half dots


def precision_name(operand: str, dot_prec: str) -> str:
    """The precision a kernel was built for: "half" for fp16 / bf16 operands, else DOT_PREC."""
    return dot_prec if operand == "fp32" else "half"


def block_d(d_h: int) -> int:
    """The padded head size: a power of two >= 16 (tl.dot's smallest dimension). Integer math,
    not triton.next_power_of_2 (about 6 us a call in triton 3.9; this runs per launch)."""
    return max(16, 1 << (int(d_h) - 1).bit_length())


def smem_bound(kernel: str, block_n: int, block_d_: int, num_stages: int, precision: str,
               arch: Optional[int] = None, version: Optional[Tuple[int, int]] = None) -> int:
    """An upper bound of the shared memory (bytes) one block of `kernel` uses on sm_<arch>:
    `squares` [D, D] operands (the weights and C / R staged for the dots) plus `tiles` [BN, D]
    tiles per pipeline stage (operands and layout conversions), in the operand width (2 bytes for
    fp16 / bf16, 4 for fp32), + 1 KB. The counts are fitted per arch and triton version (`version`,
    default the installed one) to every compiled kernel of that version's resource report (D 32 to
    128; on average 1.01x to 1.2x the measured size) and checked against all of them by
    tests/test_kernel_resources.py. sm_8x takes sm_80's fit (mma.sync like it), sm_9x sm_90's, any
    other arch the larger of the two."""
    models = _SMEM_MODEL_BY_TRITON[tables_version(version)][(kernel, precision)]
    family = 80 if arch is not None and 80 <= arch < 90 else 90 if arch is not None and 90 <= arch < 100 else None
    width = 2 if precision == "half" else 4
    return max(int(width * (sq * block_d_ * block_d_ + ti * block_n * block_d_ * num_stages)) + 1024
               for fam, (sq, ti) in models.items() if family is None or fam == family)


# triton (major, minor) -> (kernel, precision) -> {arch: (squares, tiles)} of smem_bound
_SMEM_MODEL_BY_TRITON = {
    (3, 9): {
        ("hmx_fwd_kernel_state", "half"): {80: (1.75, 1.25), 90: (1.75, 1.25)},
        ("hmx_fwd_kernel_state", "ieee"): {80: (1.0, 2.25), 90: (1.0, 2.25)},
        ("hmx_fwd_kernel_state", "tf32"): {80: (1.0, 2.0), 90: (1.0, 2.5)},
        ("hmx_fwd_kernel_state", "tf32x3"): {80: (2.0, 2.5), 90: (3.25, 2.25)},
        ("hmx_fwd_kernel_mix", "half"): {80: (2.0, 2.0), 90: (2.25, 1.75)},
        ("hmx_bwd_kernel_tsum", "half"): {80: (1.75, 2.5), 90: (1.75, 2.5)},
        ("hmx_bwd_kernel_tsum", "ieee"): {80: (1.0, 2.25), 90: (1.0, 2.25)},
        ("hmx_bwd_kernel_tsum", "tf32"): {80: (1.0, 2.5), 90: (1.0, 2.5)},
        ("hmx_bwd_kernel_tsum", "tf32x3"): {80: (3.25, 2.5), 90: (3.25, 2.5)},
        ("hmx_fwd_kernel_mix", "ieee"): {80: (2.0, 1.5), 90: (2.0, 1.5)},
        ("hmx_fwd_kernel_mix", "tf32"): {80: (2.0, 1.5), 90: (2.0, 1.5)},
        ("hmx_fwd_kernel_mix", "tf32x3"): {80: (4.0, 2.0), 90: (4.0, 2.0)},
        ("hmx_bwd_kernel_query", "half"): {80: (3.0, 3.5), 90: (3.0, 4.0)},
        ("hmx_bwd_kernel_query", "ieee"): {80: (2.0, 2.5), 90: (2.0, 2.5)},
        ("hmx_bwd_kernel_query", "tf32"): {80: (3.0, 3.0), 90: (3.0, 3.0)},
        ("hmx_bwd_kernel_query", "tf32x3"): {80: (6.0, 3.5), 90: (6.0, 4.5)},
        ("hmx_bwd_kernel_key", "half"): {80: (4.0, 2.5), 90: (4.0, 3.0)},
        ("hmx_bwd_kernel_key", "ieee"): {80: (2.25, 3.0), 90: (2.25, 3.0)},
        ("hmx_bwd_kernel_key", "tf32"): {80: (4.0, 3.0), 90: (4.0, 3.5)},
        ("hmx_bwd_kernel_key", "tf32x3"): {80: (8.0, 3.5), 90: (8.0, 4.5)},
        ("hmx_bwd_kernel_query_ln", "half"): {80: (4.0, 3.0), 90: (4.0, 3.0)},
        ("hmx_bwd_kernel_query_ln", "ieee"): {80: (2.0, 3.0), 90: (2.0, 3.0)},
        ("hmx_bwd_kernel_query_ln", "tf32"): {80: (4.0, 3.0), 90: (5.0, 2.5)},
        ("hmx_bwd_kernel_query_ln", "tf32x3"): {80: (8.0, 4.5), 90: (10.0, 3.5)},
        ("hmx_fwd_kernel_mix_ln", "half"): {80: (3.0, 1.5), 90: (2.5, 2.75)},
        ("hmx_fwd_kernel_mix_ln", "ieee"): {80: (2.0, 1.5), 90: (2.0, 1.5)},
        ("hmx_fwd_kernel_mix_ln", "tf32"): {80: (2.0, 1.5), 90: (1.5, 2.75)},
        ("hmx_fwd_kernel_mix_ln", "tf32x3"): {80: (2.0, 2.0), 90: (1.5, 3.25)},
    },
    # triton 3.6.0, fitted by tools.kernels.fit_smem_model to every compiled row of its report
    (3, 6): {
        ("hmx_fwd_kernel_state", "half"): {80: (1.0, 1.75), 90: (1.0, 2.0)},
        ("hmx_fwd_kernel_state", "ieee"): {80: (1.0, 2.5), 90: (1.0, 2.5)},
        ("hmx_fwd_kernel_state", "tf32"): {80: (1.0, 2.0), 90: (1.0, 2.5)},
        ("hmx_fwd_kernel_state", "tf32x3"): {80: (2.0, 2.5), 90: (2.0, 3.5)},
        ("hmx_fwd_kernel_mix", "half"): {80: (2.0, 2.0), 90: (2.0, 2.0)},
        ("hmx_bwd_kernel_tsum", "half"): {80: (0.5, 2.5), 90: (0.5, 2.75)},
        ("hmx_bwd_kernel_tsum", "ieee"): {80: (1.0, 2.25), 90: (1.0, 2.25)},  # not compiled under 3.6 (never launched): 3.9's
        ("hmx_bwd_kernel_tsum", "tf32"): {80: (0.5, 2.0), 90: (0.5, 2.25)},
        ("hmx_bwd_kernel_tsum", "tf32x3"): {80: (1.0, 2.5), 90: (1.0, 3.0)},
        ("hmx_fwd_kernel_mix", "ieee"): {80: (2.0, 1.5), 90: (2.0, 1.5)},
        ("hmx_fwd_kernel_mix", "tf32"): {80: (2.0, 1.5), 90: (2.0, 1.5)},
        ("hmx_fwd_kernel_mix", "tf32x3"): {80: (4.0, 2.0), 90: (4.0, 2.0)},
        ("hmx_bwd_kernel_query", "half"): {80: (3.0, 3.5), 90: (3.0, 4.0)},
        ("hmx_bwd_kernel_query", "ieee"): {80: (2.0, 3.0), 90: (2.0, 3.0)},
        ("hmx_bwd_kernel_query", "tf32"): {80: (3.0, 3.0), 90: (3.0, 3.0)},
        ("hmx_bwd_kernel_query", "tf32x3"): {80: (6.0, 3.5), 90: (6.0, 4.5)},
        ("hmx_bwd_kernel_key", "half"): {80: (4.0, 2.5), 90: (4.0, 3.0)},
        ("hmx_bwd_kernel_key", "ieee"): {80: (2.25, 3.0), 90: (2.25, 3.0)},
        ("hmx_bwd_kernel_key", "tf32"): {80: (4.0, 3.0), 90: (4.0, 3.5)},
        ("hmx_bwd_kernel_key", "tf32x3"): {80: (8.0, 3.5), 90: (8.0, 4.5)},
        ("hmx_bwd_kernel_query_ln", "half"): {80: (4.0, 3.0), 90: (4.0, 3.0)},
        ("hmx_bwd_kernel_query_ln", "ieee"): {80: (2.0, 3.0), 90: (2.0, 3.0)},
        ("hmx_bwd_kernel_query_ln", "tf32"): {80: (4.0, 3.0), 90: (5.0, 2.5)},
        ("hmx_bwd_kernel_query_ln", "tf32x3"): {80: (8.0, 4.5), 90: (10.0, 3.5)},
        ("hmx_fwd_kernel_mix_ln", "half"): {80: (3.0, 1.5), 90: (2.5, 2.75)},
        ("hmx_fwd_kernel_mix_ln", "ieee"): {80: (2.0, 1.5), 90: (2.0, 1.5)},
        ("hmx_fwd_kernel_mix_ln", "tf32"): {80: (2.0, 1.5), 90: (1.5, 2.75)},
        ("hmx_fwd_kernel_mix_ln", "tf32x3"): {80: (2.0, 2.0), 90: (1.5, 3.25)},
    },
}


@lru_cache(maxsize=None)
def device_limits(index: int) -> Tuple[int, int]:
    """(shared memory per block in bytes (opt-in), arch as 10 * major + minor) of a CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(index)
    return int(props.shared_memory_per_block_optin), 10 * props.major + props.minor


def kept_candidates(kernel: str, d_h: int, precision: str, smem_limit: Optional[int] = None,
                    arch: Optional[int] = None, blocked: bool = False,
                    version: Optional[Tuple[int, int]] = None) -> List[Tuple[int, int, int]]:
    """The candidates of `kernel` the autotuner may run for head size d_h and `precision` on an
    sm_<arch> device giving `smem_limit` bytes of shared memory per block (None: no limit), as the
    plain mode launches it or, blocked=True, as the mixing-block modes do (BLOCKED_SPILLING too),
    under triton `version` (default: the installed one)."""
    bd = block_d(d_h)
    spilling = _spilling(version).get((kernel, bd, precision), frozenset())
    if blocked:
        spilling = spilling | _spilling(version, blocked=True).get((kernel, bd, precision), frozenset())
    return [c for c in KERNEL_CANDIDATES[kernel] if c not in spilling
            and (smem_limit is None or smem_bound(kernel, c[0], bd, c[2], precision, arch, version) <= smem_limit)]


def unfit_reason(dtype, d_h: int, matmul_precision: str, smem_limit: Optional[int],
                 arch: Optional[int] = None, blocked: bool = False,
                 version: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """Why no candidate of some kernel fits (dtype, d_h) on an sm_<arch> device under triton
    `version` (default: the installed one), or None: every candidate spills registers there (in
    every dot precision dot_precision may fall back to), or needs more shared memory per block than
    `smem_limit` (None: not checked)."""
    bd = block_d(d_h)
    shown = "%d.%d" % (version or INSTALLED_TRITON)
    for kernel in launched_kernels(d_h):
        candidates = KERNEL_CANDIDATES[kernel]
        precision = precision_name(*dot_precision(dtype, d_h, matmul_precision, kernel, version))
        if not kept_candidates(kernel, d_h, precision, None, arch, blocked, version):
            tf32 = (matmul_precision != "medium" and precision != "half"
                    and unfit_reason(dtype, d_h, "medium", None, arch, blocked, version) is None)
            return (f"{kernel} at d_h = {d_h} (padded to {bd}) with {precision} dot operands spills registers in "
                    f"every autotune candidate under triton {shown} (measured compiles: benchmarks/results/"
                    f"{TRITON_REPORTS[tables_version(version)]}); backend 'cuda', float16 / bfloat16 inputs"
                    + (" or torch.set_float32_matmul_precision('medium') (TF32 dots)" if tf32 else "") + " run it")
        if smem_limit is not None and not kept_candidates(kernel, d_h, precision, smem_limit, arch, blocked, version):
            need = min(smem_bound(kernel, c[0], bd, c[2], precision, arch, version) for c in candidates)
            return (f"{kernel} at d_h = {d_h} (padded to {bd}) with {precision} dot operands needs about "
                    f"{need // 1024} KB of shared memory per block, this GPU gives {smem_limit // 1024} KB")
    return None


def _pruner(kernel: str):
    def early_config_prune(configs, named_args, **kwargs):
        import torch

        precision = precision_name(kwargs["OPERAND"], kwargs["DOT_PREC"])
        # the launcher passes tensors positionally; torch's wrap_triton replays a launch as keywords
        device = next(v.device for v in (*named_args.values(), *kwargs.values()) if isinstance(v, torch.Tensor))
        limit, arch = device_limits(device.index or 0) if device.type == "cuda" else (None, None)
        blocked = bool(kwargs.get("BLOCKED", False))
        keep = kept_candidates(kernel, kwargs["BLOCK_D"], precision, limit, arch, blocked)
        if SETTINGS.triton_pin:
            keep = keep[:1]
        kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in set(keep)]
        if not kept:  # the backend refuses such shapes first (unfit_reason)
            raise RuntimeError(f"hmx_kernels: no autotune candidate of {kernel} fits d_h = {kwargs['D_H']} "
                               f"with {precision} dot operands on this device")
        return kept

    return early_config_prune


def pinned_candidate(kernel: str, d_h: int, precision: str, smem_limit: Optional[int] = None,
                     arch: Optional[int] = None, blocked: bool = False) -> Optional[Tuple[int, int, int]]:
    """The one config `kernel` runs under HMX_KERNELS_TRITON_PIN=1: the first kept candidate
    (KERNEL_CANDIDATES lists BLOCK_N 16, the interpreter's tile length, first), or None if none fits."""
    kept = kept_candidates(kernel, d_h, precision, smem_limit, arch, blocked)
    return kept[0] if kept else None


def _bench(kernel_call, quantiles):
    """The autotuner's benchmark: triton's own, or under the pin (one config left) no run at all."""
    if SETTINGS.triton_pin:
        return [0.0 for _ in quantiles]
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


_TAKES_DO_BENCH = "do_bench" in inspect.signature(triton.autotune).parameters
AUTOTUNED: Dict[str, object] = {}  # kernel name -> its triton Autotuner (the configs chosen: .cache)


def _forget_choices(settings) -> None:
    for kernel in AUTOTUNED.values():
        kernel.cache.clear()


on_change(_forget_choices)


def chosen_configs() -> List[dict]:
    """Every config the autotuners chose so far in this process: kernel, tuning key, BLOCK_N,
    num_warps, num_stages (the key holds BLOCK_D, OPERAND, DOT_PREC, the mode constexprs and the
    tensors' dtypes)."""
    out = []
    for name, kernel in AUTOTUNED.items():
        chosen = list(kernel.cache.items())
        if not chosen and getattr(kernel, "best_config", None) is not None:  # one candidate: never tuned
            chosen = [(("single candidate",), kernel.best_config)]
        for key, cfg in chosen:
            out.append(dict(kernel=name, key=[str(k) for k in key], BLOCK_N=cfg.kwargs.get("BLOCK_N"),
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def autotuned(key, do_not_specialize):
    """triton.jit (length arguments unspecialised) + triton.autotune keyed on `key`, over the
    kernel's candidates (pruned per call shape and device, see the module docstring)."""

    def wrap(fn):
        if interpreting():
            configs = [triton.Config({"BLOCK_N": INTERPRET_BLOCK_N}, num_warps=4)]
        else:
            configs = [triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns)
                       for bn, nw, ns in KERNEL_CANDIDATES[fn.__name__]]
        bench = {"do_bench": _bench} if _TAKES_DO_BENCH else {}  # triton < 3.1: the pin still prunes to one
        kernel = triton.autotune(configs=configs, key=list(key), **bench,
                                 prune_configs_by={"early_config_prune": _pruner(fn.__name__)})(
            triton.jit(do_not_specialize=list(do_not_specialize))(fn)
        )
        AUTOTUNED[fn.__name__] = kernel
        return kernel

    return wrap
