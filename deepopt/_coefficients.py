"""Newton–Schulz coefficient presets (docs/math.md §4).

Each preset is a per-step table of odd-polynomial coefficients ``(a, b, c)``: step ``k`` maps
``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X``. A table shorter than the number of steps repeats its
last row (Amsel et al., Alg. 1).
"""

from __future__ import annotations

Triple = tuple[float, float, float]

# Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
# https://kellerjordan.github.io/posts/muon/ and https://github.com/KellerJordan/Muon/blob/master/muon.py:
# one quintic applied every step, chosen to maximise the slope at zero.
MUON: tuple[Triple, ...] = ((3.4445, -4.7750, 2.0315),)

# NL eq. 44: the cubic Newton–Schulz iteration X ← 1.5 X − 0.5 X Xᵀ X (no quintic term).
CUBIC: tuple[Triple, ...] = ((1.5, -0.5, 0.0),)

# Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm", arXiv 2505.16932, Algorithm 1: the minimax-optimal
# quintic for each step on [ℓ, 1] with ℓ = 1e-3; rows after the last repeat it (it is
# numerically (15/8, −10/8, 3/8), the classical quintic Newton–Schulz).
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# Alg. 1's safety factor for bfloat16 round-off: every polynomial but the last is evaluated at
# x / 1.01, i.e. (a, b, c) → (a/1.01, b/1.01³, c/1.01⁵), and the input is normalised by
# 1.01·‖X‖_F instead of ‖X‖_F (see ``POLAR_EXPRESS_NORM_SCALE``).
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS: tuple[Triple, ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)
POLAR_EXPRESS_NORM_SCALE = POLAR_EXPRESS_SAFETY

PRESETS: dict[str, tuple[Triple, ...]] = {
    "muon": MUON,
    "polar_express": POLAR_EXPRESS,
    "cubic": CUBIC,
}


def coefficient_schedule(table: tuple[Triple, ...], steps: int) -> tuple[Triple, ...]:
    """The coefficients used at each of ``steps`` iterations: the table, its last row repeated."""
    return tuple(table[min(k, len(table) - 1)] for k in range(steps))
