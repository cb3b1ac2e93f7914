"""FusedHyperMixing as a layer: call styles, return values, dtypes, checkpoints, dispatch, install."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hmx_kernels
from hmx_kernels import FusedHyperMixing
from hmx_kernels.dispatch import Backend, BackendNotSupportedError, _REGISTRY, register_backend

REPO = Path(__file__).resolve().parents[1]


def test_speechbrain_call_returns_out_and_none():
    layer = FusedHyperMixing(16, 32, num_heads=2)
    x = torch.randn(2, 5, 16)
    out, attn = layer(x, x, x, attn_mask=None, key_padding_mask=None, return_attn_weights=True, pos_embs=None)
    assert out.shape == x.shape and attn is None


def test_speechbrain_variant_warns_when_key_is_not_query():
    layer = FusedHyperMixing(16, 32, num_heads=2)
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match="ignores key and value"):
        out1, _ = layer(x, torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    out2, _ = layer(x, x, x)
    assert torch.equal(out1, out2)  # speechbrain semantics: self-mixing of the query


def test_padded_rows_and_mask_positional_order():
    layer = FusedHyperMixing(16, 32, num_heads=2)
    x = torch.randn(2, 6, 16)
    m = torch.zeros(2, 6, dtype=torch.bool)
    m[1, 4:] = True
    a, _ = layer(x, x, x, None, m)  # speechbrain positional: attn_mask, key_padding_mask
    b, _ = layer(x, x, x, key_padding_mask=m)
    assert torch.equal(a, b)
    assert torch.allclose(a[1, 4:], layer.layer_norm.bias.detach().expand(2, 16))


def test_pe_buffer_of_other_length_loads_and_no_length_cap():
    small = FusedHyperMixing(16, 32, num_heads=2, max_length=10)
    big = FusedHyperMixing(16, 32, num_heads=2, max_length=50)
    big.load_state_dict(small.state_dict(), strict=True)
    assert big.positional_encoding.pe.shape == (1, 10, 16)
    out, _ = big(torch.randn(1, 77, 16), None, None)  # longer than both tables
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_layer_in_other_dtypes(dtype):
    layer = FusedHyperMixing(16, 32, num_heads=2).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    out, _ = layer(x, x, x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert all(p.grad is not None and p.grad.dtype == dtype for p in layer.parameters())


def test_non_contiguous_inputs_match_contiguous():
    layer = FusedHyperMixing(16, 32, num_heads=2, variant="idiap")
    q = torch.randn(5, 2, 16).transpose(0, 1)  # [2, 5, 16], not contiguous
    kv = torch.randn(2, 16, 7).transpose(1, 2)
    assert not q.is_contiguous() and not kv.is_contiguous()
    assert torch.equal(layer(q, kv, kv), layer(q.contiguous(), kv.contiguous(), kv.contiguous()))


def test_in_a_plain_pytorch_block_and_training_step():
    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.mix = FusedHyperMixing(d, 4 * d, num_heads=4)
            self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x, pad):
            h = self.norm(x)
            x = x + self.mix(h, h, h, key_padding_mask=pad)[0]
            return x + self.ffn(x)

    torch.manual_seed(0)
    block = Block(32)
    opt = torch.optim.SGD(block.parameters(), lr=1e-2)
    x = torch.randn(3, 11, 32)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[2, 7:] = True
    before = block.mix.hyper.w1_gen.fc1_weights.detach().clone()
    loss = block(x, pad).pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, block.mix.hyper.w1_gen.fc1_weights)


def test_tied_layer_shares_one_generator():
    layer = FusedHyperMixing(16, 32, num_heads=2, tied=True)
    assert layer.hyper.w2_gen is layer.hyper.w1_gen
    assert len(list(layer.parameters())) == 6
    assert "hyper.w2_gen.fc1_weights" in layer.state_dict()


def test_registered_backends_and_clear_dispatch_errors():
    assert "reference" in hmx_kernels.registered_backends()
    layer = FusedHyperMixing(16, 32, num_heads=2, backend="reference")
    x = torch.randn(1, 3, 16)
    assert torch.equal(layer(x, x, x)[0], FusedHyperMixing.forward(layer, x, x, x)[0])

    refusing = Backend("refuses_everything", "test backend", forward=lambda p: None,
                       extra_reasons=lambda p: ["never runs"])
    register_backend(refusing)
    try:
        problem = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(), variant="speechbrain",
                                           use_layer_norm=False)
        with pytest.raises(BackendNotSupportedError, match="refuses_everything.*never runs"):
            hmx_kernels.select_backend("refuses_everything", problem)
        assert hmx_kernels.backend_reasons(problem)["refuses_everything"] == ["never runs"]
        assert hmx_kernels.backend_reasons(problem)["reference"] == []
    finally:
        _REGISTRY.pop("refuses_everything")


INSTALLED = textwrap.dedent(r"""
    import importlib.metadata as md, json, os, pathlib, warnings
    import torch, hmx_kernels
    from hmx_kernels import FusedHyperMixing
    from hmx_kernels.cpp import build
    pkg = pathlib.Path(hmx_kernels.__file__).parent
    try:
        md.distribution("triton")
        triton_installed = True
    except md.PackageNotFoundError:
        triton_installed = False
    layer = FusedHyperMixing(16, 32, num_heads=2)
    x = torch.randn(2, 5, 16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, attn = layer(x, x, x)
        assert out.shape == (2, 5, 16) and attn is None
        w = [torch.randn(2, 4, 4), torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 6)]
        ln = [torch.ones(8), torch.zeros(8)]
        x = torch.randn(2, 5, 8)
        cpu = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="cpu")
    ref = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="reference")
    try:
        hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="triton")
        triton_error = None
    except hmx_kernels.BackendNotSupportedError as e:
        triton_error = str(e)
    print("RESULT " + json.dumps(dict(
        build.LOAD_INFO, pkg=str(pkg), missing=build._missing_toolchain(), triton_installed=triton_installed,
        triton_error=triton_error, requires=md.distribution("hmx_kernels").requires or [],
        max_err=(cpu - ref).abs().max().item(), warnings=[str(r.message) for r in rec],
        prebuilt=sorted(str(p.relative_to(pkg)) for p in (pkg / "_prebuilt").rglob("*")),
        csrc=sorted(str(p.relative_to(pkg / "csrc")) for p in (pkg / "csrc").rglob("*")
                    if p.is_file() and "__pycache__" not in str(p)))))
