"""Launches and host synchronisations of the Triton backend's layer, counted without a GPU.

A TorchDispatchMode records every aten op of a forward+backward of `FusedHyperMixing` on the
triton backend (CPU tensors under TRITON_INTERPRET=1), stepping into the hmx ops' own Python
implementations so that the ops they issue are seen too; a wrapper on the launcher
(`function._launch`) counts the Triton launches (the interpreter's own tensor work during a
launch is not recorded: on a GPU it does not exist).

- No host sync in plain (dense) or chunked mixing: no `_local_scalar_dense` / `item` / `nonzero`
  / data-dependent-shape op anywhere in the step, so the step can be captured in a CUDA graph.
  Packed sequences read cu_seqlens once per call to build their piece table (documented there).
- Launch count of the dense layer: the per-(b, h) finalize work runs in one Triton kernel per
  step (launch.py, finalize.py), so the op impls issue no aten kernel at all; the bound
  below is the whole step, the layer's LayerNorm and autograd's gradient sums included.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from hmx_kernels import FusedHyperMixing

triton = pytest.importorskip("triton", reason="triton is not installed")
from hmx_kernels.triton import launch as tfn  # noqa: E402  (after TRITON_INTERPRET is set)

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                       reason="counts the ops on CPU tensors under the Triton interpreter")

# aten ops that launch no kernel: views, allocations without a fill, metadata, and `to`, whose
# copy (if any) is recorded as its own op
NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "reshape", "slice", "select", "unsqueeze", "squeeze", "transpose", "permute", "t", "expand",
    "alias", "detach", "as_strided", "to", "lift_fresh", "_reshape_alias",
}
# ops that read a value on the host or whose output shape depends on values
SYNCS = {
    "_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
    "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "bincount",
    "histc", "allclose", "_assert_async", "argwhere",
}


def _impls():
    impls = {}
    for ops in (tfn.TRITON_OPS, tfn.TRITON_BLOCK_OPS, tfn.TRITON_OPS.layer):
        for op in (ops.fwd, ops.bwd):
            impls[op._qualname.split("::")[1]] = op._init_fn
    return impls


class _Recorder(TorchDispatchMode):
    """aten op names in call order (phase-tagged), and Triton launches per phase."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.phase = [], [], "fwd"
        self.impls = _impls()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "hmx_kernels" and name in self.impls:
            with self:  # into the op's own implementation
                return self.impls[name](*args, **kwargs)
        self.ops.append((self.phase, name))
        return func(*args, **kwargs)

    def kernels(self, phase):
        return [n for p, n in self.ops if p == phase and n not in NO_KERNEL]

    def syncs(self):
        return [n for _, n in self.ops if n in SYNCS]


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    launch = tfn._launch

    def counting_launch(kernel, grid, *args, **kwargs):
        fn = kernel
        while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
            fn = fn.fn
        rec.launches.append((rec.phase, fn.__name__))
        with _disable_current_modes():  # the interpreter's tensor work is not a launch
            return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tfn, "_launch", counting_launch)
    return rec


def _step(rec, layer, x, *extra, **kw):
    """One recorded forward+backward (after an unrecorded warm-up call)."""
    out = layer(x, *extra, **kw)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)
    out.backward(grad)
    rec.launches.clear()
    layer.zero_grad(set_to_none=True)  # the recorded step writes fresh .grad tensors (no accumulation)
    for t in (x, *extra):
        if isinstance(t, torch.Tensor):
            t.grad = None
    with rec:
        rec.phase = "fwd"
        out = layer(x, *extra, **kw)
        out = out[0] if isinstance(out, tuple) else out
        rec.phase = "bwd"
        out.backward(grad)
    return rec


def _speechbrain(**mode):
    torch.manual_seed(0)
    return FusedHyperMixing(36, 144, num_heads=2, backend="triton", **mode)


@needs_interpreter
@pytest.mark.parametrize("mode", [{}, dict(chunk_size=4), dict(chunk_size=3, left_context_chunks=1),
                                  dict(causal=True)], ids=["dense", "chunk4", "chunk3_L1", "causal"])
def test_no_host_sync_in_dense_and_chunked_mixing(recorder, mode):
    x = torch.randn(2, 11, 36, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 7:] = True
    rec = _step(recorder, _speechbrain(**mode), x, None, None, key_padding_mask=mask)
    assert len(rec.launches) >= 4, "the Triton kernels were not reached"
    assert rec.syncs() == [], f"host synchronisations in a {mode or 'dense'} step: {rec.syncs()}"


