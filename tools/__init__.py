"""Compile-level tools: resource reports of the Triton and CUDA kernels (no GPU needed)."""
