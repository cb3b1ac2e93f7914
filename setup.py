"""hmx_kernels: fused, linear-time HyperMixing for PyTorch.

`pip install .` compiles nothing: the C++/CUDA sources in csrc/ are shipped inside the package (as
`hmx_kernels/csrc`) and compiled on first use with torch.utils.cpp_extension + ninja, then cached;
Triton kernels (the optional `triton` extra) are JIT-compiled by Triton.

`HMX_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .` also compiles the C++ extension during
the build (against the torch already installed, hence no build isolation) into the package's
`hmx_kernels/_prebuilt/` folder, which the installed package loads without a compiler or ninja.
It is the same build as `python -m hmx_kernels.build --into-package` (for this machine's CPU).
`HMX_KERNELS_BUILD_EXT=x86-64` builds the x86-64-v4 / -v3 flavours instead (any AVX-512 / AVX2
CPU), and `HMX_KERNELS_BUILD_EXT=x86-64 python -m build --wheel --no-isolation` makes a wheel
that carries them (tagged for this Python and platform, since it holds a compiled module).
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).resolve().parent
BUILD_EXT = os.environ.get("HMX_KERNELS_BUILD_EXT", "0").strip().lower()
if BUILD_EXT not in ("", "0", "1", "x86-64"):
    raise SystemExit(f"HMX_KERNELS_BUILD_EXT={BUILD_EXT!r}: use 1 (this CPU's build) or x86-64 (x86-64-v3/v4)")


class BinaryDistribution(Distribution):
    """With a compiled extension inside, the wheel is tagged for this Python and platform."""

    def has_ext_modules(self):
        return BUILD_EXT not in ("", "0")


class build_py(_build_py):
    """build_py that, with HMX_KERNELS_BUILD_EXT=1, also compiles the C++ extension into the
    package's _prebuilt/ folder (hmx_kernels.cpp.build.build_ahead); without it, nothing is compiled."""

    def run(self):
        super().run()
        if BUILD_EXT not in ("", "0"):
            self._build_extension()
        elif not getattr(self, "editable_mode", False):
            # build/ outlives a build: drop what an earlier HMX_KERNELS_BUILD_EXT=1 build left there
            shutil.rmtree(Path(self.build_lib) / "hmx_kernels" / "_prebuilt", ignore_errors=True)

    def _build_extension(self):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise SystemExit(
                f"HMX_KERNELS_BUILD_EXT=1: the C++ extension is compiled against the installed torch, which the "
                f"build cannot import ({e}); install torch first and run "
                f"`HMX_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`"
            )
        sys.path.insert(0, str(ROOT))  # this source tree's hmx_kernels, not an installed one
        from hmx_kernels.cpp import build as ext_build

        if ROOT not in Path(ext_build.__file__).resolve().parents:
            raise SystemExit(f"HMX_KERNELS_BUILD_EXT=1: imported hmx_kernels from {ext_build.__file__}, "
                             f"not from the source tree {ROOT}")
        if getattr(self, "editable_mode", False):  # pip install -e: the package is the source tree
            into = ROOT / "hmx_kernels" / "_prebuilt"
        else:
            into = Path(self.build_lib) / "hmx_kernels" / "_prebuilt"
        try:
            ext_build.build_ahead(into=into, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                                  x86_64=BUILD_EXT == "x86-64")
        except ext_build.ExtensionBuildError as e:
            raise SystemExit(f"HMX_KERNELS_BUILD_EXT=1: {e}")

TRITON = "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'"
version = {}
for line in (ROOT / "hmx_kernels" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="hmx_kernels",
    version=version["__version__"],
    description="Fused, linear-time HyperMixing (HyperMixer / HyperConformer token mixing) for PyTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    packages=find_packages(include=["hmx_kernels", "hmx_kernels.*"]) + ["hmx_kernels.csrc"],
    # csrc/ lives at the top of the repository and is installed as the package data hmx_kernels/csrc
    package_dir={"hmx_kernels.csrc": "csrc"},
    package_data={"hmx_kernels.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h", "*.hpp", "*.md", "**/*"],
                  "hmx_kernels": ["py.typed"]},
    include_package_data=False,
    zip_safe=False,
    # no triton here: it is about 1 GB and a CPU-only machine has no use for it (CUDA builds of
    # torch on Linux bring their own); the `triton` extra installs it, and the tests need it for
    # the Triton interpreter
    # torch floor: `import hmx_kernels` registers its ops with torch.library.custom_op, register_fake
    # and register_autograd (torch 2.4); the `triton` backend also needs wrap_triton / triton_op and
    # the device property shared_memory_per_block_optin (torch 2.6) and, on an older torch, reports
    # itself unavailable with that reason (hmx_kernels/triton/backend.py), so "auto" uses the others.
    # Tested: torch 2.13 (README, "Versions").
    install_requires=[
        "torch>=2.4,<3",
        "numpy",
        "ninja",
    ],
    extras_require={
        "triton": [TRITON],
        "test": ["pytest>=7", "hypothesis", "pytest-benchmark", TRITON],
        "bench": ["matplotlib", "pytest-benchmark", "tabulate"],
    },
    cmdclass={"build_py": build_py},
    distclass=BinaryDistribution,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
