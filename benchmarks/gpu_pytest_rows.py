"""pytest plugin of the GPU run (benchmarks/gpu_run.py, step pytest): one JSON line per finished
test, appended to $HMX_GPU_RUN_ROWS and flushed at once, so a pytest killed at its time limit
(which writes no junit file) still leaves every result it had.

    HMX_GPU_RUN_ROWS=rows.jsonl python -m pytest -p benchmarks.gpu_pytest_rows tests/test_x.py
"""
from __future__ import annotations

import json
import os
import time


def pytest_runtest_logreport(report):
    path = os.environ.get("HMX_GPU_RUN_ROWS")
    if not path:
        return
    # one row per test: its call, or the setup / teardown that failed or skipped it
    if report.when != "call" and report.passed:
        return
    if report.when == "teardown" and report.skipped:
        return
    row = {"step": "pytest", "id": report.nodeid, "status": report.outcome, "when": report.when,
           "seconds": round(report.duration, 3), "t_unix": round(time.time(), 1)}
    if report.failed or report.skipped:
        text = report.longreprtext or ""
        row["error"] = text[-1500:] if report.failed else text[-300:]
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
