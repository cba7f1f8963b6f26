"""Zero optax state from a rule's state slots (:mod:`deepopt._state`), for every transform.

A transform's state is a ``NamedTuple`` with a scalar ``count`` (the optax idiom for the step
count ``t``) and one pytree per slot of the parts it runs, each field named by its slot's key
(the same key as torch's state dict and the reference). :func:`init_state` builds it, so the
keys, shapes and initial values come from the parts' ``state_slots()`` alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from deepopt import Slot
from jax_backend._routing import path_name


def slot_tree(slot: Slot, params: Any, view: Any = None) -> Any:
    """The zero (or initial) pytree of one slot over ``params``.

    Slots shaped like the parameters are ``zeros_like`` (they inherit each leaf's sharding);
    per-matrix slots are one entry per matrix view of each leaf (``view``, a
    :class:`~jax_backend._transforms.MatrixView`), with the leaf's batch axes in front, drawn
    from the slot's initializer with the leaf's dotted path as its name.
    """
    if slot.like_param and slot.init is None:
        return optax.tree.zeros_like(params)

    def leaf(path, p):
        name = path_name(path)
        if view is None or len(p.shape) < 2:
            raise ValueError(f"state {slot.key!r} is kept per matrix view, so it needs leaves with "
                             f"ndim ≥ 2; {name!r} has shape {tuple(p.shape)} (route it to a fallback)")
        m, n = view.mn(p.shape)
        shape = slot.shape(p.shape, m, n)
        if slot.init is None:
            return jnp.zeros((*view.batch_shape(p.shape), *shape), p.dtype)
        value = jnp.asarray(slot.initial(name, shape), dtype=p.dtype)
        return jnp.broadcast_to(value, (*view.batch_shape(p.shape), *shape))

    return jax.tree_util.tree_map_with_path(leaf, params)


def init_state(state_type: type, slots: tuple[Slot, ...], params: Any, view: Any = None,
               **fields: Any) -> Any:
    """``state_type(count=0, <one tree per slot>, **fields)``; a field that no slot (and no
    keyword) fills is ``None``. The step slot is the ``count``."""
    trees = {slot.key: slot_tree(slot, params, view) for slot in slots if slot.key != "step"}
    unknown = sorted(set(trees) - set(state_type._fields))
    if unknown:
        raise TypeError(f"{state_type.__name__} has no field for the state slot(s) {unknown}")
    trees.update(fields)
    return state_type(count=jnp.zeros([], jnp.int32),
                      **{f: trees.get(f) for f in state_type._fields if f != "count"})


__all__ = ["init_state", "slot_tree"]
