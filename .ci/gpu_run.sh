#!/usr/bin/env bash
# One planned run on a lent GPU machine (see docs/KERNEL_NOTES.md): record the device and versions,
# run the GPU tests (Triton and CUDA backends, fp32/fp16/bf16) and a GPU benchmark sweep, and leave
# everything under $OUT to be committed (benchmarks/results/<device>-*).
# Usage there, from the repository root:   OUT=/some/dir HMX_GIT_SHA=<sha> bash .ci/gpu_run.sh
# The GPU machine's python3 already holds torch, triton, ninja, pytest, matplotlib; nothing is
# installed: the checkout is imported through PYTHONPATH. Budget: about 9 minutes in all.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HMX_KERNELS_CACHE=${HMX_KERNELS_CACHE:-/tmp/hmx-cache}
PY=${PY:-python3}

{
  date -u
  echo "git sha: $(git rev-parse HEAD 2>/dev/null || echo "${HMX_GIT_SHA:-unknown}")"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -2
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# GPU tests: the backends' own files (the speechbrain equivalence tests need speechbrain, absent there)
# (test_causal / test_varlen run the Triton backend's causal, chunked and packed modes on CUDA tensors)
timeout 300 $PY -m pytest -q -x -ra tests/test_conformance.py tests/test_ops.py tests/test_triton.py tests/test_cuda_backend.py tests/test_cpp_cpu.py \
  tests/test_reference.py tests/test_causal.py tests/test_varlen.py --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"

# the kernel resource report measured with the device's own Triton and ptxas (compile only; the
# Triton kernels, which depend on the Triton version; the CUDA rows come from nvcc and were
# committed from a CPU machine). The report writes its files at the end, so it must finish in time.
TRITON_INTERPRET=0 timeout 180 $PY -m benchmarks.kernels --backends triton --jobs 12 --no-limit \
  --out "$OUT/kernels" 2>&1 | tail -5

# the issue's timing points first (d 512, k 2048, H 8; N 1024 / 4096 / 16384), then what time allows
timeout 200 $PY -m benchmarks --device cuda --shapes tf512 --lengths 1024,4096,16384 \
  --batch-mode fixed --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
