"""M3's multi-scale memory on torch tensors (docs/math.md §6; NL §7.2 eq. 75, Algorithm 1).

A fast linear memory (``_linear_memory.py``) written every step, read through σ, plus
``w O²``, the slow level's read-out frozen since its last write; then the slow level
accumulates ``V`` and, every ``period`` steps, writes ``M² ← ρ M² + η₃ Σ V`` and refreshes
``O² = σ(M²)``. :data:`KERNEL` is its entry in ``_functional.MEMORIES``.
"""

from __future__ import annotations

import torch

from deepopt import UpdateRule
from torch_backend import _linear_memory, _readout
from torch_backend._foreach import Tensors, is_due, scalar_op
from torch_backend._kernels import MemoryKernel, Read


def _single(rule: UpdateRule, st: dict, g: torch.Tensor, v: torch.Tensor, t, lay=None) -> Read:
    mem = rule.memory
    d = _linear_memory.write_read_one(mem.fast, st, g, v, t, lay)
    out = _readout.apply_one(rule, d, lay) + mem.slow_weight * st["slow_readout"]    # O² before this write
    _slow_write_single(rule, st, v, t, lay)
    return Read(out)


def _batched(rule: UpdateRule, states: list[dict], gs: Tensors, vs: Tensors, ts: list,
             layouts: list | None = None) -> Read:
    mem = rule.memory
    ds = _linear_memory.write_read(mem.fast, states, gs, vs, ts, layouts)
    reads = _readout.apply(rule, ds, layouts)
    slow = [st["slow_readout"] for st in states]                                    # O² before this write
    # O¹ + w O² laid out as O² and the parameters: a Newton–Schulz read of a tall matrix is a
    # transposed view, and a sum led by it is transposed too, so the outer step's foreach ops
    # would see mixed layouts (on CUDA that leaves foreach's fast path: a kernel per tensor).
    if mem.slow_weight == 1.0:
        outs = torch._foreach_add(slow, reads)                                      # same values
    else:
        outs = scalar_op("mul", slow, mem.slow_weight)
        torch._foreach_add_(outs, reads)
    _slow_write_batched(rule, states, vs, ts, layouts)
    return Read(outs)


def _slow_write_single(rule: UpdateRule, st: dict, v: torch.Tensor, t: int, lay=None) -> None:
    """M3: accumulate V; every ``period`` steps write M² and refresh O² = σ(M²) (docs/math.md §6)."""
    mem = rule.memory
    st["slow_accumulator"].add_(v)
    if isinstance(t, torch.Tensor):                          # under torch.compile: masked, no branch
        _slow_write_masked(rule, [st], [is_due(t, mem.period)], lay and [lay])
        return
    if is_due(t, mem.period):
        st["slow_memory"].mul_(mem.slow_momentum).add_(st["slow_accumulator"], alpha=mem.slow_inner_lr)
        st["slow_readout"].copy_(_readout.apply_one(rule, st["slow_memory"], lay))
        st["slow_accumulator"].zero_()


def _slow_write_masked(rule: UpdateRule, states: list[dict], due: Tensors, layouts: list | None = None) -> None:
    """M3's slow write under torch.compile (the accumulator already holds this step's V): the
    write and its Newton–Schulz are computed every step and kept where ``due`` (a bool tensor per
    parameter), because a branch on ``t`` would break the graph. Same values as the branch."""
    mem = rule.memory
    acc = [st["slow_accumulator"] for st in states]
    written = torch._foreach_add(scalar_op("mul", [st["slow_memory"] for st in states], mem.slow_momentum),
                                 acc, alpha=mem.slow_inner_lr)
    read = _readout.apply(rule, written, layouts)
    for st, d, w, r in zip(states, due, written, read):
        st["slow_memory"].copy_(torch.where(d, w, st["slow_memory"]))
        st["slow_readout"].copy_(torch.where(d, r, st["slow_readout"]))
        st["slow_accumulator"].copy_(torch.where(d, 0.0, st["slow_accumulator"]))


def _slow_write_batched(rule: UpdateRule, states: list[dict], vs: Tensors, ts: list[int],
                        layouts: list | None = None) -> None:
    mem = rule.memory
    torch._foreach_add_([st["slow_accumulator"] for st in states], vs)
    if ts and isinstance(ts[0], torch.Tensor):              # under torch.compile: masked, no branch
        _slow_write_masked(rule, states, [is_due(t, mem.period) for t in ts], layouts)
        return
    due_idx = [i for i, t in enumerate(ts) if is_due(t, mem.period)]
    if not due_idx:
        return
    due = [states[i] for i in due_idx]
    slow = [st["slow_memory"] for st in due]
    acc = [st["slow_accumulator"] for st in due]
    scalar_op("mul", slow, mem.slow_momentum, inplace=True)
    torch._foreach_add_(slow, acc, alpha=mem.slow_inner_lr)
    due_layouts = None if layouts is None else [layouts[i] for i in due_idx]
    torch._foreach_copy_([st["slow_readout"] for st in due], _readout.apply(rule, slow, due_layouts))
    torch._foreach_zero_(acc)


#: The multi-scale memory's entry in ``_functional.MEMORIES``.
KERNEL = MemoryKernel(single=_single, batched=_batched)


__all__ = ["KERNEL"]
