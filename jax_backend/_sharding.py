"""Sharded parameters on a JAX mesh (docs/distributed.md).

Element-wise work needs nothing: XLA runs it on each device's shard, and state created with
``zeros_like(params)`` inherits the parameters' shardings. Two things do need care:

- **State placement.** Scalars (``count``) and state with no parameter to follow (DMGD's W₁,
  W₂, ν) are created on the default device. A jitted step then returns them on the mesh, the
  input shardings of step 2 differ from step 1's, and the step compiles twice.
  :func:`place_state` puts every such leaf on the parameters' mesh, replicated.
- **Newton–Schulz on sharded matrices.** Left to the partitioner, ``X Xᵀ`` on a matrix sharded
  over rows and columns all-reduces inside every iteration. With ``ns_mesh``, the read-out pins
  its input *and* output to whole matrices (:func:`whole_matrices`): the input is gathered once,
  the iterations run with no collective, and the result goes back to the parameter's sharding
  as a local slice.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def params_mesh(params: Any) -> Mesh | None:
    """The mesh of the first parameter leaf with a ``NamedSharding`` (None: no mesh)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def place_state(state: Any, params: Any) -> Any:
    """``state`` with every array leaf that is not on the parameters' mesh replicated onto it."""
    mesh = params_mesh(params)
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return x
        sharding = x.sharding
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, state)


def with_placed_state(tx: optax.GradientTransformation, ns_mesh: Mesh | None = None) -> optax.GradientTransformation:
    """``tx`` whose ``init`` places its state on the parameters' mesh (see :func:`place_state`).

    With ``ns_mesh``, the whole-matrix Newton–Schulz leaves its result replicated or split by
    matrix, and the partitioner would carry that layout into the updated parameters. So
    ``init`` also records the parameters' shardings (by tree structure, on the host) and
    ``update`` pins each update to its parameter's sharding: the parameters keep theirs, and
    going back from whole matrices is a local slice.
    """
    init, update = tx.init, tx.update
    if ns_mesh is None:
        return tx._replace(init=lambda params: place_state(init(params), params))
    recorded: dict[Any, list] = {}

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        recorded[treedef] = [(getattr(x, "shape", None), getattr(x, "sharding", None)) for x in leaves]
        return place_state(init(params), params)

    def update_fn(updates, state, params=None, **extra):
        updates, state = update(updates, state, params, **extra)
        leaves, treedef = jax.tree.flatten(updates)
        known = recorded.get(treedef)
        if known is not None and all(getattr(u, "shape", None) == shape for u, (shape, _) in zip(leaves, known)):
            leaves = [jax.lax.with_sharding_constraint(u, sh) if isinstance(sh, NamedSharding) else u
                      for u, (_, sh) in zip(leaves, known)]
            updates = jax.tree.unflatten(treedef, leaves)
        return updates, state

    return tx._replace(init=init_fn, update=update_fn)


def check_mesh(ns_mesh: Any) -> Mesh | None:
    """Validate ``compile``'s ``ns_mesh`` argument."""
    if ns_mesh is not None and not isinstance(ns_mesh, Mesh):
        raise TypeError(f"ns_mesh must be a jax.sharding.Mesh (the parameters' mesh) or None, "
                        f"got {type(ns_mesh).__name__}")
    return ns_mesh


def whole_matrices(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of a stack ``(..., m, n)`` in which every device holds whole matrices.

    The first batch axis (stacked layers, heads) is split over all of the mesh's devices when
    it divides evenly, so each device orthogonalises its share; otherwise every device holds
    every matrix (computing them redundantly, but with no collective inside the iterations).
    """
    if len(shape) > 2 and shape[0] % mesh.size == 0:
        return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    return NamedSharding(mesh, PartitionSpec())
