"""Sequence-parallel strong scaling of one HyperMixing layer over torch.distributed (gloo, CPU).

    python -m benchmarks.sequence_parallel                      # N = 65536, 1, 2 and 4 processes
    python -m benchmarks.sequence_parallel --length 8192 --worlds 1,2 --repeats 3   # quicker

One sequence of N tokens (B = 1, d = 256, k = 1024, H = 8, fp32 by default) is split into W
contiguous slices, one per process (W in --worlds, one torch thread per process); each process runs
forward+backward of `FusedHyperMixing(..., sequence_parallel_group=WORLD)` on its slice (its
position offset passed; each call still runs its one small agreement all-gather, 12 int64 values:
hmx_kernels.parallel.agree_on_slices). W = 1 also runs with a group (of one
process), so every W runs the same backend: `--backend auto` resolves to the first backend that
takes a sequence-parallel group, recorded in the results. A separate row, `W = 1, no group`, is
the plain single-process layer with the same `--backend` (on CPU `auto` picks the fused `cpu`
backend there): the fastest way to run the whole sequence on one process.

Per W it reports: the step time (median over repetitions of the slowest rank's forward+backward;
the ranks start each repetition together, after a barrier), the speed-up over W = 1, the bytes
handed to torch.distributed collectives per step and rank, their count, and the communication
share of the step: time inside the collectives / step time (gloo collectives block, so this
includes waiting for slower ranks). Collectives are counted by `CollectiveCounter`, which sees
every c10d / functional-collective op that reaches PyTorch's dispatcher, whoever issues it (also
used by tests/test_sp_comm.py). The issue's target is W = 2 at most 0.6x the time of W = 1.

With more processes than cores the processes share cores and the scaling says nothing about the
method: the output says so (`oversubscribed`).

Results: benchmarks/results/sequence-parallel-<device-slug>.{json,md} (benchmarks/results/local/ unless --update-results; --out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# the argument names under which a collective op takes the tensors it sends (c10d::* ops and
# _c10d_functional::* ops share these names); outputs are not counted
_INPUT_ARGS = ("tensors", "input_tensors", "input_tensor", "inputs", "input")
_NO_DATA = ("barrier", "wait_tensor", "monitored_barrier")


def _flat_tensors(v) -> List[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat_tensors(x)]
    return []


class CollectiveCounter:
    """Counts the collectives issued inside the `with` block: every op of the `c10d` and
    `_c10d_functional` namespaces that reaches the dispatcher (what `torch.distributed.all_reduce`,
    `all_gather`, `torch.distributed.nn.functional.*` and the functional collectives all end in,
    whether called from Python or C++). Per op: its name, the dtype and element count of the tensors
    it is handed to send (this rank's contribution: an all-reduce's tensor, an all-gather's input),
    and the wall time of the call (plus that of `wait_tensor` for the asynchronous functional ones).

    A collective issued inside another op's implementation (the cpu backend's fused ops all-reduce
    from within hmx_kernels::cpp_fwd / cpp_bwd) does not reach a dispatcher mode, which is off
    while it handles the outer op; `torch.distributed.all_reduce` is therefore also wrapped, and
    counted only while the mode is inside some other op.

    bytes: sum over ops of the bytes handed in. A ring all-reduce of S bytes moves
    2 (W - 1) / W x S bytes out of each rank; that is gloo's business and not counted here."""

    def __init__(self):
        self.ops: List[Dict[str, object]] = []
        self.seconds = 0.0
        self._mode = None
        self._inside: List[str] = []  # the non-collective ops the mode is handling
        self._all_reduce = None

    @property
    def bytes(self) -> int:
        return sum(int(op["bytes"]) for op in self.ops)

    def reset(self) -> None:
        self.ops.clear()
        self.seconds = 0.0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                ns = getattr(func, "namespace", "")
                if ns not in ("c10d", "_c10d_functional"):
                    counter._inside.append(func.name())
                    try:
                        return func(*args, **kwargs)
                    finally:
                        counter._inside.pop()
                t0 = time.perf_counter()
                out = func(*args, **kwargs)
                counter.seconds += time.perf_counter() - t0
                name = func.name()
                if name.split("::")[-1] in _NO_DATA:
                    return out
                sent = []
                for a, v in zip(func._schema.arguments, list(args) + [kwargs.get(x.name) for x in
                                                                      func._schema.arguments[len(args):]]):
                    if a.name in _INPUT_ARGS:
                        sent += _flat_tensors(v)
                counter.ops.append({
                    "op": name,
                    "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in sent}),
                    "numel": sum(t.numel() for t in sent),
                    "bytes": sum(t.numel() * t.element_size() for t in sent),
                })
                return out

        import torch.distributed as dist

        original = self._all_reduce = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            if not counter._inside:  # the mode sees it
                return original(tensor, *args, **kwargs)
            t0 = time.perf_counter()
            out = original(tensor, *args, **kwargs)
            counter.seconds += time.perf_counter() - t0
            counter.ops.append({
                "op": f"c10d::allreduce_ (inside {counter._inside[-1]})",
                "dtypes": [str(tensor.dtype).replace("torch.", "")],
                "numel": tensor.numel(),
                "bytes": tensor.numel() * tensor.element_size(),
            })
            return out

        dist.all_reduce = all_reduce
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        self._mode.__exit__(*exc)
        dist.all_reduce = self._all_reduce
        return False


