"""The causal modes of the `cpu` backend side by side with its non-causal pass, in one process.

    python -m benchmarks.causal_side_by_side                       # N 2048, 4096, 16384; a few minutes
    python -m benchmarks.causal_side_by_side --lengths 4096 --repeats 9

The sweep (`python -m benchmarks.causal`) times each contender on its own, one after another; on a
machine other work shares, the load changes between them and so do the ratios. Here every length
builds its contenders first, then times them in turns (one forward+backward of each per round,
`--repeats` rounds), so all see the same load, and reports per contender the median of

- the thread's CPU time (`time.thread_time`: what the pass cost this thread, which the load of other
  processes changes least; the ratios below use it), and
- the wall time (`time.perf_counter`), for reference.

Contenders: `FusedHyperMixing(backend="cpu")` non-causal (`full`), chunk-causal C = 32 with every
earlier chunk (`chunk32`), token-causal (`causal`), and `scaled_dot_product_attention(is_causal=True)`
(`sdpa-causal`; one [B, H, N, d_h] tensor as query, key and value; up to `--sdpa-max-n`). Shape sb256 (d 256, k 1024,
H 8: d_h 32, k_h 128), B 1, fp32, one torch thread, forward+backward. The load average before and
after each length is recorded.

Targets checked (the summary says met / not met):
- chunk32 / full <= 2.5 at every N >= 4096 measured, and not growing with N;
- causal / full <= 10 at N 4096;
- causal faster than sdpa-causal from N 2048 (every N >= 2048 measured).

The token-causal floor: the scan evaluates GELU on all k_h d_h entries of its state per token and
head in the forward, GELU and GELU' in the backward (csrc/hmx_cpu_scan.h); benchmarks/cpu_gelu_rate.cpp
times the twin's own GELU loops alone (benchmarks/README.md, "Causal modes side by side").

Output: benchmarks/results/causal/<device-slug>-float32-side-by-side.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import hmx_kernels

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = {"full": {}, "chunk32": dict(chunk_size=32), "causal": dict(causal=True)}
CHUNK_LIMIT, CAUSAL_LIMIT, CAUSAL_N, SDPA_FROM = 2.5, 10.0, 4096, 2048


def _step(name: str, d: int, k: int, H: int, N: int):
    """One forward+backward of contender `name` at length N, as a closure."""
    torch.manual_seed(0)
    if name == "sdpa-causal":
        q = torch.randn(1, H, N, d // H, requires_grad=True)
        g = torch.randn(1, H, N, d // H)
        return lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).backward(g)
    layer = hmx_kernels.FusedHyperMixing(d, k, tied=False, num_heads=H, backend="cpu", **MODES[name])
    x = torch.randn(1, N, d, requires_grad=True)
    g = torch.randn(1, N, d)
    return lambda: layer(x, x, x)[0].backward(g)


def measure(names: List[str], d: int, k: int, H: int, N: int, repeats: int) -> Dict[str, dict]:
    steps = {n: _step(n, d, k, H, N) for n in names}
    for f in steps.values():  # warm-up
        f()
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    for _ in range(repeats):
        for n, f in steps.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            f()
            wall[n].append(time.perf_counter() - w0)
            cpu[n].append(time.thread_time() - c0)
    return {n: {"cpu_ms_p50": statistics.median(cpu[n]) * 1e3, "wall_ms_p50": statistics.median(wall[n]) * 1e3,
                "cpu_ms": [round(x * 1e3, 3) for x in cpu[n]]} for n in names}


def summarize(rows: List[dict]) -> Dict[str, dict]:
    by_n = {r["N"]: r for r in rows}
    chunk = {n: r["ratios"].get("chunk32") for n, r in by_n.items() if n >= 4096 and r["ratios"].get("chunk32")}
    ordered = [chunk[n] for n in sorted(chunk)]
    out = {"chunk32": {"limit": CHUNK_LIMIT, "ratios": chunk,
                       "met": bool(chunk) and all(v <= CHUNK_LIMIT for v in ordered)
                       and all(b <= a * 1.05 for a, b in zip(ordered, ordered[1:]))}}
    c = by_n.get(CAUSAL_N, {}).get("ratios", {}).get("causal")
    out["causal"] = {"limit": CAUSAL_LIMIT, "N": CAUSAL_N, "ratio": c, "met": None if c is None else c <= CAUSAL_LIMIT}
    vs = {n: r["ratios"].get("causal/sdpa-causal") for n, r in by_n.items() if n >= SDPA_FROM}
    vs = {n: v for n, v in vs.items() if v is not None}
    out["causal_vs_sdpa"] = {"from_N": SDPA_FROM, "ratios": vs, "met": bool(vs) and all(v < 1.0 for v in vs.values())}
    return out


def markdown(meta: dict, rows: List[dict]) -> str:
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    s = meta["summary"]
    lines = [
        "# Causal modes of the `cpu` backend side by side with its non-causal pass (forward+backward)",
        "",
        f"{meta['cpu_model']}, {meta['cpu_count']} CPUs, {meta['torch_threads']} torch thread, float32, shape d "
        f"{meta['d']}, k {meta['k']}, H {meta['H']}, B 1; git {meta['git_sha'][:10]}, torch "
        f"{meta['versions'].get('torch')}, {meta['date_utc']}. Command: `{meta['command']}`",
        f"Contenders timed in turns, {meta['repeats']} rounds; median thread CPU time (ratios use it) and median "
        "wall time; load average (1 min) before / after each length.",
        "",
        "| N | load | full ms | chunk32 ms | causal ms | sdpa-causal ms | chunk32 / full | causal / full | "
        "causal / sdpa-causal | wall: full, chunk32, causal, sdpa-causal ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["times"]
        c = lambda n: t[n]["cpu_ms_p50"] if n in t else None  # noqa: E731
        w = ", ".join(f(t[n]["wall_ms_p50"]) if n in t else "-" for n in ("full", "chunk32", "causal", "sdpa-causal"))
        lines.append(f"| {r['N']} | {r['load'][0]:.1f} / {r['load'][1]:.1f} | {f(c('full'))} | {f(c('chunk32'))} | "
                     f"{f(c('causal'))} | {f(c('sdpa-causal'))} | {f(r['ratios'].get('chunk32'), 2)} | "
                     f"{f(r['ratios'].get('causal'), 2)} | {f(r['ratios'].get('causal/sdpa-causal'), 2)} | {w} |")
    verdict = lambda m: "not measured" if m is None else ("met" if m else "not met")  # noqa: E731
    lines += ["", "Targets:", "",
              f"- chunk32 / full <= {CHUNK_LIMIT} at N >= 4096, not growing with N: "
              + ", ".join(f"{f(v, 2)} at {n}" for n, v in sorted(s["chunk32"]["ratios"].items()))
              + f": {verdict(s['chunk32']['met'])}",
              f"- causal / full <= {CAUSAL_LIMIT} at N {CAUSAL_N}: {f(s['causal']['ratio'], 2)}: "
              f"{verdict(s['causal']['met'])}",
              f"- causal faster than sdpa-causal from N {SDPA_FROM}: "
              + ", ".join(f"{f(v, 2)}x its time at {n}" for n, v in sorted(s["causal_vs_sdpa"]["ratios"].items()))
              + f": {verdict(s['causal_vs_sdpa']['met'])}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from .config import device_slug
    from .runinfo import machine_meta, write_results

    p = argparse.ArgumentParser(prog="python -m benchmarks.causal_side_by_side", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,4096,16384")
    p.add_argument("--contenders", default="full,chunk32,causal,sdpa-causal")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sdpa-max-n", type=int, default=8192,
                   help="longest N for sdpa-causal (quadratic: about 8 s per pass at 16384 here)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "causal"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = args.contenders.split(",")
    rows = []
    for N in (int(x) for x in args.lengths.split(",")):
        before = os.getloadavg()[0]
        here = [n for n in names if n != "sdpa-causal" or N <= args.sdpa_max_n]
        times = measure(here, args.d, args.k, args.heads, N, args.repeats)
        ratio = lambda a, b: (times[a]["cpu_ms_p50"] / times[b]["cpu_ms_p50"]  # noqa: E731
                              if a in times and b in times else None)
        rows.append({"N": N, "load": [before, os.getloadavg()[0]], "times": times,
                     "ratios": {"chunk32": ratio("chunk32", "full"), "causal": ratio("causal", "full"),
                                "causal/sdpa-causal": ratio("causal", "sdpa-causal")}})
        print(f"N {N}: " + ", ".join(f"{n} {t['cpu_ms_p50']:.1f} ms" for n, t in times.items()), file=sys.stderr)
    meta = machine_meta(1)
    meta.update(d=args.d, k=args.k, H=args.heads, repeats=args.repeats, summary=summarize(rows),
                command="python -m benchmarks.causal_side_by_side " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_results(args.out, f"{device_slug(torch.device('cpu'))}-float32-side-by-side", meta, rows, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
