"""FLOP counts, written once and shared by tests and benchmarks.

A multiply-add counts as 2 FLOPs; elementwise work (GELU, masks, PE, LayerNorm) is not counted.

HyperMixing forward, per batch element and head (d_h = d / H, k_h per-head hidden size):
  hypernetwork fc1 + fc2 on each of N keys (W1) and M queries (W2): (N + M) * 2 * (d_h*d_h + d_h*k_h)
  P = W1^T V  ([k_h, N] @ [N, d_h]):                                 2 * N * k_h * d_h
  Y = W2 @ A  ([M, k_h] @ [k_h, d_h]):                               2 * M * k_h * d_h
Backward: every matmul has two gradient matmuls, so 2x the forward (recomputation not counted).
This is the direct form's count: what the reference executes, and the yardstick every backend's
throughput is quoted against (`hyper_mixing_flops`).

Reassociated form (the `cpu` backend, docs/HYPERMIXING.md "Reassociated form"), counted as executed,
recomputation included (`hyper_mixing_flops_reassociated`), per batch element and head:
  forward:  each key: z fc1^T and S += hid^T v            4 * d_h^2 per key
            each query: z fc1^T and Y = hid2 C             4 * d_h^2 per query
            P = fc2 S and C = fc2_2^T A ([k_h, d_h] x [d_h, d_h]-sized)   4 * k_h * d_h^2
  backward: each query: fc1 recompute, T += hid2^T dY, dhid2 = dY C^T, dfc1 += dU^T z, dz = dU fc1
                                                           10 * d_h^2 per query
            each key: fc1 recompute, S recompute, dV = hid R, dhid = V R^T, dfc1, dz
                                                           12 * d_h^2 per key
            C recompute, dA = fc2_2 T, dfc2_2 = A T^T, R = fc2^T dP, dfc2 = dP S^T
                                                           10 * k_h * d_h^2
  The bias terms (O(k_h d_h) per batch element and head) and the token sums sv, sdy (additions)
  are not counted, like the elementwise work.

Attention core (scaled_dot_product_attention, FlashAttention's convention), per batch element:
  forward 4 * M * N * d (QK^T and PV over all heads); backward 2.5x forward.
"""
from __future__ import annotations

__all__ = ["hyper_mixing_flops", "hyper_mixing_flops_reassociated", "attention_flops", "mha_layer_flops"]


def hyper_mixing_flops(B: int, M: int, N: int, d: int, H: int, k_h: int, pass_: str = "fwd") -> int:
    d_h = d // H
    generators = (N + M) * 2 * (d_h * d_h + d_h * k_h)
    mixing = 2 * N * k_h * d_h + 2 * M * k_h * d_h
    fwd = B * H * (generators + mixing)
    return _by_pass(fwd, 2 * fwd, pass_)


def hyper_mixing_flops_reassociated(B: int, M: int, N: int, d: int, H: int, k_h: int, pass_: str = "fwd") -> int:
    """FLOPs the reassociated form executes (the `cpu` backend), recomputation included; see the
    module docstring. Compare `hyper_mixing_flops`, the direct form's count for the same call."""
    d_h = d // H
    fwd = B * H * (4 * (N + M) * d_h * d_h + 4 * k_h * d_h * d_h)
    bwd = B * H * ((10 * M + 12 * N) * d_h * d_h + 10 * k_h * d_h * d_h)
    return _by_pass(fwd, bwd, pass_)


def attention_flops(B: int, M: int, N: int, d: int, pass_: str = "fwd") -> int:
    fwd = 4 * B * M * N * d
    return _by_pass(fwd, int(2.5 * fwd), pass_)


def mha_layer_flops(B: int, M: int, N: int, d: int, pass_: str = "fwd") -> int:
    """nn.MultiheadAttention: q/k/v/out projections (2*d*d each per token) plus the attention core."""
    proj = 2 * d * d * (2 * M + 2 * N)
    fwd = B * proj + attention_flops(B, M, N, d, "fwd")
    bwd = 2 * B * proj + attention_flops(B, M, N, d, "bwd")
    return _by_pass(fwd, bwd, pass_)


def _by_pass(fwd: int, bwd: int, pass_: str) -> int:
    if pass_ == "fwd":
        return int(fwd)
    if pass_ == "bwd":
        return int(bwd)
    if pass_ in ("fwd_bwd", "fwd+bwd"):
        return int(fwd + bwd)
    raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd_bwd', got {pass_!r}")
