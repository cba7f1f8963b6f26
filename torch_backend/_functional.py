"""Functional steps of every deepopt rule (docs/math.md §0–§6) on lists of tensors.

``step_single`` is the readable per-tensor loop; ``step_batched`` is its twin: element-wise
phases use ``torch._foreach_*`` and matrix phases (delta write, DMGD's memory, Newton–Schulz)
stack same-shape matrices into one batched matmul. ``tests/test_torch_backend.py`` keeps the
twins equal. Both mutate ``params`` and ``states`` in place.

Phases, in order: gradient (maximize, coupled decay) → values (docs/math.md §3) → memory write and
read-out (linear §2, deep §5, multi-scale §6) → read-out map σ (§4) → denominator → outer step
(§0) → M3's slow write.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import torch
import torch.nn.functional as F

from deepopt import (
    AdamValues,
    DeepMemory,
    Identity,
    LinearMemory,
    MultiScaleMemory,
    NewtonSchulz,
    Sign,
    UpdateRule,
    matrix_view_shape,
    shape_scale_factor,
)
from torch_backend import _distributed
from torch_backend._fused import classic_kind, fused_groups, step_fused
from torch_backend._newton_schulz import newton_schulz

Tensors = list[torch.Tensor]
_NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_HALF = (torch.bfloat16, torch.float16)


# -- the step count t: Python ints eagerly, tensors under torch.compile ------------------------
# Eagerly, t is read once per step (``.item()``) and every scalar that depends on it (bias
# corrections, torch's first write, M3's period) is host math, exact in float64. Under
# ``torch.compile`` those scalars are computed from the step tensors themselves, in float64, so
# the step traces into one graph with no ``.item()`` (no graph break, no host sync), as
# torch.optim's ``capturable`` optimizers do.


def _counts(steps: Tensors) -> list:
    """Each parameter's ``t`` after this step's increment (see above)."""
    if torch.compiler.is_compiling():
        return [s.to(torch.float64) for s in steps]
    return [int(s.item()) for s in steps]


def _sqrt(x):
    return math.sqrt(x) if isinstance(x, float) else x.sqrt()


def _first_write_rate(t, eta: float):
    """torch SGD's first write: η = 1 at t = 1, else η."""
    if isinstance(t, torch.Tensor):
        return torch.where(t == 1, torch.ones_like(t), torch.full_like(t, eta))   # float64, as t
    return 1.0 if t == 1 else eta


def _add_scaled(dst: torch.Tensor, x: torch.Tensor, rate) -> torch.Tensor:
    """``dst += rate·x``; a t-dependent rate (a tensor under compile) cannot be an ``alpha=``."""
    return dst.add_(x * rate) if isinstance(rate, torch.Tensor) else dst.add_(x, alpha=rate)


def _is_due(t, period: int):
    """Whether M3's slow level is written at step ``t`` (a bool tensor under compile)."""
    return t % period == 0


def _scale(rule: UpdateRule, shape: torch.Size) -> float:
    return shape_scale_factor(rule.shape_scale, *matrix_view_shape(shape)) if len(shape) >= 2 else 1.0


def _shapes(params: Tensors, layouts: list | None) -> list[torch.Size]:
    """Each parameter's global shape (a local shard's layout knows its parameter's)."""
    if layouts is None:
        return [p.shape for p in params]
    return [p.shape if lay is None else lay.shape for p, lay in zip(params, layouts)]


def _linear(rule: UpdateRule) -> LinearMemory:
    """The linear memory a rule writes every step (M3's fast level)."""
    return rule.memory.fast if isinstance(rule.memory, MultiScaleMemory) else rule.memory


def uses_step_count(rule: UpdateRule) -> bool:
    """Whether ``t`` enters the rule's math (bias corrections, torch's first write, M3's period).

    Only such rules keep a ``state["step"]`` (as torch's SGD and Muon keep none): counting costs
    a dispatcher call per parameter per step, ~7% of an SGD step on CPU.
    """
    mem = rule.memory
    linear = None if isinstance(mem, DeepMemory) else _linear(rule)
    return (isinstance(rule.values, AdamValues) or isinstance(mem, MultiScaleMemory)
            or (rule.denominator is not None and rule.denominator.bias_correction)
            or (linear is not None and (linear.bias_correction or linear.undamped_first_write)))


