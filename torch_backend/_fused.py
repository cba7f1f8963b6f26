"""torch's fused kernels for the two classic element-wise rules, and AdamW's Nesterov read.

When a rule *is* ``torch.optim.AdamW`` or ``torch.optim.SGD`` — the same memory, values,
denominator and weight-decay convention (docs/math.md §2–§3) — the batched path hands the whole
group to ``torch._fused_adamw_`` / ``torch._fused_sgd_``: one kernel per (device, dtype) over
every tensor, instead of a dozen ``torch._foreach_*`` passes. On CPU this is what makes
``deepopt.adamw`` (and the AdamW fallback of every matrix rule) as fast as
``torch.optim.AdamW(fused=True)``. Three variants torch has no kernel for — SGD with decoupled decay, SGD with torch's undamped
first write, and AdamW with the NAdam read (``adamw(nesterov=True)``, optax's ``nadamw``) — run
deepopt's own kernels (:mod:`torch_backend._native`: on the CPU one loop per tensor, on CUDA one
multi-tensor launch, step counts included) where they are built; elsewhere (no compiler, half
precision, step counts moved off the CPU) torch's kernel runs them with one pass more: a decay
pass before ``_fused_sgd_``, its ``is_first_step`` per step count, or the AdamW kernel with its
β₁ and lr chosen per step and one ``lerp`` after it (:func:`_nadamw`).
The state is deepopt's own (``memory``, ``second_moment``, ``step``), so checkpoints do not
depend on which path ran. Eager steps only: under
``torch.compile`` every rule takes its foreach twin, which inductor fuses (it cannot trace
these kernels).

``fused=None`` (the default) fuses float32/float64 tensors, where the kernels agree with the
foreach and single-tensor twins to float rounding; ``fused=True`` also fuses float16/bfloat16
(the kernels compute in float32 internally, so half-precision results differ from the twins by
ulps, as torch's fused and foreach optimizers do); ``fused=False`` never fuses.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Literal

import torch

from deepopt import Identity, IdentityValues, LinearMemory, UpdateRule
from torch_backend import _native
from torch_backend._foreach import advance, decay

Kind = Literal["adamw", "nadamw", "sgd"]
_DEVICES = ("cpu", "cuda")
_EXACT = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
#: The tensor types deepopt's C++ kernels and torch's fused kernels are handed: a subclass with
#: its own dispatch (DTensor, a fake or functional tensor) takes torch's ops instead.
PLAIN = {torch.Tensor, torch.nn.Parameter}


@functools.lru_cache(maxsize=256)
def classic_kind(rule: UpdateRule) -> Kind | None:
    """``"adamw"`` / ``"sgd"`` when that torch kernel computes ``rule`` — SGD also with decoupled
    decay (one decay pass before the kernel) and with torch's undamped first write (the
    kernel's ``is_first_step``); ``"nadamw"`` for AdamW's Nesterov read (the AdamW kernel with
    its β₁ and lr chosen per step, then one pass that puts the memory right: :func:`_nadamw`)."""
    mem = rule.memory
    if not (isinstance(mem, LinearMemory) and mem.zeta == 0.0
            and isinstance(rule.values, IdentityValues) and isinstance(rule.readout, Identity)
            and rule.shape_scale == "none"):
        return None
    den = rule.denominator
    if (den is not None and den.bias_correction and not den.accumulate and mem.bias_correction
            and mem.inner_lr == 1.0 - mem.momentum and rule.decoupled_weight_decay
            and not mem.undamped_first_write):
        return "nadamw" if mem.nesterov else "adamw"   # EMA memory, bias-corrected read,
                                                        # ÷ (√v̂ + ε), decoupled decay
    if (den is None and not mem.bias_correction and (not mem.nesterov or mem.inner_lr == 1.0)
            and (not mem.stateless or mem.inner_lr == 1.0)):
        return "sgd"            # heavy ball with dampening 1 − η; torch's Nesterov read is
    return None                 # g + μ·buf, i.e. η = 1; with no buffer the kernel takes η = 1


def fused_groups(params: list[torch.Tensor], grads: list[torch.Tensor],
                 fused: bool | None, kind: Kind | None = None) -> list[list[int]] | None:
    """Indices of ``params`` by (device, dtype) if the fused kernels can take them all — plain
    contiguous tensors on CPU/CUDA, each gradient of its parameter's dtype and device,
    float32/float64 (any float with ``fused=True``, except for ``"nadamw"``: in half precision
    its memory, written by the kernel and restored by a ``lerp``, would be rounded twice a step)
    — else None. Contiguous: the kernels walk each tensor's storage in order, so a transposed
    parameter (its state is contiguous) or a gradient with other strides took a wrong step, as
    it does in ``torch.optim.AdamW(fused=True)`` (torch 2.13). Where deepopt's CPU kernels are
    built, their ``fused_groups`` op makes the checks (:func:`_native.loaded`)."""
    if fused is False or not params:
        return None
    half = bool(fused) and kind != "nadamw"
    if not {*map(type, params), *map(type, grads)} <= PLAIN:   # no tensor subclass (DTensor, …)
        return None
    native = _native.loaded()
    if native is not None:                          # the same checks in C++ (~20 µs less for 52)
        ids = native.fused_groups(params, grads, half)
        if not ids:
            return None
        if ids.count(0) == len(ids):
            return [list(range(len(ids)))]
        by_id: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(ids):
            by_id[k].append(i)
        return list(by_id.values())
    dtypes = _EXACT + (_HALF if half else ())
    groups: dict[tuple, list[int]] = defaultdict(list)
    strided = torch.strided
    for i, (p, g) in enumerate(zip(params, grads)):   # per tensor: only the cheap checks
        device, dtype = p.device, p.dtype
        if not (p.layout is strided and g.layout is strided and g.dtype is dtype and g.device == device
                and p.is_contiguous() and g.is_contiguous()):
            return None
        groups[(device, dtype)].append(i)
    if not all(device.type in _DEVICES and dtype in dtypes for device, dtype in groups):   # per group
        return None
    return list(groups.values())


def step_classic(kind: Kind, rule: UpdateRule, params: list[torch.Tensor], grads: list[torch.Tensor],
                 states: list[dict], *, fused: bool | None, lr: float, weight_decay: float) -> bool:
    """One step of a rule :func:`classic_kind` recognised, through a fused kernel: deepopt's own
    for a variant torch has none for (:func:`is_variant`), where it is built and takes every
    tensor (the CPU kernels for CPU tensors, the CUDA ones for CUDA tensors: a step on one device
    never builds the other's); else torch's (:func:`step_fused`) where :func:`fused_groups`
    allows. False, with nothing written, where neither runs (the foreach twin then takes the
    step)."""
    if fused is not False and params and is_variant(kind, rule, weight_decay) and (
            {*map(type, params), *map(type, grads)} <= PLAIN):        # the kernel checks the rest
        native = _native.ops() if params[0].is_cpu else _native.cuda_ops() if params[0].is_cuda else None
        if native is not None and _step_native(native, kind, rule, params, grads, states, lr=lr,
                                               weight_decay=weight_decay):
            return True
    groups = fused_groups(params, grads, fused, kind)
    if groups is None:
        return False
    step_fused(kind, rule, params, grads, states, groups, lr=lr, weight_decay=weight_decay)
    return True


def step_fused(kind: Kind, rule: UpdateRule, params: list[torch.Tensor], grads: list[torch.Tensor],
               states: list[dict], groups: list[list[int]], *, lr: float, weight_decay: float) -> None:
    """One step of a classic rule through torch's fused kernel, one call per (device, dtype)
    group of :func:`fused_groups` (mutates params and states)."""
    mem = rule.memory
    if kind in ("adamw", "nadamw"):
        for p, st in zip(params, states):           # the kernel wants t on the parameter's device
            if st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
        steps, ts = advance(states, params, read=kind == "nadamw")   # one add_ (see advance)
        lists = (params, grads, [st["memory"] for st in states], [st["second_moment"] for st in states],
                 steps) + ((ts,) if kind == "nadamw" else ())
    else:
        lists = (params, grads) if mem.stateless else (params, grads, [st["memory"] for st in states])
        if rule.decoupled_weight_decay:                   # W ← W(1 − γλ) first, as the foreach
            if weight_decay != 0.0:                       # twin does; the kernel then adds −γ·buf
                decay(params, lr * weight_decay)
            weight_decay = 0.0
        if mem.undamped_first_write:                      # torch's first write, t = 1: buf = g
            first = [t == 1 for t in advance(states, params)[1]]
            groups = [[i for i in idx if first[i] == f] for idx in groups for f in (True, False)]
            groups = [idx for idx in groups if idx]
    for idx in groups:
        ps, gs, *rest = lists if len(groups) == 1 else [[xs[i] for i in idx] for xs in lists]
        if kind == "adamw":
            m1, m2, steps = rest
            torch._fused_adamw_(ps, gs, m1, m2, [], steps, amsgrad=False, lr=lr, beta1=mem.momentum,
                                beta2=rule.denominator.beta2, weight_decay=weight_decay,
                                eps=rule.denominator.eps, maximize=rule.maximize,
                                grad_scale=None, found_inf=None)
        elif kind == "nadamw":
            _nadamw(rule, ps, gs, *rest, lr=lr, weight_decay=weight_decay)
        else:
            # S_0 = 0: without torch's undamped first write the first write is the ordinary one.
            torch._fused_sgd_(ps, gs, rest[0] if rest else [], weight_decay=weight_decay,
                              momentum=mem.momentum, lr=lr, dampening=1.0 - mem.inner_lr,
                              nesterov=mem.nesterov, maximize=rule.maximize,
                              is_first_step=mem.undamped_first_write and first[idx[0]],
                              grad_scale=None, found_inf=None)


def is_variant(kind: Kind, rule: UpdateRule, weight_decay: float) -> bool:
    """Whether torch has no kernel for this step: AdamW's Nesterov read, SGD's decoupled decay,
    or torch's undamped first write (which needs the step counts)."""
    mem = rule.memory
    return kind == "nadamw" or (kind == "sgd" and (mem.undamped_first_write or
                                                   (rule.decoupled_weight_decay and weight_decay != 0.0)))


def _step_native(native, kind: Kind, rule: UpdateRule, params, grads, states, *, lr: float,
                 weight_decay: float) -> bool:
    """The step through deepopt's kernel (``native``: :func:`_native.ops` on the CPU, one loop per
    tensor; :func:`_native.cuda_ops` on CUDA, one launch per dtype), step counts included; False,
    with nothing written, where the kernel does not take these tensors (it checks them all first)."""
    mem = rule.memory
    if kind == "nadamw":
        return native.nadamw_(params, grads, [st["memory"] for st in states],
                              [st["second_moment"] for st in states], [st["step"] for st in states], lr,
                              mem.momentum, rule.denominator.beta2, rule.denominator.eps, weight_decay,
                              rule.maximize)
    return native.sgd_(params, grads, [] if mem.stateless else [st["memory"] for st in states],
                       [st["step"] for st in states] if mem.undamped_first_write else [], lr, weight_decay,
                       rule.decoupled_weight_decay, mem.momentum, 1.0 - mem.inner_lr, mem.nesterov,
                       rule.maximize)


def _nadamw(rule: UpdateRule, ps, gs, m1, m2, steps, ts, *, lr: float, weight_decay: float) -> None:
    """AdamW with the NAdam read (docs/math.md §2), ``W ← W(1 − γλ) − γ D̃/(√v̂ + ε)``, through
    torch's AdamW kernel and one ``lerp`` pass, per step count t.

    ``D̃ = c₁ S_t + c₂ G`` with ``S_t = β₁ S + (1 − β₁) G``, ``c₁ = β₁/(1 − β₁ᵗ⁺¹)``,
    ``c₂ = (1 − β₁)/(1 − β₁ᵗ)``, is ``a S + b G`` in the previous memory S: ``a = c₁β₁``,
    ``b = c₁(1 − β₁) + c₂``. The kernel, given ``β₁' = a/(a + b)``, writes
    ``S' = β₁' S + (1 − β₁') G = D̃/(a + b)`` and v, and takes the step with lr
    ``γ(a + b)(1 − β₁'ᵗ)`` (its own ``lr/(1 − β₁'ᵗ)`` is then ``γ(a + b)``) and weight decay
    ``λγ/lr`` (its ``lr·λ`` is then ``γλ``). The memory is then put right:
    ``S_t = (β₁/β₁') S' + (1 − β₁/β₁') G``, one ``lerp``. 10 words per element where the
    foreach twin moves 23 and makes three temporaries; the memory carries one more rounding."""
    b1, b2, eps = rule.memory.momentum, rule.denominator.beta2, rule.denominator.eps
    by_t: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(ts):                                    # t after this step's increment
        by_t[t].append(i)
    for t, idx in by_t.items():
        sel = (lambda xs: xs) if len(by_t) == 1 else (lambda xs, idx=idx: [xs[i] for i in idx])
        c1, c2 = b1 / (1 - b1 ** (t + 1)), (1 - b1) / (1 - b1**t)
        a, b = c1 * b1, c1 * (1 - b1) + c2
        b1_kernel = a / (a + b)
        lr_kernel = lr * (a + b) * (1 - b1_kernel**t)           # 0 only when γ = 0 (β₁' < 1)
        wd = lr * weight_decay / lr_kernel if lr_kernel else 0.0   # γ = 0: no decay either
        ms = sel(m1)
        torch._fused_adamw_(sel(ps), sel(gs), ms, sel(m2), [], sel(steps), amsgrad=False, lr=lr_kernel,
                            beta1=b1_kernel, beta2=b2, weight_decay=wd, eps=eps, maximize=rule.maximize,
                            grad_scale=None, found_inf=None)
        if b1 == 0.0:                                           # β₁' = 0: S' = G = S_t already
            continue
        w = 1 - b1 / b1_kernel                                  # S_t = (1 − w) S' + w G
        if rule.maximize:                                       # the kernel wrote −G into S'
            torch._foreach_mul_(ms, 1 - w)
            torch._foreach_add_(ms, sel(gs), alpha=-w)
        else:
            torch._foreach_lerp_(ms, sel(gs), w)


__all__ = ["PLAIN", "classic_kind", "fused_groups", "is_variant", "step_classic", "step_fused"]
