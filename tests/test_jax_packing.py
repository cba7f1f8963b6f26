"""The fallback's small 1-D leaves packed into one vector per dtype (jax_backend/_packing.py):
the same updates and state as leaf by leaf, the state's layout, and where packing is not done."""

from __future__ import annotations

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepopt
import jax_backend
from jax_backend import _compile, _packing

from _helpers import optax_states


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)   # noqa: E731
    return {
        "embed": f32(12, 5),                                       # 2-D, routed to the fallback
        "blocks": [{"w": f32(5, 7), "b": f32(7), "gain": f32(5)},
                   {"w": f32(7, 5), "b": f32(5), "gain": f32(7)}],
        "scale": f32(),                                            # a scalar
        "half": jnp.asarray(rng.normal(size=9), jnp.bfloat16),     # another dtype, its own vector
        "big": f32(_packing.MAX_PACKED_SIZE + 1),                  # 1-D but above the size: per leaf
        "frozen": None,
    }


def _grads(params: dict, step: int) -> dict:
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 10.0 ** (step % 3 - 1), p.dtype), params)


SPECS = {
    "muon_adamw": deepopt.muon(0.02, routing=deepopt.Routing(fallback_patterns=("^embed$",))).with_fallback(
        deepopt.adamw(0.003, weight_decay=0.1)),
    "dmgd_sgd_nesterov": deepopt.dmgd(0.02, readout=None).with_fallback(
        deepopt.sgd(0.01, momentum=0.9, nesterov=True, weight_decay=0.01)),
    # ζ > 0 reads a 2-D leaf as a matrix (the embedding), a 1-D one element-wise (ζ = 0)
    "muon_delta_momentum": deepopt.muon(0.02, routing=deepopt.Routing(fallback_patterns=("^embed$",))).with_fallback(
        deepopt.delta_momentum(0.01, zeta=0.5)),
}


