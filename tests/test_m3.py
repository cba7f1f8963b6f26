"""Multi-scale momentum (M3, docs/math.md §6, NL Algorithm 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepopt
import torch_backend
from deepopt import reference


def _stream(m=4, n=6, steps=13, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), [rng.standard_normal((m, n)) for _ in range(steps)]


def _algorithm1(w, grads, *, lr, b1, b2, b3, alpha, f, eps, ns):
    """NL Algorithm 1 as printed: chunks of f steps, the slow memory updated at chunk starts."""
    m1, m2, v = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    o2 = np.zeros_like(w)
    out = []
    for k in range(0, len(grads), f):
        if k > 0:                                    # slow memory: the previous chunk's gradients
            m2 = m2 + b3 * sum(grads[k - f:k])
            o2 = reference.newton_schulz(m2, ns)
        for g in grads[k:k + f]:
            m1 = m1 + b1 * g
            v = v + b2 * g * g
            o1 = reference.newton_schulz(m1, ns)
            w = w - lr * (o1 + alpha * o2) / (np.sqrt(v) + eps)
            out.append(w)
    return out


@pytest.mark.parametrize("f", [1, 3, 5])
def test_m3_default_is_the_papers_algorithm_1(f):
    w0, grads = _stream()
    spec = deepopt.m3(0.01, betas=(0.9, 0.5, 0.7), slow_weight=0.6, frequency=f, eps=1e-8, ns_dtype="input")
    want = _algorithm1(w0, grads, lr=0.01, b1=0.9, b2=0.5, b3=0.7, alpha=0.6, f=f, eps=1e-8,
                       ns=spec.rule.readout)
    state, p = reference.init(spec, {"w": w0}), {"w": w0}
    torch_traj = torch_backend.run_trajectory(spec, {"w": w0}, [{"w": g} for g in grads])
    for k, g in enumerate(grads):
        p, state = reference.step(spec, p, {"w": g}, state)
        np.testing.assert_allclose(p["w"], want[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(torch_traj[k]["w"], want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("decay", [False, True])
def test_slow_level_written_exactly_every_f_steps(foreach, decay):
    f = 4
    w = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    opt = torch_backend.compile(deepopt.m3(0.01, frequency=f, decay=decay, slow_decay=decay, ns_dtype="input"), [w],
                                foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    changed = []
    previous = None
    for _ in range(1, 15):
        w.grad = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        opt.step()
        slow = opt.state[w]["slow_memory"].clone()
        readout = opt.state[w]["slow_readout"].clone()
        if previous is not None:
            moved = not torch.equal(slow, previous[0])
            assert moved == (not torch.equal(readout, previous[1]))   # O² refreshed with M²
            changed.append(moved)
        else:
            changed.append(bool(slow.abs().sum() > 0))
        previous = (slow, readout)
    assert [t for t, c in enumerate(changed, start=1) if c] == [4, 8, 12]


def test_decay_variants_are_emas():
    w0, grads = _stream(steps=6)
    spec = deepopt.m3(0.01, betas=(0.8, 0.9, 0.5), frequency=2, decay=True, slow_decay=True, ns_dtype="input")
    state = reference.init(spec, {"w": w0})
    p = {"w": w0}
    m1 = np.zeros_like(w0)
    m2, acc = np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        p, state = reference.step(spec, p, {"w": g}, state)
        m1 = 0.8 * m1 + 0.2 * g
        acc = acc + g
        if t % 2 == 0:
            m2, acc = 0.5 * m2 + 0.5 * acc, np.zeros_like(w0)
        np.testing.assert_allclose(state["w"]["memory"], m1, atol=1e-14)
        np.testing.assert_allclose(state["w"]["slow_memory"], m2, atol=1e-14)


def test_m3_bad_arguments():
    with pytest.raises(ValueError, match="frequency=0"):
        deepopt.m3(frequency=0)
    with pytest.raises(ValueError, match="betas"):
        deepopt.m3(betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="decay=True"):
        deepopt.m3(betas=(1.0, 0.9, 0.9), decay=True)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bfloat16_newton_schulz_is_the_default_close_to_float32(backend):
    """``ns_dtype="bfloat16"`` (the default, as muon's) runs both levels' Newton–Schulz in
    bf16: close to the float32 run, and not identical to it (so bf16 really ran)."""
    import jax_backend

    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((6, 5))}
    stream = [{"w": rng.standard_normal((6, 5))} for _ in range(7)]
    run = torch_backend.run_trajectory if backend == "torch" else jax_backend.run_trajectory
    assert deepopt.m3().hyperparameters["ns_dtype"] == deepopt.muon().hyperparameters["ns_dtype"] == "bfloat16"
    a = run(deepopt.m3(0.01, frequency=3), params, stream, dtype="float32")
    b = run(deepopt.m3(0.01, frequency=3, ns_dtype="input"), params, stream, dtype="float32")
    moved = np.abs(b[-1]["w"] - params["w"]).max()
    diff = np.abs(a[-1]["w"] - b[-1]["w"]).max()
    assert 0 < diff < 0.05 * moved, (diff, moved)


@pytest.mark.parametrize("slow_weight", [1.0, 0.6])
def test_m3_read_is_laid_out_as_the_parameters(slow_weight):
    """The batched read ``O¹ + w O²`` has each parameter's own layout. A Newton–Schulz read of a
    tall matrix is a transposed view, and a sum led by it was transposed too, so the outer
    step's foreach ops saw mixed layouts (on CUDA, a kernel per tensor instead of foreach's
    fast path). Values are those of the single-tensor twin."""
    from torch_backend import _multiscale

    spec = deepopt.m3(0.01, slow_weight=slow_weight, frequency=2)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(8, 3), (3, 8), (8, 3)]]
    opt = torch_backend.compile(spec, params)
    for _ in range(2):                                       # O² written once: w O² is not zero
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    states = [opt.state[p] for p in params]
    for st in states:
        st["step"] += 1
    copies = [{k: v.clone() for k, v in st.items()} for st in states]
    outs = _multiscale.KERNEL.batched(spec.rule, states, grads, grads, [3] * 3).outs
    for p, o in zip(params, outs):
        assert o.stride() == p.stride() and o.dtype == p.dtype
    singles = [_multiscale.KERNEL.single(spec.rule, st, g, g, 3).outs for st, g in zip(copies, grads)]
    for o, s in zip(outs, singles):
        torch.testing.assert_close(o, s, rtol=1e-5, atol=1e-6)
