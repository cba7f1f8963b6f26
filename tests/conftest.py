"""Shared test ground: one table of specs and the small problems the tests run them on.

``SPECS`` maps a name to a factory for every preset and its notable variants (the one table of
the suite: a test module keeps no spec table of its own), with hyperparameters chosen so that
every entry

- computes in float64 on every backend (Newton–Schulz in ``"float64"`` or the input dtype),
  so that backends can be compared to float64 rounding — except the two entries named for a
  lower Newton–Schulz dtype, ``muon_bfloat16`` (torch's default) and ``muon_float32``: a test
  that compares to float64 rounding selects ``where=_helpers.exact_in_float64``, or allows
  the rounding of ``_helpers.compute_dtype(spec)``;
- descends on :class:`deepopt.testing.ConvexQuadratic` with its defaults (``lr`` small), so
  no entry maximizes (``_helpers.maximized(spec)`` flips sgd, adamw and custom entries).

A test takes a spec by asking for the ``spec`` fixture: it runs once per table entry, or once
per name listed in ``@pytest.mark.specs("sgd", "muon", ...)``, or once per entry for which
``@pytest.mark.specs(where=lambda spec: ...)`` is true. ``spec_name`` gives the name;
``spec_table`` the whole table. Processes that a test starts read the table with
``from conftest import SPECS`` (tests/ is on their path).

Problems: ``problem`` (one matrix and one vector, five deterministic gradients — small enough
to read in a failure message) and ``model_problem`` (a small model's mixed-rank parameters,
embeddings and a conv kernel included, with twelve gradients of growing scale). Shared
builders, runners and comparisons live in tests/_helpers.py.

Markers (declared in pyproject.toml): ``slow`` (left out by default: ``-m slow``), ``gpu``
(skipped here unless torch sees a CUDA device) and ``distributed`` (gloo processes, forced
host devices).
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
    "sgd_heavy_ball": lambda: deepopt.sgd(0.05, momentum=0.9, weight_decay=0.01),
    "sgd_decoupled_decay": lambda: deepopt.sgd(0.05, momentum=0.5, weight_decay=0.1, decoupled_weight_decay=True),
    "sgd_dampened_no_momentum": lambda: deepopt.sgd(0.05, dampening=0.5, undamped_first_step=True),
    "adamw": lambda: deepopt.adamw(0.05, weight_decay=0.01),
    "adamw_nesterov": lambda: deepopt.adamw(0.02, betas=(0.5, 0.99), nesterov=True),
    "delta_momentum": lambda: deepopt.delta_momentum(0.05, momentum=0.9, zeta=0.5, weight_decay=0.01),
    "delta_sign": lambda: deepopt.delta_momentum(0.005, momentum=0.5, readout="sign", nesterov=True),
    "delta_newton_schulz": lambda: deepopt.delta_momentum(0.02, momentum=0.9, readout="newton_schulz",
                                                          ns_coefficients="polar_express"),
    "delta_newton_schulz_cubic_sgd_fallback": lambda: deepopt.delta_momentum(
        0.05, momentum=0.9, zeta=1.2, readout="newton_schulz", ns_coefficients="cubic", ns_steps=7,
        adjust_lr_fn="match_rms_adamw", weight_decay=0.01, decoupled_weight_decay=True,
        fallback=deepopt.sgd(0.05, momentum=0.9)),
    "muon": lambda: deepopt.muon(0.02, ns_dtype="float64"),
    "muon_optax": lambda: deepopt.muon(0.02, ns_dtype="input", ns_normalization="add", bias_correction=True,
                                       eps=1e-8, fallback=deepopt.adamw(0.02, eps=1e-8, weight_decay=0.0,
                                                                        nesterov=True)),
    "muon_add_bias_correction_rms": lambda: deepopt.muon(0.02, ns_dtype="float64", ns_normalization="add",
                                                          bias_correction=True, adjust_lr_fn="match_rms_adamw"),
    "muon_polar_express": lambda: deepopt.muon(0.02, ns_coefficients="polar_express", nesterov=False,
                                               ns_dtype="float64", adjust_lr_fn="none"),
    # torch's default Newton–Schulz dtype, and float32: not float64-exact (see the module docstring).
    "muon_bfloat16": lambda: deepopt.muon(0.02),
    "muon_float32": lambda: deepopt.muon(0.02, ns_dtype="float32"),
    "dmgd": lambda: deepopt.dmgd(0.02, hidden=4),
    "dmgd_dot_previous_adam": lambda: deepopt.dmgd(0.005, momentum=0.9, inner_lr=0.5, hidden=3, objective="dot",
                                                   keys="previous", values="adam", nesterov=True,
                                                   weight_decay=0.01, ns_dtype="input"),
    "dmgd_newton_schulz": lambda: deepopt.dmgd(0.02, hidden=2, readout="newton_schulz", ns_dtype="input"),
    "dmgd_hidden0_dot": lambda: deepopt.dmgd(0.02, momentum=0.9, inner_lr=1.0, hidden=0, objective="dot",
                                             ns_dtype="input"),
    "m3": lambda: deepopt.m3(0.01, frequency=3, ns_dtype="input"),
    "m3_decay": lambda: deepopt.m3(0.01, frequency=2, decay=True, slow_decay=True, weight_decay=0.01,
                                   ns_dtype="input"),
    "m3_every_step": lambda: deepopt.m3(0.01, frequency=1, slow_weight=0.5, ns_dtype="input"),
    "custom": lambda: deepopt.custom(deepopt.UpdateRule(
        memory=deepopt.LinearMemory(momentum=0.8, inner_lr=0.5, zeta=0.3, nesterov=True),
        values=deepopt.AdamValues(beta2=0.99), readout=deepopt.newton_schulz("cubic", 8),
        shape_scale="match_rms_adamw"), lr=0.01, weight_decay=0.01),
    "custom_cubic_adam_values": lambda: deepopt.custom(deepopt.UpdateRule(
        memory=deepopt.LinearMemory(momentum=0.9, inner_lr=0.1, zeta=0.3), values=deepopt.AdamValues(beta2=0.99),
        readout=deepopt.newton_schulz("cubic", 6, dtype="float64"), shape_scale="original"),
        lr=0.02, weight_decay=0.01),
    # AdamValues preconditioning a delta memory: the key uses the raw G, the value P(G).
    "custom_adam_values_delta": lambda: deepopt.custom(deepopt.UpdateRule(
        memory=deepopt.LinearMemory(momentum=0.9, inner_lr=0.1, zeta=0.3, nesterov=True),
        values=deepopt.AdamValues(beta2=0.95, eps=1e-8),
        readout=deepopt.newton_schulz("polar_express", 5, dtype="float64"),
        shape_scale="original"), lr=0.03, weight_decay=0.02),
    # A bias-corrected delta memory, sign read-out, Adam's denominator and coupled (L2) decay.
    "custom_sign_denominator": lambda: deepopt.custom(deepopt.UpdateRule(
        memory=deepopt.LinearMemory(momentum=0.8, inner_lr=0.2, zeta=0.5, bias_correction=True),
        values=deepopt.AdamValues(), readout=deepopt.Sign(),
        denominator=deepopt.SecondMoment(beta2=0.9, eps=1e-6, bias_correction=False),
        decoupled_weight_decay=False), lr=0.03, weight_decay=0.02),
}

#: The preset constructors the table covers (each appears under its own name at least).
PRESETS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3", "custom")


def pytest_configure(config):
    config.addinivalue_line("markers", "specs(*names, where=None): run a test taking `spec` only on these "
                                       "SPECS entries (default all) for which where(spec) is true")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip, with the reason, where torch sees no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu and not _cuda_available():
        skip = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False)")
        for item in gpu:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def native():
    """``torch.ops.deepopt``: deepopt's CPU kernels (torch_backend/_native.py), built if need be;
    the test is skipped where they are off or cannot be built here."""
    from torch_backend import _native

    ops = _native.ops()
    if ops is None:
        pytest.skip("deepopt's CPU kernels could not be built here (see the warning)")
    return ops
