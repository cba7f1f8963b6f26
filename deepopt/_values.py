"""Values ``V_t = P(G_t)``: what a memory stores of each gradient (docs/math.md §3).

A values transform is a frozen dataclass deriving from :class:`Values`; it declares the state
it keeps (:meth:`Values.state_slots`) and whether its math reads the step count. Each backend
maps the class to its kernel in one table (``deepopt.reference.VALUES``,
``torch_backend._functional.VALUES``, ``jax_backend._transforms.VALUES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from deepopt._state import Slot
from deepopt._validate import check_real


class Values:
    """Base class of the values transforms ``P``."""

    #: Whether ``t`` enters the transform's math (a bias correction).
    counts_steps = False

    def state_slots(self) -> tuple[Slot, ...]:
        """The per-parameter state the transform keeps (:mod:`deepopt._state`)."""
        return ()


@dataclass(frozen=True)
class IdentityValues(Values):
    """``V_t = G_t``: the memory stores the raw gradient."""


@dataclass(frozen=True)
class AdamValues(Values):
    """``V_t = G_t / (√(v_t / (1 − β₂ᵗ)) + ε)``, ``v_t = β₂ v_{t−1} + (1 − β₂) G_t²``.

    Preconditions *before* the memory write (docs/math.md §3): an RMSprop-normalised gradient is what
    the memory stores. This is not Adam (Adam divides *after* averaging; see
    :class:`SecondMoment`).
    """

    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        check_real("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        check_real("eps", self.eps, low=0.0)

    counts_steps = True

    def state_slots(self) -> tuple[Slot, ...]:
        return (Slot("values_sq"),)             # v of the adam values


__all__ = ["AdamValues", "IdentityValues", "Values"]
