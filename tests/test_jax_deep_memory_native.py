"""DMGD's C++ kernel as an XLA custom call (jax_backend/_native.py, csrc/deep_memory_ffi.cpp, the
shared deepopt/csrc/deep_memory.h), called by ``_deep_memory.native_bucket``: equal to the XLA
ops of ``deep_memory_kernel`` within float rounding for every variant, in both layouts (optax's
``(in, out)`` leaves, read as the view's columns, and torch's), on shapes that reach every tail
of its loops and several blocks, with batch axes; the same bits for a matrix whatever bucket it
runs in; the whole optimizer equal to the XLA path over many steps and gradient scales;
differentiable and vmappable; routed only where it applies; a failed build a warning (or an
error with ``DEEPOPT_NATIVE=1``), and bad operands an error naming the call."""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)  # float64 buckets too (as tests/test_jax_dmgd_m3.py)

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepopt
import jax_backend
from jax_backend import _deep_memory, _native

from _helpers import DEEP_MEMORY_VARIANTS

VARIANTS = DEEP_MEMORY_VARIANTS
# (bucket, batch axes of a leaf, m, n): a 1×1 matrix; rows and columns off the tile and the
# lanes; several row blocks in either layout (512 columns: blocks of 12 rows, or of 48 columns in
# optax's layout; 100 rows end in a block of 4); a leaf with batch axes.
SHAPES = [(1, (), 1, 1), (2, (), 13, 21), (2, (), 100, 512), (2, (3,), 9, 6)]
TOL = {jnp.float64: 1e-11, jnp.float32: 2e-5}      # of the largest entry of each output


@pytest.fixture(scope="module")
def ffi():
    """The custom call's name: the kernel built (if need be) and registered, else the test skips."""
    name = _native.target()
    if name is None:
        pytest.skip("deepopt's XLA CPU kernel could not be built here (see the warning)")
    return name


def _inputs(mem: deepopt.DeepMemory, b, batch, m, n, dtype, transposed, values, seed=0, scale=1e-3):
    rng = np.random.default_rng(seed)
    leaf = (*batch, n, m) if transposed else (*batch, m, n)
    r = lambda *s: jnp.asarray(rng.normal(size=s), dtype)   # noqa: E731
    h = mem.hidden
    prev = None
    if mem.keys == "previous":
        axis = -2 if transposed else -1
        p = r(b, *leaf)
        prev = p / jnp.linalg.norm(p, axis=axis, keepdims=True)
    gs = [r(*leaf) * scale for _ in range(b)]
    return {"s": r(b, *leaf) * scale, "w1": r(b, *batch, h, n), "w2": r(b, *batch, n, h) * 0.1,
            "nu": jnp.full((b, *batch), scale, dtype), "prev": prev, "gs": gs,
            "vs": [r(*leaf) * scale for _ in range(b)] if values else []}


def _ops(mem, x, transposed):
    g = jnp.stack(x["gs"])
    return _deep_memory.deep_memory_kernel(mem, x["s"], x["w1"], x["w2"], x["nu"], g,
                                           jnp.stack(x["vs"]) if x["vs"] else g, x["prev"], transposed=transposed)


def _native_call(mem, x, transposed):
    return jax.jit(lambda x: _deep_memory.native_bucket(mem, x["s"], x["w1"], x["w2"], x["nu"], x["prev"], x["gs"],
                                                        x["vs"], transposed=transposed))(x)


def _close(ours, ref, dtype, what=""):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    err = np.max(np.abs(ours - ref), initial=0.0)
    assert err <= TOL[dtype] * max(np.max(np.abs(ref), initial=0.0), 1e-30), f"{what}: {err:.3g}"


def _cases():
    """Every variant on every shape in both layouts in float32 (torch's layout has no batch
    axes: a leaf is one m×n view); float64 (4 lanes, other blocks) for every variant on the
    shape with tiles and tails, and for the default on the 1×1 and several-block shapes too;
    values other than the gradients, in float32, for the variants that read them differently."""
    for variant in VARIANTS:
        for k, (b, batch, m, n) in enumerate(SHAPES):
            for layout in ("optax", "torch") if not batch else ("optax",):
                f64 = k == 1 or (variant == "default" and k < 3)
                for dtype in (jnp.float32, jnp.float64) if f64 else (jnp.float32,):
                    separate = variant in ("default", "dot", "previous_keys") and dtype == jnp.float32
                    for values in (False, True) if separate else (False,):
                        ids = (variant, "x".join(map(str, (b, *batch, m, n))), layout, jnp.dtype(dtype).name,
                               "separate" if values else "v=g")
                        yield pytest.param(variant, (b, batch, m, n), layout, dtype, values, id="-".join(ids))


