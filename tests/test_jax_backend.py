"""jax_backend against the numpy reference and against itself computed another way.

- every entry of the shared spec table (tests/conftest.py) == ``deepopt.reference`` step by step
  (float64, torch layout), maximizing too where the spec can;
- the one Newton–Schulz == the reference's, batched == one matrix at a time;
- layout="optax" on a kernel == layout="torch" on its transpose; a stacked (L, in, out) leaf ==
  L separate matrices;
- routing by ndim / name pattern / predicate == the fallback spec compiled alone;
- optax integration: inject_hyperparams (traced lr and weight decay), schedules, MultiSteps,
  chain, jit without retracing, None leaves; bad arguments.
"""

import jax

jax.config.update("jax_enable_x64", True)  # the reference is float64

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings

import deepopt
import jax_backend
from deepopt import reference, testing

import _helpers
from _helpers import assert_trajectories_close, jax_run, reference_run, to_jax

# Torch-layout parameters: a wide and a tall matrix, a conv kernel (out, in, kh, kw) whose
# matrix view is 4 × 12, and a bias (fallback path for matrix rules).
SHAPES = {"0.weight": (4, 7), "head.weight": (9, 3), "conv.weight": (4, 3, 2, 2),
          "0.bias": (4,)}
STEPS = 6
MISSING = (("0.weight", 2), ("0.bias", 4))      # (name, step): that parameter sits the step out


def _named(shapes=SHAPES, seed=0, steps=STEPS, missing=MISSING):
    return _helpers.random_problem(shapes, steps, seed, missing)


# --------------------------------------------------------------------------------------------
# Every table entry == the reference (float64, torch layout)
# --------------------------------------------------------------------------------------------


def _check_equals_reference(spec):
    params, stream = _named()
    ours = jax_backend.run_trajectory(spec, params, stream, dtype="float64", layout="torch")
    assert_trajectories_close(ours, reference_run(spec, params, stream))
    # A missing gradient leaves its parameter exactly as it was (reference and torch semantics).
    np.testing.assert_array_equal(ours[2]["0.weight"], ours[1]["0.weight"])


@pytest.mark.specs(where=_helpers.exact_in_float64)
def test_every_spec_equals_reference_float64(spec):
    _check_equals_reference(spec)


@pytest.mark.specs("sgd_decoupled_decay", "adamw_nesterov", "custom_sign_denominator")
def test_maximize_equals_reference_float64(spec):
    _check_equals_reference(_helpers.maximized(spec))


@pytest.mark.slow
@pytest.mark.specs(where=_helpers.has_maximize)
def test_slow_every_maximizable_spec_equals_reference_float64(spec):
    _check_equals_reference(_helpers.maximized(spec))


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=testing.specs(), problem=testing.problems(steps=(1, 5)))
def test_drawn_specs_and_streams_equal_reference(spec, problem):
    """deepopt.testing's strategies: presets with drawn hyperparameters, shapes (1-D to 3-D,
    torch layout) and gradient streams (cheap: each example compiles once)."""
    params, stream = problem
    testing.assert_backends_agree(spec, params, stream, backends=("reference", "jax"),
                                  rtol=1e-10, atol=1e-12)


@pytest.mark.specs("muon_optax")
def test_float32_run_stays_near_reference(spec):
    params, stream = _named()
    ours = jax_backend.run_trajectory(spec, params, stream, dtype="float32")
    assert_trajectories_close(ours, reference_run(spec, params, stream), rtol=1e-5, atol=1e-5)


@pytest.mark.specs("muon_bfloat16")
def test_muon_bfloat16_newton_schulz_within_bf16_precision(spec):
    """torch's default: NS in bfloat16 (8 mantissa bits). One step's update differs from the
    float64 reference's by bf16 rounding amplified by five quintic steps: ~6% in Frobenius
    norm (measured), not more, and clearly more than float32 rounding."""
    assert spec.hyperparameters["ns_dtype"] == "bfloat16"
    spec = spec.replace(weight_decay=0.0)
    params, stream = _named(shapes={"w": (8, 16)}, steps=1, missing=())
    ours = jax_backend.run_trajectory(spec, params, stream)[0]["w"]
    ref = reference_run(spec, params, stream)[0]["w"]
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref - params["w"])
    assert 1e-3 < rel < 0.15


