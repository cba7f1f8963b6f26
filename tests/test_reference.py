"""Oracle (a): the numpy reference against closed forms.

Every test computes the expected value another way: the SVD polar factor, the scalar
polynomial composition, the Polar Express paper's construction, autograd of docs/math.md §2's inner
objective (torch.func.grad and jax.grad), and hand-written loops of the textbook algorithms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deepopt
from deepopt import _coefficients, reference, testing
from deepopt.testing import polar_factor, scalar_newton_schulz

SETTINGS = settings(max_examples=25, deadline=None)


def conditioned(rng, m, n, lo, hi=1.0):
    """``U diag(s) Vᵀ`` with singular values log-uniform in [lo, hi] (ends included)."""
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.exp(rng.uniform(np.log(lo), np.log(hi), size=k))
    s[0], s[-1] = hi, lo
    return (u * s) @ v.T


def ns(preset, steps, **kw):
    return deepopt.newton_schulz(preset, steps, dtype="float64", **kw)


def orthogonalisation_error(y):
    """‖σ_i(Y) − 1‖_∞."""
    return float(np.max(np.abs(np.linalg.svd(y, compute_uv=False) - 1.0)))


ASPECTS = [(16, 16), (8, 32), (32, 8), (24, 40), (3, 50), (1, 7)]

# ============================================================================================
# Newton–Schulz (docs/math.md §4) against the SVD
# ============================================================================================


@pytest.mark.parametrize("shape", ASPECTS)
@pytest.mark.parametrize("preset,steps", [("muon", 5), ("polar_express", 5), ("cubic", 12),
                                          ("polar_express", 2)])
def test_newton_schulz_is_the_scalar_polynomial_on_singular_values(shape, preset, steps):
    """NS(X) = U p(Σ / (norm_scale‖X‖_F)) Vᵀ with p the composed scalar polynomial."""
    rng = np.random.default_rng(1)
    x = 3.0 * conditioned(rng, *shape, lo=1e-2)
    part = ns(preset, steps)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    expected = (u * scalar_newton_schulz(part, s / (part.norm_scale * np.linalg.norm(x)))) @ vt
    np.testing.assert_allclose(reference.newton_schulz(x, part), expected, rtol=1e-9, atol=1e-11)


# Measured bands for normalised singular values in [1e-2, 1] (see the docstring below):
#   muon, 5 steps: [0.6818, 1.1344] (Keller Jordan's quintic overshoots by design);
#   polar_express, 5 steps: [0.8703, 1.1236] (u₅ = 1.1236 is Alg. 1's guarantee);
#   polar_express, 8 steps and cubic, 40 steps: 1 to 1e-9.
BANDS = [("muon", 5, 0.66, 1.15), ("polar_express", 5, 0.85, 1.13),
         ("polar_express", 8, 1 - 1e-6, 1 + 1e-6), ("cubic", 40, 1 - 1e-6, 1 + 1e-6)]


@pytest.mark.parametrize("preset,steps,low,high", BANDS)
@pytest.mark.parametrize("shape", ASPECTS)
def test_newton_schulz_singular_values_in_preset_band(preset, steps, low, high, shape):
    """Output singular values in the preset's band for inputs whose normalised singular values
    are ≥ 1e-2; the band is the range of the scalar composition there (checked too)."""
    rng = np.random.default_rng(2)
    k = min(shape)
    x = conditioned(rng, *shape, lo=1e-2 * math.sqrt(k))    # σ/‖X‖_F ≥ 1e-2
    sv = np.linalg.svd(reference.newton_schulz(x, ns(preset, steps)), compute_uv=False)
    assert low <= sv.min() and sv.max() <= high, (sv.min(), sv.max())
    grid = scalar_newton_schulz(ns(preset, steps), np.geomspace(1e-2, 1, 20001) /
                                (1.01 if preset == "polar_express" else 1.0))
    assert low <= grid.min() and grid.max() <= high


@pytest.mark.parametrize("preset", ["muon", "polar_express", "cubic"])
def test_newton_schulz_invariants_hold_for_presets(preset):
    testing.assert_newton_schulz_invariants(ns(preset, 5))
    testing.assert_newton_schulz_invariants(deepopt.muon(ns_coefficients=preset, ns_dtype="float64"))


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (32, 8), (24, 40), (3, 50), (48, 64)])
def test_polar_express_orthogonalises_better_than_muon_in_five_steps(shape):
    """Amsel et al.'s claim, on Gaussian matrices (normalised σ_min ≥ 1e-3, the design range:
    below it neither preset converges in 5 steps)."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        x = rng.standard_normal(shape)
        e_muon = orthogonalisation_error(reference.newton_schulz(x, ns("muon", 5)))
        e_pe = orthogonalisation_error(reference.newton_schulz(x, ns("polar_express", 5)))
        assert e_pe <= 0.17 and e_muon >= 0.2, (e_pe, e_muon)
        assert e_pe <= 0.6 * e_muon, (e_pe, e_muon)


