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
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        print(tables(json.load(f)))
