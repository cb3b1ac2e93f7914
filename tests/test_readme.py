"""README.md's code blocks: every Python block runs on its own, in a fresh namespace (as a reader
would paste one), and every shell block names make targets, modules, options and files that exist."""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def python_blocks():
    return blocks("python")


def shell_commands():
    """Each command of the bash blocks, comments and line continuations resolved."""
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                yield from (part.strip() for part in line.split("&&"))


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 5


@pytest.mark.slow
def test_readme_python_blocks_run_on_their_own():
    import torch

    from utils import import_speechbrain

    import_speechbrain("speechbrain.nnet.hypermixing")  # the conversion example uses speechbrain (stand-in torchaudio)
    for i, block in enumerate(python_blocks()):
        namespace = {"__name__": "readme"}  # nothing from the blocks before
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - report which block broke
            raise AssertionError(f"README.md python block {i + 1} failed on its own: "
                                 f"{type(e).__name__}: {e}\n{block}") from e
    torch._dynamo.reset()


def _make_targets():
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, flags=re.M))


def test_readme_shell_commands_name_what_exists():
    """make targets are in the Makefile; `python -m M` modules exist; their --options appear in
    the module's source; files the commands run exist."""
    targets = _make_targets()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    seen = 0
    for cmd in shell_commands():
        words = [w for w in shlex.split(cmd) if "=" not in w or w.startswith("-")]
        if not words:
            continue
        seen += 1
        if words[0] == "make":
            for target in words[1:]:
                assert target in targets, f"README: `{cmd}`: no make target {target!r}"
        if "-m" in words and words[0].endswith(("python", "python3")):
            module = words[words.index("-m") + 1]
            if module in ("pip", "build"):
                continue
            spec = importlib.util.find_spec(module)
            assert spec is not None, f"README: `{cmd}`: no module {module}"
            source = Path(spec.origin).read_text()
            if spec.origin.endswith("__main__.py") or spec.submodule_search_locations:
                source += "".join(p.read_text() for p in Path(spec.origin).parent.glob("*.py"))
            for opt in (w.split("=")[0] for w in words if w.startswith("--")):
                assert f'"{opt}"' in source, f"README: `{cmd}`: {module} has no option {opt}"
        for w in words:
            if w.endswith(".py"):
                assert (ROOT / w).is_file(), f"README: `{cmd}`: no file {w}"
    assert seen >= 10


def test_readmes_agree_on_the_latest_cpu_run():
    """README.md and benchmarks/README.md name the same results files as the latest CPU run."""
    pattern = r"results/(cpu-[a-z0-9-]+?)-float32"
    top = README.read_text(encoding="utf-8")
    bench = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    top_latest = re.search(r"Latest run:.*?" + pattern, top, flags=re.S).group(1)
    bench_latest = re.search(r"Latest run \(the one README\.md shows\):.*?" + pattern, bench, flags=re.S).group(1)
    assert top_latest == bench_latest
    assert (ROOT / "benchmarks" / "results" / f"{top_latest}-float32.json").is_file()
