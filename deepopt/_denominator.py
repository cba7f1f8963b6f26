"""The denominator: Adam's element-wise second-moment memory (docs/math.md §0, NL App. B)."""

from __future__ import annotations

from dataclasses import dataclass

from deepopt._state import Slot
from deepopt._validate import check_bool, check_real


@dataclass(frozen=True)
class SecondMoment:
    """Divide the read-out by ``√(v_t / (1 − β₂ᵗ)) + ε`` with ``v_t = β₂ v_{t−1} + (1 − β₂) G_t²``.

    With an EMA memory and ``bias_correction`` this is Adam's update (torch.optim.AdamW,
    optax.adamw). ``bias_correction=False`` drops the ``1 − β₂ᵗ`` factor. ``accumulate=True``
    is M3's literal running sum ``v_t = v_{t−1} + β₂ G_t²`` (NL Alg. 1, docs/math.md §6).
    """

    beta2: float = 0.999
    eps: float = 1e-8
    bias_correction: bool = True
    accumulate: bool = False

    def __post_init__(self):
        check_real("beta2", self.beta2, low=0.0, high=1.0, high_open=not self.accumulate)
        check_real("eps", self.eps, low=0.0)
        check_bool("bias_correction", self.bias_correction)
        check_bool("accumulate", self.accumulate)
        if self.accumulate and self.bias_correction:
            raise ValueError("accumulate=True (a running sum, NL Alg. 1) has no bias correction; "
                             "pass bias_correction=False")

    @property
    def counts_steps(self) -> bool:
        return self.bias_correction

    def state_slots(self) -> tuple[Slot, ...]:
        return (Slot("second_moment"),)         # v of the denominator


__all__ = ["SecondMoment"]