def _folds_bias_correction(rule: UpdateRule) -> bool:
    """Whether the memory's bias correction ``1/(1 − αᵗ)`` can move into the step size (exact
    when σ is the identity), as torch's AdamW folds it into ``lr / (1 − β₁ᵗ)``."""
    if isinstance(rule.memory, (MultiScaleMemory, DeepMemory)):
        return False
    mem = rule.memory
    return mem.bias_correction and not mem.nesterov and isinstance(rule.readout, Identity)


def _is_ema(mem: LinearMemory) -> bool:
    """η = 1 − α: write and Nesterov read are lerps, as torch's AdamW and Muon compute them."""
    return mem.inner_lr == 1.0 - mem.momentum and not mem.undamped_first_write


# --------------------------------------------------------------------------------------------
# Matrix kernels on stacks (B, m, n): shared by both twins
# --------------------------------------------------------------------------------------------


def delta_term(s: torch.Tensor, g: torch.Tensor, key_eps: float) -> torch.Tensor:
    """``S KᵀK`` with ``K = G / max(‖G‖_F, ε)``, multiplied on the smaller side (docs/math.md §2)."""
    k = g / g.norm(dim=(-2, -1), keepdim=True).clamp(min=key_eps)
    if s.size(-2) <= s.size(-1):
        return torch.bmm(torch.bmm(s, k.mT), k)              # (S Kᵀ) K : (B,m,m)·(B,m,n)
    return torch.bmm(s, torch.bmm(k.mT, k))                  # S (KᵀK) : (B,m,n)·(B,n,n)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def deep_memory_kernel(mem: DeepMemory, s: torch.Tensor, w1: torch.Tensor | None,
                       w2: torch.Tensor | None, nu: torch.Tensor | None, g: torch.Tensor,
                       v: torch.Tensor, prev_key: torch.Tensor | None):
    """DMGD's scale-stable write and read (docs/math.md §5) on stacks.

    s, g, v, prev_key: (B, m, n); w1: (B, h, n); w2: (B, n, h); nu: (B, 1, 1), the value
    scale ν. Returns ``(S, W₁, W₂, ν, D̃, Ĝ)``, all new tensors.
    """
    m = s.size(-2)
    alpha, eta = mem.momentum, mem.inner_lr
    g_hat = g / g.norm(dim=-1, keepdim=True).clamp(min=mem.key_eps)   # Ĝ: rows normalised
    k = g_hat if mem.keys == "current" else prev_key
    if mem.hidden:
        # ν = max(β ν, ‖V‖_F/√m, ε); the MLP's read at φ_{t−1} in units of ν.
        rms = v.norm(dim=(-2, -1), keepdim=True) / math.sqrt(m)
        nu = torch.maximum(nu * mem.scale_decay, rms).clamp_(min=mem.key_eps)
        z = torch.bmm(k, w1.mT)                              # Z = K W₁ᵀ : (B,m,h)
        h = F.silu(z)
        f = torch.bmm(h, w2.mT).mul_(nu)                     # F = ν H W₂ᵀ : (B,m,n)
    # E = ∂ℓ/∂M(k_r) row by row: dot −ηV, l2 η(S + F − V).
    # (In-place where a temporary would be full-size; the operation order, and so the rounding,
    # is the reference's.)
    if mem.objective == "dot":
        e = v * -eta
    else:
        e = (torch.add(s, f) if mem.hidden else s.clone()).sub_(v).mul_(eta)
    s = torch.mul(s, alpha).sub_(e)                          # S ← αS − ∇_S
    if mem.hidden:
        # θ: row mean of the gradient in units of ν, rates η/(1 + ηλ̄) per weight.
        e_hat = e.div_(nu)
        rate_w2 = 1 / (1 + (eta / m) * h.square().sum(dim=(-2, -1), keepdim=True))         # (B,1,1)
        rate_w1 = 1 / (1 + eta * mem.SILU_SLOPE_SQ * w2.square().sum(dim=(-2, -1), keepdim=True))
        grad_w2 = torch.bmm(e_hat.mT, h).mul_(rate_w2 / m)   # Êᵀ H / m              : (B,n,h)
        grad_w1 = torch.bmm((torch.bmm(e_hat, w2) * _silu_grad(z)).mT, k).mul_(rate_w1 / m)  # (B,h,n)
        w1 = w1 - grad_w1                                    # no retention on W₁
        w2 = alpha * w2 - grad_w2
        d = torch.bmm(F.silu(torch.bmm(g_hat, w1.mT)), w2.mT).mul_(nu).add_(s)   # D = S + ν σ(Q W₁ᵀ) W₂ᵀ
    else:
        d = s
    if mem.nesterov:
        d = torch.mul(d, alpha).add_(v * eta)
    return s, w1, w2, nu, d, g_hat