@pytest.mark.parametrize("variant, shape, layout, dtype, values", list(_cases()))
def test_equals_the_xla_ops(ffi, variant, shape, layout, dtype, values):
    b, batch, m, n = shape
    transposed = layout == "optax"
    mem = deepopt.DeepMemory(**VARIANTS[variant])
    x = _inputs(mem, b, batch, m, n, dtype, transposed, values)
    ours, ref = _native_call(mem, x, transposed), _ops(mem, x, transposed)
    for name, a, r in zip(("S", "W1", "W2", "nu", "D", "G_hat"), ours, ref):
        if name == "G_hat" and mem.keys != "previous":
            assert a is None
            continue
        assert a.dtype == r.dtype, name
        _close(a, r, dtype, name)


def test_a_matrix_gets_the_same_bits_in_any_bucket(ffi):
    """Each matrix is computed alone (by one thread of XLA's pool): its results do not depend on
    the bucket it is in or on which thread took it."""
    mem = deepopt.DeepMemory(keys="previous")
    x = _inputs(mem, 5, (), 37, 70, jnp.float32, True, False)
    whole = _native_call(mem, x, True)
    for k in range(5):
        one = {key: x[key][k:k + 1] for key in ("s", "w1", "w2", "nu", "prev")}
        alone = _native_call(mem, {**one, "gs": [x["gs"][k]], "vs": []}, True)
        for a, w in zip(alone, whole):
            np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(w)[k])


def _optimizer_steps(spec, params, grads_at, steps, native: bool, monkeypatch):
    with monkeypatch.context() as mp:
        if not native:
            mp.setattr(_deep_memory, "native_ready", lambda *a: False)
        tx = jax_backend.compile(spec)
        state = tx.init(params)

        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        for t in range(steps):
            params, state = step(params, state, grads_at(t))
    return params, state


@pytest.mark.parametrize("spec", [
    deepopt.dmgd(0.02, readout=None),
    deepopt.dmgd(0.02, readout=None, keys="previous", objective="dot", momentum=0.9, nesterov=True),
    deepopt.dmgd(0.02, readout=None, values="adam"),
], ids=["default", "previous_dot_nesterov", "adam_values"])
def test_the_optimizer_equals_the_xla_path_over_many_steps(ffi, spec, monkeypatch):
    """40 float64 steps whose gradients sweep five decades of scale, two buckets (one of two
    leaves) and a vector that takes the fallback: the same trajectory as the XLA ops'."""
    rng = np.random.default_rng(3)
    params = {"a": jnp.asarray(rng.normal(size=(24, 40))), "b": jnp.asarray(rng.normal(size=(24, 40))),
              "c": jnp.asarray(rng.normal(size=(40, 7))), "bias": jnp.asarray(rng.normal(size=(7,)))}
    noise = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params) for _ in range(40)]
    grads_at = lambda t: jax.tree.map(lambda g: g * 10.0 ** (t % 5 - 3), noise[t])   # noqa: E731
    ours = _optimizer_steps(spec, params, grads_at, 40, True, monkeypatch)
    ref = _optimizer_steps(spec, params, grads_at, 40, False, monkeypatch)
    for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-9, atol=1e-12)


def _lowered(spec, params) -> str:
    tx = jax_backend.compile(spec)
    return jax.jit(tx.update).lower(params, tx.init(params), params).as_text()


def test_routed_where_it_applies(ffi, monkeypatch):
    """float32/float64 buckets with an MLP take the custom call; bfloat16, ``hidden=0``, a
    Newton–Schulz read-out (per-leaf state) and ``DEEPOPT_NATIVE=0`` keep the XLA ops."""
    p32 = {"w": jnp.ones((8, 16), jnp.float32), "v": jnp.ones((8, 16), jnp.float32)}
    assert _native.TARGET in _lowered(deepopt.dmgd(0.02, readout=None), p32)
    assert _native.TARGET in _lowered(deepopt.dmgd(0.02, readout=None), jax.tree.map(lambda x: x.astype(jnp.float64),
                                                                                        p32))
    assert _native.TARGET not in _lowered(deepopt.dmgd(0.02, readout=None),
                                          jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32))
    assert _native.TARGET not in _lowered(deepopt.dmgd(0.02, readout=None, hidden=0), p32)
    assert _native.TARGET not in _lowered(deepopt.dmgd(0.02), p32)
    monkeypatch.setenv("DEEPOPT_NATIVE", "0")
    _native.target.cache_clear()
    try:
        assert _native.TARGET not in _lowered(deepopt.dmgd(0.02, readout=None), p32)
    finally:
        monkeypatch.delenv("DEEPOPT_NATIVE")
        _native.target.cache_clear()


