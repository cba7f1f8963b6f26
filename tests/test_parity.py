"""Oracle (b): torch backend == jax backend == numpy reference, step by step.

hypothesis draws the spec (every preset, hyperparameters in well-conditioned ranges), the
parameters (a mix of 1-D, 2-D and 3-D, so routing and the fallback are exercised) and the
gradient stream; ``deepopt.testing.assert_backends_agree`` compares the parameters after
every step, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import deepopt
from deepopt import testing

from _helpers import exact_in_float64

torch_backend = pytest.importorskip("torch_backend")
jax_backend = pytest.importorskip("jax_backend")
if not (hasattr(torch_backend, "run_trajectory") and hasattr(jax_backend, "run_trajectory")):
    pytest.skip("a backend has no run_trajectory yet", allow_module_level=True)

PARITY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ("reference", "torch", "jax")
KINDS = ("sgd", "adamw", "delta_momentum", "muon")


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_on_drawn_problems(kind):
    @given(spec=testing.specs(kinds=(kind,)), problem=testing.problems(steps=(1, 6), max_params=3))
    @PARITY
    def check(spec, problem):
        params, grads = problem
        testing.assert_backends_agree(spec, params, grads, backends=BACKENDS)

    check()


@pytest.mark.parametrize("kind,steps,examples", [("dmgd", (20, 24), 8), ("m3", (1, 12), 10)])
def test_backends_agree_on_drawn_deep_and_multiscale_specs(kind, steps, examples):
    """DMGD (docs/math.md §5; hidden > 0 drawn most of the time, 20+ steps) and M3 (docs/math.md §6)."""

    @given(spec=testing.specs(kinds=(kind,)), problem=testing.problems(steps=steps, max_params=3))
    @settings(PARITY, max_examples=examples)
    def check(spec, problem):
        params, grads = problem
        testing.assert_backends_agree(spec, params, grads, backends=BACKENDS)

    check()


@pytest.mark.specs(where=exact_in_float64)
def test_backends_agree_on_every_table_spec(spec):
    """Every float64-exact entry of conftest's table, over a longer stream (12 steps) on a mix
    of shapes (a 3-D kernel, a 1-D bias that a matrix rule routes to its fallback)."""
    rng = np.random.default_rng(0)
    params = {"embed.weight": rng.standard_normal((6, 4)), "conv.kernel": rng.standard_normal((4, 3, 2)),
              "head.weight": rng.standard_normal((3, 6)), "head.bias": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) * (1 + t) for k, v in params.items()} for t in range(12)]
    testing.assert_backends_agree(spec, params, grads, backends=BACKENDS)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_backends_descend(backend):
    """The closed-loop descent check through a compiled backend (replayed; 10 steps)."""
    losses = testing.assert_descends(deepopt.muon(0.05, ns_dtype="float64"), steps=10, backend=backend)
    reference = testing.assert_descends(deepopt.muon(0.05, ns_dtype="float64"), steps=10)
    np.testing.assert_allclose(losses, reference, rtol=1e-9)
