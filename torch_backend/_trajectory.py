"""``run_trajectory``: the backend-comparison protocol used by ``deepopt.testing``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from deepopt import Spec
from torch_backend._optimizer import DeepOptimizer

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def run_trajectory(spec: Spec, params: Mapping[str, np.ndarray],
                   grads_stream: Sequence[Mapping[str, np.ndarray | None]], *,
                   dtype: str = "float64", foreach: bool | None = None) -> list[dict[str, np.ndarray]]:
    """Run the compiled optimizer over a stream of named gradients (torch layout).

    Returns the parameters after each step as float64 numpy arrays. A gradient that is missing
    or None leaves its parameter (and state) untouched that step, as torch does.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed {sorted(_DTYPES)}")
    tensors = {n: torch.tensor(np.asarray(p), dtype=_DTYPES[dtype]) for n, p in params.items()}
    opt = DeepOptimizer(list(tensors.items()), spec, foreach=foreach)
    out = []
    for grads in grads_stream:
        for n, t in tensors.items():
            g = grads.get(n)
            t.grad = None if g is None else torch.tensor(np.asarray(g), dtype=_DTYPES[dtype])
        opt.step()
        out.append({n: t.detach().numpy().astype(np.float64) for n, t in tensors.items()})
    return out
