"""The numpy float64 reference: the executable statement of MATH.md (§0–§4).

Readable, unbatched and slow on purpose: every backend is tested against it step by step.
Parameters are named arrays in torch layout (``(out, in, *rest)``; the matrix view is
``out × in·prod(rest)``, MATH §0).

    state = reference.init(spec, params)
    params, state = reference.step(spec, params, grads, state)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from deepopt._parts import AdamValues, NewtonSchulz, Sign, shape_scale_factor
from deepopt._spec import Spec, UpdateRule, matrix_view_shape

ParamState = dict[str, Any]

# --------------------------------------------------------------------------------------------
# Read-out maps (MATH §4)
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


def apply_readout(rule: UpdateRule, d: np.ndarray) -> np.ndarray:
    if isinstance(rule.readout, NewtonSchulz):
        m, n = matrix_view_shape(d.shape)
        return newton_schulz(d.reshape(m, n), rule.readout).reshape(d.shape)
    if isinstance(rule.readout, Sign):
        return np.sign(d)
    return d


# --------------------------------------------------------------------------------------------
# One parameter, one rule (MATH §0)
# --------------------------------------------------------------------------------------------


def rule_init(rule: UpdateRule, shape: tuple[int, ...]) -> ParamState:
    state: ParamState = {"step": 0}
    if not rule.memory.stateless:
        state["memory"] = np.zeros(shape)               # S, MATH §2
    if isinstance(rule.values, AdamValues):
        state["values_sq"] = np.zeros(shape)            # v of MATH §3's adam values
    if rule.denominator is not None:
        state["second_moment"] = np.zeros(shape)        # v of Adam's denominator
    return state


def rule_step(rule: UpdateRule, w: np.ndarray, g: np.ndarray, state: ParamState, *,
              lr: float, weight_decay: float) -> tuple[np.ndarray, ParamState]:
    """One step of ``rule`` on parameter ``w`` with gradient ``g``; returns new copies."""
    w = np.asarray(w, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    state = dict(state)
    t = state["step"] = state["step"] + 1
    mem = rule.memory
    alpha = mem.momentum

    if rule.maximize:
        g = -g
    if not rule.decoupled_weight_decay and weight_decay != 0.0:
        g = g + weight_decay * w                        # coupled L2 (torch SGD/Adam)

    # Values V_t = P(G_t) (MATH §3).
    if isinstance(rule.values, AdamValues):
        b2 = rule.values.beta2
        nu = state["values_sq"] = b2 * state["values_sq"] + (1 - b2) * g * g
        v = g / (np.sqrt(nu / (1 - b2**t)) + rule.values.eps)
    else:
        v = g

    # Memory write S_t = S_{t−1}(αI − ζKᵀK) + ηV_t (MATH §2, NL eq. 46–49).
    eta = 1.0 if (mem.undamped_first_write and t == 1) else mem.inner_lr
    if mem.stateless:
        s = eta * v
    else:
        s_prev = state["memory"]
        retained = alpha * s_prev
        if mem.zeta != 0.0:
            m, n = matrix_view_shape(w.shape)
            gm = g.reshape(m, n)
            k = gm / max(np.linalg.norm(gm), mem.key_eps)
            sm = s_prev.reshape(m, n)
            retained = retained - mem.zeta * ((sm @ k.T) @ k).reshape(w.shape)   # (S Kᵀ) K : m×m·m×n
        s = state["memory"] = retained + eta * v

    # Read-out D̃_t, with optional (NAdam-form) bias correction.
    if mem.nesterov:
        if mem.bias_correction:
            d = alpha * s / (1 - alpha ** (t + 1)) + eta * v / (1 - alpha**t)
        else:
            d = alpha * s + eta * v
    else:
        d = s / (1 - alpha**t) if mem.bias_correction else s

    out = apply_readout(rule, d)

    if rule.denominator is not None:
        den = rule.denominator
        nu = state["second_moment"] = den.beta2 * state["second_moment"] + (1 - den.beta2) * g * g
        if den.bias_correction:
            nu = nu / (1 - den.beta2**t)
        out = out / (np.sqrt(nu) + den.eps)

    # Outer step W ← W − γλW − γ s(W) σ(D̃) (MATH §0).
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
    return {name: rule_init(resolve(spec, name, np.shape(p)).rule, np.shape(p))
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
