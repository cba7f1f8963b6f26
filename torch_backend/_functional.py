"""Functional steps of every deepopt rule (docs/math.md §0–§6) on lists of tensors.

``step_single`` is the readable per-tensor loop; ``step_batched`` is its twin: element-wise
phases use ``torch._foreach_*`` and matrix phases (delta write, DMGD's memory, Newton–Schulz)
stack same-shape matrices into one batched matmul. ``tests/test_torch_backend.py`` keeps the
twins equal. Both mutate ``params`` and ``states`` in place.

Phases, in order: gradient (maximize, coupled decay) → values (docs/math.md §3) → the memory's
write and read-out through σ (linear §2, deep §5, multi-scale §6; σ §4) → denominator → outer
step (§0). Each part runs the kernel its class maps to in one table: ``VALUES``, ``MEMORIES``
(and ``_readout.READOUTS``, which the memories apply). A part's state is its
``state_slots()`` (``_optimizer.init_state``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from deepopt import (
    AdamValues,
    DeepMemory,
    IdentityValues,
    LinearMemory,
    Memory,
    MultiScaleMemory,
    UpdateRule,
    Values,
    matrix_view_shape,
    shape_scale_factor,
)
from deepopt._validate import kernel_for
from torch_backend import _deep_memory, _linear_memory, _multiscale
from torch_backend._foreach import Tensors, advance, counts, decay, made, scalar_op, sqrt
from torch_backend._fused import classic_kind, step_classic
from torch_backend._kernels import MemoryKernel, OuterStep

# --------------------------------------------------------------------------------------------
# Values V = P(G) (docs/math.md §3)
# --------------------------------------------------------------------------------------------


class ValuesKernel(NamedTuple):
    """A values transform in both twins: ``single(values, state, G, t) -> V`` and
    ``batched(values, states, Gs, ts) -> Vs``, updating the transform's own state."""

    single: Callable[..., torch.Tensor]
    batched: Callable[..., Tensors]


def _adam_values_one(values: AdamValues, st: dict, g: torch.Tensor, t) -> torch.Tensor:
    b2 = values.beta2
    nu = st["values_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    return g / nu.div(1 - b2**t).sqrt_().add_(values.eps)


def _adam_values(values: AdamValues, states: list[dict], gs: Tensors, ts: list) -> Tensors:
    b2 = values.beta2
    nus = [st["values_sq"] for st in states]
    scalar_op("mul", nus, b2, inplace=True)
    torch._foreach_addcmul_(nus, gs, gs, value=1 - b2)
    denom = scalar_op("div", nus, [1 - b2**t for t in ts])
    torch._foreach_sqrt_(denom)
    scalar_op("add", denom, values.eps, inplace=True)
    return torch._foreach_div(gs, denom)


VALUES: dict[type[Values], ValuesKernel] = {
    IdentityValues: ValuesKernel(single=lambda values, st, g, t: g, batched=lambda values, states, gs, ts: gs),
    AdamValues: ValuesKernel(single=_adam_values_one, batched=_adam_values),
}

# --------------------------------------------------------------------------------------------
# Memories: write, read and σ (docs/math.md §2, §4–§6)
# --------------------------------------------------------------------------------------------

MEMORIES: dict[type[Memory], MemoryKernel] = {
    LinearMemory: _linear_memory.KERNEL,
    DeepMemory: _deep_memory.KERNEL,
    MultiScaleMemory: _multiscale.KERNEL,
}


def _kernels(rule: UpdateRule) -> tuple[ValuesKernel, MemoryKernel]:
    return (kernel_for(VALUES, rule.values, "torch_backend._functional.VALUES"),
            kernel_for(MEMORIES, rule.memory, "torch_backend._functional.MEMORIES"))


def _scale(rule: UpdateRule, shape: torch.Size) -> float:
    return shape_scale_factor(rule.shape_scale, *matrix_view_shape(shape)) if len(shape) >= 2 else 1.0


def _shapes(params: Tensors, layouts: list | None) -> list[torch.Size]:
    """Each parameter's global shape (a local shard's layout knows its parameter's)."""
    if layouts is None:
        return [p.shape for p in params]
    return [p.shape if lay is None else lay.shape for p, lay in zip(params, layouts)]


# --------------------------------------------------------------------------------------------
# Single-tensor loop: the readable version
# --------------------------------------------------------------------------------------------


def step_single(rule: UpdateRule, params: Tensors, grads: Tensors, states: list[dict], *,
                lr: float, weight_decay: float, layouts: list | None = None) -> None:
    """``layouts``: with local shards of distributed parameters, each one's
    :class:`~torch_backend._distributed.Layout` (whole-matrix phases then communicate)."""
    values, memory = _kernels(rule)
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        lay = layouts[i] if layouts is not None else None
        t, denom = None, None
        if rule.counts_steps:
            st["step"] += 1
            t = counts([st["step"]], [p])[0]
        if rule.maximize:
            g = -g
        if not rule.decoupled_weight_decay and weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)                 # coupled L2, as torch SGD

        # Values V = P(G) (§3); the memory's write and read-out through σ (§2, §4–§6).
        v = values.single(rule.values, st, g, t)
        if memory.single is not None:
            out, divisor = memory.single(rule, st, g, v, t, lay)
        else:                                                # the batched kernel on lists of one
            outs, divisors = memory.batched(rule, [st], [g], [v], None if t is None else [t],
                                            None if lay is None else [lay])
            out, divisor = outs[0], None if divisors is None else divisors[0]

        if rule.denominator is not None:
            den = rule.denominator
            nu = st["second_moment"]
            if den.accumulate:
                nu.addcmul_(g, g, value=den.beta2)           # NL Alg. 1: V ← V + β₂G²
            else:
                nu.mul_(den.beta2).addcmul_(g, g, value=1 - den.beta2)
            denom = nu.sqrt()
            if den.bias_correction:
                denom.div_(sqrt(1 - den.beta2**t))
            denom.add_(den.eps)

        # Outer step W ← W − γλW − γ s(W) O / denom (docs/math.md §0); one rounding in half precision.
        if rule.decoupled_weight_decay and weight_decay != 0.0:
            p.mul_(1 - lr * weight_decay)
        size = lr * _scale(rule, p.shape if lay is None else lay.shape)
        if divisor is not None:
            size = size / divisor
        if isinstance(size, torch.Tensor):                   # t-dependent or a tensor lr, under compile
            out = out.to(p.dtype) * -size                    # in p's precision, as alpha= is (σ may be bf16)
            size = -1.0
        if denom is not None:
            p.addcdiv_(out, denom, value=-size)
        else:
            p.add_(out, alpha=-size)


