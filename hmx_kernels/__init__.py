"""hmx_kernels: fused, linear-time HyperMixing for PyTorch.

- `hyper_mixing(...)`: the functional op, dispatched to the best backend for the inputs;
  `hyper_mixing_varlen(tokens, cu_seqlens, ...)` for packed sequences and
  `hyper_mixing_stream(piece, ..., state=...)` for a causal sequence fed in pieces.
- `FusedHyperMixing`: drop-in layer for speechbrain's / idiap's HyperMixing (loads their checkpoints).
- `convert_speechbrain(model)` / `to_speechbrain(model)`: every speechbrain HyperMixing of a model
  to FusedHyperMixing and back, in place (hmx_kernels.integrations.speechbrain).
- `explain(layer, x)`: which backend a call runs and why the others do not (`layer.last_backend`).
- `hmx_kernels.reference`: the plain-PyTorch reference every backend is tested against.
"""
from . import reference
from .dispatch import BackendNotSupportedError, backend_reasons, registered_backends, select_backend
from .flops import hyper_mixing_flops
from .functional import hyper_mixing
from .streaming import StreamingState, hyper_mixing_stream
from .varlen import hyper_mixing_varlen
from .parallel import sequence_parallel_offset
from .layer import FusedHyperMixing
from .integrations.speechbrain import convert_speechbrain, to_speechbrain
from .introspection import BackendReport, explain
from .reference import hyper_mixing_ref, positional_encoding
from .reference import backend as _reference_backend  # noqa: F401  (registers "reference")
from .triton import backend as _triton_backend  # noqa: F401  (registers "triton")
from .problem import check_inputs
from .variants import VARIANTS
from .cpp import cpu as _cpu_backend  # noqa: F401  (registers "cpu")
from .cpp import cuda as _cuda_backend  # noqa: F401  (registers "cuda")

__version__ = "0.1.0"


def clear_caches() -> None:
    """Drop the positional-encoding tables kept by `hmx_kernels.positional` (every device), and the
    working buffers the `cpu` backend's C++ twin keeps between calls (its per-thread pool, at most
    256 MiB per thread; this frees the calling thread's, which holds the large ones). Builds
    nothing: an extension not loaded yet holds no buffers."""
    from .cpp.ops import loaded_extensions
    from .positional import positional_encoding_cache

    positional_encoding_cache().clear()
    for module in loaded_extensions():
        module.release_buffers()

__all__ = [
    "hyper_mixing",
    "hyper_mixing_varlen",
    "hyper_mixing_stream",
    "StreamingState",
    "hyper_mixing_ref",
    "positional_encoding",
    "FusedHyperMixing",
    "convert_speechbrain",
    "to_speechbrain",
    "explain",
    "BackendReport",
    "registered_backends",
    "backend_reasons",
    "select_backend",
    "check_inputs",
    "hyper_mixing_flops",
    "BackendNotSupportedError",
    "VARIANTS",
    "reference",
    "clear_caches",
    "sequence_parallel_offset",
    "__version__",
]
