"""jax_backend's DMGD (docs/math.md §5) and M3 (docs/math.md §6) against the numpy reference and themselves.

- DMGD and M3 variants == ``deepopt.reference`` step by step (float64, torch layout, 20+ steps,
  with skipped gradients, a conv kernel and a fallback bias);
- the batched DMGD write == one inner gradient step on ℓ_t computed by ``jax.grad``;
- the state holds the reference's S, W₁, W₂; W₂ leaves zero;
- layout="optax" on a kernel == layout="torch" on its transpose; a stacked (L, in, out) leaf ==
  L matrices that all start from the one W₁ of the leaf's name;
- the compiled kernel never writes G ⊙ G out (‖V‖² from the row norms' pass);
- M3's slow level is written exactly at t = f, 2f, 3f with β₃ Σ V, and O² = NS(M²);
- no retrace on the second jitted step; inject_hyperparams with a traced lr.
"""

import re

import jax

jax.config.update("jax_enable_x64", True)  # the reference is float64

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepopt
import jax_backend
from deepopt import reference, testing
from jax_backend._deep_memory import deep_memory_kernel

from _helpers import exact_in_float64, jax_run, optax_states

# Torch layout: a wide matrix, a tall one, a conv kernel (matrix view 4 × 12) and a bias that
# goes to the AdamW fallback. Two parameters sit one step out (their count must not advance).
SHAPES = {"0.weight": (5, 7), "head.weight": (9, 3), "conv.weight": (4, 3, 2, 2), "0.bias": (4,)}
STEPS = 20


def _stream(shapes=SHAPES, steps=STEPS, seed=0, missing=(("0.weight", 3), ("0.bias", 5))):
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(size=s) for n, s in shapes.items()}
    stream = [{n: rng.normal(size=s) * (1 + 0.1 * t) for n, s in shapes.items()}
              for t in range(steps)]
    for name, t in missing:
        if name in shapes:
            stream[t][name] = None
    return params, stream


def _close(a, b, rtol=1e-11, atol=1e-12, msg=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=msg)


# --------------------------------------------------------------------------------------------
# Step by step == the numpy reference (torch layout)
# --------------------------------------------------------------------------------------------

def _is_deep_or_multiscale(spec) -> bool:
    return isinstance(spec.rule.memory, (deepopt.DeepMemory, deepopt.MultiScaleMemory)) and exact_in_float64(spec)


@pytest.mark.specs(where=_is_deep_or_multiscale)
def test_equals_reference_step_by_step(spec):
    """conftest's DMGD and M3 entries, 20 steps, with a conv kernel, a fallback bias and two
    parameters one step out (their count must not advance)."""
    params, stream = _stream()
    trajs = testing.assert_backends_agree(spec, params, stream, backends=("reference", "jax"),
                                          rtol=1e-11, atol=1e-12)
    # The parameters moved: the agreement is not the trivial one of a frozen trajectory.
    assert not np.allclose(trajs[1][-1]["conv.weight"], params["conv.weight"])


#: DMGD with momentum (α < 1) and an l2 objective, whose state the tests below read.
DMGD_MOMENTUM = deepopt.dmgd(0.02, momentum=0.9, inner_lr=0.5, hidden=3, ns_dtype="input")


def _rows_loss(objective, eta, nu, s, w1, w2, k, v):
    """The inner objective's row terms Σ_r ℓ(M_φ(k_r), v_r) without retention, M = S + ν f_θ."""
    out = s + nu * (jax.nn.silu(k @ w1.T) @ w2.T)               # M_φ(k_r) for every row r
    if objective == "dot":
        return -eta * jnp.sum(out * v)
    return 0.5 * eta * jnp.sum((out - v) ** 2)


