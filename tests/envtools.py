"""Helpers for tests that run hmx_kernels in other environments: fresh virtual environments that
borrow this environment's packages (optionally leaving some out), PATHs without some tools, and
running a script there that reports JSON."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
TORCH_SITE = Path(torch.__file__).resolve().parents[1]  # site-packages that holds torch


def borrowed_site(folder: Path, exclude: Iterable[str] = ()) -> Path:
    """A folder of symlinks to every entry of this environment's site-packages except those whose
    name starts with one of `exclude` (e.g. "triton") and except hmx_kernels itself (its editable
    install): added to a fresh venv by a .pth file, it lends torch and friends without them."""
    skip = tuple(x.lower() for x in exclude) + ("hmx_kernels", "__editable__")
    folder.mkdir(parents=True)
    for entry in TORCH_SITE.iterdir():
        if not entry.name.lower().startswith(skip) and entry.suffix != ".pth":
            (folder / entry.name).symlink_to(entry)
    return folder


def make_venv(path: Path, ninja: bool = False, exclude: Iterable[str] = (), with_pip: bool = False) -> Path:
    """A fresh venv borrowing this environment's packages (less `exclude`); `ninja`: a ninja in its
    bin/, next to its interpreter, as `pip install ninja` puts it. Returns its python."""
    args = [sys.executable, "-m", "venv", str(path)] + ([] if with_pip else ["--without-pip"])
    subprocess.run(args, check=True)
    py = path / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    borrowed = borrowed_site(path / "borrowed", exclude)
    Path(site, "borrowed.pth").write_text(str(borrowed) + "\n")
    if ninja:
        from hmx_kernels.cpp import build

        found = build._find_ninja()
        assert found, "these tests need ninja"
        (path / "bin" / "ninja").symlink_to(Path(found).resolve())
    return py


def path_without(folder: Path, names: Iterable[str]) -> str:
    """A PATH of one folder holding links to every program on this PATH except `names`."""
    names = set(names)
    folder.mkdir(parents=True)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not Path(d).is_dir():
            continue
        for entry in Path(d).iterdir():
            if entry.name not in names and not (folder / entry.name).exists() and os.access(entry, os.X_OK):
                (folder / entry.name).symlink_to(entry)
    return str(folder)


def run_json(python, code: str, env: Dict[str, str], cwd: Path, timeout: int = 900,
             check: bool = True) -> "tuple[Optional[dict], subprocess.CompletedProcess]":
    """Runs `code`; returns the JSON its last line starting with RESULT carries, and the process."""
    proc = subprocess.run([str(python), "-c", code], env=env, cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"process failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return (json.loads(lines[-1][len("RESULT "):]) if lines else None), proc


def clean_env(**settings) -> Dict[str, str]:
    """os.environ without PYTHONPATH and the HMX_KERNELS_* / CXX settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and k != "CXX" and not k.startswith("HMX_KERNELS_")}
    env.update({k: str(v) for k, v in settings.items()})
    return env


def package_copy(dest: Path, installed: bool = False) -> Path:
    """This repository's package copied into `dest`, without __pycache__ and without any
    hmx_kernels/_prebuilt builds (an editable install with HMX_KERNELS_BUILD_EXT=1 leaves one in
    the source tree), so that only the tests' own builds are found: csrc/ beside the package as in
    the repository, or inside it as hmx_kernels/csrc as in an installed package. Returns `dest`,
    for PYTHONPATH."""
    shutil.copytree(REPO / "hmx_kernels", dest / "hmx_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "_prebuilt"))
    shutil.copytree(REPO / "csrc", dest / "hmx_kernels" / "csrc" if installed else dest / "csrc")
    return dest


def exit_worker_now() -> None:
    """End a spawned torch.distributed worker that finished without error, skipping the
    interpreter's shutdown: after destroy_process_group, gloo workers intermittently abort at exit
    ("terminate called without an active exception", SIGABRT, no Python frame: a C++ thread still
    joinable when static objects are destroyed), which mp.spawn reports as a failure although
    every assertion passed. Failures still raise before this is reached."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
