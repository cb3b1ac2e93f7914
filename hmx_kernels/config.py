"""Every environment variable hmx_kernels reads, read once, when the package is imported.

Nothing else in the package reads `os.environ`, and nothing writes it except the extension build,
which prepends the interpreter's folder to PATH while compiling when ninja is found only there
(torch's build runs `ninja` by name; `hmx_kernels/cpp/build.py`, `_ninja_on_path`). The per-call
path sees only the `SETTINGS` object below, and tests change a setting through the setters here,
not the environment. The README's "Environment variables" table lists the same variables
(HMX_KERNELS_BUILD_EXT, read by setup.py at installation, is not read here).

| variable                  | default                 | effect                                                  |
|---------------------------|-------------------------|---------------------------------------------------------|
| HMX_KERNELS_CACHE         | ~/.cache/hmx_kernels    | folder of the compiled C++/CUDA extension builds        |
| HMX_KERNELS_NO_CUDA       | 0                       | 1: build the CPU twin only, even where nvcc and a GPU exist |
| HMX_KERNELS_CUDA_ARCH     | the visible GPUs' archs | e.g. "8.0;9.0": GPU architectures the CUDA kernels are built for |
| HMX_KERNELS_VERBOSE       | 0                       | 1: show the compiler's output while building            |
| HMX_KERNELS_POISON        | 0                       | 1: fill every buffer a fused backend allocates with NaN (tests) |
| HMX_KERNELS_CUDA_NO_MMA   | 0                       | 1: CUDA kernels use FMA instead of tensor cores for fp16/bf16 |
| HMX_KERNELS_PE_CACHE_MB   | 64                      | most MiB of positional-encoding tables kept per device (0: none) |
| HMX_KERNELS_TRITON_PIN    | 0                       | 1: no Triton autotuning; each kernel runs one tested config (tests, short GPU runs) |
| TRITON_INTERPRET          | 0                       | 1: Triton kernels run on CPU tensors in Triton's interpreter (must be set before triton is imported; read by triton) |
| CXX, CUDA_HOME/CUDA_PATH  | c++, PATH               | the compilers used for the first-use build             |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["Settings", "SETTINGS", "set_poison", "set_allow_mma", "set_triton_pin", "on_change"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


@dataclass
class Settings:
    cache_dir: Path
    no_cuda: bool
    cuda_arch: Optional[str]
    verbose: bool
    poison: bool
    allow_mma: bool
    triton_interpret: bool
    cxx: str
    cuda_home: Optional[str]
    pe_cache_bytes: int
    triton_pin: bool
    _listeners: List[Callable[["Settings"], None]] = field(default_factory=list, repr=False)

    @classmethod
    def from_env(cls) -> "Settings":
        cache = os.environ.get("HMX_KERNELS_CACHE")
        return cls(
            cache_dir=Path(cache).expanduser() if cache else Path.home() / ".cache" / "hmx_kernels",
            no_cuda=os.environ.get("HMX_KERNELS_NO_CUDA") == "1",
            cuda_arch=os.environ.get("HMX_KERNELS_CUDA_ARCH") or None,
            verbose=os.environ.get("HMX_KERNELS_VERBOSE") == "1",
            poison=os.environ.get("HMX_KERNELS_POISON") == "1",
            allow_mma=os.environ.get("HMX_KERNELS_CUDA_NO_MMA") != "1",
            triton_interpret=_flag("TRITON_INTERPRET"),
            cxx=os.environ.get("CXX", "c++"),
            cuda_home=os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or None,
            pe_cache_bytes=int(float(os.environ.get("HMX_KERNELS_PE_CACHE_MB", "64")) * 2**20),
            triton_pin=_flag("HMX_KERNELS_TRITON_PIN"),
        )

    def _changed(self) -> None:
        for fn in self._listeners:
            fn(self)


SETTINGS = Settings.from_env()


def on_change(fn: Callable[[Settings], None]) -> None:
    """Call `fn(SETTINGS)` now and whenever a setter changes a setting (the C++ extension uses
    this to receive the poison and tensor-core switches once, not on every call)."""
    SETTINGS._listeners.append(fn)
    fn(SETTINGS)


def set_poison(enabled: bool) -> None:
    """NaN-fill every output and workspace the fused backends allocate (finds unwritten elements)."""
    SETTINGS.poison = bool(enabled)
    SETTINGS._changed()


def set_allow_mma(enabled: bool) -> None:
    """Let the CUDA kernels use tensor cores for fp16/bf16 (default) or force FMA."""
    SETTINGS.allow_mma = bool(enabled)
    SETTINGS._changed()


def set_triton_pin(enabled: bool) -> None:
    """Pin one tested config per Triton kernel (no autotuning; hmx_kernels.triton.config.pinned_candidate)
    or let the autotuner choose (default). Chosen configs remembered so far are forgotten."""
    SETTINGS.triton_pin = bool(enabled)
    SETTINGS._changed()
