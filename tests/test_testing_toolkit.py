"""deepopt.testing catches planted bugs, and its strategies draw what they promise."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deepopt
from deepopt import reference, testing

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@pytest.mark.parametrize("module,least", [(testing, 7), (testing.checks, 20), (testing.strategies, 10)],
                         ids=lambda m: getattr(m, "__name__", m))
def test_docstring_examples_run(module, least):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= least and result.failed == 0, result


_BLOCK_HYPOTHESIS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ImportError("hypothesis is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_checks_import_without_hypothesis():
    """The checks (and ``from deepopt import testing``) work where hypothesis is not installed;
    only a strategy raises, and says why."""
    code = _BLOCK_HYPOTHESIS + textwrap.dedent("""
        import numpy as np, deepopt
        from deepopt import testing
        from deepopt.testing import checks
        testing.assert_descends(deepopt.sgd(lr=0.05, momentum=0.9), steps=10)
        checks.assert_reduces_to(deepopt.delta_momentum(0.1, 0.9, zeta=0.0), deepopt.sgd(0.1, 0.9),
                                 {"w": np.ones((2, 2))}, [{"w": np.eye(2)}])
        assert "hypothesis" not in sys.modules
        try:
            testing.shapes()
        except ImportError as err:
            assert "needs hypothesis" in str(err), err
        else:
            raise AssertionError("a strategy loaded without hypothesis")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_blocking_hypothesis_is_effective():
    """The guard above can fail: with the block, importing the strategies raises."""
    code = _BLOCK_HYPOTHESIS + "import deepopt.testing.strategies\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "hypothesis is blocked" in out.stderr


# ============================================================================================
# Strategies
# ============================================================================================


@given(shape=testing.shapes(min_dims=1, max_dims=3, max_side=5))
@SETTINGS
def test_shapes_respect_bounds(shape):
    assert 1 <= len(shape) <= 3 and all(1 <= d <= 5 for d in shape)


@given(shape=testing.matrix_shapes(max_dims=4, max_side=3))
@SETTINGS
def test_matrix_shapes_have_two_or_more_dims(shape):
    assert 2 <= len(shape) <= 4 and all(1 <= d <= 3 for d in shape)


@given(params=testing.named_params(min_params=1, max_params=5))
@SETTINGS
def test_named_params(params):
    assert 1 <= len(params) <= 6
    assert any(p.ndim >= 2 for p in params.values())
    for name, p in params.items():
        assert p.dtype == np.float64 and np.all(np.isfinite(p)) and 1 <= p.ndim <= 3
        assert name.endswith({1: ".bias", 2: ".weight", 3: ".kernel"}[p.ndim])


def test_named_params_mix_ranks():
    """Across draws, 1-D, 2-D and 3-D parameters all occur."""
    seen = set()

    @given(params=testing.named_params(min_params=3, max_params=5))
    @settings(max_examples=30, deadline=None)
    def collect(params):
        seen.update(p.ndim for p in params.values())

    collect()
    assert seen == {1, 2, 3}


@given(problem=testing.problems(steps=(2, 5), grad_scale=3.0))
@SETTINGS
def test_gradient_streams(problem):
    params, stream = problem
    assert 2 <= len(stream) <= 5
    for grads in stream:
        assert set(grads) == set(params)
        for name, g in grads.items():
            assert g.shape == params[name].shape and g.dtype == np.float64
            assert np.all(np.isfinite(g)) and np.any(g != 0)


@given(stream=testing.gradient_streams({"w": (3, 2)}, steps=6, jitter=False))
@SETTINGS
def test_gradient_streams_fixed_steps(stream):
    assert len(stream) == 6 and all(g["w"].shape == (3, 2) for g in stream)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "delta_momentum", "muon"])
