"""``run_trajectory``: the backend-comparison protocol used by ``deepopt.testing``."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepopt import Spec
from jax_backend._compile import compile

_DTYPES = ("float64", "float32")


@functools.lru_cache(maxsize=64)
def _jitted_step(spec: Spec, layout: str):
    """``compile(spec)`` and its jitted step, shared by runs of the same (hashable) spec, so a
    test that replays one spec on many streams traces once per leaf structure and dtype."""
    tx = compile(spec, layout=layout)

    @jax.jit
    def step(p, g, state):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    return tx, step


def run_trajectory(spec: Spec, params: Mapping[str, np.ndarray],
                   grads_stream: Sequence[Mapping[str, np.ndarray | None]], *,
                   dtype: str = "float64", layout: str = "torch") -> list[dict[str, np.ndarray]]:
    """Run ``compile(spec, layout=layout)`` (jitted) over a stream of named gradients.

    Args:
      spec: the deepopt spec.
      params: flat ``name → array``; names are what routing sees (``"0.weight"``).
      grads_stream: one ``name → gradient`` mapping per step. A missing or ``None`` gradient
        leaves that parameter *and its state* untouched for the step (as torch and
        ``deepopt.reference`` do).
      dtype: ``"float64"`` or ``"float32"``. ``"float64"`` turns on
        ``jax.config.update("jax_enable_x64", True)`` — a process-wide JAX setting.
      layout: matrix view, ``"torch"`` by default so that the arrays compared with
        ``torch_backend`` and the reference are the same arrays.

    Returns:
      The parameters after each step, as float64 numpy arrays.

    Each parameter is stepped as its own one-leaf pytree ``{name: p}`` with its own state:
    every deepopt rule is per-parameter, and this keeps a per-parameter step count ``t`` when
    gradients go missing (optax's single ``count`` would advance for all leaves).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {_DTYPES}")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    tx, step = _jitted_step(spec, layout)
    current = {n: {n: jnp.asarray(np.asarray(p), dtype=dtype)} for n, p in params.items()}
    states = {n: tx.init(leaf) for n, leaf in current.items()}
    out = []
    for grads in grads_stream:
        for n, leaf in current.items():
            g = grads.get(n)
            if g is None:
                continue
            current[n], states[n] = step(leaf, {n: jnp.asarray(np.asarray(g), dtype=dtype)},
                                         states[n])
        out.append({n: np.asarray(leaf[n], dtype=np.float64) for n, leaf in current.items()})
    return out


__all__ = ["run_trajectory"]