def state_values_per_all_reduce(B: int, d: int, k: int, H: int, backend: str = "reference") -> int:
    """Values in one of the two all-reduces of a sequence-parallel layer step. reference: the state
    P [B, H, k_h, d_h] (forward) and its gradient (backward); cpu (the reassociated form): the key
    sums S [d_h, d_h] and sv [d_h] per (b, h) (forward) and the query sums T, sdy (backward),
    B x H x (d_h^2 + d_h), a k_h / (d_h + 1) fraction of the reference's (about 4x fewer at k = 4 d)."""
    d_h, k_h = d // H, k // H
    return B * H * (d_h * d_h + d_h) if backend == "cpu" else B * H * k_h * d_h


def state_bytes_per_layer_step(B: int, d: int, k: int, H: int, element_size: int = 4,
                               backend: str = "reference") -> int:
    """The documented volume per layer and step: two all-reduces (forward, backward) of
    `state_values_per_all_reduce` values in the compute dtype (fp32 for fp32/fp16/bf16, fp64 for
    fp64), and the call's one agreement all-gather (hmx_kernels.parallel: slice lengths and call
    signature, AGREEMENT_BYTES_PER_RANK int64 bytes)."""
    from hmx_kernels.parallel import AGREEMENT_BYTES_PER_RANK

    return 2 * state_values_per_all_reduce(B, d, k, H, backend) * element_size + AGREEMENT_BYTES_PER_RANK


# ---- one process ---------------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, cfg: dict, out_dir: str) -> None:
    import torch.distributed as dist

    import hmx_kernels
    from benchmarks.runinfo import record_run, resolved_backend

    torch.set_num_threads(cfg["threads"])
    grouped = cfg["grouped"]
    if grouped:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        B, N, d, k, H = cfg["batch"], cfg["length"], cfg["d"], cfg["k"], cfg["heads"]
        dtype = getattr(torch, cfg["dtype"])
        bounds = torch.linspace(0, N, world + 1).round().long().tolist()
        lo, hi = bounds[rank], bounds[rank + 1]
        group = dist.group.WORLD if grouped else None
        torch.manual_seed(0)
        layer = hmx_kernels.FusedHyperMixing(d, k, num_heads=H, sequence_parallel_group=group,
                                             backend=cfg["backend"]).to(dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, hi - lo, d, generator=g).to(dtype).requires_grad_(True)
        grad = torch.randn(B, hi - lo, d, generator=g).to(dtype)
        leaves = [x, *layer.parameters()]

        def step():
            for t in leaves:
                t.grad = None
            layer(x, position_offset=lo)[0].backward(grad)

        ran = resolved_backend(cfg["backend"], x, None, None, *layer.hyper.w1_gen.tensors(),
                               *layer.hyper.w2_gen.tensors(), layer.layer_norm.weight, layer.layer_norm.bias,
                               position_offset=lo, sequence_parallel_group=group)
        recorded = record_run(step)  # also the warm-up
        for _ in range(cfg["warmup"]):
            step()
        times, comm_s, comm_bytes, comm_ops = [], [], [], []
        from benchmarks.sequence_parallel import CollectiveCounter

        for _ in range(cfg["repeats"]):
            if grouped:
                dist.barrier()
            with CollectiveCounter() as cc:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            comm_s.append(cc.seconds)
            comm_bytes.append(cc.bytes)
            comm_ops = cc.ops
        result = {"rank": rank, "lo": lo, "hi": hi, "times_s": times, "comm_s": comm_s, "comm_bytes": comm_bytes,
                  "comm_ops": comm_ops, "resolved": ran, "ran": recorded}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if grouped:
            dist.destroy_process_group()
    # results are written: skip the interpreter's shutdown, where gloo processes intermittently
    # abort ("terminate called without an active exception"), which mp.spawn would report as a failure
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(world: int, cfg: dict) -> Dict[str, object]:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), cfg, tmp), nprocs=world, join=True)
        wall = time.perf_counter() - t0
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    reps = len(ranks[0]["times_s"])
    step = [max(r["times_s"][i] for r in ranks) for i in range(reps)]  # the slowest rank per repetition
    share = [max(r["comm_s"][i] for r in ranks) / step[i] for i in range(reps)]
    return {
        "world": world,
        "grouped": cfg["grouped"],
        "step_ms_p50": 1e3 * statistics.median(step),
        "step_ms_min": 1e3 * min(step),
        "step_ms_all": [1e3 * s for s in step],
        "comm_share_p50": statistics.median(share),
        "comm_ms_p50_slowest_rank": 1e3 * statistics.median(max(r["comm_s"][i] for r in ranks) for i in range(reps)),
        "bytes_per_step_per_rank": ranks[0]["comm_bytes"][-1],
        "collectives_per_step": [op["op"] for op in ranks[0]["comm_ops"]],
        "slices": [[r["lo"], r["hi"]] for r in ranks],
        "resolved_backend": ranks[0]["resolved"]["backend"],
        "ran": ranks[0]["ran"],
        "spawn_wall_s": round(wall, 1),
    }


