"""The one Newton–Schulz of the torch backend (docs/math.md §4), batched over a leading dimension."""

from __future__ import annotations

import torch

from deepopt import NewtonSchulz

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(x: torch.Tensor, ns: NewtonSchulz) -> torch.Tensor:
    """Orthogonalise each ``m × n`` matrix of ``x: (B, m, n)``; returns ``(B, m, n)`` in x's dtype.

    Same op order as ``torch.optim.Muon`` (``addmm`` with β/α) so that the bf16 path tracks it.
    """
    out_dtype = x.dtype
    x = x.to(DTYPES.get(ns.dtype, x.dtype))
    transposed = x.size(-2) > x.size(-1)
    if transposed:                                           # iterate on the short side: A is m×m
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)
    if ns.norm_scale != 1.0:
        norm = norm * ns.norm_scale
    x = x / (norm.clamp(min=ns.eps) if ns.normalization == "clamp" else norm + ns.eps)
    if x.size(0) == 1:
        # A batch of one takes torch's 2-D kernels (addmm), cheaper than baddbmm for small m.
        x = x[0]
        for a, b, c in ns.schedule:
            gram = x @ x.T                                   # A = X Xᵀ       : (m, m)
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)     # B = bA + cA²   : (m, m)
            x = torch.addmm(x, poly, x, beta=a)              # X ← aX + BX    : (m, n)
        x = x[None]
    else:
        for a, b, c in ns.schedule:
            gram = torch.bmm(x, x.mT)                        # A = X Xᵀ       : (B, m, m)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)   # B = bA + cA²   : (B, m, m)
            x = torch.baddbmm(x, poly, x, beta=a)            # X ← aX + BX    : (B, m, n)
    if transposed:
        x = x.mT
    return x.to(out_dtype)
