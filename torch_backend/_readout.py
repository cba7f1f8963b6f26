"""Read-out maps σ on torch tensors (docs/math.md §4), one table entry per read-out class.

``READOUTS`` maps each :class:`deepopt.Readout` class to a :class:`ReadoutKernel`: σ on a list
of parameter-shaped tensors (local shards included: a matrix map runs on whole matrices on
their owners) and, for matrix maps, σ on stacks of whole matrices ``(B, m, n)`` — what a memory
that holds whole matrices anyway (DMGD on sharded parameters) applies on the owner, at no
collective of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from deepopt import Identity, NewtonSchulz, Readout, Sign, UpdateRule, matrix_view_shape
from deepopt._validate import kernel_for
from torch_backend import _distributed
from torch_backend._foreach import Tensors, batched_matrix_map
from torch_backend._newton_schulz import DTYPES, newton_schulz


class ReadoutKernel(NamedTuple):
    """σ for one read-out class."""

    #: ``(readout, tensors, layouts) -> σ(tensors)``; ``layouts`` is None or one
    #: :class:`~torch_backend._distributed.Layout` (or None) per tensor.
    batched: Callable[[Any, Tensors, list | None], Tensors]
    #: ``(readout, stack (B, m, n)) -> σ(stack)`` for a map that reads whole matrices; None for
    #: an element-wise map (it runs on shards as they are).
    whole: Callable[[Any, torch.Tensor], torch.Tensor] | None = None


def _newton_schulz_lists(ns: NewtonSchulz, ds: Tensors, layouts: list | None) -> Tensors:
    return batched_matrix_map(lambda x: newton_schulz(x, ns), ds, dtype=DTYPES.get(ns.dtype), layouts=layouts)


READOUTS: dict[type[Readout], ReadoutKernel] = {
    Identity: ReadoutKernel(lambda readout, ds, layouts: ds),
    Sign: ReadoutKernel(lambda readout, ds, layouts: torch._foreach_sign(ds)),
    NewtonSchulz: ReadoutKernel(_newton_schulz_lists, whole=lambda ns, x: newton_schulz(x, ns)),
}


def apply(rule: UpdateRule, ds: Tensors, layouts: list | None = None) -> Tensors:
    """σ of the rule's read-out on each tensor of ``ds``."""
    return kernel_for(READOUTS, rule.readout, "torch_backend._readout.READOUTS").batched(rule.readout, ds, layouts)


def apply_one(rule: UpdateRule, d: torch.Tensor, lay=None) -> torch.Tensor:
    """σ on one tensor (the single-tensor twin): a matrix map reads its matrix view, on the
    owner for a local shard; an element-wise map runs on the tensor as it is."""
    kernel = kernel_for(READOUTS, rule.readout, "torch_backend._readout.READOUTS")
    if kernel.whole is None:
        return kernel.batched(rule.readout, [d], None)[0]
    if lay is not None:
        return _distributed.map_whole(lay, lambda x: kernel.whole(rule.readout, x), [d[None]])[0]
    m, n = matrix_view_shape(d.shape)
    return kernel.whole(rule.readout, d.reshape(1, m, n)).view_as(d)


def on_whole(rule: UpdateRule) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """σ as a function of whole ``(B, m, n)`` stacks, or None when σ is element-wise."""
    whole = kernel_for(READOUTS, rule.readout, "torch_backend._readout.READOUTS").whole
    return None if whole is None else (lambda x: whole(rule.readout, x))


__all__ = ["READOUTS", "ReadoutKernel", "apply", "apply_one", "on_whole"]
