"""Installation facts: the declared torch floor, the triton backend's probe of what torch offers,
the licence and typing marker that ship with the package."""
import re
from pathlib import Path

import pytest
import torch

import hmx_kernels
from hmx_kernels.dispatch import BackendNotSupportedError

ROOT = Path(__file__).resolve().parent.parent


def _small_call():
    g = torch.Generator().manual_seed(0)
    H, d_h, k_h = 2, 4, 6
    x = torch.randn(1, 5, H * d_h, generator=g)
    w = [torch.randn(H, d_h, d_h, generator=g), torch.randn(H, d_h, generator=g),
         torch.randn(H, k_h, d_h, generator=g), torch.randn(H, k_h, generator=g)]
    return (x, None, None, *w, None, None, None, None, torch.ones(H * d_h), torch.zeros(H * d_h))


def test_triton_backend_reports_an_old_torch_and_auto_moves_on(monkeypatch):
    """On a torch without torch.library.wrap_triton / triton_op (before 2.6) the triton backend
    says so, is refused by name with that reason, and `auto` picks another backend."""
    from hmx_kernels.triton import backend as tb

    assert tb.torch_missing_for_triton() == ""  # the torch here has everything
    monkeypatch.delattr(torch.library, "wrap_triton")
    monkeypatch.setattr(tb, "_AVAILABLE", {})
    why = tb.torch_missing_for_triton()
    assert "torch.library.wrap_triton" in why and f"torch >= {tb.TORCH_FOR_TRITON}" in why
    args = _small_call()
    problem = hmx_kernels.check_inputs(*args, variant="speechbrain")
    assert any("torch >= 2.6" in r for r in hmx_kernels.backend_reasons(problem)["triton"])
    with pytest.raises(BackendNotSupportedError, match=r"wrap_triton.*torch >= 2\.6"):
        hmx_kernels.hyper_mixing(*args, variant="speechbrain", backend="triton")
    assert hmx_kernels.select_backend("auto", problem).name != "triton"
    out = hmx_kernels.hyper_mixing(*args, variant="speechbrain", backend="auto")
    ref = hmx_kernels.hyper_mixing(*args, variant="speechbrain", backend="reference")
    assert torch.allclose(out, ref, atol=1e-5)


def test_torch_probe_names_a_missing_device_property():
    """A CUDA build of torch whose device properties lack shared_memory_per_block_optin (before 2.6)."""
    from types import SimpleNamespace

    from hmx_kernels.triton.backend import torch_missing_for_triton

    fake = SimpleNamespace(__version__="2.5.1", library=SimpleNamespace(wrap_triton=1, triton_op=1),
                           _C=SimpleNamespace(_CudaDeviceProperties=type("Props", (), {})))
    assert "shared_memory_per_block_optin" in torch_missing_for_triton(fake)
    fake.library = SimpleNamespace()
    assert "torch 2.5.1 lacks torch.library.wrap_triton, torch.library.triton_op" in torch_missing_for_triton(fake)


def _setup_torch_floor():
    text = (ROOT / "setup.py").read_text()
    m = re.search(r'"torch>=([0-9.]+),<3"', text)
    assert m, "setup.py declares no torch floor"
    return m.group(1)


def test_declared_torch_floor_has_what_import_needs():
    """setup.py's floor is the release that brought the APIs `import hmx_kernels` calls
    (torch.library.custom_op with register_fake / register_autograd: 2.4), and README's versions
    table states the same floors."""
    floor = _setup_torch_floor()
    assert tuple(int(v) for v in floor.split(".")) >= (2, 4)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"torch >= {floor}" in readme
    from hmx_kernels.triton.backend import TORCH_FOR_TRITON

    assert f"torch >= {TORCH_FOR_TRITON}" in readme


def test_license_and_typing_marker_ship():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "hmx_kernels contributors" in licence
    assert 'license="MIT"' in (ROOT / "setup.py").read_text()
    assert (ROOT / "hmx_kernels" / "py.typed").is_file()
    assert re.search(r'"hmx_kernels":\s*\[[^\]]*"py\.typed"', (ROOT / "setup.py").read_text())
