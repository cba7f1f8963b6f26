"""The one Newton–Schulz of the JAX backend (docs/math.md §4), used by every rule.

Works on a stack of matrix views ``(..., m, n)``: the leading axes are a batch (stacked heads,
experts, scanned layers) and are carried by ``jnp.matmul``'s broadcasting, so every matrix is
orthogonalised independently without a Python loop over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepopt import NewtonSchulz


def compute_dtype(ns: NewtonSchulz, input_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype the iteration runs in: the input's (optax) or the one ``ns.dtype`` names."""
    return jnp.dtype(input_dtype) if ns.dtype == "input" else jnp.dtype(ns.dtype)


def newton_schulz(x: jax.Array, ns: NewtonSchulz) -> jax.Array:
    """Orthogonalise each ``m × n`` matrix of ``x`` (shape ``(..., m, n)``) by ``ns``.

    ``X₀ = X / (norm_scale·‖X‖_F ⊕ eps)`` (``⊕`` is ``max`` for ``"clamp"``, ``+`` for
    ``"add"``), then per step ``k`` with ``(a, b, c) = ns.schedule[k]``:
    ``A = X Xᵀ``, ``B = bA + cA²``, ``X ← aX + BX``. The iteration runs in
    :func:`compute_dtype` and the result is cast back to ``x.dtype``.
    """
    out_dtype = x.dtype
    x = x.astype(compute_dtype(ns, x.dtype))
    m, n = x.shape[-2:]
    # Iterate on the short side so the Gram matrix A is min(m, n)²; NS(Xᵀ) = NS(X)ᵀ.
    transposed = m > n
    if transposed:
        x = jnp.swapaxes(x, -1, -2)

    # Normalise each matrix of the batch by its own Frobenius norm (‖X‖₂ ≤ ‖X‖_F ≤ 1 after).
    norm = ns.norm_scale * jnp.linalg.norm(x, axis=(-2, -1), keepdims=True)
    x = x / (jnp.maximum(norm, ns.eps) if ns.normalization == "clamp" else norm + ns.eps)

    # The schedule is static (a Python tuple), so the loop unrolls at trace time: one
    # straight-line program per (shape, schedule), which vmaps and fuses well.
    for a, b, c in ns.schedule:
        gram = x @ jnp.swapaxes(x, -1, -2)              # A = X Xᵀ       : m×n · n×m
        poly = b * gram + c * (gram @ gram)             # B = bA + cA²   : m×m · m×m
        x = a * x + poly @ x                            # X ← aX + BX    : m×m · m×n

    if transposed:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)
