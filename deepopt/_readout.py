"""Read-out maps σ and the shape scale s(W) (docs/math.md §4).

A read-out map is a frozen dataclass deriving from :class:`Readout`; it keeps no state of
its own. Each backend maps the class to its kernel in one table (``deepopt.reference.READOUTS``,
``torch_backend._functional.READOUTS``, ``jax_backend._transforms.READOUTS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deepopt import _coefficients
from deepopt._validate import check_choice, check_int, check_real


class Readout:
    """Base class of the read-out maps σ."""

    #: True when σ reads a parameter as its matrix view (parameters need ndim ≥ 2).
    needs_matrix = False



@dataclass(frozen=True)
class Identity(Readout):
    """``σ(D) = D``."""


@dataclass(frozen=True)
class Sign(Readout):
    """``σ(D) = sign(D)`` element-wise."""


Normalization = Literal["clamp", "add"]
ComputeDtype = Literal["input", "bfloat16", "float32", "float64"]
COMPUTE_DTYPES = ("input", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class NewtonSchulz(Readout):
    """Orthogonalise the matrix view of the read-out by Newton–Schulz iterations (docs/math.md §4).

    Transpose if ``m > n``; ``X₀ = X / (norm_scale · ‖X‖_F ⊕ eps)``; per step ``k`` with
    coefficients ``(a, b, c)``: ``A = X Xᵀ``, ``B = b A + c A²``, ``X ← a X + B X``; transpose back.

    Args:
      coefficients: per-step table of ``(a, b, c)``; its last row repeats past its end.
      steps: number of iterations.
      eps: normaliser guard.
      normalization: ``"clamp"`` divides by ``max(norm, eps)`` (torch.optim.Muon);
        ``"add"`` by ``norm + eps`` (optax.contrib.muon).
      norm_scale: multiplies the norm (1.01 for Polar Express's safety factor).
      dtype: compute dtype of the iteration: ``"bfloat16"`` (torch.optim.Muon), ``"input"``
        (optax), ``"float32"`` or ``"float64"``. The numpy reference always computes in float64.
    """

    coefficients: tuple[tuple[float, float, float], ...] = _coefficients.MUON
    steps: int = 5
    eps: float = 1e-7
    normalization: Normalization = "clamp"
    norm_scale: float = 1.0
    dtype: ComputeDtype = "input"

    needs_matrix = True

    def __post_init__(self):
        table = _coefficient_table(self.coefficients, "coefficients",
                                   "expected a non-empty sequence of (a, b, c) triples")
        object.__setattr__(self, "coefficients", table)
        check_int("steps", self.steps, low=0, high=99)
        check_real("eps", self.eps, low=0.0)
        check_choice("normalization", self.normalization, ("clamp", "add"))
        check_real("norm_scale", self.norm_scale, low=0.0, low_open=True)
        check_choice("dtype", self.dtype, COMPUTE_DTYPES)

    @property
    def schedule(self) -> tuple[tuple[float, float, float], ...]:
        """The ``(a, b, c)`` used at each step."""
        return _coefficients.coefficient_schedule(self.coefficients, self.steps)


def newton_schulz(
    coefficients: str | tuple = "muon",
    steps: int = 5,
    *,
    eps: float = 1e-7,
    normalization: Normalization = "clamp",
    dtype: ComputeDtype = "input",
) -> NewtonSchulz:
    """Build a :class:`NewtonSchulz` read-out from a preset name or a table.

    Presets: ``"muon"`` (Keller Jordan's quintic), ``"polar_express"`` (Amsel et al. Alg. 1,
    with its 1.01 safety factor on coefficients and norm), ``"cubic"`` (NL eq. 44). A single
    ``(a, b, c)`` triple is used at every step; a table of triples is per step.
    """
    norm_scale = 1.0
    if isinstance(coefficients, str):
        check_choice("ns_coefficients", coefficients, tuple(_coefficients.PRESETS))
        if coefficients == "polar_express":
            norm_scale = _coefficients.POLAR_EXPRESS_NORM_SCALE
        table = _coefficients.PRESETS[coefficients]
    else:
        rows = coefficients
        if (isinstance(rows, (tuple, list)) and len(rows) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rows)):
            rows = (rows,)                               # one triple: used at every step
        table = _coefficient_table(
            rows, "ns_coefficients", "allowed: a preset name (" + ", ".join(map(repr, _coefficients.PRESETS))
            + "), one (a, b, c) triple, or a sequence of (a, b, c) triples", shown=coefficients)
    return NewtonSchulz(table, steps, eps, normalization, norm_scale, dtype)


def _coefficient_table(rows: object, name: str, allowed: str, *,
                       shown: object = None) -> tuple[tuple[float, float, float], ...]:
    """A non-empty table of ``(a, b, c)`` float triples, else ``ValueError`` naming ``name``."""
    shown = rows if shown is None else shown
    try:
        table = tuple(tuple(float(x) for x in row) for row in rows)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={shown!r} is invalid: {allowed}") from None
    if not table or any(len(row) != 3 for row in table):
        raise ValueError(f"{name}={shown!r} is invalid: {allowed}")
    return table


# --------------------------------------------------------------------------------------------
# Shape scale s(W)
# --------------------------------------------------------------------------------------------

SHAPE_SCALES = ("original", "match_rms_adamw", "none")


def shape_scale_factor(kind: str, m: int, n: int) -> float:
    """``s(W)`` for an ``m × n`` matrix view: ``"original"`` √max(1, m/n) (Keller Jordan,
    torch's default), ``"match_rms_adamw"`` 0.2·√max(m, n) (Moonlight; optax
    ``consistent_rms=0.2``), ``"none"`` 1."""
    if kind == "original":
        return max(1.0, m / n) ** 0.5
    if kind == "match_rms_adamw":
        return 0.2 * max(m, n) ** 0.5
    return 1.0


__all__ = ["SHAPE_SCALES", "Identity", "NewtonSchulz", "Readout", "Sign", "newton_schulz", "shape_scale_factor"]
