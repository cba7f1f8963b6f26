"""The numpy float64 reference: the executable statement of docs/math.md (§0–§6).

Readable, unbatched and slow on purpose: every backend is tested against it step by step.
Parameters are named arrays in torch layout (``(out, in, *rest)``; the matrix view is
``out × in·prod(rest)``, docs/math.md §0).

Each part of a rule is computed by the function its class maps to in one of three tables,
``VALUES``, ``MEMORIES`` and ``READOUTS``; a part's state is the one its ``state_slots()``
declares (:mod:`deepopt._state`). docs/extending.md adds an entry.

    state = reference.init(spec, params)
    params, state = reference.step(spec, params, grads, state)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deepopt._memory import DeepMemory, LinearMemory, MultiScaleMemory, silu_grad
from deepopt._readout import Identity, NewtonSchulz, Readout, Sign, shape_scale_factor
from deepopt._spec import Spec, UpdateRule, matrix_view_shape
from deepopt._validate import kernel_for
from deepopt._values import AdamValues, IdentityValues, Values

ParamState = dict[str, Any]
#: σ on one parameter-shaped array.
Sigma = Callable[[np.ndarray], np.ndarray]

# --------------------------------------------------------------------------------------------
# Read-out maps (docs/math.md §4)
# --------------------------------------------------------------------------------------------


def newton_schulz(x: np.ndarray, ns: NewtonSchulz) -> np.ndarray:
    """Newton–Schulz on a 2-D ``m × n`` matrix, in float64 whatever ``ns.dtype`` says."""
    x = np.asarray(x, dtype=np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:                                      # iterate on the short side: A is m×m
        x = x.T
    norm = ns.norm_scale * np.linalg.norm(x)
    x = x / (max(norm, ns.eps) if ns.normalization == "clamp" else norm + ns.eps)
    for a, b, c in ns.schedule:
        gram = x @ x.T                                  # A = X Xᵀ        : m×n·n×m
        poly = b * gram + c * gram @ gram               # B = bA + cA²    : m×m
        x = a * x + poly @ x                            # X ← aX + BX     : m×m·m×n
    return x.T if transposed else x


def _orthogonalise(ns: NewtonSchulz, d: np.ndarray) -> np.ndarray:
    m, n = matrix_view_shape(d.shape)
    return newton_schulz(d.reshape(m, n), ns).reshape(d.shape)


#: σ per read-out class: ``(readout, D̃) -> σ(D̃)`` on one parameter-shaped array.
READOUTS: dict[type[Readout], Callable[[Any, np.ndarray], np.ndarray]] = {
    Identity: lambda readout, d: d,
    Sign: lambda readout, d: np.sign(d),
    NewtonSchulz: _orthogonalise,
}


def apply_readout(rule: UpdateRule, d: np.ndarray) -> np.ndarray:
    """``σ(D̃)`` for the rule's read-out map."""
    return kernel_for(READOUTS, rule.readout, "deepopt.reference.READOUTS")(rule.readout, d)


# --------------------------------------------------------------------------------------------
# Values V_t = P(G_t) (docs/math.md §3)
# --------------------------------------------------------------------------------------------


def adam_values(values: AdamValues, state: ParamState, g: np.ndarray, t: int) -> np.ndarray:
    """``V = G / (√(v / (1 − β₂ᵗ)) + ε)``, ``v ← β₂ v + (1 − β₂) G²``."""
    b2 = values.beta2
    nu = state["values_sq"] = b2 * state["values_sq"] + (1 - b2) * g * g
    return g / (np.sqrt(nu / (1 - b2**t)) + values.eps)


#: P per values class: ``(values, state, G, t) -> V``, updating the values' own state.
VALUES: dict[type[Values], Callable[[Any, ParamState, np.ndarray, Any], np.ndarray]] = {
    IdentityValues: lambda values, state, g, t: g,
    AdamValues: adam_values,
}


# --------------------------------------------------------------------------------------------
# Memories (docs/math.md §2, §5)
# --------------------------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def silu(z: np.ndarray) -> np.ndarray:
    return z * sigmoid(z)


