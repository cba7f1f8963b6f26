"""deepopt's JAX transforms on parameters sharded over a 2×2 mesh of forced host devices.

XLA reads ``--xla_force_host_platform_device_count`` once, when jax starts, so the cases run in
one subprocess that sets it before importing jax and prints its measurements as JSON; the
assertions run here. Oracles: the same steps on unsharded parameters, the parameters' own
shardings, a trace counter, and the compiled HLO text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

STEPS = 3
TOL = 1e-5          # max |Δ| / max |W| after STEPS, sharded vs unsharded

#: Entries of tests/conftest.py's SPECS run on the mesh (-m slow): every preset, both
#: low-precision Newton–Schulz dtypes, M3 with its slow write inside the run (frequency 2).
ON_THE_MESH = ("sgd_heavy_ball", "adamw", "delta_momentum", "muon_bfloat16", "muon_float32",
               "dmgd_newton_schulz", "m3_decay")
#: Specs with a Newton–Schulz read-out: also run with ns_mesh (whole matrices).
WITH_NEWTON_SCHULZ = ("muon_bfloat16", "muon_float32", "dmgd_newton_schulz", "m3_decay")
#: Specs whose collectives are read from the compiled HLO, at two ns_steps each.
COUNTED = ("muon_bfloat16", "m3_decay")
#: The default run's share (each case compiles several sharded steps, DMGD's take 10–20 s on a
#: loaded CPU); -m slow runs them all. DMGD checks the placement of W₁/W₂/ν.
DEFAULT = ("muon_bfloat16", "dmgd_newton_schulz")
DEFAULT_WHOLE = ("muon_bfloat16",)
_COLLECTIVE = re.compile(r"= [^=]*?\b(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")


def _main(names: list[str], whole: list[str]) -> None:
    """The subprocess: the cases of ``names`` (and of ``whole`` with ``ns_mesh``), as one JSON line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_backend

    import _helpers
    from conftest import SPECS

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    # name: (shape, partition spec): kernels (in, out), a stack of 4, a bias, a small head. No
    # state leaf of another shape (DMGD's W₁ h×n, W₂ n×h with h = 2) has a parameter's shape.
    layout = {
        "dense": ((24, 12), P("x", "y")),
        "stacked": ((4, 8, 6), P("x", None, "y")),
        "bias": ((12,), P("y")),
        "head": ((12, 3), P("x", None)),
    }
    rng = np.random.default_rng(0)
    params0 = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, (s, _) in layout.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, (s, _) in layout.items()}
             for _ in range(STEPS)]
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in layout.items()}
    put = lambda tree: {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}

    def run(tx, sharded: bool):
        traces = []

        @jax.jit
        def step(params, state, g):
            traces.append(1)
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state

        params = put(params0) if sharded else params0
        state = tx.init(params)
        for g in grads:
            params, state = step(params, state, put(g) if sharded else g)
        return params, state, len(traces)

    def collectives(tx) -> dict:
        """Collectives in the compiled sharded step, by op (lowered only, never run)."""
        params = put(params0)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        text = step.lower(params, tx.init(params), put(grads[0])).compile().as_text()
        out: dict[str, int] = {}
        for op in _COLLECTIVE.findall(text):
            out[op] = out.get(op, 0) + 1
        return out

    results = {}
    for name in names:
        spec = SPECS[name]()
        ref, _, _ = run(jax_backend.compile(spec), sharded=False)
        for ns_mesh in (None, mesh) if name in whole else (None,):
            params, state, traces = run(jax_backend.compile(spec, ns_mesh=ns_mesh), sharded=True)
            error = max(float(jnp.max(jnp.abs(params[k] - ref[k])) / jnp.max(jnp.abs(ref[k]))) for k in ref)
            kept = all(params[k].sharding.is_equivalent_to(shardings[k], params[k].ndim) for k in params)
            # State leaves shaped like a parameter carry its sharding; the rest live on the mesh.
            by_shape = {params0[k].shape: shardings[k] for k in params0}
            state_ok = all(
                isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
                and (x.shape not in by_shape or x.sharding.is_equivalent_to(by_shape[x.shape], x.ndim))
                for x in jax.tree.leaves(state))
            case = {"error": error, "shardings_kept": kept, "state_on_mesh": state_ok, "traces": traces}
            if name in COUNTED:
                case["collectives"] = {ns: collectives(jax_backend.compile(spec.replace(ns_steps=ns),
                                                                           ns_mesh=ns_mesh))
                                       for ns in (2, 5)}
            results[f"{name}/{'whole' if ns_mesh is not None else 'partitioned'}"] = case
    examples = _helpers.readme_distributed_examples("jax_backend")
    for code in examples:
        exec(compile(code, "README.md (Distributed, JAX)", "exec"), {"__name__": "__main__"})
    results["readme_examples"] = len(examples)
    print(json.dumps(results))


