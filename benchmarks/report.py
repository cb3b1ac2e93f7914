"""Results: CSV/JSON files, terminal tables, crossover lengths and log-log plots."""
from __future__ import annotations

import csv
import json
import math
from typing import List, Optional, Sequence

ATTENTION_FAMILIES = ("attention", "layer")
# a baseline that could not finish (while HyperMixing did) is slower than HyperMixing there
BASELINE_TOO_SLOW = ("timeout", "oom", "skipped")


# ---- files ---------------------------------------------------------------------------------------
def write_csv(path: str, rows: List[dict]) -> None:
    if not rows:
        open(path, "w").close()
        return
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})


def write_json(path: str, meta: dict, rows: List[dict], crossovers: List[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows, "crossover": crossovers}, f, indent=1, default=str)


# ---- crossover -----------------------------------------------------------------------------------
def crossovers(rows: List[dict], passes: Sequence[str] = ("fwd", "fwd_bwd")) -> List[dict]:
    """Length from which each HyperMixing contender stays faster than each attention contender.

    Per (shape, batch mode, pass, HyperMixing contender, baseline), over the lengths where
    HyperMixing was measured: HyperMixing is faster at N when its median is lower, or when the
    baseline timed out / ran out of memory / was skipped for time there. The crossover is the
    smallest N from which HyperMixing is faster at every larger measured N, interpolated log-log
    between the two grid lengths around the sign change. relation: "=" interpolated, "<=" faster
    already at the smallest length, ">" never faster in the range, "~" the baseline has no time at
    the upper length (crossover between the two lengths; the upper one is given).
    """
    out = []
    keys = sorted({(r["shape"], r["batch_mode"]) for r in rows})
    for shape, mode in keys:
        sel = [r for r in rows if r["shape"] == shape and r["batch_mode"] == mode]
        names = list(dict.fromkeys(r["contender"] for r in sel))
        fam = {r["contender"]: r["family"] for r in sel}
        by = {(r["contender"], r["N"]): r for r in sel}
        for p in passes:
            for hm in [n for n in names if fam[n] == "hypermixing"]:
                for base in [n for n in names if fam[n] in ATTENTION_FAMILIES]:
                    out.append(_crossover_one(shape, mode, p, hm, base, by))
    return out


def _crossover_one(shape, mode, p, hm, base, by) -> dict:
    col = f"{p}_ms_p50"
    res = {"shape": shape, "batch_mode": mode, "pass": p, "hypermixing": hm, "baseline": base,
           "crossover_N": None, "relation": "", "speedup_at_largest_N": None, "largest_N": None}
    pts = []  # (N, log(t_hm / t_base) or None when only "faster" is known)
    for (name, N), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if name != hm or r["status"] != "ok" or (base, N) not in by:
            continue
        b = by[(base, N)]
        if b["status"] == "ok":
            pts.append((N, math.log(r[col] / b[col])))
        elif b["status"] in BASELINE_TOO_SLOW:
            pts.append((N, None))
    if not pts:
        res["relation"] = "no common lengths"
        return res
    faster = [d is None or d < 0 for _, d in pts]
    last_ok = [(N, d) for N, d in pts if d is not None]
    if last_ok:
        res["largest_N"], d = last_ok[-1]
        res["speedup_at_largest_N"] = math.exp(-d)
    if not faster[-1]:
        res.update(relation=">", crossover_N=pts[-1][0])
        return res
    i = len(pts) - 1
    while i > 0 and faster[i - 1]:
        i -= 1
    if i == 0:
        res.update(relation="<=", crossover_N=pts[0][0])
        return res
    (n0, d0), (n1, d1) = pts[i - 1], pts[i]
    if d1 is None:
        res.update(relation="~", crossover_N=n1)
        return res
    frac = d0 / (d0 - d1)  # d0 >= 0 > d1
    res.update(relation="=", crossover_N=math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))))
    return res


def format_crossover(c: dict) -> str:
    n = c["crossover_N"]
    rel = c["relation"]
    if n is None:
        where = rel
    elif rel == "=":
        where = f"N ~ {n:.0f}"
    elif rel == "<=":
        where = f"N <= {n} (faster at every length)"
    elif rel == ">":
        where = f"N > {n} (not within the range)"
    else:
        where = f"N <= {n} (baseline over the cap there)"
    sp = c["speedup_at_largest_N"]
    sp = f"; {sp:.2f}x at N={c['largest_N']}" if sp is not None else ""
    return (f"{c['shape']:<12} {c['batch_mode']:<6} {c['pass']:<7} {c['hypermixing']:<24} vs "
            f"{c['baseline']:<14} {where}{sp}")


