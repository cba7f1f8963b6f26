"""Conformance: hypothesis draws specs of every preset, parameters and gradient streams, and
checks what a drop-in optimizer owes its users.

1. reference == torch == jax, step by step (float64);
2. a state-dict round trip mid-stream (through ``torch.save``) resumes bit for bit;
3. finite inputs at sane hyperparameters give finite parameters and state;
4. a group edit mid-stream either takes effect — the step equals that of an optimizer built
   with the edited spec from the same state — or raises and leaves everything unchanged.

The default suite runs a small profile (a few examples each). The full run, 10,000 generated
cases over the four properties, is marked ``slow``::

    python -m pytest -q -m slow tests/test_conformance.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_backend
from deepopt import testing

import _helpers
from _helpers import assert_tensors_equal, torch_params, torch_states, torch_step

KINDS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3")
#: A hypothesis strategy (drawn hyperparameters), not a table: the table is tests/conftest.py's
#: SPECS, which the ``test_table_*`` cases below run on.
DRAWN_SPECS = testing.specs(kinds=KINDS)
PROBLEMS = testing.problems(steps=(2, 6), max_params=3, max_side=5)
# Examples per property: the default suite's, and the slow run's (2,000 + 3 × 2,667 ≥ 10,000).
SMALL = settings(max_examples=6, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FULL_BACKENDS = settings(SMALL, max_examples=2000, derandomize=False)
FULL = settings(SMALL, max_examples=2667, derandomize=False)


# --------------------------------------------------------------------------------------------
# The four properties
# --------------------------------------------------------------------------------------------


def check_backends_agree(spec, problem):
    params, grads = problem
    testing.assert_backends_agree(spec, params, grads, rtol=1e-8, atol=1e-10)


def check_round_trip(spec, problem, cut):
    params, grads = problem
    _helpers.assert_resume_is_exact(spec, params, grads, cut=min(cut, len(grads) - 1))


def check_finite(spec, problem):
    params, grads = problem
    tparams = torch_params(params)
    opt = torch_backend.compile(spec, tparams.items())
    for g in grads:
        torch_step(opt, tparams, g)
    for n, p in tparams.items():
        assert torch.isfinite(p).all(), n
        for k, v in opt.state[p].items():
            assert torch.isfinite(v).all(), (n, k)


def check_group_edit(spec, edit, problem) -> bool:
    """Write ``edit`` into the rule group after the first half of the stream (``lr`` into every
    group, as schedulers and scripts write it). Returns whether the edit took effect (False:
    the step raised and changed nothing)."""
    params, grads = problem
    a = torch_params(params)
    opt = torch_backend.compile(spec, a.items())
    half = len(grads) // 2
    for g in grads[:half]:
        torch_step(opt, a, g)
    before = ({n: p.detach().clone() for n, p in a.items()}, torch_states(opt, a))
    for group in opt.param_groups:
        group.update({k: v for k, v in edit.items() if k == "lr" or group["route"] == "rule"})
    try:
        torch_step(opt, a, grads[half])
    except ValueError:
        assert_tensors_equal({n: p.detach() for n, p in a.items()}, before[0], "params")
        assert_tensors_equal(torch_states(opt, a), before[1], "state")
        return False
    # It took effect: the same step as an optimizer built with the edited spec, same state.
    b = {n: torch.nn.Parameter(t.clone()) for n, t in before[0].items()}
    ref = torch_backend.compile(spec.replace(**edit), b.items())
    for n, p in b.items():
        ref.state[p] = {k: v.clone() for k, v in before[1][n].items()}
    torch_step(ref, b, grads[half])
    assert_tensors_equal({n: p.detach() for n, p in a.items()}, {n: p.detach() for n, p in b.items()}, "params")
    assert_tensors_equal(torch_states(opt, a), torch_states(ref, b), "state")
    return True


_BAD_VALUES = (-1.0, 1.5, float("nan"), float("inf"), "bogus", None, 10**6, (0.5,))


@st.composite
def _edits(draw):
    """``(spec, edit)``: another valid spec's values for 1–3 keys, or (half the time) one key
    set to a value that is often out of range for it."""
    spec = draw(DRAWN_SPECS)
    if draw(st.booleans()):
        return spec, {draw(st.sampled_from(sorted(spec.hyperparameters))): draw(st.sampled_from(_BAD_VALUES))}
    other = draw(testing.specs(kinds=(spec.name,)))
    keys = draw(st.lists(st.sampled_from(sorted(spec.hyperparameters)), min_size=1, max_size=3, unique=True))
    return spec, {k: other.hyperparameters[k] for k in keys}


# --------------------------------------------------------------------------------------------
# Default profile
# --------------------------------------------------------------------------------------------


@SMALL
@given(spec=DRAWN_SPECS, problem=PROBLEMS)
def test_backends_agree(spec, problem):
    check_backends_agree(spec, problem)


@SMALL
@given(spec=DRAWN_SPECS, problem=PROBLEMS, cut=st.integers(1, 5))
def test_state_dict_round_trip_mid_stream_is_bit_identical(spec, problem, cut):
    check_round_trip(spec, problem, cut)


@SMALL
@given(spec=DRAWN_SPECS, problem=PROBLEMS)
def test_finite_inputs_give_finite_parameters_and_state(spec, problem):
    check_finite(spec, problem)


@SMALL
@given(edit=_edits(), problem=PROBLEMS)
def test_group_edits_take_effect_or_change_nothing(edit, problem):
    check_group_edit(*edit, problem)


# --------------------------------------------------------------------------------------------
# The shared spec table (tests/conftest.py) on its model problem: every entry, no drawing
# (backend agreement and the round trip over the table: test_jax_backend, test_torch_backend)
# --------------------------------------------------------------------------------------------


def test_table_finite_inputs_give_finite_parameters_and_state(spec, model_problem):
    check_finite(spec, model_problem)


def test_table_lr_and_weight_decay_edits_take_effect(spec, model_problem):
    assert check_group_edit(spec, {"lr": spec.lr / 2, "weight_decay": 0.05}, model_problem)


@pytest.mark.parametrize("edit", [{"lr": -1.0}, {"weight_decay": float("nan")}], ids=["lr", "weight_decay"])
def test_table_bad_edits_raise_and_change_nothing(spec, model_problem, edit):
    assert not check_group_edit(spec, edit, model_problem)


# --------------------------------------------------------------------------------------------
# Full run: python -m pytest -q -m slow tests/test_conformance.py
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@FULL_BACKENDS
@given(spec=DRAWN_SPECS, problem=PROBLEMS)
def test_slow_backends_agree(spec, problem):
    check_backends_agree(spec, problem)


@pytest.mark.slow
@FULL
@given(spec=DRAWN_SPECS, problem=PROBLEMS, cut=st.integers(1, 5))
def test_slow_state_dict_round_trip_mid_stream_is_bit_identical(spec, problem, cut):
    check_round_trip(spec, problem, cut)


@pytest.mark.slow
@FULL
@given(spec=DRAWN_SPECS, problem=PROBLEMS)
def test_slow_finite_inputs_give_finite_parameters_and_state(spec, problem):
    check_finite(spec, problem)


@pytest.mark.slow
@FULL
@given(edit=_edits(), problem=PROBLEMS)
def test_slow_group_edits_take_effect_or_change_nothing(edit, problem):
    check_group_edit(*edit, problem)


def test_the_full_run_draws_at_least_ten_thousand_cases():
    assert FULL_BACKENDS.max_examples + 3 * FULL.max_examples >= 10_000
    assert np.all([s.max_examples <= 10 for s in (SMALL,)])