def linear_memory(mem: LinearMemory, state: ParamState, g: np.ndarray, v: np.ndarray,
                  t: int) -> np.ndarray:
    """Write ``S_t = S_{t−1}(αI − ζKᵀK) + ηV`` (docs/math.md §2, NL eq. 46–49) and return the read-out D̃."""
    alpha = mem.momentum
    eta = 1.0 if (mem.undamped_first_write and t == 1) else mem.inner_lr
    if mem.stateless:
        s = eta * v
    else:
        s_prev = state["memory"]
        retained = alpha * s_prev
        if mem.zeta != 0.0 and g.ndim >= 2:             # 1-D: the same recurrence with ζ = 0
            m, n = matrix_view_shape(g.shape)
            gm = g.reshape(m, n)
            k = gm / max(np.linalg.norm(gm), mem.key_eps)
            retained = retained - mem.zeta * ((s_prev.reshape(m, n) @ k.T) @ k).reshape(g.shape)
        s = state["memory"] = retained + eta * v
    if mem.nesterov:
        if mem.bias_correction:                          # NAdam form, as optax
            return alpha * s / (1 - alpha ** (t + 1)) + eta * v / (1 - alpha**t)
        return alpha * s + eta * v
    return s / (1 - alpha**t) if mem.bias_correction else s