# ---- terminal tables -----------------------------------------------------------------------------
def _cell(r: Optional[dict], col: str, fmt: str) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok" or r.get(col) is None:
        return r["status"]
    return fmt.format(r[col])


def tables(rows: List[dict]) -> str:
    lines = []
    keys = list(dict.fromkeys((r["shape"], r["batch_mode"]) for r in rows))
    for shape, mode in keys:
        sel = [r for r in rows if r["shape"] == shape and r["batch_mode"] == mode]
        names = list(dict.fromkeys(r["contender"] for r in sel))
        by = {(r["contender"], r["N"]): r for r in sel}
        Ns = sorted({r["N"] for r in sel})
        r0 = sel[0]
        for title, col, fmt in (("forward ms (median)", "fwd_ms_p50", "{:.2f}"),
                                ("forward+backward ms (median)", "fwd_bwd_ms_p50", "{:.2f}"),
                                ("forward+backward peak MiB", "mem_fwd_bwd_mib", "{:.1f}")):
            lines.append(f"\n{shape} (d={r0['d']}, k={r0['k']}, H={r0['H']}), batch {mode}, "
                         f"{r0['dtype']}: {title}")
            w = max(12, *(len(n) + 1 for n in names))
            lines.append(f"{'N':>7} {'B':>5} " + "".join(f"{n:>{w}}" for n in names))
            for N in Ns:
                B = next(r["B"] for r in sel if r["N"] == N)
                lines.append(f"{N:>7} {B:>5} " + "".join(f"{_cell(by.get((n, N)), col, fmt):>{w}}" for n in names))
    return "\n".join(lines)


def _minor_label(v: float, _pos=None) -> str:
    """Label the 2x and 5x minor ticks of a log axis, leave the others blank."""
    if v <= 0:
        return ""
    mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return f"{v:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


# ---- plots ---------------------------------------------------------------------------------------
def plot(rows: List[dict], time_path: str, memory_path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    modes = list(dict.fromkeys(r["batch_mode"] for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fam = {r["contender"]: r["family"] for r in rows}
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    style = {"hypermixing": "-", "attention": "--", "layer": ":"}
    marker = {"hypermixing": "o", "attention": "s", "layer": "^"}
    info = {(r["shape"], r["batch_mode"]): r for r in sorted(rows, key=lambda r: -r["N"])}  # smallest N last

    def panel_title(shape, mode):
        r = info[(shape, mode)]
        batch = f"B={r['B']}" if mode == "fixed" else f"B*N={r['B'] * r['N']}"
        return f"{shape}: d={r['d']} k={r['k']} H={r['H']}, {batch}"

    def draw(path, panels, ylabel_of):
        nr, nc = len(panels), len(shapes)
        fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc, 4.0 * nr), squeeze=False)
        for i, (mode, col, label) in enumerate(panels):
            for j, shape in enumerate(shapes):
                ax = axes[i][j]
                for n in names:
                    pts = sorted((r["N"], r[col]) for r in rows if r["contender"] == n and r["shape"] == shape
                                 and r["batch_mode"] == mode and r["status"] == "ok" and r[col] is not None)
                    if pts:
                        ax.plot(*zip(*pts), style[fam[n]], marker=marker[fam[n]], ms=4, color=colors[n], label=n)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                Ns = sorted({r["N"] for r in rows if r["shape"] == shape and r["batch_mode"] == mode})
                ax.set_xticks(Ns)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.tick_params(axis="x", labelrotation=45 if len(Ns) > 7 else 0, labelsize=8)
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
                ax.grid(True, which="both", alpha=0.3)
                ax.set_title(f"{panel_title(shape, mode)}\n{label}", fontsize=9)
                ax.set_xlabel("sequence length N")
                ax.set_ylabel(ylabel_of)
        handles, labels = {}, {}
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(l, h)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)),
                       fontsize=9, frameon=False)
        else:
            fig.text(0.5, 0.5, "no measured points", ha="center")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) > 6), 1, 0.96))
        fig.savefig(path, dpi=110)
        plt.close(fig)

    time_panels = [(m, col, lab) for m in modes for col, lab in
                   (("fwd_ms_p50", "forward"), ("fwd_bwd_ms_p50", "forward+backward"))]
    draw(time_path, time_panels, "time (ms, median)")
    draw(memory_path, [(m, "mem_fwd_bwd_mib", "peak memory, forward+backward") for m in modes],
         "peak extra memory (MiB)")
