"""nn.Module layers."""
from .fused_hyper_mixing import FusedHyperMixing, GeneratorMLP, HyperNetwork

__all__ = ["FusedHyperMixing", "GeneratorMLP", "HyperNetwork"]
