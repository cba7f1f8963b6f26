"""Smoke tests (STYLE.md §14): each benchmark's ``--quick`` mode, shrunk further by the hidden
``--tiny`` size, runs as a module and writes well-formed JSON — expected keys, finite numbers,
one row per optimizer. The numbers themselves are never asserted.

The three benchmarks start together (a module fixture) so the file stays well under a minute.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OPTIMIZERS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3")
BENCHMARKS = {
    "step_cost": ["--quick", "--tiny", "--threads", "1"],
    "convergence": ["--quick", "--tiny"],
    "dmgd_defaults": ["--quick", "--tiny"],
}
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every benchmark (in parallel) once; {name: (returncode, output, parsed JSON or None)}."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    procs = {name: subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args,
                                     "--out", str(out / name)],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
             for name, args in BENCHMARKS.items()}
    done = {}
    for name, p in procs.items():
        try:
            text, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        path = out / name / f"{name}.json"
        done[name] = (p.returncode, text, json.loads(path.read_text()) if path.exists() else None, out / name)
    return done


def _get(results, name):
    code, text, data, folder = results[name]
    assert code == 0, f"benchmarks.{name} failed:\n{text[-4000:]}"
    assert data is not None, f"benchmarks.{name} wrote no JSON:\n{text[-2000:]}"
    return data, folder


def _assert_finite_numbers(obj, path="$"):
    """Every number in the tree is finite (write_json turns NaN/inf into null, never emits them)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _assert_finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), path


def _assert_environment(env):
    for key in ("git_sha", "command", "date_utc", "versions", "device", "device_name", "python"):
        assert key in env, key
    assert env["versions"]["torch"]
    assert env["command"].startswith("python -m benchmarks.")


def test_smoke_step_cost(results):
    data, _ = _get(results, "step_cost")
    assert data["benchmark"] == "step_cost"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert data["config"]["size"] == "tiny"
    pairs = data["pairs"]
    for backend in ("torch", "jax"):
        specs = [p["spec"] for p in pairs if p["backend"] == backend]
        assert sorted(specs) == sorted(OPTIMIZERS), (backend, specs)      # one row per optimizer
    for p in pairs:
        assert p["status"] in ("ok", "unsupported", "error")
        if p["status"] == "ok":
            assert p["deepopt_ms"] > 0 and p["time_over_floor"] > 0
            assert p["state_bytes_per_param"] >= 0
            if p["backend"] == "jax":
                assert isinstance(p["recompiled"], bool)
        else:
            assert p["error"]
    for r in data["rows"]:
        if r["status"] == "ok":
            assert {"median", "q1", "q3", "min", "max"} <= set(r["time_ms"])
            assert r["floor"]["ms"] > 0
    for key in ("copy_bytes_per_s", "matmul_float32_flops_per_s"):
        assert data["rates"]["torch"][key] > 0


def test_smoke_convergence(results):
    data, folder = _get(results, "convergence")
    assert data["benchmark"] == "convergence"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert set(data["tasks"]) == {"lsq", "mlp", "lm", "mqar"}
    for task, r in data["tasks"].items():
        assert r["target"]["kind"] in ("fraction_of_initial", "absolute")
        assert sorted(r["optimizers"]) == sorted(OPTIMIZERS), task
        for res in r["optimizers"].values():
            assert res["best_lr"] > 0
            assert {"mean", "std", "per_seed"} <= set(res["final_loss"])
            assert {"per_seed", "n_reached", "median"} <= set(res["steps_to_target"])
            assert len(res["sweep"]) == len(data["config"]["lr_multipliers"])
    assert data["config"]["stdlib_corpus"]["sha256"]
    assert (folder / "convergence.png").stat().st_size > 0


def test_smoke_dmgd_defaults(results):
    data, _ = _get(results, "dmgd_defaults")
    assert data["benchmark"] == "dmgd_defaults"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    v = data["verdict"]
    assert {"defaults", "defaults_rank", "best", "defaults_supported", "clearly_better_than_defaults"} <= set(v)
    assert 1 <= v["defaults_rank"] <= v["n_settings"] == len(data["results"])
    for task in ("lsq", "mlp"):
        assert data["outer_lr"][task]["lr"] > 0
    keys = {r["config"]["keys"] for r in data["results"]}
    assert keys == {"current", "previous"}
    for r in data["results"]:
        assert set(r["tasks"]) == {"lsq", "mlp"}
