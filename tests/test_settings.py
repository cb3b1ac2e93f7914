"""The environment variables of hmx_kernels.config: every setting takes its documented values and
refuses anything else with its name and the allowed values; TRITON_INTERPRET is read exactly as
the installed triton reads it; the import needs no home directory; the README table lists every
variable config.py reads."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hmx_kernels import config
from hmx_kernels.config import SettingError, Settings

REPO = Path(__file__).resolve().parent.parent

# variable -> (accepted value, the Settings field and what it reads as), refused values
ACCEPTED = {
    "HMX_KERNELS_NO_CUDA": [("0", "no_cuda", False), ("1", "no_cuda", True), ("", "no_cuda", False)],
    "HMX_KERNELS_VERBOSE": [("0", "verbose", False), ("1", "verbose", True)],
    "HMX_KERNELS_POISON": [("0", "poison", False), ("1", "poison", True)],
    "HMX_KERNELS_CUDA_NO_MMA": [("0", "allow_mma", True), ("1", "allow_mma", False), ("", "allow_mma", True)],
    "HMX_KERNELS_PE_CACHE_MB": [("64", "pe_cache_bytes", 64 << 20), ("0", "pe_cache_bytes", 0),
                                ("0.5", "pe_cache_bytes", 1 << 19), ("1e3", "pe_cache_bytes", 1000 << 20),
                                ("", "pe_cache_bytes", 64 << 20)],
    "HMX_KERNELS_CUDA_ARCH": [("8.0;9.0", "cuda_arch", "8.0;9.0"), ("9.0a", "cuda_arch", "9.0a"),
                              ("8.0, 8.6+PTX", "cuda_arch", "8.0, 8.6+PTX"), ("", "cuda_arch", None)],
    "HMX_KERNELS_CACHE": [("/tmp/somewhere", "cache_dir", Path("/tmp/somewhere")), ("", "cache_env", None)],
    "CXX": [("clang++", "cxx", "clang++"), ("", "cxx", "c++")],
    "CUDA_HOME": [("/opt/cuda", "cuda_home", "/opt/cuda")],
}
REFUSED = {
    "HMX_KERNELS_NO_CUDA": ["2", "yes", "true", " 1"],
    "HMX_KERNELS_VERBOSE": ["on", "-1"],
    "HMX_KERNELS_POISON": ["True", "1.0"],
    "HMX_KERNELS_CUDA_NO_MMA": ["no", "00"],
    "HMX_KERNELS_PE_CACHE_MB": ["abc", "nan", "inf", "-inf", "-1", "-0.5", "1MB"],
    "HMX_KERNELS_CUDA_ARCH": ["sm_80", "8", "ampere", ";"],
}


def _settings(monkeypatch, **env) -> Settings:
    for name in list(ACCEPTED) + ["CUDA_PATH", "TRITON_INTERPRET"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_every_setting_takes_its_documented_values(monkeypatch, name):
    for value, attribute, expected in ACCEPTED[name]:
        assert getattr(_settings(monkeypatch, **{name: value}), attribute) == expected, (name, value)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_setting_refuses_other_values_naming_itself(monkeypatch, name):
    for value in REFUSED[name]:
        with pytest.raises(SettingError) as info:
            _settings(monkeypatch, **{name: value})
        message = str(info.value)
        assert name in message and repr(value) in message and "unset for the default" in message, message


def test_a_bad_value_stops_the_import_with_the_variable_named():
    """`import hmx_kernels` with HMX_KERNELS_PE_CACHE_MB=abc: a SettingError naming the variable and
    the allowed values (it was a bare "could not convert string to float"; -1 was taken)."""
    for value in ("abc", "-1"):
        env = {**os.environ, "HMX_KERNELS_PE_CACHE_MB": value, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", "import hmx_kernels"], env=env, capture_output=True,
                              text=True, cwd=str(REPO), timeout=300)
        assert proc.returncode != 0
        assert "SettingError" in proc.stderr and "HMX_KERNELS_PE_CACHE_MB" in proc.stderr, proc.stderr
        assert "finite number of MiB >= 0" in proc.stderr, proc.stderr


TRITON_VALUES = ["0", "1", "true", "TRUE", "True", "on", "ON", "oN", "yes", "YES", "y", "Y", "no", "off", "false",
                 "", " 1", "1 ", "abc", "2", "t", "enable", "01", "1.0", "+1", "\u0131", "K", "\u212a"]


def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch):
    """hmx_kernels and the installed triton agree on TRITON_INTERPRET for every value tried ("off",
    "false" and "no" were on for hmx_kernels and off for triton), and unset."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    for value in TRITON_VALUES:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        ours = config.triton_interpret_from_env()
        assert ours == bool(libtriton.getenv_bool("TRITON_INTERPRET", False)), repr(value)
        assert _settings(monkeypatch, TRITON_INTERPRET=value).triton_interpret == ours
    monkeypatch.delenv("TRITON_INTERPRET")
    assert config.triton_interpret_from_env() is False
    assert bool(libtriton.getenv_bool("TRITON_INTERPRET", False)) is False


