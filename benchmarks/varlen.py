"""Packed against padded HyperMixing on a ragged batch: time, peak memory and the ideal ratio.

    python -m benchmarks.varlen                                   # B = 16, lengths 200..1600, cpu + reference
    python -m benchmarks.varlen --backends cpu --repeats 5        # quicker

One draw of B sequence lengths, uniform in [--min-length, --max-length] (fixed --seed), d = 256,
k = 1024, H = 8, fp32, one torch thread (`--threads`). The same tokens and weights (a
`FusedHyperMixing` layer's) run as
- packed: `hmx_kernels.varlen.hyper_mixing_varlen(tokens[total, d], cu_seqlens, max_seqlen, ...)`;
- padded: `hmx_kernels.hyper_mixing(x[B, longest, d], key_padding_mask=...)`;
each with `backend=` every name in --backends (the backend that actually ran is recorded: a
backend that walks cu_seqlens itself is picked up when it lands). Forward+backward (one
training step of the op, upstream gradient on the kept rows) is timed: median of --repeats after a
warm-up (benchmarks.measure.time_passes, which also times the forward alone). Peak memory: the
profiler method of the main sweep (benchmarks/README.md "How memory is measured").

The issue's target: packed time <= 1.15 x ideal, where ideal = padded time x total tokens / (B x
longest), the padded time scaled down to the tokens actually present. Reported as
`packed / ideal`. Before timing, the packed output and token gradient are checked against the
padded ones on the kept rows (scale-relative error, reported; above 1e-4 the run stops).

Results: benchmarks/results/varlen-<device-slug>.{json,md} (benchmarks/results/local/ unless --update-results; --out to change).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def ragged_lengths(batch: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (batch,), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def build(lengths: torch.Tensor, d: int, k: int, H: int, dtype, seed: int = 0):
    """Weights, the padded batch, its mask, and the packed form of the same tokens."""
    import hmx_kernels
    from hmx_kernels.varlen import unpad

    torch.manual_seed(seed)
    layer = hmx_kernels.FusedHyperMixing(d, k, num_heads=H, tied=False).to(dtype)
    weights = [*layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(), layer.layer_norm.weight,
               layer.layer_norm.bias]
    B, L = len(lengths), int(lengths.max())
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, L, d, generator=g).to(dtype)
    mask = torch.arange(L)[None, :] >= lengths[:, None]  # True = padded
    x = x.masked_fill(mask[..., None], 0.0)
    packed, cu, max_len, indices = unpad(x, mask)
    grad_packed = torch.randn(packed.shape, generator=g).to(dtype)
    grad_padded = torch.zeros_like(x).reshape(B * L, d).index_copy(0, indices, grad_packed).reshape(B, L, d)
    return layer, weights, x, mask, packed, cu, max_len, indices, grad_packed, grad_padded


def main(argv: Optional[List[str]] = None) -> int:
    from hmx_kernels import hyper_mixing
    from hmx_kernels.varlen import hyper_mixing_varlen

    from .config import device_slug
    from .contenders import Case
    from .measure import peak_memory, time_passes
    from .runinfo import machine_meta, record_run, resolved_backend, write_results

    p = argparse.ArgumentParser(prog="python -m benchmarks.varlen", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--min-length", type=int, default=200)
    p.add_argument("--max-length", type=int, default=1600)
    p.add_argument("--seed", type=int, default=0, help="seed of the length draw (and of the data)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--backends", default="cpu,reference", help="comma list of backend names (or auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--measure-budget", type=float, default=20.0, help="seconds per timed pass before repetitions are cut (3 at least)")
    p.add_argument("--no-memory", action="store_true")
    from .runinfo import add_output_options, output_dir

    add_output_options(p)
    args = p.parse_args(argv)
    args.out = output_dir(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32
    dev = torch.device("cpu")
    lengths = ragged_lengths(args.batch, args.min_length, args.max_length, args.seed)
    layer, weights, x, mask, packed, cu, max_len, indices, grad_packed, grad_padded = build(
        lengths, args.d, args.k, args.heads, dtype, args.seed)
    B, L = x.shape[:2]
    total = int(lengths.sum())
    fill = total / (B * L)
    print(f"B = {B}, lengths {lengths.tolist()}, total {total}, longest {L}, fill {fill:.3f}", file=sys.stderr)

    rows = []
    for backend in [b for b in args.backends.split(",") if b]:
        xp = packed.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ws = [w.detach().clone().requires_grad_(True) if w is not None else None for w in weights]
        leaves_w = [w for w in ws if w is not None]

        def packed_fwd():
            return hyper_mixing_varlen(xp, cu, max_len, *ws, backend=backend)

        def padded_fwd():
            return hyper_mixing(xb, None, None, *ws, key_padding_mask=mask, backend=backend)

        # the same function: packed rows = the padded batch's kept rows (outputs and token gradients)
        yp = packed_fwd()
        yp.backward(grad_packed)
        yb = padded_fwd()
        yb.backward(grad_padded)
        kept_b = yb.detach().reshape(B * L, -1).index_select(0, indices)
        gkept_b = xb.grad.reshape(B * L, -1).index_select(0, indices)
        err_out, err_grad = _rel(yp.detach(), kept_b), _rel(xp.grad, gkept_b)
        if not (err_out <= 1e-4 and err_grad <= 1e-4):
            raise SystemExit(f"{backend}: packed differs from padded on the kept rows: output {err_out:.2e}, "
                             f"token gradient {err_grad:.2e}")
        row = {"backend_requested": backend, "max_err_out": err_out, "max_err_token_grad": err_grad,
               "resolved_padded": resolved_backend(backend, xb, None, None, *ws, key_padding_mask=mask)["backend"]}
        for kind, fwd, grad, x_leaf in (("packed", packed_fwd, grad_packed, xp), ("padded", padded_fwd, grad_padded, xb)):
            case = Case(fwd, [x_leaf] + leaves_w, check=lambda out: 0.0)
            row[f"{kind}_ran"] = record_run(lambda: fwd().backward(grad))
            times = time_passes(case, grad, dev, args.repeats, args.measure_budget)
            row[f"{kind}_fwd_bwd_ms"] = 1e3 * times["fwd_bwd"]["p50"]
            row[f"{kind}_fwd_bwd_ms_p20_p80"] = [1e3 * times["fwd_bwd"]["p20"], 1e3 * times["fwd_bwd"]["p80"]]
            row[f"{kind}_fwd_ms"] = 1e3 * times["fwd"]["p50"]
            row[f"{kind}_reps"] = times["fwd_bwd"]["reps"]
            if not args.no_memory:
                mem = peak_memory(case, grad, dev)
                row[f"{kind}_peak_fwd_bwd_mib"] = mem["fwd_bwd"] / 2 ** 20
            print(f"  {backend} {kind}: {row[f'{kind}_fwd_bwd_ms']:.1f} ms fwd+bwd, ran "
                  f"{row[f'{kind}_ran']['backends']}", file=sys.stderr, flush=True)
        ideal = row["padded_fwd_bwd_ms"] * fill
        row["ideal_fwd_bwd_ms"] = ideal
        row["packed_over_ideal"] = row["packed_fwd_bwd_ms"] / ideal
        row["packed_over_padded"] = row["packed_fwd_bwd_ms"] / row["padded_fwd_bwd_ms"]
        rows.append(row)

    meta = machine_meta(args.threads or None)
    meta.update(command=("python -m benchmarks.varlen " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
                settings=dict(batch=B, lengths=lengths.tolist(), total_tokens=total, longest=L, fill=fill,
                              d=args.d, k=args.k, heads=args.heads, dtype="float32", seed=args.seed,
                              repeats=args.repeats),
                target="packed fwd+bwd time <= 1.15 x padded time x total / (B x longest) on the cpu backend",
                memory_method="peak of PyTorch CPU allocator events during the pass (torch.profiler), "
                              "above what was allocated before it; malloc outside the allocator is not seen")
    write_results(args.out, f"varlen-{device_slug(dev)}", meta, rows, markdown)
    return 0


def markdown(meta: dict, rows: List[dict]) -> str:
    s = meta["settings"]
    mem = lambda r, k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
    lines = [
        "# Packed (varlen) against padded HyperMixing, forward+backward",
        "",
        f"{meta['cpu_model']}, {meta['torch_threads']} torch thread(s); B = {s['batch']}, lengths uniform in "
        f"the draw {min(s['lengths'])}..{max(s['lengths'])} (seed {s['seed']}), total {s['total_tokens']} tokens, "
        f"longest {s['longest']}, fill {s['fill']:.3f}; d = {s['d']}, k = {s['k']}, H = {s['heads']}, "
        f"{s['dtype']}; median of up to {s['repeats']} repetitions; git {meta['git_sha'][:10]}, torch "
        f"{meta['versions']['torch']}, {meta['date_utc']}.",
        f"Command: `{meta['command']}`",
        "",
        "| backend= | ran (packed / padded) | packed ms | padded ms | ideal ms | packed / ideal | packed / padded | "
        "peak MiB packed / padded | max err out, token grad |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ran = lambda k: ",".join(r[k]["backends"]) + (f" [{','.join(r[k]['ops'])}]" if r[k]["ops"] else "")  # noqa: E731
        lines.append(
            f"| {r['backend_requested']} | {ran('packed_ran')} / {ran('padded_ran')} | {r['packed_fwd_bwd_ms']:.1f} | "
            f"{r['padded_fwd_bwd_ms']:.1f} | {r['ideal_fwd_bwd_ms']:.1f} | {r['packed_over_ideal']:.2f} | "
            f"{r['packed_over_padded']:.2f} | {mem(r, 'packed_peak_fwd_bwd_mib')} / {mem(r, 'padded_peak_fwd_bwd_mib')} | "
            f"{r['max_err_out']:.1e}, {r['max_err_token_grad']:.1e} |")
    lines += ["", "ideal = padded time x total tokens / (B x longest). Target: " + meta["target"] + ".",
              "Memory: " + meta["memory_method"] + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
