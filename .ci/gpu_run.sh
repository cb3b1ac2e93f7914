#!/usr/bin/env bash
# One planned run on a lent GPU machine, about 8 minutes with the extension build: benchmarks/gpu_run.py
# (steps env, correctness, sanitizer, timings, breakdown, pytest, each with its own time limit, each
# writing one JSON line per finished case under $OUT as it goes; see benchmarks/README.md, "One short
# GPU run"), then benchmarks/gpu_report.py's tables (summary.md beside the results).
#
# Usage, from the repository root (the machine gets a copy of the working tree, maybe without .git,
# so pass the commit):
#   OUT=/some/dir HMX_GIT_SHA=$(git rev-parse HEAD) bash .ci/gpu_run.sh [gpu_run options, e.g. --budget 480]
# Nothing is installed: torch, triton and nvcc come with the machine and the checkout is imported
# through PYTHONPATH (no pip, no network). Results: $OUT/gpu/<device>/ (copy to
# benchmarks/results/gpu/<device>/ and commit) and $OUT/gpu_run.log.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/gpu"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HMX_KERNELS_CACHE=${HMX_KERNELS_CACHE:-/tmp/hmx-cache}
PY=${PY:-python3}

# the driver keeps to its budget (480 s by default); this outer limit only guards against a hang in
# the driver itself
timeout 540 "$PY" -m benchmarks.gpu_run --out-root "$OUT/gpu" "$@" 2>&1 | tee "$OUT/gpu_run.log"
# the tables (also written to summary.md beside the results), printed so that the console shows them
for dir in "$OUT"/gpu/*/; do
  "$PY" -m benchmarks.gpu_report "$dir" 2>&1 | tee -a "$OUT/gpu_run.log"
done
