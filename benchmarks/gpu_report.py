"""Markdown tables from one GPU run's results (benchmarks/gpu_run.py), labelled with the device, the
date and the git SHA:

    python -m benchmarks.gpu_report benchmarks/results/gpu/<device>/              # print, write summary.md
    python -m benchmarks.gpu_report benchmarks/results/gpu/<device>/ --readme README.md

--readme replaces what stands between the README's `<!-- gpu-run:begin -->` and
`<!-- gpu-run:end -->` markers with these tables (the GPU estimates elsewhere in the README stay,
labelled as estimates). Tables: the run's steps, correctness per backend and dtype (worst error
against its tolerance, failures listed), compute-sanitizer, timings per shape (median ms, eager and
CUDA graph, peak MiB), the per-kernel breakdown, and pytest per file.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from .gpu_run import read_rows
from .gpu_timings import FA3_STAND_IN

BEGIN, END = "<!-- gpu-run:begin -->", "<!-- gpu-run:end -->"


def _rows(directory: Path, step: str) -> List[dict]:
    return read_rows(directory / f"{step}.jsonl")


def _by_id(rows: List[dict]) -> Dict[str, dict]:
    return {r.get("id"): r for r in rows}


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def label(directory: Path) -> dict:
    env = _by_id(_rows(directory, "env"))
    versions, smi, source = env.get("versions", {}), env.get("nvidia-smi", {}), env.get("source", {})
    steps = _rows(directory, "steps")
    date = None
    for path in sorted(directory.glob("*.jsonl")):
        date = date or path.stat().st_mtime
    import datetime

    when = datetime.datetime.fromtimestamp(date or 0, datetime.timezone.utc).strftime("%Y-%m-%d")
    return {"device": versions.get("device", directory.name), "date": (versions.get("date_utc") or when)[:10],
            "sha": source.get("git_sha", "unknown"), "dirty": source.get("dirty"),
            "source_sha256": source.get("source_sha256"), "versions": versions, "smi": smi, "steps": steps}


def markdown(directory: Path) -> str:
    directory = Path(directory)
    lab = label(directory)
    v, smi = lab["versions"], lab["smi"]
    sha = lab["sha"][:12] + ("-dirty" if lab["dirty"] else "")
    out = [f"**Measured on {lab['device']}, {lab['date']}, git {sha}** (source sha256 {lab['source_sha256']}; "
           f"`python -m benchmarks.gpu_run`, results in `{directory.as_posix()}`).", ""]
    out.append(f"torch {v.get('torch')} (CUDA {v.get('torch_cuda')}, cuDNN {v.get('cudnn')}), triton {v.get('triton')}, "
               f"Python {v.get('python')}, flash_attn: {v.get('flash_attn')}; driver {smi.get('driver_version', '-')}, "
               f"SM clock {smi.get('clocks.sm', '-')} (max {smi.get('clocks.max.sm', '-')}), memory clock "
               f"{smi.get('clocks.mem', '-')}, power limit {smi.get('power.limit', '-')}.")
    out += ["", "| step | limit s | wall s | rows | status |", "|---|---|---|---|---|"]
    for r in lab["steps"]:
        out.append(f"| {r['id']} | {_fmt(r.get('limit_s'))} | {_fmt(r.get('wall_s'))} | {_fmt(r.get('rows'))} | "
                   f"{r['status']}{' (in flight: ' + r['in_flight'] + ')' if r.get('in_flight') else ''}"
                   f"{' (crashed on: ' + ', '.join(r['crashed_on']) + ')' if r.get('crashed_on') else ''} |")
    out += ["", *correctness_table(directory), "", *sanitizer_table(directory), "", *timings_tables(directory),
            "", *breakdown_table(directory), "", *pytest_table(directory)]
    return "\n".join(out) + "\n"


def correctness_table(directory: Path) -> List[str]:
    rows = []
    for r in _rows(directory, "correctness"):
        if not r.get("backend"):  # a killed / crashed case's row carries only its id: backend/dtype/case
            parts = str(r.get("id", "")).split("/")
            if len(parts) < 3:
                continue
            r = dict(r, backend=parts[0], dtype=parts[1], case="/".join(parts[2:]))
        rows.append(r)
    out = ["Correctness (forward and every gradient against the float64 reference on the same rounded inputs; "
           "error = max |diff| / max |reference|, worst case shown against the backend's declared tolerance):", "",
           "| backend | dtype | pass | fail | error | unsupported / skipped / killed | worst out err / tol | worst grad err / tol |",
           "|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["backend"], r.get("dtype"))].append(r)
    failures = []
    for (backend, dtype), rs in sorted(groups.items()):
        count = lambda *s: sum(r["status"] in s for r in rs)  # noqa: E731
        measured = [r for r in rs if r.get("out_err") is not None]
        wo = max(measured, key=lambda r: r["out_err"] / r["out_tol"], default=None)
        wg = max(measured, key=lambda r: r["grad_err"] / r["grad_tol"], default=None)
        out.append(f"| {backend} | {dtype} | {count('pass')} | {count('fail')} | {count('error')} | "
                   f"{count('unsupported', 'skipped', 'killed', 'crashed')} | "
                   + (f"{wo['out_err']:.2e} / {wo['out_tol']:g} ({wo['case']}) | " if wo else "- | ")
                   + (f"{wg['grad_err']:.2e} / {wg['grad_tol']:g} ({wg['case']}, {wg['grad_worst']}) |" if wg else "- |"))
        failures += [r for r in rs if r["status"] in ("fail", "error", "crashed", "killed")]
    if failures:
        out += ["", "Failures:", ""]
        for r in failures:
            detail = (f"out {r['out_err']:.2e} (tol {r['out_tol']:g}), grad {r['grad_err']:.2e} in {r['grad_worst']} "
                      f"(tol {r['grad_tol']:g})" if r.get("out_err") is not None else (r.get("error") or r.get("reason")))
            out.append(f"- `{r['id']}`: {r['status']}: {detail}")
    return out


def sanitizer_table(directory: Path) -> List[str]:
    out = ["compute-sanitizer (one tiny masked forward+backward per backend):", "",
           "| tool | backend | status | errors | seconds |", "|---|---|---|---|---|"]
    for r in _rows(directory, "sanitizer"):
        tool, backend = (r.get("id") or "/").split("/", 1)
        out.append(f"| {tool} | {backend} | {r['status']}{': ' + r['reason'] if r.get('reason') else ''} | "
                   f"{_fmt(r.get('errors'))} | {_fmt(r.get('seconds'))} |")
    return out


def timings_tables(directory: Path) -> List[str]:
    rows = [r for r in _rows(directory, "timings") if r.get("contender")]
    out = [f"Timings: median ms per call (eager / CUDA graph), peak MiB allocated in the eager call; "
           f"{FA3_STAND_IN}.", ""]
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        first = sel[0]
        out += [f"{shape} (d {first['d']}, k {first['k']}, H {first['H']}, d_h {first['d_h']}), {first['dtype']}, "
                f"B {first['B']}:", "",
                "| N | pass | " + " | ".join(contenders) + " |", "|---|---|" + "---|" * len(contenders)]
        cells: Dict[tuple, dict] = {(r["N"], r["pass"], r["contender"], r["mode"]): r for r in sel}
        for N in sorted({r["N"] for r in sel}):
            for p in ("fwd", "fwd_bwd"):
                line = [str(N), p]
                for c in contenders:
                    e, g = cells.get((N, p, c, "eager")), cells.get((N, p, c, "graph"))

                    def cell(r):
                        if r is None:
                            return "-"
                        return f"{r['ms']:.3f}" if r["status"] == "ok" else r["status"]

                    mem = e.get("peak_mib") if e and e["status"] == "ok" else None
                    line.append(f"{cell(e)} / {cell(g)}" + (f" ({mem:.0f} MiB)" if mem is not None else ""))
                out.append("| " + " | ".join(line) + " |")
        out.append("")
    tune = [r for r in _rows(directory, "timings") if str(r.get("id", "")).startswith("tune/")]
    if tune:
        out.append("Autotuning (the first hmx-triton forward+backward per shape, compiles included): " + ", ".join(
            f"{r['shape']} at N {r.get('N')}: {_fmt(r.get('seconds'))} s ({r['status']})" for r in tune))
    return out


def breakdown_table(directory: Path) -> List[str]:
    rows = _rows(directory, "breakdown")
    out = ["Per-kernel breakdown (torch.profiler, forward+backward, per iteration; GB/s against the Triton "
           "kernels' byte model, tools.kernels.token_bytes):", ""]
    for total in (r for r in rows if str(r.get("id", "")).endswith("/total")):
        backend = total["backend"]
        if total["status"] != "ok":
            out.append(f"- {backend}: {total['status']}: {total.get('reason')}")
            continue
        out += [f"{backend}, {total['shape']}, B {total['B']}, N {total['N']}, {total['dtype']}: "
                f"{_fmt(total['kernels_per_iter'])} kernels, {_fmt(total['kernel_us_per_iter'])} us of kernel time, "
                f"{_fmt(total['wall_us_per_iter'])} us wall per iteration.", "",
                "| kernel | us / iter | calls / iter | share | GB/s |", "|---|---|---|---|---|"]
        kernels = [r for r in rows if r.get("backend") == backend and "/kernel/" in str(r.get("id"))]
        for r in kernels[:15]:
            name = r["kernel"] if len(r["kernel"]) <= 60 else r["kernel"][:57] + "..."
            out.append(f"| `{name}` | {_fmt(r['us_per_iter'])} | {_fmt(r['calls_per_iter'])} | "
                       f"{_fmt(r.get('share'), '.1%') if r.get('share') is not None else '-'} | {_fmt(r.get('gbps'))} |")
        out.append("")
    configs = _by_id(rows).get("triton/configs", {}).get("configs") or []
    if configs:
        out.append("Autotuner's configs: " + "; ".join(
            f"{c['kernel']} BLOCK_N {c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']} (key {', '.join(c['key'][:3])})"
            for c in configs))
    return out


def pytest_table(directory: Path) -> List[str]:
    rows = _rows(directory, "pytest")
    out = ["pytest (pinned Triton configs, --maxfail 1000):", "", "| file | passed | failed | skipped | status |",
           "|---|---|---|---|---|"]
    for f in (r for r in rows if str(r.get("id", "")).startswith("file:")):
        path = f["id"][5:]
        tests = [r for r in rows if str(r.get("id", "")).startswith(path + "::")]
        count = lambda s: sum(r["status"] == s for r in tests)  # noqa: E731
        out.append(f"| {path} | {count('passed')} | {count('failed')} | {count('skipped')} | {f['status']} |")
    return out


def replace_in_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to replace")
    readme.write_text(pattern.sub(lambda _m: f"{BEGIN}\n{text}{END}", content, count=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="one run's folder, benchmarks/results/gpu/<device>/")
    parser.add_argument("--readme", help="replace the README's gpu-run block with the tables")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if not (directory / "steps.jsonl").exists():
        raise SystemExit(f"{directory}: no steps.jsonl (not a gpu_run results folder)")
    text = markdown(directory)
    (directory / "summary.md").write_text(text)
    if args.readme:
        replace_in_readme(Path(args.readme), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
