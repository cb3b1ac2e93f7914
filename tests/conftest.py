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

# `make test-fast` runs `-m "not slow and not compile"`. The markers (registered in pyproject.toml)
# are set per test with @pytest.mark.slow, or here for whole files and fixtures, so one place says
# what the fast run leaves out:
#   compile: GPU kernel compile reports and checks (ptxas / nvcc for sm_80 and sm_90), minutes on 2 cores
#   slow: fresh builds of the C++ extension (the prebuilt_cache fixture, new virtual environments),
#         multi-process runs (torchrun, gloo process groups), Inductor compiles (C++ code
#         generation: a minute or more each on 2 cores) and sweeps that take more than a few seconds
COMPILE_REPORT_FILES = {"test_kernel_resources.py", "test_cuda_compile.py"}
COMPILE_TESTS = {"test_triton.py::test_kernels_compile_for_sm90_without_a_gpu"}
SLOW_FILES = {"test_cpp_build.py", "test_examples.py", "test_sequence_parallel.py", "test_sp_comm.py"}
SLOW_TESTS = {"test_ops.py::test_compile_layer_fullgraph_no_break_dynamic_lengths",
              "test_ops.py::test_compile_functional_op_fullgraph"}
# the longest cases of the fast selection (measured, 2 cores at load 3 to 7: 6 to 32 s each): the
# token-causal scan and the split kernels under the Triton interpreter, a long sequence, an
# aot_eager compile of a Conformer encoder, the two-process benchmark
SLOW_CASES = {
    "test_causal.py::test_triton_modes_with_the_split_kernels[token]",
    "test_padding_nonfinite.py::test_nonfinite_padding_does_not_reach_kept_results[triton-cpu-token_causal-idiap]",
    "test_padding_nonfinite.py::test_nonfinite_padding_does_not_reach_kept_results[triton-cpu-token_causal-speechbrain]",
    *(f"test_causal.py::test_modes_at_awkward_sizes[token-triton-cpu-{t}]" for t in ("float32", "float16", "bfloat16")),
    *(f"test_causal.py::test_matches_the_masked_formulation[{v}-token-triton-cpu-{t}]"
      for v in ("speechbrain", "idiap") for t in ("float32", "float16", "bfloat16")),
    "test_varlen.py::test_triton_packed_gradients_equal_the_reference[token]",
    "test_varlen.py::test_triton_packed_gradients_equal_the_reference[chunk4_L1]",
    "test_varlen.py::test_triton_packed_with_the_split_kernels[chunk4_L1]",
    "test_bench_modes.py::test_sequence_parallel_benchmark_one_and_two_processes",
    "test_ops.py::test_compile_speechbrain_conformer_encoder_with_converted_layers",
    "test_triton.py::test_long_sequence[cpu-fp32]",
}
# streaming on the Triton interpreter (test_streaming.py; 6 to 16 s a case at load 2): the fast run
# keeps one case per form of the carried state (in every window: fp16; one term per block, two
# calls: fp32) and the layer's stream(); the other modes, variants and dtypes run in make test
_TRITON_STREAM_FAST = {"float16-chunk3-speechbrain", "float32-chunk3_L2-idiap"}
SLOW_CASES |= {f"test_streaming.py::test_backend_stream_equals_one_pass[triton-cpu-{dtype}-{mode}-{variant}]"
               for dtype in ("float32", "float16", "bfloat16") for mode in ("token", "chunk3", "chunk5", "chunk4_L1", "chunk3_L2")
               for variant in ("speechbrain", "idiap")
               if f"{dtype}-{mode}-{variant}" not in _TRITON_STREAM_FAST}
# the reference's float16 streaming (its float32 sums rounded once at the end): make test only
SLOW_CASES |= {f"test_streaming.py::test_backend_stream_equals_one_pass[reference-cpu-float16-{mode}-{variant}]"
               for mode in ("token", "chunk3", "chunk5", "chunk4_L1", "chunk3_L2") for variant in ("speechbrain", "idiap")}
SLOW_CASES |= {"test_streaming.py::test_layer_streams_on_each_fused_backend[triton-cpu-idiap-chunk3_L2]",
               "test_streaming.py::test_stream_changes_backend_between_pieces[chunk3]",
               "test_streaming.py::test_triton_streams_with_the_split_kernels[chunk4]"}
SLOW_FIXTURES = {"prebuilt_cache", "repo_copy"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        test = f"{name}::{item.originalname}"
        if name in COMPILE_REPORT_FILES or test in COMPILE_TESTS:
            item.add_marker(pytest.mark.compile)
        if (name in SLOW_FILES or test in SLOW_TESTS or f"{name}::{item.name}" in SLOW_CASES
                or SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)


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
