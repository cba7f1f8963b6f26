"""Property-testing toolkit for update rules: hypothesis strategies and checks (STYLE.md §12–§14).

deepopt's own test suite is built from these; they are public so that you can test your own
specs and your own implementations the same way. Importing this module needs numpy and
hypothesis only; torch and jax are imported lazily, inside the checks that use them.

Three kinds of tools:

- **Strategies** that draw what an optimizer consumes: :func:`shapes`, :func:`matrix_shapes`,
  :func:`named_params`, :func:`gradient_streams`, :func:`problems` and :func:`specs`.
- **Checks** a user calls on a spec: :func:`assert_backends_agree` (every backend gives the
  same parameters after every step), :func:`assert_reduces_to` (two specs give the same
  trajectory), :func:`assert_descends` (a small step decreases a convex quadratic) and
  :func:`assert_newton_schulz_invariants` (the read-out map is odd, scale-invariant and acts on
  singular values as its scalar polynomial).
- **Oracles**: :func:`polar_factor` (the exact ``U Vᵀ``), :func:`reference_trajectory` and
  :func:`scalar_newton_schulz` (the polynomial composition Newton–Schulz applies to each
  singular value).

A backend is the string ``"reference"``, ``"torch"`` or ``"jax"``, or any callable
``run_trajectory(spec, params, grads_stream) -> list[dict[str, np.ndarray]]`` returning the
parameters after each step (float64, torch layout) — so your own implementation can be tested
against deepopt's reference::

    >>> import numpy as np, deepopt
    >>> from deepopt import testing
    >>> spec = deepopt.sgd(lr=0.1, momentum=0.9)
    >>> params = {"w": np.ones((2, 3))}
    >>> grads = [{"w": np.full((2, 3), 0.5)}, {"w": np.full((2, 3), -1.0)}]
    >>> def my_sgd(spec, params, grads_stream):          # heavy ball, written by hand
    ...     w, buf, out = params["w"].copy(), 0.0, []
    ...     for g in grads_stream:
    ...         buf = 0.9 * buf + g["w"]
    ...         w = w - 0.1 * buf
    ...         out.append({"w": w})
    ...     return out
    >>> _ = testing.assert_backends_agree(spec, params, grads, backends=("reference", my_sgd))

Property test of your own rule (hypothesis draws shapes, hyperparameters and streams)::

    from hypothesis import given, settings
    from deepopt import testing

    @settings(max_examples=20, deadline=None)
    @given(spec=testing.specs(kinds=("muon",)), problem=testing.problems(steps=(2, 5)))
    def test_my_backend(spec, problem):
        params, grads = problem
        testing.assert_backends_agree(spec, params, grads, backends=("reference", my_backend))
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from hypothesis import strategies as st

from deepopt import reference as _reference
from deepopt._parts import NewtonSchulz
from deepopt._presets import adamw, delta_momentum, muon, sgd
from deepopt._spec import Spec, UpdateRule

Params = dict[str, np.ndarray]
Trajectory = list[Params]
RunTrajectory = Callable[[Spec, Mapping[str, np.ndarray], Sequence[Mapping[str, np.ndarray]]], Trajectory]
Backend = Union[str, RunTrajectory, tuple[str, RunTrajectory]]

__all__ = [
    "ConvexQuadratic", "assert_backends_agree", "assert_descends", "assert_newton_schulz_invariants",
    "assert_reduces_to", "gradient_streams", "matrix_shapes", "named_params", "polar_factor",
    "problems", "reference_trajectory", "resolve_backend", "run_backend", "scalar_newton_schulz",
    "shapes", "specs",
]

# ============================================================================================
# Strategies
# ============================================================================================

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
    """Shapes of parameters a matrix rule takes (``ndim ≥ 2``; MATH §0's matrix view flattens
    the trailing dims of ``(out, in, *rest)``)."""
    return shapes(max(2, min_dims), max(2, max_dims), max_side, min_side=min_side)


def _standard_normal(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(shape)


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


def problems(steps: int | tuple[int, int] = (1, 8), *, min_params: int = 1, max_params: int = 4,
             min_dims: int = 1, max_dims: int = 3, max_side: int = 6, param_scale: float = 1.0,
             grad_scale: float = 1.0):
    """Pairs ``(params, grads_stream)``: :func:`named_params` and a matching
    :func:`gradient_streams` — what :func:`assert_backends_agree` takes."""
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
    from deepopt import _presets  # dmgd/m3 are optional kinds (issue 3)
    momentum = draw(st.floats(0.5, 1.0))
    readout = draw(st.sampled_from((None, "sign", "newton_schulz")))
    return _presets.dmgd(lr=draw(_LRS), momentum=momentum, inner_lr=draw(_rate(0.5)),
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
    from deepopt import _presets
    decay = draw(st.booleans())
    high = 0.99 if decay else 1.0
    betas = (draw(_rate(high)), draw(st.floats(0.9, high)), draw(_rate(1.0)))
    return _presets.m3(lr=draw(st.floats(1e-4, 1e-2)), betas=betas, slow_weight=draw(_rate(2.0)),
                       frequency=draw(st.integers(1, 5)), eps=draw(st.floats(1e-8, 1e-6)),
                       weight_decay=draw(_DECAYS), ns_steps=draw(st.integers(1, 6)),
                       ns_coefficients=draw(_NS_COEFFICIENTS), decay=decay,
                       slow_decay=draw(st.booleans()),
                       adjust_lr_fn=draw(st.sampled_from(("none", "original", "match_rms_adamw"))))


_SPEC_STRATEGIES = {"sgd": _sgd_specs, "adamw": _adamw_specs,
                    "delta_momentum": _delta_momentum_specs, "muon": _muon_specs,
                    "dmgd": _dmgd_specs, "m3": _m3_specs}


def specs(kinds: Sequence[str] = ("sgd", "adamw", "delta_momentum", "muon")):
    """Valid specs of the named presets with hyperparameters in well-conditioned ranges.

    ``lr ∈ [1e-3, 0.1]`` (adamw ``[1e-4, 1e-2]``), momenta in ``[0, 0.99]``, weight decay 0 or
    ``[1e-3, 0.1]``; Newton–Schulz read-outs use coefficient presets or tables with 1–8 steps
    and compute in float64 (muon's ``ns_dtype`` is ``"float64"`` or ``"input"``), so that
    backends can agree to float64 rounding. Matrix specs keep their default routing (ndim ≥ 2)
    and AdamW fallback. ``"dmgd"`` (MATH §5) and ``"m3"`` (MATH §6) are also available, but not
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


# ============================================================================================
# Backends
# ============================================================================================


def reference_trajectory(spec: Spec, params: Mapping[str, np.ndarray],
                         grads_stream: Sequence[Mapping[str, np.ndarray]]) -> Trajectory:
    """The numpy reference (:mod:`deepopt.reference`) as a backend: params after each step."""
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    state = _reference.init(spec, params)
    out = []
    for grads in grads_stream:
        params, state = _reference.step(spec, params, grads, state)
        out.append({k: v.copy() for k, v in params.items()})
    return out


def _module_backend(module: str, **kwargs: Any) -> RunTrajectory:
    def run(spec, params, grads_stream):
        mod = importlib.import_module(module)           # lazily: deepopt never imports a backend
        fn = getattr(mod, "run_trajectory", None)
        if fn is None:
            raise RuntimeError(f"{module} has no run_trajectory(spec, params, grads_stream, ...)")
        return fn(spec, params, grads_stream, **kwargs)

    run.__name__ = module
    return run


def resolve_backend(backend: Backend) -> tuple[str, RunTrajectory]:
    """``(label, run_trajectory)`` for a backend name, a callable or a ``(label, callable)``.

    ``"torch"`` calls ``torch_backend.run_trajectory(spec, params, grads_stream,
    dtype="float64")``; ``"jax"`` calls ``jax_backend.run_trajectory(..., dtype="float64",
    layout="torch")``; both are imported on first use.
    """
    if isinstance(backend, tuple) and len(backend) == 2 and callable(backend[1]):
        return str(backend[0]), backend[1]
    if callable(backend):
        return getattr(backend, "__qualname__", None) or repr(backend), backend
    if backend == "reference":
        return "reference", reference_trajectory
    if backend == "torch":
        return "torch", _module_backend("torch_backend", dtype="float64")
    if backend == "jax":
        return "jax", _module_backend("jax_backend", dtype="float64", layout="torch")
    raise ValueError(f"backend={backend!r} is invalid: expected 'reference', 'torch', 'jax', a "
                     "callable run_trajectory(spec, params, grads_stream) or a (label, callable) pair")


def run_backend(backend: Backend, spec: Spec, params: Mapping[str, np.ndarray],
                grads_stream: Sequence[Mapping[str, np.ndarray]]) -> Trajectory:
    """Run one backend on private copies of the inputs and check the shape of its answer."""
    label, fn = resolve_backend(backend)
    params_in = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    grads_in = [{k: None if g is None else np.array(g, dtype=np.float64) for k, g in grads.items()}
                for grads in grads_stream]
    traj = fn(spec, copy.deepcopy(params_in), copy.deepcopy(grads_in))
    traj = list(traj)
    if len(traj) != len(grads_in):
        raise AssertionError(f"backend {label!r} returned {len(traj)} steps for a stream of "
                             f"{len(grads_in)} gradients")
    out = []
    for t, step in enumerate(traj, 1):
        if set(step) != set(params_in):
            raise AssertionError(f"backend {label!r}, step {t}: parameter names {sorted(step)} "
                                 f"differ from the input's {sorted(params_in)}")
        out.append({k: np.asarray(v, dtype=np.float64) for k, v in step.items()})
    return out


# ============================================================================================
# Comparing trajectories
# ============================================================================================


def _worst(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> tuple[bool, str]:
    """Whether ``|a − b| ≤ atol + rtol·|b|`` everywhere, and a description of the worst entry."""
    if a.shape != b.shape:
        return False, f"shapes differ: {a.shape} vs {b.shape}"
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        bad = "first" if not np.all(np.isfinite(a)) else "second"
        return False, f"non-finite values in the {bad} array"
    if a.size == 0:
        return True, ""
    err = np.abs(a - b)
    excess = err - (atol + rtol * np.abs(b))
    i = np.unravel_index(int(np.argmax(excess)), a.shape)
    rel = err / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    ok = bool(np.all(excess <= 0))
    msg = (f"max abs error {err.max():.3e}, max rel error {rel.max():.3e}; worst at index "
           f"{tuple(int(j) for j in i)}: {a[i]!r} vs {b[i]!r} (rtol={rtol:g}, atol={atol:g})")
    return ok, msg


def _compare_trajectories(traj_a: Trajectory, traj_b: Trajectory, label_a: str, label_b: str,
                          rtol: float, atol: float, context: str, suffix: str = "") -> None:
    for t, (pa, pb) in enumerate(zip(traj_a, traj_b), 1):
        for name in pa:
            ok, msg = _worst(pa[name], pb[name], rtol, atol)
            if not ok:
                raise AssertionError(f"{context}: {label_a} and {label_b} disagree after step {t} "
                                     f"on parameter {name!r} (shape {np.shape(pb[name])}): {msg}{suffix}")


def _spec_label(spec: Spec) -> str:
    return f"{spec.name}({', '.join(f'{k}={v!r}' for k, v in spec.hparams)})"


def assert_backends_agree(spec: Spec, params: Mapping[str, np.ndarray],
                          grads_stream: Sequence[Mapping[str, np.ndarray]], *,
                          backends: Sequence[Backend] = ("reference", "torch", "jax"),
                          rtol: float = 1e-9, atol: float = 1e-12) -> list[Trajectory]:
    """Every backend gives the same parameters after every step of ``grads_stream``.

    Each backend runs from the same ``params`` (name → array, torch layout) over the same
    gradients; each trajectory is compared with the first backend's, after every step, with
    ``|x − x_first| ≤ atol + rtol·|x_first|``. On failure the message names the step, the
    parameter, the two backends and the max abs / rel error. Returns the trajectories.

    >>> import numpy as np, deepopt
    >>> from deepopt import testing
    >>> spec = deepopt.adamw(lr=1e-2)
    >>> p = {"w": np.ones(3)}
    >>> def no_decay(spec, params, grads):                    # a planted bug
    ...     return testing.reference_trajectory(spec.replace(weight_decay=0.0), params, grads)
    >>> _ = testing.assert_backends_agree(spec, p, [{"w": np.ones(3)}],
    ...                                   backends=("reference", no_decay))
    Traceback (most recent call last):
    AssertionError: adamw(...): ...no_decay and reference disagree after step 1 on parameter 'w' ...
    """
    if len(backends) < 2:
        raise ValueError(f"backends={backends!r}: need at least two backends to compare")
    resolved = [resolve_backend(b) for b in backends]
    trajs = [run_backend(fn, spec, params, grads_stream) for _, fn in resolved]
    first_label = resolved[0][0]
    for (label, _), traj in zip(resolved[1:], trajs[1:]):
        _compare_trajectories(traj, trajs[0], label, first_label, rtol, atol, f"{spec.name}(...)",
                              suffix=f"; spec: {_spec_label(spec)}")
    return trajs


def assert_reduces_to(spec_a: Spec, spec_b: Spec, params: Mapping[str, np.ndarray],
                      grads_stream: Sequence[Mapping[str, np.ndarray]], *,
                      backend: Backend = "reference", rtol: float = 1e-10,
                      atol: float = 1e-13) -> None:
    """``spec_a`` and ``spec_b`` give the same trajectory (e.g. ``delta_momentum(zeta=0)`` is
    ``sgd(momentum)``); compared after every step as in :func:`assert_backends_agree`.

    >>> import numpy as np, deepopt
    >>> from deepopt import testing
    >>> p, g = {"w": np.ones((2, 2))}, [{"w": np.eye(2)}, {"w": -np.ones((2, 2))}]
    >>> testing.assert_reduces_to(deepopt.delta_momentum(0.1, 0.9, zeta=0.0),
    ...                           deepopt.sgd(0.1, 0.9), p, g)
    """
    label, fn = resolve_backend(backend)
    traj_a = run_backend(fn, spec_a, params, grads_stream)
    traj_b = run_backend(fn, spec_b, params, grads_stream)
    _compare_trajectories(traj_a, traj_b, f"{spec_a.name} (first spec)", f"{spec_b.name} (second spec)",
                          rtol, atol, f"reduction on backend {label}")


# ============================================================================================
# Descent on a convex quadratic
# ============================================================================================


@dataclass(frozen=True)
class ConvexQuadratic:
    """``f(W, c) = Σ_rows (½ w_rᵀ A w_r − b_rᵀ w_r) + ½‖c − t‖²``.

    ``W`` (``"weight"``, ``rows × dim``, torch layout) takes matrix rules; ``c`` (``"bias"``,
    ``rows``) takes the fallback. ``A`` is SPD with eigenvalues spread over ``[1, condition]``;
    the minimiser is ``W* = B A⁻¹``, ``c* = t``.
    """

    A: np.ndarray
    B: np.ndarray
    target: np.ndarray

    @classmethod
    def make(cls, dim: int = 8, rows: int = 4, condition: float = 10.0, seed: int = 0) -> ConvexQuadratic:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        eig = np.geomspace(1.0, condition, dim)
        a = (q * eig) @ q.T
        a = 0.5 * (a + a.T)
        w_star = rng.standard_normal((rows, dim)) / math.sqrt(dim)
        return cls(A=a, B=w_star @ a, target=rng.standard_normal(rows) / 2)

    def initial_params(self) -> Params:
        return {"weight": np.zeros(self.B.shape), "bias": np.zeros(self.target.shape)}

    def loss(self, params: Mapping[str, np.ndarray]) -> float:
        w, c = params["weight"], params["bias"]
        return float(0.5 * np.sum((w @ self.A) * w) - np.sum(self.B * w)
                     + 0.5 * np.sum((c - self.target) ** 2))

    def grads(self, params: Mapping[str, np.ndarray]) -> Params:
        return {"weight": params["weight"] @ self.A - self.B, "bias": params["bias"] - self.target}

    @property
    def minimum(self) -> float:
        w_star = np.linalg.solve(self.A, self.B.T).T
        return self.loss({"weight": w_star, "bias": self.target})


def assert_descends(spec: Spec, *, dim: int = 8, rows: int = 4, steps: int = 50, seed: int = 0,
                    condition: float = 10.0, backend: Backend = "reference", margin: float = 0.1,
                    last: int = 5) -> list[float]:
    """A spec decreases a well-conditioned convex quadratic (:class:`ConvexQuadratic`).

    Runs ``steps`` closed-loop steps from ``W = 0, c = 0`` with the spec's own ``lr`` (choose it
    small: plain gradient descent is stable here for ``lr < 2/condition``) and asserts that

    - the final optimality gap ``f − f*`` is at most ``(1 − margin)`` times the initial one, and
    - each of the last ``last`` losses is ≤ the initial loss (no late blow-up).

    Returns the losses ``f(x_0), …, f(x_steps)``. The reference runs step by step; any other
    backend is a ``run_trajectory`` and is replayed on the growing gradient prefix (exact for a
    deterministic optimizer, ``O(steps²)`` work).

    >>> import deepopt
    >>> from deepopt import testing
    >>> losses = testing.assert_descends(deepopt.sgd(lr=0.05, momentum=0.9))
    >>> losses[-1] < losses[0]
    True
    """
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin={margin!r} is out of range: allowed (0, 1)")
    if not 1 <= last <= steps:
        raise ValueError(f"last={last!r} is out of range: allowed [1, steps={steps}]")
    problem = ConvexQuadratic.make(dim=dim, rows=rows, condition=condition, seed=seed)
    params = problem.initial_params()
    losses = [problem.loss(params)]
    label, fn = resolve_backend(backend)
    if fn is reference_trajectory:
        state = _reference.init(spec, params)
        for _ in range(steps):
            params, state = _reference.step(spec, params, problem.grads(params), state)
            losses.append(problem.loss(params))
    else:
        start, stream = params, []
        for _ in range(steps):
            stream.append(problem.grads(params))
            params = run_backend(fn, spec, start, stream)[-1]
            losses.append(problem.loss(params))
    f_star = problem.minimum
    gap0, gap = losses[0] - f_star, losses[-1] - f_star
    where = f"{spec.name} on backend {label} ({steps} steps, lr={spec.lr:g})"
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"{where}: the loss became non-finite: {losses}")
    if not gap <= (1.0 - margin) * gap0:
        raise AssertionError(f"{where} did not descend: optimality gap {gap0:.4g} → {gap:.4g}, "
                             f"needed ≤ {(1.0 - margin) * gap0:.4g} (margin {margin:g}); "
                             f"losses {losses[0]:.4g} → {losses[-1]:.4g}")
    late = losses[-last:]
    if max(late) > losses[0]:
        raise AssertionError(f"{where}: a late loss exceeds the initial loss {losses[0]:.4g}: "
                             f"last {last} losses {late}")
    return losses


# ============================================================================================
# Newton–Schulz read-out invariants
# ============================================================================================


def polar_factor(x: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor ``U Vᵀ`` of a 2-D array (reduced SVD), in float64.

    >>> import numpy as np
    >>> from deepopt import testing
    >>> q = testing.polar_factor(np.array([[3.0, 0.0], [0.0, 0.5]]))
    >>> np.allclose(q, np.eye(2))
    True
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"polar_factor needs a 2-D array, got shape {x.shape}")
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def scalar_newton_schulz(ns: NewtonSchulz, x: np.ndarray | float) -> np.ndarray:
    """The odd polynomial composition ``p_k ∘ … ∘ p_1`` Newton–Schulz applies to each
    *normalised* singular value ``x = σ / (norm_scale · ‖X‖_F)`` (``p(x) = a x + b x³ + c x⁵``)."""
    x = np.asarray(x, dtype=np.float64)
    for a, b, c in ns.schedule:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


def _as_readout(readout: Any) -> tuple[Callable[[np.ndarray], np.ndarray], NewtonSchulz | None]:
    if isinstance(readout, Spec):
        readout = readout.rule
    if isinstance(readout, UpdateRule):
        readout = readout.readout
    if isinstance(readout, NewtonSchulz):
        ns = readout
        return (lambda x: _reference.newton_schulz(x, ns)), ns
    if callable(readout):
        return readout, None
    raise ValueError(f"readout={readout!r} is invalid: expected a NewtonSchulz, an UpdateRule or "
                     "Spec with a Newton–Schulz read-out, or a callable on 2-D arrays")


def _conditioned_matrix(rng: np.random.Generator, m: int, n: int, lo: float) -> np.ndarray:
    """``U diag(s) Vᵀ`` with singular values log-uniform in ``[lo, 1]`` (both ends included)."""
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.exp(rng.uniform(np.log(lo), 0.0, size=k))
    s[0], s[-1] = 1.0, lo
    return (u * s) @ v.T


def assert_newton_schulz_invariants(readout: Any, *,
                                    shapes: Sequence[tuple[int, int]] = ((6, 6), (4, 9), (9, 4), (1, 5)),
                                    scales: Sequence[float] = (0.5, 3.0, 1e3),
                                    min_singular: float = 0.05,
                                    band: tuple[float, float] | None | str = "auto",
                                    seed: int = 0, rtol: float = 1e-5, atol: float = 1e-7,
                                    implementation: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Invariants of a Newton–Schulz read-out map ``f`` on 2-D arrays (MATH §4).

    On matrices ``X = U diag(s) Vᵀ`` of each shape, with singular values spread over
    ``[min_singular, 1]`` times a random scale:

    - **odd**: ``f(−X) = −f(X)``;
    - **scale-invariant**: ``f(cX) = f(X)`` for ``c`` in ``scales`` (up to the ``eps`` guard of
      the normaliser, hence the tolerances);
    - **spectral** (for a :class:`~deepopt.NewtonSchulz` part): ``f(X)`` has the singular
      vectors of ``X`` (``f(X) Xᵀ`` is symmetric positive semi-definite) and singular values
      ``p(s / (norm_scale·‖X‖_F))``, the scalar composition (:func:`scalar_newton_schulz`);
    - **band**: the output's singular values lie in ``band``; ``"auto"`` uses the range of the
      scalar composition over the inputs' normalised singular values (a :class:`NewtonSchulz`
      only); ``None`` skips the check.

    ``readout`` is a :class:`~deepopt.NewtonSchulz` (evaluated by the reference), a spec or rule
    with one, or any callable on 2-D arrays (yours, or a backend's). To check your own
    implementation of a :class:`~deepopt.NewtonSchulz` part against its coefficients, pass the
    part as ``readout`` and your function as ``implementation``.

    >>> import deepopt
    >>> from deepopt import testing
    >>> testing.assert_newton_schulz_invariants(deepopt.newton_schulz("muon", 5), band=(0.6, 1.2))
    """
    fn, ns = _as_readout(readout)
    if implementation is not None:
        fn = implementation
    rng = np.random.default_rng(seed)
    for m, n in shapes:
        x = _conditioned_matrix(rng, m, n, min_singular) * float(np.exp(rng.uniform(-2, 2)))
        y = np.asarray(fn(x), dtype=np.float64)
        where = f"Newton–Schulz read-out on a {m}×{n} matrix"
        if y.shape != x.shape:
            raise AssertionError(f"{where}: output shape {y.shape} != input shape {x.shape}")
        scale_out = max(float(np.max(np.abs(y))), 1e-300)

        ok, msg = _worst(-np.asarray(fn(-x), dtype=np.float64), y, 0.0, 1e-12 * scale_out + 1e-300)
        if not ok:
            raise AssertionError(f"{where} is not odd: −f(−X) vs f(X): {msg}")
        for c in scales:
            ok, msg = _worst(np.asarray(fn(c * x), dtype=np.float64), y, rtol, atol * scale_out)
            if not ok:
                raise AssertionError(f"{where} is not scale-invariant: f({c:g}·X) vs f(X): {msg}")

        sv = np.linalg.svd(y, compute_uv=False)
        if ns is not None:
            s_in = np.linalg.svd(x, compute_uv=False)
            expected = np.sort(np.abs(scalar_newton_schulz(ns, s_in / (ns.norm_scale * np.linalg.norm(x)))))
            ok, msg = _worst(np.sort(sv), expected, rtol, atol)
            if not ok:
                raise AssertionError(f"{where}: singular values differ from the scalar polynomial "
                                     f"composition applied to the input's: {msg}")
            sym = y @ x.T
            if not np.allclose(sym, sym.T, rtol=rtol, atol=atol * np.abs(sym).max()):
                raise AssertionError(f"{where}: f(X) does not share X's singular vectors "
                                     "(f(X) Xᵀ is not symmetric)")
        lo_hi = band
        if isinstance(band, str):
            if band != "auto":
                raise ValueError(f"band={band!r} is invalid: expected 'auto', None or (low, high)")
            if ns is None:
                lo_hi = None
            else:
                grid = np.linspace(min_singular / math.sqrt(min(m, n)), 1.0, 20001) / ns.norm_scale
                vals = scalar_newton_schulz(ns, grid)
                lo_hi = (float(vals.min()), float(vals.max()))
        if lo_hi is not None:
            lo, hi = lo_hi
            tol = max(atol, 1e-9)
            if sv.min() < lo - tol or sv.max() > hi + tol:
                raise AssertionError(f"{where}: output singular values span [{sv.min():.6g}, "
                                     f"{sv.max():.6g}], outside the band [{lo:.6g}, {hi:.6g}]")