# --------------------------------------------------------------------------------------------
# Newton–Schulz: one implementation, batched
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coefficients,normalization", [("muon", "clamp"),
                                                        ("polar_express", "add"),
                                                        ("cubic", "clamp")])
def test_newton_schulz_equals_reference_and_batches(coefficients, normalization):
    ns = deepopt.newton_schulz(coefficients, 6, normalization=normalization)
    x = np.random.default_rng(3).normal(size=(3, 5, 8))
    for batch in (x, np.swapaxes(x, -1, -2)):         # wide and tall
        ours = np.asarray(jax_backend.newton_schulz(jnp.asarray(batch), ns))
        for i in range(len(batch)):
            np.testing.assert_allclose(ours[i], reference.newton_schulz(batch[i], ns),
                                       rtol=1e-12, atol=1e-12)


# Relative Frobenius error of a float32 input orthogonalised in each compute dtype, against the
# float64 reference on the same (float32-rounded) input: bf16 ~6%, float32 ~1e-6, float64 only
# the final cast back to float32 (~3e-8).
@pytest.mark.parametrize("dtype,low,high", [("bfloat16", 1e-3, 0.15), ("float32", 1e-8, 1e-5),
                                            ("float64", 0.0, 1e-7)])
def test_newton_schulz_compute_dtype_casts_back(dtype, low, high):
    ns = deepopt.newton_schulz("muon", 5, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 10)), jnp.float32)
    with jax.default_matmul_precision("highest"):   # a GPU's default float32 dot is TF32 (rel 5e-4 on an H200)
        out = jax_backend.newton_schulz(x, ns)
    assert out.dtype == jnp.float32
    want = reference.newton_schulz(np.asarray(x, np.float64), ns)
    rel = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert low < rel < high


# --------------------------------------------------------------------------------------------
# Matrix views: optax layout, batch axes
# --------------------------------------------------------------------------------------------

MATRIX_SPECS = ("delta_newton_schulz_cubic_sgd_fallback", "muon", "custom_adam_values_delta",
                "custom_sign_denominator")


@pytest.mark.specs(*MATRIX_SPECS)
def test_optax_layout_kernel_equals_torch_layout_transpose(spec):
    rng = np.random.default_rng(5)
    kernels = {"wide": rng.normal(size=(9, 4)), "tall": rng.normal(size=(3, 8))}   # (in, out)
    stream = [{k: rng.normal(size=v.shape) for k, v in kernels.items()} for _ in range(4)]
    t = lambda tree: {k: np.asarray(v).T for k, v in tree.items()}
    optax_run = jax_run(jax_backend.compile(spec, layout="optax"), to_jax(kernels),
                                to_jax(stream))
    torch_run = jax_run(jax_backend.compile(spec, layout="torch"), to_jax(t(kernels)),
                                to_jax([t(g) for g in stream]))
    assert_trajectories_close([t(p) for p in optax_run], torch_run, rtol=1e-12, atol=1e-13)
    # And the torch layout is the reference's (torch (out, in) = optax kernelᵀ).
    assert_trajectories_close(torch_run, reference_run(spec, t(kernels), [t(g) for g in stream]))


