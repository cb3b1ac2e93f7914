"""Print a results file as the Markdown tables of benchmarks/README.md ("Latest results").

    python -m benchmarks.markdown benchmarks/results/<device-slug>-<dtype>.json
"""
from __future__ import annotations

import json
import sys
from typing import List


def _cell(r) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    mem = f" ({r['mem_fwd_bwd_mib']:.1f})" if r.get("mem_fwd_bwd_mib") is not None else ""
    return f"{r['fwd_bwd_ms_p50']:.1f}{mem}"


def executed_flops(r: dict, pass_: str = "fwd_bwd") -> int:
    """FLOPs the contender of row r executes (the row's own column; results written before it
    existed: the reassociated count for the fused HyperMixing backends, else the row's FLOPs)."""
    if r.get(f"{pass_}_exec_flops") is not None:
        return r[f"{pass_}_exec_flops"]
    from hmx_kernels.flops import hyper_mixing_flops_reassociated

    from .contenders import REASSOCIATED_BACKENDS

    if r["contender"] in {f"hmx-{b}" for b in REASSOCIATED_BACKENDS}:
        return hyper_mixing_flops_reassociated(r["B"], r["N"], r["N"], r["d"], r["H"], r["k"] // r["H"], pass_)
    return r[f"{pass_}_flops"]


def efficiency(data: dict, N: int = None) -> str:
    """Share of the matrix-multiply peak of each HyperMixing contender at N (default: the largest
    N every shape has), forward+backward: in the FLOPs the contender executes (the fused backends
    compute the reassociated form, about 3.6x fewer FLOPs than the direct form at k_h = 4 d_h) and,
    beside it, in the direct form's FLOPs (the yardstick of the `*_peak_share` columns)."""
    rows, meta = data["results"], data["meta"]
    peak = meta.get("peak_tflops")
    ok = [r for r in rows if r["status"] == "ok" and r["family"] == "hypermixing" and r.get("fwd_bwd_ms_p50")]
    if not peak or not ok:
        return ""
    if N is None:
        N = min(max(r["N"] for r in ok if r["shape"] == s) for s in {r["shape"] for r in ok})
    out = [f"Share of the measured matrix-multiply peak (about {peak:.3f} TFLOP/s), forward+backward at N = {N}: "
           "in executed FLOPs (direct-form FLOPs)", "",
           "| shape | contender | executed TFLOP/s | peak share, executed FLOPs | peak share, direct-form FLOPs |",
           "|---|---|---|---|---|"]
    for r in ok:
        if r["N"] != N:
            continue
        s = r["fwd_bwd_ms_p50"] / 1e3
        exec_tflops = executed_flops(r) / s / 1e12
        # the row's own share (against the peak the sweep measured) where the row has it
        direct = r.get("fwd_bwd_peak_share") or r["fwd_bwd_flops"] / s / 1e12 / peak
        share = direct * executed_flops(r) / r["fwd_bwd_flops"]
        out.append(f"| {r['shape']} | {r['contender']} | {exec_tflops:.3f} | {share:.2f} | {direct:.2f} |")
    return "\n".join(out)


def tables(data: dict) -> str:
    rows, meta = data["results"], data["meta"]
    out: List[str] = [
        f"`{meta['command'].strip()}`: {meta['device_name']}, {meta['torch_threads']} torch thread(s), "
        f"{meta['dtype']}, torch {meta['versions']['torch']}, git {meta['git_sha'][:10]}, {meta['date_utc'][:10]}, "
        f"wall {meta['wall_s']:.0f} s.", ""]
    for mode in dict.fromkeys(r["batch_mode"] for r in rows):
        for shape in dict.fromkeys(r["shape"] for r in rows if r["batch_mode"] == mode):
            sel = [r for r in rows if r["batch_mode"] == mode and r["shape"] == shape]
            names = list(dict.fromkeys(r["contender"] for r in sel))
            by = {(r["contender"], r["N"]): r for r in sel}
            r0 = sel[0]
            out.append(f"{shape} (d={r0['d']}, k={r0['k']}, H={r0['H']}), batch {mode}: forward+backward, "
                       f"median ms (peak MiB)")
            out.append("")
            out.append("| N | B | " + " | ".join(names) + " |")
            out.append("|---" * (len(names) + 2) + "|")
            for N in sorted({r["N"] for r in sel}):
                B = next(r["B"] for r in sel if r["N"] == N)
                out.append(f"| {N} | {B} | " + " | ".join(_cell(by.get((n, N))) for n in names) + " |")
            out.append("")
    out.append("Crossover (length from which HyperMixing stays faster; speed-up at the largest common N):")
    out.append("")
    out.append("| shape | batch | pass | HyperMixing | baseline | crossover N | speed-up |")
    out.append("|---|---|---|---|---|---|---|")
    for c in data["crossover"]:
        n, rel = c["crossover_N"], c["relation"]
        where = "-" if n is None else (f"~{n:.0f}" if rel == "=" else f"{rel} {n}")
        sp = f"{c['speedup_at_largest_N']:.2f}x at {c['largest_N']}" if c["speedup_at_largest_N"] else "-"
        out.append(f"| {c['shape']} | {c['batch_mode']} | {c['pass']} | {c['hypermixing']} | {c['baseline']} | "
                   f"{where} | {sp} |")
    eff = efficiency(data)
    if eff:
        out += ["", eff]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        print(tables(json.load(f)))
