"""Scale stability (docs/math.md §5): every preset stays finite for gradients from 1e-6 to 1e6,
and DMGD's update is exactly homogeneous in the gradient's scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepopt
import jax_backend
import torch_backend
from deepopt import reference, testing

PRESETS = {
    "sgd": lambda: deepopt.sgd(0.01, momentum=0.9, nesterov=True),
    "adamw": lambda: deepopt.adamw(1e-3),
    "delta_momentum": lambda: deepopt.delta_momentum(0.01),
    "delta_muon": lambda: deepopt.delta_momentum(0.01, readout="newton_schulz"),
    "muon": lambda: deepopt.muon(0.02),
    "m3": lambda: deepopt.m3(1e-3),
    "dmgd": lambda: deepopt.dmgd(0.02),
    "dmgd_dot": lambda: deepopt.dmgd(0.02, objective="dot", momentum=0.9),
    "dmgd_dot_sum": lambda: deepopt.dmgd(0.02, objective="dot", momentum=1.0, inner_lr=1.0),
    "dmgd_previous": lambda: deepopt.dmgd(0.02, keys="previous", nesterov=True),
    "dmgd_adam": lambda: deepopt.dmgd(0.02, values="adam", hidden=32, inner_lr=1.0),
    "deep_muon": lambda: deepopt.dmgd(0.02, readout="newton_schulz"),
    "dmgd_sign": lambda: deepopt.dmgd(0.02, readout="sign", hidden=4),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_finite_across_twelve_decades(name):
    """float64 reference, float32 torch (foreach) and float32 JAX, 24 steps with a spike and a lull."""
    testing.assert_scale_stable(PRESETS[name](), backends=("reference", "torch", "jax"), steps=24)


def test_the_issue_minimal_case_stays_finite_and_was_not_before():
    """dmgd(lr=0.0625, momentum=1, inner_lr=0.5, hidden=1), a 2×2 parameter, gradients ~±100:
    the unnormalised form went NaN within 5 steps; the scale-stable one must not."""
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((2, 2))}
    stream = [{"w": 100 * rng.choice([-1.0, 1.0], size=(2, 2))} for _ in range(50)]
    spec = deepopt.dmgd(lr=0.0625, momentum=1.0, inner_lr=0.5, hidden=1)
    testing.assert_scale_stable(spec, params, stream, scales=(1.0, 1e4), backends=("reference", "torch"))


def test_assert_scale_stable_fails_on_an_unstable_rule():
    """The check can fail: a backend whose update squares the gradient overflows float32 at 1e6."""
    def squaring(spec, params, grads_stream):
        w = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        out = []
        for g in grads_stream:
            w = {k: w[k] - np.float32(0.1) * np.asarray(g[k], np.float32) ** 8 for k in w}
            out.append({k: v.astype(np.float64) for k, v in w.items()})
        return out

    with pytest.raises(AssertionError, match="non-finite at gradient scale 1e\\+06"):
        testing.assert_scale_stable(deepopt.sgd(0.1), backends=(("squaring", squaring),))


# --------------------------------------------------------------------------------------------
# The scaling property: degree 1 (identity values and read-out) or 0 (adam values, sign, NS)
# --------------------------------------------------------------------------------------------


def _degree(spec) -> int:
    rule = spec.rule
    return 0 if (isinstance(rule.values, deepopt.AdamValues)
                 or not isinstance(rule.readout, deepopt.Identity)) else 1


@st.composite
def _homogeneous_dmgd(draw):
    """DMGD specs with no ε that breaks exact homogeneity: no weight decay (its step is degree 0
    in the gradient), adam values with eps = 0."""
    values = draw(st.sampled_from(("identity", "adam")))
    objective = draw(st.sampled_from(("l2", "dot")))
    momentum = draw(st.floats(0.5, 1.0))
    return deepopt.dmgd(
        lr=draw(st.floats(1e-3, 0.1)), momentum=momentum,
        inner_lr=draw(st.floats(0.01, 1.0 if objective == "dot" else 1.0 + momentum)),
        hidden=draw(st.sampled_from((0, 1, 4, 16))), objective=objective,
        keys=draw(st.sampled_from(("current", "previous"))), values=values, eps=0.0,
        readout=draw(st.sampled_from((None, "sign", "newton_schulz"))), nesterov=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)), ns_dtype="float64")


def _moves(spec, params, stream):
    """W_t − W_0 after every step on the reference (W_0 = 0: no rounding from adding W_0)."""
    return [traj["w"] for traj in testing.reference_trajectory(spec, params, stream)]


@settings(max_examples=60, deadline=None)
@given(spec=_homogeneous_dmgd(), c=testing.gradient_scales(2.0**-10, 2.0**20, powers_of_two=True),
       problem=testing.problems(steps=(2, 6), min_params=1, max_params=1, min_dims=2, max_dims=3))
def test_dmgd_update_is_exactly_homogeneous_in_the_gradient_scale(spec, c, problem):
    """update(c·G) = c^d · update(G), bit for bit for c a power of two: d = 1 with identity
    values and read-out (like momentum), d = 0 with adam values or a normalising read-out."""
    params, stream = problem
    (name, shape), = ((k, np.shape(v)) for k, v in params.items())
    zero = {"w": np.zeros(shape)}
    stream = [{"w": g[name]} for g in stream]
    base = _moves(spec, zero, stream)
    scaled = _moves(spec, zero, [{"w": c * g["w"]} for g in stream])
    d = _degree(spec)
    for t, (a, b) in enumerate(zip(scaled, base), 1):
        np.testing.assert_array_equal(a, c**d * b, err_msg=f"step {t}, degree {d}, c = {c}")


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_backends_keep_the_homogeneity_in_float32(backend, c):
    """float32 backends at scales 1e±6 == c × their own unit-scale run, to float32 rounding."""
    spec = deepopt.dmgd(0.02, hidden=8, nesterov=True, readout=None)    # degree 1
    params, stream = testing.scale_problem(steps=15)
    params = {"weight": np.zeros_like(params["weight"])}
    stream = [{"weight": g["weight"]} for g in stream]
    run = torch_backend.run_trajectory if backend == "torch" else jax_backend.run_trajectory
    unit = run(spec, params, stream, dtype="float32")
    scaled = run(spec, params, [{"weight": c * g["weight"]} for g in stream], dtype="float32")
    for t, (a, b) in enumerate(zip(scaled, unit), 1):
        np.testing.assert_allclose(a["weight"] / c, b["weight"], rtol=2e-4, atol=1e-6 * np.abs(b["weight"]).max(),
                                   err_msg=f"step {t}")


# --------------------------------------------------------------------------------------------
# The MLP matters, and it is observable on both backends
# --------------------------------------------------------------------------------------------


def _ls_stream(steps=30, seed=0):
    """Gradients of a least-squares problem along a fixed path: correlated, like training."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((64, 8)), rng.standard_normal((64, 6))
    w = np.zeros((6, 8))
    stream = []
    for _ in range(steps):
        g = (w @ a.T - b.T) @ a / 64
        stream.append({"weight": g})
        w = w - 0.05 * g
    return {"weight": np.zeros((6, 8))}, stream