@pytest.mark.parametrize("keys", ["current", "previous"])
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_dmgd_write_is_one_inner_gradient_step_by_autograd(objective, keys):
    """docs/math.md §5 with ∇ by jax.grad: S takes its rows' terms (retention α); the shared θ
    the row mean preconditioned by 1/ν² at the delta-GD rates (W₂ retained by α, W₁ not).
    On a batch of 2 matrices (each its own memory and value scale)."""
    rng = np.random.default_rng(1)
    b, m, n, hid = 2, 5, 4, 3
    s, g, v, prev = (jnp.asarray(rng.normal(size=(b, m, n))) for _ in range(4))
    w1, w2 = jnp.asarray(rng.normal(size=(b, hid, n))), jnp.asarray(rng.normal(size=(b, n, hid)))
    nu_prev = jnp.asarray([0.0, 40.0])                           # ν from the rms, and from the decay
    mem = deepopt.DeepMemory(momentum=0.8, inner_lr=0.3, hidden=hid, objective=objective, keys=keys)
    s_new, w1_new, w2_new, nu, d, g_hat = deep_memory_kernel(mem, s, w1, w2, nu_prev, g, v, prev)
    k = g_hat if keys == "current" else prev
    alpha, eta = mem.momentum, mem.inner_lr
    grad = jax.grad(_rows_loss, argnums=(3, 4, 5))
    for i in range(b):
        want_nu = max(mem.scale_decay * float(nu_prev[i]), float(jnp.linalg.norm(v[i])) / np.sqrt(m))
        _close(nu[i], want_nu, msg="nu")
        gs, g1, g2 = grad(objective, eta, want_nu, s[i], w1[i], w2[i], k[i], v[i])
        h = jax.nn.silu(k[i] @ w1[i].T)
        rate_w2 = 1 / (1 + eta * jnp.sum(h * h) / m)
        rate_w1 = 1 / (1 + eta * 1.21 * jnp.sum(w2[i] * w2[i]))
        _close(s_new[i], s[i] - (gs + (1 - alpha) * s[i]), msg="S")
        _close(w1_new[i], w1[i] - rate_w1 * g1 / (m * want_nu**2), msg="W1")
        _close(w2_new[i], w2[i] - (rate_w2 * g2 / (m * want_nu**2) + (1 - alpha) * w2[i]), msg="W2")
        q = g[i] / jnp.linalg.norm(g[i], axis=-1, keepdims=True)   # Q = Ĝ_t, whatever the keys
        _close(d[i], s_new[i] + want_nu * (jax.nn.silu(q @ w1_new[i].T) @ w2_new[i].T), msg="read")


def test_dmgd_state_holds_the_reference_memory():
    """S, W₁ (drawn from the leaf's name) and W₂ (zero at start, not after) == the reference's."""
    spec = DMGD_MOMENTUM
    params, stream = _stream(shapes={"w": (5, 7)}, steps=4, missing=())
    tx = jax_backend.compile(spec, layout="torch")
    jparams = {"w": jnp.asarray(params["w"])}
    init = optax_states(tx.init(jparams), jax_backend.DeepMemoryState)[0].per_leaf()
    ref = reference.init(spec, params)
    _close(init.mlp_w1["w"], spec.rule.memory.initial_w1("w", 7), rtol=0, atol=0)
    assert init.prev_key is None and init.values_sq is None
    np.testing.assert_array_equal(init.mlp_w2["w"], 0.0)

    _, states = jax_run(tx, jparams, [{"w": jnp.asarray(g["w"])} for g in stream], with_states=True)
    for t, (grads, state) in enumerate(zip(stream, states), 1):
        params, ref = reference.step(spec, params, grads, ref)
        ours = optax_states(state, jax_backend.DeepMemoryState)[0].per_leaf()
        assert int(ours.count) == t
        for field, key in (("memory", "memory"), ("mlp_w1", "mlp_w1"), ("mlp_w2", "mlp_w2"),
                           ("value_scale", "value_scale")):
            _close(getattr(ours, field)["w"], ref["w"][key], msg=f"{field} at step {t}")
        assert np.abs(ours.mlp_w2["w"]).max() > 1e-3          # the MLP has started to learn


# --------------------------------------------------------------------------------------------
# Layouts and batch axes
# --------------------------------------------------------------------------------------------

SPEC_LAYOUT = deepopt.dmgd(0.02, momentum=0.9, inner_lr=0.5, hidden=4, values="adam",
                           readout="newton_schulz", ns_dtype="float64", adjust_lr_fn="original",
                           weight_decay=0.1)


def test_optax_layout_kernel_equals_torch_layout_transpose():
    """An (in, out) kernel under layout="optax" is its (out, in) transpose under "torch": same
    matrix view, same name "w", so the same W₁."""
    rng = np.random.default_rng(2)
    kernel = jnp.asarray(rng.normal(size=(7, 5)))                # (in, out): m = 5, n = 7
    grads = [jnp.asarray(rng.normal(size=(7, 5))) for _ in range(8)]
    optax_traj = jax_run(jax_backend.compile(SPEC_LAYOUT, layout="optax"), {"w": kernel}, [{"w": g} for g in grads])
    torch_traj = jax_run(jax_backend.compile(SPEC_LAYOUT, layout="torch"), {"w": kernel.T},
                         [{"w": g.T} for g in grads])
    for t, (a, b) in enumerate(zip(optax_traj, torch_traj), 1):
        _close(a["w"], b["w"].T, rtol=1e-12, msg=f"step {t}")


