"""Model-level benchmark: a speechbrain HyperConformer encoder, three ways.

    python -m benchmarks.model                   # recipe size, N 600 / 1500 / 3000 / 6000 (CPU: ~15 min)
    python -m benchmarks.model --smoke           # a tiny encoder at N 40, seconds (what CI runs)

Contenders, all speechbrain `ConformerEncoder`s of one size (the hyperconformer_8M recipe's encoder:
d 144, 8 heads, d_ffn = hypernet size 576, conv kernel 31, GELU, 10 layers; no front-end, no decoder):
  speechbrain   attention_type="hypermixing": speechbrain's own HyperMixing layers
  hmx           the same encoder, same weights, every HyperMixing converted with
                FusedHyperMixing.from_speechbrain (backend "auto")
  sdpa          attention_type="regularMHA" with each attention replaced by q/k/v/out projections
                around torch's scaled_dot_product_attention (speechbrain's MultiheadAttention asks
                for the attention weights and so runs the N x N path; SDPA is the fast one)

Per length N (batch 1, float32, one torch thread by default):
  train   one training step: zero_grad, forward, backward of sum(out * g), Adam step
  infer   one forward under torch.inference_mode()
Reported: median (and minimum) wall time of `--repeats` repetitions (5; 3 from N = 3000) after one warm-up, the
contenders timed in turns (repetition r of each before repetition r + 1 of any: load from other
processes falls on all of them alike); peak memory of the pass
(PyTorch CPU allocator events replayed from torch.profiler, above what was allocated before: the
same method as `python -m benchmarks`); the share of the pass spent in the mixer (the attention /
HyperMixing module), from one profiled repetition: the mixer's forward (a record_function around
each mixer call) plus the backward nodes its forward created (the profiler's autograd
evaluate_function events, matched to the forward ops by sequence number), over the profiled pass's
wall time. The profiler slows small ops down, so the share is an estimate; the times are not profiled.

Correctness gate, at every N before anything is timed: the converted encoder's output and input
gradient equal speechbrain's (scale-relative error <= 1e-4 in float32: only the summation order
differs); otherwise the run stops with an error.

speechbrain's HyperMixing has a 3000-position table by default; it is rebuilt with
max(3000, N) positions (the benchmark's only change to it). It returns an [B, N, N] tensor of zeros
per layer, which the encoder keeps in its attention list: that memory is in its column.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import runinfo
from .config import device_slug, measured_cpu_peak_tflops

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("speechbrain", "hmx", "sdpa")
RECIPE = dict(d_model=144, nhead=8, d_ffn=576, kernel_size=31, layers=10)
SMOKE = dict(d_model=32, nhead=4, d_ffn=64, kernel_size=3, layers=2)
GATE_RTOL = 1e-4
MIXER_TAG = "model::mixer"


class SDPAttention(nn.Module):
    """Multi-head self-attention with speechbrain's mixer call signature, on
    F.scaled_dot_product_attention (key padding as a boolean mask; no N x N weights returned)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, pos_embs=None):
        B, N, d = query.shape
        q, k, v = self.qkv(query).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, N, d)), None