def test_specs_draw_valid_specs_of_the_kind(kind):
    @given(spec=testing.specs(kinds=(kind,)))
    @settings(max_examples=30, deadline=None)
    def check(spec):
        assert spec.name == kind
        assert spec.replace(lr=spec.lr) == spec                 # re-validates: the draw was valid
        readout = spec.rule.readout
        if isinstance(readout, deepopt.NewtonSchulz):
            assert readout.dtype in ("float64", "input")

    check()


def test_specs_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="kinds="):
        testing.specs(kinds=("lion",))


# ============================================================================================
# assert_backends_agree
# ============================================================================================

def hand_sgd(nesterov_sign=+1.0, decay=True):
    """A user's SGD (coupled weight decay, heavy ball, optional Nesterov) written by hand."""

    def run(spec, params, grads_stream):
        h = spec.hyperparameters
        lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"] if decay else 0.0
        theta = {k: v.copy() for k, v in params.items()}
        buf = {k: np.zeros_like(v) for k, v in params.items()}
        out = []
        for grads in grads_stream:
            for k in theta:
                g = grads[k] + wd * theta[k]
                buf[k] = mu * buf[k] + g
                d = g + nesterov_sign * mu * buf[k] if h["nesterov"] else buf[k]
                theta[k] = theta[k] - lr * d
            out.append({k: v.copy() for k, v in theta.items()})
        return out

    return run


@pytest.fixture
def sgd_spec(spec_table):
    """Heavy ball with Nesterov and coupled weight decay: what ``hand_sgd`` writes by hand."""
    return spec_table["sgd"]()


def test_correct_user_backend_agrees(sgd_spec, problem):
    params, grads = problem
    trajs = testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", hand_sgd()))
    assert len(trajs) == 2 and len(trajs[0]) == len(grads)


def test_planted_bug_wrong_nesterov_sign_is_caught(sgd_spec, problem):
    params, grads = problem
    with pytest.raises(AssertionError) as info:
        testing.assert_backends_agree(sgd_spec, params, grads,
                                      backends=("reference", ("my_sgd", hand_sgd(nesterov_sign=-1.0))))
    msg = str(info.value)
    assert "my_sgd and reference disagree after step 1 on parameter" in msg
    assert "max abs error" in msg and "max rel error" in msg and "nesterov=True" in msg


def test_planted_bug_skipped_weight_decay_is_caught(sgd_spec, problem):
    params, grads = problem
    with pytest.raises(AssertionError, match=r"disagree after step 1 on parameter 'w'"):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", hand_sgd(decay=False)))


@pytest.mark.specs(where=lambda spec: spec.weight_decay > 0)
def test_planted_bug_skipped_weight_decay_in_presets(spec, problem):
    def no_decay(spec, params, grads_stream):
        return testing.reference_trajectory(spec.replace(weight_decay=0.0), params, grads_stream)

    params, grads = problem
    with pytest.raises(AssertionError, match="disagree after step 1 on parameter 'w'"):
        testing.assert_backends_agree(spec, params, grads, backends=("reference", no_decay))


def test_a_late_divergence_names_its_step(sgd_spec, problem):
    params, grads = problem

    def late_bug(spec, params, grads_stream):
        traj = testing.reference_trajectory(spec, params, grads_stream)
        traj[3]["b"] = traj[3]["b"] + 1e-6
        return traj

    with pytest.raises(AssertionError, match=re.escape("disagree after step 4 on parameter 'b' (shape (3,))")):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", late_bug))
    # ... and a difference inside the tolerance passes
    testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", late_bug), rtol=1e-3)


def test_malformed_backend_answers_are_caught(sgd_spec, problem):
    params, grads = problem

    def too_short(spec, params, grads_stream):
        return testing.reference_trajectory(spec, params, grads_stream)[:-1]

    def renamed(spec, params, grads_stream):
        return [{"W": p["w"], "b": p["b"]} for p in testing.reference_trajectory(spec, params, grads_stream)]

    def nan(spec, params, grads_stream):
        traj = testing.reference_trajectory(spec, params, grads_stream)
        traj[0]["w"] = traj[0]["w"] * np.nan
        return traj

    with pytest.raises(AssertionError, match="returned 4 steps for a stream of 5"):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", too_short))
    with pytest.raises(AssertionError, match="parameter names"):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", renamed))
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", nan))