def _run(names, whole) -> dict:
    # First: XLA stops reading flags at a bare token such as the common thread-limit recipe's
    # "intra_op_parallelism_threads=1" (benchmarks._threads), so a flag appended after it is lost.
    env = {**os.environ, "XLA_FLAGS": ("--xla_force_host_platform_device_count=4 " +
                                       os.environ.get("XLA_FLAGS", "")).strip(),
           "JAX_PLATFORMS": "cpu"}
    tests = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(tests)!r}); import test_distributed_jax as t; "
            f"t._main({list(names)!r}, {list(whole)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                          cwd=tests.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mesh_results() -> dict:
    return _run(DEFAULT, DEFAULT_WHOLE)


def _check_case(case: dict, label: str) -> None:
    assert case["error"] < TOL, f"{label}: {case['error']:.2e} from unsharded"
    assert case["shardings_kept"], f"{label}: updated parameters lost their shardings"
    assert case["state_on_mesh"], f"{label}: a state leaf is off the mesh or off its parameter's sharding"
    assert case["traces"] == 1, f"{label}: the jitted step traced {case['traces']} times in {STEPS} steps"


def _check_counts(whole: dict, partitioned: dict) -> None:
    assert whole["2"] == whole["5"], f"collectives change with ns_steps: {whole}"
    assert "all-reduce" not in whole["5"], whole
    # The oracle can fail: the partitioner's own Newton–Schulz all-reduces in every iteration.
    assert partitioned["5"].get("all-reduce", 0) > partitioned["2"].get("all-reduce", 0), partitioned


@pytest.mark.parametrize("name, mode", [(name, mode) for name in DEFAULT for mode in ("partitioned", "whole")
                                        if mode == "partitioned" or name in DEFAULT_WHOLE])
def test_sharded_params_match_unsharded(mesh_results, name, mode):
    _check_case(mesh_results[f"{name}/{mode}"], f"{name} ({mode})")


@pytest.mark.parametrize("name", [name for name in COUNTED if name in DEFAULT_WHOLE])
def test_whole_matrix_newton_schulz_leaves_no_all_reduce(mesh_results, name):
    _check_counts(mesh_results[f"{name}/whole"]["collectives"], mesh_results[f"{name}/partitioned"]["collectives"])


@pytest.mark.slow
def test_every_spec_on_the_mesh():
    results = _run(ON_THE_MESH, WITH_NEWTON_SCHULZ)
    assert {label.split("/")[0] for label in results if "/" in label} == set(ON_THE_MESH)
    for label, case in results.items():
        if isinstance(case, dict):
            _check_case(case, label)
    for name in COUNTED:
        _check_counts(results[f"{name}/whole"]["collectives"], results[f"{name}/partitioned"]["collectives"])


def test_smoke_readme_jax_mesh_example_runs(mesh_results):
    assert mesh_results["readme_examples"] == 1, "README's Distributed section lost its JAX-mesh example"