@pytest.mark.parametrize("shape", ASPECTS)
def test_cubic_converges_to_polar_factor(shape):
    rng = np.random.default_rng(4)
    x = 5.0 * conditioned(rng, *shape, lo=0.2)
    y = reference.newton_schulz(x, ns("cubic", 40))
    np.testing.assert_allclose(y, polar_factor(x), atol=1e-12)
    # and 8 Polar Express steps reach U Vᵀ to float64 accuracy (for σ/‖X‖ ≥ 1e-3)
    np.testing.assert_allclose(reference.newton_schulz(x, ns("polar_express", 8)), polar_factor(x),
                               atol=1e-8)


@given(m=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       preset=st.sampled_from(["muon", "polar_express", "cubic"]),
       normalization=st.sampled_from(["clamp", "add"]))
@SETTINGS
def test_tall_is_transpose_of_wide(m, n, seed, preset, normalization):
    x = np.random.default_rng(seed).standard_normal((m, n))
    part = ns(preset, 5, normalization=normalization)
    tall, wide = reference.newton_schulz(x.T, part), reference.newton_schulz(x, part).T
    if m != n:      # the same float operations on the short side: bit for bit
        np.testing.assert_array_equal(tall, wide)
    else:           # square: X Xᵀ vs Xᵀ X, equal up to rounding
        np.testing.assert_allclose(tall, wide, rtol=1e-12, atol=1e-13)


def test_newton_schulz_of_zero_is_zero_and_clamp_vs_add():
    """ε conventions: clamp divides by max(‖X‖, ε), add by ‖X‖ + ε (docs/math.md §4)."""
    for normalization in ("clamp", "add"):
        np.testing.assert_array_equal(reference.newton_schulz(np.zeros((3, 4)),
                                                              ns("muon", 5, normalization=normalization)),
                                      np.zeros((3, 4)))
    x = np.array([[1e-8, 0.0], [0.0, 0.0]])                # ‖X‖ < ε = 1e-7
    one_step = deepopt.newton_schulz(((1.0, 0.0, 0.0),), 1, eps=1e-7, dtype="float64")
    assert reference.newton_schulz(x, one_step)[0, 0] == pytest.approx(1e-8 / 1e-7)
    add = deepopt.newton_schulz(((1.0, 0.0, 0.0),), 1, eps=1e-7, normalization="add", dtype="float64")
    assert reference.newton_schulz(x, add)[0, 0] == pytest.approx(1e-8 / (1e-8 + 1e-7))


def test_matrix_view_of_conv_kernels():
    """A 3-D (out, in, k) parameter is orthogonalised as out × (in·k) (docs/math.md §0)."""
    rng = np.random.default_rng(5)
    d = rng.standard_normal((4, 3, 2))
    rule = deepopt.muon(ns_dtype="float64").rule
    out = reference.apply_readout(rule, d)
    np.testing.assert_array_equal(out, reference.newton_schulz(d.reshape(4, 6), rule.readout).reshape(4, 3, 2))