def test_gradients_through_a_step_are_the_xla_ops(ffi):
    """A meta-gradient through the memory's step (its JVP is the XLA ops')."""
    mem = deepopt.DeepMemory()
    x = _inputs(mem, 2, (), 11, 9, jnp.float64, True, False)

    def loss(kernel, gs):
        s, w1, w2, nu, d, _ = kernel(gs)
        return jnp.sum(d ** 2) + jnp.sum(s * w1.sum()) + jnp.sum(w2) + jnp.sum(nu)

    native = lambda gs: _deep_memory.native_bucket(mem, x["s"], x["w1"], x["w2"], x["nu"], None, list(gs), [],  # noqa: E731
                                                   transposed=True)
    ops = lambda gs: _ops(mem, {**x, "gs": list(gs)}, True)   # noqa: E731
    ours = jax.jit(jax.grad(lambda gs: loss(native, gs)))(tuple(x["gs"]))
    ref = jax.jit(jax.grad(lambda gs: loss(ops, gs)))(tuple(x["gs"]))
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-9, atol=1e-15)
    assert float(jnp.max(jnp.abs(ours[0]))) > 0


def test_vmap_runs_it_per_batch_element(ffi):
    mem = deepopt.DeepMemory()
    xs = [_inputs(mem, 2, (), 10, 6, jnp.float32, True, False, seed=k) for k in range(3)]
    batched = jax.tree.map(lambda *a: jnp.stack(a), *xs)
    f = lambda x: _deep_memory.native_bucket(mem, x["s"], x["w1"], x["w2"], x["nu"], None, x["gs"], [],  # noqa: E731
                                             transposed=True)[4]
    out = jax.jit(jax.vmap(f))(batched)
    for k, x in enumerate(xs):
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(jax.jit(f)(x)))


def test_bad_operands_are_an_error_naming_the_call(ffi):
    """The handler checks what it is sent (jax_backend never sends this); nothing is written."""
    s = jnp.zeros((2, 4, 3), jnp.float32)
    w1, w2, nu = jnp.zeros((2, 16, 4), jnp.float32), jnp.zeros((2, 4, 16), jnp.float32), jnp.zeros(2, jnp.float32)
    call = jax.ffi.ffi_call(_native.TARGET, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (s, w1, w2, nu, s)])
    attrs = dict(m=np.int64(3), n=np.int64(4), h=np.int64(16), momentum=np.float64(0.9), inner_lr=np.float64(0.1),
                 scale_decay=np.float64(0.99), eps=np.float64(1e-8), slope_sq=np.float64(1.21), dot=np.int64(0),
                 nesterov=np.int64(1), transposed=np.int64(1), previous=np.int64(0), values=np.int64(0))
    with pytest.raises(Exception, match="deepopt_dmgd_memory: a gradient or value has the wrong type or size"):
        jax.block_until_ready(call(s, w1, w2, nu, jnp.zeros((4, 4), jnp.float32), jnp.zeros((4, 4), jnp.float32),
                                   **attrs))
    with pytest.raises(Exception, match="deepopt_dmgd_memory: float32 or float64 only"):
        jax.block_until_ready(call(s.astype(jnp.float16), w1, w2, nu, s[0], s[1], **attrs))


def test_a_failed_build_warns_and_keeps_the_xla_ops(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")            # a "compiler" that always fails
    _native.target.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="XLA CPU kernel could not be built"):
            assert _native.target() is None
        assert not _deep_memory.native_ready(deepopt.DeepMemory(), jnp.float32)
        assert list(tmp_path.iterdir()) == []     # no half-written library left behind
        monkeypatch.setenv("DEEPOPT_NATIVE", "1")
        _native.target.cache_clear()
        with pytest.raises(RuntimeError, match="DEEPOPT_NATIVE=1"):
            _native.target()
        monkeypatch.setenv("DEEPOPT_NATIVE", "yes")
        _native.target.cache_clear()
        with pytest.raises(ValueError, match="DEEPOPT_NATIVE='yes' is invalid"):
            _native.target()
    finally:
        monkeypatch.undo()
        _native.target.cache_clear()


def test_a_jax_without_the_ffi_calls_keeps_the_xla_ops(monkeypatch):
    """The package allows jax older than ``jax.ffi.ffi_call(vmap_method=...)``: no build, no call."""
    monkeypatch.setattr(_native, "_ffi_api", lambda: False)
    _native.target.cache_clear()
    try:
        assert _native.target() is None
        assert not _deep_memory.native_ready(deepopt.DeepMemory(), jnp.float32)
    finally:
        monkeypatch.undo()
        _native.target.cache_clear()
    assert _native._ffi_api()                     # the pinned jax has them


def test_the_build_name_follows_the_source_and_the_cpu(monkeypatch):
    name = _native.build_name()
    assert name.startswith("deepopt_xla_") and _native.library().name == f"{name}.so"
    monkeypatch.setattr(_native, "cpu_signature", lambda: "another cpu")
    assert _native.build_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(_native, "FLAGS", [*_native.FLAGS, "-DANOTHER"])
    assert _native.build_name() != name
