"""``compile``: a deepopt spec → an ``optax.GradientTransformation``.

A rule compiles to a chain, read top to bottom as ``deepopt.UpdateRule``'s docstring::

    optax.chain(
        optax.scale(-1.0),                           # maximize: G ← −G
        optax.add_decayed_weights(λ),                # coupled L2: G ← G + λW
        scale_by_second_moment(                      # ÷ (√v̂ + ε), Adam's (or M3's) denominator
            optax.chain(scale_by_linear_memory(...), #   V = P(G); S_t = S(αI − ζKᵀK) + ηV; D̃
                        scale_by_readout(...))),     #   σ(D̃)
        scale_by_shape(...),                         # × s(W)
        optax.add_decayed_weights(λ),                # decoupled: + λW
        optax.scale_by_learning_rate(γ),             # × −γ
    )

with the links a rule does not use left out. A DMGD rule's memory is ``scale_by_deep_memory``
(docs/math.md §5); an M3 rule's memory and σ are one ``scale_by_multiscale_memory`` (docs/math.md §6:
σ(D̃_fast) + w·σ(M²), whose slow read-out is state). The spec's routing splits the pytree
between the rule and its fallback (``optax.partition``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from deepopt import DeepMemory, LinearMemory, Memory, MultiScaleMemory, Spec, UpdateRule
from deepopt._validate import kernel_for
from jax_backend._deep_memory import scale_by_deep_memory
from jax_backend._multiscale import scale_by_multiscale_memory
from jax_backend._packing import pack_small_leaves, packable
from jax_backend._routing import route
from jax_backend._sharding import check_mesh, with_placed_state
from jax_backend._transforms import (
    LAYOUTS,
    MatrixView,
    scale_by_linear_memory,
    scale_by_readout,
    scale_by_second_moment,
    scale_by_shape,
)


def _is_zero(x: Any) -> bool:
    """True only for a concrete Python/numpy zero; a traced value is never inspected."""
    return isinstance(x, numbers.Real) and not hasattr(x, "aval") and float(x) == 0.0


def then_readout(scale_by_memory: Callable[..., optax.GradientTransformation]) -> Callable[..., optax.GradientTransformation]:
    """An entry of ``MEMORIES`` from a memory transform ``scale_by_memory(memory, values, *,
    view)``: the transform, then the read-out σ as the next link of the chain."""
    def numerator(memory, values, readout, view):
        return optax.chain(scale_by_memory(memory, values, view=view), scale_by_readout(readout, view=view))
    return numerator


#: Values → memory write → read-out σ(D̃), per memory class:
#: ``(memory, values, readout, view) -> optax.GradientTransformation``. M3's σ lives inside its
#: transform: the slow level's σ(M²) is state, refreshed every ``period`` steps.
MEMORIES: dict[type[Memory], Callable[..., optax.GradientTransformation]] = {
    LinearMemory: then_readout(scale_by_linear_memory),
    # The state as stacks per bucket, unless a matrix read-out (Newton–Schulz) follows: there the
    # stacks measured slower (jax_backend/_deep_memory.py's docstring).
    DeepMemory: lambda memory, values, readout, view: optax.chain(
        scale_by_deep_memory(memory, values, view=view, stacks=not readout.needs_matrix),
        scale_by_readout(readout, view=view)),
    MultiScaleMemory: lambda memory, values, readout, view: scale_by_multiscale_memory(
        memory, values, readout, view=view),
}


def _numerator(rule: UpdateRule, view: MatrixView | None) -> optax.GradientTransformation:
    """Values → memory write → read-out σ(D̃) (plus M3's slow term), before any denominator."""
    build = kernel_for(MEMORIES, rule.memory, "jax_backend._compile.MEMORIES")
    return build(rule.memory, rule.values, rule.readout, view)


def compile_rule(rule: UpdateRule, learning_rate: optax.ScalarOrSchedule, weight_decay: Any,
                 view: MatrixView | None) -> optax.GradientTransformation:
    """One :class:`deepopt.UpdateRule` as an optax chain ending in ``scale_by_learning_rate``."""
    decay = [] if _is_zero(weight_decay) else [optax.add_decayed_weights(weight_decay)]
    numerator = _numerator(rule, view)
    if rule.denominator is not None:
        numerator = scale_by_second_moment(rule.denominator, numerator)
    return optax.chain(
        *([optax.scale(-1.0)] if rule.maximize else []),
        *([] if rule.decoupled_weight_decay else decay),
        numerator,
        scale_by_shape(rule.shape_scale, view=view),
        # Decoupled decay with the unadjusted γ (docs/math.md §0, as torch.optim.Muon and optax).
        *(decay if rule.decoupled_weight_decay else []),
        optax.scale_by_learning_rate(learning_rate),
    )


def compile(  # the public name mirrors torch_backend.compile
    spec: Spec,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    weight_decay: Any = None,
    layout: str = "optax",
    ns_mesh: Any = None,
) -> optax.GradientTransformation:
    r"""Compile a deepopt spec to an ``optax.GradientTransformation``.

    Symbols: γ = ``learning_rate`` (spec ``lr``), λ = ``weight_decay``; the rest of the rule
    (α, η, ζ, values, σ, s) is read from ``spec.rule`` (see ``deepopt.UpdateRule``).

    Initial state: every memory, values and second-moment buffer at zero (DMGD's W₁ aside),
    ``count = 0``;
    a stateless memory (α = ζ = 0, no bias correction) keeps no per-parameter buffer.

    Update per leaf at step t (docs/math.md §0–§4; NL eq. 46–49 for the memory write)::

        V = P(G);  K = G / max(‖G‖_F, ε_k)
        S_t = S_{t−1}(α I − ζ KᵀK) + η V
        D̃ = S_t  or  α S_t + η V
        U = −γ (s(W) σ(D̃) [/ (√v̂ + ε)] + λ W)        (decoupled decay; coupled adds λW to G)

    DMGD replaces the linear write by the deep memory's inner gradient step and read
    (docs/math.md §5, :func:`jax_backend.scale_by_deep_memory`; W₁ is drawn from each leaf's dotted
    path); M3 adds ``w·σ(M²)`` of a slow level written every ``period`` steps and divides by a
    running-sum second moment (docs/math.md §6, :func:`jax_backend.scale_by_multiscale_memory`).

    Args:
      spec: a ``deepopt.Spec`` (``deepopt.sgd``, ``adamw``, ``delta_momentum``, ``muon``,
        ``dmgd``, ``m3``, ``custom``).
      learning_rate: overrides ``spec.hyperparameters["lr"]``: a float ≥ 0, an optax schedule
        (a function of the step count), or a traced scalar (so the result can live inside
        ``optax.inject_hyperparams``). The fallback runs at ``spec.fallback_lr_ratio`` times
        it, as in torch.
      weight_decay: overrides ``spec.hyperparameters["weight_decay"]`` for the main rule (a
        float or a traced scalar); the fallback keeps its own.
      layout: the matrix view of leaves with ndim ≥ 2 (docs/math.md §0). ``"optax"`` (default) follows
        ``optax.contrib.MuonDimensionNumbers``: axes ``(..., in, out)``, leading axes are a
        batch of independent matrices, the matrix view is ``out × in``. ``"torch"`` reads
        ``(out, in, *rest)`` as one ``out × in·prod(rest)`` matrix, as ``deepopt.reference``
        and ``torch_backend`` do.
      ns_mesh: for parameters sharded on a ``jax.sharding.Mesh``, that mesh: Newton–Schulz then
        runs on whole matrices (its input gathered once, its output pinned alike), so no
        collective remains inside its iterations; stacked matrices split over the devices
        (docs/distributed.md). Without it the partitioner shards the iterations' matmuls.
        Either way ``init`` places its state on the parameters' mesh, so a jitted step
        compiles once.

    Returns:
      An ``optax.GradientTransformation`` (updates are added with ``optax.apply_updates``);
      it needs ``params`` in ``update`` whenever λ ≠ 0, as ``optax.add_decayed_weights`` does.

    Example::

        tx = jax_backend.compile(deepopt.muon(lr=0.02))
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)

    Conventions: γ enters last (``scale_by_learning_rate``), so an optax schedule sees the
    step count; memories start at zero; decoupled decay uses the unadjusted γ; Nesterov with
    bias correction takes optax's NAdam form. Routing names are dotted key paths
    (``"params.embed.w"``). ``None`` leaves pass through as in optax. Off a mesh, an
    element-wise fallback runs once on its small 1-D leaves packed into one vector per dtype,
    and keeps their state so (:class:`jax_backend.PackedState`; ``jax_backend/_packing.py``).

    Raises:
      ValueError: ``layout`` is not ``"optax"`` or ``"torch"``; a concrete ``learning_rate`` or
        ``weight_decay`` is not a finite number ≥ 0; at ``init``, a leaf is complex or not a
        float (named), or one with ndim < 2 would reach a matrix rule with no fallback.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: expected one of {LAYOUTS}")
    if not isinstance(spec, Spec):
        raise TypeError(f"spec={spec!r} is invalid: expected a deepopt.Spec")
    _check_rate("learning_rate", learning_rate, schedule=True)
    _check_rate("weight_decay", weight_decay, schedule=False)
    ns_mesh = check_mesh(ns_mesh)
    view = MatrixView(layout, ns_mesh=ns_mesh)
    hp = spec.hyperparameters
    rule = compile_rule(spec.rule,
                        hp["lr"] if learning_rate is None else learning_rate,
                        hp["weight_decay"] if weight_decay is None else weight_decay,
                        view)
    fallback = None
    if spec.fallback is not None:
        fb = spec.fallback
        fb_lr = fb.lr if learning_rate is None else _scaled(learning_rate, spec.fallback_lr_ratio)
        fallback = compile_rule(fb.rule, fb_lr, fb.weight_decay, view)
        if packable(fb.rule):             # its biases and gains as one vector (jax_backend/_packing.py)
            fallback = pack_small_leaves(fallback)
    return with_placed_state(route(spec, rule, fallback), ns_mesh)


def _check_rate(name: str, value: Any, *, schedule: bool) -> None:
    """A concrete rate must be a finite number ≥ 0; schedules and traced values pass as given."""
    if value is None or isinstance(value, jax.core.Tracer) or (schedule and callable(value)):
        return
    allowed = "a number >= 0" + (", an optax schedule" if schedule else "") + " or a traced scalar"
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def _scaled(learning_rate: optax.ScalarOrSchedule, ratio: float) -> optax.ScalarOrSchedule:
    """``ratio × learning_rate`` for a number, a traced scalar or a schedule, the product taken
    in the default float dtype (float64 under x64, where a float32 schedule value times the
    ratio would round before it is applied)."""
    def scale(lr: Any) -> Any:
        if isinstance(lr, numbers.Real):
            return ratio * lr
        return ratio * jnp.asarray(lr, dtype=jnp.result_type(float))

    if callable(learning_rate):
        return lambda count: scale(learning_rate(count))
    return scale(learning_rate)


__all__ = ["MEMORIES", "compile", "compile_rule", "then_readout"]