def main(argv: Optional[List[str]] = None) -> int:
    from .config import device_slug
    from .runinfo import machine_meta, write_results

    p = argparse.ArgumentParser(prog="python -m benchmarks.sequence_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=65536, help="N, tokens of the one sequence (default 65536)")
    p.add_argument("--worlds", default="1,2,4", help="process counts (default 1,2,4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip the single-process run without a group")
    from .runinfo import add_output_options, output_dir

    add_output_options(p)
    args = p.parse_args(argv)
    args.out = output_dir(args)

    worlds = [int(w) for w in args.worlds.split(",") if w]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg = dict(length=args.length, batch=args.batch, d=args.d, k=args.k, heads=args.heads, dtype=args.dtype,
               backend=args.backend, threads=args.threads, repeats=args.repeats, warmup=args.warmup)
    rows = []
    runs = ([] if args.no_baseline else [(1, False)]) + [(w, True) for w in worlds]
    for world, grouped in runs:
        print(f"W = {world}{'' if grouped else ' (no group)'}: N = {args.length} ...", file=sys.stderr, flush=True)
        r = run_world(world, dict(cfg, grouped=grouped))
        r["oversubscribed"] = world * args.threads > cores
        rows.append(r)
        print(f"  {r['step_ms_p50']:.1f} ms, {r['bytes_per_step_per_rank']} B/step, comm share "
              f"{r['comm_share_p50']:.3f}, backend {r['resolved_backend']}", file=sys.stderr, flush=True)
    base = {r["world"]: r for r in rows if r["grouped"]}
    t1 = base.get(1, {}).get("step_ms_p50")
    for r in rows:
        r["time_vs_w1"] = (r["step_ms_p50"] / t1) if (t1 and r["grouped"]) else None
    resolved = next((r["resolved_backend"] for r in rows if r["grouped"]), "reference")
    expected = state_bytes_per_layer_step(args.batch, args.d, args.k, args.heads,
                                          8 if args.dtype == "float64" else 4, backend=resolved)
    meta = machine_meta(args.threads)
    meta.update(command=("python -m benchmarks.sequence_parallel " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
                cores_available=cores, settings=cfg, documented_bytes_per_step=expected, documented_backend=resolved,
                target="W = 2 at most 0.6x the step time of W = 1")
    write_results(args.out, f"sequence-parallel-{device_slug(torch.device('cpu'))}", meta, rows, markdown)
    return 0


def markdown(meta: dict, rows: List[dict]) -> str:
    s = meta["settings"]
    lines = [
        f"# Sequence-parallel strong scaling, one HyperMixing layer, forward+backward",
        "",
        f"{meta['cpu_model']}, {meta['cores_available']} cores available, {s['threads']} torch thread(s) per process, "
        f"gloo; B = {s['batch']}, N = {s['length']}, d = {s['d']}, k = {s['k']}, H = {s['heads']}, {s['dtype']}, "
        f"backend={s['backend']!r}; median of {s['repeats']} repetitions (step = the slowest rank); "
        f"git {meta['git_sha'][:10]}, torch {meta['versions']['torch']}, {meta['date_utc']}.",
        f"Command: `{meta['command']}`",
        "",
        "| processes | group | backend that ran | step ms (median) | min | vs W=1 (median) | bytes / step / rank | collectives / step | comm share | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = "oversubscribed: more processes than cores" if r["oversubscribed"] else ""
        ratio = f"{r['time_vs_w1']:.2f}x" if r["time_vs_w1"] is not None else "-"
        ops = ", ".join(op.split(" (inside")[0].split("::")[-1] for op in r["collectives_per_step"]) or "none"
        backend = ", ".join(r["ran"]["backends"]) or f"{r['resolved_backend']} (resolved)"
        lines.append(f"| {r['world']} | {'yes' if r['grouped'] else 'no'} | {backend} | "
                     f"{r['step_ms_p50']:.1f} | {r['step_ms_min']:.1f} | {ratio} | {r['bytes_per_step_per_rank']} | {ops} | "
                     f"{r['comm_share_p50']:.3f} | {note} |")
    formula = ("2 x B x H x (d_h^2 + d_h) x 4 bytes (the key sums S, sv all-reduced in the forward, the query "
               "sums T, sdy in the backward)" if meta.get("documented_backend") == "cpu" else
               "2 x B x H x k_h x d_h x 4 bytes (the state P all-reduced in the forward, its gradient in the backward)")
    lines += ["", f"Documented volume per layer and step for the backend that ran: {formula} = "
                  f"{meta['documented_bytes_per_step']} bytes. Target: {meta['target']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
