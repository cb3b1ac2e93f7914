"""The GPU run's measurements (benchmarks/gpu_run.py runs each as a step process): timings of
HyperMixing against attention, eager and as CUDA graphs, with peak memory; and a per-kernel profile
with achieved bandwidth and the autotuner's chosen configs.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

from .gpu_run import _fatal_cuda_error, _short


# ------------------------------------------------------------------------------------ step: timings
def timing_shapes(dry: bool):
    from .config import SHAPES, Shape

    if dry:
        return {"tiny": Shape("tiny", 36, 144, 2)}
    return {k: SHAPES[k] for k in ("sb144", "sb256", "tf512")}


GRAPH_MAX_EAGER_MS = 25.0  # slower eager calls are not captured: launch overhead is noise there
CONTENDERS = ("hmx-triton", "hmx-cuda", "sdpa-flash", "sdpa-cudnn", "flash-attn")
FA3_STAND_IN = ("sdpa-cudnn: cuDNN's fused attention (Hopper kernels), the FlashAttention-3-class contender; "
                "sdpa-flash is FlashAttention-2 as built into PyTorch; flash-attn only where the package imports")


def _build_contender(name: str, shape, B: int, N: int, dtype, device):
    """(forward closure, leaves, note) for one contender at one point. Attention runs d_h padded to a
    multiple of 8 (what the kernels take; d_h 18 runs as 24), as noted in the row."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    if name.startswith("hmx-"):
        import hmx_kernels
        from hmx_kernels.dispatch import get_backend

        torch.manual_seed(0)
        layer = hmx_kernels.FusedHyperMixing(shape.d, shape.k, tied=False, num_heads=shape.H,
                                             backend=name[4:]).to(device=device, dtype=dtype)
        x = torch.randn(B, N, shape.d, generator=g, device=device).to(dtype).requires_grad_(True)
        # the backend's own reasons only (gpu_checks.backend_refusal: no probe of other backends)
        problem = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(),
                                           *layer.hyper.w2_gen.tensors(), layer.layer_norm.weight,
                                           layer.layer_norm.bias, variant="speechbrain")
        why = get_backend(name[4:]).not_supported_reasons(problem)
        if why:
            raise hmx_kernels.BackendNotSupportedError(f"backend {name[4:]!r} cannot run this call: " + "; ".join(why))
        return (lambda: layer(x, x, x)[0]), [x] + list(layer.parameters()), {}
    dh = -(-shape.d_h // 8) * 8
    note = {"d_h_run": dh}
    if name == "flash-attn":
        from flash_attn import flash_attn_func  # ImportError -> skipped row

        q, k, v = (torch.randn(B, N, shape.H, dh, generator=g, device=device).to(dtype).requires_grad_(True)
                   for _ in range(3))
        return (lambda: flash_attn_func(q, k, v)), [q, k, v], note
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    q, k, v = (torch.randn(B, shape.H, N, dh, generator=g, device=device).to(dtype).requires_grad_(True)
               for _ in range(3))

    def fwd():
        with sdpa_kernel([which]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fwd, [q, k, v], note


def _percentiles(samples: List[float]) -> dict:
    s = sorted(samples)
    mid = s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])
    return {"ms": mid * 1e3, "p20_ms": s[int(0.2 * (len(s) - 1))] * 1e3, "p80_ms": s[int(0.8 * (len(s) - 1) + 0.5)] * 1e3,
            "reps": len(s)}


def _time(fn: Callable[[], object], before: Callable[[], None], device, budget_s: float, max_reps: int,
          min_reps: int) -> dict:
    """Each call timed on its own (CUDA events; perf_counter on CPU), `before` untimed; at least
    min_reps calls, more while under budget_s, at most max_reps."""
    import torch

    samples: List[float] = []
    t_start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - t_start < budget_s):
        before()
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return _percentiles(samples)


