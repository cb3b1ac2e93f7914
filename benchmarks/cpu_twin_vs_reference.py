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

    python benchmarks/cpu_twin_vs_reference.py --side-by-side [--reps 15 --warmup 3 --out FILE]

Side by side, in ONE process with ONE torch thread: B=1, N=8192, d=256, k=1024 (k_h=128), H=8,
fp32, speechbrain variant, no padding (the other size options apply when given). After `warmup`
forward+backward calls of each backend, `reps` rounds each time the `cpu` and the `reference`
backend once (which goes first alternates between rounds; gradients are cleared before every
call; the upstream gradient is a fixed random tensor), for forward + backward and for the forward
alone (no_grad). Reported: the medians, the time ratio cpu / reference (the target is <= 0.15 for
forward + backward), and throughput as FLOP/s both as executed (the cpu backend runs the reassociated form:
`hmx_kernels.flops.hyper_mixing_flops_reassociated`; the reference the direct form) and as the
direct form's equivalent (`hmx_kernels.flops.hyper_mixing_flops` over the measured time). Each
call is timed as wall time and as the process's CPU time: on a machine whose cores other
processes also use, the wall time of a short call grows by whole scheduler time slices, which
the CPU time leaves out (the load average is in the header; quote runs from a quiet machine). The
output of both backends is compared once (scale-relative error). With --out the report is also
written to FILE, headed by machine, date, torch version, git sha and load average.
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


def _params(B, N, d, H, k):
    """Inputs and weights as in the subprocess runs: x [B, N, d], 8 generator tensors, LayerNorm."""
    import torch

    d_h, k_h = d // H, k // H

    def p(*shape, scale):
        return (torch.randn(*shape) * scale).requires_grad_(True)

    gen = []
    for _ in range(2):
        gen += [p(H, d_h, d_h, scale=d_h ** -0.5), p(H, d_h, scale=0.5), p(H, k_h, d_h, scale=d_h ** -0.5),
                p(H, k_h, scale=0.5)]
    ln = [torch.ones(d).requires_grad_(True), torch.zeros(d).requires_grad_(True)]
    return torch.randn(B, N, d).requires_grad_(True), gen + ln


def side_by_side(args) -> str:
    """Times the cpu and reference backends alternately in this process, one torch thread;
    returns the report (see the module docstring)."""
    import platform

    import torch

    sys.path.insert(0, str(REPO))
    import hmx_kernels
    from hmx_kernels.flops import hyper_mixing_flops, hyper_mixing_flops_reassociated

    from benchmarks.config import cpu_model, git_sha

    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, N, d, H, k = args.B, args.N, args.d, args.H, args.k
    k_h = k // H
    x, ws = _params(B, N, d, H, k)
    # a random upstream gradient: an all-ones one is nearly annihilated by the LayerNorm's backward
    grad = torch.randn(B, N, d)
    leaves = [x] + ws
    backends = ("cpu", "reference")

    def fwd_bwd(backend):
        out = hmx_kernels.hyper_mixing(x, None, None, *ws, backend=backend)
        out.backward(grad)

    def fwd(backend):
        with torch.no_grad():
            hmx_kernels.hyper_mixing(x, None, None, *ws, backend=backend)

    def timed(fn, backend):
        for t in leaves:
            t.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        fn(backend)
        return time.perf_counter() - t0, time.process_time() - c0

    with torch.no_grad():
        outs = {b: hmx_kernels.hyper_mixing(x, None, None, *ws, backend=b) for b in backends}
    err = ((outs["cpu"] - outs["reference"]).abs().max() / outs["reference"].abs().max()).item()
    times = {}
    load_before = os.getloadavg()
    t_start = time.time()
    for mode, fn in (("fwd_bwd", fwd_bwd), ("fwd", fwd)):
        for b in backends:
            for _ in range(args.warmup):
                timed(fn, b)
        samples = {b: [] for b in backends}
        for r in range(args.reps):
            for b in (backends if r % 2 == 0 else backends[::-1]):
                samples[b].append(timed(fn, b))
        times[mode] = samples
    wall = time.time() - t_start
    load_after = os.getloadavg()

    flops = {mode: {"direct": hyper_mixing_flops(B, N, N, d, H, k_h, mode),
                    "reassociated": hyper_mixing_flops_reassociated(B, N, N, d, H, k_h, mode)}
             for mode in times}
    lines = [
        f"# benchmarks/cpu_twin_vs_reference.py --side-by-side: {cpu_model()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"# torch {torch.__version__}, python {platform.python_version()}, git {git_sha()}, "
        f"{torch.get_num_threads()} torch thread, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after ({wall:.0f} s)",
        f"B={B} N={N} d={d} k={k} (d_h={d // H}, k_h={k_h}) H={H} fp32, speechbrain variant, no padding; "
        f"{args.warmup} warm-up calls per backend, {args.reps} alternating rounds, medians",
        f"output cpu vs reference: scale-relative max error {err:.1e}",
    ]
    for mode in ("fwd_bwd", "fwd"):
        wall = {b: [w for w, _ in times[mode][b]] for b in backends}
        cpu_s = {b: [c for _, c in times[mode][b]] for b in backends}
        med = {b: statistics.median(wall[b]) for b in backends}
        lo = {b: min(wall[b]) for b in backends}
        cmed = {b: statistics.median(cpu_s[b]) for b in backends}
        f = flops[mode]
        label = "forward+backward" if mode == "fwd_bwd" else "forward (no_grad)"
        lines.append(f"{label}:")
        for b in backends:
            executed = f["reassociated"] if b == "cpu" else f["direct"]
            form = "reassociated" if b == "cpu" else "direct"
            lines.append(
                f"  {b:9s} median {med[b] * 1e3:8.1f} ms (min {lo[b] * 1e3:8.1f}, process CPU time median "
                f"{cmed[b] * 1e3:8.1f})   executed {executed / med[b] / 1e9:6.1f} GFLOP/s ({form} form, "
                f"{executed / 1e9:.2f} GFLOP)   direct-form equivalent {f['direct'] / med[b] / 1e9:6.1f} GFLOP/s "
                f"({f['direct'] / 1e9:.2f} GFLOP)")
        ratio = med["cpu"] / med["reference"]
        target = "  (target <= 0.15: " + ("met" if ratio <= 0.15 else "NOT met") + ")" if mode == "fwd_bwd" else ""
        lines.append(f"  time ratio cpu / reference: {ratio:.3f} of the wall-time medians{target}; "
                     f"{lo['cpu'] / lo['reference']:.3f} of the minima, "
                     f"{cmed['cpu'] / cmed['reference']:.3f} of the CPU-time medians")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=None, help="default 4 (--side-by-side: 1)")
    ap.add_argument("--N", type=int, default=None, help="default 4096 (--side-by-side: 8192)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--reps", type=int, default=None, help="default 5 (--side-by-side: 15)")
    ap.add_argument("--backends", default="cpu,reference")
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--side-by-side", action="store_true",
                    help="cpu and reference alternately in one process, one thread (see the module docstring)")
    ap.add_argument("--warmup", type=int, default=3, help="--side-by-side: warm-up calls per backend and mode")
    ap.add_argument("--out", help="--side-by-side: also write the report to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sbs = args.side_by_side
    args.B = args.B if args.B is not None else (1 if sbs else 4)
    args.N = args.N if args.N is not None else (8192 if sbs else 4096)
    args.reps = args.reps if args.reps is not None else (15 if sbs else 5)
    if sbs:
        report = side_by_side(args)
        print(report)
        if args.out:
            Path(args.out).write_text(report + "\n")
        return
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
