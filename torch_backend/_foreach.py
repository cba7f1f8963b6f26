"""Shared building blocks of the torch kernels: the step count, scalars in half precision,
and same-shape matrix stacks.

Every kernel module (``_values``/``_readout`` tables in ``_functional.py``, ``_linear_memory``,
``_deep_memory``, ``_multiscale``) builds on these; none of them dispatches on a part's type.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from deepopt import matrix_view_shape
from torch_backend import _distributed

Tensors = list[torch.Tensor]
HALF = (torch.bfloat16, torch.float16)


# -- the step count t: Python ints eagerly, tensors under torch.compile ------------------------
# Eagerly, t is read once per step (one ``tolist`` of the counts' stack, :func:`advance`), and
# every scalar that depends on it (bias corrections, torch's first write, M3's period) is host
# math, exact in float64. Under ``torch.compile`` those scalars are computed from the step
# tensors themselves, in float64, so the step traces into one graph with no ``.item()`` (no
# graph break, no host sync), as torch.optim's ``capturable`` optimizers do.


def counts(steps: Tensors, params: Tensors) -> list:
    """Each parameter's ``t`` after this step's increment (see above). Under compile, t is
    float64 on its parameter's device. A step count made in the step that compiles is still on
    the CPU (dynamo moves step counts to the parameters' device only when it next traces), and
    its scalars then reached CUDA kernels as host scalar arguments: on an H100 with torch 2.11
    inductor failed to launch those kernels ("CUDA driver error: invalid argument"), and
    launches with t on the device. A small function with a host float64 scalar argument
    launched there, so what exactly the launch tripped on is not established."""
    if torch.compiler.is_compiling():
        return [s.to(p.device, torch.float64) for s, p in zip(steps, params)]
    return [int(s.item()) for s in steps]


def advance(states: list[dict], params: Tensors, *, read: bool = True) -> tuple[Tensors, list | None]:
    """Add one to each state's step count; return the counts and, with ``read``, each ``t``
    after the increment (:func:`counts`).

    Eagerly, a step's counts live as the elements of one 1-D stack: each state's ``"step"`` is a
    0-d view of it, so one ``add_`` advances them all and one ``tolist`` reads them.
    ``torch._foreach_add_`` over 0-d CPU tensors runs one op per tensor: 134 µs for 52 counts
    on this project's CPU, against 3 µs for the stack's ``add_`` (``_fused_adamw_`` reads each
    count itself either way). The stack is made on a step whose counts are not one yet
    (the first step, or after ``load_state_dict``, a deepcopy, a parameter without a gradient),
    and the states' entries then become its elements (a reference to an entry kept from before
    that step no longer advances). Under ``torch.compile``, and where the counts differ in
    device or dtype, the counts stay as they are and ``torch._foreach_add_`` advances them.
    """
    steps = [st["step"] for st in states]
    base = None
    if not torch.compiler.is_compiling():
        base = stack_of(steps, ())
        if base is None and len({(x.device, x.dtype, x.dim()) for x in steps}) == 1 and steps[0].dim() == 0:
            base = torch.stack(steps)
            steps = list(base.unbind(0))
            for st, x in zip(states, steps):
                st["step"] = x
    if base is None:
        torch._foreach_add_(steps, 1)
        return steps, counts(steps, params) if read else None
    base.add_(1)
    return steps, [int(t) for t in base.tolist()] if read else None


def stack_of(xs: Tensors, row: tuple[int, ...]) -> torch.Tensor | None:
    """The stack ``(B, *row)`` whose rows, in order, the tensors ``xs`` are; None if they are not.
    A list of one is its own stack (a view with a batch dimension of one)."""
    x = xs[0]
    if len(xs) == 1:
        return x.view(1, *row) if x.is_contiguous() else None
    base = x._base
    if base is None or base.dtype != x.dtype or base.shape != (len(xs), *row) or not base.is_contiguous():
        return None
    step, offset = base.stride(0), base.storage_offset()
    for j, x in enumerate(xs):
        if x._base is not base or x.storage_offset() != offset + j * step or not x.is_contiguous():
            return None
    return base


def sqrt(x):
    return math.sqrt(x) if isinstance(x, float) else x.sqrt()


def first_write_rate(t, eta: float):
    """torch SGD's first write: η = 1 at t = 1, else η."""
    if isinstance(t, torch.Tensor):
        return torch.where(t == 1, torch.ones_like(t), torch.full_like(t, eta))   # float64, as t
    return 1.0 if t == 1 else eta


def add_scaled(dst: torch.Tensor, x: torch.Tensor, rate) -> torch.Tensor:
    """``dst += rate·x``; a t-dependent rate (a tensor under compile) cannot be an ``alpha=``."""
    return dst.add_(x * rate) if isinstance(rate, torch.Tensor) else dst.add_(x, alpha=rate)