class Tagged(nn.Module):
    """Runs the wrapped mixer inside a profiler range, so its share of a step can be measured."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.profiler.record_function(MIXER_TAG):
            return self.inner(*args, **kwargs)


def import_speechbrain_conformer():
    """speechbrain's package import pulls torchaudio, which the Conformer encoder never calls and
    which has no release for some CPU torch builds: an empty stand-in is registered when it is missing."""
    import types

    try:
        import torchaudio  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure of torchaudio
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    try:
        from speechbrain.lobes.models.transformer import Conformer, Transformer
    except ImportError as e:
        raise SystemExit(f"benchmarks.model needs speechbrain ({e}): `make setup` installs it") from None
    return Conformer, Transformer


def build_encoders(size: dict, N: int, seed: int = 0) -> Dict[str, nn.Module]:
    """The three encoders; `speechbrain` and `hmx` share their weights (hmx is converted from it)."""
    Conformer, Transformer = import_speechbrain_conformer()
    ConformerEncoder, PositionalEncoding = Conformer.ConformerEncoder, Transformer.PositionalEncoding

    from hmx_kernels import FusedHyperMixing

    common = dict(num_layers=size["layers"], d_model=size["d_model"], d_ffn=size["d_ffn"],
                  nhead=size["nhead"], kernel_size=size["kernel_size"], activation=nn.GELU, dropout=0.0)
    torch.manual_seed(seed)
    sb = ConformerEncoder(attention_type="hypermixing", **common)
    hmx = ConformerEncoder(attention_type="hypermixing", **common)
    hmx.load_state_dict(sb.state_dict())
    for layer in sb.layers:  # the only change: positions for N > 3000
        layer.mha_layer.positional_encoding = PositionalEncoding(size["d_model"], max(3000, N))
    for layer in hmx.layers:
        layer.mha_layer = FusedHyperMixing.from_speechbrain(layer.mha_layer, backend="auto")
    torch.manual_seed(seed)
    sdpa = ConformerEncoder(attention_type="regularMHA", **common)
    for layer in sdpa.layers:
        layer.mha_layer = SDPAttention(size["d_model"], size["nhead"])
    encoders = {"speechbrain": sb, "hmx": hmx, "sdpa": sdpa}
    for enc in encoders.values():
        for layer in enc.layers:
            layer.mha_layer = Tagged(layer.mha_layer)
        enc.train()
    return encoders


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def correctness_gate(sb: nn.Module, hmx: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, float]:
    """Output and input gradient of the converted encoder against speechbrain's; raises if they differ."""
    errs = {}
    outs = []
    for enc in (sb, hmx):
        xi = x.clone().requires_grad_(True)
        y = enc(xi)[0]
        (y * g).sum().backward()
        outs.append((y.detach(), xi.grad))
        enc.zero_grad(set_to_none=True)
    errs["out"] = rel_err(outs[1][0], outs[0][0])
    errs["dx"] = rel_err(outs[1][1], outs[0][1])
    bad = {k: v for k, v in errs.items() if not v <= GATE_RTOL}
    if bad:
        raise RuntimeError(f"correctness gate: the converted encoder differs from speechbrain's at N {x.shape[1]}: "
                           f"scale-relative errors {bad} > {GATE_RTOL}")
    return errs


