"""Fused Triton HyperMixing (forward and backward), reassociated so that the hypernetworks' k_h
never enters a token loop: per-token kernels with [D, D] accumulators (d_h padded to D), tensor
cores for fp16 / bf16 (and TF32 / 3xTF32 for fp32 as torch.get_float32_matmul_precision() asks),
k_h only in small per-(b, h) finalize kernels.

- hyper_mixing_fwd.py / hyper_mixing_bwd.py: the token kernels (state, mix; query, key, and at
  d_h 128 tsum) and the algorithm, with a shape comment on every dot;
- layer_norm_fused.py: the mix and query passes with the layer's LayerNorm inside (all heads of a
  token tile per program), which the layer's plain mixing runs at d_h up to 64;
- finalize.py: the per-(b, h) finalize kernels between the token passes (d_h up to 64);
- launch.py: the launchers, registered as torch.library ops (and the torch finalize at d_h 128):
  the per-head ops (causal / chunked / packed modes, d_h 128) and the layer ops (plain mixing:
  LayerNorm, output and gradient dtypes and the self-mixing gradient sum in the kernels);
- autotune.py: autotune candidates, the dot precision per dtype and mode, pruning by the register
  spills and shared memory measured per triton version;
- backend.py: registration as backend "triton" (limits, reasons, tolerances with their derivation).
Compile-level evidence (registers, spills, shared memory, tensor-core instructions for sm_80 and
sm_90): `python -m tools.kernels` -> benchmarks/results/kernels.md.
Nothing here imports triton at package import time."""


def hyper_mixing_triton(problem):
    """Run a validated `HyperMixingProblem` (see `hmx_kernels.check_inputs`) with the Triton kernels."""
    from .launch import triton_forward as _run

    return _run(problem)


__all__ = ["hyper_mixing_triton"]