def is_due(t, period: int):
    """Whether M3's slow level is written at step ``t`` (a bool tensor under compile)."""
    return t % period == 0


# -- scalars --------------------------------------------------------------------------------


def made(values: list, like: Tensors) -> list:
    """A compiled step's per-tensor scalars — t-dependent (0-d tensors, see :func:`counts`) or
    from a tensor lr; Python numbers may be mixed in — made at once into one float64 buffer,
    returned as its entries.

    Left as expressions, inductor inlines each scalar into the loop of every element that uses
    it, so a bias correction's power ran per element, in float64: a compiled AdamW-type step
    took ~3× torch's fused kernel on a CPU, and 0.95× with its scalars made first (52 tensors,
    one thread). A stack is a buffer of its own, which the loops then only read. Each value is
    made on the device of its tensor in ``like`` (a tensor lr may sit on the CPU, as a scheduler
    writes it), so no host scalar becomes a device kernel's argument (see :func:`counts`)."""
    if not any(isinstance(v, torch.Tensor) for v in values):   # Python numbers only: as they are
        return values
    devices = {x.device for x in like}
    if len(devices) != 1:                                     # parameters on several devices
        return [torch.as_tensor(v, dtype=torch.float64, device=x.device) for v, x in zip(values, like)]
    device = devices.pop()
    return list(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]).unbind(0))


def scalar_op(op: str, xs: Tensors, value: float | list[float], *, inplace: bool = False) -> Tensors:
    """``torch._foreach_{op}`` of ``xs`` by a Python scalar or one scalar per tensor.

    For half dtypes foreach ops round a Python scalar (and a scalar list) to the tensors' dtype
    before using it (bf16: 1 − 0.002 → 0.99609, twice the decay; fp16: 0.9 → 0.89990),
    while ``Tensor.mul_`` and the other single-tensor ops keep it in float32. A float32 0-d
    tensor keeps it in float32 here too, so both twins round once, identically. Under
    ``torch.compile`` t-dependent scalars are made once first (:func:`made`).
    """
    fn = getattr(torch, f"_foreach_{op}_" if inplace else f"_foreach_{op}")
    if isinstance(value, list) and torch.compiler.is_compiling():   # eagerly no scalar is a tensor
        value = made(value, xs)
    if not any(x.dtype in HALF for x in xs):
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


def decay(params: Tensors, rate: float) -> None:
    """``W ← W (1 − rate)``, as ``Tensor.mul_`` rounds it in every dtype (see :func:`_scalar_op`)."""
    scalar_op("mul", params, 1 - rate, inplace=True)


# -- same-shape matrix stacks ---------------------------------------------------------------


def buckets(tensors: Tensors, layouts: list | None = None) -> dict[tuple, list[int]]:
    """Indices of tensors that share a matrix view, dtype, device and distributed layout
    (``(m, n, dtype, device, layout)``; the layout is None for plain tensors)."""
    out: dict[tuple, list[int]] = defaultdict(list)
    for i, x in enumerate(tensors):
        lay = layouts[i] if layouts is not None else None
        shape = x.shape if lay is None else lay.shape
        out[(*matrix_view_shape(shape), x.dtype, x.device, lay)].append(i)
    return out


def stack(xs: Tensors, idx: list[int], m: int, n: int, dtype: torch.dtype | None) -> torch.Tensor:
    """``(B, m, n)`` stack of matrix views, cast while copying (one pass) when ``dtype`` is set."""
    if dtype is None or dtype == xs[idx[0]].dtype:
        return torch.stack([xs[i].reshape(m, n) for i in idx])
    out = torch.empty((len(idx), m, n), dtype=dtype, device=xs[idx[0]].device)
    for j, i in enumerate(idx):
        out[j].copy_(xs[i].reshape(m, n))
    return out


def batched_matrix_map(fn, *lists: Tensors, dtype: torch.dtype | None = None,
                        layouts: list | None = None) -> Tensors:
    """Apply ``fn`` to stacks ``(B, m, n)`` of same-shape matrix views; return per-tensor views.

    Local shards of distributed parameters (``layouts``) are stacked as they are — cast to
    ``dtype`` before any communication — and ``fn`` runs on whole matrices on their owners.
    """
    result: Tensors = [None] * len(lists[0])  # type: ignore[list-item]
    for (m, n, _, _, lay), idx in buckets(lists[0], layouts).items():
        if lay is not None:
            stacks = [torch.stack([xs[i] for i in idx]).to(dtype or xs[idx[0]].dtype) for xs in lists]
            y = _distributed.map_whole(lay, fn, stacks)                  # (B, *local shape)
        else:
            y = fn(*(stack(xs, idx, m, n, dtype) for xs in lists))
        for j, i in enumerate(idx):
            result[i] = y[j].view_as(lists[0][i])
    return result
