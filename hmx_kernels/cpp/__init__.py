"""C++/CUDA backends: the CPU twin ("cpu") and the CUDA kernels ("cuda") of csrc/.

Importing this package compiles nothing: the extension is built on the first call that needs it
(see `build.load_extension`) and cached on disk.
"""
from .build import ExtensionBuildError, cache_dir, load_extension

__all__ = ["load_extension", "cache_dir", "ExtensionBuildError"]