# ============================================================================================
# Polar Express table (Amsel et al., arXiv 2505.16932, Alg. 1)
# ============================================================================================

CUSHION = 0.02407327424182761        # Alg. 1's cushion λ: optimise on [max(ℓ, λu), u]


def poly(row, x):
    a, b, c = row
    return a * x + b * x**3 + c * x**5


def critical_points(row):
    """Positive roots of p'(x) = a + 3b x² + 5c x⁴ (the interior extrema)."""
    a, b, c = row
    r = np.roots([5 * c, 3 * b, a])                      # in y = x²
    return np.sort(np.sqrt(r[np.isreal(r) & (r.real > 0)].real))


def remez_odd_quintic(lo, hi):
    """Minimax odd quintic for 1 on [lo, hi], by Remez exchange on 4 alternation points.

    Written from the Chebyshev alternation theorem (3 coefficients → 4 points lo < q < r < hi
    with error signs −, +, −, +), exchanging the interior points for the extrema of the error
    on a dense grid — not the paper's closed-form root update — so that it checks the table
    rather than restating it.
    """
    pts = np.linspace(lo, hi, 4)
    grid = np.linspace(lo, hi, 200001)
    for _ in range(200):
        lhs = np.stack([pts, pts**3, pts**5, (-1.0) ** np.arange(4)], axis=1)   # p(xᵢ) + (−1)ⁱE = 1
        a, b, c, e = np.linalg.solve(lhs, np.ones(4))
        err = poly((a, b, c), grid)
        q = grid[np.argmax(err)]
        r = grid[np.argmin(np.where(grid > q, err, np.inf))]
        cp = critical_points((a, b, c))                  # refine to the exact extrema
        if len(cp) == 2 and lo < cp[0] < cp[1] < hi:
            q, r = cp
        new = np.array([lo, q, r, hi])
        if np.max(np.abs(new - pts)) <= 1e-15:
            break
        pts = new
    return (a, b, c), e


def paper_table(steps=8, ell=1e-3):
    """Alg. 1's offline stage: optimise on [max(ℓ, λu), u], recentre so p(ℓ) + p(u) = 2,
    then ℓ ← p(ℓ), u ← 2 − ℓ; the limit polynomial once ℓ/u > 1 − 5e-6."""
    lo, hi, rows = ell, 1.0, []
    for _ in range(steps):
        if lo / hi >= 1 - 5e-6:
            row = (15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5)
        else:
            row, _ = remez_odd_quintic(max(lo, CUSHION * hi), hi)
        rho = 2 / (poly(row, lo) + poly(row, hi))
        row = tuple(rho * v for v in row)
        rows.append(row)
        lo = poly(row, lo)
        hi = 2 - lo
    return rows


def test_polar_express_table_matches_paper_construction():
    table = _coefficients._POLAR_EXPRESS_RAW
    rebuilt = paper_table(len(table))
    np.testing.assert_allclose(np.array(table), np.array(rebuilt), rtol=1e-7, atol=1e-9)


