"""Helpers shared by the test modules: problem builders, step runners and comparisons.

Imported as ``import _helpers`` (tests/ is on ``sys.path``: it has no ``__init__.py``, and
pytest puts a rootless test directory first). torch and jax are imported inside the helpers
that need them, so a module that uses only one backend never imports the other.

- Problems: :func:`random_problem` (named parameters and a gradient stream, with optional
  missing gradients), :func:`to_jax`.
- Kernels' spies: :func:`spy_ops` (each op's result recorded), :func:`count_fused_kernels`.
- Runners: :func:`reference_run` (the numpy reference, optionally with a per-step lr),
  :func:`jax_run` (a jitted optax transformation), :func:`torch_run` (``torch_backend`` on any
  device), :func:`torch_params` / :func:`torch_step` / :func:`torch_states` (step by step).
- Comparisons: :func:`assert_trajectories_close`, :func:`assert_tensors_equal`,
  :func:`assert_resume_is_exact` (a ``torch.save`` round trip mid-stream resumes bit for bit).
- Spec predicates and variants for ``@pytest.mark.specs(where=...)``: :func:`compute_dtype`,
  :func:`exact_in_float64`, :func:`has_maximize`, :func:`maximized`.
- :func:`readme_distributed_examples`: the README's Distributed code blocks for a backend.
- :data:`DEEP_MEMORY_VARIANTS`: the DMGD memories both C++ kernels' tests run (every branch).
- :data:`ELEMENTWISE_VARIANTS`: the element-wise rules torch has no kernel for, which deepopt's
  CPU and CUDA kernels take (every branch).
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

import deepopt

REPO = Path(__file__).resolve().parent.parent

#: ``deepopt.DeepMemory`` settings that reach every branch of DMGD's C++ kernel
#: (tests/test_deep_memory_native.py, tests/test_jax_deep_memory_native.py).
DEEP_MEMORY_VARIANTS = {
    "default": {},
    "dot": {"objective": "dot"},
    "previous_keys": {"keys": "previous", "momentum": 0.95},
    "dot_previous": {"objective": "dot", "keys": "previous"},
    "no_nesterov": {"nesterov": False},
    "no_retention": {"momentum": 1.0, "hidden": 24},
    "no_inner_step": {"inner_lr": 0.0},
    "narrow_mlp": {"hidden": 3, "inner_lr": 0.7},
}

#: The element-wise rules torch has no fused kernel for, with every flag of deepopt's kernels for
#: them (tests/test_native.py on the CPU, tests/test_native_cuda.py on CUDA).
ELEMENTWISE_VARIANTS = {
    "sgd_decoupled": deepopt.sgd(0.1, momentum=0.9, weight_decay=0.05, decoupled_weight_decay=True),
    "sgd_decoupled_maximize_nesterov": deepopt.sgd(0.1, momentum=0.8, nesterov=True, weight_decay=0.05,
                                                   decoupled_weight_decay=True, maximize=True),
    "sgd_decoupled_no_momentum": deepopt.sgd(0.1, weight_decay=0.05, decoupled_weight_decay=True),
    "sgd_torch_first_step": deepopt.sgd(0.1, momentum=0.9, dampening=0.3, undamped_first_step=True),
    "sgd_torch_first_step_coupled_decay": deepopt.sgd(0.1, momentum=0.9, dampening=0.3, weight_decay=0.05,
                                                      undamped_first_step=True),
    "sgd_torch_first_step_decoupled": deepopt.sgd(0.1, momentum=0.9, dampening=0.3, weight_decay=0.05,
                                                  decoupled_weight_decay=True, undamped_first_step=True),
    "sgd_torch_first_step_no_momentum": deepopt.sgd(0.05, dampening=0.5, undamped_first_step=True),
    "adamw_nesterov": deepopt.adamw(1e-2, nesterov=True),
    "adamw_nesterov_decay_maximize": deepopt.adamw(3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                                   nesterov=True, maximize=True),
    "adamw_nesterov_beta1_zero": deepopt.adamw(1e-2, betas=(0.0, 0.999), weight_decay=0.1, nesterov=True),
}

# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

_LOW_PRECISION = ("bfloat16", "float32")


def _ns_dtypes(spec: deepopt.Spec) -> Iterable[str]:
    hp = spec.hyperparameters
    if "ns_dtype" in hp:
        yield hp["ns_dtype"]
    readout = getattr(spec.rule, "readout", None)
    if hasattr(readout, "dtype"):
        yield readout.dtype
    if spec.fallback is not None:
        yield from _ns_dtypes(spec.fallback)


def compute_dtype(spec: deepopt.Spec) -> str:
    """The least precise dtype the spec computes in on float64 parameters: ``"bfloat16"`` or
    ``"float32"`` where a Newton–Schulz read-out (its own or its fallback's) is forced into it,
    else ``"float64"``."""
    dtypes = set(_ns_dtypes(spec))
    return next((dtype for dtype in _LOW_PRECISION if dtype in dtypes), "float64")


def exact_in_float64(spec: deepopt.Spec) -> bool:
    """True when the spec computes in float64 on float64 parameters on every backend (no
    Newton–Schulz forced into bfloat16 or float32): backends agree to float64 rounding."""
    return compute_dtype(spec) == "float64"


def has_maximize(spec: deepopt.Spec) -> bool:
    """True when :func:`maximized` can flip the spec (sgd, adamw and custom rules)."""
    return "maximize" in spec.hyperparameters or spec.name == "custom"


def maximized(spec: deepopt.Spec) -> deepopt.Spec:
    """The same spec, maximizing: a hyperparameter of sgd and adamw, a rule field of custom."""
    if "maximize" in spec.hyperparameters:
        return spec.replace(maximize=True)
    if spec.name == "custom":
        return deepopt.custom(dataclasses.replace(spec.rule, maximize=True), spec.lr, spec.weight_decay,
                              fallback=spec.fallback, routing=spec.routing)
    raise ValueError(f"{spec.name} has no maximize option")


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def random_problem(shapes: Mapping[str, tuple[int, ...]], steps: int, seed: int = 0,
                   missing: Sequence[tuple[str, int]] = ()) -> tuple[dict, list[dict]]:
    """Standard-normal float64 parameters of ``shapes`` and ``steps`` gradients; each
    ``(name, t)`` in ``missing`` sets that parameter's gradient at step ``t`` (0-based) to
    None (it sits the step out)."""
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(size=s) for n, s in shapes.items()}
    stream = [{n: rng.normal(size=s) for n, s in shapes.items()} for _ in range(steps)]
    for name, t in missing:
        if name in shapes:
            stream[t][name] = None
    return params, stream


def to_jax(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tree)


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


def reference_run(spec: deepopt.Spec, params: Mapping[str, np.ndarray], stream: Sequence[Mapping],
                  lrs: Sequence[float] | None = None) -> list[dict]:
    """The numpy reference over ``stream``: the parameters after each step. ``lrs[t]``
    (optional) is the main rule's lr at step t (the fallback keeps its ratio to it)."""
    state = deepopt.reference.init(spec, params)
    out = []
    for t, grads in enumerate(stream):
        step_spec = spec if lrs is None else spec.replace(lr=lrs[t])
        params, state = deepopt.reference.step(step_spec, params, grads, state)
        out.append(params)
    return out


def jax_run(tx, params, stream, *, with_states: bool = False):
    """An optax transformation, jitted, over a stream of full gradient pytrees: the
    parameters after each step (and, ``with_states``, the optimizer state after each step)."""
    import jax
    import optax

    update = jax.jit(tx.update)
    state = tx.init(params)
    out, states = [], []
    for grads in stream:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
        states.append(state)
    return (out, states) if with_states else out


def optax_states(tree, cls: type) -> list:
    """Every ``cls`` state (a NamedTuple) inside an optax state pytree (chain, partition,
    masked, inject_hyperparams…)."""
    import jax

    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, cls))
    return [x for x in leaves if isinstance(x, cls)]