@needs_interpreter
def test_no_host_sync_in_cross_mixing_with_masks(recorder):
    torch.manual_seed(0)
    layer = FusedHyperMixing(32, 128, num_heads=2, variant="idiap", backend="triton", hypernetwork_bias=True)
    q = torch.randn(2, 5, 32, requires_grad=True)
    kv = torch.randn(2, 9, 32, requires_grad=True)
    qmask = torch.zeros(2, 5, dtype=torch.bool)
    qmask[0, 4:] = True
    kmask = torch.zeros(2, 9, dtype=torch.bool)
    kmask[1, 6:] = True
    rec = _step(recorder, layer, q, kv, kv, qmask, kmask)
    assert rec.syncs() == []


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launches_per_step_of_the_dense_layer(recorder, dtype):
    """Forward: state pass, finalize, mix pass with the LayerNorm (the output in its dtype).
    Backward (C, c0 saved by the forward): query pass with the LayerNorm backward, finalize (dP,
    R), key pass (the one token gradient dq + dk + dv of self-mixing, in its dtype), finalize (the
    weight and LayerNorm gradients in one fp32 buffer), then one cast of that buffer for half
    parameters: 7 launches (fp32) or 8 (bf16). Counted the same way before the finalize kernels:
    70; before the LayerNorm fusion: 12 (fp32), 30 (bf16, with the casts)."""
    x = torch.randn(2, 11, 36, dtype=dtype, requires_grad=True)
    rec = _step(recorder, _speechbrain().to(dtype), x, None, None)
    names = [n for _, n in rec.launches]
    assert [n for p, n in rec.launches if p == "fwd"] == ["hmx_fwd_kernel_state", "hmx_fwd_finalize",
                                                          "hmx_fwd_kernel_mix_ln"], names
    assert [n for p, n in rec.launches if p == "bwd"] == ["hmx_bwd_kernel_query_ln", "hmx_bwd_finalize_mid",
                                                          "hmx_bwd_kernel_key", "hmx_bwd_finalize_weights"], names
    fwd, bwd = rec.kernels("fwd"), rec.kernels("bwd")
    assert fwd == [], fwd
    assert bwd == ([] if dtype == torch.float32 else ["_to_copy"]), bwd
    total = len(rec.launches) + len(fwd) + len(bwd)
    assert total == (7 if dtype == torch.float32 else 8), total


@pytest.mark.parametrize("rows,length,sms,expected", [
    (8, 16384, 132, 33),  # B 1, H 8 on an H100: about 2 programs per SM
    (32, 16384, 132, 9),
    (512, 16384, 132, 1),  # enough rows to fill the GPU: one chunk, the fewest partials
    (8, 1000, 132, 8),  # short: at least CHUNK_MIN tokens per chunk
    (1, 1 << 20, 132, 64),  # never more than MAX_CHUNKS
])
def test_gpu_chunk_count_follows_the_sm_count(monkeypatch, rows, length, sms, expected):
    """The plain-mixing chunk count on a GPU (`_plain_chunking`): the partial buffers, and so the
    finalize kernels' reads, shrink when B*H alone fills the device. The chunks cover the
    sequence exactly: none empty, none past the end."""
    from types import SimpleNamespace

    monkeypatch.setattr(tfn, "INTERPRETED_KERNELS", False)
    monkeypatch.setattr(tfn, "_sm_count", lambda device: sms)
    s = SimpleNamespace(B=1, H=rows, dummy=SimpleNamespace(device=torch.device("cuda", 0)))
    n_chunks, chunk_len = tfn._plain_chunking(s, length)
    assert n_chunks == expected
    # the all-heads passes count B program rows: the same rule with rows given explicitly
    assert tfn._plain_chunking(SimpleNamespace(B=rows, H=1, dummy=s.dummy), length, rows=rows) == (n_chunks, chunk_len)
    assert tfn._plain_chunking(SimpleNamespace(B=1, H=1, dummy=s.dummy), length, rows=rows) == (n_chunks, chunk_len)
    assert n_chunks * chunk_len >= length and (n_chunks - 1) * chunk_len < length
    s.dummy = SimpleNamespace(device=torch.device("cpu"))  # elsewhere: the fixed count
    assert tfn._plain_chunking(s, length) == tfn._chunking(length)
