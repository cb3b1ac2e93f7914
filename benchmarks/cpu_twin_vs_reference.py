"""CPU twin ("cpu" backend) vs the eager reference: time and peak extra memory on the CPU.

    python benchmarks/cpu_twin_vs_reference.py [--B 4 --N 4096 --d 256 --k 1024 --H 8 --reps 5]

Defaults: B=4, N=4096, d=256, k=1024 (k_h=128), H=8, fp32, speechbrain variant (self-mixing),
no padding. For each backend and each mode (forward under no_grad; forward + backward) a fresh
Python process:
  - builds the inputs and runs a tiny call (loads the extension, warms code paths),
  - resets the kernel's peak-RSS counter (/proc/self/clear_refs "5") and reads VmRSS as baseline,
  - runs one call at full size; peak extra memory = VmHWM - baseline (torch's allocations are
    seen, unlike tracemalloc). Gradients of the leaves are included for forward + backward.
  - then times `reps` further calls and reports the median.
Where clear_refs is not writable, ru_maxrss of the fresh process minus the baseline is used.
Absolute numbers depend on the machine and its load; compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _child(args) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    import hmx_kernels

    torch.manual_seed(0)
    B, N, d, H, k = args.B, args.N, args.d, args.H, args.k
    d_h, k_h = d // H, k // H
    train = args.mode == "fwd_bwd"

    def params(requires_grad):
        def p(*shape, scale):
            return (torch.randn(*shape) * scale).requires_grad_(requires_grad)
        w = [p(H, d_h, d_h, scale=d_h ** -0.5), p(H, d_h, scale=0.5), p(H, k_h, d_h, scale=d_h ** -0.5), p(H, k_h, scale=0.5)]
        w2 = [p(H, d_h, d_h, scale=d_h ** -0.5), p(H, d_h, scale=0.5), p(H, k_h, d_h, scale=d_h ** -0.5), p(H, k_h, scale=0.5)]
        ln = [torch.ones(d).requires_grad_(requires_grad), torch.zeros(d).requires_grad_(requires_grad)]
        return w + w2 + ln

    def run(x, ws):
        if train:
            out = hmx_kernels.hyper_mixing(x, None, None, *ws, backend=args.backend)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                hmx_kernels.hyper_mixing(x, None, None, *ws, backend=args.backend)

    # tiny warm-up call: loads the extension and code paths without touching the full size
    run(torch.randn(1, 8, d).requires_grad_(train), params(train))
    x = torch.randn(B, N, d).requires_grad_(train)
    ws = params(train)
    hwm_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        hwm_reset = False
    base = _status_kib("VmRSS")
    run(x, ws)
    if hwm_reset:
        peak = _status_kib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.reps):
        for t in [x] + ws:
            t.grad = None
        t0 = time.perf_counter()
        run(x, ws)
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({
        "backend": args.backend, "mode": args.mode, "median_s": statistics.median(times),
        "times_s": times, "peak_extra_mib": (peak - base) / 1024, "hwm_reset": hwm_reset,
        "threads": torch.get_num_threads(),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="cpu,reference")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    import torch

    print(f"B={args.B} N={args.N} d={args.d} k={args.k} (k_h={args.k // args.H}) H={args.H} fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"median of {args.reps}")
    results = {}
    for mode in args.modes.split(","):
        for backend in args.backends.split(","):
            cmd = [sys.executable, __file__, "--child", "--backend", backend, "--mode", mode,
                   "--B", str(args.B), "--N", str(args.N), "--d", str(args.d), "--k", str(args.k),
                   "--H", str(args.H), "--reps", str(args.reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{backend} {mode}: failed\n{proc.stderr[-3000:]}")
                continue
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            r = json.loads(line[len("RESULT "):])
            results[(backend, mode)] = r
            print(f"{mode:8s} {backend:10s} median {r['median_s'] * 1e3:9.1f} ms   "
                  f"peak extra {r['peak_extra_mib']:8.1f} MiB")
    for mode in args.modes.split(","):
        a, b = results.get(("cpu", mode)), results.get(("reference", mode))
        if a and b:
            print(f"{mode:8s} cpu twin vs reference: {b['median_s'] / a['median_s']:.2f}x faster, "
                  f"peak extra memory {a['peak_extra_mib'] / max(b['peak_extra_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
