"""Cross-library anchors: compiled deepopt specs == optax's own optimizers.

Each test runs the same gradient stream through ``jax_backend.compile(spec)`` and through the
optax optimizer the spec's docstring claims to reproduce, comparing parameters after every step.
"""

import jax

jax.config.update("jax_enable_x64", True)  # float64 cases; float32 arrays stay float32

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepopt
import jax_backend

STEPS = 32


def _params(dtype, seed=0):
    """A pytree of 2-D kernels in optax layout ``(in, out)`` — square, tall and wide — and a
    1-D bias (the fallback path)."""
    rng = np.random.default_rng(seed)
    shapes = {"square": (6, 6), "tall": (12, 5), "wide": (5, 12)}
    tree = {"dense": {k: rng.normal(size=s) for k, s in shapes.items()},
            "bias": rng.normal(size=(7,))}
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _grad_stream(params, steps, seed=1):
    """Gradients of ½‖W − W*‖² plus noise, so the stream depends on where each run is."""
    rng = np.random.default_rng(seed)
    target = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    noise = [jax.tree.map(lambda p: jnp.asarray(0.3 * rng.normal(size=p.shape), p.dtype), params)
             for _ in range(steps)]
    return target, noise


def _trajectory(tx, params, steps):
    target, noise = _grad_stream(params, steps)
    update = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for n in noise:
        grads = jax.tree.map(lambda p, t, e: p - t + e, params, target, n)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


def _assert_trajectories_close(ours, theirs, rtol, atol):
    assert len(ours) == len(theirs) >= 30
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            assert x.dtype == y.dtype, (t, path)
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                       rtol=rtol, atol=atol,
                                       err_msg=f"step {t + 1}, leaf {jax.tree_util.keystr(path)}")


TOL = {"float64": {"rtol": 1e-12, "atol": 1e-12}, "float32": {"rtol": 2e-5, "atol": 2e-6}}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                  (0.9, False, 0.05), (0.8, True, 0.05)])
def test_sgd_equals_optax_sgd(dtype, momentum, nesterov, wd):
    lr = 0.05
    params = _params(dtype)
    ours = jax_backend.compile(deepopt.sgd(lr, momentum=momentum, nesterov=nesterov,
                                           weight_decay=wd))
    theirs = optax.chain(optax.add_decayed_weights(wd),
                         optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    _assert_trajectories_close(_trajectory(ours, params, STEPS), _trajectory(theirs, params, STEPS),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_adamw_equals_optax_adamw(dtype, nesterov):
    lr, betas, eps, wd = 0.01, (0.85, 0.99), 1e-8, 0.02
    params = _params(dtype)
    ours = jax_backend.compile(deepopt.adamw(lr, betas=betas, eps=eps, weight_decay=wd,
                                             nesterov=nesterov))
    theirs = optax.adamw(lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=wd,
                         nesterov=nesterov)
    _assert_trajectories_close(_trajectory(ours, params, STEPS), _trajectory(theirs, params, STEPS),
                               **TOL[dtype])


# Float32 Newton–Schulz amplifies rounding (the quintic's slope at 0 is 3.4) and our matrix view
# iterates on Xᵀ where optax iterates on X for square kernels, so the two agree to rounding of
# the iteration, not bit for bit: ~4e-7 observed over 32 steps on O(1) parameters.
MUON_TOL = {"float64": {"rtol": 1e-12, "atol": 1e-12}, "float32": {"rtol": 1e-5, "atol": 1e-5}}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_muon_optax_settings_equal_optax_contrib_muon(dtype):
    lr, wd, eps = 0.02, 0.1, 1e-8
    params = _params(dtype)
    spec = deepopt.muon(lr, weight_decay=wd, eps=eps, ns_normalization="add", ns_dtype="input",
                        bias_correction=True,
                        fallback=deepopt.adamw(lr, eps=eps, weight_decay=0.0, nesterov=True))
    ours = jax_backend.compile(spec)
    theirs = optax.contrib.muon(lr, eps=eps, weight_decay=wd)
    _assert_trajectories_close(_trajectory(ours, params, STEPS), _trajectory(theirs, params, STEPS),
                               **MUON_TOL[dtype])
