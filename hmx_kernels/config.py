"""Every environment variable hmx_kernels reads, read once, when the package is imported.

Nothing else in the package reads `os.environ`, and nothing writes it except the extension build,
which prepends the interpreter's folder to PATH while compiling when ninja is found only there
(torch's build runs `ninja` by name; `hmx_kernels/cpp/build.py`, `_ninja_on_path`). The per-call
path sees only the `SETTINGS` object below, and tests change a setting through the setters here,
not the environment. The README's "Environment variables" table lists the same variables
(HMX_KERNELS_BUILD_EXT, read by setup.py at installation, is not read here).

Every value is checked at import: a value outside the allowed ones raises SettingError naming the
variable, the value and what is allowed. An empty value counts as unset (the default), as for
Python's own PYTHON* variables. TRITON_INTERPRET is triton's variable and is read exactly as the
installed triton reads it (`triton_interpret_from_env`; tests compare the two), never refused.
The cache folder is resolved on first use (the first build), not at import, so that importing
works without a home directory.

| variable                  | default                 | allowed values: effect                                  |
|---------------------------|-------------------------|---------------------------------------------------------|
| HMX_KERNELS_CACHE         | ~/.cache/hmx_kernels    | a folder: the compiled C++/CUDA extension builds        |
| HMX_KERNELS_NO_CUDA       | 0                       | 0 or 1; 1: build the CPU twin only, even where nvcc and a GPU exist |
| HMX_KERNELS_CUDA_ARCH     | the visible GPUs' archs | e.g. "8.0;9.0" (items N.N, N.Na, N.N+PTX; ";", "," or " " between): GPU architectures the CUDA kernels are built for |
| HMX_KERNELS_VERBOSE       | 0                       | 0 or 1; 1: show the compiler's output while building    |
| HMX_KERNELS_POISON        | 0                       | 0 or 1; 1: fill every buffer a fused backend allocates with NaN (tests) |
| HMX_KERNELS_CUDA_NO_MMA   | 0                       | 0 or 1; 1: CUDA kernels use FMA instead of tensor cores for fp16/bf16 |
| HMX_KERNELS_PE_CACHE_MB   | 64                      | a finite number >= 0: most MiB of positional-encoding tables kept per device (0: none) |
| HMX_KERNELS_TRITON_PIN    | 0                       | 0 or 1; 1: no Triton autotuning; each kernel runs one tested config (tests, short GPU runs) |
| TRITON_INTERPRET          | 0                       | as triton reads it (1, true, on, yes, y in any case: on; anything else: off): Triton kernels run on CPU tensors in Triton's interpreter (must be set before triton is imported) |
| CXX, CUDA_HOME/CUDA_PATH  | c++, PATH               | the compilers used for the first-use build             |
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["Settings", "SETTINGS", "SettingError", "set_poison", "set_allow_mma", "set_triton_pin", "on_change",
           "triton_interpret_from_env", "parse_triton_bool"]


class SettingError(ValueError):
    """An environment variable of hmx_kernels holds a value it does not take."""


def _value(name: str) -> Optional[str]:
    """The variable's value; None when unset or empty (the default applies)."""
    value = os.environ.get(name)
    return value if value else None


def _refuse(name: str, value: str, allowed: str):
    raise SettingError(f"environment variable {name}={value!r} is not valid: {allowed} (or unset for the default)")


def _switch(name: str, default: bool = False) -> bool:
    value = _value(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        _refuse(name, value, "allowed values are 0 and 1")
    return value == "1"


def _mebibytes(name: str, default: float) -> int:
    value = _value(name)
    if value is None:
        return int(default * 2**20)
    try:
        mib = float(value)
    except ValueError:
        mib = math.nan
    if not math.isfinite(mib) or mib < 0:
        _refuse(name, value, "a finite number of MiB >= 0 (0: keep none)")
    return int(mib * 2**20)


_ARCH_ITEM = re.compile(r"\d+\.\d+[a-z]?(\+PTX)?")


def _cuda_arch(name: str) -> Optional[str]:
    value = _value(name)
    if value is None:
        return None
    items = [item for item in re.split(r"[;, ]", value) if item]
    if not items or not all(_ARCH_ITEM.fullmatch(item) for item in items):
        _refuse(name, value, 'a list of GPU architectures such as "8.0;9.0", "9.0a" or "8.6+PTX" '
                "(separated by ';', ',' or ' ')")
    return value


def parse_triton_bool(value: Optional[str]) -> bool:
    """A boolean environment value read as triton reads its own (triton's `getenv_bool`): on for
    1, true, on, yes or y in any ASCII case, off for anything else, unset or empty."""
    return value is not None and value.isascii() and value.lower() in ("1", "true", "on", "yes", "y")


def triton_interpret_from_env() -> bool:
    """TRITON_INTERPRET as triton reads it now (the one reading of it in the package)."""
    return parse_triton_bool(os.environ.get("TRITON_INTERPRET"))


def _default_cache_dir() -> Path:
    try:
        return Path.home() / ".cache" / "hmx_kernels"
    except (RuntimeError, KeyError, OSError) as e:  # no HOME and no passwd entry for this uid
        raise RuntimeError(
            f"hmx_kernels cannot find a folder for its compiled extension: no home directory ({e}); set "
            "HMX_KERNELS_CACHE to a writable folder"
        ) from None


@dataclass
class Settings:
    cache_env: Optional[str]  # HMX_KERNELS_CACHE as given (resolved by `cache_dir` on first use)
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
        return cls(
            cache_env=_value("HMX_KERNELS_CACHE"),
            no_cuda=_switch("HMX_KERNELS_NO_CUDA"),
            cuda_arch=_cuda_arch("HMX_KERNELS_CUDA_ARCH"),
            verbose=_switch("HMX_KERNELS_VERBOSE"),
            poison=_switch("HMX_KERNELS_POISON"),
            allow_mma=not _switch("HMX_KERNELS_CUDA_NO_MMA"),
            triton_interpret=triton_interpret_from_env(),
            cxx=_value("CXX") or "c++",
            cuda_home=_value("CUDA_HOME") or _value("CUDA_PATH"),
            pe_cache_bytes=_mebibytes("HMX_KERNELS_PE_CACHE_MB", 64),
            triton_pin=_switch("HMX_KERNELS_TRITON_PIN"),
        )

    @property
    def cache_dir(self) -> Path:
        """The extension cache folder, resolved when first needed (a build or a cache lookup);
        RuntimeError, suggesting HMX_KERNELS_CACHE, when there is no home directory to put it in."""
        if self.cache_env is None:
            return _default_cache_dir()
        folder = Path(self.cache_env)
        if self.cache_env.startswith("~"):
            try:
                folder = folder.expanduser()
            except (RuntimeError, KeyError, OSError) as e:
                raise RuntimeError(f"HMX_KERNELS_CACHE={self.cache_env!r} starts with ~ but there is no home "
                                   f"directory ({e}); give an absolute folder") from None
        return folder

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
    """Pin one tested config per Triton kernel (no autotuning; hmx_kernels.triton.autotune.pinned_candidate)
    or let the autotuner choose (default). Chosen configs remembered so far are forgotten."""
    SETTINGS.triton_pin = bool(enabled)
    SETTINGS._changed()
