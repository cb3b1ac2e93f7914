"""Plain-PyTorch reference implementations: the ground truth every fast path is tested against."""
from .hyper_mixing import generator_mlp_ref, hyper_mixing_ref
from ..positional import frequencies, positional_encoding

__all__ = ["hyper_mixing_ref", "generator_mlp_ref", "positional_encoding", "frequencies"]
