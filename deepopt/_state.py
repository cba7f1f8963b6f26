"""The state layout of a rule, defined once for the reference and both backends.

Every part of a rule (values, memory, denominator) declares the state it keeps per parameter
as a tuple of :class:`Slot` s; :meth:`deepopt.UpdateRule.state_slots` joins them. The numpy
reference, ``torch_backend`` (one state dict per parameter) and ``jax_backend`` (one pytree
per state field, shaped like the parameters) all build their zero state from these slots, so
a key, a shape or an initial value is written in exactly one place: the part that uses it.

A slot is shaped like its parameter (``dims=None``), or is one array per matrix view of it
(``dims`` a tuple of sizes and the symbols ``"m"``, ``"n"`` of the view, docs/math.md §0):
``()`` is a scalar per matrix (DMGD's value scale ν), ``(16, "n")`` an ``h × n`` weight. JAX
prefixes the leaf's batch axes to per-matrix slots (a stacked ``(L, in, out)`` kernel is ``L``
matrices); torch and the reference have none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: An initial value: ``(parameter name, slot shape) -> float64 array``; the name is torch's
#: ``named_parameters`` name or the dotted JAX pytree path, so every backend draws the same.
Initializer = Callable[[str, tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class Slot:
    """One named entry of a parameter's optimizer state.

    Attributes:
      key: the state dict key (torch, reference) and state field (JAX).
      dims: ``None`` for an array shaped like the parameter; otherwise the shape of one entry
        per matrix view, from ints and the view's sides ``"m"`` and ``"n"``.
      init: the initial value (:data:`Initializer`); ``None`` for zeros.
    """

    key: str
    dims: tuple[int | str, ...] | None = None
    init: Initializer | None = None

    @property
    def like_param(self) -> bool:
        return self.dims is None

    def shape(self, param_shape: tuple[int, ...], m: int = 0, n: int = 0) -> tuple[int, ...]:
        """The slot's shape for one parameter (no batch axes) with matrix view ``m × n``."""
        if self.dims is None:
            return tuple(param_shape)
        return tuple({"m": m, "n": n}.get(d, d) if isinstance(d, str) else d for d in self.dims)

    def initial(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The slot's initial value (float64) for parameter ``name``, at ``shape``."""
        return np.zeros(shape) if self.init is None else np.asarray(self.init(name, shape), dtype=np.float64)


#: The step count ``t`` of docs/math.md §0, kept by rules whose math reads it (bias
#: corrections, torch SGD's first write, M3's period). JAX keeps it as each transform's
#: ``count`` (the optax idiom) rather than per leaf.
STEP = Slot("step", ())


__all__ = ["STEP", "Initializer", "Slot"]