def test_backends_get_private_copies(sgd_spec, problem):
    def vandal(spec, params, grads_stream):               # mutates its inputs in place
        traj = testing.reference_trajectory(spec, params, grads_stream)
        params["w"] += 100.0
        grads_stream[0]["w"] *= 0.0
        return traj

    original_params, original_grads = problem
    params = {k: v.copy() for k, v in original_params.items()}
    grads = [{k: v.copy() for k, v in g.items()} for g in original_grads]
    testing.assert_backends_agree(sgd_spec, params, grads, backends=(vandal, "reference", vandal))
    np.testing.assert_array_equal(params["w"], original_params["w"])
    np.testing.assert_array_equal(grads[0]["w"], original_grads[0]["w"])


def test_backend_arguments_are_validated(sgd_spec, problem):
    params, grads = problem
    with pytest.raises(ValueError, match="backend='numpy' is invalid"):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference", "numpy"))
    with pytest.raises(ValueError, match="at least two backends"):
        testing.assert_backends_agree(sgd_spec, params, grads, backends=("reference",))


def test_planted_bug_in_a_library_backend_is_caught(monkeypatch, problem):
    """A spec whose torch and jax compilations differ: break jax's run_trajectory."""
    pytest.importorskip("torch_backend")
    jax_backend = pytest.importorskip("jax_backend")
    real = jax_backend.run_trajectory
    spec = deepopt.muon(lr=0.02, ns_dtype="float64", ns_steps=5)
    params = {"w": problem[0]["w"]}
    grads = [{"w": g["w"]} for g in problem[1][:3]]
    testing.assert_backends_agree(spec, params, grads)              # the real ones agree

    def one_step_short(spec, params, grads_stream, **kw):         # NS with one step fewer
        return real(spec.replace(ns_steps=4), params, grads_stream, **kw)

    monkeypatch.setattr(jax_backend, "run_trajectory", one_step_short)
    with pytest.raises(AssertionError, match="jax and reference disagree after step 1 on parameter 'w'"):
        testing.assert_backends_agree(spec, params, grads)


# ============================================================================================
# assert_reduces_to
# ============================================================================================


@pytest.mark.parametrize("spec_a,spec_b", [
    (deepopt.sgd(0.1, 0.9), deepopt.sgd(0.1, 0.8)),
    (deepopt.sgd(0.1, 0.9), deepopt.sgd(0.1, 0.9, nesterov=True)),
    (deepopt.delta_momentum(0.1, 0.9, zeta=0.5), deepopt.sgd(0.1, 0.9)),
    (deepopt.muon(0.02, ns_dtype="float64"), deepopt.muon(0.02, ns_dtype="float64", ns_coefficients="cubic")),
    (deepopt.adamw(1e-2), deepopt.adamw(1e-2, nesterov=True)),
])
def test_reduces_to_catches_different_specs(spec_a, spec_b, problem):
    params, grads = {"w": problem[0]["w"]}, [{"w": g["w"]} for g in problem[1]]
    with pytest.raises(AssertionError, match="reduction on backend reference: .* disagree after step"):
        testing.assert_reduces_to(spec_a, spec_b, params, grads)


def test_reduces_to_accepts_equal_specs_through_a_user_backend(problem):
    params, grads = {"w": problem[0]["w"]}, [{"w": g["w"]} for g in problem[1]]
    testing.assert_reduces_to(deepopt.delta_momentum(0.1, 0.9, zeta=0.0, weight_decay=0.01),
                              deepopt.sgd(0.1, 0.9, weight_decay=0.01), params, grads,
                              backend=testing.reference_trajectory)


# ============================================================================================
# assert_descends
# ============================================================================================