def test_polar_express_rows_equioscillate():
    """Each row p on [ℓ_k, u_k] (ℓ₁ = 1e-3, u₁ = 1): on [lo, u], lo = max(ℓ, λu), the error
    p − ρ equioscillates at 4 points lo < q < r < u with signs −, +, −, +, i.e.
    p(lo) = p(r) = min p and p(q) = p(u) = max p (the alternation theorem: minimax); ρ = 1 when
    no cushion applies (lo = ℓ); p(ℓ) + p(u) = 2 (recentred); next [ℓ, u] = [p(ℓ), max p]."""
    table = _coefficients._POLAR_EXPRESS_RAW
    lo_k, hi_k = 1e-3, 1.0
    cushioned = []
    for k, row in enumerate(table[:-1]):
        lo = max(lo_k, CUSHION * hi_k)
        cushioned.append(lo > lo_k)
        grid = np.linspace(lo, hi_k, 400001)
        vals = poly(row, grid)
        cps = critical_points(row)
        assert len(cps) == 2, (k, row, cps)
        q, r = cps
        assert lo < q < r < hi_k, (k, lo, q, r, hi_k)
        p_lo, p_q, p_r, p_u = poly(row, np.array([lo, q, r, hi_k]))
        big_e = (p_u - p_lo) / 2                        # equioscillation amplitude ρE
        tol = 1e-6 * max(big_e, 1e-9) + 1e-12
        assert abs(p_lo - p_r) <= tol and abs(p_q - p_u) <= tol, (k, p_lo, p_r, p_q, p_u)
        assert vals.min() >= p_lo - tol and vals.max() <= p_u + tol, k
        if not cushioned[-1]:
            assert abs((p_lo + p_u) / 2 - 1) <= 1e-9, (k, p_lo, p_u)         # ρ = 1: p(ℓ) = 1 − E
        assert abs(poly(row, lo_k) + poly(row, hi_k) - 2) <= 1e-9, k
        lo_k, hi_k = poly(row, lo_k), vals.max()
        assert abs(hi_k - (2 - lo_k)) <= 1e-9
    # The paper's cushion applies exactly to the first three rows.
    assert cushioned == [True, True, True, False, False, False, False]
    # The last row is the limit polynomial: p(1) = 1, p'(1) = p''(1) = 0 → (15/8, −10/8, 3/8).
    a, b, c = table[-1]
    assert (a + b + c, a + 3 * b + 5 * c, 6 * b + 20 * c) == (1.0, 0.0, 0.0)
    assert lo_k > 1 - 1e-8


def test_polar_express_safety_factor():
    """Alg. 1: every row but the last is evaluated at x/1.01; the input is divided by 1.01‖X‖."""
    raw, safe = _coefficients._POLAR_EXPRESS_RAW, deepopt.NS_COEFFICIENT_PRESETS["polar_express"]
    for (a, b, c), (sa, sb, sc) in zip(raw[:-1], safe[:-1]):
        for x in (0.1, 0.5, 1.0):
            assert poly((sa, sb, sc), x) == pytest.approx(poly((a, b, c), x / 1.01), rel=1e-14)
    assert safe[-1] == raw[-1]
    assert deepopt.newton_schulz("polar_express").norm_scale == 1.01


# ============================================================================================
# Delta momentum: the memory write is one gradient step on docs/math.md §2's inner objective
# ============================================================================================

DELTA_CASES = [
    # shape, momentum α, inner_lr η, zeta ζ, coupled weight decay λ
    ((4, 6), 0.9, 1.0, 0.9, 0.0),
    ((6, 4), 0.5, 1.0, 1.4, 0.0),
    ((5, 5), 0.0, 1.0, 1.0, 0.0),
    ((3, 2, 4), 0.9, 1.0, 0.3, 0.05),
    ((1, 7), 0.99, 0.3, 1.99, 0.0),
    ((7, 3), 0.7, 0.25, 0.8, 0.1),
]


def _delta_case(shape, momentum, inner_lr, zeta, wd, seed=0):
    rng = np.random.default_rng(seed)
    w, g, s_prev = (rng.standard_normal(shape) for _ in range(3))
    if inner_lr == 1.0:
        spec = deepopt.delta_momentum(lr=0.1, momentum=momentum, zeta=zeta, weight_decay=wd)
    else:
        spec = deepopt.custom(deepopt.UpdateRule(memory=deepopt.LinearMemory(
            momentum=momentum, inner_lr=inner_lr, zeta=zeta), decoupled_weight_decay=False),
            lr=0.1, weight_decay=wd)
    _, state = reference.rule_step(spec.rule, w, g, {"step": 3, "memory": s_prev.copy()},
                                   lr=spec.lr, weight_decay=spec.weight_decay)
    m, n = deepopt.matrix_view_shape(shape)
    g_eff = (g + wd * w).reshape(m, n)                    # coupled decay enters G before the write
    return s_prev.reshape(m, n), g_eff, state["memory"].reshape(m, n)


