"""hmx_kernels: fused, linear-time HyperMixing for PyTorch.

`pip install .` compiles nothing: Triton kernels are JIT-compiled by Triton, and the C++/CUDA
sources in csrc/ are shipped inside the package (as `hmx_kernels/csrc`) and compiled on first use
with torch.utils.cpp_extension + ninja, then cached.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
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
    python_requires=">=3.9",
    packages=find_packages(include=["hmx_kernels", "hmx_kernels.*"]) + ["hmx_kernels.csrc"],
    # csrc/ lives at the top of the repository and is installed as the package data hmx_kernels/csrc
    package_dir={"hmx_kernels.csrc": "csrc"},
    package_data={"hmx_kernels.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h", "*.hpp", "*.md", "**/*"]},
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "torch>=2.1,<3",
        "numpy",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "ninja",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis", "pytest-benchmark"],
        "bench": ["matplotlib", "pytest-benchmark", "tabulate"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
