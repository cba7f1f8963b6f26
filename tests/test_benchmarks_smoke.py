"""Smoke tests: each benchmark's ``--quick`` mode, shrunk further by the hidden ``--tiny``
size, runs as a module from the repository root and writes well-formed JSON — expected keys,
finite numbers, one row per deepopt preset, provenance. The numbers themselves are never
asserted.

The benchmarks start together (a module fixture) so the file stays well under a minute. The
whole main job (HOPE included) is behind the ``slow`` marker: ``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deepopt

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = {   # module -> (arguments, the JSON file it writes under --out)
    "step_cost": (["--quick", "--tiny", "--threads", "1", "--max-seconds", "1.5"], "step_cost.json"),
    "convergence": (["--quick", "--tiny"], "convergence.json"),
    "dmgd_defaults": (["--quick", "--tiny"], "dmgd_defaults.json"),
    "main": (["--quick", "--skip-hope"], "compare/compare.json"),
    "compiled_step": (["--tiny", "--repeats", "2", "--only", "sgd(decoupled_weight_decay=True)"], "compiled_step.json"),
    "step_profile": (["--size", "tiny", "--steps", "2", "--top", "5", "--only", "m3,dmgd_memory"], "step_profile.json"),
    "dmgd_kernel": (["--tiny", "--repeats", "3"], "dmgd_kernel.json"),
    "packing": (["--tiny"], "packing.json"),
}
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def optimizers(spec_table):
    """Every preset constructor of the shared spec table (a custom rule is not a benchmark row)."""
    return sorted({make().name for make in spec_table.values()} - {"custom"})


def _env():
    """The benchmarks run from the repository root, which is not installed: put it on the path."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                MPLBACKEND="Agg")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every benchmark (in parallel) once; {name: (returncode, output, parsed JSON or None)}."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("bench")
    procs = {name: subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args,
                                     "--out", str(out / name)],
                                    cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
             for name, (args, _) in BENCHMARKS.items()}
    done = {}
    for name, p in procs.items():
        try:
            text, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        path = out / name / BENCHMARKS[name][1]
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
    assert env["versions"]["torch"] and env["versions"]["jax"]
    assert env["versions"]["deepopt"] == deepopt.__version__
    assert env["command"].startswith("python -m benchmarks.")


def test_smoke_step_cost(results, optimizers):
    data, _ = _get(results, "step_cost")
    assert data["benchmark"] == "step_cost"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert data["config"]["size"] == "tiny" and data["config"]["max_seconds_per_group"] == 1.5
    pairs = data["pairs"]
    for backend in ("torch", "jax"):
        specs = [p["spec"] for p in pairs if p["backend"] == backend]
        assert sorted(specs) == optimizers, (backend, specs)      # one row per optimizer
    for p in pairs:                                # every deepopt preset runs on both backends
        assert p["status"] == "ok", p
        assert p["deepopt_ms"] > 0 and p["time_over_floor"] > 0
        assert p["state_bytes_per_param"] >= 0
        if p["backend"] == "jax":
            assert isinstance(p["recompiled"], bool)
    for r in data["rows"]:                         # and so does every anchor (torch fused included)
        assert r["status"] == "ok", r
        assert {"median", "q1", "q3", "min", "max"} <= set(r["time_ms"])
        assert r["floor"]["ms"] > 0
        assert r["floor"]["rates"]["floor: copy"] > 0      # measured next to the row's group
        if r["floor"]["matmul_flops"]:
            assert any(k.startswith("floor: matmul") and v > 0 for k, v in r["floor"]["rates"].items())
    for key in ("copy_bytes_per_s", "matmul_float32_flops_per_s"):
        assert data["rates"]["torch"][key] > 0


def test_smoke_dmgd_kernel(results):
    """JAX's DMGD memory per bucket: the custom call and XLA's ops, both layouts."""
    data, _ = _get(results, "dmgd_kernel")
    assert data["benchmark"] == "dmgd_kernel" and data["size"] == "tiny"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert {(r["layout"], r["m"], r["n"]) for r in data["rows"]} == {
        (layout, m, n) for layout in ("optax", "torch") for m, n in ((24, 8), (8, 8))}
    for r in data["rows"]:
        assert r["xla_ops"]["ms"]["median"] > 0 and r["xla_ops"]["gflops"] > 0
        if data["kernel_built"]:
            assert r["custom_call"]["ms"]["median"] > 0 and r["custom_call_over_xla_ops"]["median"] > 0