def test_triton_interpret_is_read_in_one_place():
    """Only hmx_kernels/config.py reads the variable (the Triton backend asks config)."""
    readers = [p.relative_to(REPO).as_posix() for p in (REPO / "hmx_kernels").rglob("*.py")
               if re.search(r"environ[^\n]*TRITON_INTERPRET", p.read_text())]
    assert readers == ["hmx_kernels/config.py"], readers


NO_HOME = r"""
import json, os, pwd
os.environ.pop("HOME", None)
def no_entry(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = no_entry  # a uid without a passwd entry (a container run with --user)
import pathlib
try:
    pathlib.Path.home()
    raise SystemExit("the test set-up failed: a home directory was found")
except RuntimeError:
    pass
import torch, warnings
import hmx_kernels  # must not need a home directory
from hmx_kernels.cpp import build
x = torch.randn(1, 5, 8)
layer = hmx_kernels.FusedHyperMixing(8, 8, num_heads=2, backend="reference")
ok = bool(torch.isfinite(layer(x)[0]).all())
try:
    build.cache_dir()
    err = ""
except build.ExtensionBuildError as e:
    err = str(e)
with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    reasons = hmx_kernels.backend_reasons(hmx_kernels.check_inputs(x, None, None, *layer._weights()))
from hmx_kernels.build import main
rc = main(["--clear-failed"])  # the command line says so too, without a traceback
print("RESULT " + json.dumps({"ok": ok, "err": err, "cpu": reasons["cpu"], "rc": rc}))
"""


def test_import_needs_no_home_directory(tmp_path):
    """HOME unset and no passwd entry: the import and the reference work; the cache folder is
    resolved on first use and its error suggests HMX_KERNELS_CACHE; the cpu backend says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMX_KERNELS_") and k != "HOME"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", NO_HOME], env=env, capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert result["ok"]
    assert "no home directory" in result["err"] and "HMX_KERNELS_CACHE" in result["err"], result
    assert any("HMX_KERNELS_CACHE" in r for r in result["cpu"]) or result["cpu"] == [], result
    assert result["rc"] == 1 and "error: hmx_kernels cannot find a folder" in proc.stderr, proc.stderr


def test_readme_lists_every_variable_config_reads():
    readme = (REPO / "README.md").read_text()
    source = (REPO / "hmx_kernels" / "config.py").read_text()
    read = set(re.findall(r'_(?:value|switch|mebibytes|cuda_arch)\("([A-Z_]+)"', source)) | {"TRITON_INTERPRET"}
    assert "HMX_KERNELS_PE_CACHE_MB" in read
    for name in sorted(read):
        assert f"`{name}`" in readme, name