""")


@pytest.mark.slow
def test_pip_install_into_new_venv_and_import_from_elsewhere(tmp_path, prebuilt_cache):
    """`pip install .` (not editable) into a fresh venv that borrows torch and the rest from this
    environment, but not triton, through a .pth file (its .pth files, including our editable
    install, are not processed). Checked where no compiler and no ninja exist (PATH is an empty
    folder, the venv has no ninja), each install run from another folder:

    1. `HMX_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .` ships the extension in
       hmx_kernels/_prebuilt (taken from the cache `prebuilt_cache` filled: same key, so the
       ahead-of-time build reuses it instead of compiling), and the installed package runs the
       "cpu" backend from there with an empty cache.
    2. `pip install .` afterwards (no variable) ships no prebuilt build (nothing stale from 1), asks
       for triton only in extras, and works without triton: the "triton" backend says "triton is
       not installed", the "cpu" backend runs from a cache.
    """
    from envtools import clean_env, make_venv, run_json

    # the source tree as a clean checkout has it: no build/ folder, no _prebuilt builds, no venv
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "_prebuilt", ".pytest_cache", ".benchmarks"))
    py = make_venv(tmp_path / "venv", exclude=("triton",), with_pip=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    empty = tmp_path / "empty_path"
    empty.mkdir()
    name = prebuilt_cache["folder"].name
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall", str(src)]

    res = subprocess.run(pip, capture_output=True, text=True, cwd=tmp_path, env=clean_env(
        HMX_KERNELS_BUILD_EXT="1", HMX_KERNELS_CACHE=prebuilt_cache["cache"], HMX_KERNELS_NO_CUDA="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    shipped_info = Path(site, "hmx_kernels", "_prebuilt", name, "BUILD_INFO").read_text()
    assert shipped_info == (prebuilt_cache["folder"] / "BUILD_INFO").read_text()  # copied, not compiled again
    info, _ = run_json(py, INSTALLED, clean_env(PATH=empty, HMX_KERNELS_CACHE=tmp_path / "no_cache"), tmp_path)
    assert info["pkg"].startswith(site), f"imported from {info['pkg']}, not the new venv {site}"
    assert len(info["missing"]) == 2, info  # no compiler, no ninja
    assert info["source"] == "prebuilt" and info["path"] == str(Path(info["pkg"], "_prebuilt", name)), info
    assert info["max_err"] < 1e-4 and not info["warnings"], info
    assert not (tmp_path / "no_cache").exists()

    res = subprocess.run(pip, capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert res.returncode == 0, res.stdout + res.stderr
    info, _ = run_json(py, INSTALLED, clean_env(PATH=empty, HMX_KERNELS_CACHE=prebuilt_cache["cache"],
                                                TRITON_INTERPRET="1"), tmp_path)
    assert info["prebuilt"] == [], info["prebuilt"]  # install compiles and ships nothing by default
    assert not info["triton_installed"], "triton got into the fresh environment"
    triton_reqs = [r for r in info["requires"] if r.startswith("triton")]
    assert triton_reqs and all("extra ==" in r for r in triton_reqs), info["requires"]
    assert "backend 'triton' cannot run this call: triton is not installed" in info["triton_error"], info
    assert info["source"] == "cache" and info["max_err"] < 1e-4 and not info["warnings"], info
    shipped = {str(p.relative_to(REPO / "csrc")) for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert shipped and shipped <= set(info["csrc"]), f"missing from the installed package: {shipped - set(info['csrc'])}"


def test_docstring_examples_run():
    import doctest

    import hmx_kernels.functional
    import hmx_kernels.streaming

    for module in (hmx_kernels.functional, hmx_kernels.streaming):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_an_argument_given_positionally_and_by_keyword_is_a_type_error():
    """layer(x, x, x, None, mask, key_padding_mask=None) gives key_padding_mask twice: a TypeError,
    as Python raises for a plain signature (the positional mask used to win silently, because an
    explicit None keyword looked like no keyword)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    layer = FusedHyperMixing(8, 8, num_heads=2)
    for call in (lambda: layer(x, x, x, None, pad, key_padding_mask=None),
                 lambda: layer(x, x, x, None, attn_mask=None),
                 lambda: layer(x, x, x, None, pad, True, None, pos_embs=None),
                 lambda: layer(x, x, x, None, pad, False, return_attn_weights=False)):
        with pytest.raises(TypeError, match="multiple values for argument"):
            call()
    # given once, either way, the same
    assert torch.equal(layer(x, x, x, None, pad)[0], layer(x, x, x, key_padding_mask=pad)[0])
    assert torch.equal(layer(x, x, x, None, None, True, None)[0], layer(x)[0])
    idiap = FusedHyperMixing(8, 8, num_heads=2, variant="idiap")
    for call in (lambda: idiap(x, x, x, pad, query_padding_mask=None),
                 lambda: idiap(x, x, x, None, pad, key_padding_mask=None)):
        with pytest.raises(TypeError, match="multiple values for argument"):
            call()
    assert torch.equal(idiap(x, x, x, pad, pad), idiap(x, x, x, query_padding_mask=pad, key_padding_mask=pad))