def test_smoke_packing(results):
    """JAX's fallback leaves packed against leaf by leaf, and optax.adamw, per leaf size."""
    data, _ = _get(results, "packing")
    assert data["benchmark"] == "packing"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert [r["leaf_size"] for r in data["rows"]] == [16, 64]
    for r in data["rows"]:
        for name in ("packed", "per_leaf", "optax.adamw"):
            assert r[name]["ms"]["median"] > 0 and r[name]["fusions"] > 0
        assert r["packed"]["fusions"] < r["per_leaf"]["fusions"]
        assert r["packed_over_per_leaf"]["median"] > 0 and r["packed_over_optax"]["median"] > 0


def test_smoke_dmgd_kernel_step(tmp_path):
    """``--step``: the whole step both ways in one process, and without the small leaves."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dmgd_kernel", "--step", "--tiny", "--repeats", "3",
                           "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "dmgd_kernel.json").read_text())
    assert data["mode"] == "step" and data["size"] == "tiny"
    _assert_finite_numbers(data)
    steps = data["step_ms"]
    ratios = {"packed_over_per_leaf"} | ({"custom_call_over_xla_ops"} if data["kernel_built"] else set())
    names = {"xla_ops", "fallback_per_leaf"} | ({"custom_call", "custom_call_no_1d_leaves",
                                                 "custom_call_dmgd_matrices_only"} if data["kernel_built"] else set())
    assert set(steps) == names | ratios
    for name in names:
        assert steps[name]["median"] > 0 and steps[name]["fusions"] > 0
    for name in ratios:
        assert steps[name]["median"] > 0
    main = steps["custom_call" if data["kernel_built"] else "xla_ops"]
    assert main["fusions"] < steps["fallback_per_leaf"]["fusions"]      # the small leaves packed
    if data["kernel_built"]:                       # fewer leaves, fewer fusions
        assert steps["custom_call"]["fusions"] > steps["custom_call_no_1d_leaves"]["fusions"]


def test_smoke_convergence(results, optimizers):
    data, folder = _get(results, "convergence")
    assert data["benchmark"] == "convergence"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert set(data["tasks"]) == {"lsq", "mlp", "lm", "mqar"}
    for task, r in data["tasks"].items():
        assert r["target"]["kind"] in ("fraction_of_initial", "absolute")
        presets = [n for n in r["optimizers"] if not n.startswith("dmgd_")]   # + DMGD variants
        assert sorted(presets) == optimizers, task
        for name, res in r["optimizers"].items():
            assert res["best_lr"] > 0
            # write_json stores NaN and inf as null: a null final loss is a run that diverged at every lr.
            assert isinstance(res["final_loss"]["mean"], float), (task, name, res["final_loss"])
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


def test_smoke_main_job_compare(results, optimizers):
    """Part 1 of the main job: both backends trained every preset from the same start."""
    data, folder = _get(results, "main")
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert data["environment"]["command"] == "python -m benchmarks.main --quick --skip-hope --out " + str(folder)
    assert data["environment"]["thread_limits"]["OMP_NUM_THREADS"] == "1"      # the main job's default
    assert sorted(r["optimizer"] for r in data["rows"]) == optimizers
    for r in data["rows"]:
        assert r["torch_final_loss"] < r["initial_loss"] and r["jax_final_loss"] < r["initial_loss"], r
        assert r["max_param_gap_torch_vs_jax"] >= 0.0, r     # float32 rounding amplified by training
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["size"] == "quick" and set(summary["durations"]) == {"compare_s", "total_s"}
    text = results["main"][1]
    assert "Caveats:" in text and "expected" in text and "main job done in" in text


@pytest.mark.slow
def test_main_job_quick_with_hope(tmp_path):
    """The whole main job at --quick (HOPE included): it finishes and records every part."""
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.main", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["durations"]) == {"compare_s", "hope_s", "total_s"}
    assert summary["environment"]["versions"]["deepopt"] == deepopt.__version__
    assert (tmp_path / "compare" / "compare.json").exists()
    assert any((tmp_path / "hope").rglob("summary.json"))


def test_gpu_check_fits_every_run_to_the_same_steps():
    from benchmarks.gpu_check import steps_that_fit

    assert steps_that_fit(300, 0.1, 2000) == 2000          # the preset's steps fit
    assert steps_that_fit(300, 0.5, 2000) == 600           # the slowest run's step time sets them
    assert steps_that_fit(5, 0.5, 2000) == 20              # never fewer than 20: the deadline stops the run
    assert steps_that_fit(300, 0.0, 2000) == 2000


@pytest.mark.slow
def test_gpu_check_pipeline_runs_on_cpu(tmp_path):
    """The lent-GPU script end to end on the CPU at tiny sizes: every part ends with rc 0, HOPE's
    three runs train the same number of steps and report val bpb."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--preset", "cpu-tiny", "--size", "tiny",
                           "--batch", "2", "--seq-len", "32", "--no-jax-tests", "--budget", "240",
                           "--threads", "1"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["rc"] for k, v in result["parts"].items() if "rc" in v} == {
        "tests": 0, "step_cost_torch": 0, "step_cost_jax": 0}
    runs = result["parts"]["hope"]["runs"]
    assert set(runs) == {name for name, _, _ in gpu_check.HOPE_RUNS}
    assert {r["steps"] for r in runs.values()} == {result["parts"]["hope"]["steps"]}
    assert all(r["rc"] == 0 and math.isfinite(r["val_bpb"]) for r in runs.values())


