"""Routing: which leaves of a pytree take a spec's rule and which its fallback.

A leaf's name is its pytree key path joined with dots — dict keys, sequence indices and
attribute names (``{"params": {"embed": {"w": x}}}`` → ``"params.embed.w"``, a list index
→ ``"0"``) — so ``deepopt.Routing`` gives the same assignment as on torch's
``named_parameters()``. The split itself is ``optax.partition``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepopt import Spec


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    """The dotted name of a pytree key path."""
    return ".".join(_key_name(k) for k in path)


def param_labels(spec: Spec) -> Callable[[optax.Params], Any]:
    """``params ↦`` a pytree of ``"rule"`` / ``"fallback"`` labels, by ``spec.route``.

    Only names and shapes are read, so it works on params, gradients or abstract values
    alike (``optax.partition`` calls it on the updates). ``spec.route`` raises ``ValueError``
    for a leaf a matrix rule cannot take when there is no fallback.
    """
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: spec.route(path_name(path), tuple(np.shape(x))), params)
    return labels


def route(spec: Spec, rule: optax.GradientTransformation,
          fallback: optax.GradientTransformation | None) -> optax.GradientTransformation:
    """Send each leaf to ``rule`` or ``fallback`` (``optax.partition`` on :func:`param_labels`).

    Without a fallback the rule takes every leaf; the labels are still computed at ``init`` so
    that a leaf the rule cannot take (ndim < 2 for a matrix rule) fails early and clearly.
    """
    labels = param_labels(spec)
    tx = (optax.with_extra_args_support(rule) if fallback is None
          else optax.partition({"rule": rule, "fallback": fallback}, labels))

    def init_fn(params):
        check_leaves(spec, params)
        labels(params)                                  # validate the assignment
        return tx.init(params)
    return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def check_leaves(spec: Spec, params: optax.Params) -> None:
    """Refuse leaves deepopt does not optimise, naming them: complex ones (as torch_backend
    does: the rules' squares and Newton–Schulz are written for real numbers) and integer or
    boolean ones (no gradient step exists for them)."""
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(f"deepopt.{spec.name}: leaf {path_name(path)!r} is complex ({dtype}); deepopt "
                             "optimises real parameters: split it into real and imaginary parts "
                             "(e.g. optax.contrib.split_real_and_imaginary) or use a real view")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"deepopt.{spec.name}: leaf {path_name(path)!r} has dtype {dtype}, not a "
                             "floating-point dtype; leave it out of the optimised tree (e.g. with "
                             "optax.partition and optax.set_to_zero)")


__all__ = ["check_leaves", "param_labels", "path_name", "route"]
