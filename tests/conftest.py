"""Shared test ground: one table of specs and the small problems the tests run them on.

``SPECS`` maps a name to a factory for every preset and its notable variants, with
hyperparameters chosen so that every entry

- computes in float64 on every backend (Newton–Schulz in ``"float64"`` or the input dtype),
  so that backends can be compared to float64 rounding, and
- descends on :class:`deepopt.testing.ConvexQuadratic` with its defaults (``lr`` small).

A test takes a spec by asking for the ``spec`` fixture: it runs once per table entry, or once
per name listed in ``@pytest.mark.specs("sgd", "muon", ...)``, or once per entry for which
``@pytest.mark.specs(where=lambda spec: ...)`` is true. ``spec_name`` gives the name;
``spec_table`` the whole table.

Problems: ``problem`` (one matrix and one vector, five deterministic gradients — small enough
to read in a failure message) and ``model_problem`` (a small model's mixed-rank parameters,
embeddings and a conv kernel included, with twelve gradients of growing scale).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import deepopt

SPECS: dict[str, Callable[[], deepopt.Spec]] = {
    "sgd": lambda: deepopt.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_plain": lambda: deepopt.sgd(0.05),
    "sgd_damped_torch": lambda: deepopt.sgd(0.05, momentum=0.9, dampening=0.3, undamped_first_step=True),
    "adamw": lambda: deepopt.adamw(0.05, weight_decay=0.01),
    "adamw_nesterov": lambda: deepopt.adamw(0.02, betas=(0.5, 0.99), nesterov=True),
    "delta_momentum": lambda: deepopt.delta_momentum(0.05, momentum=0.9, zeta=0.5, weight_decay=0.01),
    "delta_sign": lambda: deepopt.delta_momentum(0.005, momentum=0.5, readout="sign", nesterov=True),
    "delta_newton_schulz": lambda: deepopt.delta_momentum(0.02, momentum=0.9, readout="newton_schulz",
                                                          ns_coefficients="polar_express"),
    "muon": lambda: deepopt.muon(0.02, ns_dtype="float64"),
    "muon_optax": lambda: deepopt.muon(0.02, ns_dtype="input", ns_normalization="add", bias_correction=True,
                                       eps=1e-8, fallback=deepopt.adamw(0.02, eps=1e-8, weight_decay=0.0,
                                                                        nesterov=True)),
    "muon_polar_express": lambda: deepopt.muon(0.02, ns_coefficients="polar_express", nesterov=False,
                                               ns_dtype="float64", adjust_lr_fn="none"),
    "dmgd": lambda: deepopt.dmgd(0.02, hidden=4),
    "dmgd_dot_previous_adam": lambda: deepopt.dmgd(0.005, momentum=0.9, inner_lr=0.5, hidden=3, objective="dot",
                                                   keys="previous", values="adam", nesterov=True),
    "dmgd_newton_schulz": lambda: deepopt.dmgd(0.02, hidden=2, readout="newton_schulz"),
    "m3": lambda: deepopt.m3(0.01, frequency=3),
    "m3_decay": lambda: deepopt.m3(0.01, frequency=2, decay=True, slow_decay=True, weight_decay=0.01),
    "custom": lambda: deepopt.custom(deepopt.UpdateRule(
        memory=deepopt.LinearMemory(momentum=0.8, inner_lr=0.5, zeta=0.3, nesterov=True),
        values=deepopt.AdamValues(beta2=0.99), readout=deepopt.newton_schulz("cubic", 8),
        shape_scale="match_rms_adamw"), lr=0.01, weight_decay=0.01),
}

#: The preset constructors the table covers (each appears under its own name at least).
PRESETS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3", "custom")


def pytest_configure(config):
    config.addinivalue_line("markers", "specs(*names, where=None): run a test taking `spec` only on these "
                                       "SPECS entries (default all) for which where(spec) is true")


def pytest_generate_tests(metafunc):
    if "spec_name" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("specs")
    names = list(marker.args) if marker is not None and marker.args else list(SPECS)
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        raise ValueError(f"{metafunc.definition.nodeid}: unknown SPECS entries {unknown}; known: {sorted(SPECS)}")
    where = marker.kwargs.get("where") if marker is not None else None
    if where is not None:
        names = [name for name in names if where(SPECS[name]())]
    if not names:
        raise ValueError(f"{metafunc.definition.nodeid}: no SPECS entry is selected")
    metafunc.parametrize("spec_name", names)


@pytest.fixture
def spec(spec_name: str) -> deepopt.Spec:
    """A fresh spec from ``SPECS`` (one test per table entry)."""
    return SPECS[spec_name]()


@pytest.fixture
def problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """``w`` (3×4, a matrix rule's) and ``b`` (3, the fallback's), and five gradients."""
    params = {"w": np.linspace(-1, 1, 12).reshape(3, 4), "b": np.array([0.5, -0.5, 1.0])}
    grads = [{"w": np.sin(np.arange(12.0) + t).reshape(3, 4), "b": np.cos(np.arange(3.0) * t)}
             for t in range(1, 6)]
    return params, grads


@pytest.fixture
def model_problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A small model's named parameters (an embedding, a conv kernel, a head and its bias) and
    twelve gradients whose scale grows from 1 to 12."""
    rng = np.random.default_rng(0)
    params = {"embed.weight": rng.standard_normal((6, 4)), "conv.kernel": rng.standard_normal((4, 3, 2)),
              "head.weight": rng.standard_normal((3, 6)), "head.bias": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) * (1 + t) for k, v in params.items()} for t in range(12)]
    return params, grads


@pytest.fixture(scope="session")
def spec_table() -> dict[str, Callable[[], deepopt.Spec]]:
    """``SPECS`` itself, for tests that need several entries at once."""
    return SPECS
