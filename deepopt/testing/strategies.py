"""Hypothesis strategies that draw what an optimizer consumes.

:func:`shapes`, :func:`matrix_shapes`, :func:`named_params`, :func:`gradient_streams`,
:func:`problems` (parameters with a matching gradient stream) and :func:`specs` (valid specs of
the presets with well-conditioned hyperparameters). Needs hypothesis; the checks they feed
(:mod:`deepopt.testing.checks`) do not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from deepopt._presets import adamw, delta_momentum, dmgd, m3, muon, sgd

__all__ = ["gradient_scales", "gradient_streams", "matrix_shapes", "named_params", "problems", "shapes",
           "specs"]

_SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 6, *, min_side: int = 1):
    """Array shapes with ``min_dims ≤ ndim ≤ max_dims`` and sides in ``[min_side, max_side]``.

    >>> from deepopt import testing
    >>> s = testing.shapes(min_dims=2, max_dims=2, max_side=4).example()
    >>> len(s) == 2 and all(1 <= d <= 4 for d in s)
    True
    """
    if not 0 <= min_dims <= max_dims:
        raise ValueError(f"need 0 ≤ min_dims ≤ max_dims; got min_dims={min_dims}, max_dims={max_dims}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 ≤ min_side ≤ max_side; got min_side={min_side}, max_side={max_side}")
    side = st.integers(min_side, max_side)
    return st.integers(min_dims, max_dims).flatmap(lambda d: st.tuples(*([side] * d)))


def matrix_shapes(min_dims: int = 2, max_dims: int = 3, max_side: int = 6, *, min_side: int = 1):
    """Shapes of parameters a matrix rule takes (``ndim ≥ 2``; docs/math.md §0's matrix view flattens
    the trailing dims of ``(out, in, *rest)``)."""
    return shapes(max(2, min_dims), max(2, max_dims), max_side, min_side=min_side)


def _param_name(i: int, ndim: int) -> str:
    return f"layer{i}." + {0: "scale", 1: "bias", 2: "weight"}.get(ndim, "kernel")


def named_params(min_params: int = 1, max_params: int = 4, *, min_dims: int = 1, max_dims: int = 3,
                 max_side: int = 6, scale: float = 1.0, ensure_matrix: bool = True):
    """Dicts ``name → float64 array``, like a small model's ``named_parameters()``.

    Names are ``layer{i}.bias`` (1-D), ``layer{i}.weight`` (2-D) and ``layer{i}.kernel``
    (3-D and up, a conv kernel in torch layout). With ``ensure_matrix`` (and ``max_dims ≥ 2``)
    at least one parameter has 2 or more dims, so routing always has a matrix to route.
    Values are ``scale·N(0, 1)`` from a drawn seed (fast, finite, reproducible).

    >>> from deepopt import testing
    >>> p = testing.named_params(max_params=3).example()
    >>> any(a.ndim >= 2 for a in p.values()) and all(a.dtype == "float64" for a in p.values())
    True
    """

    @st.composite
    def params(draw):
        shape_list = draw(st.lists(shapes(min_dims, max_dims, max_side), min_size=min_params,
                                   max_size=max_params))
        if ensure_matrix and max_dims >= 2 and not any(len(s) >= 2 for s in shape_list):
            shape_list.append(draw(matrix_shapes(2, max_dims, max_side)))
        seed = draw(_SEEDS)
        rng = np.random.default_rng(seed)
        return {_param_name(i, len(s)): scale * rng.standard_normal(s) for i, s in enumerate(shape_list)}

    return params()


def _steps_range(steps: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (steps, steps) if isinstance(steps, int) else steps
    if not 1 <= lo <= hi:
        raise ValueError(f"steps={steps!r} is invalid: expected an int ≥ 1 or a pair 1 ≤ lo ≤ hi")
    return lo, hi


def gradient_streams(shapes_or_params: Mapping[str, Any], steps: int | tuple[int, int] = (1, 8),
                     *, scale: float = 1.0, jitter: bool = True):
    """Gradient streams for the parameters ``shapes_or_params`` (name → array or shape).

    Draws a list of ``steps`` dicts ``name → float64 array`` (``steps`` an int or a range
    ``(lo, hi)``). Entries are ``scale·c_t·N(0, 1)``, finite and not all zero; with ``jitter``
    each step has its own factor ``c_t ∈ [1/4, 4]`` (otherwise 1), so that rules which
    normalise (Newton–Schulz, delta momentum's keys, Adam) see gradients of varying size.

    >>> from deepopt import testing
    >>> stream = testing.gradient_streams({"w": (3, 2), "b": (3,)}, steps=4).example()
    >>> len(stream), stream[0]["w"].shape, stream[0]["b"].shape
    (4, (3, 2), (3,))
    """
    shape_of = {name: tuple(np.shape(v)) if not isinstance(v, tuple) else v
                for name, v in shapes_or_params.items()}
    lo, hi = _steps_range(steps)
    factor = st.floats(0.25, 4.0) if jitter else st.just(1.0)

    @st.composite
    def stream(draw):
        n = draw(st.integers(lo, hi))
        factors = draw(st.lists(factor, min_size=n, max_size=n))
        rng = np.random.default_rng(draw(_SEEDS))
        return [{name: scale * c * rng.standard_normal(shape) for name, shape in shape_of.items()}
                for c in factors]

    return stream()


def gradient_scales(low: float = 1e-6, high: float = 1e6, *, powers_of_two: bool = False):
    """Positive gradient scales, log-uniform in ``[low, high]``.

    With ``powers_of_two`` they are exact powers of two in that range: multiplying by one is
    exact in floating point, so a rule homogeneous of degree d in the gradient must give
    *bit-identical* results up to the factor ``c^d`` (see ``tests/test_scale_stability.py``).

    >>> from deepopt import testing
    >>> 1e-6 <= testing.gradient_scales().example() <= 1e6
    True
    """
    if not 0 < low <= high < float("inf"):
        raise ValueError(f"low={low!r}, high={high!r} are invalid: expected 0 < low ≤ high < inf")
    lo, hi = math.log2(low), math.log2(high)
    if powers_of_two:
        return st.integers(math.ceil(lo), math.floor(hi)).map(lambda k: 2.0**k)
    return st.floats(lo, hi).map(lambda e: float(2.0**e))


def problems(steps: int | tuple[int, int] = (1, 8), *, min_params: int = 1, max_params: int = 4,
             min_dims: int = 1, max_dims: int = 3, max_side: int = 6, param_scale: float = 1.0,
             grad_scale: float = 1.0):
    """Pairs ``(params, grads_stream)``: :func:`named_params` and a matching
    :func:`gradient_streams` — what :func:`~deepopt.testing.assert_backends_agree` takes."""
    return named_params(min_params, max_params, min_dims=min_dims, max_dims=max_dims,
                        max_side=max_side, scale=param_scale).flatmap(
        lambda p: st.tuples(st.just(p), gradient_streams(p, steps, scale=grad_scale)))


# -- hyperparameters of the presets, in well-conditioned ranges --------------------------------

def _rate(high: float):
    """Exactly 0, or a value in [1e-3, high]: never subnormal or near-underflow, where numpy
    keeps gradual underflow and XLA flushes to zero (``sign`` of a flushed 1e-311 is 0)."""
    return st.one_of(st.just(0.0), st.floats(1e-3, high))


_LRS = st.floats(1e-3, 0.1)
_DECAYS = st.one_of(st.just(0.0), st.floats(1e-3, 0.1))
_MOMENTA = st.one_of(st.just(0.0), _rate(0.99))
_NS_COEFFICIENTS = st.sampled_from(("muon", "polar_express", "cubic", (3.4445, -4.775, 2.0315),
                                    ((2.0, -1.5, 0.5), (1.5, -0.5, 0.0))))


@st.composite
def _sgd_specs(draw):
    momentum = draw(_MOMENTA)
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), _rate(0.5)))
    return sgd(lr=draw(_LRS), momentum=momentum, dampening=dampening, nesterov=nesterov,
               weight_decay=draw(_DECAYS), maximize=draw(st.booleans()),
               decoupled_weight_decay=draw(st.booleans()), undamped_first_step=draw(st.booleans()))


@st.composite
def _adamw_specs(draw):
    betas = (draw(_rate(0.99)), draw(st.floats(0.9, 0.9999)))
    return adamw(lr=draw(st.floats(1e-4, 1e-2)), betas=betas, eps=draw(st.floats(1e-8, 1e-6)),
                 weight_decay=draw(_DECAYS), nesterov=draw(st.booleans()), maximize=draw(st.booleans()))


@st.composite
def _delta_momentum_specs(draw):
    momentum = draw(_rate(0.99))
    zeta = draw(st.one_of(st.none(), _rate(1.0 + momentum)))
    readout = draw(st.sampled_from(("identity", "sign", "newton_schulz")))
    return delta_momentum(lr=draw(_LRS), momentum=momentum, zeta=zeta, nesterov=draw(st.booleans()),
                          weight_decay=draw(_DECAYS), readout=readout,
                          ns_coefficients=draw(_NS_COEFFICIENTS), ns_steps=draw(st.integers(1, 8)),
                          adjust_lr_fn=draw(st.sampled_from((None, "match_rms_adamw", "none"))),
                          decoupled_weight_decay=draw(st.booleans()))


@st.composite
def _muon_specs(draw):
    momentum = draw(_rate(0.99))
    return muon(lr=draw(_LRS), weight_decay=draw(_DECAYS), momentum=momentum,
                nesterov=draw(st.booleans()), ns_coefficients=draw(_NS_COEFFICIENTS),
                ns_steps=draw(st.integers(1, 8)),
                adjust_lr_fn=draw(st.sampled_from((None, "original", "match_rms_adamw", "none"))),
                ns_normalization=draw(st.sampled_from(("clamp", "add"))),
                ns_dtype=draw(st.sampled_from(("float64", "input"))),
                bias_correction=draw(st.booleans()))


@st.composite
def _dmgd_specs(draw):
    momentum = draw(st.floats(0.5, 1.0))
    readout = draw(st.sampled_from((None, "sign", "newton_schulz")))
    return dmgd(lr=draw(_LRS), momentum=momentum, inner_lr=draw(_rate(0.5)),
                         hidden=draw(st.sampled_from((0, 1, 4, 8))),
                         objective=draw(st.sampled_from(("l2", "dot"))),
                         keys=draw(st.sampled_from(("current", "previous"))),
                         values=draw(st.sampled_from(("identity", "adam"))), readout=readout,
                         nesterov=draw(st.booleans()), weight_decay=draw(_DECAYS),
                         seed=draw(st.integers(0, 2**16)), ns_coefficients=draw(_NS_COEFFICIENTS),
                         ns_steps=draw(st.integers(1, 6)),
                         ns_dtype=draw(st.sampled_from(("float64", "input"))),
                         adjust_lr_fn=draw(st.sampled_from((None, "match_rms_adamw", "none"))))


@st.composite
def _m3_specs(draw):
    decay = draw(st.booleans())
    high = 0.99 if decay else 1.0
    betas = (draw(_rate(high)), draw(st.floats(0.9, high)), draw(_rate(1.0)))
    return m3(lr=draw(st.floats(1e-4, 1e-2)), betas=betas, slow_weight=draw(_rate(2.0)),
                       frequency=draw(st.integers(1, 5)), eps=draw(st.floats(1e-8, 1e-6)),
                       weight_decay=draw(_DECAYS), ns_steps=draw(st.integers(1, 6)),
                       ns_coefficients=draw(_NS_COEFFICIENTS), decay=decay,
                       slow_decay=draw(st.booleans()), ns_dtype=draw(st.sampled_from(("float64", "input"))),
                       adjust_lr_fn=draw(st.sampled_from(("none", "original", "match_rms_adamw"))))


_SPEC_STRATEGIES = {"sgd": _sgd_specs, "adamw": _adamw_specs,
                    "delta_momentum": _delta_momentum_specs, "muon": _muon_specs,
                    "dmgd": _dmgd_specs, "m3": _m3_specs}


def specs(kinds: Sequence[str] = ("sgd", "adamw", "delta_momentum", "muon")):
    """Valid specs of the named presets with hyperparameters in well-conditioned ranges.

    ``lr ∈ [1e-3, 0.1]`` (adamw ``[1e-4, 1e-2]``), momenta in ``[0, 0.99]``, weight decay 0 or
    ``[1e-3, 0.1]``; Newton–Schulz read-outs use coefficient presets or tables with 1–8 steps
    and compute in float64 (``ns_dtype`` ``"float64"`` or ``"input"``; muon and m3 default to bf16), so that
    backends can agree to float64 rounding. Matrix specs keep their default routing (ndim ≥ 2)
    and AdamW fallback. ``"dmgd"`` (docs/math.md §5) and ``"m3"`` (docs/math.md §6) are also available, but not
    drawn by default.

    >>> from deepopt import testing
    >>> testing.specs(kinds=("muon",)).example().name
    'muon'
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in _SPEC_STRATEGIES]
    if unknown or not kinds:
        raise ValueError(f"kinds={kinds!r} is invalid: allowed kinds are {sorted(_SPEC_STRATEGIES)}")
    return st.one_of(*(_SPEC_STRATEGIES[k]() for k in kinds))