@pytest.mark.parametrize("transposed", [True, False])
def test_kernel_never_writes_out_g_squared(transposed):
    """‖V‖² (V = G) is the sum of the rows' squared norms, read in the one fused pass over G
    that gives the row norms: the compiled kernel has no computation whose result is G ⊙ G
    (XLA folded the two sums into one sum of G², which then had two readers and was written
    out: a full-size write and read more per matrix)."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA's CPU fusions")
    rng = np.random.default_rng(5)
    n, m, h = 24, 40, 4
    mem = deepopt.DeepMemory(hidden=h)
    shape = (n, m) if transposed else (m, n)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    args = (jnp.zeros(shape, jnp.float32), jnp.asarray(rng.normal(size=(h, n)), jnp.float32),
            jnp.zeros((n, h), jnp.float32), jnp.zeros((), jnp.float32), g)
    kernel = jax.jit(lambda s, w1, w2, nu, g: deep_memory_kernel(mem, s, w1, w2, nu, g, g, None,
                                                                  transposed=transposed))
    text = kernel.lower(*args).compile().as_text()
    squares = re.findall(rf"ROOT %\S+ = f32\[{shape[0]},{shape[1]}\]\S* multiply\((%\S+), \1\)", text)
    assert "reduce" in text and not squares, squares


def test_stacked_leaf_is_independent_matrices_from_one_w1():
    """A (L, in, out) leaf == L separate (in, out) leaves named like it; every matrix of the
    stack starts from the W₁ drawn for the leaf's name (documented in scale_by_deep_memory)."""
    rng = np.random.default_rng(3)
    L, n_in, n_out = 3, 6, 4
    stack = jnp.asarray(rng.normal(size=(L, n_in, n_out)))
    grads = [jnp.asarray(rng.normal(size=(L, n_in, n_out))) for _ in range(6)]
    tx = jax_backend.compile(SPEC_LAYOUT)
    init = optax_states(tx.init({"w": stack}), jax_backend.DeepMemoryState)[0].per_leaf()
    w1 = SPEC_LAYOUT.rule.memory.initial_w1("w", n_in)
    assert init.mlp_w1["w"].shape == (L, 4, n_in) and init.mlp_w2["w"].shape == (L, n_in, 4)
    for i in range(L):
        _close(init.mlp_w1["w"][i], w1, rtol=0, atol=0)

    stacked, states = jax_run(tx, {"w": stack}, [{"w": g} for g in grads], with_states=True)
    for i in range(L):
        alone = jax_run(tx, {"w": stack[i]}, [{"w": g[i]} for g in grads])
        for t, (a, b) in enumerate(zip(stacked, alone), 1):
            _close(a["w"][i], b["w"], rtol=1e-12, msg=f"matrix {i}, step {t}")
    final_w1 = optax_states(states[-1], jax_backend.DeepMemoryState)[0].per_leaf().mlp_w1["w"]
    assert not np.allclose(final_w1[0], final_w1[1])           # each matrix its own memory


# --------------------------------------------------------------------------------------------
# M3's slow level
# --------------------------------------------------------------------------------------------


