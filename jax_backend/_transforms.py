"""The ``scale_by_*`` pieces a deepopt rule compiles to (docs/math.md §0–§4), in optax's idiom.

Each factory returns an ``optax.GradientTransformation``; ``_compile.py`` chains them:

    flip sign (maximize) → coupled decay → [second moment ∘ (memory → read-out σ)]
        → shape scale → decoupled decay → −learning rate

Per-leaf state lives in pytrees shaped like the parameters (as ``optax.scale_by_adam``'s
``mu``/``nu``); a scalar ``count`` is the step ``t`` of docs/math.md §0 after the update.

Matrix rules read each leaf through a :class:`MatrixView` (docs/math.md §0), which turns a leaf into a
stack of ``m × n`` matrices ``(..., m, n)``; batch axes are carried by ``jnp.matmul``.

``None`` leaves (optax's frozen/absent parameters) and ``optax.partition``'s masked nodes are
empty subtrees for ``jax.tree.map``: they get no state and a ``None`` update, as in optax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepopt import (
    AdamValues,
    Identity,
    IdentityValues,
    LinearMemory,
    NewtonSchulz,
    Readout,
    SecondMoment,
    Sign,
    Values,
    shape_scale_factor,
)
from deepopt._validate import kernel_for
from jax_backend._newton_schulz import newton_schulz
from jax_backend._sharding import whole_matrices
from jax_backend._state import init_state

Layout = Literal["optax", "torch"]
LAYOUTS = ("optax", "torch")

# --------------------------------------------------------------------------------------------
# Matrix view (docs/math.md §0)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixView:
    """How a leaf of ndim ≥ 2 is read as ``m × n`` matrices (docs/math.md §0).

    - ``"optax"``: optax's ``MuonDimensionNumbers`` convention for a kernel used as
      ``y = x W``: axis −2 is the reduction (in) axis, axis −1 the output axis and every
      leading axis a batch. The matrix view is ``m = out``, ``n = in``, i.e. the transpose
      of the last two axes: ``(..., in, out) → (..., out, in)``.
    - ``"torch"``: ``(out, in, *rest) → m = out``, ``n = in·prod(rest)``, no batch axes
      (conv kernels flatten their trailing dims), exactly as ``deepopt.reference``.
    """

    layout: Layout = "optax"
    #: A ``jax.sharding.Mesh``: Newton–Schulz then runs on whole matrices, its input and output
    #: pinned by :func:`jax_backend._sharding.whole_matrices` (no collective in its iterations).
    ns_mesh: Any = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is invalid: expected one of {LAYOUTS}")

    def mn(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(m, n)`` of one matrix of a leaf of ``shape``."""
        if len(shape) < 2:
            raise ValueError(f"a matrix view needs at least 2 dims, got shape {tuple(shape)}")
        if self.layout == "optax":
            return int(shape[-1]), int(shape[-2])
        return int(shape[0]), int(math.prod(shape[1:]))

    def batch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The leading batch axes of a leaf of ``shape``: ``shape[:-2]`` (optax), ``()`` (torch)."""
        return tuple(shape[:-2]) if self.layout == "optax" else ()

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """The leaf as a stack ``(..., m, n)`` of matrix views."""
        if self.layout == "optax":
            return jnp.swapaxes(x, -1, -2)
        return x.reshape(self.mn(x.shape))

    def from_matrix(self, y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Inverse of :meth:`to_matrix` for a leaf of ``shape``."""
        if self.layout == "optax":
            return jnp.swapaxes(y, -1, -2)
        return y.reshape(shape)


def _like(x: Any, leaf: jax.Array) -> jax.Array:
    """A scalar (``1 − αᵗ``, η) in ``leaf``'s dtype. JAX keeps these weakly typed today, so
    this is a guard: a strongly typed float64 scalar would otherwise promote a float32 leaf
    (and its state) under x64, and a jitted step would retrace."""
    return jnp.asarray(x).astype(jnp.result_type(leaf))     # result_type: Python-float leaves too


def _bias(decay: float, count: jax.Array) -> jax.Array:
    """``1 − decayᵗ`` in the default float dtype (cast per leaf by :func:`_like`)."""
    return 1.0 - decay ** count


