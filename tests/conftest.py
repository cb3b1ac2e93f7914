"""Test configuration.

Triton kernels run on CPU tensors under the Triton interpreter, which must be switched on before
triton is first imported: without a CUDA device we set TRITON_INTERPRET=1 here (a value already
in the environment wins). On a GPU the Triton kernels run one pinned config each
(HMX_KERNELS_TRITON_PIN=1, unless the environment says otherwise): tuning every kernel at every
head size and dtype the tests use would cost far more compiles than the tests themselves.
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HMX_KERNELS_TRITON_PIN", "1")  # read when hmx_kernels is first imported

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def poisoned():
    """Every buffer the fused backends allocate is NaN-filled first (HMX_KERNELS_POISON=1)."""
    from hmx_kernels import config

    config.set_poison(True)
    try:
        yield
    finally:
        config.set_poison(False)


@pytest.fixture(scope="session")
def repo_copy(tmp_path_factory):
    """A copy of the package laid out as in the repository (csrc/ beside it) without any
    hmx_kernels/_prebuilt builds, for PYTHONPATH in subprocesses that test building and loading."""
    from envtools import package_copy

    return package_copy(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def prebuilt_cache(tmp_path_factory, repo_copy):
    """One ahead-of-time build of the CPU extension into a fresh cache, by `python -m
    hmx_kernels.build` run by a venv's interpreter whose ninja lies only next to it (not on PATH,
    as in a Jupyter kernel). Compiles once per test session (about 30-60 s on 2 cores); the tests of
    build reuse, cache healing, prebuilt packages and installation copy from it.

    Returns a dict: cache (the cache folder), folder (the build folder in it), stdout, stderr."""
    import shutil
    import subprocess

    from envtools import clean_env, make_venv, path_without

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("prebuilt")
    py = make_venv(tmp / "venv", ninja=True)
    env = clean_env(PATH=path_without(tmp / "path", {"ninja"}), HMX_KERNELS_CACHE=tmp / "cache",
                    HMX_KERNELS_NO_CUDA="1", PYTHONPATH=repo_copy)
    proc = subprocess.run([str(py), "-m", "hmx_kernels.build"], env=env, cwd=str(tmp), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"python -m hmx_kernels.build failed:\n{proc.stdout}\n{proc.stderr}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("hmx_kernels C++ extension (CPU")][-1]
    from pathlib import Path

    return dict(cache=tmp / "cache", folder=Path(line.split(" in ", 1)[1].strip()), stdout=proc.stdout,
                stderr=proc.stderr)