def test_m3_slow_level_is_written_exactly_every_f_steps():
    """Literal M3 (ρ = 1, η₃ = β₃, identity values): at t = f, 2f, 3f, M² = β₃ Σ_{s≤t} G_s,
    O² = NS(M²) and the accumulator is zero; in between M² and O² stay and the accumulator
    holds the gradients since the last write."""
    f, b3 = 3, 0.7
    spec = deepopt.m3(0.01, betas=(0.9, 0.999, b3), frequency=f, ns_dtype="input")
    ns = spec.rule.readout
    rng = np.random.default_rng(4)
    grads = [rng.normal(size=(4, 6)) for _ in range(3 * f + 1)]
    _, states = jax_run(jax_backend.compile(spec, layout="torch"), {"w": jnp.asarray(rng.normal(size=(4, 6)))},
                        [{"w": jnp.asarray(g)} for g in grads], with_states=True)
    slow_prev = readout_prev = np.zeros((4, 6))
    written = []
    for t, state in enumerate(states, 1):
        ours = optax_states(state, jax_backend.MultiScaleState)[0]
        slow, readout, acc = (np.asarray(x["w"]) for x in
                              (ours.slow_memory, ours.slow_readout, ours.slow_accumulator))
        last = f * (t // f)                                      # the last boundary ≤ t
        _close(acc, sum(grads[last:t], np.zeros((4, 6))), msg=f"accumulator at step {t}")
        _close(slow, b3 * sum(grads[:last], np.zeros((4, 6))), msg=f"M² at step {t}")
        if t % f == 0:
            written.append(t)
            _close(readout, reference.newton_schulz(slow, ns), msg=f"O² at step {t}")
        else:
            np.testing.assert_array_equal(slow, slow_prev)
            np.testing.assert_array_equal(readout, readout_prev)
        if t > f and t % f == 0:
            assert not np.allclose(readout, readout_prev)
        slow_prev, readout_prev = slow, readout
    assert written == [f, 2 * f, 3 * f]


# --------------------------------------------------------------------------------------------
# optax integration
# --------------------------------------------------------------------------------------------


def test_dmgd_inject_hyperparams_traced_lr_follows_the_reference():
    """The lr is a traced state entry; changing it between steps == the reference at that lr."""
    spec = DMGD_MOMENTUM
    params, stream = _stream(shapes={"a": (5, 7), "b": (3, 4)}, steps=6, missing=())
    lrs = [0.02, 0.02, 0.05, 0.05, 0.01, 0.01]
    tx = optax.inject_hyperparams(
        lambda learning_rate: jax_backend.compile(spec, learning_rate=learning_rate,
                                                  layout="torch"))(learning_rate=lrs[0])
    update = jax.jit(tx.update)
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)
    ref_params, ref_state = params, reference.init(spec, params)
    for lr, grads in zip(lrs, stream):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        ref_params, ref_state = reference.step(spec.replace(lr=lr), ref_params, grads, ref_state)
        for name in params:
            _close(jparams[name], ref_params[name], msg=f"lr={lr}, {name}")


def _product_lines(params, hidden):
    """The compiled update's matrix products, in the order XLA runs them (ENTRY's schedule)."""
    tx = jax_backend.compile(deepopt.dmgd(0.01, hidden=hidden, readout=None))
    state = tx.init(params)
    text = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(params, state, params).compile().as_text()
    entry = text[text.index("\nENTRY"):].splitlines()
    # A product is a dot, or a YNNPACK fusion around one (jax's CPU backend), with a 2-D output
    # (row sums, also YNNPACK fusions, have a dimension of 1); the metadata naming dot_general
    # does not survive the bitcasts of a bucket's stack of one.
    product = re.compile(r"= f32\[([2-9]|\d\d+),([2-9]|\d\d+)\]\S* (dot\(|fusion\(.*__ynn_fusion)")
    return [line for line in entry if product.search(line)]


def test_matrices_run_one_after_the_other_on_one_cpu_device(monkeypatch):
    """With one CPU device the matrices' kernels run in tree order, each whole before the next
    starts (a zero from the previous read-out orders them; XLA's CPU scheduler otherwise runs
    every matrix's first product, then every second, …), and Bᵀ K is made as its n×h
    transpose (the fast operand order; XLA folds an unbarriered transpose into the product).
    These are XLA's ops, which run where deepopt's C++ kernel does not (off: DEEPOPT_NATIVE=0)."""
    import jax_backend._deep_memory as jdm

    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        pytest.skip("the order is taken with one CPU device")
    monkeypatch.setattr(jdm, "native_ready", lambda *a: False)
    rng = np.random.default_rng(7)
    h = 4   # optax layout (in, out): leaf a is n=24, m=40; leaf b is n=32, m=48
    params = {"a": jnp.asarray(rng.normal(size=(24, 40)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)}
    lines = _product_lines(params, h)
    shape = lambda line: re.search(r"= f32\[(\d+),(\d+)\]", line).groups()
    leaf = ["a" if {"24", "40"} & set(shape(x)) else "b" for x in lines]
    assert len(lines) == 14 and leaf == ["a"] * 7 + ["b"] * 7, lines
    assert not any(shape(x) in {(str(h), "24"), (str(h), "32")} for x in lines), lines   # no h×n product


def test_in_order_step_equals_the_unordered_step(monkeypatch):
    """The order (a zero added to W₁) changes no value: six float32 steps of three
    matrices with and without it agree to float rounding."""
    import jax_backend._deep_memory as jdm

    rng = np.random.default_rng(8)
    params = {n: jnp.asarray(rng.normal(size=s), jnp.float32)
              for n, s in {"a": (6, 10), "b": (12, 5), "c": (3, 8, 4)}.items()}
    grads = [{n: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for n, p in params.items()}
             for _ in range(6)]

    monkeypatch.setattr(jdm, "native_ready", lambda *a: False)   # the order is the XLA ops'

    def run(in_order):
        monkeypatch.setattr(jdm, "_in_order", lambda: in_order)
        tx = jax_backend.compile(deepopt.dmgd(0.05, hidden=3, readout=None))
        p, s = params, tx.init(params)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for g in grads:
            u, s = step(p, s, g)
            p = optax.apply_updates(p, u)
        return p, s

    (p1, s1), (p0, s0) = run(True), run(False)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p0, s0))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Persistent stacks: the state kept as one stack per bucket of same-shape leaves