# --------------------------------------------------------------------------------------------
# Memory: values → write → read-out (docs/math.md §2–§3, NL eq. 46–49)
# --------------------------------------------------------------------------------------------


class LinearMemoryState(NamedTuple):
    """State of :func:`scale_by_linear_memory`."""

    count: jax.Array          # shape=(), int32: writes so far, t of docs/math.md §0
    memory: optax.Updates     # S, each leaf shaped like its parameter; None when stateless
    values_sq: optax.Updates  # v of AdamValues (docs/math.md §3), like the parameters; None otherwise


def scale_by_linear_memory(
    memory: LinearMemory,
    values: IdentityValues | AdamValues | None = None,
    *,
    view: MatrixView | None = None,
) -> optax.GradientTransformation:
    """Write the gradient into a linear memory and read it out (docs/math.md §2, NL eq. 46–49)::

        V_t = P(G_t)                                   values (docs/math.md §3)
        K_t = G_t / max(‖G_t‖_F, key_eps)              key, on each matrix view
        S_t = S_{t−1}(α I − ζ K_tᵀK_t) + η V_t         one unit step on the inner objective
                                                       (ζ = 0 on leaves with ndim < 2)
        D̃_t = S_t, or α S_t + η V_t (Nesterov)         read-out; optional bias correction

    The values live here, not in a transform of their own, because the write needs both the
    value ``V_t`` and the key built from the raw ``G_t`` (ζ > 0).

    Args:
      memory: the :class:`deepopt.LinearMemory` (α = momentum, η = inner_lr, ζ = zeta).
      values: :class:`deepopt.IdentityValues` (None means this) or :class:`deepopt.AdamValues`.
      view: the matrix view; required when ``memory.zeta > 0`` (used on leaves with ndim ≥ 2).
    """
    if memory.zeta != 0.0 and view is None:
        raise ValueError("a delta memory (zeta > 0) needs a matrix view")
    values = IdentityValues() if values is None else values
    slots = values.state_slots() + memory.state_slots()      # plain SGD keeps no memory at all

    def init_fn(params):
        return init_state(LinearMemoryState, slots, params, view)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        values_sq, vals = apply_values(values, state.values_sq, updates, count)
        new_memory, d = linear_memory_step(memory, view, state.memory, updates, vals, count)
        return d, LinearMemoryState(count=count, memory=new_memory, values_sq=values_sq)

    return optax.GradientTransformation(init_fn, update_fn)


def apply_values(values: Values | None, values_sq: optax.Updates,
                 updates: optax.Updates, count: jax.Array) -> tuple[optax.Updates, optax.Updates]:
    """Values ``V_t = P(G_t)`` (docs/math.md §3); returns ``(new values_sq, V)``.

    Shared by every memory (linear, deep, multi-scale), through the ``VALUES`` table:
    ``values_sq`` is ``None`` unless ``values`` is :class:`deepopt.AdamValues`; ``count`` is
    ``t`` after this step's increment.
    """
    values = IdentityValues() if values is None else values
    return kernel_for(VALUES, values, "jax_backend._transforms.VALUES")(values, values_sq, updates, count)


def _adam_values(values: AdamValues, values_sq: optax.Updates, updates: optax.Updates,
                 count: jax.Array) -> tuple[optax.Updates, optax.Updates]:
    b2 = values.beta2
    values_sq = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, values_sq, updates)
    bc2 = _bias(b2, count)
    vals = jax.tree.map(lambda g, v: g / (jnp.sqrt(v / _like(bc2, v)) + values.eps),
                        updates, values_sq)
    return values_sq, vals


#: P per values class: ``(values, values_sq, G, t) -> (new values_sq, V)``.
VALUES: dict[type[Values], Callable[..., tuple[optax.Updates, optax.Updates]]] = {
    IdentityValues: lambda values, values_sq, updates, count: (None, updates),
    AdamValues: _adam_values,
}