def deep_memory(mem: DeepMemory, state: ParamState, g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """DMGD (docs/math.md §5): one inner step on ``φ = (S, W₁, W₂)``, then read at ``Q``.

    The MLP's read is ``ν f_θ(q)``: ``θ`` sees only unit-scale inputs (unit keys, errors
    divided by ``ν``) and takes rate-normalised steps, so the update is homogeneous in the
    gradient's scale and every write of ``θ`` is bounded.
    """
    m, n = matrix_view_shape(g.shape)
    gm, vm = g.reshape(m, n), v.reshape(m, n)
    rows = np.maximum(np.linalg.norm(gm, axis=1, keepdims=True), mem.key_eps)
    g_hat = gm / rows                                     # Ĝ: each row normalised
    k = g_hat if mem.keys == "current" else state["prev_key"].reshape(m, n)
    s = state["memory"].reshape(m, n)
    alpha, eta = mem.momentum, mem.inner_lr

    # Value scale ν_t = max(β ν_{t−1}, ‖V‖_F/√m, ε), then the MLP's read at φ_{t−1} in its units:
    # H = σ(K W₁ᵀ) : m×h, F = ν H W₂ᵀ : m×n.
    if mem.hidden:
        nu = state["value_scale"] = max(mem.scale_decay * state["value_scale"],
                                        np.linalg.norm(vm) / np.sqrt(m), mem.key_eps)
        w1, w2 = state["mlp_w1"], state["mlp_w2"]
        z = k @ w1.T
        h = silu(z)
        f = nu * (h @ w2.T)
    else:
        f = 0.0
    # E = ∂ℓ/∂M(k_r), row by row: dot −ηv_r; l2 η(M(k_r) − v_r).
    e = -eta * vm if mem.objective == "dot" else eta * (s + f - vm)

    # Write: S ← αS − E. θ: the row mean of its gradient in units of ν (Ê = E/ν), each weight at
    # a rate normalised by a bound on its curvature, η′ = η/(1 + ηλ̄) (delta-GD style).
    s = alpha * s - e
    if mem.hidden:
        e_hat = e / nu
        rate_w2 = 1.0 / (1.0 + eta * np.sum(h * h) / m)                          # λ̄ = ‖H‖²/m
        rate_w1 = 1.0 / (1.0 + eta * mem.SILU_SLOPE_SQ * np.sum(w2 * w2))        # λ̄ = 1.21‖W₂‖²
        grad_w2 = rate_w2 * (e_hat.T @ h) / m                          # Êᵀ H / m : n×h
        grad_w1 = rate_w1 * ((e_hat @ w2) * silu_grad(z, sigmoid)).T @ k / m    # [(Ê W₂) ⊙ σ'(Z)]ᵀ K / m : h×n
        w1 = state["mlp_w1"] = w1 - grad_w1                            # no retention on W₁
        w2 = state["mlp_w2"] = alpha * w2 - grad_w2
    state["memory"] = s.reshape(g.shape)
    if mem.keys == "previous":
        state["prev_key"] = g_hat.reshape(g.shape)

    # Read D_t = M_{φ_t}(Q_t) = S + ν σ(Q W₁ᵀ) W₂ᵀ, Q = Ĝ_t.
    d = s + (nu * (silu(g_hat @ w1.T) @ w2.T) if mem.hidden else 0.0)
    if mem.nesterov:
        d = alpha * d + eta * vm
    return d.reshape(g.shape)


def deep_memory_stats(rule: UpdateRule, state: ParamState, g: np.ndarray) -> dict[str, float]:
    """What the deep part of a DMGD memory contributes, read at state ``state`` for gradient ``g``.

    - ``mlp_share = ‖ν f_θ(Q)‖_F / ‖S‖_F``: the MLP's read against the linear part's (``Q = Ĝ``);
    - ``inner_loss = ‖M_φ(Q) − V‖²_F / ‖V‖²_F``: how well the whole memory, read at the
      gradient's direction, predicts its values ``V = P(g)`` (0 perfect, 1 as good as nothing);
    - ``value_scale``: ``ν``, the MLP's output unit.

    The backends' ``memory_stats`` compute the same numbers (``tests/test_dmgd.py``).
    """
    mem = rule.memory
    m, n = matrix_view_shape(np.shape(g))
    gm = np.asarray(g, dtype=np.float64).reshape(m, n)
    s = np.asarray(state["memory"], dtype=np.float64).reshape(m, n)
    v = gm
    if isinstance(rule.values, AdamValues):               # V of docs/math.md §3 at the state's step
        b2, t = rule.values.beta2, max(int(state["step"]), 1)
        nu_sq = np.asarray(state["values_sq"], dtype=np.float64).reshape(m, n)
        v = gm / (np.sqrt(nu_sq / (1 - b2**t)) + rule.values.eps)
    g_hat = gm / np.maximum(np.linalg.norm(gm, axis=1, keepdims=True), mem.key_eps)
    nu, f = 0.0, np.zeros_like(s)
    if mem.hidden:
        nu = float(state["value_scale"])
        f = nu * (silu(g_hat @ np.asarray(state["mlp_w1"]).T) @ np.asarray(state["mlp_w2"]).T)
    s_norm, v_sq = np.linalg.norm(s), np.sum(v * v)
    return {"mlp_share": float(np.linalg.norm(f) / s_norm) if s_norm > 0 else 0.0,
            "inner_loss": float(np.sum((s + f - v) ** 2) / v_sq) if v_sq > 0 else 0.0,
            "value_scale": nu}


# --------------------------------------------------------------------------------------------
# One parameter, one rule (docs/math.md §0)
# --------------------------------------------------------------------------------------------


def multiscale_memory(mem: MultiScaleMemory, state: ParamState, g: np.ndarray, v: np.ndarray, t: int,
                      sigma: Sigma) -> np.ndarray:
    """M3 (docs/math.md §6): ``σ(D̃_fast) + w O²`` with ``O²`` frozen since the last slow
    write; then the slow level accumulates ``V`` and, every ``period`` steps, writes
    ``M² ← ρ M² + η₃ Σ V`` and refreshes ``O² = σ(M²)`` (read from the next step on)."""
    out = sigma(linear_memory(mem.fast, state, g, v, t)) + mem.slow_weight * state["slow_readout"]
    state["slow_accumulator"] = state["slow_accumulator"] + v
    if t % mem.period == 0:
        state["slow_memory"] = mem.slow_momentum * state["slow_memory"] + mem.slow_inner_lr * state["slow_accumulator"]
        state["slow_readout"] = sigma(state["slow_memory"])
        state["slow_accumulator"] = np.zeros_like(v)
    return out


#: Write and read per memory class: ``(memory, state, G, V, t, σ) -> σ(D̃)`` (M3: plus its slow
#: term), updating the memory's own state.
MEMORIES: dict[type, Callable[..., np.ndarray]] = {
    LinearMemory: lambda mem, state, g, v, t, sigma: sigma(linear_memory(mem, state, g, v, t)),
    DeepMemory: lambda mem, state, g, v, t, sigma: sigma(deep_memory(mem, state, g, v)),
    MultiScaleMemory: multiscale_memory,
}


# --------------------------------------------------------------------------------------------
# One parameter, one rule (docs/math.md §0)
# --------------------------------------------------------------------------------------------


def rule_init(rule: UpdateRule, shape: tuple[int, ...], name: str = "") -> ParamState:
    """Zero state for a parameter ``name`` of ``shape``: the rule's ``state_slots()``."""
    m, n = matrix_view_shape(shape) if len(shape) >= 2 else (0, 0)
    state: ParamState = {}
    for slot in rule.state_slots():
        state[slot.key] = 0 if slot.key == "step" else slot.initial(name, slot.shape(shape, m, n))
    return state


def rule_step(rule: UpdateRule, w: np.ndarray, g: np.ndarray, state: ParamState, *,
              lr: float, weight_decay: float) -> tuple[np.ndarray, ParamState]:
    """One step of ``rule`` on parameter ``w`` with gradient ``g``; returns new copies."""
    w = np.asarray(w, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    state = dict(state)
    t = None
    if "step" in state:                                 # rules whose math reads t (counts_steps)
        t = state["step"] = state["step"] + 1

    if rule.maximize:
        g = -g
    if not rule.decoupled_weight_decay and weight_decay != 0.0:
        g = g + weight_decay * w                        # coupled L2 (torch SGD/Adam)

    # Values V = P(G) (§3), then the memory's write and read through σ (§2, §4–§6).
    v = kernel_for(VALUES, rule.values, "deepopt.reference.VALUES")(rule.values, state, g, t)
    memory = kernel_for(MEMORIES, rule.memory, "deepopt.reference.MEMORIES")
    out = memory(rule.memory, state, g, v, t, lambda d: apply_readout(rule, d))

    if rule.denominator is not None:
        den = rule.denominator
        if den.accumulate:                              # NL Alg. 1: V_t = V_{t−1} + β₂ G²
            nu = state["second_moment"] = state["second_moment"] + den.beta2 * g * g
        else:
            nu = state["second_moment"] = den.beta2 * state["second_moment"] + (1 - den.beta2) * g * g
        if den.bias_correction:
            nu = nu / (1 - den.beta2**t)
        out = out / (np.sqrt(nu) + den.eps)

    # Outer step W ← W − γλW − γ s(W) O (docs/math.md §0).
    scale = shape_scale_factor(rule.shape_scale, *matrix_view_shape(w.shape)) if w.ndim >= 2 else 1.0
    new_w = w - lr * scale * out
    if rule.decoupled_weight_decay and weight_decay != 0.0:
        new_w = new_w - lr * weight_decay * w
    return new_w, state


# --------------------------------------------------------------------------------------------
# A whole spec over named parameters (routing included)
# --------------------------------------------------------------------------------------------


def resolve(spec: Spec, name: str, shape: tuple[int, ...]) -> Spec:
    """The spec (``spec`` itself or its fallback) that owns parameter ``name``."""
    return spec if spec.route(name, shape) == "rule" else spec.fallback


def init(spec: Spec, params: Mapping[str, np.ndarray]) -> dict[str, ParamState]:
    return {name: rule_init(resolve(spec, name, np.shape(p)).rule, np.shape(p), name)
            for name, p in params.items()}


def step(spec: Spec, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray | None],
         state: Mapping[str, ParamState]) -> tuple[dict[str, np.ndarray], dict[str, ParamState]]:
    """One optimizer step; parameters whose gradient is missing or None are left as they are."""
    new_params, new_state = {}, {}
    for name, p in params.items():
        g = grads.get(name)
        if g is None:
            new_params[name], new_state[name] = np.asarray(p, dtype=np.float64), state[name]
            continue
        owner = resolve(spec, name, np.shape(p))
        new_params[name], new_state[name] = rule_step(
            owner.rule, p, g, state[name], lr=owner.lr, weight_decay=owner.weight_decay)
    return new_params, new_state