def _run(tx, params, steps: int, *, jit: bool = True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    states, out = [], []
    for t in range(steps):
        updates, state = update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
        states.append(state)
    return out, states


def _per_leaf(tx_factory, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(_compile, "packable", lambda rule: False)
        return tx_factory()


def _close(a, b) -> None:
    """Equal up to a few roundings of their dtype: the math per element is the same, but XLA may
    contract a multiply-add into an FMA in one loop and not in the other (a 0-d leaf's update
    differed by one float32 ulp under x64, most likely so; not traced). Counts and other integers: exactly."""
    dtype = jnp.result_type(b)
    if not jnp.issubdtype(dtype, jnp.floating):
        np.testing.assert_array_equal(a, b)
        return
    eps = float(jnp.finfo(dtype).eps)
    a64, b64 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
    np.testing.assert_allclose(a64, b64, rtol=8 * eps, atol=8 * eps * max(float(np.abs(b64).max(initial=0.0)), 1e-30))


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_packed_fallback_steps_as_leaf_by_leaf(name, x64, monkeypatch):
    """Every parameter and every state field, after each of 6 steps across three decades of
    gradient scale: equal to the fallback run leaf by leaf, to a few roundings (element-wise
    math; bit for bit in most runs, see :func:`_close`); float32 leaves with and without x64
    (where the rules' scalars are float64)."""
    if not hasattr(jax, "enable_x64"):
        pytest.skip("this jax has no jax.enable_x64 context")
    with jax.enable_x64(x64):
        _packed_against_per_leaf(SPECS[name], monkeypatch)


def _packed_against_per_leaf(spec, monkeypatch):
    params = _params()
    packed_tx = jax_backend.compile(spec)
    plain_tx = _per_leaf(lambda: jax_backend.compile(spec), monkeypatch)
    ours, our_states = _run(packed_tx, params, 6)
    theirs, their_states = _run(plain_tx, params, 6)
    assert optax_states(our_states[-1], _packing.PackedState), "the fallback was not packed"
    assert not optax_states(their_states[-1], _packing.PackedState)
    for a, b in zip(ours, theirs):
        jax.tree.map(_close, a, b)
    for ours_t, theirs_t in zip(our_states, their_states):
        unpacked = jax.tree.map(lambda x: x.per_leaf(params) if isinstance(x, _packing.PackedState) else x,
                                ours_t, is_leaf=lambda x: isinstance(x, _packing.PackedState))
        assert jax.tree.structure(unpacked) == jax.tree.structure(theirs_t)
        jax.tree.map(_close, unpacked, theirs_t)


def test_packed_state_layout_one_vector_per_dtype():
    params = _params()
    state = jax_backend.compile(SPECS["muon_adamw"]).init(params)
    (packed,) = optax_states(state, _packing.PackedState)
    fields = [x for x in jax.tree.leaves(packed.inner, is_leaf=lambda x: isinstance(x, _packing.Packed))
              if isinstance(x, _packing.Packed)]
    assert len(fields) == 2                                        # AdamW's m and v
    for field in fields:
        f32, bf16 = field.vectors                                  # dtypes in order of first appearance
        assert f32.dtype == jnp.float32 and f32.shape == (7 + 5 + 5 + 7 + 1,)
        assert bf16.dtype == jnp.bfloat16 and bf16.shape == (9,)
        kept = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(field.leaves)}
        assert kept == {"['embed']", "['big']"}                    # the 2-D and the large 1-D leaf


def test_a_mesh_keeps_the_fallback_leaf_by_leaf():
    """Sharded parameters: the state stays as the parameters are laid out (and sharded)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, sharding)
    tx = jax_backend.compile(deepopt.muon(0.02))
    state = tx.init(params)
    assert not optax_states(state, _packing.PackedState)
    updates, _ = jax.jit(tx.update)({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, state, params)
    assert updates["b"].shape == (3,)


def test_a_custom_part_is_not_packed():
    """A part deepopt does not know to be element-wise keeps its leaves apart."""
    @dataclasses.dataclass(frozen=True)
    class ClippedValues(deepopt.IdentityValues):
        pass

    rule = dataclasses.replace(deepopt.sgd(0.1, momentum=0.9).rule, values=ClippedValues())
    assert _packing.packable(deepopt.sgd(0.1, momentum=0.9).rule)
    assert _packing.packable(deepopt.adamw(0.1).rule)
    assert not _packing.packable(rule)
    assert not _packing.packable(deepopt.muon(0.02).rule)


def test_an_update_for_another_tree_is_refused():
    tx = jax_backend.compile(deepopt.muon(0.02))
    state = tx.init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)})
    other = {"w": jnp.ones((4, 3)), "b": jnp.ones(5)}
    with pytest.raises(ValueError, match=r"packed vectors hold \(3,\).*hold \(5,\)"):
        tx.update(other, state, other)


def test_packed_state_round_trips_through_a_checkpoint():
    """Pickled mid-run (a checkpoint of plain arrays), the run resumes bit for bit."""
    spec = SPECS["muon_adamw"]
    params = _params()
    tx = jax_backend.compile(spec)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(2):
        updates, state = update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    for t in range(2, 4):
        a, state = update(_grads(params, t), state, params)
        b, restored = update(_grads(params, t), restored, params)
        jax.tree.map(np.testing.assert_array_equal, a, b)
        params = optax.apply_updates(params, a)


def test_packing_works_inside_inject_hyperparams_and_eval_shape():
    spec = SPECS["muon_adamw"]
    params = _params()
    tx = optax.inject_hyperparams(lambda learning_rate: jax_backend.compile(spec, learning_rate=learning_rate))(
        learning_rate=0.02)
    shapes = jax.eval_shape(tx.init, params)
    state = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    updates, state = jax.jit(tx.update)(_grads(params, 0), state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_a_bad_max_size_is_refused_and_per_leaf_takes_the_one_given():
    for bad in (-1, 2.5, "64", True):
        with pytest.raises(ValueError, match="max_size"):
            jax_backend.pack_small_leaves(optax.adam(0.1), max_size=bad)
    params = {"a": jnp.ones(3), "b": jnp.ones(100)}
    tx = jax_backend.pack_small_leaves(optax.adam(0.1), max_size=10)      # packs "a" only
    state = tx.init(params)
    mu = state.per_leaf(params, max_size=10)[0].mu
    assert mu["a"].shape == (3,) and mu["b"].shape == (100,)
    with pytest.raises(ValueError, match="another max_size"):
        state.per_leaf(params)                                            # the default packs both


def test_packing_works_inside_multisteps_and_masked():
    """optax wrappers that map over the state (MultiSteps' accumulation and cond) or mask leaves
    (``optax.masked``: a masked leaf never reaches the fallback) step a packed spec under jit."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "c": jnp.ones(5)}
    grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.full(3, 0.2), "c": jnp.full(5, 0.3)}
    multi = optax.MultiSteps(jax_backend.compile(SPECS["muon_adamw"]), every_k_schedule=2)
    state = multi.init(params)
    assert optax_states(state, _packing.PackedState)
    for k in range(4):
        updates, state = jax.jit(multi.update)(grads, state, params)
        moved = bool(jnp.any(updates["b"] != 0))
        assert moved == (k % 2 == 1)                                       # every second step
    masked = optax.masked(jax_backend.compile(SPECS["muon_adamw"]), {"w": True, "b": True, "c": False})
    state = masked.init(params)
    updates, state = jax.jit(masked.update)(grads, state, params)
    np.testing.assert_array_equal(updates["c"], grads["c"])                 # passed through
    assert bool(jnp.all(updates["b"] < 0))                                  # AdamW's step on b
    (packed,) = optax_states(state, _packing.PackedState)
    mu = [x for x in jax.tree.leaves(packed.inner, is_leaf=lambda x: isinstance(x, _packing.Packed))
          if isinstance(x, _packing.Packed)][0]
    assert [v.shape for v in mu.vectors] == [(3,)]                          # b alone is packed
