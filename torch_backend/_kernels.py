"""What a memory kernel is, for ``_functional.MEMORIES`` (one entry per memory class)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class Read(NamedTuple):
    """A memory's output for one step: ``σ(D̃)`` (plus anything the memory adds after σ, like
    M3's slow term) per parameter, and optionally a divisor per parameter that the outer step
    folds into its step size instead (an exact bias correction when σ is the identity, as
    torch's AdamW computes ``lr / (1 − β₁ᵗ)``). The single-tensor twin returns one of each."""

    outs: Any
    divisors: Any = None


class MemoryKernel(NamedTuple):
    """A memory's write and read-out through σ, in both twins. Each updates the memory's own
    state entries (its ``state_slots()``) in place.

    - ``batched(rule, states, Gs, Vs, ts, layouts) -> Read`` for a list of parameters;
    - ``single(rule, state, G, V, t, layout) -> Read`` for one, the readable twin that
      ``foreach=False`` runs; ``None`` runs ``batched`` on lists of one instead.

    ``t`` is the step count after this step's increment when the rule counts steps (a Python
    int eagerly, a float64 tensor under ``torch.compile``), else None; ``layout`` is the
    :class:`~torch_backend._distributed.Layout` of a local shard, or None.

    ``applies``: ``batched`` also takes ``apply=``, a function ``(indices, outs)`` that makes the
    outer step of those parameters with those read-outs now; the kernel may call it as soon as
    a part of its read-outs is ready (each ``σ(D̃)`` once), and returns None in their places.
    The caller passes it only where the outer step is ``W ← W − γ O`` (no denominator, no
    divisor, no shape scale; any decoupled decay made first), as an :class:`OuterStep`.
    """

    batched: Callable[..., Read]
    single: Callable[..., Read] | None = None
    applies: bool = False


class OuterStep(NamedTuple):
    """``apply=`` of a memory that :attr:`~MemoryKernel.applies`: ``W ← W − γ O`` for the
    parameters ``params[i]`` of the indices it is called with. A kernel that makes the step
    itself (DMGD's C++ kernel, where σ is the identity) reads ``params`` and ``lr`` instead."""

    params: list
    lr: float

    def __call__(self, idx: list[int], outs: list) -> None:
        torch._foreach_add_([self.params[i] for i in idx], outs, alpha=-self.lr)


__all__ = ["MemoryKernel", "OuterStep", "Read"]