def make_passes(enc: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dict[str, Callable[[], None]]:
    opt = torch.optim.Adam(enc.parameters(), lr=1e-4)

    def train():
        opt.zero_grad(set_to_none=True)
        y = enc(x)[0]
        (y * g).sum().backward()
        opt.step()

    def infer():
        with torch.inference_mode():
            enc(x)

    return {"train": train, "infer": infer}


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Median and minimum wall time of each function, timed in turns (repetition r of every
    contender before repetition r + 1 of any), so that load from other processes falls on all
    contenders alike; one untimed warm-up call each first (first use of the C++ extension,
    allocator growth)."""
    for fn in fns.values():
        fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: {"ms": 1e3 * statistics.median(v), "ms_min": 1e3 * min(v), "reps": len(v)}
            for name, v in samples.items()}


def profile_pass(fn: Callable[[], None]) -> Dict[str, float]:
    """Peak memory and the mixer's share of one run of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from .measure import _quiet_stderr

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall_us = 1e6 * (time.perf_counter() - t0)
    raw = prof.profiler.kineto_results.events()
    cur = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]"):
        cur += nbytes
        peak = max(peak, cur)

    events = prof.events()
    fwd_us = 0.0
    mixer_seq = set()

    def inside_mixer(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name == MIXER_TAG:
                return True
            p = p.cpu_parent
        return False

    for e in events:
        if e.name == MIXER_TAG:
            fwd_us += e.time_range.elapsed_us()
        elif getattr(e, "sequence_nr", -1) >= 0 and not e.name.startswith("autograd::") and inside_mixer(e):
            mixer_seq.add(e.sequence_nr)
    bwd_us = sum(e.time_range.elapsed_us() for e in events
                 if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in mixer_seq)
    return {"peak_mib": peak / 2 ** 20, "mixer_share": (fwd_us + bwd_us) / wall_us,
            "mixer_fwd_ms": fwd_us / 1e3, "mixer_bwd_ms": bwd_us / 1e3, "profiled_ms": wall_us / 1e3}


def run(size: dict, lengths: List[int], repeats: int, contenders=CONTENDERS, log=print,
        done: Callable[[List[dict]], None] = lambda rows: None) -> List[dict]:
    """Every length in turn; done(rows) after each (the results so far are written then)."""
    rows = []
    for N in lengths:
        encoders = build_encoders(size, N)
        gen = torch.Generator().manual_seed(N)
        x = torch.randn(1, N, size["d_model"], generator=gen)
        g = torch.randn(1, N, size["d_model"], generator=gen)
        errs = correctness_gate(encoders["speechbrain"], encoders["hmx"], x, g)
        backend = runinfo.record_run(lambda: encoders["hmx"](x[:, :8])[0].sum().backward())
        encoders["hmx"].zero_grad(set_to_none=True)
        log(f"N {N}: converted encoder equals speechbrain's (out {errs['out']:.1e}, dx {errs['dx']:.1e}); "
            f"ran {backend['backends']}")
        passes = {name: make_passes(encoders[name], x, g) for name in contenders}
        for pass_name in ("train", "infer"):
            reps = repeats if N < 3000 else min(repeats, 3)  # few repeats where one step takes seconds
            times = time_interleaved({name: passes[name][pass_name] for name in contenders}, reps)
            for name in contenders:
                row = {"contender": name, "pass": pass_name, "N": N, "B": 1, **times[name],
                       **profile_pass(passes[name][pass_name])}
                if name == "hmx":
                    row.update(gate_out_err=errs["out"], gate_dx_err=errs["dx"], backends=backend["backends"])
                rows.append(row)
                log(f"  {name:<12} {pass_name:<6} {row['ms']:9.1f} ms (min {row['ms_min']:.1f})  "
                    f"peak {row['peak_mib']:8.1f} MiB  mixer {100 * row['mixer_share']:5.1f} %")
        del encoders, passes
        done(rows)
    return rows


def markdown(meta: dict, rows: List[dict]) -> str:
    by = {(r["contender"], r["pass"], r["N"]): r for r in rows}
    lengths = sorted({r["N"] for r in rows})
    s = meta["size"]
    out = [f"`{meta['command']}`: {meta['cpu_model']}, {meta['torch_threads']} torch thread(s), float32, B 1, "
           f"ConformerEncoder d {s['d_model']}, {s['nhead']} heads, d_ffn {s['d_ffn']}, kernel {s['kernel_size']}, "
           f"{s['layers']} layers; torch {meta['versions']['torch']}, git {meta['git_sha'][:10]}, "
           f"{meta['date_utc'][:10]}; load average {meta['load']['before'][0]:.2f} before, "
           f"{meta['load']['after'][0]:.2f} after ({meta['cpu_count']} cores); one-thread matmul rate at the end "
           f"{meta['matmul_tflops_1thread']:.3f} TFLOP/s; {meta['repeats']} repeats (3 from N 3000), in turns.", ""]
    for p, title in (("train", "training step (forward + backward + Adam)"), ("infer", "inference (forward)")):
        out += [f"{title}: median ms / peak MiB / mixer share of the pass", "",
                "| N | speechbrain | hmx | sdpa | hmx speed-up over speechbrain: median (min) | over sdpa: median (min) |",
                "|---|---|---|---|---|---|"]
        for N in lengths:
            cells = []
            for c in CONTENDERS:
                r = by.get((c, p, N))
                cells.append("-" if r is None else
                             f"{r['ms']:.0f} / {r['peak_mib']:.0f} / {100 * r['mixer_share']:.0f} %")
            h, sb, sd = by.get(("hmx", p, N)), by.get(("speechbrain", p, N)), by.get(("sdpa", p, N))
            sp = lambda a, b: (f"{b['ms'] / a['ms']:.2f}x ({b['ms_min'] / a['ms_min']:.2f}x)"  # noqa: E731
                               if a and b else "-")
            out.append(f"| {N} | " + " | ".join(cells) + f" | {sp(h, sb)} | {sp(h, sd)} |")
        out.append("")
    return "\n".join(out)


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"speechbrain": "o--", "hmx": "o-", "sdpa": "s:"}
    for c in CONTENDERS:
        for ax, p, key in ((axes[0], "train", "ms"), (axes[1], "infer", "ms"), (axes[2], "train", "peak_mib")):
            sel = sorted((r["N"], r[key]) for r in rows if r["contender"] == c and r["pass"] == p)
            if sel:
                ax.plot(*zip(*sel), styles[c], label=c)
    for ax, t in zip(axes, ("training step, ms", "inference, ms", "training step, peak MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(t)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rewrite(path: str) -> None:
    """Rewrites <stem>.md and the plot from a results file (python -m benchmarks.model --rewrite FILE)."""
    import json

    with open(path) as f:
        data = json.load(f)
    stem = path[:-len(".json")]
    with open(stem + ".md", "w") as f:
        f.write(markdown(data["meta"], data["rows"]))
    m = data["meta"]
    plot(data["rows"], stem + ".png", f"HyperConformer encoder ({m['size']['layers']} layers, d {m['size']['d_model']}), "
         f"{m['cpu_model']}, {m['torch_threads']} thread(s), B 1, fp32, {m['date_utc'][:10]}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="600,1500,3000,6000")
    p.add_argument("--layers", type=int, default=None, help=f"encoder layers (default {RECIPE['layers']})")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (at most 3 from N = 3000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="a tiny encoder at N 40, 1 repeat (seconds)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--rewrite", metavar="JSON", help="only rewrite the Markdown table and plot of a results file")
    runinfo.add_output_options(p)
    args = p.parse_args(argv)
    if args.rewrite:
        rewrite(args.rewrite)
        return 0
    size = dict(SMOKE if args.smoke else RECIPE)
    if args.layers:
        size["layers"] = args.layers
    lengths = [40] if args.smoke else [int(v) for v in args.lengths.split(",")]
    repeats = 1 if args.smoke else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = runinfo.output_dir(args, smoke=args.smoke)
    load_before = runinfo.check_load(torch.get_num_threads())
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    name = f"model-{device_slug(torch.device('cpu'))}"
    machine = runinfo.machine_meta()  # at the start: the git sha of the code that runs

    def metadata(rows):
        return {
            **machine,
            "date_utc": started.isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.model"] + list(argv if argv is not None else sys.argv[1:])),
            "size": size, "lengths": lengths, "repeats": repeats, "dtype": "float32",
            "load": {"before": load_before, "after": list(os.getloadavg())},
            "matmul_tflops_1thread": measured_cpu_peak_tflops(torch.float32, 1),
            "gate_rtol": GATE_RTOL,
            "wall_s": round(time.perf_counter() - t0, 1),
            "complete": len({r["N"] for r in rows}) == len(lengths),
            }

    def write(rows):
        return runinfo.write_results(out_dir, name, metadata(rows), rows, markdown)

    rows = run(size, lengths, repeats, log=lambda m: print(m, file=sys.stderr, flush=True), done=write)
    meta = metadata(rows)
    stem = os.path.join(out_dir, name)
    if not args.no_plot:
        try:
            plot(rows, stem + ".png", f"HyperConformer encoder ({size['layers']} layers, d {size['d_model']}), "
                 f"{meta['cpu_model']}, {meta['torch_threads']} thread(s), B 1, fp32, {meta['date_utc'][:10]}")
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