def _capture(fn, before):
    """fn captured as a CUDA graph (two warm-up calls on a side stream first, as torch requires)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(s)
    before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def step_timings(ctx) -> None:
    import torch

    from hmx_kernels.triton.autotune import chosen_configs

    device, dry = ctx.device, ctx.dry
    dtype = torch.bfloat16 if not dry else torch.float32
    B, lengths = (1, (32,)) if dry else (4, (1024, 4096, 16384, 65536))
    tune_n = lengths[0] if dry else 16384
    shapes = timing_shapes(dry)
    budget, max_reps, min_reps = (0.0, 1, 1) if dry else (0.25, 20, 3)
    refused: Dict[tuple, str] = {}  # (contender, shape[, mode]) -> why; not tried again
    # the autotuner tunes once per (BLOCK_D, dtype, ...) at its first call: make that call at the
    # breakdown's length (B 4, N 16384), not at the sweep's first N, and for sb256 first: sb144 shares
    # its tuning (BLOCK_D 32), and the breakdown (sb256) then finds every candidate compiled
    order = sorted(shapes, key=lambda name: name != "sb256")
    for sname, shape in ((name, shapes[name]) for name in order):
        case_id = f"tune/{sname}"
        if case_id in ctx.rows.done:
            continue
        ctx.rows.start(case_id)
        t0 = time.time()
        try:
            fwd, _, _ = _build_contender("hmx-triton", shape, B, tune_n, dtype, device)
            fwd().backward(torch.ones(B, tune_n, shape.d, device=device, dtype=dtype))
            ctx.sync()
            ctx.rows.add({"id": case_id, "status": "ok", "shape": sname, "N": tune_n, "B": B,
                          "seconds": round(time.time() - t0, 2), "configs": chosen_configs()})
        except Exception as e:  # noqa: BLE001
            ctx.rows.add({"id": case_id, "status": "error", "error": _short(e)})
            if _fatal_cuda_error(e):
                raise SystemExit(3)
        fwd = None
    for N in lengths:
        for sname, shape in shapes.items():
            for name in CONTENDERS:
                _time_point(ctx, name, sname, shape, B, N, dtype, device, refused, budget, max_reps, min_reps)
                if device.type == "cuda":  # the point's tensors and graphs are gone with its frame
                    torch.cuda.empty_cache()


def _time_point(ctx, name, sname, shape, B, N, dtype, device, refused, budget, max_reps, min_reps) -> None:
    import torch

    import hmx_kernels

    ids = {(p, m): f"{sname}/N{N}/{name}/{p}/{m}" for p in ("fwd", "fwd_bwd") for m in ("eager", "graph")}
    if all(i in ctx.rows.done for i in ids.values()):
        return
    base = {"contender": name, "shape": sname, "d": shape.d, "k": shape.k, "H": shape.H, "d_h": shape.d_h,
            "B": B, "N": N, "dtype": str(dtype).replace("torch.", "")}
    if (name, sname) in refused:
        for (p, m), i in ids.items():
            if i not in ctx.rows.done:
                ctx.rows.add({"id": i, **base, "pass": p, "mode": m, "status": "unsupported", "reason": refused[(name, sname)]})
        return
    ctx.rows.start(ids[("fwd", "eager")])
    try:
        fwd, leaves, note = _build_contender(name, shape, B, N, dtype, device)
        out = fwd()
        grad = torch.randn(out.shape, device=device, dtype=out.dtype)
        del out
    except Exception as e:  # noqa: BLE001
        why = _short(e)
        refusal = ("No available kernel", "No viable backend", "not supported")
        status = "unsupported" if isinstance(e, (ImportError, hmx_kernels.BackendNotSupportedError)) or \
            any(r.lower() in why.lower() for r in refusal) else "error"
        if status == "unsupported":
            refused[(name, sname)] = why
        for (p, m), i in ids.items():
            if i not in ctx.rows.done:
                ctx.rows.add({"id": i, **base, "pass": p, "mode": m, "status": status, "reason": why})
        if _fatal_cuda_error(e):
            raise SystemExit(3)
        return
    base.update(note)

    def clear():
        for t in leaves:
            t.grad = None

    passes = {"fwd": fwd, "fwd_bwd": lambda: fwd().backward(grad)}
    eager_ms: Dict[str, float] = {}
    for p, fn in passes.items():
        for mode in ("eager", "graph"):
            case_id = ids[(p, mode)]
            if case_id in ctx.rows.done:
                continue
            ctx.rows.start(case_id)
            row = {"id": case_id, **base, "pass": p, "mode": mode}
            if mode == "graph" and device.type != "cuda":
                ctx.rows.add({**row, "status": "skipped", "reason": "CUDA graphs need a GPU"})
                continue
            if mode == "graph" and (name, sname, "graph") in refused:
                ctx.rows.add({**row, "status": "skipped", "reason": refused[(name, sname, "graph")]})
                continue
            if mode == "graph" and eager_ms.get(p, 0.0) > GRAPH_MAX_EAGER_MS:
                ctx.rows.add({**row, "status": "skipped", "reason": f"eager call {eager_ms[p]:.0f} ms: host "
                              f"overhead negligible (graphs are replayed below {GRAPH_MAX_EAGER_MS:.0f} ms)"})
                continue
            t0 = time.time()
            try:
                if mode == "eager":
                    clear()
                    fn()  # warm-up
                    ctx.sync()
                    peak = None
                    if device.type == "cuda":
                        clear()
                        torch.cuda.synchronize()
                        start = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        fn()
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() - start
                    res = _time(fn, clear, device, budget, max_reps, min_reps)
                    res["peak_mib"] = None if peak is None else round(peak / 2**20, 1)
                    eager_ms[p] = res["ms"]
                else:
                    graph = _capture(fn, clear)
                    res = _time(graph.replay, lambda: None, device, budget, max_reps, min_reps)
                    del graph
                ctx.rows.add({**row, "status": "ok", **res, "seconds": round(time.time() - t0, 2)})
            except Exception as e:  # noqa: BLE001
                why = _short(e)
                if mode == "graph":
                    refused[(name, sname, "graph")] = f"capture failed earlier: {why}"
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001
                        pass
                ctx.rows.add({**row, "status": "error", "error": why, "seconds": round(time.time() - t0, 2)})
                if _fatal_cuda_error(e):
                    raise SystemExit(3)


# ------------------------------------------------------------------------------------ step: breakdown
KERNEL_PASS = {"hmx_fwd_kernel_state": ("fwd state", "bwd state"), "hmx_fwd_kernel_mix": ("fwd mix",),
               "hmx_bwd_kernel_query": ("bwd query",), "hmx_bwd_kernel_key": ("bwd key",),
               "hmx_bwd_kernel_tsum": ("bwd tsum",),
               # the layer's LayerNorm-fused passes: the same byte model as the per-head passes
               # (it leaves out their 8 bytes of row statistics per token)
               "hmx_fwd_kernel_mix_ln": ("fwd mix",), "hmx_bwd_kernel_query_ln": ("bwd query",)}


def step_breakdown(ctx) -> None:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from hmx_kernels.triton.autotune import chosen_configs

    from tools.kernels import token_bytes

    device, dry = ctx.device, ctx.dry
    shape = timing_shapes(dry)["tiny" if dry else "sb256"]
    B, N, iters, warm = (1, 32, 1, 0) if dry else (4, 16384, 3, 2)
    dtype = torch.bfloat16 if not dry else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    model = token_bytes(shape.d_h, shape.H, elem)
    for backend in ("triton", "cuda"):
        total_id = f"{backend}/total"
        if total_id in ctx.rows.done:
            continue
        ctx.rows.start(total_id)
        base = {"backend": backend, "shape": shape.name, "B": B, "N": N, "dtype": str(dtype).replace("torch.", "")}
        try:
            fwd, leaves, _ = _build_contender(f"hmx-{backend}", shape, B, N, dtype, device)
            grad = torch.randn(B, N, shape.d, device=device, dtype=dtype)

            def step():
                for t in leaves:
                    t.grad = None
                fwd().backward(grad)

            for _ in range(warm):
                step()
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            ctx.sync()
            wall_us = (time.perf_counter() - t0) / iters * 1e6
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(iters):
                    step()
                ctx.sync()
        except Exception as e:  # noqa: BLE001
            why = _short(e)
            status = "unsupported" if "cannot run this call" in why or "not supported" in why.lower() else "error"
            ctx.rows.add({"id": total_id, **base, "status": status, "reason": why})
            if _fatal_cuda_error(e):
                raise SystemExit(3)
            continue
        per_kernel: Dict[str, List[float]] = {}
        for e in prof.events():  # GPU: the kernels (and copies) with their device time; CPU: ops, self time
            if device.type == "cuda" and e.device_type != DeviceType.CUDA:
                continue
            t_us = e.time_range.elapsed_us() if device.type == "cuda" else e.self_cpu_time_total
            acc = per_kernel.setdefault(e.name, [0.0, 0])
            acc[0] += float(t_us)
            acc[1] += 1
        total = sum(v[0] for v in per_kernel.values()) / iters
        ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
        for name, (t_us, calls) in ranked[:40]:
            passes = KERNEL_PASS.get(name, ())
            nbytes = B * N * sum(model.get(p, 0.0) for p in passes) if passes else None
            us = t_us / iters
            ctx.rows.add({"id": f"{backend}/kernel/{name}", **base, "status": "ok", "kernel": name,
                          "time": "gpu" if device.type == "cuda" else "cpu self",
                          "us_per_iter": round(us, 2), "calls_per_iter": calls / iters,
                          "share": round(us / total, 4) if total else None,
                          "model_bytes": nbytes, "gbps": round(nbytes / us / 1e3, 1) if nbytes and us else None})
        ctx.rows.add({"id": total_id, **base, "status": "ok", "kernels_per_iter": sum(v[1] for v in per_kernel.values()) / iters,
                      "kernel_us_per_iter": round(total, 1), "wall_us_per_iter": round(wall_us, 1),
                      "byte_model": "tools.kernels.token_bytes (the Triton kernels' own byte count)"})
        fwd = leaves = grad = prof = None  # free this backend's tensors before the next one
    if "triton/configs" not in ctx.rows.done:
        ctx.rows.start("triton/configs")
        ctx.rows.add({"id": "triton/configs", "status": "ok", "configs": chosen_configs()})