def linear_memory_step(memory: LinearMemory, view: MatrixView | None, s_prev: optax.Updates,
                       updates: optax.Updates, vals: optax.Updates,
                       count: jax.Array) -> tuple[optax.Updates, optax.Updates]:
    """Write ``S_t = S_{t−1}(αI − ζKᵀK) + ηV_t`` and read ``D̃_t`` (docs/math.md §2); returns
    ``(S_t or None when stateless, D̃_t)``.

    The linear-memory math of :func:`scale_by_linear_memory`, also M3's fast level
    (:func:`jax_backend.scale_by_multiscale_memory`). ``updates`` are the raw gradients
    ``G_t`` (the delta key is built from them), ``vals`` the values ``V_t``.
    """
    alpha, zeta = memory.momentum, memory.zeta

    def forget(s: jax.Array, g: jax.Array) -> jax.Array:
        """ζ-free part of the delta term, ``S KᵀK``, on the matrix view of one leaf."""
        sm, gm = view.to_matrix(s), view.to_matrix(g)
        norm = jnp.linalg.norm(gm, axis=(-2, -1), keepdims=True)
        k = gm / jnp.maximum(norm, memory.key_eps)
        kt = jnp.swapaxes(k, -1, -2)
        m, n = sm.shape[-2:]
        # docs/math.md §2 cost note: contract on the smaller side.
        if m <= n:
            sk = (sm @ kt) @ k                          # (S Kᵀ) K : m×n·n×m, then m×m·m×n
        else:
            sk = sm @ (kt @ k)                          # S (KᵀK) : n×m·m×n, then m×n·n×n
        return view.from_matrix(sk, s.shape)

    # Inner rate η; torch SGD's first write is undamped (its buffer starts as G_1).
    eta = jnp.where(count == 1, 1.0, memory.inner_lr) if memory.undamped_first_write \
        else memory.inner_lr

    # Memory write S_t = S_{t−1}(αI − ζKᵀK) + ηV_t.
    if memory.stateless:
        new_memory = None
        s = jax.tree.map(lambda v: _like(eta, v) * v, vals)
    else:
        def write(s_prev, g, v):
            retained = alpha * s_prev
            if zeta != 0.0 and s_prev.ndim >= 2:
                # Forget what S stored along the current gradient's row space (NL eq. 48).
                # Leaves without a matrix view keep the recurrence with ζ = 0 (docs/math.md §2).
                retained = retained - zeta * forget(s_prev, g)
            return retained + _like(eta, v) * v
        new_memory = s = jax.tree.map(write, s_prev, updates, vals)

    # Read-out D̃_t (Nesterov and NAdam-form bias correction as optax.contrib.muon).
    if memory.nesterov:
        if memory.bias_correction:
            bc_next, bc_now = _bias(alpha, count + 1), _bias(alpha, count)
            read = lambda s_, v: (alpha * s_ / _like(bc_next, s_)
                                  + _like(eta, v) * v / _like(bc_now, v))
        else:
            read = lambda s_, v: alpha * s_ + _like(eta, v) * v
        d = jax.tree.map(read, s, vals)
    elif memory.bias_correction:
        bc_now = _bias(alpha, count)
        d = jax.tree.map(lambda s_: s_ / _like(bc_now, s_), s)
    else:
        d = s
    return new_memory, d


# --------------------------------------------------------------------------------------------
# Read-out map σ (docs/math.md §4)
# --------------------------------------------------------------------------------------------


def readout_map(readout: Readout, *, view: MatrixView | None = None) -> Callable[[jax.Array], jax.Array] | None:
    """σ on one leaf (docs/math.md §4), or ``None`` for the identity, from the ``READOUTS`` table."""
    return kernel_for(READOUTS, readout, "jax_backend._transforms.READOUTS")(readout, view)


def _orthogonaliser(readout: NewtonSchulz, view: MatrixView | None) -> Callable[[jax.Array], jax.Array]:
    """Newton–Schulz on each matrix view with the backend's one
    :func:`~jax_backend._newton_schulz.newton_schulz` (batch axes carried by matmul)."""
    if view is None:
        raise ValueError("a Newton–Schulz read-out needs a matrix view")

    def orthogonalise(d):
        x = view.to_matrix(d)
        if view.ns_mesh is None:
            return view.from_matrix(newton_schulz(x, readout), d.shape)
        # Whole matrices in and out (pinning only the input lets the partitioner shard the
        # iterations again): one gather before, a local slice after (docs/distributed.md).
        whole = whole_matrices(view.ns_mesh, x.shape)
        y = newton_schulz(jax.lax.with_sharding_constraint(x, whole), readout)
        return view.from_matrix(jax.lax.with_sharding_constraint(y, whole), d.shape)

    return orthogonalise


