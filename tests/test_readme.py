"""Every Python block of README.md runs, in order, in one namespace (as a reader would paste them)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 5


@pytest.mark.slow
def test_readme_python_blocks_run():
    import torch

    from utils import import_speechbrain

    import_speechbrain("speechbrain.nnet.hypermixing")  # the conversion example uses speechbrain (stand-in torchaudio)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - report which block broke
            raise AssertionError(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    torch._dynamo.reset()
