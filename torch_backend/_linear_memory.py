"""The linear memory on torch tensors (docs/math.md §2; NL eq. 46–49): momentum, EMA, delta.

``S_t = S_{t−1}(αI − ζKᵀK) + ηV`` and its read-out; :data:`KERNEL` is its entry in
``_functional.MEMORIES``. The write is element-wise (``torch._foreach_*``) but for the delta
term ``S KᵀK``, a batched matmul per matrix shape. M3's fast level (``_multiscale.py``) is this
memory too.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from deepopt import Identity, LinearMemory, UpdateRule, matrix_view_shape
from torch_backend import _distributed, _readout
from torch_backend._foreach import HALF, Tensors, add_scaled, batched_matrix_map, first_write_rate, scalar_op
from torch_backend._kernels import MemoryKernel, Read


def is_ema(mem: LinearMemory) -> bool:
    """η = 1 − α: write and Nesterov read are lerps, as torch's AdamW and Muon compute them."""
    return mem.inner_lr == 1.0 - mem.momentum and not mem.undamped_first_write


def folds_bias_correction(rule: UpdateRule) -> bool:
    """Whether the memory's bias correction ``1/(1 − αᵗ)`` can move into the step size (exact
    when σ is the identity), as torch's AdamW folds it into ``lr / (1 − β₁ᵗ)``."""
    mem = rule.memory
    return (isinstance(mem, LinearMemory) and mem.bias_correction and not mem.nesterov
            and isinstance(rule.readout, Identity))


def delta_term(s: torch.Tensor, g: torch.Tensor, key_eps: float) -> torch.Tensor:
    """``S KᵀK`` with ``K = G / max(‖G‖_F, ε)``, multiplied on the smaller side (docs/math.md §2)."""
    k = g / g.norm(dim=(-2, -1), keepdim=True).clamp(min=key_eps)
    if s.size(-2) <= s.size(-1):
        return torch.bmm(torch.bmm(s, k.mT), k)              # (S Kᵀ) K : (B,m,m)·(B,m,n)
    return torch.bmm(s, torch.bmm(k.mT, k))                  # S (KᵀK) : (B,m,n)·(B,n,n)


def write_read_one(mem: LinearMemory, st: dict, g: torch.Tensor, v: torch.Tensor, t,
                    lay=None) -> torch.Tensor:
    """Write ``S_t = S_{t−1}(αI − ζKᵀK) + ηV`` (docs/math.md §2) and return the read-out D̃."""
    alpha = mem.momentum
    eta = first_write_rate(t, mem.inner_lr) if mem.undamped_first_write else mem.inner_lr
    if mem.stateless:
        s = v if isinstance(eta, float) and eta == 1.0 else v * eta
    else:
        s = st["memory"]
        if mem.zeta != 0.0 and g.ndim >= 2:                  # 1-D: the recurrence with ζ = 0
            if lay is not None and lay.sharded:              # whole matrices on their owner
                delta = _distributed.map_whole(lay, lambda s, g: delta_term(s, g, mem.key_eps),
                                               [s[None], g[None]])[0]
            else:
                m, n = matrix_view_shape(g.shape)
                delta = delta_term(s.reshape(1, m, n), g.reshape(1, m, n), mem.key_eps).view_as(s)
            add_scaled(s.mul_(alpha).add_(delta, alpha=-mem.zeta), v, eta)
        elif is_ema(mem):
            s.lerp_(v, 1 - alpha)
        else:
            add_scaled(s.mul_(alpha), v, eta)
    if mem.nesterov:
        if mem.bias_correction:                              # NAdam form, as optax
            return s * (alpha / (1 - alpha ** (t + 1))) + v * (eta / (1 - alpha**t))
        if is_ema(mem):
            return v.lerp(s, alpha)                          # torch Muon: grad.lerp(buf, μ)
        return v.add(s, alpha=alpha) if isinstance(eta, float) and eta == 1.0 else s * alpha + v * eta
    return s / (1 - alpha**t) if mem.bias_correction else s


def folds_nesterov_sum(rule: UpdateRule) -> bool:
    """Whether the NAdam read's scale ``c₁ + c₂`` (:func:`write_read`) can move into the step
    size (exact when σ is the identity)."""
    mem = rule.memory
    return (isinstance(mem, LinearMemory) and mem.bias_correction and mem.nesterov
            and isinstance(rule.readout, Identity))