def _inner_objective(lib, s, v, k, eta, zeta, alpha):
    """ℓ(S) = −η⟨S, V⟩ + (ζ/2)‖S Kᵀ‖²_F + ((1−α)/2)‖S‖²_F  (docs/math.md §2, NL eq. 46–49)."""
    return (-eta * lib.sum(s * v) + 0.5 * zeta * lib.sum((s @ k.T) ** 2)
            + 0.5 * (1 - alpha) * lib.sum(s * s))


@pytest.mark.parametrize("shape,momentum,inner_lr,zeta,wd", DELTA_CASES)
def test_delta_write_is_inner_gradient_step_torch(shape, momentum, inner_lr, zeta, wd):
    torch = pytest.importorskip("torch")
    s, g, s_new = _delta_case(shape, momentum, inner_lr, zeta, wd)
    k = g / np.linalg.norm(g)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    grad = torch.func.grad(lambda s_: _inner_objective(torch, s_, t(g), t(k), inner_lr, zeta, momentum))(t(s))
    np.testing.assert_allclose(s_new, s - grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,momentum,inner_lr,zeta,wd", DELTA_CASES)
def test_delta_write_is_inner_gradient_step_jax(shape, momentum, inner_lr, zeta, wd):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    s, g, s_new = _delta_case(shape, momentum, inner_lr, zeta, wd)
    k = g / np.linalg.norm(g)
    grad = jax.grad(lambda s_: _inner_objective(jnp, s_, jnp.asarray(g), jnp.asarray(k), inner_lr,
                                                zeta, momentum))(jnp.asarray(s))
    np.testing.assert_allclose(s_new, s - np.asarray(grad), rtol=1e-12, atol=1e-12)


def test_delta_write_forgets_a_rank_one_direction():
    """ζ = α with a rank-one gradient erases what S stored along the gradient's row space."""
    rng = np.random.default_rng(6)
    u, v = rng.standard_normal(5), rng.standard_normal(4)
    g = np.outer(u, v)
    s_prev = rng.standard_normal((5, 4))
    spec = deepopt.delta_momentum(lr=0.1, momentum=0.9)           # ζ = α by default
    _, state = reference.rule_step(spec.rule, np.zeros((5, 4)), g, {"step": 1, "memory": s_prev},
                                   lr=0.1, weight_decay=0.0)
    vhat = v / np.linalg.norm(v)
    # S_new v̂ = S_prev (αI − α v̂v̂ᵀ) v̂ + G v̂ = G v̂
    np.testing.assert_allclose(state["memory"] @ vhat, g @ vhat, rtol=1e-12, atol=1e-12)


# ============================================================================================
# Textbook loops (torch docs' algorithm boxes), independent of the reference's structure
# ============================================================================================


def textbook_sgd(spec, params, grads_stream):
    """torch.optim.SGD's algorithm box (dampening acts only inside the momentum branch), plus
    docs/math.md §2's zero-start buffer convention."""
    h = spec.hyperparameters
    lr, mu, tau, wd = h["lr"], h["momentum"], h["dampening"], h["weight_decay"]
    out, theta, buf = [], {k: v.copy() for k, v in params.items()}, {}
    for t, grads in enumerate(grads_stream, 1):
        new = {}
        for name, p in theta.items():
            g = grads[name]
            if h["maximize"]:
                g = -g
            if wd != 0 and not h["decoupled_weight_decay"]:
                g = g + wd * p
            if mu != 0:
                if t == 1:
                    # torch: b₁ = g; deepopt (docs/math.md §2): b₁ = 0·μ + (1 − τ) g unless the quirk is on
                    buf[name] = g.copy() if h["undamped_first_step"] else (1 - tau) * g
                else:
                    buf[name] = mu * buf[name] + (1 - tau) * g
                g = g + mu * buf[name] if h["nesterov"] else buf[name]
            step = p - lr * g
            if wd != 0 and h["decoupled_weight_decay"]:
                step = step - lr * wd * p
            new[name] = step
        theta = new
        out.append({k: v.copy() for k, v in theta.items()})
    return out


def textbook_adamw(spec, params, grads_stream):
    """torch.optim.AdamW's algorithm box (amsgrad off); NAdam-form first moment as optax's
    ``adamw(nesterov=True)``: m̂ = β₁ m/(1 − β₁ᵗ⁺¹) + (1 − β₁) g/(1 − β₁ᵗ)."""
    h = spec.hyperparameters
    lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    theta = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    out = []
    for t, grads in enumerate(grads_stream, 1):
        for name in theta:
            g = -grads[name] if h["maximize"] else grads[name]
            p = theta[name]
            p_decayed = p - lr * wd * p
            m[name] = b1 * m[name] + (1 - b1) * g
            v2[name] = b2 * v2[name] + (1 - b2) * g * g
            if h["nesterov"]:
                m_hat = b1 * m[name] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            else:
                m_hat = m[name] / (1 - b1**t)
            v_hat = v2[name] / (1 - b2**t)
            theta[name] = p_decayed - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append({k: v.copy() for k, v in theta.items()})
    return out


def direct_newton_schulz(x, coefficients, steps, eps, normalization, norm_scale=1.0):
    """Keller Jordan's ``zeropower_via_newtonschulz5`` in float64, on the matrix view."""
    shape = x.shape
    x = x.reshape(shape[0], -1)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    nrm = norm_scale * np.sqrt(np.sum(x * x))
    x = x / (max(nrm, eps) if normalization == "clamp" else nrm + eps)
    table = list(coefficients)
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).reshape(shape)


