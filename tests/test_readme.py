"""The README's Python examples run as written (smoke tests of the documentation)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_promised_examples():
    assert len(BLOCKS) >= 4, "README lost its PyTorch, JAX, custom-rule or testing example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_smoke_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index].replace('"/tmp/opt.pt"', repr(str(tmp_path / "opt.pt")))
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