def _deep_state_stacks(mem: DeepMemory, sts: list[dict], shape: tuple[int, int]):
    m, n = shape
    s = torch.stack([st["memory"].reshape(m, n) for st in sts])
    w1 = torch.stack([st["mlp_w1"] for st in sts]) if mem.hidden else None
    w2 = torch.stack([st["mlp_w2"] for st in sts]) if mem.hidden else None
    nu = torch.stack([st["value_scale"] for st in sts]).view(-1, 1, 1) if mem.hidden else None
    prev = torch.stack([st["prev_key"].reshape(m, n) for st in sts]) if mem.keys == "previous" else None
    return s, w1, w2, nu, prev


def _deep_state_writeback(mem: DeepMemory, sts: list[dict], s, w1, w2, nu, g_hat) -> None:
    for j, st in enumerate(sts):
        st["memory"].copy_(s[j].view_as(st["memory"]))
        if mem.hidden:
            st["mlp_w1"].copy_(w1[j])
            st["mlp_w2"].copy_(w2[j])
            st["value_scale"].copy_(nu[j].view(()))
        if mem.keys == "previous":
            st["prev_key"].copy_(g_hat[j].view_as(st["prev_key"]))


# --------------------------------------------------------------------------------------------
# Single-tensor loop: the readable version
# --------------------------------------------------------------------------------------------