# --------------------------------------------------------------------------------------------

STACK_SPECS = {
    "default": deepopt.dmgd(0.05, hidden=3, readout=None),
    "previous_adam_nesterov_sign": deepopt.dmgd(0.05, hidden=3, keys="previous", values="adam", nesterov=True,
                                                momentum=0.9, readout="sign"),
    "dot_hidden0": deepopt.dmgd(0.05, hidden=0, objective="dot", readout=None),
}


@pytest.mark.parametrize("layout", ["optax", "torch"])
@pytest.mark.parametrize("name", sorted(STACK_SPECS))
def test_stacked_state_equals_the_per_leaf_state(name, layout):
    """Off a mesh the state is one stack per bucket of same-shape leaves (two buckets of two
    here, and a bucket of one with batch axes or a conv kernel), and a step on it equals the
    step on the same state kept leaf by leaf (the layout on a mesh; :meth:`per_leaf` makes it),
    over eight float64 steps with an AdamW fallback on a bias."""
    spec = STACK_SPECS[name]
    rng = np.random.default_rng(11)
    third = (2, 6, 4) if layout == "optax" else (4, 3, 2, 2)     # batch axes / a conv kernel
    shapes = {"a.weight": (6, 4), "b.weight": (5, 7), "c.weight": (6, 4), "d.weight": (5, 7),
              "e.weight": third, "e.bias": (4,)}
    params = {n: jnp.asarray(rng.normal(size=s)) for n, s in shapes.items()}
    grads = [{n: jnp.asarray(rng.normal(size=s) * (1 + t)) for n, s in shapes.items()} for t in range(8)]
    tx = jax_backend.compile(spec, layout=layout)
    stacked = tx.init(params)
    (st,) = optax_states(stacked, jax_backend.DeepMemoryState)
    assert isinstance(st.memory, jax_backend.LeafStacks)
    assert [x.shape[0] for x in st.memory.stacks] == [2, 2, 1]
    assert len(st.memory.buckets) == 3 and sorted(map(len, st.memory.buckets)) == [1, 2, 2]
    per_leaf = jax.tree_util.tree_map(lambda x: x.per_leaf() if isinstance(x, jax_backend.DeepMemoryState) else x,
                                      stacked, is_leaf=lambda x: isinstance(x, jax_backend.DeepMemoryState))
    assert not isinstance(optax_states(per_leaf, jax_backend.DeepMemoryState)[0].memory, jax_backend.LeafStacks)
    update = jax.jit(tx.update)
    p1 = p2 = params
    s1, s2 = stacked, per_leaf
    for t, g in enumerate(grads, 1):
        u1, s1 = update(g, s1, p1)
        u2, s2 = update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for n in shapes:
            _close(p1[n], p2[n], rtol=1e-12, atol=1e-14, msg=f"{n} at step {t}")
    a = optax_states(s1, jax_backend.DeepMemoryState)[0]
    b = optax_states(s2, jax_backend.DeepMemoryState)[0]
    assert isinstance(a.memory, jax_backend.LeafStacks) and not isinstance(b.memory, jax_backend.LeafStacks)
    for x, y in zip(jax.tree.leaves(a.per_leaf()), jax.tree.leaves(b)):
        _close(x, y, rtol=1e-12, atol=1e-14)


