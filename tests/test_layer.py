"""FusedHyperMixing as a layer: call styles, return values, dtypes, checkpoints, dispatch, install."""
import os
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


@pytest.mark.slow
def test_pip_install_into_new_venv_and_import_from_elsewhere(tmp_path):
    """`pip install .` (not editable) into a fresh venv; torch is borrowed from this environment
    through a .pth file (its .pth files, including our editable install, are not processed)."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    Path(site, "borrowed_torch.pth").write_text(torch_site + "\n")
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    script = textwrap.dedent("""
        import pathlib, torch, hmx_kernels
        from hmx_kernels import FusedHyperMixing
        pkg = pathlib.Path(hmx_kernels.__file__).parent
        print(pkg)
        layer = FusedHyperMixing(16, 32, num_heads=2)
        x = torch.randn(2, 5, 16)
        out, attn = layer(x, x, x)
        assert out.shape == (2, 5, 16) and attn is None
        print(sorted(str(p.relative_to(pkg / "csrc")) for p in (pkg / "csrc").rglob("*") if p.is_file() and "__pycache__" not in str(p)))
    """)
    run = subprocess.run([str(py), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr
    pkg_line, files_line = run.stdout.strip().splitlines()[-2:]
    assert pkg_line.startswith(site), f"imported from {pkg_line}, not the new venv {site}"
    installed = set(eval(files_line))
    shipped = {str(p.relative_to(REPO / "csrc")) for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert shipped and shipped <= installed, f"missing from the installed package: {sorted(shipped - installed)}"


def test_docstring_examples_run():
    import doctest

    import hmx_kernels.functional
    import hmx_kernels.streaming

    for module in (hmx_kernels.functional, hmx_kernels.streaming):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.attempted > 0 and result.failed == 0, module.__name__
