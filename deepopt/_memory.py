"""Memories: what a rule writes each gradient into and reads its update from (docs/math.md §2, §5, §6).

A memory is a frozen dataclass deriving from :class:`Memory`. It declares its hyperparameters
(validated at construction), the per-parameter state it keeps (:meth:`Memory.state_slots`,
docs/math.md §0) and three facts the backends need: whether it keeps any state, whether it
reads a parameter as a matrix, and whether its math reads the step count. Each backend maps
the class to one kernel (``deepopt.reference.MEMORIES``, ``torch_backend._functional.MEMORIES``,
``jax_backend._compile.MEMORIES``); docs/extending.md adds one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deepopt._state import Slot
from deepopt._validate import check_bool, check_choice, check_int, check_real


def silu_grad(z, sigmoid):
    """``silu'(z) = s (1 + z (1 − s))`` with ``s = sigmoid(z)``, for any array library.

    DMGD's MLP (and HOPE's memories) use SiLU; every backend computes its derivative with this
    one closed form and its own ``sigmoid`` (numpy, ``torch.sigmoid``, ``jax.nn.sigmoid``), so
    float64 results agree across them to rounding.
    """
    s = sigmoid(z)
    return s * (1 + z * (1 - s))


class Memory:
    """Base class of the memories. Subclasses are frozen dataclasses of hyperparameters."""

    #: True when the memory keeps no state at all (plain SGD's ``S_t = η V_t``).
    stateless = False
    #: True when it reads a parameter as its matrix view (parameters need ndim ≥ 2).
    needs_matrix = False
    #: True when ``t`` enters its math (bias corrections, torch SGD's first write, a period).
    counts_steps = False

    def state_slots(self) -> tuple[Slot, ...]:
        """The per-parameter state it keeps (:mod:`deepopt._state`)."""
        return ()



@dataclass(frozen=True)
class LinearMemory(Memory):
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
    def counts_steps(self) -> bool:
        return self.bias_correction or self.undamped_first_write

    def state_slots(self) -> tuple[Slot, ...]:
        return () if self.stateless else (Slot("memory"),)          # S


@dataclass(frozen=True)
class DeepMemory(Memory):
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

    needs_matrix = True                                     # one memory row per matrix row

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

    def _draw_w1(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.initial_w1(name, shape[-1])

    def state_slots(self) -> tuple[Slot, ...]:
        slots = [Slot("memory")]                                          # S, like the parameter
        if self.hidden:
            slots += [Slot("mlp_w1", (self.hidden, "n"), init=self._draw_w1),   # W₁ : h×n
                      Slot("mlp_w2", ("n", self.hidden)),                       # W₂ : n×h, 0: momentum
                      Slot("value_scale", ())]                                  # ν, the MLP's unit
        if self.keys == "previous":
            slots.append(Slot("prev_key"))                                # Ĝ_{t−1}
        return tuple(slots)


@dataclass(frozen=True)
class MultiScaleMemory(Memory):
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

    counts_steps = True                                     # the slow level's period

    def state_slots(self) -> tuple[Slot, ...]:
        return (*self.fast.state_slots(),                   # M¹, the fast level's S
                Slot("slow_memory"),                        # M²
                Slot("slow_readout"),                       # O² = σ(M²), frozen between writes
                Slot("slow_accumulator"))                   # Σ V since the last slow write


__all__ = ["DeepMemory", "LinearMemory", "Memory", "MultiScaleMemory", "silu_grad"]