def write_read(mem: LinearMemory, states: list[dict], gs: Tensors, vs: Tensors,
               ts: list | None, layouts: list | None = None, sums: list | None = None) -> Tensors:
    """The write and the read-outs D̃ of every tensor. ``sums``: a list to receive the NAdam
    read's per-tensor scale ``c₁ + c₂`` when the read-outs leave it to the step size (the
    read-outs are then ``D̃/(c₁ + c₂)``); left empty when they do not."""
    alpha, eta = mem.momentum, mem.inner_lr
    # η per tensor only under torch's first-write quirk; otherwise one scalar (no temporaries).
    etas = [first_write_rate(t, eta) for t in ts] if mem.undamped_first_write else None

    def add_values(dst: Tensors) -> None:                    # dst += η V
        if etas is None:
            torch._foreach_add_(dst, vs, alpha=eta)
        else:
            torch._foreach_add_(dst, scalar_op("mul", vs, etas))

    if mem.stateless:
        ss = vs if etas is None and eta == 1.0 else scalar_op("mul", vs, etas or eta)
    else:
        ss = [st["memory"] for st in states]
        if mem.zeta != 0.0:
            # The delta term S KᵀK on matrix views; 1-D parameters take the ζ = 0 recurrence.
            mats = [i for i, s in enumerate(ss) if s.ndim >= 2]
            deltas = batched_matrix_map(lambda s, g: delta_term(s, g, mem.key_eps),
                                         [ss[i] for i in mats], [gs[i] for i in mats],
                                         layouts=None if layouts is None else
                                         _distributed.sharded_only([layouts[i] for i in mats])) if mats else []
            scalar_op("mul", ss, alpha, inplace=True)
            if mats:
                torch._foreach_add_([ss[i] for i in mats], deltas, alpha=-mem.zeta)
            add_values(ss)
        elif is_ema(mem):
            torch._foreach_lerp_(ss, vs, 1 - alpha)
        else:
            scalar_op("mul", ss, alpha, inplace=True)
            add_values(ss)
    if mem.nesterov:
        if mem.bias_correction:                              # NAdam: c₁S + c₂V (docs/math.md §2)
            c1 = [alpha / (1 - alpha ** (t + 1)) for t in ts]
            c2 = [(etas[i] if etas else eta) / (1 - alpha**t) for i, t in enumerate(ts)]
            scale = [a + b for a, b in zip(c1, c2)]
            if not torch.compiler.is_compiling() and all(scale) and not any(s.dtype in HALF for s in ss):
                # (c₁ + c₂)·lerp(V, S, c₁/(c₁ + c₂)): one pass and one temporary where
                # c₁S + c₂V takes three and two; the scale goes to the step size when it can.
                ds = torch._foreach_lerp(vs, ss, [a / c for a, c in zip(c1, scale)])
                if sums is None:
                    torch._foreach_mul_(ds, scale)
                else:
                    sums.extend(scale)
                return ds
            ds = scalar_op("mul", ss, c1)
            torch._foreach_add_(ds, scalar_op("mul", vs, c2))
            return ds
        if is_ema(mem):
            return torch._foreach_lerp(vs, ss, alpha)
        if etas is None and eta == 1.0:
            return torch._foreach_add(vs, ss, alpha=alpha)   # torch SGD: g + μ·buf
        ds = scalar_op("mul", ss, alpha)
        add_values(ds)
        return ds
    return scalar_op("div", ss, [1 - alpha**t for t in ts]) if mem.bias_correction else ss


def _single(rule: UpdateRule, st: dict, g: torch.Tensor, v: torch.Tensor, t, lay=None) -> Read:
    mem, divisor = rule.memory, None
    if folds_bias_correction(rule):                          # as the batched twin does
        mem, divisor = replace(mem, bias_correction=False), 1 - mem.momentum**t
    return Read(_readout.apply_one(rule, write_read_one(mem, st, g, v, t, lay), lay), divisor)


def _batched(rule: UpdateRule, states: list[dict], gs: Tensors, vs: Tensors, ts: list | None,
             layouts: list | None = None) -> Read:
    mem = rule.memory
    if folds_bias_correction(rule):                          # ÷ (1 − αᵗ) left to the step size
        ds = write_read(replace(mem, bias_correction=False), states, gs, vs, ts, layouts)
        return Read(ds, [1 - mem.momentum**t for t in ts])
    if folds_nesterov_sum(rule):                             # × (c₁ + c₂) left to the step size
        sums: list = []
        ds = write_read(mem, states, gs, vs, ts, layouts, sums)
        return Read(ds, [1 / c for c in sums] if sums else None)
    return Read(_readout.apply(rule, write_read(mem, states, gs, vs, ts, layouts), layouts))


#: The linear memory's entry in ``_functional.MEMORIES``.
KERNEL = MemoryKernel(single=_single, batched=_batched)


__all__ = ["KERNEL", "delta_term", "folds_bias_correction", "folds_nesterov_sum", "is_ema", "write_read", "write_read_one"]
