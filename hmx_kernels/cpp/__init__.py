"""C++/CUDA backends: the CPU twin ("cpu") and the CUDA kernels ("cuda") of csrc/.

Importing this package compiles nothing: the extension is found prebuilt or in the cache, or built
on the first call that needs it (see `build.load_extension`; `python -m hmx_kernels.build` builds
it ahead of time).
"""
from .build import ExtensionBuildError, build_ahead, cache_dir, clear_failed, load_extension

__all__ = ["load_extension", "build_ahead", "clear_failed", "cache_dir", "ExtensionBuildError"]
