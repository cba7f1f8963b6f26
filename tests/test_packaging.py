"""What a user installs: the version, the license, and which packages go into site-packages."""

from __future__ import annotations

import ast
import pathlib
import re
from importlib import metadata

import pytest

import deepopt

try:
    import tomllib
except ModuleNotFoundError:                              # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_matches_pyproject_and_its_fallback():
    version = PYPROJECT["project"]["version"]
    assert deepopt.__version__ == version
    try:                                                 # the installed metadata, when installed
        assert metadata.version("deepopt") == version
    except metadata.PackageNotFoundError:
        pass
    # the literal used when deepopt runs from a source tree that was never installed
    tree = ast.parse((ROOT / "deepopt" / "__init__.py").read_text())
    literals = [node.value.value for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets)
                and isinstance(node.value, ast.Constant)]
    assert literals == [version]


def test_license_file_is_the_one_pyproject_names():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert re.search(r"Apache License\s+Version 2\.0, January 2004", text)
    assert "END OF TERMS AND CONDITIONS" in text           # the full text, not a stub


def test_benchmarks_are_not_installed_as_a_top_level_package():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(pattern.startswith("benchmarks") for pattern in include), include
    assert {"deepopt*", "torch_backend*", "jax_backend*"} <= set(include)
    assert "." in PYPROJECT["tool"]["pytest"]["ini_options"]["pythonpath"]


def test_test_extra_installs_the_linter_ci_runs():
    assert any(req.startswith("ruff") for req in PYPROJECT["project"]["optional-dependencies"]["test"])
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^ruff==\d", pins, flags=re.M)


def test_the_kernels_sources_ship_and_ninja_is_installed_to_build_them():
    """torch_backend/_native.py builds csrc/elementwise.cpp and csrc/deep_memory.cpp on first use
    (and, on a CUDA machine, csrc/elementwise_cuda.cpp and .cu): the sources and their headers must
    be in the wheel (package data), and torch's builder needs ninja, which the torch extra
    installs (pinned for CI)."""
    from torch_backend import _native

    assert PYPROJECT["tool"]["setuptools"]["package-data"]["torch_backend"] == ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h"]
    assert all(path.is_file() for path in (*_native.SOURCES, *_native.CUDA_SOURCES, *_native.LOCAL_HEADERS))
    assert [path.relative_to(ROOT / "torch_backend").as_posix() for path in _native.SOURCES] == \
        ["csrc/elementwise.cpp", "csrc/deep_memory.cpp"]
    assert [path.relative_to(ROOT / "torch_backend").as_posix() for path in _native.CUDA_SOURCES] == \
        ["csrc/elementwise_cuda.cpp", "csrc/elementwise_cuda.cu", "csrc/deep_memory_cuda.cpp", "csrc/deep_memory_cuda.cu"]
    # DMGD's memory itself is a header both backends include: it ships with deepopt.
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["deepopt"] == ["csrc/*.h"]
    assert [path.relative_to(ROOT / "deepopt").as_posix() for path in _native.HEADERS] == ["csrc/deep_memory.h"]
    # JAX's custom call around it: built by jax_backend/_native.py with the system's compiler.
    from jax_backend import _native as jax_native

    assert PYPROJECT["tool"]["setuptools"]["package-data"]["jax_backend"] == ["csrc/*.cpp"]
    assert jax_native.SOURCE.relative_to(ROOT / "jax_backend").as_posix() == "csrc/deep_memory_ffi.cpp"
    assert any(req.startswith("ninja") for req in PYPROJECT["project"]["optional-dependencies"]["torch"])
    assert re.search(r"^ninja==\d", (ROOT / "constraints.txt").read_text(), flags=re.M)