@pytest.mark.specs(*MATRIX_SPECS)
def test_stacked_leaf_equals_independent_matrices(spec):
    """A (L, in, out) leaf in optax layout is L matrices, each with its own key norm, NS
    normalisation and shape scale (the shared state is element-wise anyway)."""
    rng = np.random.default_rng(6)
    stacked = rng.normal(size=(3, 5, 4))
    grads = [rng.normal(size=stacked.shape) for _ in range(4)]
    run = jax_run(jax_backend.compile(spec), {"w": jnp.asarray(stacked)},
                          [{"w": jnp.asarray(g)} for g in grads])
    split = lambda x: {f"w{i}": jnp.asarray(x[i]) for i in range(len(x))}
    apart = jax_run(jax_backend.compile(spec), split(stacked), [split(g) for g in grads])
    for a, b in zip(run, apart):
        np.testing.assert_allclose(np.asarray(a["w"]), np.stack([b[f"w{i}"] for i in range(3)]),
                                   rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def test_path_names_join_keys_indices_and_attributes():
    from typing import NamedTuple

    class Layer(NamedTuple):
        kernel: np.ndarray
        bias: np.ndarray

    tree = {"params": {"embed": {"w": 0}}, "layers": [Layer(1, 2)], "t": (3,)}
    names = [jax_backend.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert sorted(names) == ["layers.0.bias", "layers.0.kernel", "params.embed.w", "t.0"]


def _routed_vs_alone(spec, params, expect_fallback):
    """The routed run equals the fallback spec compiled alone on its leaves and the rule spec
    (no routing) on the others."""
    labels = jax_backend.param_labels(spec)(params)
    flat = {jax_backend.path_name(p): lab for p, lab in jax.tree_util.tree_leaves_with_path(labels)}
    assert {n for n, lab in flat.items() if lab == "fallback"} == expect_fallback
    rng = np.random.default_rng(7)
    stream = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
              for _ in range(3)]
    routed = jax_run(jax_backend.compile(spec), params, stream)
    alone = {"rule": jax_backend.compile(spec.with_routing(min_ndim=0).with_fallback(None)),
             "fallback": jax_backend.compile(spec.fallback)}
    for n, lab in flat.items():
        def pick(tree, n=n):
            return {"x": next(leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
                              if jax_backend.path_name(p) == n)}
        solo = jax_run(alone[lab], pick(params), [pick(g) for g in stream])
        for a, b in zip(routed, solo):
            np.testing.assert_allclose(pick(a)["x"], b["x"], rtol=1e-13, atol=1e-14, err_msg=n)


def _model():
    rng = np.random.default_rng(8)
    return to_jax({"params": {"embed": {"w": rng.normal(size=(10, 4))},
                               "blocks": [{"w": rng.normal(size=(4, 6)), "b": rng.normal(size=6)},
                                          {"w": rng.normal(size=(6, 4)), "b": rng.normal(size=4)}],
                               "head": {"w": rng.normal(size=(4, 10))}}})


def test_routing_by_ndim_sends_vectors_to_fallback():
    _routed_vs_alone(deepopt.muon(0.02, ns_dtype="float64"), _model(),
                     {"params.blocks.0.b", "params.blocks.1.b"})


def test_routing_by_name_pattern_on_nested_paths():
    spec = deepopt.muon(0.02, ns_dtype="float64",
                        routing=deepopt.Routing(fallback_patterns=(r"\.embed\.", r"^params\.head")))
    _routed_vs_alone(spec, _model(), {"params.blocks.0.b", "params.blocks.1.b",
                                      "params.embed.w", "params.head.w"})


def test_routing_by_predicate():
    spec = deepopt.delta_momentum(0.05, readout="newton_schulz",
                                  routing=deepopt.Routing(fallback_if=lambda n, s: s[0] == 6))
    _routed_vs_alone(spec, _model(), {"params.blocks.0.b", "params.blocks.1.w",
                                      "params.blocks.1.b"})


def test_matrix_rule_without_fallback_rejects_vectors():
    tx = jax_backend.compile(deepopt.muon(0.02).with_fallback(None))
    with pytest.raises(ValueError, match="'b' of shape \\(3,\\)"):
        tx.init({"w": jnp.ones((3, 3)), "b": jnp.ones(3)})


# --------------------------------------------------------------------------------------------
# optax integration (float64, torch layout, against the reference)
# --------------------------------------------------------------------------------------------

def _clip(grads):
    """``optax.clip_by_global_norm(1.0)`` on a dict of numpy gradients."""
    norm = np.sqrt(sum(np.sum(g * g) for g in grads.values()))
    return {n: g * min(1.0, 1.0 / norm) for n, g in grads.items()}


def _tree_stream():
    """Full gradients (no missing ones, as optax has none); the tests below run the table's
    "muon" (matrix rule + adamw fallback: exercises the partition)."""
    params, stream = _named(missing=())
    return params, stream, to_jax(params), to_jax(stream)


@pytest.mark.specs("muon")
def test_inject_hyperparams_traced_lr_and_weight_decay(spec):
    params, stream, jparams, jstream = _tree_stream()
    tx = optax.inject_hyperparams(
        lambda learning_rate, weight_decay: jax_backend.compile(
            spec, learning_rate=learning_rate, weight_decay=weight_decay, layout="torch")
    )(learning_rate=0.02, weight_decay=0.1)
    update = jax.jit(tx.update)
    state = tx.init(jparams)
    ours = []
    lrs = [0.02, 0.02, 0.02, 0.005, 0.005, 0.005]
    for t, grads in enumerate(jstream):
        state.hyperparams["learning_rate"] = jnp.asarray(lrs[t])
        state.hyperparams["weight_decay"] = jnp.asarray(0.1 if t < 4 else 0.3)
        updates, state = update(grads, state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        ours.append(jparams)
    # The reference with the same per-step lr and weight decay, applied to the main rule only
    # (the adamw fallback keeps its own lr = 0.02 and weight decay = 0).
    ref_state, ref, p = reference.init(spec, params), [], params
    for t, grads in enumerate(stream):
        p, ref_state = reference.step(spec.replace(lr=lrs[t], weight_decay=0.1 if t < 4 else 0.3),
                                      p, grads, ref_state)
        ref.append(p)
    assert_trajectories_close(ours, ref)
    assert update._cache_size() == 1


@pytest.mark.specs("muon")
def test_schedule_learning_rate(spec):
    params, stream, jparams, jstream = _tree_stream()
    schedule = optax.linear_schedule(0.03, 0.0, transition_steps=10)
    ours = jax_run(jax_backend.compile(spec, learning_rate=schedule, layout="torch"),
                           jparams, jstream)
    # optax evaluates the schedule at the int32 count before the step: t = 1 uses schedule(0)
    # (linear_schedule returns float32 on an int32 count; the reference gets the same values).
    lrs = [float(schedule(jnp.asarray(t, jnp.int32))) for t in range(len(stream))]
    assert_trajectories_close(ours, reference_run(spec, params, stream, lrs))


@pytest.mark.specs("muon")
def test_multisteps_accumulates_then_steps(spec):
    params, stream, jparams, jstream = _tree_stream()
    tx = optax.MultiSteps(jax_backend.compile(spec, layout="torch"), every_k_schedule=2,
                          accumulator_dtype=jnp.float64)       # optax's default is float32
    ours = jax_run(tx, jparams, jstream)[1::2]          # params after each real step
    means = [{n: (a[n] + b[n]) / 2 for n in a} for a, b in zip(stream[0::2], stream[1::2])]
    assert_trajectories_close(ours, reference_run(spec, params, means))


@pytest.mark.specs("muon")
def test_inside_chain_after_clipping(spec):
    params, stream, jparams, jstream = _tree_stream()
    tx = optax.chain(optax.clip_by_global_norm(1.0), jax_backend.compile(spec, layout="torch"))
    ours = jax_run(tx, jparams, jstream)

    assert_trajectories_close(ours, reference_run(spec, params, [_clip(g) for g in stream]))


def test_multisteps_and_chain_carry_a_stacked_dmgd_state():
    """DMGD's state kept as stacks per bucket (``LeafStacks``: ``readout=None``) goes through
    optax's wrappers as any state does: ``MultiSteps`` (its state selected leaf by leaf between
    real and accumulating steps) and ``chain`` after clipping equal the reference."""
    spec = deepopt.dmgd(0.02, hidden=4, readout=None)
    params, stream, jparams, jstream = _tree_stream()
    inner = jax_backend.compile(spec, layout="torch")
    stacked = [x for x in jax.tree.leaves(inner.init(jparams), is_leaf=lambda x: isinstance(x, jax_backend.LeafStacks))
               if isinstance(x, jax_backend.LeafStacks)]
    assert stacked                                          # the stacked state is the one tested
    tx = optax.MultiSteps(inner, every_k_schedule=2, accumulator_dtype=jnp.float64)
    ours = jax_run(tx, jparams, jstream)[1::2]
    means = [{n: (a[n] + b[n]) / 2 for n in a} for a, b in zip(stream[0::2], stream[1::2])]
    assert_trajectories_close(ours, reference_run(spec, params, means))
    tx = optax.chain(optax.clip_by_global_norm(1.0), jax_backend.compile(spec, layout="torch"))

    assert_trajectories_close(jax_run(tx, jparams, jstream), reference_run(spec, params, [_clip(g) for g in stream]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.specs("sgd_damped_torch", "adamw", "delta_newton_schulz_cubic_sgd_fallback", "muon_optax",
                   "custom_sign_denominator", "dmgd_dot_previous_adam", "m3")
def test_jit_does_not_retrace_on_second_step(spec, dtype):
    """Same state structure and dtypes after every step, so one trace serves them all — also
    for float32 leaves while x64 is on, where a float64 step-count power would promote them,
    and across M3's slow write at step 3 (``lax.cond``, not Python)."""
    traces = []
    tx = jax_backend.compile(spec)

    @jax.jit
    def step(params, grads, state):
        traces.append(1)                       # runs only while tracing
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(lambda x: x.astype(dtype), _model())
    state = tx.init(params)
    init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for _ in range(4):
        params, state = step(params, jax.tree.map(jnp.ones_like, params), state)
    assert len(traces) == 1 and step._cache_size() == 1
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.specs("muon_optax")
def test_none_leaves_pass_through_as_in_optax(spec):
    """optax treats None as an empty subtree: no state, a None update, apply_updates keeps it;
    the other leaves step exactly as without the None leaves."""
    rng = np.random.default_rng(9)
    full = to_jax({"w": rng.normal(size=(4, 5)), "b": rng.normal(size=5)})
    with_none = {"w": full["w"], "frozen": None, "sub": [None, full["b"]]}
    grads = [to_jax({"w": rng.normal(size=(4, 5)), "b": rng.normal(size=5)}) for _ in range(3)]
    plain = jax_run(jax_backend.compile(spec), full, grads)
    holey = jax_run(jax_backend.compile(spec), with_none,
                            [{"w": g["w"], "frozen": None, "sub": [None, g["b"]]} for g in grads])
    for a, b in zip(plain, holey):
        assert b["frozen"] is None and b["sub"][0] is None
        np.testing.assert_array_equal(a["w"], b["w"])
        np.testing.assert_array_equal(a["b"], b["sub"][1])


def test_zero_gradient_is_not_a_missing_gradient():
    """optax has no 'missing' gradient: a zero gradient still steps the memory and the decay
    (run_trajectory's None is the way to skip a parameter, as in torch)."""
    params = {"w": np.ones((3, 4))}
    stream = [{"w": np.ones((3, 4))}, {"w": np.zeros((3, 4))}]
    spec = deepopt.sgd(0.1, momentum=0.9, weight_decay=0.1)
    ours = jax_backend.run_trajectory(spec, params, stream)
    assert_trajectories_close(ours, reference_run(spec, params, stream))
    assert not np.array_equal(ours[1]["w"], ours[0]["w"])


def test_bad_layout_raises_naming_it():
    with pytest.raises(ValueError, match="layout='jax'"):
        jax_backend.compile(deepopt.sgd(0.1), layout="jax")
    with pytest.raises(ValueError, match="dtype='float16'"):
        jax_backend.run_trajectory(deepopt.sgd(0.1), {}, [], dtype="float16")