def step_single(rule: UpdateRule, params: Tensors, grads: Tensors, states: list[dict], *,
                lr: float, weight_decay: float, layouts: list | None = None) -> None:
    """``layouts``: with local shards of distributed parameters, each one's
    :class:`~torch_backend._distributed.Layout` (whole-matrix phases then communicate)."""
    counted = uses_step_count(rule)
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        lay = layouts[i] if layouts is not None else None
        t, divisor, denom = None, 1.0, None
        if counted:
            st["step"] += 1
            t = _counts([st["step"]])[0]
        if rule.maximize:
            g = -g
        if not rule.decoupled_weight_decay and weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)                 # coupled L2, as torch SGD

        # Values V = P(G) (docs/math.md §3).
        v = g
        if isinstance(rule.values, AdamValues):
            b2 = rule.values.beta2
            nu = st["values_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            v = g / nu.div(1 - b2**t).sqrt_().add_(rule.values.eps)

        # Memory write and read-out D̃.
        read = False                                         # σ already applied with the memory
        if isinstance(rule.memory, DeepMemory) and lay is not None and lay.sharded:
            sigma = _owner_readout(rule)
            d = _deep_memory_batched(rule.memory, [st], [g], [v], [lay], sigma=sigma)[0]
            read = sigma is not None
        elif isinstance(rule.memory, DeepMemory):
            mem = rule.memory
            shape = matrix_view_shape(p.shape)
            s, w1, w2, nu, prev = _deep_state_stacks(mem, [st], shape)
            s, w1, w2, nu, d, g_hat = deep_memory_kernel(mem, s, w1, w2, nu, g.reshape(1, *shape),
                                                         v.reshape(1, *shape), prev)
            _deep_state_writeback(mem, [st], s, w1, w2, nu, g_hat)
            d = d[0].view_as(p)
        else:
            mem = _linear(rule)
            if _folds_bias_correction(rule):                 # as the batched twin does
                mem, divisor = replace(mem, bias_correction=False), 1 - mem.momentum**t
            d = _linear_memory_single(mem, st, p, g, v, t, lay)

        # Read-out map σ (docs/math.md §4), M3's slow term, denominator.
        out = d if read else _readout_single(rule, d, lay)
        if isinstance(rule.memory, MultiScaleMemory):
            out = out + rule.memory.slow_weight * st["slow_readout"]
        if rule.denominator is not None:
            den = rule.denominator
            nu = st["second_moment"]
            if den.accumulate:
                nu.addcmul_(g, g, value=den.beta2)           # NL Alg. 1: V ← V + β₂G²
            else:
                nu.mul_(den.beta2).addcmul_(g, g, value=1 - den.beta2)
            denom = nu.sqrt()
            if den.bias_correction:
                denom.div_(_sqrt(1 - den.beta2**t))
            denom.add_(den.eps)

        # Outer step W ← W − γλW − γ s(W) O / denom (docs/math.md §0); one rounding in half precision.
        if rule.decoupled_weight_decay and weight_decay != 0.0:
            p.mul_(1 - lr * weight_decay)
        size = lr * _scale(rule, p.shape if lay is None else lay.shape) / divisor
        if isinstance(size, torch.Tensor):                   # t-dependent under torch.compile
            out = out * -size
            size = -1.0
        if denom is not None:
            p.addcdiv_(out, denom, value=-size)
        else:
            p.add_(out, alpha=-size)

        if isinstance(rule.memory, MultiScaleMemory):
            _slow_write_single(rule, st, v, t, lay)


def _linear_memory_single(mem: LinearMemory, st: dict, p: torch.Tensor, g: torch.Tensor,
                          v: torch.Tensor, t: int, lay=None) -> torch.Tensor:
    """Write ``S_t = S_{t−1}(αI − ζKᵀK) + ηV`` (docs/math.md §2) and return the read-out D̃."""
    alpha = mem.momentum
    eta = _first_write_rate(t, mem.inner_lr) if mem.undamped_first_write else mem.inner_lr
    if mem.stateless:
        s = v if isinstance(eta, float) and eta == 1.0 else v * eta
    else:
        s = st["memory"]
        if mem.zeta != 0.0 and p.ndim >= 2:                  # 1-D: the recurrence with ζ = 0
            if lay is not None and lay.sharded:              # whole matrices on their owner
                delta = _distributed.map_whole(lay, lambda s, g: delta_term(s, g, mem.key_eps),
                                               [s[None], g[None]])[0]
            else:
                m, n = matrix_view_shape(p.shape)
                delta = delta_term(s.reshape(1, m, n), g.reshape(1, m, n), mem.key_eps).view_as(s)
            _add_scaled(s.mul_(alpha).add_(delta, alpha=-mem.zeta), v, eta)
        elif _is_ema(mem):
            s.lerp_(v, 1 - alpha)
        else:
            _add_scaled(s.mul_(alpha), v, eta)
    if mem.nesterov:
        if mem.bias_correction:                              # NAdam form, as optax
            return s * (alpha / (1 - alpha ** (t + 1))) + v * (eta / (1 - alpha**t))
        if _is_ema(mem):
            return v.lerp(s, alpha)                          # torch Muon: grad.lerp(buf, μ)
        return v.add(s, alpha=alpha) if isinstance(eta, float) and eta == 1.0 else s * alpha + v * eta
    return s / (1 - alpha**t) if mem.bias_correction else s


def _readout_single(rule: UpdateRule, d: torch.Tensor, lay=None) -> torch.Tensor:
    if isinstance(rule.readout, NewtonSchulz) and lay is not None:   # whole matrix on its owner
        return _distributed.map_whole(lay, lambda x: newton_schulz(x, rule.readout), [d[None]])[0]
    if isinstance(rule.readout, NewtonSchulz):
        m, n = matrix_view_shape(d.shape)
        return newton_schulz(d.reshape(1, m, n), rule.readout).view_as(d)
    if isinstance(rule.readout, Sign):
        return torch.sign(d)
    return d


def _slow_write_single(rule: UpdateRule, st: dict, v: torch.Tensor, t: int, lay=None) -> None:
    """M3: accumulate V; every ``period`` steps write M² and refresh O² = σ(M²) (docs/math.md §6)."""
    mem = rule.memory
    st["slow_accumulator"].add_(v)
    if isinstance(t, torch.Tensor):                          # under torch.compile: masked, no branch
        _slow_write_masked(rule, [st], [_is_due(t, mem.period)], lay and [lay])
        return
    if _is_due(t, mem.period):
        st["slow_memory"].mul_(mem.slow_momentum).add_(st["slow_accumulator"], alpha=mem.slow_inner_lr)
        st["slow_readout"].copy_(_readout_single(rule, st["slow_memory"], lay))
        st["slow_accumulator"].zero_()


# --------------------------------------------------------------------------------------------
# Batched twin: foreach element-wise phases, one batched matmul per matrix shape
# --------------------------------------------------------------------------------------------


def _buckets(tensors: Tensors, layouts: list | None = None) -> dict[tuple, list[int]]:
    """Indices of tensors that share a matrix view, dtype, device and distributed layout
    (``(m, n, dtype, device, layout)``; the layout is None for plain tensors)."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, x in enumerate(tensors):
        lay = layouts[i] if layouts is not None else None
        shape = x.shape if lay is None else lay.shape
        out[(*matrix_view_shape(shape), x.dtype, x.device, lay)].append(i)
    return out


def _stack(xs: Tensors, idx: list[int], m: int, n: int, dtype: torch.dtype | None) -> torch.Tensor:
    """``(B, m, n)`` stack of matrix views, cast while copying (one pass) when ``dtype`` is set."""
    if dtype is None or dtype == xs[idx[0]].dtype:
        return torch.stack([xs[i].reshape(m, n) for i in idx])
    out = torch.empty((len(idx), m, n), dtype=dtype, device=xs[idx[0]].device)
    for j, i in enumerate(idx):
        out[j].copy_(xs[i].reshape(m, n))
    return out


def _batched_matrix_map(fn, *lists: Tensors, dtype: torch.dtype | None = None,
                        layouts: list | None = None) -> Tensors:
    """Apply ``fn`` to stacks ``(B, m, n)`` of same-shape matrix views; return per-tensor views.

    Local shards of distributed parameters (``layouts``) are stacked as they are — cast to
    ``dtype`` before any communication — and ``fn`` runs on whole matrices on their owners.
    """
    result: Tensors = [None] * len(lists[0])  # type: ignore[list-item]
    for (m, n, _, _, lay), idx in _buckets(lists[0], layouts).items():
        if lay is not None:
            stacks = [torch.stack([xs[i] for i in idx]).to(dtype or xs[idx[0]].dtype) for xs in lists]
            y = _distributed.map_whole(lay, fn, stacks)                  # (B, *local shape)
        else:
            y = fn(*(_stack(xs, idx, m, n, dtype) for xs in lists))
        for j, i in enumerate(idx):
            result[i] = y[j].view_as(lists[0][i])
    return result


def step_batched(rule: UpdateRule, params: Tensors, grads: Tensors, states: list[dict], *,
                 lr: float, weight_decay: float, layouts: list | None = None,
                 fused: bool | None = None) -> None:
    kind = classic_kind(rule)
    groups = fused_groups(params, grads, fused) if kind is not None else None
    if groups is not None:                                      # torch's own AdamW / SGD kernel
        step_fused(kind, rule, params, grads, states, groups, lr=lr, weight_decay=weight_decay)
        return
    ts = None
    if uses_step_count(rule):
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        ts = _counts(steps)

    gs = grads
    if rule.maximize:
        gs = torch._foreach_neg(gs)
    if not rule.decoupled_weight_decay and weight_decay != 0.0:
        gs = torch._foreach_add(gs, params, alpha=weight_decay)

    # Values (docs/math.md §3).
    vs = gs
    if isinstance(rule.values, AdamValues):
        b2 = rule.values.beta2
        nus = [st["values_sq"] for st in states]
        _scalar_op("mul", nus, b2, inplace=True)
        torch._foreach_addcmul_(nus, gs, gs, value=1 - b2)
        denom = _scalar_op("div", nus, [1 - b2**t for t in ts])
        torch._foreach_sqrt_(denom)
        _scalar_op("add", denom, rule.values.eps, inplace=True)
        vs = torch._foreach_div(gs, denom)

    # Memory write and read-out D̃. ``divisors``: a bias correction left for the final step
    # size (exact when σ is the identity), as torch's AdamW folds it into ``lr / (1 − β₁ᵗ)``.
    divisors = None
    read: set[int] = set()                                    # σ already applied with the memory
    if isinstance(rule.memory, DeepMemory):
        ds = _deep_memory_batched(rule.memory, states, gs, vs, layouts, sigma=_owner_readout(rule), read=read)
    else:
        mem = _linear(rule)
        if _folds_bias_correction(rule):
            ds = _linear_memory_batched(replace(mem, bias_correction=False), states, gs, vs, ts, layouts)
            divisors = [1 - mem.momentum**t for t in ts]
        else:
            ds = _linear_memory_batched(mem, states, gs, vs, ts, layouts)

    # Read-out map σ, M3's slow term, denominator.
    outs = _readout_batched(rule, ds, layouts, skip=read)
    if isinstance(rule.memory, MultiScaleMemory):
        outs = torch._foreach_add(outs, [st["slow_readout"] for st in states], alpha=rule.memory.slow_weight)
    denom = None
    if rule.denominator is not None:
        den = rule.denominator
        nus = [st["second_moment"] for st in states]
        if den.accumulate:
            torch._foreach_addcmul_(nus, gs, gs, value=den.beta2)
        else:
            _scalar_op("mul", nus, den.beta2, inplace=True)
            torch._foreach_addcmul_(nus, gs, gs, value=1 - den.beta2)
        denom = torch._foreach_sqrt(nus)
        if den.bias_correction:
            _scalar_op("div", denom, [_sqrt(1 - den.beta2**t) for t in ts], inplace=True)
        _scalar_op("add", denom, den.eps, inplace=True)

    # Outer step W ← W − γλW − γ s(W) O, the step size carrying s(W) and any folded correction.
    if rule.decoupled_weight_decay and weight_decay != 0.0:
        _decay(params, lr * weight_decay)
    sizes = ([lr * _scale(rule, shape) for shape in _shapes(params, layouts)] if rule.shape_scale != "none"
             else [lr] * len(params))
    if divisors is not None:
        sizes = [s / d for s, d in zip(sizes, divisors)]
    by_size: dict[float, list[int]] = defaultdict(list)       # one foreach call per step size
    for i, size in enumerate(sizes):
        by_size[size].append(i)
    for size, idx in by_size.items():
        ps, os_ = [params[i] for i in idx], [outs[i] for i in idx]
        if isinstance(size, torch.Tensor):                   # t-dependent under torch.compile
            os_ = torch._foreach_mul(os_, -size)
            size = -1.0
        if denom is not None:
            torch._foreach_addcdiv_(ps, os_, [denom[i] for i in idx], value=-size)
        else:
            torch._foreach_add_(ps, os_, alpha=-size)

    if isinstance(rule.memory, MultiScaleMemory):
        _slow_write_batched(rule, states, vs, ts, layouts)


def _decay(params: Tensors, rate: float) -> None:
    """``W ← W (1 − rate)``, as ``Tensor.mul_`` rounds it in every dtype (see :func:`_scalar_op`)."""
    _scalar_op("mul", params, 1 - rate, inplace=True)


def _scalar_op(op: str, xs: Tensors, value: float | list[float], *, inplace: bool = False) -> Tensors:
    """``torch._foreach_{op}`` of ``xs`` by a Python scalar or one scalar per tensor.

    For half dtypes foreach ops round a Python scalar (and a scalar list) to the tensors' dtype
    before using it (bf16: 1 − 0.002 → 0.99609, twice the decay; fp16: 0.9 → 0.89990),
    while ``Tensor.mul_`` and the other single-tensor ops keep it in float32. A float32 0-d
    tensor keeps it in float32 here too, so both twins round once, identically.
    """
    fn = getattr(torch, f"_foreach_{op}_" if inplace else f"_foreach_{op}")
    if not any(x.dtype in _HALF for x in xs):
        return fn(xs, value)
    values = value if isinstance(value, list) else [value] * len(xs)
    if any(isinstance(v, torch.Tensor) for v in values):   # t-dependent under torch.compile
        return fn(xs, [torch.as_tensor(v, dtype=torch.float32, device=x.device) for v, x in zip(values, xs)])
    out: Tensors = list(xs)
    by_value: dict[float, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        by_value[float(v)].append(i)
    for v, idx in by_value.items():
        scalar = torch.tensor(v, dtype=torch.float32, device=xs[idx[0]].device)
        result = fn([xs[i] for i in idx], scalar)
        if not inplace:
            for i, r in zip(idx, result):
                out[i] = r
    return xs if inplace else out


def _linear_memory_batched(mem: LinearMemory, states: list[dict], gs: Tensors, vs: Tensors,
                           ts: list[int] | None, layouts: list | None = None) -> Tensors:
    alpha, eta = mem.momentum, mem.inner_lr
    # η per tensor only under torch's first-write quirk; otherwise one scalar (no temporaries).
    etas = [_first_write_rate(t, eta) for t in ts] if mem.undamped_first_write else None

    def add_values(dst: Tensors) -> None:                    # dst += η V
        if etas is None:
            torch._foreach_add_(dst, vs, alpha=eta)
        else:
            torch._foreach_add_(dst, _scalar_op("mul", vs, etas))

    if mem.stateless:
        ss = vs if etas is None and eta == 1.0 else _scalar_op("mul", vs, etas or eta)
    else:
        ss = [st["memory"] for st in states]
        if mem.zeta != 0.0:
            # The delta term S KᵀK on matrix views; 1-D parameters take the ζ = 0 recurrence.
            mats = [i for i, s in enumerate(ss) if s.ndim >= 2]
            deltas = _batched_matrix_map(lambda s, g: delta_term(s, g, mem.key_eps),
                                         [ss[i] for i in mats], [gs[i] for i in mats],
                                         layouts=None if layouts is None else
                                         _distributed.sharded_only([layouts[i] for i in mats])) if mats else []
            _scalar_op("mul", ss, alpha, inplace=True)
            if mats:
                torch._foreach_add_([ss[i] for i in mats], deltas, alpha=-mem.zeta)
            add_values(ss)
        elif _is_ema(mem):
            torch._foreach_lerp_(ss, vs, 1 - alpha)
        else:
            _scalar_op("mul", ss, alpha, inplace=True)
            add_values(ss)
    if mem.nesterov:
        if mem.bias_correction:
            ds = _scalar_op("mul", ss, [alpha / (1 - alpha ** (t + 1)) for t in ts])
            torch._foreach_add_(ds, _scalar_op("mul", vs, [(etas[i] if etas else eta) / (1 - alpha**t)
                                                            for i, t in enumerate(ts)]))
            return ds
        if _is_ema(mem):
            return torch._foreach_lerp(vs, ss, alpha)
        if etas is None and eta == 1.0:
            return torch._foreach_add(vs, ss, alpha=alpha)   # torch SGD: g + μ·buf
        ds = _scalar_op("mul", ss, alpha)
        add_values(ds)
        return ds
    return _scalar_op("div", ss, [1 - alpha**t for t in ts]) if mem.bias_correction else ss


def _deep_memory_batched(mem: DeepMemory, states: list[dict], gs: Tensors, vs: Tensors,
                         layouts: list | None = None, sigma=None, read: set[int] | None = None) -> Tensors:
    """``sigma``: a whole-matrix read-out map that distributed buckets apply on the owner,
    where D̃ is whole already (their indices are added to ``read``)."""
    ds: Tensors = [None] * len(gs)  # type: ignore[list-item]
    for (m, n, _, _, lay), idx in _buckets(gs, _distributed.sharded_only(layouts)).items():
        sts = [states[i] for i in idx]
        if lay is not None:
            d = _deep_memory_whole(mem, lay, sts, [gs[i] for i in idx], [vs[i] for i in idx], sigma)
            if sigma is not None and read is not None:
                read.update(idx)
        else:
            s, w1, w2, nu, prev = _deep_state_stacks(mem, sts, (m, n))
            g = torch.stack([gs[i].reshape(m, n) for i in idx])
            v = torch.stack([vs[i].reshape(m, n) for i in idx])
            s, w1, w2, nu, d, g_hat = deep_memory_kernel(mem, s, w1, w2, nu, g, v, prev)
            _deep_state_writeback(mem, sts, s, w1, w2, nu, g_hat)
        for j, i in enumerate(idx):
            ds[i] = d[j].view_as(gs[i])
    return ds


def _deep_memory_whole(mem: DeepMemory, lay, sts: list[dict], gs: Tensors, vs: Tensors,
                       sigma=None) -> torch.Tensor:
    """DMGD on a bucket of local shards: the kernel runs on whole matrices, each on its owner
    (θ's gradients and ν read every row); rows go back to their shards, and θ, ν to every rank.
    Three collectives per bucket. Returns the read-outs ``(B, *local shape)``, through ``sigma``
    (the read-out map, e.g. Newton–Schulz) when given: the owner holds the whole D̃ already,
    so σ costs no collective of its own."""
    m, n = matrix_view_shape(tuple(lay.shape))
    rows = [[st["memory"] for st in sts], gs, vs]
    if mem.keys == "previous":
        rows.append([st["prev_key"] for st in sts])
    whole, b = _distributed.gather_whole(lay, [torch.stack(x) for x in rows])      # (b', k, *shape)
    s, g, v, *prev = (whole[:, j].reshape(-1, m, n) for j in range(len(rows)))
    w1 = w2 = nu = None
    if mem.hidden:                                           # θ, ν: every rank's copy → owner's share
        w1 = _distributed.share_of(lay, torch.stack([st["mlp_w1"] for st in sts]))
        w2 = _distributed.share_of(lay, torch.stack([st["mlp_w2"] for st in sts]))
        nu = _distributed.share_of(lay, torch.stack([st["value_scale"] for st in sts])).view(-1, 1, 1)
    s, w1, w2, nu, d, g_hat = deep_memory_kernel(mem, s, w1, w2, nu, g, v, prev[0] if prev else None)
    if sigma is not None:
        d = sigma(d).to(d.dtype)
    outs = [s, d, g_hat] if prev else [s, d]
    back = _distributed.scatter_whole(lay, [x[:b].reshape(b, *lay.shape) for x in outs], len(sts))
    if mem.hidden:                                           # one all-gather for W₁, W₂ and ν
        h = mem.hidden
        theta = torch.cat([w1.flatten(1), w2.flatten(1), nu.flatten(1)], dim=1)[:b]
        theta = _distributed.share_all(lay, theta, len(sts))
        w1, w2, nu = theta.split([h * n, n * h, 1], dim=1)
        w1, w2 = w1.reshape(-1, h, n), w2.reshape(-1, n, h)
    _deep_state_writeback(mem, sts, back[:, 0], w1, w2, nu, back[:, 2] if prev else None)
    return back[:, 1]


def _owner_readout(rule: UpdateRule):
    """σ as a function of whole ``(B, m, n)`` stacks, for phases that hold whole matrices
    anyway (DMGD's memory on distributed parameters); None when σ is element-wise."""
    if isinstance(rule.readout, NewtonSchulz):
        return lambda x: newton_schulz(x, rule.readout)
    return None


def _readout_batched(rule: UpdateRule, ds: Tensors, layouts: list | None = None,
                     skip: set[int] = frozenset()) -> Tensors:
    """σ on each read-out, except the indices in ``skip`` (σ already applied)."""
    if skip:
        rest = [i for i in range(len(ds)) if i not in skip]
        mapped = _readout_batched(rule, [ds[i] for i in rest], None if layouts is None else [layouts[i] for i in rest])
        outs = list(ds)
        for j, i in enumerate(rest):
            outs[i] = mapped[j]
        return outs
    if isinstance(rule.readout, NewtonSchulz):
        return _batched_matrix_map(lambda x: newton_schulz(x, rule.readout), ds,
                                   dtype=_NS_DTYPES.get(rule.readout.dtype), layouts=layouts)
    if isinstance(rule.readout, Sign):
        return torch._foreach_sign(ds)
    return ds


def _slow_write_masked(rule: UpdateRule, states: list[dict], due: Tensors, layouts: list | None = None) -> None:
    """M3's slow write under torch.compile (the accumulator already holds this step's V): the
    write and its Newton–Schulz are computed every step and kept where ``due`` (a bool tensor per
    parameter), because a branch on ``t`` would break the graph. Same values as the branch."""
    mem = rule.memory
    acc = [st["slow_accumulator"] for st in states]
    written = torch._foreach_add(_scalar_op("mul", [st["slow_memory"] for st in states], mem.slow_momentum),
                                 acc, alpha=mem.slow_inner_lr)
    read = _readout_batched(rule, written, layouts)
    for st, d, w, r in zip(states, due, written, read):
        st["slow_memory"].copy_(torch.where(d, w, st["slow_memory"]))
        st["slow_readout"].copy_(torch.where(d, r, st["slow_readout"]))
        st["slow_accumulator"].copy_(torch.where(d, 0.0, st["slow_accumulator"]))


def _slow_write_batched(rule: UpdateRule, states: list[dict], vs: Tensors, ts: list[int],
                        layouts: list | None = None) -> None:
    mem = rule.memory
    torch._foreach_add_([st["slow_accumulator"] for st in states], vs)
    if ts and isinstance(ts[0], torch.Tensor):              # under torch.compile: masked, no branch
        _slow_write_masked(rule, states, [_is_due(t, mem.period) for t in ts], layouts)
        return
    due_idx = [i for i, t in enumerate(ts) if _is_due(t, mem.period)]
    if not due_idx:
        return
    due = [states[i] for i in due_idx]
    slow = [st["slow_memory"] for st in due]
    acc = [st["slow_accumulator"] for st in due]
    _scalar_op("mul", slow, mem.slow_momentum, inplace=True)
    torch._foreach_add_(slow, acc, alpha=mem.slow_inner_lr)
    due_layouts = None if layouts is None else [layouts[i] for i in due_idx]
    torch._foreach_copy_([st["slow_readout"] for st in due], _readout_batched(rule, slow, due_layouts))
    torch._foreach_zero_(acc)