def direct_muon(spec, params, grads_stream):
    """torch.optim.Muon's algorithm (and optax's NAdam-form bias correction), float64."""
    h = spec.hyperparameters
    lr, wd, mu = h["lr"], h["weight_decay"], h["momentum"]
    coeffs = h["ns_coefficients"]
    norm_scale = 1.0
    if isinstance(coeffs, str):
        norm_scale = 1.01 if coeffs == "polar_express" else 1.0
        coeffs = deepopt.NS_COEFFICIENT_PRESETS[coeffs]
    elif len(coeffs) == 3 and not isinstance(coeffs[0], (tuple, list)):
        coeffs = (coeffs,)
    theta = {k: v.copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in params.items()}
    out = []
    for t, grads in enumerate(grads_stream, 1):
        for name, p in theta.items():
            g = grads[name]
            buf[name] = buf[name] + (1 - mu) * (g - buf[name])             # buf.lerp_(g, 1 − μ)
            if h["bias_correction"]:
                if h["nesterov"]:
                    d = mu * buf[name] / (1 - mu ** (t + 1)) + (1 - mu) * g / (1 - mu**t)
                else:
                    d = buf[name] / (1 - mu**t)
            else:
                d = g + mu * (buf[name] - g) if h["nesterov"] else buf[name]   # g.lerp(buf, μ)
            o = direct_newton_schulz(d, coeffs, h["ns_steps"], h["eps"], h["ns_normalization"], norm_scale)
            m, n = p.shape[0], p[0].size
            adjust = {None: max(1, m / n) ** 0.5, "original": max(1, m / n) ** 0.5,
                      "match_rms_adamw": 0.2 * max(m, n) ** 0.5, "none": 1.0}[h["adjust_lr_fn"]]
            theta[name] = p * (1 - lr * wd) - lr * adjust * o
        out.append({k: v.copy() for k, v in theta.items()})
    return out


@given(spec=testing.specs(kinds=("sgd",)), problem=testing.problems(steps=(1, 8)))
@SETTINGS
def test_reference_sgd_equals_textbook(spec, problem):
    params, grads = problem
    testing.assert_backends_agree(spec, params, grads, backends=("reference", textbook_sgd),
                                  rtol=1e-12, atol=1e-14)


@given(spec=testing.specs(kinds=("adamw",)), problem=testing.problems(steps=(1, 8)))
@SETTINGS
def test_reference_adamw_equals_textbook(spec, problem):
    params, grads = problem
    testing.assert_backends_agree(spec, params, grads, backends=("reference", textbook_adamw),
                                  rtol=1e-11, atol=1e-13)