def test_stacked_state_per_leaf_is_laid_out_as_the_parameters():
    """``per_leaf`` gives each field as a pytree like the parameters (torch layout: S like the
    parameter, not its m × n view; W₁, W₂, ν per matrix), the same arrays as the stacks' rows;
    a tree.map over the state keeps the stacks' structure (so jit sees one state type)."""
    spec = deepopt.dmgd(0.05, hidden=3, keys="previous", readout=None)
    params = {"w": jnp.ones((4, 3, 2, 2)), "v": jnp.ones((4, 3, 2, 2)), "u": jnp.ones((5, 7))}
    tx = jax_backend.compile(spec, layout="torch")
    st = optax_states(tx.init(params), jax_backend.DeepMemoryState)[0]
    assert [x.shape for x in st.memory.stacks] == [(1, 5, 7), (2, 4, 12)]   # tree order: u, v, w
    leaf = st.per_leaf()
    assert {n: x.shape for n, x in leaf.memory.items()} == {n: p.shape for n, p in params.items()}
    assert {n: x.shape for n, x in leaf.prev_key.items()} == {n: p.shape for n, p in params.items()}
    assert leaf.mlp_w1["w"].shape == (3, 12) and leaf.mlp_w2["u"].shape == (7, 3) and leaf.value_scale["v"].shape == ()
    _close(leaf.mlp_w1["v"], spec.rule.memory.initial_w1("v", 12), rtol=0, atol=0)
    shapes = jax.tree.map(lambda x: x.shape, st)
    assert shapes == jax.tree.map(lambda x: x.shape, st) and isinstance(shapes.memory, jax_backend.LeafStacks)
    assert "LeafStacks" in repr(st.memory)


def test_state_stays_per_leaf_before_a_newton_schulz_read_out():
    """With a matrix read-out after the memory (the default deep Muon) ``compile`` keeps the state
    per leaf: there the stacks measured slower (jax_backend/_deep_memory.py)."""
    params = {n: jnp.ones((6, 4)) for n in ("a", "b")}
    for readout, stacked in (("newton_schulz", False), ("sign", True), (None, True)):
        tx = jax_backend.compile(deepopt.dmgd(0.05, hidden=3, readout=readout))
        st = optax_states(tx.init(params), jax_backend.DeepMemoryState)[0]
        assert isinstance(st.memory, jax_backend.LeafStacks) == stacked, readout


def test_state_stays_per_leaf_on_a_mesh():
    """Parameters on a mesh keep the state per leaf, sharded like them (a stack of sharded
    leaves would be placed replicated by init)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    on_mesh = NamedSharding(mesh, PartitionSpec())
    params = {n: jax.device_put(jnp.ones((6, 4)), on_mesh) for n in ("a", "b")}
    tx = jax_backend.compile(deepopt.dmgd(0.05, hidden=3, readout=None))
    st = optax_states(tx.init(params), jax_backend.DeepMemoryState)[0]
    assert not isinstance(st.memory, jax_backend.LeafStacks) and set(st.memory) == {"a", "b"}
    u, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_stacked_state_checkpoints_round_trip():
    """A stacked state pickles, and its leaves restore into a fresh ``init``'s structure (how
    checkpoint libraries restore a pytree); either copy then steps as the original does."""
    import pickle

    params = {"a": {"w": jnp.ones((6, 4)), "b": jnp.zeros(4)}, "c": jnp.full((6, 4), 0.5)}
    tx = jax_backend.compile(deepopt.dmgd(0.05, hidden=3, readout=None))
    update = jax.jit(tx.update)
    _, state = update(params, tx.init(params), params)
    restored = jax.tree.unflatten(jax.tree.structure(tx.init(params)), [np.asarray(x) for x in jax.tree.leaves(state)])
    for copy in (pickle.loads(pickle.dumps(state)), restored):
        assert jax.tree.structure(copy) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(update(params, state, params)), jax.tree.leaves(update(params, copy, params))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stacked_state_refuses_updates_of_another_tree():
    """A stacked state was made for one pytree of parameters: updates of another raise, naming
    both trees, before any array is touched."""
    params = {"a": jnp.ones((6, 4)), "c": jnp.ones((6, 4))}
    tx = jax_backend.scale_by_deep_memory(deepopt.DeepMemory(hidden=3), view=jax_backend.MatrixView())
    state = tx.init(params)
    with pytest.raises(ValueError, match="not the one this state was made for"):
        tx.update({"a": jnp.ones((6, 4))}, state, params)
    compiled = jax_backend.compile(deepopt.dmgd(0.05, hidden=3, readout=None))
    with pytest.raises(ValueError):                          # through compile: routing's tree check
        compiled.update({"a": jnp.ones((6, 4))}, compiled.init(params), params)