def test_gpu_check_profile_part_runs_on_cpu(tmp_path, capsys):
    """``--parts profile``: the eager element-wise rules next to the fused kernels and the step
    profiles, each its own process with rc 0, their JSON named and summed up in the table."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--size", "tiny", "--parts", "profile",
                           "--budget", "140", "--profile-seconds", "130"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["rc"] for k, v in result["parts"].items()} == {"compiled_step": 0, "step_profile": 0}
    rows = json.loads(Path(result["parts"]["compiled_step"]["json"]).read_text())["rows"]
    assert rows and all("compiled_ms" not in r for r in rows)
    specs = json.loads(Path(result["parts"]["step_profile"]["json"]).read_text())["specs"]
    assert set(specs) == {"muon", "m3", "dmgd_memory"}
    printed = capsys.readouterr().out
    assert "deepopt.adamw(nesterov=True)" in printed and "dmgd_memory:" in printed


def test_step_overhead_writes_its_rows(tmp_path, monkeypatch):
    from benchmarks import _threads, step_overhead

    for var in (*_threads.THREAD_VARIABLES, "XLA_FLAGS"):   # main() limits threads: restored after the test
        monkeypatch.setenv(var, os.environ.get(var, ""))

    assert step_overhead.main(["--repeats", "5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "step_overhead.json").read_text())["rows"]
    assert [r["deepopt"] for r in rows] == ["deepopt.sgd", "deepopt.adamw"]
    assert all(r["deepopt_ms"]["median"] > 0 and r["anchor_ms"]["median"] > 0 for r in rows)


def test_smoke_compiled_step(results):
    """`benchmarks.compiled_step`: a variant timed eagerly and through torch.compile next to
    torch's fused kernel of its family and torch's own compiled foreach step; an unknown
    variant is refused by name."""
    data, _ = _get(results, "compiled_step")
    _assert_finite_numbers(data)
    _assert_environment(data["environment"])
    (row,) = data["rows"]
    assert row["variant"] == "deepopt.sgd(decoupled_weight_decay=True)" and row["anchor"] == "torch.optim.SGD(fused)"
    assert row["torch_compiled"] == "torch.compile(torch.optim.SGD(foreach).step)"
    assert all(row[f"{k}_ms"]["median"] > 0 for k in ("eager", "compiled", "anchor", "torch_compiled"))
    assert all(row[f"{k}_vs_anchor"]["median"] > 0 for k in ("eager", "compiled", "torch_compiled"))
    assert data["config"]["parameters"] > 0
    bad = subprocess.run([sys.executable, "-m", "benchmarks.compiled_step", "--only", "lion", "--out", "x"],
                         cwd=REPO, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown ['lion']" in bad.stderr


def test_smoke_compiled_step_eager_only(tmp_path):
    """`--eager-only`: the eager step next to the fused kernel, nothing compiled. `--only` takes
    a name with a comma of its own."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.compiled_step", "--tiny", "--eager-only", "--repeats", "2",
                          "--only", "adamw(nesterov=True), sgd(dampening=0.1, undamped_first_step=True)",
                          "--out", str(tmp_path)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads((tmp_path / "compiled_step.json").read_text())
    _assert_finite_numbers(data)
    assert [row["variant"] for row in data["rows"]] == [
        "deepopt.adamw(nesterov=True)", "deepopt.sgd(dampening=0.1, undamped_first_step=True)"]
    assert [row["anchor"] for row in data["rows"]] == ["torch.optim.AdamW(fused)", "torch.optim.SGD(fused)"]
    for row in data["rows"]:
        assert row["eager_vs_anchor"]["median"] > 0
        assert not any(key.startswith(("compiled", "torch_compiled")) for key in row)
    assert data["config"]["torch_compile"] is None


