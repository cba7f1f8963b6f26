"""The parts of an update rule, in the associative-memory vocabulary of docs/math.md §1–§4.

Every part is a frozen, validated dataclass holding hyperparameters only (no arrays, no
backend). A rule (``deepopt.UpdateRule``) is a tree of these parts; backends and the numpy
reference interpret them.

Greek letters ↔ names: α = ``momentum`` (retention), η = ``inner_lr`` (inner rate),
ζ = ``zeta`` (delta strength), β₂ = ``beta2``, ε = ``eps``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from deepopt import _coefficients
from deepopt._validate import check_bool, check_choice, check_int, check_real

# --------------------------------------------------------------------------------------------
# Values V_t = P(G_t)  (docs/math.md §3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdentityValues:
    """``V_t = G_t``: the memory stores the raw gradient."""


@dataclass(frozen=True)
class AdamValues:
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


Values = Union[IdentityValues, AdamValues]

# --------------------------------------------------------------------------------------------
# Memory  (docs/math.md §2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearMemory:
    """Linear momentum memory ``S`` with the write of NL eq. 46–49 (docs/math.md §2).

    ``S_t = S_{t−1}(α I − ζ K_tᵀ K_t) + η V_t`` with ``K_t = G_t / max(‖G_t‖_F, key_eps)``.

    - ``zeta = 0``: Hebbian (dot-product) memory, ``S_t = α S_{t−1} + η V_t`` — heavy ball
      (``η = 1``) or EMA (``η = 1 − α``).
    - ``zeta > 0``: delta momentum; stable for ``0 ≤ ζ ≤ 1 + α``. Parameters without a
      matrix view (ndim < 2) use the same recurrence with ζ = 0 (docs/math.md §2).

    Read-out ``D_t = S_t``; with ``nesterov`` ``D̃_t = α S_t + η V_t``.

    ``bias_correction`` divides the read-out like Adam/optax: ``S_t / (1 − αᵗ)``, and with
    ``nesterov`` the NAdam form ``α S_t / (1 − αᵗ⁺¹) + η V_t / (1 − αᵗ)`` (as
    ``optax.contrib.muon`` does). Meant for EMA memories (``η = 1 − α``).

    ``undamped_first_write`` reproduces ``torch.optim.SGD``'s quirk of writing ``V_1`` with
    ``η = 1`` on the first step (its buffer starts as a clone of the first gradient).
    """

    momentum: float = 0.0
    inner_lr: float = 1.0
    zeta: float = 0.0
    nesterov: bool = False
    bias_correction: bool = False
    undamped_first_write: bool = False
    key_eps: float = 1e-12

    def __post_init__(self):
        check_real("momentum", self.momentum, low=0.0, high=1.0)
        check_real("inner_lr", self.inner_lr, low=0.0)
        check_real("zeta", self.zeta, low=0.0, high=1.0 + float(self.momentum))
        check_bool("nesterov", self.nesterov)
        check_bool("bias_correction", self.bias_correction)
        check_bool("undamped_first_write", self.undamped_first_write)
        check_real("key_eps", self.key_eps, low=0.0, low_open=True)
        if self.bias_correction and self.momentum >= 1.0:
            raise ValueError("bias_correction=True needs momentum < 1 (it divides by 1 − momentumᵗ)")

    @property
    def stateless(self) -> bool:
        """True when ``S_t = η V_t`` needs no stored state (plain SGD)."""
        return self.momentum == 0.0 and self.zeta == 0.0 and not self.bias_correction

    @property
    def objective(self) -> Literal["dot", "delta"]:
        """The inner objective's attentional bias: dot product (ζ = 0) or delta (ζ > 0)."""
        return "dot" if self.zeta == 0.0 else "delta"


