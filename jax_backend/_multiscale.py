"""M3's multi-scale memory (docs/math.md §6; NL §7.2 eq. 75, Algorithm 1) as an optax transform.

A fast linear memory written every step (the linear-memory math of
:func:`jax_backend._transforms.linear_memory_step`) and a slow memory ``M²`` written every
``period`` steps with the values summed since its last write; its read-out ``O² = σ(M²)`` is
frozen between writes. The slow write sits behind ``jax.lax.cond`` on the traced step count,
so ``σ(M²)`` (a Newton–Schulz for M3) runs only at chunk boundaries and one trace serves
every step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepopt import AdamValues, Identity, IdentityValues, MultiScaleMemory, NewtonSchulz, Sign
from jax_backend._state import init_state
from jax_backend._transforms import MatrixView, apply_values, linear_memory_step, readout_map


class MultiScaleState(NamedTuple):
    """State of :func:`scale_by_multiscale_memory`; every tree is shaped like the parameters."""

    count: jax.Array                 # shape=(), int32: t of docs/math.md §0
    memory: optax.Updates            # M¹, the fast level's S; None when the fast level is stateless
    values_sq: optax.Updates         # v of AdamValues (docs/math.md §3); None otherwise
    slow_memory: optax.Updates       # M², written at t = f, 2f, …
    slow_readout: optax.Updates      # O² = σ(M²) of the last slow write; 0 before the first
    slow_accumulator: optax.Updates  # Σ V since the last slow write


def scale_by_multiscale_memory(
    memory: MultiScaleMemory,
    values: IdentityValues | AdamValues | None = None,
    readout: Identity | Sign | NewtonSchulz | None = None,
    *,
    view: MatrixView | None = None,
) -> optax.GradientTransformation:
    """Two momentum levels, each read out through σ, summed (docs/math.md §6; NL eq. 75, Alg. 1)::

        V_t = P(G_t)                                   values (docs/math.md §3)
        M¹_t = α M¹_{t−1} + η V_t;  D̃ = M¹_t (or Nesterov)   the fast level (docs/math.md §2)
        U_t = σ(D̃) + w O²                              O² from the last slow write
        A ← A + V_t
        if t ≡ 0 (mod f):  M² ← ρ M² + η₃ A;  O² ← σ(M²);  A ← 0

    with ``w = slow_weight``, ``f = period``, ``ρ = slow_momentum``, ``η₃ = slow_inner_lr``.
    The output ``U_t`` uses the *old* ``O²``: the slow level written at step ``t`` is read from
    step ``t + 1`` on (before the first write ``O² = 0``). M3's denominator is a separate
    wrapper (:func:`jax_backend.scale_by_second_moment` with ``accumulate=True``).

    σ is part of this transform (not a link after it) because the slow level's read-out
    ``σ(M²)`` is state: it is computed once per chunk and reused.

    Args:
      memory: the :class:`deepopt.MultiScaleMemory`.
      values: :class:`deepopt.IdentityValues` (None means this) or :class:`deepopt.AdamValues`.
      readout: σ for both levels (M3: Newton–Schulz); None means the identity.
      view: the matrix view; needed by a Newton–Schulz read-out.
    """
    fast, period = memory.fast, memory.period
    rho, eta_slow, w = memory.slow_momentum, memory.slow_inner_lr, memory.slow_weight
    sigma_leaf = readout_map(Identity() if readout is None else readout, view=view)

    def sigma(tree):
        return tree if sigma_leaf is None else jax.tree.map(sigma_leaf, tree)

    slots = (IdentityValues() if values is None else values).state_slots() + memory.state_slots()

    def init_fn(params):
        return init_state(MultiScaleState, slots, params, view)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        values_sq, vals = apply_values(values, state.values_sq, updates, count)

        # Fast level, every step: M¹_t and its read-out D̃ (docs/math.md §2).
        fast_memory, d = linear_memory_step(fast, view, state.memory, updates, vals, count)
        # σ(D̃) + w O², with O² frozen since the last slow write (this step's write comes after).
        out = jax.tree.map(lambda o, o2: o + w * o2, sigma(d), state.slow_readout)

        # Slow level: accumulate this step's V, write at the chunk boundary.
        accumulator = jax.tree.map(jnp.add, state.slow_accumulator, vals)

        def write(operands):
            slow, _, acc = operands
            slow = jax.tree.map(lambda m2, a: rho * m2 + eta_slow * a, slow, acc)
            return slow, sigma(slow), optax.tree.zeros_like(acc)

        def keep(operands):
            return operands

        operands = (state.slow_memory, state.slow_readout, accumulator)
        if period == 1:                                  # every step is a boundary
            slow, slow_readout, accumulator = write(operands)
        else:
            slow, slow_readout, accumulator = jax.lax.cond(count % period == 0, write, keep,
                                                           operands)
        return out, MultiScaleState(count=count, memory=fast_memory, values_sq=values_sq,
                                    slow_memory=slow, slow_readout=slow_readout,
                                    slow_accumulator=accumulator)

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["MultiScaleState", "scale_by_multiscale_memory"]