def torch_params(params: Mapping[str, np.ndarray], dtype=None, device: str = "cpu") -> dict:
    """Named ``torch.nn.Parameter`` copies of numpy arrays (float64 unless ``dtype``)."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    return {n: torch.nn.Parameter(torch.tensor(v, dtype=dtype, device=device)) for n, v in params.items()}


def torch_step(opt, tparams: Mapping, grads: Mapping) -> None:
    """One ``opt.step()`` with ``grads`` (numpy, by name; None leaves ``.grad`` unset)."""
    import torch

    for n, p in tparams.items():
        g = grads.get(n)
        p.grad = None if g is None else torch.tensor(g, dtype=p.dtype, device=p.device)
    opt.step()


def random_steps(opt, tparams: Mapping, steps: int, seed: int = 1) -> None:
    """``steps`` of ``opt.step()``, each with fresh N(0, 1) gradients of the parameters' dtype
    (from one generator seeded with ``seed``, parameter by parameter)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in tparams.values():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def torch_run(spec: deepopt.Spec, params: Mapping[str, np.ndarray], stream: Sequence[Mapping], *,
              dtype=None, device: str = "cpu", foreach: bool | None = None) -> list[dict]:
    """``torch_backend`` on ``device``: the parameters after each step, as float64 numpy."""
    import torch

    import torch_backend

    tparams = torch_params(params, dtype, device)
    opt = torch_backend.compile(spec, tparams.items(), foreach=foreach)
    out = []
    for grads in stream:
        torch_step(opt, tparams, grads)
        out.append({n: p.detach().to("cpu", torch.float64, copy=True).numpy() for n, p in tparams.items()})
    return out


