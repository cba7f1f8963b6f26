"""DMGD's fused kernel (torch_backend/_deep_memory.py ``fused_kernel``): the same update as
the op-by-op ``deep_memory_kernel`` in fewer full-size passes, equal to it within float rounding
(kernel by kernel and through whole optimizer runs; on CPU the runs take deepopt's C++ kernel,
tests/test_deep_memory_native.py, where it is built), and ``FUSED = False`` brings back the
op-by-op kernel bit for bit."""

from __future__ import annotations

import pytest
import torch

import deepopt
import torch_backend
from torch_backend import _deep_memory, _native

from _helpers import random_steps

# One bucket of three 5×7 matrices, a 3-D kernel with a 7×6 view, a bucket of one, a vector.
SHAPES = {"a": (5, 7), "b": (5, 7), "c": (5, 7), "d": (7, 3, 2), "e": (7, 6), "bias": (7,)}
VARIANTS = {
    "default": {},
    "memory_alone": {"readout": None},
    "dot_previous_adam": {"objective": "dot", "keys": "previous", "values": "adam", "readout": None},
    "nesterov_momentum": {"momentum": 0.9, "nesterov": True, "readout": None},
    "previous_keys_l2": {"keys": "previous", "momentum": 0.95, "readout": None},
    "no_mlp": {"hidden": 0, "readout": None},
    "no_mlp_dot_nesterov": {"hidden": 0, "objective": "dot", "nesterov": True, "momentum": 0.9, "readout": None},
    "no_inner_step": {"inner_lr": 0.0, "readout": None},              # η = 0: the fused rates' limit
    "no_inner_step_dot": {"inner_lr": 0.0, "objective": "dot", "keys": "previous", "readout": None},
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=2e-4, atol=1e-6)}


def _mem(variant: str) -> deepopt.DeepMemory:
    return deepopt.dmgd(0.02, **VARIANTS[variant]).rule.memory


def _kernel_inputs(mem, b, m, n, dtype, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)   # noqa: E731
    h = mem.hidden
    s = r(b, m, n) * scale
    w1 = r(b, h, n) / n ** 0.5 if h else None
    w2 = r(b, n, h) * 0.1 if h else None
    nu = torch.full((b, 1, 1), scale, dtype=dtype) if h else None
    prev = r(b, m, n) / n ** 0.5 if mem.keys == "previous" else None
    g = r(b, m, n) * scale
    return s, w1, w2, nu, g, prev


def _clone(xs):
    return [None if x is None else x.clone() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("values_are_grads", [True, False], ids=["v_is_g", "v_separate"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_kernel_equals_the_op_by_op_kernel(variant, values_are_grads, dtype):
    mem = _mem(variant)
    b, m, n = 3, 6, 5
    s, w1, w2, nu, g, prev = _kernel_inputs(mem, b, m, n, dtype)
    v = g if values_are_grads else g * 0.7 + 1e-4
    ref = _clone([s, w1, w2, nu, prev])
    out_ref = _deep_memory.deep_memory_kernel(mem, *ref[:4], g, v, ref[4])
    ours = _clone([s, w1, w2, nu, prev])
    buf = torch.full_like(s, float("nan"))               # P, then D̃: every entry written before read
    out = _deep_memory.fused_kernel(mem, *ours[:4], g, v, ours[4], buf)
    tol = TOL[dtype]
    for name, a, r in zip(("S", "W1", "W2", "nu", "D"), out[:5], out_ref[:5]):
        if r is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, r, **tol, msg=name)
    for name, a, r in zip(("S", "W1", "W2", "nu"), ours[:4], ref[:4]):   # written in place
        if r is not None:
            torch.testing.assert_close(a, r, **tol, msg=name)
    if mem.keys == "previous":                       # the next key: Ĝ, written into prev_key
        torch.testing.assert_close(ours[4], ref[4], **tol)
        torch.testing.assert_close(ours[4], out_ref[5], **tol)
    assert out[5] is None


def _params(dtype):
    gen = torch.Generator().manual_seed(0)
    return {k: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for k, s in SHAPES.items()}


def _run(variant, dtype, fused, monkeypatch, steps=6, foreach=True):
    monkeypatch.setattr(_deep_memory, "FUSED", fused)
    params = _params(dtype)
    opt = torch_backend.compile(deepopt.dmgd(0.02, **VARIANTS[variant]), list(params.items()), foreach=foreach)
    random_steps(opt, params, steps)
    return params, opt


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_optimizer_runs_equal_the_op_by_op_runs(variant, dtype, foreach, monkeypatch):
    pf, of = _run(variant, dtype, True, monkeypatch, foreach=foreach)
    pe, oe = _run(variant, dtype, False, monkeypatch, foreach=foreach)
    tol = TOL[dtype]
    for k in pf:
        torch.testing.assert_close(pf[k], pe[k], **tol, msg=k)
        for key, val in of.state[pf[k]].items():
            torch.testing.assert_close(val, oe.state[pe[k]][key], **tol, msg=f"{k} {key}")


def test_fused_is_the_cpu_default_and_off_is_the_op_by_op_kernel(monkeypatch):
    """The CPU path calls deepopt's C++ kernel where it is built (tests/test_deep_memory_native.py),
    else the fused kernel; FUSED = False calls the op-by-op one."""
    calls = []
    for name in ("_native_kernel", "fused_kernel", "deep_memory_kernel"):
        real = getattr(_deep_memory, name)
        monkeypatch.setattr(_deep_memory, name,
                            lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    assert _deep_memory.FUSED is True
    _run("memory_alone", torch.float64, True, monkeypatch, steps=1)
    assert set(calls) == ({"_native_kernel"} if _native.ops() is not None else {"_native_kernel", "fused_kernel"})
    calls.clear()
    monkeypatch.setattr(_native, "ops", lambda: None)
    _run("memory_alone", torch.float64, True, monkeypatch, steps=1)
    assert set(calls) == {"_native_kernel", "fused_kernel"}
    calls.clear()
    _run("memory_alone", torch.float64, False, monkeypatch, steps=1)
    assert set(calls) == {"deep_memory_kernel"}
