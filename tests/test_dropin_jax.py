"""jax_backend as a drop-in optax.GradientTransformation: what optax accepts is accepted (and
computes what optax computes), what deepopt cannot optimise is refused at init, naming it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepopt
import jax_backend


def _run(tx, params, grads_list):
    state = tx.init(params)
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_python_float_leaf_steps_like_optax():
    params = {"scale": 0.5, "w": jnp.ones((3, 4))}
    grads = [{"scale": 0.1 * k, "w": jnp.full((3, 4), 0.2 * k)} for k in range(1, 4)]
    ours = _run(jax_backend.compile(deepopt.sgd(0.1, momentum=0.9)), params, grads)
    ref = _run(optax.sgd(0.1, momentum=0.9), params, grads)
    np.testing.assert_allclose(ours["scale"], ref["scale"], rtol=1e-6)
    np.testing.assert_allclose(ours["w"], ref["w"], rtol=1e-6)


@pytest.mark.parametrize("spec", [deepopt.adamw(0.1), deepopt.muon(0.02), deepopt.m3(0.01)],
                         ids=["adamw", "muon", "m3"])
@pytest.mark.parametrize("dtype,match", [(jnp.complex64, "complex"), (jnp.int32, "floating-point")])
def test_complex_and_integer_leaves_are_refused_at_init_naming_the_leaf(spec, dtype, match):
    params = {"ok": jnp.ones((3, 4)), "bad": jnp.ones((3, 4), dtype)}
    with pytest.raises(ValueError, match=rf"'bad'.*{match}|{match}.*'bad'"):
        jax_backend.compile(spec).init(params)


@pytest.mark.parametrize("value", [float("nan"), -0.1, float("inf"), "0.1"])
def test_bad_learning_rate_and_weight_decay_are_refused(value):
    with pytest.raises(ValueError, match="learning_rate"):
        jax_backend.compile(deepopt.sgd(0.1), learning_rate=value)
    with pytest.raises(ValueError, match="weight_decay"):
        jax_backend.compile(deepopt.sgd(0.1), weight_decay=value)


def test_fallback_follows_the_learning_rate_override_by_the_specs_ratio():
    spec = deepopt.muon(0.02).with_fallback(deepopt.adamw(0.002, weight_decay=0.0))
    schedule = optax.linear_schedule(0.05, 0.01, transition_steps=4)
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    grads = [{"w": jnp.full((4, 3), 0.1 * k), "b": jnp.linspace(-1.0, 1.0, 3) * k} for k in range(1, 5)]
    ours = _run(jax_backend.compile(spec, learning_rate=schedule), params, grads)
    ref = _run(optax.adamw(lambda c: spec.fallback_lr_ratio * schedule(c), weight_decay=0.0),
               {"b": params["b"]}, [{"b": g["b"]} for g in grads])
    np.testing.assert_allclose(ours["b"], ref["b"], rtol=1e-6)


def test_optax_apply_if_finite_skips_a_non_finite_step():
    tx = optax.apply_if_finite(jax_backend.compile(deepopt.muon(0.02)), max_consecutive_errors=3)
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    good = {"w": jnp.full((4, 3), 0.5), "b": jnp.full(3, 0.5)}
    bad = {"w": jnp.full((4, 3), jnp.nan), "b": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update(good, state, params)
    inner = state.inner_state
    updates, state = tx.update(bad, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))      # the step is skipped
    assert int(state.notfinite_count) == 1
    for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(a, b)                               # and the memory kept