def torch_states(opt, tparams: Mapping) -> dict:
    """A copy of every parameter's optimizer state, by parameter name."""
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in tparams.items()}


def spy_ops(ops, record):
    """``ops`` (``torch.ops.deepopt`` or ``deepopt_cuda``) with each op call's result passed to
    ``record(name, result)`` before it is returned: the kernels' tests see which ran and whether
    each took its tensors."""

    class Spy:
        def __getattr__(self, name):
            op = getattr(ops, name)

            def call(*args):
                result = op(*args)
                record(name, result)
                return result

            return call

    return Spy()


def count_fused_kernels(monkeypatch, seen: dict) -> None:
    """Counts the calls of torch's own fused kernels (``_fused_sgd_``, ``_fused_adamw_``) in
    ``seen["torch"]``, each still run."""
    import torch

    for kernel in ("_fused_sgd_", "_fused_adamw_"):
        real = getattr(torch, kernel)

        def counted(*args, real=real, **kwargs):
            seen["torch"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, kernel, counted)


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


def assert_trajectories_close(ours: Sequence[Mapping], theirs: Sequence[Mapping], rtol: float = 1e-11,
                              atol: float = 1e-12) -> None:
    """Two lists of parameter dicts (numpy, jax or torch arrays) agree step by step."""
    assert len(ours) == len(theirs)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=rtol,
                                       atol=atol, err_msg=f"step {t + 1}, {name}")


def assert_tensors_equal(a: Mapping, b: Mapping, path: str = "") -> None:
    """Nested dicts of torch tensors are bit for bit equal (same keys, same values)."""
    import torch

    assert a.keys() == b.keys(), (path, sorted(a), sorted(b))
    for n in a:
        if isinstance(a[n], Mapping):
            assert_tensors_equal(a[n], b[n], f"{path}/{n}")
        else:
            assert torch.equal(a[n], b[n]), f"{path}/{n}"


def assert_resume_is_exact(spec: deepopt.Spec, params: Mapping[str, np.ndarray], grads: Sequence[Mapping],
                           cut: int, dtype=None) -> None:
    """Stop after ``cut`` steps, ``torch.save`` the optimizer's state dict and the parameters,
    load them (``weights_only``: plain data only) into a new optimizer and run the rest: the
    parameters and the state equal the uninterrupted run's, bit for bit."""
    import torch

    import torch_backend

    full = torch_params(params, dtype)
    opt = torch_backend.compile(spec, full.items())
    for g in grads:
        torch_step(opt, full, g)

    part = torch_params(params, dtype)
    opt1 = torch_backend.compile(spec, part.items())
    for g in grads[:cut]:
        torch_step(opt1, part, g)
    buf = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "params": {n: p.detach() for n, p in part.items()}}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = {n: torch.nn.Parameter(t.clone()) for n, t in saved["params"].items()}
    opt2 = torch_backend.compile(spec, resumed.items())
    opt2.load_state_dict(saved["opt"])
    for g in grads[cut:]:
        torch_step(opt2, resumed, g)
    assert_tensors_equal({n: p.detach() for n, p in full.items()}, {n: p.detach() for n, p in resumed.items()},
                         "params")
    assert_tensors_equal(torch_states(opt, full), torch_states(opt2, resumed), "state")


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------


def readme_distributed_examples(backend: str) -> list[str]:
    """The ```py blocks of README.md's "Distributed" section that use ``backend``
    (``"torch_backend"`` or ``"jax_backend"``)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Distributed", 1)[1].split("\n## ", 1)[0]
    return [code for code in re.findall(r"```py\n(.*?)```", section, flags=re.S) if backend in code]
