"""Causal and chunk-causal HyperMixing against attention with `is_causal=True`, on the main sweep.

    python -m benchmarks.causal                          # sb256, N = 128..8192, CPU, a few minutes
    python -m benchmarks.causal --lengths 1024,4096      # fewer points
    python -m benchmarks.causal --token-causal-cap 8192  # let the reference's token-causal mode run larger N

Runs `python -m benchmarks` (same measurement, output check, time caps, crossover; see
benchmarks/README.md) with these contenders added to the non-causal ones:

| name | what |
|---|---|
| `hmx-causal` | `FusedHyperMixing(..., causal=True, backend=B)`: token-causal |
| `hmx-chunk32` | `chunk_size=32`: chunk-causal, every earlier chunk |
| `hmx-chunk32-left2` | `chunk_size=32, left_context_chunks=2` |
| `sdpa-causal` | `scaled_dot_product_attention(q, k, v, is_causal=True)` |

and the non-causal baselines `hmx-cpu` (the fused `cpu` backend: the issue's yardstick),
`hmx-reference` and `sdpa`. B = `--mode-backend` (default `auto`: the dispatcher's pick, so a
backend that learns the causal modes is benchmarked without editing this file); the backend that
resolved for each mode is written in the summary. Defaults: shape sb256 (d = 256, k = 1024,
H = 8), B = 1, fp32, one torch thread, forward+backward.

Token-causal on the `reference` backend keeps a [k_h, d_h] state per token (B x H x N x k_h x d_h
floats, 128 KiB per token at sb256, several copies for the backward): it is not run above
`--token-causal-cap` tokens (default 4096) while the reference serves it; the cap is reported.

Output in benchmarks/results/local/causal/ (untracked; --update-results: the committed
benchmarks/results/causal/): <device-slug>-float32{.csv,.json,-crossover.csv,-time.png, -memory.png} from the sweep, and <device-slug>-float32-summary.md: ratios of each causal mode to
the non-causal `cpu` backend and to the non-causal layer on the same backend, the issue's targets
at N = 4096 (chunk C = 32 at most 1.3x, token-causal at most 3x the non-causal `cpu` time), and the
crossover against SDPA with is_causal=True.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import hmx_kernels

from .config import Shape
from .contenders import Case, Contender, _attn_flops, _hm_check, _hm_flops, _rel_err, _rows, _tokens

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = {  # contender name -> FusedHyperMixing mode arguments
    "hmx-causal": dict(causal=True),
    "hmx-chunk32": dict(chunk_size=32),
    "hmx-chunk32-left2": dict(chunk_size=32, left_context_chunks=2),
}
TARGETS = {"hmx-chunk32": 1.3, "hmx-causal": 3.0}  # at most x the non-causal cpu time at N = 4096
TARGET_N = 4096
_LAYERS: Dict[tuple, torch.nn.Module] = {}


def _layer(name: str, backend: str, shape: Shape, dtype, device):
    key = (name, backend, shape, dtype, str(device))
    if key not in _LAYERS:
        torch.manual_seed(0)
        layer = hmx_kernels.FusedHyperMixing(shape.d, shape.k, tied=False, num_heads=shape.H, backend=backend,
                                             **MODES[name])
        _LAYERS[key] = layer.to(device=device, dtype=dtype)
    return _LAYERS[key]


def resolved(name: str, backend: str, shape: Shape, B: int, N: int, dtype, device) -> Dict[str, object]:
    from .runinfo import resolved_backend

    layer = _layer(name, backend, shape, dtype, device)
    x = torch.empty(B, N, shape.d, dtype=dtype, device=device)
    return resolved_backend(backend, x, None, None, *layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(),
                            layer.layer_norm.weight, layer.layer_norm.bias, **MODES[name])


def mode_contender(name: str, backend: str, token_causal_cap: int) -> Contender:
    def build(shape, B, N, dtype, device):
        layer = _layer(name, backend, shape, dtype, device)
        x = _tokens(B, N, shape.d, dtype, device)
        return Case(lambda: layer(x, x, x)[0], [x] + list(layer.parameters()), _hm_check(layer, x))

    def unsupported(shape, B, N, dtype, device):
        r = resolved(name, backend, shape, B, N, dtype, device)
        if r["backend"] is None:
            return r.get("error", "no backend")
        if MODES[name].get("causal") and r["backend"] == "reference" and N > token_causal_cap:
            return (f"not run: token-causal on the reference backend above --token-causal-cap {token_causal_cap} "
                    f"(it keeps a [k_h, d_h] state per token)")
        return None

    return Contender(name, "hypermixing", _hm_flops, build, unsupported)


def _causal_rows_f64(q, k, v, rows):
    """Exact causal softmax attention for the given query rows; q, k, v [H, N, d_h]."""
    q, k, v = q.double(), k.double(), v.double()
    s = q[:, rows] @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [H, R, N]
    future = torch.arange(k.shape[1], device=k.device)[None, :] > rows[:, None]  # [R, N]
    return torch.softmax(s.masked_fill(future, float("-inf")), dim=-1) @ v  # [H, R, d_h]


def sdpa_causal_contender() -> Contender:
    def build(shape, B, N, dtype, device):
        q, k, v = (_tokens(B, N, shape.d, dtype, device, seed=i).detach()
                   .view(B, N, shape.H, shape.d_h).transpose(1, 2).contiguous().requires_grad_(True)
                   for i in range(3))  # [B, H, N, d_h]

        def check(out):
            rows = _rows(N).to(device)
            return _rel_err(out[0][:, rows], _causal_rows_f64(q[0], k[0], v[0], rows))

        return Case(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], check)

    # half of the score matrix: half of the non-causal attention FLOPs
    return Contender("sdpa-causal", "attention", lambda s, B, N, p: _attn_flops(s, B, N, p) // 2, build)


def summarize(data: dict, mode_backend: str, token_causal_cap: int, resolved_by_mode: dict) -> dict:
    ok = {(r["contender"], r["N"]): r for r in data["results"] if r["status"] == "ok"}
    status = {(r["contender"], r["N"]): (r["status"], r["note"]) for r in data["results"]}
    lengths = sorted({r["N"] for r in data["results"]})
    t = lambda c, n: ok[(c, n)]["fwd_bwd_ms_p50"] if (c, n) in ok else None  # noqa: E731
    table = []
    for n in lengths:
        row = {"N": n}
        for c in ("hmx-cpu", "hmx-reference", *MODES, "sdpa", "sdpa-causal"):
            row[c] = t(c, n)
            row[f"{c}_mib"] = ok[(c, n)]["mem_fwd_bwd_mib"] if (c, n) in ok else None
        for c in MODES:
            ran = resolved_by_mode[c]
            base_same = t(f"hmx-{ran}", n) if ran else None
            row[f"{c}/cpu"] = row[c] / row["hmx-cpu"] if row[c] and row["hmx-cpu"] else None
            row[f"{c}/same-backend"] = row[c] / base_same if row[c] and base_same else None
        table.append(row)
    targets = {}
    for c, limit in TARGETS.items():
        r = next((x for x in table if x["N"] == TARGET_N), None)
        ratio = r[f"{c}/cpu"] if r else None
        targets[c] = {"N": TARGET_N, "limit": limit, "ratio_vs_cpu": ratio,
                      "met": None if ratio is None else ratio <= limit,
                      "status_at_N": status.get((c, TARGET_N))}
    cross = [c for c in data.get("crossover", []) if c["baseline"] == "sdpa-causal"
             or (c["baseline"] == "sdpa" and c["hypermixing"] in ("hmx-cpu", "hmx-reference"))]
    return {"table": table, "targets": targets, "crossover": cross, "resolved_backend": resolved_by_mode,
            "mode_backend": mode_backend, "token_causal_cap": token_causal_cap}


def markdown(meta: dict, s: dict) -> str:
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "# Causal and chunk-causal HyperMixing against SDPA is_causal=True (forward+backward)",
        "",
        f"{meta['device_name']}, {meta['torch_threads']} torch thread(s), {meta['dtype']}, shape "
        f"{', '.join(sh['name'] for sh in meta['shapes'])}, B = {meta['batch']}; git {meta['git_sha'][:10]}, "
        f"torch {meta['versions']['torch']}, {meta['date_utc']}.",
        f"Command: `{meta['command']}`",
        f"Modes run with backend={s['mode_backend']!r}, which resolved to: "
        + ", ".join(f"{c}: {b}" for c, b in s["resolved_backend"].items())
        + f". Token-causal on the reference is capped at N <= {s['token_causal_cap']}.",
        "",
        "Median forward+backward ms, and each mode's time over the non-causal `cpu` backend's "
        "(and over the non-causal layer on the backend the mode ran on):",
        "",
        "| N | hmx-cpu | hmx-reference | causal | chunk32 | chunk32-left2 | sdpa | sdpa-causal | causal / cpu (same) | "
        "chunk32 / cpu (same) | chunk32-left2 / cpu (same) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["table"]:
        ratios = " | ".join(f"{f(r[f'{c}/cpu'], 2)} ({f(r[f'{c}/same-backend'], 2)})" for c in MODES)
        lines.append(f"| {r['N']} | {f(r['hmx-cpu'])} | {f(r['hmx-reference'])} | {f(r['hmx-causal'])} | "
                     f"{f(r['hmx-chunk32'])} | {f(r['hmx-chunk32-left2'])} | {f(r['sdpa'])} | "
                     f"{f(r['sdpa-causal'])} | {ratios} |")
    names = ("hmx-cpu", "hmx-reference", *MODES, "sdpa", "sdpa-causal")
    lines += ["", "Peak memory of forward+backward, MiB (benchmarks/README.md \"How memory is measured\"; the `cpu` "
              "backend's own C++ working buffers are not seen):", "",
              "| N | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in s["table"]:
        lines.append(f"| {r['N']} | " + " | ".join(f(r[f'{c}_mib']) for c in names) + " |")
    lines += ["", "Targets (issue: at N = 4096, time over the non-causal `cpu` backend):", ""]
    for c, tg in s["targets"].items():
        verdict = "not measured" if tg["met"] is None else ("met" if tg["met"] else "not met")
        st = "" if tg["met"] is not None or not tg["status_at_N"] else f" ({tg['status_at_N'][0]}: {tg['status_at_N'][1]})"
        lines.append(f"- {c}: {f(tg['ratio_vs_cpu'], 2)}x, limit {tg['limit']}x: {verdict}{st}")
    lines += ["", "Crossover (length from which HyperMixing stays faster; speed-up at the largest common N):", "",
              "| pass | HyperMixing | baseline | crossover N | speed-up |", "|---|---|---|---|---|"]
    for c in s["crossover"]:
        sp = f"{c['speedup_at_largest_N']:.2f}x at {c['largest_N']}" if c.get("speedup_at_largest_N") else "-"
        n = c["crossover_N"]
        where = c["relation"] if n is None else f"{c['relation']} {n:.0f}".replace("= ", "~ ")
        lines.append(f"| {c['pass']} | {c['hypermixing']} | {c['baseline']} | {where} | {sp} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    from . import cli
    from .config import device_slug, dtype_name

    p = argparse.ArgumentParser(prog="python -m benchmarks.causal", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="sb256")
    p.add_argument("--lengths", default=",".join(str(2 ** i) for i in range(7, 14)))
    p.add_argument("--mode-backend", default="auto", help="backend= of the causal modes (default auto)")
    p.add_argument("--token-causal-cap", type=int, default=4096,
                   help="largest N for token-causal while the reference backend serves it (default 4096)")
    from .runinfo import add_output_options, output_dir

    add_output_options(p, "causal")
    p.add_argument("--time-cap", type=float, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--summary-only", action="store_true",
                   help="do not run the sweep: rewrite the summary from the results already in --out")
    args = p.parse_args(argv)
    args.out = output_dir(args, "causal")

    extra = [mode_contender(n, args.mode_backend, args.token_causal_cap) for n in MODES] + [sdpa_causal_contender()]
    names = ["hmx-cpu", "hmx-reference", *MODES, "sdpa", "sdpa-causal"]
    sweep_argv = ["--device", "cpu", "--shapes", args.shapes, "--lengths", args.lengths,
                  "--contenders", ",".join(names), "--out", args.out]
    for opt, v in (("--time-cap", args.time_cap), ("--repeats", args.repeats), ("--threads", args.threads)):
        if v is not None:
            sweep_argv += [opt, str(v)]
    sweep_argv += ["--no-memory"] * args.no_memory + ["--no-plots"] * args.no_plots
    if not args.summary_only:
        cli.main(sweep_argv, extra_contenders=extra)

    dev = torch.device("cpu")
    stem = os.path.join(args.out, f"{device_slug(dev)}-{dtype_name(torch.float32)}")
    with open(stem + ".json") as f:
        data = json.load(f)
    shape = cli.parse_shape(args.shapes.split(",")[0])
    resolved_by_mode = {n: resolved(n, args.mode_backend, shape, 1, TARGET_N, torch.float32, dev)["backend"]
                        for n in MODES}
    summary = summarize(data, args.mode_backend, args.token_causal_cap, resolved_by_mode)
    if not args.summary_only:
        data["meta"]["command"] = ("python -m benchmarks.causal " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        data["meta"]["sweep_command"] = "python -m benchmarks " + " ".join(sweep_argv)
    data["summary"] = summary
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1, default=str)
    text = markdown(data["meta"], summary)
    with open(stem + "-summary.md", "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"wrote {stem}-summary.md (and the sweep's files beside it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