def test_mlp_changes_the_update_measurably_at_defaults():
    spec = deepopt.dmgd(0.02)
    plain = spec.replace(hidden=0)
    params, stream = _ls_stream()
    deep, lin = (testing.reference_trajectory(s, params, stream)[-1]["weight"] for s in (spec, plain))
    rel = np.linalg.norm(deep - lin) / np.linalg.norm(lin)
    assert rel > 0.05, rel                                  # not numerically negligible
    state = reference.init(spec, params)
    p = params
    for g in stream:
        p, state = reference.step(spec, p, g, state)
    stats = reference.deep_memory_stats(spec.rule, state["weight"], stream[-1]["weight"])
    assert stats["mlp_share"] > 0.05 and 0.0 <= stats["inner_loss"] and stats["value_scale"] > 0


@pytest.mark.parametrize("readout", ["newton_schulz", None])   # JAX: a per-leaf state, a stacked one
@pytest.mark.parametrize("values", ["identity", "adam"])
def test_memory_stats_agree_on_torch_jax_and_reference(values, readout):
    spec = deepopt.dmgd(0.02, hidden=8, values=values, readout=readout)
    params, stream = _ls_stream(steps=12)
    params["bias"] = np.zeros(6)                             # routed to the fallback: no stats
    stream = [{**g, "bias": np.ones(6)} for g in stream]

    state, p = reference.init(spec, params), params
    for g in stream:
        p, state = reference.step(spec, p, g, state)
    want = reference.deep_memory_stats(spec.rule, state["weight"], stream[-1]["weight"])

    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = torch_backend.compile(spec, list(tensors.items()))
    for g in stream:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        opt.step()
    got_torch = torch_backend.memory_stats(opt)
    assert set(got_torch) == {"weight"}

    import jax
    import jax.numpy as jnp
    import optax
    jax.config.update("jax_enable_x64", True)
    tx = jax_backend.compile(spec, layout="torch")
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jstate = tx.init(jp)
    for g in stream:
        jg = {k: jnp.asarray(v) for k, v in g.items()}
        updates, jstate = tx.update(jg, jstate, jp)
        jp = optax.apply_updates(jp, updates)
    got_jax = jax_backend.memory_stats(spec, jstate, jg, layout="torch")
    assert set(got_jax) == {"weight"}
    for got in (got_torch["weight"], got_jax["weight"]):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert want["mlp_share"] > 0.01 and 0 < want["inner_loss"] < 10