def test_smoke_step_profile(results):
    """`benchmarks.step_profile`: per spec, a wall time per step and its costliest ops, each with
    calls per step; an unknown spec is refused by name."""
    data, _ = _get(results, "step_profile")
    _assert_finite_numbers(data)
    _assert_environment(data["environment"])
    assert set(data["specs"]) == {"m3", "dmgd_memory"}
    for row in data["specs"].values():
        assert row["wall_ms_per_step"] > 0 and row["cpu_ms_per_step"] > 0
        assert 0 < len(row["ops"]) <= 5 and all(o["calls_per_step"] > 0 for o in row["ops"])
        cpu = [o["self_cpu_ms_per_step"] for o in row["ops"]]
        assert cpu == sorted(cpu, reverse=True)          # on a CPU, ranked by self CPU time
    bad = subprocess.run([sys.executable, "-m", "benchmarks.step_profile", "--only", "lion", "--out", "x"],
                         cwd=REPO, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown ['lion']" in bad.stderr


def test_dmgd_floor_counts_every_product_its_objective_needs():
    """The floor prices DMGD's products at 2·m·n·h FLOPs each: seven with the L2 objective (the
    write's error reads the memory first), six with the dot objective; the read-out's Newton–
    Schulz comes on top."""
    from benchmarks import step_cost

    l2, dot = (deepopt.dmgd(0.01, readout=None, objective=o).rule.memory for o in ("l2", "dot"))
    assert (step_cost.dmgd_products(l2), step_cost.dmgd_products(dot)) == (7, 6)
    shapes = [("h.0.mlp.c_fc.weight", (64, 32))]
    flops = {k: step_cost.floor_terms("dmgd_memory", shapes, hidden=8, products=k)["flops"] for k in (6, 7)}
    assert flops == {6: 2 * 6 * 64 * 32 * 8, 7: 2 * 7 * 64 * 32 * 8}
    deep_muon = step_cost.floor_terms("dmgd", shapes, hidden=8, products=7)["flops"]
    assert deep_muon == flops[7] + step_cost.ns_flops(64, 32)


def test_pin_to_one_core_leaves_one_core():
    """In a child process (pinning this one would slow the rest of the suite)."""
    code = ("import os; from benchmarks._threads import pin_to_one_core; core = pin_to_one_core(); "
            "print(core, sorted(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split(maxsplit=1)
    assert out[1].strip() == f"[{out[0]}]"


def test_hope_speed_times_the_variants_asked_for():
    """`benchmarks.hope.speed --variants default`: today's HOPE and the Transformer++ alone, with
    their operator counts and ratios; an unknown variant is refused by name."""
    from benchmarks.hope import speed

    out = speed.main(["--repeats", "1", "--variants", "default"])
    assert set(out["ratio"]) == {"hope[default]", "transformer"}
    assert out["ratio"]["transformer"] == 1.0 and out["ops"]["hope[default]"] > out["ops"]["transformer"]
    with pytest.raises(SystemExit):
        speed.main(["--variants", "default,newest"])


def test_hope_speed_in_processes_times_each_model_alone():
    """`speed --processes N`: each model in its own process, N rounds; a ratio per round and their
    median, the Transformer++'s exactly 1; a negative count or --compile with it is refused."""
    from benchmarks.hope import speed

    out = speed.main(["--repeats", "1", "--variants", "default", "--processes", "2"])
    assert set(out["per_round_ratio"]) == {"hope[default]", "transformer"}
    assert out["per_round_ratio"]["transformer"] == [1.0, 1.0]
    assert len(out["per_round_s"]["hope[default]"]) == 2 and all(t > 0 for t in out["per_round_s"]["hope[default]"])
    assert out["ratio"]["hope[default]"] == pytest.approx(
        sorted(out["per_round_ratio"]["hope[default]"])[0] / 2 + sorted(out["per_round_ratio"]["hope[default]"])[1] / 2)
    for bad in (["--processes", "-1"], ["--processes", "1", "--compile"]):
        with pytest.raises(SystemExit):
            speed.main(bad)


def test_gpu_check_names_a_run_that_fell_back_to_eager(tmp_path):
    """A run whose CUDA-graph capture failed trains eagerly at several times the step time; the
    summary table says so with train's own note, found in the run's log."""
    from benchmarks import gpu_check
    from benchmarks.hope.train import GRAPH_FALLBACK

    log = tmp_path / "hope-x.log"
    log.write_text(f"start\n{GRAPH_FALLBACK} (RuntimeError: no copies in a capture); running eager\nend\n")
    note = gpu_check._first_line(log, GRAPH_FALLBACK)
    assert note.startswith(GRAPH_FALLBACK) and gpu_check._first_line(log, "absent") is None
    run = dict(val_bpb=2.0, steps=10, steps_completed=10, skipped_steps=0, rc=0, compiled=False, graph_fallback=note)
    result = dict(preset="gpu-small", parts=dict(hope=dict(status="ok", steps=10, preset_steps=2000, concurrent=1,
                                                           runs={"hope-dmgd": run})))
    assert f"ran eager: {note}" in gpu_check.table(result)


def test_smoke_compiled_step_without_torchs_compiled_step(tmp_path):
    """`--no-torch-compiled`: deepopt's step compiled, torch.optim's compiled foreach step left
    out (one compile per rule); with `--eager-only` the flag is refused."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.compiled_step", "--tiny", "--no-torch-compiled",
                          "--repeats", "2", "--only", "adamw(nesterov=True)", "--out", str(tmp_path)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    data = json.loads((tmp_path / "compiled_step.json").read_text())
    _assert_finite_numbers(data)
    (row,) = data["rows"]
    assert row["compiled_vs_anchor"]["median"] > 0 and row["eager_vs_anchor"]["median"] > 0
    assert not any(key.startswith("torch_compiled") for key in row)
    assert data["config"]["torch_compiled_anchor"] is False
    bad = subprocess.run([sys.executable, "-m", "benchmarks.compiled_step", "--eager-only", "--no-torch-compiled",
                          "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--no-torch-compiled" in bad.stderr


def _compiler() -> str | None:
    import shutil

    return shutil.which(os.environ.get("CXX") or "c++")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler")
def test_smoke_kernel_ab(tmp_path):
    """The kernel's header at HEAD against the working tree's, alternated: both layouts, both
    sides timed every round, and the two kernels' parameters agreeing within float rounding."""
    import shutil

    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout, or no git")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_ab", "--tiny", "--rounds", "3",
                           "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "kernel_ab.json").read_text())
    assert data["benchmark"] == "kernel_ab" and data["size"] == "tiny" and data["against"] == "HEAD"
    _assert_environment(data["environment"])
    _assert_finite_numbers(data)
    assert set(data["layouts"]) == {"rows", "columns"}
    for r in data["layouts"].values():
        assert r["a_ms"]["n"] == r["b_ms"]["n"] == 3
        assert r["a_ms"]["median"] > 0 and r["b_ms"]["median"] > 0 and r["b_over_a"]["median"] > 0
        assert r["max_param"] > 0 and r["max_param_diff"] <= 1e-5 * r["max_param"]


def test_kernel_ab_names_a_revision_git_cannot_show(tmp_path):
    import shutil

    if shutil.which("git") is None:
        pytest.skip("no git")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_ab", "--tiny", "--against", "no-such-revision",
                           "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "git cannot show deepopt/csrc/deep_memory.h at 'no-such-revision'" in proc.stderr
    assert not (tmp_path / "kernel_ab.json").exists()


def test_step_cost_refuses_a_time_budget_that_is_not_positive(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_cost", "--tiny", "--max-seconds", "0",
                           "--out", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 2 and "--max-seconds must be positive, got 0.0" in proc.stderr