def test_spec_table_covers_every_preset(spec_table):
    """A new preset constructor must get a row in tests/conftest.py's table."""
    import inspect

    from deepopt import _presets

    presets = {name for name, fn in inspect.getmembers(_presets, inspect.isfunction)
               if not name.startswith("_") and fn.__module__ == _presets.__name__
               and inspect.signature(fn).return_annotation in (deepopt.Spec, "Spec")}
    assert presets >= {"sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3", "custom"}, presets
    assert presets <= {make().name for make in spec_table.values()}


def test_every_spec_in_the_table_descends(spec):
    """Every entry of the shared spec table (tests/conftest.py) goes down on the quadratic."""
    losses = testing.assert_descends(spec)
    assert len(losses) == 51 and losses[-1] < losses[0]


@pytest.mark.parametrize("spec", [deepopt.sgd(0.05, 0.9, maximize=True), deepopt.adamw(0.05, maximize=True)],
                         ids=lambda s: s.name)
def test_maximize_does_not_descend(spec):
    with pytest.raises(AssertionError, match="did not descend"):
        testing.assert_descends(spec)


def test_too_large_a_step_is_caught():
    with pytest.raises(AssertionError, match="did not descend"):
        testing.assert_descends(deepopt.sgd(0.5))                 # lr > 2/condition diverges
    with pytest.raises(AssertionError, match="did not descend"):
        testing.assert_descends(deepopt.sgd(1e-4), margin=0.5)     # too slow to meet the margin


def test_late_blow_up_is_caught():
    """The final loss may be low while a late one exceeds the start: the second criterion."""
    q = testing.ConvexQuadratic.make()                   # the problem assert_descends uses
    optimum = {"weight": np.linalg.solve(q.A, q.B.T).T, "bias": q.target}

    def spiky(spec, params, grads_stream):
        traj = testing.reference_trajectory(spec, params, grads_stream)
        if len(traj) == 48:                               # a spike at step 48 ...
            traj[-1] = {k: v + 10.0 for k, v in traj[-1].items()}
        if len(traj) >= 49:                               # ... then straight to the optimum
            traj[-1] = {k: v.copy() for k, v in optimum.items()}
        return traj

    with pytest.raises(AssertionError, match="late loss exceeds the initial loss"):
        testing.assert_descends(deepopt.sgd(0.05, 0.9), backend=spiky)


def test_descends_replays_a_user_backend():
    losses_ref = testing.assert_descends(deepopt.sgd(0.05, 0.9), steps=20)
    losses_user = testing.assert_descends(deepopt.sgd(0.05, 0.9), steps=20, backend=hand_sgd())
    np.testing.assert_allclose(losses_user, losses_ref, rtol=1e-12)


def test_convex_quadratic_gradients_and_minimum():
    q = testing.ConvexQuadratic.make(dim=5, rows=3, condition=10.0, seed=1)
    eig = np.linalg.eigvalsh(q.A)
    assert np.allclose(q.A, q.A.T) and eig.min() == pytest.approx(1.0) and eig.max() == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    p = {"weight": rng.standard_normal((3, 5)), "bias": rng.standard_normal(3)}
    g = q.grads(p)
    for name in p:                                    # central finite differences
        for idx in np.ndindex(p[name].shape):
            e = {k: v.copy() for k, v in p.items()}
            e[name][idx] += 1e-6
            f_plus = q.loss(e)
            e[name][idx] -= 2e-6
            assert (f_plus - q.loss(e)) / 2e-6 == pytest.approx(g[name][idx], rel=1e-6, abs=1e-8)
    w_star = np.linalg.solve(q.A, q.B.T).T
    assert q.minimum == pytest.approx(q.loss({"weight": w_star, "bias": q.target}))
    assert all(q.loss({"weight": w_star + 0.1 * rng.standard_normal((3, 5)), "bias": q.target}) > q.minimum
               for _ in range(5))


# ============================================================================================
# Newton–Schulz invariants and polar factor
# ============================================================================================