# --------------------------------------------------------------------------------------------
# Batched twin: foreach element-wise phases, one batched matmul per matrix shape
# --------------------------------------------------------------------------------------------


def step_batched(rule: UpdateRule, params: Tensors, grads: Tensors, states: list[dict], *,
                 lr: float, weight_decay: float, layouts: list | None = None,
                 fused: bool | None = None) -> None:
    # Under compile the classic rules take the foreach twin, which inductor fuses itself:
    # torch's fused kernels cannot be traced by it (no fake kernel for ``_fused_sgd_`` or for a
    # tensor lr, and functionalization rejects ``_fused_adamw_``), and torch.optim's own fused
    # optimizers are skipped by dynamo altogether, so they run eagerly inside a compiled step.
    kind = None if torch.compiler.is_compiling() else classic_kind(rule)
    if kind is not None and step_classic(kind, rule, params, grads, states, fused=fused, lr=lr,
                                         weight_decay=weight_decay):   # torch's AdamW / SGD kernel,
        return                                                      # or deepopt's for their variants
    values, memory = _kernels(rule)
    ts = None
    if rule.counts_steps:
        ts = advance(states, params)[1]

    gs = grads
    if rule.maximize:
        gs = torch._foreach_neg(gs)
    if not rule.decoupled_weight_decay and weight_decay != 0.0:
        gs = torch._foreach_add(gs, params, alpha=weight_decay)

    # Values (§3); the memory's write and read-out through σ (§2, §4–§6). ``divisors``: a bias
    # correction left for the step size (exact when σ is the identity), as torch's AdamW
    # folds it into ``lr / (1 − β₁ᵗ)``.
    vs = values.batched(rule.values, states, gs, ts)
    if (memory.applies and rule.denominator is None and rule.shape_scale == "none" and layouts is None
            and not torch.compiler.is_compiling()):
        # W ← W − γλW − γ O, the memory making the last term part by part as its read-outs are
        # ready (while they are in cache; DMGD: bucket by bucket). The decay reads W first.
        if rule.decoupled_weight_decay and weight_decay != 0.0:
            decay(params, lr * weight_decay)

        apply = OuterStep(params, lr)
        outs, divisors = memory.batched(rule, states, gs, vs, ts, layouts, apply=apply)
        rest = [i for i, o in enumerate(outs) if o is not None]
        if divisors is not None:
            raise RuntimeError("a memory that applies its read-outs returned divisors")
        if rest:
            apply(rest, [outs[i] for i in rest])
        return
    outs, divisors = memory.batched(rule, states, gs, vs, ts, layouts)

    denom = None
    if rule.denominator is not None:
        den = rule.denominator
        nus = [st["second_moment"] for st in states]
        if den.accumulate:
            torch._foreach_addcmul_(nus, gs, gs, value=den.beta2)
        else:
            scalar_op("mul", nus, den.beta2, inplace=True)
            torch._foreach_addcmul_(nus, gs, gs, value=1 - den.beta2)
        denom = torch._foreach_sqrt(nus)
        if den.bias_correction:
            scalar_op("div", denom, [sqrt(1 - den.beta2**t) for t in ts], inplace=True)
        scalar_op("add", denom, den.eps, inplace=True)

    # Outer step W ← W − γλW − γ s(W) O, the step size carrying s(W) and any folded correction.
    if rule.decoupled_weight_decay and weight_decay != 0.0:
        decay(params, lr * weight_decay)
    sizes = ([lr * _scale(rule, shape) for shape in _shapes(params, layouts)] if rule.shape_scale != "none"
             else [lr] * len(params))
    if divisors is not None:
        sizes = [s / d for s, d in zip(sizes, divisors)]
    if torch.compiler.is_compiling():                        # t-dependent or a tensor lr: made once
        sizes = made(sizes, params)
    by_size: dict[Any, list[int]] = defaultdict(list)         # one foreach call per step size
    for i, size in enumerate(sizes):
        by_size[size].append(i)
    for size, idx in by_size.items():
        ps, os_ = [params[i] for i in idx], [outs[i] for i in idx]
        if isinstance(size, torch.Tensor):                   # t-dependent or a tensor lr, under compile
            os_ = torch._foreach_mul([o.to(p.dtype) for o, p in zip(os_, ps)], -size)   # in p's precision,
            size = -1.0                                      # as alpha= is (σ may be bf16)
        if denom is not None:
            torch._foreach_addcdiv_(ps, os_, [denom[i] for i in idx], value=-size)
        else:
            torch._foreach_add_(ps, os_, alpha=-size)


__all__ = ["MEMORIES", "VALUES", "ValuesKernel", "step_batched", "step_single"]
