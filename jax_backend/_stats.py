"""``memory_stats``: what the deep part of each DMGD memory contributes (docs/math.md §5)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from deepopt import DeepMemory, Spec, reference
from jax_backend._deep_memory import DeepMemoryState
from jax_backend._routing import path_name
from jax_backend._transforms import LAYOUTS, MatrixView


def _by_name(tree: Any) -> dict[str, Any]:
    """Leaves of ``tree`` by dotted path, skipping the masked-out leaves of ``optax.partition``."""
    if tree is None:
        return {}
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    return {path_name(path): x for path, x in leaves if not isinstance(x, optax.MaskedNode)}


def memory_stats(spec: Spec, opt_state: Any, grads: Any, *,
                 layout: str = "optax") -> dict[str, dict[str, float]]:
    """Per DMGD matrix, the deep memory's diagnostics at gradient ``grads``.

    ``opt_state`` is the state of ``jax_backend.compile(spec, layout=layout)``; ``grads`` a
    gradient pytree like the params. Returns, by the leaf's dotted name (``"name[i]"`` for the
    i-th matrix of a leaf with batch axes), the numbers ``torch_backend.memory_stats`` gives:
    ``mlp_share = ‖ν f_θ(Q)‖_F / ‖S‖_F``, ``inner_loss = ‖M_φ(Q) − V‖²_F / ‖V‖²_F`` and
    ``value_scale`` ν, computed by :func:`deepopt.reference.deep_memory_stats` on the host.
    Call it outside ``jit``.

    Example::

        updates, state = tx.update(grads, state, params)
        print(jax_backend.memory_stats(spec, state, grads))
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: expected one of {LAYOUTS}")
    rule = spec.rule
    if not isinstance(rule.memory, DeepMemory):
        raise ValueError(f"spec {spec.name!r} has no deep memory: memory_stats is for DMGD specs")
    view = MatrixView(layout)
    states = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, DeepMemoryState))
              if isinstance(s, DeepMemoryState)]
    grads_by_name = _by_name(grads)
    out: dict[str, dict[str, float]] = {}
    as_matrix = lambda x: np.asarray(view.to_matrix(x), dtype=np.float64)   # (..., m, n)
    for st in states:
        st = st.per_leaf()                                     # stacks per bucket → per leaf
        fields = {f: _by_name(getattr(st, f)) for f in ("memory", "mlp_w1", "mlp_w2", "value_scale", "values_sq")}
        for name, s in fields["memory"].items():
            g = grads_by_name.get(name)
            if g is None:
                continue
            mats = {"memory": as_matrix(s), "grad": as_matrix(g)}
            if name in fields["values_sq"]:
                mats["values_sq"] = as_matrix(fields["values_sq"][name])
            batch = mats["memory"].shape[:-2]
            for idx in np.ndindex(*batch):
                state = {key: mats[key][idx] for key in ("memory", "values_sq") if key in mats}
                state["step"] = int(st.count)
                for key in ("mlp_w1", "mlp_w2", "value_scale"):
                    if name in fields[key]:
                        state[key] = np.asarray(fields[key][name], dtype=np.float64)[idx]
                label = name if not batch else f"{name}[{', '.join(map(str, idx))}]"
                out[label] = reference.deep_memory_stats(rule, state, mats["grad"][idx])
    return out


__all__ = ["memory_stats"]
