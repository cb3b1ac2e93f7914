"""Streaming on the `cpu` backend side by side with a non-causal pass over the same number of tokens.

    python -m benchmarks.stream_side_by_side                         # C 40, L 4, 100k tokens; about a minute
    python -m benchmarks.stream_side_by_side --tokens 20000 --chunk 40 --left 4

A `FusedHyperMixing(backend="cpu", chunk_size=C, left_context_chunks=L)` layer streams a sequence in
pieces of one chunk (`layer.stream()`, the carried state of hmx_kernels.streaming), under
`torch.no_grad()` (inference); after every piece the same layer's non-causal twin (same weights,
no mode) runs one pass over a piece of the same length, so both see the same load. Per piece the
thread's CPU time (`time.thread_time`) of each; reported: the medians over windows of the stream
(its first, middle and last 10 % of pieces) and their ratio, so that a cost growing with the
position would show. Shape sb256 (d 256, k 1024, H 8), B 1, fp32, one torch thread.

Output: benchmarks/results/causal/<device-slug>-float32-stream-C<C>-L<L>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List, Optional

import torch

import hmx_kernels

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT = 2.0


def measure(d: int, k: int, H: int, C: int, L: int, tokens: int) -> dict:
    torch.manual_seed(0)
    layer = hmx_kernels.FusedHyperMixing(d, k, tied=False, num_heads=H, backend="cpu", chunk_size=C,
                                         left_context_chunks=L)
    plain = hmx_kernels.FusedHyperMixing(d, k, tied=False, num_heads=H, backend="cpu")
    plain.load_state_dict(layer.state_dict())
    pieces = tokens // C
    x = torch.randn(1, C, d)
    stream_ms: List[float] = []
    plain_ms: List[float] = []
    with torch.no_grad():
        stream = layer.stream()
        for _ in range(3):  # warm-up (builds / loads the extension), not counted: a fresh stream below
            stream(x)
            plain(x, x, x)
        stream = layer.stream()
        for _ in range(pieces):
            t0 = time.thread_time()
            stream(x)
            t1 = time.thread_time()
            plain(x, x, x)
            t2 = time.thread_time()
            stream_ms.append((t1 - t0) * 1e3)
            plain_ms.append((t2 - t1) * 1e3)
    w = max(1, pieces // 10)
    windows = {"first": slice(0, w), "middle": slice(pieces // 2 - w // 2, pieces // 2 - w // 2 + w),
               "last": slice(pieces - w, pieces)}
    out = {}
    for name, s in windows.items():
        a, b = statistics.median(stream_ms[s]), statistics.median(plain_ms[s])
        out[name] = {"first_token": s.start * C, "end_token": s.stop * C, "stream_ms_p50": a, "plain_ms_p50": b,
                     "ratio": a / b}
    return {"pieces": pieces, "windows": out}


def markdown(meta: dict, rows: List[dict]) -> str:
    r = rows[0]
    lines = [
        f"# Streaming (C {meta['C']}, L {meta['L']}) on the `cpu` backend vs a non-causal pass over {meta['C']} tokens",
        "",
        f"{meta['cpu_model']}, {meta['cpu_count']} CPUs, {meta['torch_threads']} torch thread, float32, shape d "
        f"{meta['d']}, k {meta['k']}, H {meta['H']}, B 1, forward under torch.no_grad(); git {meta['git_sha'][:10]}, "
        f"torch {meta['versions'].get('torch')}, {meta['date_utc']}; load average (1 min) {meta['load'][0]:.1f} before, "
        f"{meta['load'][1]:.1f} after. Command: `{meta['command']}`",
        f"{r['pieces']} pieces of one chunk, each followed by one non-causal pass over {meta['C']} tokens; median "
        "thread CPU time per piece over each window.",
        "",
        "| tokens | stream ms | non-causal ms | stream / non-causal |",
        "|---|---|---|---|",
    ]
    for w in r["windows"].values():
        lines.append(f"| {w['first_token']}-{w['end_token']} | {w['stream_ms_p50']:.3f} | {w['plain_ms_p50']:.3f} | "
                     f"{w['ratio']:.2f} |")
    worst = max(w["ratio"] for w in r["windows"].values())
    lines += ["", f"Target: <= {LIMIT}x in every window: {'met' if worst <= LIMIT else 'not met'} (worst {worst:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from .config import device_slug
    from .runinfo import machine_meta, write_results

    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_side_by_side", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100000)
    p.add_argument("--chunk", type=int, default=40)
    p.add_argument("--left", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "causal"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    before = os.getloadavg()[0]
    row = measure(args.d, args.k, args.heads, args.chunk, args.left, args.tokens)
    meta = machine_meta(1)
    meta.update(d=args.d, k=args.k, H=args.heads, C=args.chunk, L=args.left, load=[before, os.getloadavg()[0]],
                command="python -m benchmarks.stream_side_by_side " + " ".join(argv if argv is not None else sys.argv[1:]))
    for name, w in row["windows"].items():
        print(f"{name} ({w['first_token']}-{w['end_token']}): stream {w['stream_ms_p50']:.3f} ms, non-causal "
              f"{w['plain_ms_p50']:.3f} ms, {w['ratio']:.2f}x", file=sys.stderr)
    write_results(args.out, f"{device_slug(torch.device('cpu'))}-float32-stream-C{args.chunk}-L{args.left}", meta,
                  [row], markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