@dataclass(frozen=True)
class DeepMemory:
    """Deep momentum memory of DMGD in its scale-stable form (docs/math.md §5; NL eq. 50).

    ``M_φ(q) = S + ν f_θ(q)``: ``S ∈ R^{m×n}`` is a linear part (one row per row of the
    parameter's matrix view) and ``f_θ(q) = W₂ σ_h(W₁ q)`` a two-layer MLP of width ``hidden``
    applied to each row ``q ∈ R^n``, shared by the rows (``W₁ ∈ R^{h×n}``, ``W₂ ∈ R^{n×h}``),
    whose output is expressed in units of the *value scale* ``ν``. Per step, with ``Ĝ`` the
    gradient with each row divided by ``max(‖row‖, key_eps)``:

    - keys and queries: ``K = Q = Ĝ_t`` (``keys="current"``) or ``K = Ĝ_{t−1}, Q = Ĝ_t``
      (``keys="previous"``: the memory learns to predict the next gradient from the last);
    - value scale: ``ν_t = max(β ν_{t−1}, ‖V_t‖_F / √m, key_eps)`` — the RMS row norm of the
      values, forgotten no faster than ``S`` forgets (``β = |α − η|`` for ``"l2"``, ``α`` for
      ``"dot"``: the factor ``S`` is multiplied by in one write);
    - inner objective over rows r: ``"dot"``: ``−η Σ_r ⟨M_φ(k_r), v_r⟩``;
      ``"l2"``: ``(η/2) Σ_r ‖M_φ(k_r) − v_r‖²``; retention ``((1−α)/2)(‖S‖² + ‖W₂‖²)``;
    - write: one gradient step. ``S`` takes its own row's term. The shared ``θ`` takes the
      row-*mean* of its gradient, preconditioned by ``1/ν²`` (the Gauss–Newton curvature of
      ``ℓ`` in ``θ`` carries ``ν²``), and each of ``W₂``, ``W₁`` a rate normalised as in delta
      gradient descent, ``η′ = η / (1 + η λ̄)`` with ``λ̄`` a bound on the curvature of ``ℓ`` in
      that weight: ``‖H‖²_F / m`` for ``W₂``, ``1.21 ‖W₂‖²_F`` for ``W₁`` (``1.21 > max σ'²``,
      unit keys);
    - read: ``D_t = M_{φ_t}(Q_t)``; Nesterov ``D̃_t = α D_t + η V_t``.

    What this buys (proved in docs/math.md §5 and property-tested): ``θ`` only ever sees inputs
    of unit scale, so the update is exactly homogeneous of degree 1 in the gradient (degree 0
    with adam values or a normalising read-out), every write of ``θ`` is bounded independently
    of the gradient stream, and ``W₂``'s write is a contraction for ``"l2"``. Hence no scale of
    gradients (1e-6 … 1e6 and beyond) can make the memory overflow. ``hidden = 0`` has no ``ν``
    and no ``θ``: it is exactly the linear memory.

    Departures from NL eq. 50's literal ``m ← α m − η∇ℓ`` (measured, docs/math.md §5): the
    retention does not act on ``W₁`` (at α = 0.9 it decayed the random features to 3e-13 in 300
    steps, and the MLP's read with them); ``W₁ ~ N(0, 1)`` so that a unit key gives unit-variance
    pre-activations (``N(0, 1/n)`` left σ_h in its linear range, the MLP negligible).

    ``σ_h`` is SiLU: smooth like GELU, and its derivative has the same closed form in numpy,
    torch and JAX, so the backends agree to rounding (GELU's erf does not, across libraries).
    ``W₂ = 0``, ``S = 0``, ``ν = 0`` at start (the memory starts as plain momentum); ``W₁`` from
    ``numpy.random.default_rng([seed, crc32(parameter name)])``.
    """

    momentum: float = 1.0
    inner_lr: float = 0.1
    hidden: int = 16
    objective: Literal["dot", "l2"] = "l2"
    keys: Literal["current", "previous"] = "current"
    nesterov: bool = False
    seed: int = 0
    key_eps: float = 1e-12

    def __post_init__(self):
        check_real("momentum", self.momentum, low=0.0, high=1.0)
        check_real("inner_lr", self.inner_lr, low=0.0)
        check_int("hidden", self.hidden, low=0)
        check_choice("objective", self.objective, ("dot", "l2"))
        check_choice("keys", self.keys, ("current", "previous"))
        check_bool("nesterov", self.nesterov)
        check_int("seed", self.seed, low=0)
        check_real("key_eps", self.key_eps, low=0.0, low_open=True)
        if self.objective == "l2" and self.inner_lr > 1.0 + self.momentum:  # noqa: SIM102
            raise ValueError(f"inner_lr={self.inner_lr!r} is out of range for objective='l2': the "
                             f"linear part's write S(α − η) + ηV is unstable past 1 + α = {1 + self.momentum:g}")

    stateless = False

    #: Bound on silu'(z)² (max silu' ≈ 1.0998): W₁'s curvature bound is this times ‖W₂‖²_F.
    SILU_SLOPE_SQ = 1.21

    @property
    def scale_decay(self) -> float:
        """β of the value scale ``ν``: the factor one write multiplies ``S`` by (|α − η| for
        ``"l2"``, α for ``"dot"``), so the MLP's read never outlives the linear part's."""
        return abs(self.momentum - self.inner_lr) if self.objective == "l2" else self.momentum

    def initial_w1(self, name: str, n: int) -> np.ndarray:
        """``W₁ ~ N(0, 1)`` of shape ``(hidden, n)``, float64, identical on every backend.

        Keys are unit rows, so each pre-activation ``w·k`` is N(0, 1). Seeded by ``seed`` and
        the parameter's name (torch ``named_parameters`` name, or the dotted JAX pytree path;
        unnamed torch parameters are named by position).
        """
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return rng.standard_normal((self.hidden, n))