#: σ per read-out class: ``(readout, view) -> σ on one leaf``, or None for the identity.
READOUTS: dict[type[Readout], Callable[..., Callable[[jax.Array], jax.Array] | None]] = {
    Identity: lambda readout, view: None,
    Sign: lambda readout, view: jnp.sign,
    NewtonSchulz: _orthogonaliser,
}


def scale_by_readout(readout: Readout, *,
                     view: MatrixView | None = None) -> optax.GradientTransformation:
    """Apply the read-out map σ: identity, element-wise sign, or Newton–Schulz on each matrix
    view (the backend's one :func:`~jax_backend._newton_schulz.newton_schulz`)."""
    sigma = readout_map(readout, view=view)
    if sigma is None:
        return optax.identity()
    return optax.stateless(lambda updates, params=None: jax.tree.map(sigma, updates))


# --------------------------------------------------------------------------------------------
# Denominator: Adam's second moment (NL App. B)
# --------------------------------------------------------------------------------------------


class SecondMomentState(NamedTuple):
    """State of :func:`scale_by_second_moment`."""

    count: jax.Array                # shape=(), int32: t
    second_moment: optax.Updates    # v, each leaf shaped like its parameter
    inner_state: optax.OptState     # state of the wrapped numerator (memory → σ)


def scale_by_second_moment(denominator: SecondMoment,
                           numerator: optax.GradientTransformation) -> optax.GradientTransformation:
    """``σ(D̃) / (√(v_t / (1 − β₂ᵗ)) + ε)`` with ``v_t = β₂ v_{t−1} + (1 − β₂) G_t²``.

    ``denominator.accumulate`` is M3's literal running sum ``v_t = v_{t−1} + β₂ G_t²``
    (NL Alg. 1, docs/math.md §6), which never has a bias correction.

    A wrapper rather than a link of the chain: ``v`` is built from the incoming gradient
    ``G_t`` but divides the numerator's output ``σ(D̃_t)``, so it must see both ends (optax's
    ``scale_by_adam`` holds its two moments in one transform for the same reason).
    """
    b2, eps = denominator.beta2, denominator.eps

    def init_fn(params):
        return init_state(SecondMomentState, denominator.state_slots(), params,
                          inner_state=numerator.init(params))

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        if denominator.accumulate:                      # NL Alg. 1: V_t = V_{t−1} + β₂ G²
            nu = jax.tree.map(lambda v, g: v + b2 * g * g, state.second_moment, updates)
        else:
            nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.second_moment, updates)
        numer, inner_state = numerator.update(updates, state.inner_state, params)
        bc2 = _bias(b2, count) if denominator.bias_correction else 1.0
        out = jax.tree.map(lambda o, v: o / (jnp.sqrt(v / _like(bc2, v)) + eps), numer, nu)
        return out, SecondMomentState(count=count, second_moment=nu, inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Shape scale s(W) (docs/math.md §4)
# --------------------------------------------------------------------------------------------


def scale_by_shape(kind: str, *, view: MatrixView | None = None) -> optax.GradientTransformation:
    """Multiply each leaf by ``s(W)`` of its matrix view: ``"original"`` √max(1, m/n),
    ``"match_rms_adamw"`` 0.2·√max(m, n), ``"none"`` 1 (``deepopt.shape_scale_factor``)."""
    if kind == "none":
        return optax.identity()
    if view is None:
        raise ValueError(f"shape_scale={kind!r} needs a matrix view")

    def scale(u):
        return shape_scale_factor(kind, *view.mn(u.shape)) * u     # a Python float: no promotion

    return optax.stateless(lambda updates, params=None: jax.tree.map(scale, updates))


__all__ = [
    "LAYOUTS", "READOUTS", "VALUES", "LinearMemoryState", "MatrixView", "SecondMomentState", "apply_values",
    "linear_memory_step", "readout_map", "scale_by_linear_memory", "scale_by_readout",
    "scale_by_second_moment", "scale_by_shape",
]