@given(spec=testing.specs(kinds=("muon",)), problem=testing.problems(steps=(1, 6), min_dims=2))
@SETTINGS
def test_reference_muon_equals_direct_implementation(spec, problem):
    params, grads = problem
    testing.assert_backends_agree(spec, params, grads, backends=("reference", direct_muon),
                                  rtol=1e-9, atol=1e-11)


def test_sgd_dampening_without_momentum_is_ignored_like_torch():
    params, grads = {"w": np.ones(3)}, [{"w": np.full(3, 2.0)}]
    spec = deepopt.sgd(lr=0.1, momentum=0.0, dampening=0.5)
    testing.assert_backends_agree(spec, params, grads, backends=("reference", textbook_sgd))


def test_textbook_sgd_with_undamped_first_step_is_torchs_buffer():
    """The torch quirk (b₁ = g₁ whatever the dampening) is reproduced only under its flag."""
    params = {"w": np.ones(3)}
    grads = [{"w": np.full(3, 2.0)}, {"w": np.full(3, -1.0)}]
    quirk = deepopt.sgd(lr=0.1, momentum=0.9, dampening=0.5, undamped_first_step=True)
    traj = testing.reference_trajectory(quirk, params, grads)
    b1 = 2.0
    b2 = 0.9 * b1 + 0.5 * -1.0
    np.testing.assert_allclose(traj[0]["w"], 1 - 0.1 * b1)
    np.testing.assert_allclose(traj[1]["w"], 1 - 0.1 * b1 - 0.1 * b2)
    plain = testing.reference_trajectory(quirk.replace(undamped_first_step=False), params, grads)
    np.testing.assert_allclose(plain[0]["w"], 1 - 0.1 * 0.5 * 2.0)


# ============================================================================================
# Reductions
# ============================================================================================


@given(lr=st.floats(1e-3, 0.1), momentum=st.floats(0.0, 0.99), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.01]),
       problem=testing.problems(steps=(1, 8), min_dims=2))
@SETTINGS
def test_delta_momentum_with_zeta_zero_is_sgd_momentum(lr, momentum, nesterov, weight_decay, problem):
    params, grads = problem
    nesterov = nesterov and momentum > 0
    testing.assert_reduces_to(
        deepopt.delta_momentum(lr, momentum, zeta=0.0, nesterov=nesterov, weight_decay=weight_decay),
        deepopt.sgd(lr, momentum, nesterov=nesterov, weight_decay=weight_decay), params, grads)


@given(lr=st.floats(1e-3, 0.1), weight_decay=st.sampled_from([0.0, 0.1]),
       adjust=st.sampled_from([None, "match_rms_adamw", "none"]),
       preset=st.sampled_from(["muon", "polar_express", "cubic"]),
       problem=testing.problems(steps=(1, 4), min_dims=2))
@SETTINGS
def test_muon_without_momentum_is_newton_schulz_of_the_gradient(lr, weight_decay, adjust, preset, problem):
    """W_t = W_{t−1} − γλW_{t−1} − γ s(W) NS(G_t), the closed form of docs/math.md §0 with D̃ = G."""
    params, grads = problem
    spec = deepopt.muon(lr=lr, weight_decay=weight_decay, momentum=0.0, nesterov=False,
                        ns_coefficients=preset, adjust_lr_fn=adjust, ns_dtype="float64")
    traj = testing.reference_trajectory(spec, params, grads)
    w = dict(params)
    for t, g in enumerate(grads):
        for name, p in w.items():
            m, n = deepopt.matrix_view_shape(p.shape)
            s = deepopt.shape_scale_factor(adjust or "original", m, n)
            o = direct_newton_schulz(g[name], spec.rule.readout.coefficients, 5, 1e-7, "clamp",
                                     spec.rule.readout.norm_scale)
            w[name] = p - lr * weight_decay * p - lr * s * o
            np.testing.assert_allclose(traj[t][name], w[name], rtol=1e-10, atol=1e-12)