@dataclass(frozen=True)
class MultiScaleMemory:
    """Multi-scale momentum (M3; docs/math.md §6, NL §7.2 eq. 75, Algorithm 1).

    A fast level ``fast`` (a :class:`LinearMemory`, written every step) and a slow level ``M²``
    written every ``period`` steps with the sum of the values seen since its last write:
    ``M² ← ρ M² + β₃ Σ V`` (``ρ = slow_momentum``; 1 in the paper). The slow read-out
    ``O² = σ(M²)`` is computed at that chunk boundary and used for the next ``period`` steps;
    the rule's output is ``σ(D̃_fast) + w O²`` (``w = slow_weight``, the paper's α), before the
    denominator. Before the first slow write ``O² = 0``.
    """

    fast: LinearMemory = LinearMemory(momentum=1.0, inner_lr=0.9)
    slow_inner_lr: float = 0.9
    slow_momentum: float = 1.0
    period: int = 10
    slow_weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.fast, LinearMemory):
            raise ValueError(f"fast={self.fast!r} is invalid: expected a LinearMemory")
        if self.fast.zeta != 0.0:
            raise ValueError("the fast level of a MultiScaleMemory must have zeta = 0")
        check_real("slow_inner_lr", self.slow_inner_lr, low=0.0)
        check_real("slow_momentum", self.slow_momentum, low=0.0, high=1.0)
        check_int("period", self.period, low=1)
        check_real("slow_weight", self.slow_weight, low=0.0)

    stateless = False


# --------------------------------------------------------------------------------------------
# Denominator: the element-wise second-moment memory of Adam (NL App. B)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Read-out maps σ  (docs/math.md §4)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """``σ(D) = D``."""


@dataclass(frozen=True)
class Sign:
    """``σ(D) = sign(D)`` element-wise."""


Normalization = Literal["clamp", "add"]
ComputeDtype = Literal["input", "bfloat16", "float32", "float64"]


@dataclass(frozen=True)
class NewtonSchulz:
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

    def __post_init__(self):
        table = _coefficient_table(self.coefficients, "coefficients",
                                   "expected a non-empty sequence of (a, b, c) triples")
        object.__setattr__(self, "coefficients", table)
        check_int("steps", self.steps, low=0, high=99)
        check_real("eps", self.eps, low=0.0)
        check_choice("normalization", self.normalization, ("clamp", "add"))
        check_real("norm_scale", self.norm_scale, low=0.0, low_open=True)
        check_choice("dtype", self.dtype, ("input", "bfloat16", "float32", "float64"))

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


Readout = Union[Identity, Sign, NewtonSchulz]

# --------------------------------------------------------------------------------------------
# Shape scale s(W)  (docs/math.md §4)
# --------------------------------------------------------------------------------------------

ShapeScale = Literal["original", "match_rms_adamw", "none"]
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


__all__ = [
    "AdamValues", "DeepMemory", "Identity", "IdentityValues", "LinearMemory", "MultiScaleMemory",
    "NewtonSchulz", "Readout",
    "SecondMoment", "ShapeScale", "Sign", "Values", "newton_schulz", "shape_scale_factor",
]
