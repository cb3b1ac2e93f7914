"""Benchmark suite: HyperMixing (every backend) against attention, speed and memory versus length.

Run `python -m benchmarks --help` (or `make bench`); see benchmarks/README.md.
"""
