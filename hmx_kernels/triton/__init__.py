"""Fused Triton HyperMixing (forward and backward). Kernels live in hyper_mixing_fwd.py /
hyper_mixing_bwd.py, the autograd Function in function.py, registration in backend.py.
Nothing here imports triton at package import time."""


def hyper_mixing_triton(problem):
    """Run a validated `HyperMixingProblem` (see `hmx_kernels.check_inputs`) with the Triton kernels."""
    from .function import hyper_mixing_triton as _run

    return _run(problem)


__all__ = ["hyper_mixing_triton"]
