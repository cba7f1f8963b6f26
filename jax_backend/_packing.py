"""A matrix rule's fallback with its small 1-D leaves packed into one vector per dtype.

A model's biases and norm gains are many small leaves: step_cost's ``--quick`` GPT-2 has 34 of
them, ~7K numbers in all. XLA gives each leaf of an element-wise chain its own fusions (three per
leaf for AdamW), and on the CPU each costs microseconds of runtime whatever its size: in
step_cost's ``dmgd_memory`` step the 34 leaves took ~0.8 ms, more than their bytes' worth by two
orders of magnitude (benchmarks/README.md, "Fifteenth round").

:func:`pack_small_leaves` runs the fallback's transform once on those leaves concatenated, one
vector per dtype, and keeps its state that way (:class:`PackedState`): each step concatenates the
gradients (and the parameters, for weight decay) and slices the updates back, ~7K numbers. This
is ``optax.flatten`` for the leaves where it pays: larger leaves and leaves with ndim ≥ 2 stay as
they are. Only a rule whose every part works element by element is packed (:func:`packable`): a
part that reduces over a leaf (a norm, a matrix view) would read the packed vector as one leaf.
On a mesh the state stays leaf by leaf, as the parameters are sharded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepopt import AdamValues, Identity, IdentityValues, LinearMemory, SecondMoment, Sign, UpdateRule
from jax_backend._sharding import params_mesh

#: Leaves of at most this many elements (and ndim ≤ 1) are packed. Measured on the CPU with 34
#: leaves of one size (``python -m benchmarks.packing``), packed AdamW took 0.91 of the per-leaf
#: time at 4096 numbers a leaf and 1.01–1.04 at 8192: past that, the concatenation and slices
#: cost more than the fusions they save (benchmarks/README.md, "Fifteenth round").
MAX_PACKED_SIZE = 4096


class Packed(NamedTuple):
    """A pytree split in two: ``leaves``, the tree with its packed leaves masked
    (``optax.MaskedNode``), and ``vectors``, one vector per dtype of the packed leaves."""

    leaves: Any
    vectors: tuple


class PackedState(NamedTuple):
    """State of :func:`pack_small_leaves`: the inner transform's state over :class:`Packed` trees
    (its per-parameter fields are ``Packed(leaves, vectors)``); :meth:`per_leaf` unpacks it."""

    inner: Any

    def per_leaf(self, params: Any, *, max_size: int = MAX_PACKED_SIZE) -> Any:
        """The inner state with every :class:`Packed` field laid out as ``params`` (the tree the
        state was made for, or any tree of the same structure and shapes); ``max_size`` as given
        to :func:`pack_small_leaves`."""
        layout = _Layout(params, _checked_size(max_size))
        layout.check(self.inner)
        return jax.tree.map(layout.unpack, self.inner, is_leaf=lambda x: isinstance(x, Packed))


def packable(rule: UpdateRule) -> bool:
    """Whether every part of ``rule`` works element by element on a 1-D leaf, so that the leaves
    concatenated give each leaf the update it would get alone. The parts deepopt ships and knows
    to be element-wise; a custom part (docs/extending.md) keeps its leaves apart."""
    return (type(rule.memory) is LinearMemory and type(rule.values) in (IdentityValues, AdamValues)
            and type(rule.readout) in (Identity, Sign)
            and (rule.denominator is None or type(rule.denominator) is SecondMoment)
            and rule.shape_scale == "none")


def _checked_size(max_size: Any) -> int:
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 0:
        raise ValueError(f"max_size={max_size!r} is invalid: expected an int >= 0 (the most numbers "
                         "a packed leaf holds; 0 packs nothing)")
    return int(max_size)


class _Layout:
    """Which leaves of a tree are packed, and where each lies in its dtype's vector."""

    def __init__(self, tree: Any, max_size: int = MAX_PACKED_SIZE):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.shapes = [tuple(np.shape(x)) for x in leaves]
        groups: dict[Any, list[int]] = {}
        for i, (x, shape) in enumerate(zip(leaves, self.shapes)):
            if len(shape) <= 1 and int(np.prod(shape)) <= max_size:
                groups.setdefault(jnp.dtype(jnp.result_type(x)), []).append(i)
        self.groups = tuple(tuple(idx) for idx in groups.values())
        self.sizes = tuple(sum(int(np.prod(self.shapes[i])) for i in idx) for idx in self.groups)

    def pack(self, tree: Any) -> Packed | None:
        if tree is None:
            return None
        leaves = self.treedef.flatten_up_to(tree)
        rest = list(leaves)
        for idx in self.groups:
            for i in idx:
                rest[i] = optax.MaskedNode()
        vectors = tuple(jnp.concatenate([jnp.reshape(leaves[i], -1) for i in idx]) for idx in self.groups)
        return Packed(self.treedef.unflatten(rest), vectors)

    def unpack(self, packed: Any) -> Any:
        if not isinstance(packed, Packed):
            return packed
        leaves = self.treedef.flatten_up_to(packed.leaves)
        for idx, vector in zip(self.groups, packed.vectors):
            start = 0
            for i in idx:
                size = int(np.prod(self.shapes[i]))
                leaves[i] = vector[start:start + size].reshape(self.shapes[i])
                start += size
        return self.treedef.unflatten(leaves)

    def check(self, inner_state: Any) -> None:
        """Raise if ``inner_state``'s packed fields were made for other leaves than these."""
        for field in jax.tree.leaves(inner_state, is_leaf=lambda x: isinstance(x, Packed)):
            if isinstance(field, Packed):
                sizes = tuple(int(np.shape(v)[0]) for v in field.vectors)
                if sizes != self.sizes:
                    raise ValueError(
                        f"the state's packed vectors hold {sizes} numbers per dtype, but the updates' "
                        f"small 1-D leaves hold {self.sizes}: the state was made (init) for another tree "
                        "(or another max_size)")
                return


def pack_small_leaves(inner: optax.GradientTransformation, *,
                      max_size: int = MAX_PACKED_SIZE) -> optax.GradientTransformationExtraArgs:
    """``inner`` run on a tree whose leaves of ndim ≤ 1 and at most ``max_size`` elements are
    packed into one vector per dtype (see the module's docstring); the updates come back in the
    tree's own layout. ``inner`` must work element by element (:func:`packable`).

    Off a mesh the state is a :class:`PackedState`; on one (sharded parameters) it is ``inner``'s
    own, leaf by leaf.
    """
    max_size = _checked_size(max_size)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        if params_mesh(params) is not None:
            return inner.init(params)
        return PackedState(inner.init(_Layout(params, max_size).pack(params)))

    def update_fn(updates, state, params=None, **extra):
        if not isinstance(state, PackedState):
            return inner.update(updates, state, params, **extra)
        layout = _Layout(updates, max_size)
        layout.check(state.inner)
        packed, inner_state = inner.update(layout.pack(updates), state.inner, layout.pack(params), **extra)
        return layout.unpack(packed), PackedState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["MAX_PACKED_SIZE", "Packed", "PackedState", "pack_small_leaves", "packable"]
