"""Checks and oracles for update rules: assertions you call on a spec or on your own backend.

Needs numpy only (no hypothesis): torch and jax are imported lazily, inside the backends that
use them. The hypothesis strategies live in :mod:`deepopt.testing.strategies`; both are
re-exported by :mod:`deepopt.testing`.

- **Backends**: :func:`reference_trajectory`, :func:`resolve_backend`, :func:`run_backend`.
- **Checks**: :func:`assert_backends_agree`, :func:`assert_reduces_to`,
  :func:`assert_descends` (on a :class:`ConvexQuadratic`), :func:`assert_scale_stable` (on
  :func:`scale_problem`) and :func:`assert_newton_schulz_invariants`.
- **Oracles**: :func:`polar_factor` and :func:`scalar_newton_schulz`.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from deepopt import reference as _reference
from deepopt._readout import NewtonSchulz
from deepopt._spec import Spec, UpdateRule

Params = dict[str, np.ndarray]
Trajectory = list[Params]
RunTrajectory = Callable[[Spec, Mapping[str, np.ndarray], Sequence[Mapping[str, np.ndarray]]], Trajectory]
Backend = Union[str, RunTrajectory, tuple[str, RunTrajectory]]

__all__ = [
    "DEFAULT_SCALES", "Backend", "ConvexQuadratic", "Params", "RunTrajectory", "Trajectory",
    "assert_backends_agree", "assert_descends", "assert_newton_schulz_invariants",
    "assert_reduces_to", "assert_scale_stable", "polar_factor", "scale_problem",
    "reference_trajectory", "resolve_backend", "run_backend", "scalar_newton_schulz",
]

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
# Scale stability
# ============================================================================================

#: Gradient scales of :func:`assert_scale_stable`: twelve decades around 1.
DEFAULT_SCALES = (1e-6, 1e-3, 1.0, 30.0, 1e3, 1e6)


def scale_problem(steps: int = 20, seed: int = 0) -> tuple[Params, list[Params]]:
    """A unit-scale problem for :func:`assert_scale_stable`: a 12×8 matrix, a (6, 3, 2) conv-like
    kernel and an 8-vector, and ``steps`` gradients of standard-normal entries, one step ×10
    (a spike) and one ×0.1 (a lull), so that normalisers see the scale move."""
    rng = np.random.default_rng(seed)
    shapes = {"weight": (12, 8), "conv": (6, 3, 2), "bias": (8,)}
    params = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    factors = np.ones(steps)
    factors[steps // 3] = 10.0
    factors[(2 * steps) // 3] = 0.1
    stream = [{name: c * rng.standard_normal(shape) for name, shape in shapes.items()} for c in factors]
    return params, stream


def assert_scale_stable(spec: Spec, params: Mapping[str, np.ndarray] | None = None,
                        grads_stream: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                        scales: Sequence[float] = DEFAULT_SCALES,
                        backends: Sequence[Backend] = ("reference",), dtype: str = "float32",
                        steps: int = 20, seed: int = 0) -> dict[float, float]:
    """Every parameter stays finite when the gradient stream is multiplied by each of ``scales``.

    Runs ``spec`` on ``c · grads_stream`` for every ``c`` in ``scales`` (default 1e-6 … 1e6) and
    every backend (``"reference"`` in float64; ``"torch"`` and ``"jax"`` in ``dtype``, float32 by
    default, where overflow bites first; or any ``run_trajectory`` callable), and asserts that
    the parameters are finite after every step. Without ``params``/``grads_stream`` it uses
    :func:`scale_problem` (``steps`` gradients, seeded by ``seed``). The stream does not depend
    on the parameters, so what is tested is the rule, not a training loop's feedback.

    Returns ``{c: max |W_t − W_0|}`` over the run on the first backend — how far the rule moves
    the parameters at each scale (a rule homogeneous of degree d in the gradient moves them
    ``∝ c^d``).

    >>> import deepopt
    >>> from deepopt import testing
    >>> moved = testing.assert_scale_stable(deepopt.dmgd(lr=0.02), scales=(1e-6, 1.0, 1e6))
    >>> sorted(moved) == [1e-6, 1.0, 1e6]
    True
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r} is invalid: allowed 'float32', 'float64'")
    if not scales or not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for c in scales):
        raise ValueError(f"scales={scales!r} is invalid: expected positive finite numbers")
    if (params is None) != (grads_stream is None):
        raise ValueError("pass both params and grads_stream, or neither (then scale_problem is used)")
    if params is None:
        params, grads_stream = scale_problem(steps, seed)
    modules = {"torch": "torch_backend", "jax": "jax_backend"}
    runners = []
    for backend in backends:
        if backend in modules:
            extra = {"layout": "torch"} if backend == "jax" else {}
            runners.append((backend, _module_backend(modules[backend], dtype=dtype, **extra)))
        else:
            runners.append(resolve_backend(backend))
    moved: dict[float, float] = {}
    for c in scales:
        stream = [{k: None if g is None else c * np.asarray(g, dtype=np.float64) for k, g in grads.items()}
                  for grads in grads_stream]
        for i, (label, fn) in enumerate(runners):
            traj = run_backend((label, fn), spec, params, stream)
            for t, step in enumerate(traj, 1):
                bad = [k for k, v in step.items() if not np.all(np.isfinite(v))]
                if bad:
                    raise AssertionError(
                        f"{_spec_label(spec)} on backend {label} went non-finite at gradient scale "
                        f"{c:g}, step {t} of {len(traj)}, parameter(s) {bad}")
            if i == 0:
                moved[c] = max(float(np.max(np.abs(traj[-1][k] - np.asarray(params[k])), initial=0.0))
                               for k in params)
    return moved


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
    """Invariants of a Newton–Schulz read-out map ``f`` on 2-D arrays (docs/math.md §4).

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
                # the grid's extremes can miss the polynomial's by ~h²; the input's own
                # normalised singular values make the band exact where the outputs are
                s_x = np.linalg.svd(x, compute_uv=False) / (ns.norm_scale * np.linalg.norm(x))
                grid = np.linspace(min_singular / math.sqrt(min(m, n)), 1.0, 20001) / ns.norm_scale
                vals = scalar_newton_schulz(ns, np.concatenate([grid, s_x]))
                lo_hi = (float(vals.min()), float(vals.max()))
        if lo_hi is not None:
            lo, hi = lo_hi
            tol = max(atol, 1e-9)
            if sv.min() < lo - tol or sv.max() > hi + tol:
                raise AssertionError(f"{where}: output singular values span [{sv.min():.6g}, "
                                     f"{sv.max():.6g}], outside the band [{lo:.6g}, {hi:.6g}]")
