"""Functional steps of the linear-memory rule (MATH §0–§4) on lists of tensors.

``linear_step_single`` is the readable loop; ``linear_step_batched`` is its twin: element-wise
phases use ``torch._foreach_*`` and matrix phases (delta write, Newton–Schulz) stack
same-shape matrices into one batched matmul. ``tests/test_torch_backend.py`` keeps them equal.
Both mutate ``params`` and ``states`` in place.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from deepopt import AdamValues, NewtonSchulz, Sign, UpdateRule, matrix_view_shape, shape_scale_factor
from torch_backend._newton_schulz import newton_schulz

Tensors = list[torch.Tensor]


def _scale(rule: UpdateRule, p: torch.Tensor) -> float:
    return shape_scale_factor(rule.shape_scale, *matrix_view_shape(p.shape)) if p.ndim >= 2 else 1.0


def _is_ema(rule: UpdateRule) -> bool:
    """η = 1 − α: write and Nesterov read are lerps, as torch's AdamW and Muon compute them."""
    return rule.memory.inner_lr == 1.0 - rule.memory.momentum and not rule.memory.undamped_first_write


def _delta(s: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``S KᵀK`` for stacks ``(B, m, n)``, multiplied on the smaller side."""
    if s.size(-2) <= s.size(-1):
        return torch.bmm(torch.bmm(s, k.mT), k)              # (S Kᵀ) K : (B,m,m)·(B,m,n)
    return torch.bmm(s, torch.bmm(k.mT, k))                  # S (KᵀK) : (B,m,n)·(B,n,n)


def _keys(g: torch.Tensor, key_eps: float) -> torch.Tensor:
    """``K = G / max(‖G‖_F, ε)`` per matrix of a ``(B, m, n)`` stack."""
    return g / g.norm(dim=(-2, -1), keepdim=True).clamp(min=key_eps)


# --------------------------------------------------------------------------------------------
# Single-tensor loop: the readable version
# --------------------------------------------------------------------------------------------


def linear_step_single(rule: UpdateRule, params: Tensors, grads: Tensors, states: list[dict], *,
                       lr: float, weight_decay: float) -> None:
    mem = rule.memory
    alpha = mem.momentum
    for p, g, st in zip(params, grads, states):
        st["step"] += 1
        t = int(st["step"].item())
        if rule.maximize:
            g = -g
        if not rule.decoupled_weight_decay and weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)                 # coupled L2, as torch SGD

        # Values V = P(G) (MATH §3).
        v = g
        if isinstance(rule.values, AdamValues):
            b2 = rule.values.beta2
            nu = st["values_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            v = g / nu.div(1 - b2**t).sqrt_().add_(rule.values.eps)

        # Memory write S_t = S_{t−1}(αI − ζKᵀK) + ηV (MATH §2).
        eta = 1.0 if (mem.undamped_first_write and t == 1) else mem.inner_lr
        if mem.stateless:
            s = v if eta == 1.0 else v * eta
        else:
            s = st["memory"]
            if mem.zeta != 0.0:
                m, n = matrix_view_shape(p.shape)
                k = _keys(g.reshape(1, m, n), mem.key_eps)
                delta = _delta(s.reshape(1, m, n), k).view_as(s)
                s.mul_(alpha).add_(delta, alpha=-mem.zeta).add_(v, alpha=eta)
            elif _is_ema(rule):
                s.lerp_(v, 1 - alpha)
            else:
                s.mul_(alpha).add_(v, alpha=eta)

        # Read-out D̃ (Nesterov, bias correction).
        if mem.nesterov:
            if mem.bias_correction:
                d = s * (alpha / (1 - alpha ** (t + 1))) + v * (eta / (1 - alpha**t))
            elif _is_ema(rule):
                d = v.lerp(s, alpha)                         # torch Muon: grad.lerp(buf, μ)
            else:
                d = s * alpha + v * eta if eta != 1.0 else v.add(s, alpha=alpha)
        else:
            d = s / (1 - alpha**t) if mem.bias_correction else s

        # Read-out map σ (MATH §4).
        if isinstance(rule.readout, NewtonSchulz):
            m, n = matrix_view_shape(p.shape)
            out = newton_schulz(d.reshape(1, m, n), rule.readout).view_as(p)
        elif isinstance(rule.readout, Sign):
            out = torch.sign(d)
        else:
            out = d

        if rule.denominator is not None:
            den = rule.denominator
            nu = st["second_moment"].mul_(den.beta2).addcmul_(g, g, value=1 - den.beta2)
            denom = nu.sqrt()
            if den.bias_correction:
                denom.div_(math.sqrt(1 - den.beta2**t))
            out = out / denom.add_(den.eps)

        # Outer step W ← W − γλW − γ s(W) O (MATH §0).
        if rule.decoupled_weight_decay and weight_decay != 0.0:
            p.mul_(1 - lr * weight_decay)
        p.add_(out, alpha=-lr * _scale(rule, p))


# --------------------------------------------------------------------------------------------
# Batched twin: foreach element-wise phases, one batched matmul per matrix shape
# --------------------------------------------------------------------------------------------


def _buckets(tensors: Tensors) -> dict[tuple, list[int]]:
    """Indices of tensors that share a matrix view, dtype and device."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, x in enumerate(tensors):
        out[(*matrix_view_shape(x.shape), x.dtype, x.device)].append(i)
    return out


def _batched_matrix_map(fn, *lists: Tensors) -> Tensors:
    """Apply ``fn`` to stacks ``(B, m, n)`` of same-shape matrix views; return per-tensor views."""
    result: Tensors = [None] * len(lists[0])  # type: ignore[list-item]
    for (m, n, *_), idx in _buckets(lists[0]).items():
        stacks = [torch.stack([xs[i].reshape(m, n) for i in idx]) for xs in lists]
        y = fn(*stacks)
        for j, i in enumerate(idx):
            result[i] = y[j].view_as(lists[0][i])
    return result


def linear_step_batched(rule: UpdateRule, params: Tensors, grads: Tensors, states: list[dict], *,
                        lr: float, weight_decay: float) -> None:
    mem = rule.memory
    alpha = mem.momentum
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    ts = [int(s.item()) for s in steps]

    gs = grads
    if rule.maximize:
        gs = torch._foreach_neg(gs)
    if not rule.decoupled_weight_decay and weight_decay != 0.0:
        gs = torch._foreach_add(gs, params, alpha=weight_decay)

    # Values (MATH §3).
    vs = gs
    if isinstance(rule.values, AdamValues):
        b2 = rule.values.beta2
        nus = [st["values_sq"] for st in states]
        torch._foreach_mul_(nus, b2)
        torch._foreach_addcmul_(nus, gs, gs, value=1 - b2)
        denom = torch._foreach_div(nus, [1 - b2**t for t in ts])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, rule.values.eps)
        vs = torch._foreach_div(gs, denom)

    # Memory write (MATH §2).
    etas = [1.0 if (mem.undamped_first_write and t == 1) else mem.inner_lr for t in ts]
    if mem.stateless:
        ss = vs if all(e == 1.0 for e in etas) else torch._foreach_mul(vs, etas)
    else:
        ss = [st["memory"] for st in states]
        if mem.zeta != 0.0:
            deltas = _batched_matrix_map(lambda s, g: _delta(s, _keys(g, mem.key_eps)), ss, gs)
            torch._foreach_mul_(ss, alpha)
            torch._foreach_add_(ss, deltas, alpha=-mem.zeta)
            torch._foreach_add_(ss, torch._foreach_mul(vs, etas))
        elif _is_ema(rule):
            torch._foreach_lerp_(ss, vs, 1 - alpha)
        else:
            torch._foreach_mul_(ss, alpha)
            torch._foreach_add_(ss, torch._foreach_mul(vs, etas))

    # Read-out D̃.
    if mem.nesterov:
        if mem.bias_correction:
            ds = torch._foreach_mul(ss, [alpha / (1 - alpha ** (t + 1)) for t in ts])
            torch._foreach_add_(ds, torch._foreach_mul(vs, [e / (1 - alpha**t) for e, t in zip(etas, ts)]))
        elif _is_ema(rule):
            ds = torch._foreach_lerp(vs, ss, alpha)
        elif all(e == 1.0 for e in etas):
            ds = torch._foreach_add(vs, ss, alpha=alpha)
        else:
            ds = torch._foreach_mul(ss, alpha)
            torch._foreach_add_(ds, torch._foreach_mul(vs, etas))
    else:
        ds = torch._foreach_div(ss, [1 - alpha**t for t in ts]) if mem.bias_correction else ss

    # Read-out map σ.
    if isinstance(rule.readout, NewtonSchulz):
        outs = _batched_matrix_map(lambda x: newton_schulz(x, rule.readout), ds)
    elif isinstance(rule.readout, Sign):
        outs = torch._foreach_sign(ds)
    else:
        outs = ds

    if rule.denominator is not None:
        den = rule.denominator
        nus = [st["second_moment"] for st in states]
        torch._foreach_mul_(nus, den.beta2)
        torch._foreach_addcmul_(nus, gs, gs, value=1 - den.beta2)
        denom = torch._foreach_sqrt(nus)
        if den.bias_correction:
            torch._foreach_div_(denom, [math.sqrt(1 - den.beta2**t) for t in ts])
        torch._foreach_add_(denom, den.eps)
        outs = torch._foreach_div(outs, denom)

    # Outer step.
    if rule.decoupled_weight_decay and weight_decay != 0.0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_mul(outs, [-lr * _scale(rule, p) for p in params]))