def test_ns_invariants_fail_for_a_non_odd_map():
    part = deepopt.newton_schulz("muon", 5, dtype="float64")
    with pytest.raises(AssertionError, match="is not odd"):
        testing.assert_newton_schulz_invariants(lambda x: reference.newton_schulz(x, part) + 1e-3)
    with pytest.raises(AssertionError, match="is not odd"):
        testing.assert_newton_schulz_invariants(lambda x: reference.newton_schulz(np.abs(x), part))


def test_ns_invariants_fail_for_a_map_without_normalisation():
    def unnormalised(x):                               # the cubic iteration on X itself
        for _ in range(5):
            x = 1.5 * x - 0.5 * x @ x.T @ x
        return x

    with pytest.raises(AssertionError, match="not scale-invariant"):
        testing.assert_newton_schulz_invariants(unnormalised)


def test_ns_invariants_band_and_spectrum():
    part = deepopt.newton_schulz("muon", 5, dtype="float64")
    testing.assert_newton_schulz_invariants(part, band=(0.68, 1.14))
    with pytest.raises(AssertionError, match="outside the band"):
        testing.assert_newton_schulz_invariants(part, band=(0.9, 1.1))
    with pytest.raises(AssertionError, match="outside the band"):
        testing.assert_newton_schulz_invariants(lambda x: 2 * reference.newton_schulz(x, part), band=(0.5, 1.5))


def test_ns_invariants_check_an_implementation_against_its_part():
    """An implementation that does not follow the part's coefficients fails the spectral check."""
    muon5 = deepopt.newton_schulz("muon", 5, dtype="float64")
    cubic5 = deepopt.newton_schulz("cubic", 5, dtype="float64")
    testing.assert_newton_schulz_invariants(cubic5, implementation=lambda x: reference.newton_schulz(x, cubic5))
    with pytest.raises(AssertionError, match="scalar polynomial composition"):
        testing.assert_newton_schulz_invariants(cubic5, implementation=lambda x: reference.newton_schulz(x, muon5))
    # an implementation that forgets to transpose back a tall matrix fails on its shape
    with pytest.raises(AssertionError, match="output shape"):
        testing.assert_newton_schulz_invariants(
            muon5, implementation=lambda x: reference.newton_schulz(x, muon5).reshape(-1)[: x.size].reshape(
                x.shape[::-1]) if x.shape[0] != x.shape[1] else reference.newton_schulz(x, muon5))


def test_polar_factor():
    rng = np.random.default_rng(7)
    for shape in [(4, 4), (3, 7), (7, 3)]:
        x = rng.standard_normal(shape)
        q = testing.polar_factor(x)
        np.testing.assert_allclose(np.linalg.svd(q, compute_uv=False), 1.0, atol=1e-12)
        h = x @ q.T if shape[0] <= shape[1] else q.T @ x        # X = H Q (wide) or Q H (tall)
        np.testing.assert_allclose(h, h.T, atol=1e-12)
        assert np.linalg.eigvalsh(h).min() > -1e-12
    with pytest.raises(ValueError, match="2-D"):
        testing.polar_factor(np.ones(3))


def test_scalar_newton_schulz_is_the_composition():
    part = deepopt.newton_schulz(((2.0, -1.5, 0.5), (1.5, -0.5, 0.0)), 3, dtype="float64")
    x = np.array([0.1, 0.5, 1.0])
    y = x.copy()
    for a, b, c in [(2.0, -1.5, 0.5), (1.5, -0.5, 0.0), (1.5, -0.5, 0.0)]:
        y = a * y + b * y**3 + c * y**5
    np.testing.assert_allclose(testing.scalar_newton_schulz(part, x), y, rtol=1e-15)


@given(seed=st.integers(0, 2**32 - 1), preset=st.sampled_from(["muon", "polar_express", "cubic"]),
       steps=st.integers(1, 8))
@settings(max_examples=15, deadline=None)
def test_ns_invariants_hold_for_drawn_presets(seed, preset, steps):
    testing.assert_newton_schulz_invariants(deepopt.newton_schulz(preset, steps, dtype="float64"), seed=seed)
