"""The documentation's Python examples run as written, and it points only inside the repository."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, i, code) for path in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


def _blocks_of(name: str) -> list[str]:
    return [code for path, _, code in BLOCKS if path.name == name]


def test_readme_has_the_promised_examples():
    assert len(_blocks_of("README.md")) >= 4, "README lost its PyTorch, JAX, custom-rule or testing example"
    assert len(_blocks_of("extending.md")) >= 2, "docs/extending.md lost its worked example"


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p.name}[{i}]" for p, i, _ in BLOCKS])
def test_smoke_doc_example_runs(path, index, code, tmp_path, monkeypatch):
    """Blocks of one file share a namespace, in order, as a reader runs them."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for earlier in _blocks_of(path.name)[: index + 1] if path.parent.name == "docs" else [code]:
        earlier = earlier.replace('"/tmp/opt.pt"', repr(str(tmp_path / "opt.pt")))
        exec(compile(earlier, f"{path.name}[python block {index}]", "exec", dont_inherit=True), namespace)


def test_math_keeps_the_section_numbers_the_code_cites():
    text = (ROOT / "docs" / "math.md").read_text()
    headings = re.findall(r"^## §(\d+) ", text, flags=re.M)
    assert headings == [str(n) for n in range(9)], headings
    sources = [p for d in ("deepopt", "torch_backend", "jax_backend", "benchmarks", "tests")
               for p in (ROOT / d).rglob("*.py")]
    cited = {int(n) for p in sources for n in re.findall(r"docs/math\.md §(\d+)", p.read_text())}
    assert len(cited) >= 5, "the code no longer cites docs/math.md's sections as 'docs/math.md §n'"
    assert cited <= set(range(9)), sorted(cited)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_link_only_inside_the_repository(path):
    """Relative links resolve to files of this repository; nothing points at a machine path."""
    text = path.read_text()
    machine_paths = ("/" + "work/", "shared/" + "design")     # spelled so this file is not a hit
    assert not any(m in text for m in machine_paths), [m for m in machine_paths if m in text]
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.exists() and ROOT in resolved.parents, f"{path.name} links to {target}"


def _bash_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(heading) + r".*?```bash\n(.*?)```", text, flags=re.S)
    assert block, f"README lost its {heading} command"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 1, f"README's {heading} command is not one line: {lines}"
    return lines[0]


def test_ci_runs_exactly_the_readme_test_command():
    command = _bash_block_after("**Tests**")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [command]
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "ruff check ." in command and command.endswith("python -m pytest -q")


def test_main_job_command_makes_a_venv_and_runs_from_the_root():
    command = _bash_block_after("**Main job**")
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert command.endswith("python -m benchmarks.main")