@st.composite
def _any_dmgd(draw):
    """Every deep memory: both objectives, both key modes, every read-out and values, any width,
    retention and inner rate in their valid ranges (l2: η ≤ 1 + α)."""
    objective = draw(st.sampled_from(("l2", "dot")))
    momentum = draw(st.floats(0.0, 1.0))
    return deepopt.dmgd(
        lr=draw(st.floats(1e-3, 0.1)), momentum=momentum,
        inner_lr=draw(st.floats(0.0, 1.0 + momentum if objective == "l2" else 4.0)),
        hidden=draw(st.integers(0, 64)), objective=objective,
        keys=draw(st.sampled_from(("current", "previous"))),
        values=draw(st.sampled_from(("identity", "adam"))),
        readout=draw(st.sampled_from((None, "sign", "newton_schulz"))), nesterov=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)))


@settings(max_examples=50, deadline=None)
@given(spec=_any_dmgd(), seed=st.integers(0, 2**16))
def test_every_deep_memory_is_finite_from_1e_minus_6_to_1e6(spec, seed):
    """The float64 reference over 60 steps with a spike and a lull, at the extreme scales."""
    testing.assert_scale_stable(spec, scales=(1e-6, 1.0, 1e6), steps=60, seed=seed)


def test_jax_memory_stats_on_stacked_optax_kernels_are_per_matrix():
    """A (L, in, out) leaf under layout="optax": one entry per matrix, each equal to the stats of
    that matrix run alone (the stacked kernel is L independent memories)."""
    import jax.numpy as jnp
    import optax

    spec = deepopt.dmgd(0.02, hidden=4)
    rng = np.random.default_rng(5)
    stack = rng.standard_normal((2, 6, 4))                     # two (in=6, out=4) kernels
    grads = [rng.standard_normal((2, 6, 4)) for _ in range(5)]

    def run(params, stream):
        tx = jax_backend.compile(spec)
        state = tx.init(params)
        for g in stream:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return jax_backend.memory_stats(spec, state, stream[-1])

    stacked = run({"w": jnp.asarray(stack)}, [{"w": jnp.asarray(g)} for g in grads])
    assert set(stacked) == {"w[0]", "w[1]"}
    alone = run({"w": jnp.asarray(stack[1])}, [{"w": jnp.asarray(g[1])} for g in grads])
    for key, value in alone["w"].items():
        assert stacked["w[1]"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert stacked["w[0]"]["mlp_share"] != pytest.approx(stacked["w[1]"]["mlp_share"])
