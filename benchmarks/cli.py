"""Command line: parse options, pick contenders, run the sweep, write and print the results.

Output folder: benchmarks/results/local/ (untracked), so that a run leaves the repository clean;
`--update-results` (or HMX_BENCH_UPDATE=1, `make bench UPDATE=1`) writes the committed reference
results in benchmarks/results/ instead; `--quick` writes to benchmarks/results/quick/.
Output files (deterministic names, overwritten by the next run on the same device and dtype):
  <out>/<device-slug>-<dtype>.csv / .json     every point (JSON adds the metadata and crossovers)
  <out>/<device-slug>-<dtype>-crossover.csv   crossover lengths
  <out>/<device-slug>-<dtype>-time.png / -memory.png
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import List, Optional

import torch

from . import report, runinfo
from .config import (DEFAULTS, DTYPES, QUICK, SHAPES, device_name, device_slug, dtype_name,
                     git_sha, library_versions, measured_cpu_peak_tflops, parse_shape,
                     peak_tflops)
from .contenders import all_contenders, default_contender_names
from .sweep import SweepConfig, run_sweep

HERE = os.path.dirname(os.path.abspath(__file__))

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during the pass minus memory_allocated() before it",
    "cpu": "peak of the running sum of PyTorch CPU allocator allocations/frees during the pass "
           "(torch.profiler profile_memory [memory] events), above what was allocated before it",
}


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="HyperMixing (every backend) against attention: time and memory versus length. "
                    "Defaults depend on the device (CPU: a few minutes on 2 cores; GPU: the full sweep).")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: CPU float32, GPU bfloat16)")
    p.add_argument("--shapes", default=None,
                   help=f"comma list of {list(SHAPES)} or custom d:k:H (k = hypernetwork size over all heads)")
    p.add_argument("--lengths", default=None, help="comma list of sequence lengths N")
    p.add_argument("--max-length", type=int, default=None, help="powers of two from the default minimum up to this")
    p.add_argument("--contenders", default=None,
                   help="comma list of contender names, or 'default' / 'all' plus names (see --list)")
    p.add_argument("--batch-mode", default=None, help="fixed, tokens, or fixed,tokens")
    p.add_argument("--batch", type=int, default=None, help="B in the fixed-batch mode")
    p.add_argument("--tokens", type=int, default=None, help="B * N in the token-budget mode")
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    runinfo.add_output_options(p)
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per pass (at most)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up forward+backward calls before timing")
    p.add_argument("--time-cap", type=float, default=None,
                   help="seconds: a warm-up forward+backward slower than this is a timeout; larger N skipped")
    p.add_argument("--measure-budget", type=float, default=None,
                   help="seconds per timed pass before repetitions are cut (3 at least)")
    p.add_argument("--compile-cap", type=float, default=300.0, help="seconds allowed for a torch.compile first call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; 0 = torch's default (all cores). Default on CPU: 1")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls on GPU (off by default)")
    p.add_argument("--list", action="store_true", help="list the contenders for the device and exit")
    return p


def _committed_peak(name: str, threads: int) -> Optional[float]:
    """The matrix-multiply rate the committed results for this CPU model and dtype measured at the
    same thread count (None when there are none): what this machine gives when it is quiet."""
    import json

    path = os.path.join(runinfo.RESULTS, name + ".json")
    try:
        with open(path) as f:
            meta = json.load(f)["meta"]
    except (OSError, ValueError, KeyError):
        return None
    return meta.get("peak_tflops") if meta.get("torch_threads") == threads else None


def main(argv: Optional[List[str]] = None, extra_contenders=None) -> int:
    """Run the benchmark; extra_contenders: more Contender objects (used by the tests)."""
    args = build_parser().parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = "cuda" if dev.type == "cuda" else "cpu"
    opts = dict(DEFAULTS[kind])
    if args.quick:
        opts.update(QUICK[kind])
    available = all_contenders(dev)
    for c in extra_contenders or []:
        available[c.name] = c
    if args.list:
        defaults = default_contender_names(dev)
        for name, c in available.items():
            print(f"{name:<26} {c.family:<12} {'default' if name in defaults else 'opt-in'}")
        return 0

    if args.contenders:
        names: List[str] = []
        for n in args.contenders.split(","):
            n = n.strip()
            if n == "default":
                names += default_contender_names(dev)
            elif n == "all":
                names += list(available)
            elif n in available:
                names.append(n)
            else:
                raise SystemExit(f"unknown contender {n!r}; known here: {list(available)}")
        names = list(dict.fromkeys(names))
    else:
        names = default_contender_names(dev)
    contenders = [available[n] for n in names]

    dtype = DTYPES[args.dtype or opts["dtype"]]
    shapes = [parse_shape(s) for s in (args.shapes.split(",") if args.shapes else opts["shapes"])]
    lengths = _ints(args.lengths) if args.lengths else list(opts["lengths"])
    if args.max_length:
        lengths = [2 ** i for i in range(lengths[0].bit_length() - 1, args.max_length.bit_length())
                   if 2 ** i <= args.max_length]
    modes = args.batch_mode.split(",") if args.batch_mode else list(opts["batch_modes"])
    threads = opts["threads"] if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    dname = device_name(dev)
    cfg = SweepConfig(
        device=dev, dtype=dtype, shapes=shapes, lengths=lengths, batch_modes=modes,
        batch=args.batch or opts["batch"], tokens=args.tokens or opts["tokens"],
        repeats=args.repeats or opts["repeats"], warmup=args.warmup or opts["warmup"],
        time_cap=args.time_cap or opts["time_cap"], measure_budget=args.measure_budget or opts["measure_budget"],
        compile_cap=args.compile_cap, memory=not args.no_memory, tf32=args.tf32, device_name=dname)

    out_dir = runinfo.output_dir(args, smoke=args.quick)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{device_slug(dev)}-{dtype_name(dtype)}")

    load_before = runinfo.check_load(torch.get_num_threads() if dev.type == "cpu" else 1)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"device {dname} ({dev}), {dtype_name(dtype)}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    print(f"contenders: {', '.join(names)}", file=sys.stderr)
    print(f"shapes: {', '.join(s.name for s in shapes)}; N: {lengths}; batch: {modes} "
          f"(fixed B={cfg.batch}, tokens B*N={cfg.tokens}); time cap {cfg.time_cap:g} s", file=sys.stderr)
    t0 = time.perf_counter()
    rows = run_sweep(cfg, contenders)
    wall = time.perf_counter() - t0
    cross = report.crossovers(rows)
    peak_now = None if dev.type == "cuda" else measured_cpu_peak_tflops(dtype, torch.get_num_threads())
    reference_peak = _committed_peak(os.path.basename(stem), torch.get_num_threads())

    meta = {
        "date_utc": started.isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "command": " ".join(["python -m benchmarks"] + list(argv if argv is not None else sys.argv[1:])),
        "device": str(dev),
        "device_name": dname,
        "cpu_model": device_name(torch.device("cpu")),
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype_name(dtype),
        "tf32": cfg.tf32,
        "peak_tflops": (peak_tflops(dname, dtype, cfg.tf32) if dev.type == "cuda"
                        else measured_cpu_peak_tflops(dtype, torch.get_num_threads())),
        "peak_tflops_source": ("vendor data sheet (config.PEAK_TFLOPS)" if dev.type == "cuda"
                               else "measured: best torch.mm 1024^3 at the sweep's thread count, before the sweep"),
        "peak_tflops_after": peak_now,
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "versions": library_versions(),
        "contenders": names,
        "shapes": [vars(s) for s in shapes],
        "lengths": lengths,
        "batch_modes": modes,
        "batch": cfg.batch,
        "tokens": cfg.tokens,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "time_cap_s": cfg.time_cap,
        "measure_budget_s": cfg.measure_budget,
        "compile_cap_s": cfg.compile_cap,
        "memory_method": MEMORY_METHOD[kind] if cfg.memory else "not measured",
        "wall_s": round(wall, 1),
    }
    report.write_csv(stem + ".csv", rows)
    report.write_csv(stem + "-crossover.csv", cross)
    report.write_json(stem + ".json", meta, rows, cross)
    written = [stem + ".csv", stem + ".json", stem + "-crossover.csv"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        args.no_plots = True
    if not args.no_plots:
        title = (f"{dname}, {dtype_name(dtype)}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} torch thread(s), git {meta['git_sha'][:10]}, {meta['date_utc'][:10]}")
        report.plot(rows, stem + "-time.png", stem + "-memory.png", title)
        written += [stem + "-time.png", stem + "-memory.png"]

    print(report.tables(rows))
    print("\ncrossover: length from which HyperMixing stays faster (median times)")
    for c in cross:
        print("  " + report.format_crossover(c))
    print(f"\nwall time {wall:.0f} s; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} cores); wrote:\n  " + "\n  ".join(written))
    if reference_peak and meta["peak_tflops"] and meta["peak_tflops"] < 0.6 * reference_peak:
        print(f"WARNING: the measured matrix-multiply rate ({meta['peak_tflops']:.3f} TFLOP/s) is "
              f"{meta['peak_tflops'] / reference_peak:.0%} of the committed run's on this CPU model "
              f"({reference_peak:.3f}): the machine is busy or throttled, and these timings are slow",
              file=sys.stderr)
    if peak_now and meta["peak_tflops"] and not 0.75 <= peak_now / meta["peak_tflops"] <= 1.33:
        print(f"WARNING: the matrix-multiply rate changed during the run ({meta['peak_tflops']:.3f} TFLOP/s before, "
              f"{peak_now:.3f} after): the machine's load changed, and the timings are not comparable with each "
              "other", file=sys.stderr)
    return 0
