"""Property-testing toolkit for update rules: hypothesis strategies and checks.

deepopt's own test suite is built from these; they are public so that you can test your own
specs and your own implementations the same way. Two modules, both re-exported here:

- :mod:`deepopt.testing.checks` needs numpy only (torch and jax are imported lazily, by the
  backends that use them). **Checks** a user calls on a spec: :func:`assert_backends_agree`
  (every backend gives the same parameters after every step), :func:`assert_reduces_to` (two
  specs give the same trajectory), :func:`assert_descends` (a small step decreases a convex
  quadratic), :func:`assert_scale_stable` (finite for gradient streams from 1e-6 to 1e6, on
  the backends you choose) and :func:`assert_newton_schulz_invariants` (the read-out map is odd,
  scale-invariant and acts on singular values as its scalar polynomial). **Oracles**:
  :func:`polar_factor` (the exact ``U Vᵀ``), :func:`reference_trajectory` and
  :func:`scalar_newton_schulz` (the polynomial composition Newton–Schulz applies to each
  singular value).
- :mod:`deepopt.testing.strategies` needs hypothesis. **Strategies** that draw what an
  optimizer consumes: :func:`shapes`, :func:`matrix_shapes`, :func:`named_params`,
  :func:`gradient_streams`, :func:`gradient_scales`, :func:`problems` and :func:`specs`. They
  are loaded on first use, so ``from deepopt import testing`` and every check work without hypothesis installed.

A backend is the string ``"reference"``, ``"torch"`` or ``"jax"``, or any callable
``run_trajectory(spec, params, grads_stream) -> list[dict[str, np.ndarray]]`` returning the
parameters after each step (float64, torch layout) — so your own implementation can be tested
against deepopt's reference::

    >>> import numpy as np, deepopt
    >>> from deepopt import testing
    >>> spec = deepopt.sgd(lr=0.1, momentum=0.9)
    >>> params = {"w": np.ones((2, 3))}
    >>> grads = [{"w": np.full((2, 3), 0.5)}, {"w": np.full((2, 3), -1.0)}]
    >>> def my_sgd(spec, params, grads_stream):          # heavy ball, written by hand
    ...     w, buf, out = params["w"].copy(), 0.0, []
    ...     for g in grads_stream:
    ...         buf = 0.9 * buf + g["w"]
    ...         w = w - 0.1 * buf
    ...         out.append({"w": w})
    ...     return out
    >>> _ = testing.assert_backends_agree(spec, params, grads, backends=("reference", my_sgd))

Property test of your own rule (hypothesis draws shapes, hyperparameters and streams)::

    from hypothesis import given, settings
    from deepopt import testing

    @settings(max_examples=20, deadline=None)
    @given(spec=testing.specs(kinds=("muon",)), problem=testing.problems(steps=(2, 5)))
    def test_my_backend(spec, problem):
        params, grads = problem
        testing.assert_backends_agree(spec, params, grads, backends=("reference", my_backend))
"""

from __future__ import annotations

import importlib
from typing import Any

from deepopt.testing.checks import DEFAULT_SCALES as DEFAULT_SCALES
from deepopt.testing.checks import Backend as Backend
from deepopt.testing.checks import ConvexQuadratic as ConvexQuadratic
from deepopt.testing.checks import Params as Params
from deepopt.testing.checks import RunTrajectory as RunTrajectory
from deepopt.testing.checks import Trajectory as Trajectory
from deepopt.testing.checks import assert_backends_agree as assert_backends_agree
from deepopt.testing.checks import assert_descends as assert_descends
from deepopt.testing.checks import assert_newton_schulz_invariants as assert_newton_schulz_invariants
from deepopt.testing.checks import assert_reduces_to as assert_reduces_to
from deepopt.testing.checks import assert_scale_stable as assert_scale_stable
from deepopt.testing.checks import polar_factor as polar_factor
from deepopt.testing.checks import reference_trajectory as reference_trajectory
from deepopt.testing.checks import resolve_backend as resolve_backend
from deepopt.testing.checks import run_backend as run_backend
from deepopt.testing.checks import scalar_newton_schulz as scalar_newton_schulz
from deepopt.testing.checks import scale_problem as scale_problem

_STRATEGIES = ("gradient_scales", "gradient_streams", "matrix_shapes", "named_params", "problems", "shapes",
               "specs")

__all__ = [
    "DEFAULT_SCALES", "ConvexQuadratic", "assert_backends_agree", "assert_descends",
    "assert_newton_schulz_invariants", "assert_reduces_to", "assert_scale_stable", "gradient_scales",
    "gradient_streams", "matrix_shapes", "named_params", "polar_factor",
    "problems", "reference_trajectory", "resolve_backend", "run_backend", "scalar_newton_schulz",
    "scale_problem", "shapes", "specs",
]


def __getattr__(name: str) -> Any:
    """Load :mod:`deepopt.testing.strategies` (and hypothesis) when a strategy is first used."""
    if name in _STRATEGIES or name == "strategies":
        try:
            strategies = importlib.import_module("deepopt.testing.strategies")
        except ImportError as err:
            raise ImportError(f"deepopt.testing.{name} needs hypothesis (pip install hypothesis, or the "
                              "'test' extra); the checks in deepopt.testing.checks do not") from err
        return strategies if name == "strategies" else getattr(strategies, name)
    raise AttributeError(f"module 'deepopt.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STRATEGIES) | {"strategies"})
