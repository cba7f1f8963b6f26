"""torch_backend behaviour: twins agree, exact resume, groups, routing, batching, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import deepopt
import torch_backend
import torch_backend._functional as functional

SPECS = {
    "sgd": deepopt.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_damped": deepopt.sgd(0.1, momentum=0.9, dampening=0.5, undamped_first_step=True),
    "adamw": deepopt.adamw(1e-2, weight_decay=0.1),
    "adamw_nesterov": deepopt.adamw(1e-2, nesterov=True),
    "delta": deepopt.delta_momentum(0.05, momentum=0.9, zeta=0.7, weight_decay=0.01),
    "delta_sign": deepopt.delta_momentum(0.01, readout="sign", nesterov=True),
    "delta_ns": deepopt.delta_momentum(0.02, readout="newton_schulz", ns_coefficients="polar_express"),
    "muon": deepopt.muon(0.02, ns_dtype="float64"),
    "muon_optax": deepopt.muon(0.02, ns_dtype="input", ns_normalization="add", bias_correction=True),
    "dmgd": deepopt.dmgd(0.05, hidden=4),
    "dmgd_dot_prev": deepopt.dmgd(0.05, momentum=0.9, inner_lr=0.5, hidden=3, objective="dot",
                                  keys="previous", values="adam", nesterov=True, weight_decay=0.1),
    "dmgd_ns": deepopt.dmgd(0.02, hidden=2, readout="newton_schulz"),
    "m3": deepopt.m3(0.01, frequency=3),
    "m3_decay": deepopt.m3(0.01, frequency=2, decay=True, slow_decay=True, weight_decay=0.1),
    "custom": deepopt.custom(deepopt.UpdateRule(
        memory=deepopt.LinearMemory(momentum=0.8, inner_lr=0.5, zeta=0.3, nesterov=True),
        values=deepopt.AdamValues(beta2=0.99), readout=deepopt.newton_schulz("cubic", 8),
        shape_scale="match_rms_adamw"), lr=0.01, weight_decay=0.1),
}
SHAPES = {"a": (4, 6), "b": (4, 6), "c": (6, 4), "d": (3, 2, 2), "bias": (6,)}


def _stream(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("name", SPECS)
def test_batched_twin_equals_single_tensor_loop_and_reference(name):
    spec = SPECS[name]
    params, grads = _stream(SHAPES, 12)
    batched = torch_backend.run_trajectory(spec, params, grads, foreach=True)
    single = torch_backend.run_trajectory(spec, params, grads, foreach=False)
    state, p = deepopt.reference.init(spec, params), params
    for k, g in enumerate(grads):
        p, state = deepopt.reference.step(spec, p, g, state)
        for n in p:
            np.testing.assert_allclose(batched[k][n], single[k][n], rtol=0, atol=1e-12)
            np.testing.assert_allclose(batched[k][n], p[n], rtol=0, atol=1e-10)
    assert not np.allclose(batched[-1]["a"], params["a"])


def test_same_shape_matrices_share_one_newton_schulz_call(monkeypatch):
    calls = []
    real = torch_backend._readout.newton_schulz

    def counting(x, ns):
        calls.append(tuple(x.shape))
        return real(x, ns)

    monkeypatch.setattr(torch_backend._readout, "newton_schulz", counting)
    params = [torch.randn(8, 16, requires_grad=True) for _ in range(5)] + [torch.randn(16, 8, requires_grad=True)]
    opt = torch_backend.compile(deepopt.muon(0.02), params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    # Five 8×16 matrices in one batched call, the 16×8 one in another.
    assert sorted(calls) == [(1, 16, 8), (5, 8, 16)]


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("name", ["sgd", "adamw", "delta", "muon", "dmgd_dot_prev", "m3", "custom"])
def test_state_dict_exact_resume(name):
    spec = SPECS[name]
    make = lambda: [torch.nn.Parameter(torch.ones(4, 6) * 0.1 * i) for i in range(1, 3)] + [  # noqa: E731
        torch.nn.Parameter(torch.ones(6))]
    full = make()
    opt = torch_backend.compile(spec, full)
    _train(opt, full, torch.Generator().manual_seed(0), 20)

    first = make()
    opt1 = torch_backend.compile(spec, first)
    gen = torch.Generator().manual_seed(0)
    _train(opt1, first, gen, 12)
    buf = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "params": [p.detach().clone() for p in first]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)   # only plain data in the checkpoint
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt2 = torch_backend.compile(spec, resumed)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, resumed, gen, 8)
    for p, q in zip(full, resumed):
        assert torch.equal(p, q), "resumed run differs from the uninterrupted one"


def test_grad_none_params_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3, 4))
    before = b.detach().clone()
    opt = torch_backend.compile(deepopt.adamw(0.1), [a, b])
    a.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(b, before)
    assert len(opt.state[b]) == 0 and int(opt.state[a]["step"]) == 1


def test_sparse_and_complex_gradients_raise_clear_errors():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = torch_backend.compile(deepopt.adamw(0.1), [z])
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_param_group_overrides_equal_separate_optimizers():
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    grouped = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [
        {"params": [a[0]]}, {"params": [a[1]], "lr": 0.01, "momentum": 0.5, "nesterov": True}])
    sep0 = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [b[0]])
    sep1 = torch_backend.compile(deepopt.sgd(0.01, momentum=0.5, nesterov=True), [b[1]])
    for _ in range(10):
        for p, q in zip(a, b):
            p.grad = torch.randn(4, 5, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        grouped.step(), sep0.step(), sep1.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    # Changing a group hyperparameter mid-run takes effect (rules are rebuilt per value).
    grouped.param_groups[1]["momentum"] = 0.3
    assert grouped._group_rule(grouped.param_groups[1]).memory.momentum == 0.3


def test_bad_group_override_raises_and_leaves_optimizer_intact():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [p])
    with pytest.raises(ValueError, match=r"momentum=1\.5"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "momentum": 1.5})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "momentm": 0.5})
    assert len(opt.param_groups) == 1
    p.grad = torch.ones(3, 3)
    opt.step()                                   # still usable


def test_routing_splits_groups_by_ndim_name_and_predicate():
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(10, 8),
        "conv": torch.nn.Conv1d(8, 4, 3),
        "hidden": torch.nn.Linear(8, 8),
        "head": torch.nn.Linear(8, 10),
    })
    spec = deepopt.muon(0.02).with_routing(fallback_patterns=(r"^embed\.", r"^head\."),
                                           fallback_if=lambda name, shape: shape == (4, 8, 3) and False)
    opt = torch_backend.compile(spec, model.named_parameters())
    routes = {n: g["route"] for g in opt.param_groups for n in g["param_names"]}
    assert routes == {
        "embed.weight": "fallback", "conv.weight": "rule", "conv.bias": "fallback",
        "hidden.weight": "rule", "hidden.bias": "fallback", "head.weight": "fallback",
        "head.bias": "fallback"}
    # Both groups carry their own spec's hyperparameters.
    fb = next(g for g in opt.param_groups if g["route"] == "fallback")
    assert "betas" in fb and "ns_steps" not in fb
    pred = deepopt.muon(0.02).with_routing(fallback_if=lambda name, shape: shape[0] > shape[1])
    opt = torch_backend.compile(pred, model.named_parameters())
    routes = {n: g["route"] for g in opt.param_groups for n in g["param_names"]}
    assert routes["head.weight"] == "fallback" and routes["hidden.weight"] == "rule"


def test_conv_kernel_uses_matrix_view_like_reference():
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).double()
    spec = deepopt.muon(0.02, ns_dtype="float64")
    params = {"w": conv.weight.detach().numpy().copy()}
    grads = [{"w": np.random.default_rng(k).standard_normal((4, 3, 3, 3))} for k in range(3)]
    ours = torch_backend.run_trajectory(spec, params, grads)
    state, p = deepopt.reference.init(spec, params), params
    for k, g in enumerate(grads):
        p, state = deepopt.reference.step(spec, p, g, state)
        np.testing.assert_allclose(ours[k]["w"], p["w"], atol=1e-12)


def test_tensor_lr_and_closure():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch_backend.compile(deepopt.sgd(0.1), [{"params": [p], "lr": torch.tensor(0.5)}])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([0.0, 0.0]))   # p − 0.5·2p


def test_bad_arguments():
    with pytest.raises(TypeError, match="deepopt.Spec"):
        torch_backend.compile(torch.optim.SGD, [torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="foreach"):
        torch_backend.compile(deepopt.sgd(0.1), [torch.nn.Parameter(torch.randn(2))], foreach="yes")
    with pytest.raises(ValueError, match="empty parameter list"):
        torch_backend.compile(deepopt.sgd(0.1), [])
    with pytest.raises(ValueError, match="fallback"):
        torch_backend.compile(deepopt.muon(0.02).with_fallback(None), [torch.nn.Parameter(torch.randn(2))])


def test_bad_value_edited_into_a_group_raises_before_any_update():
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    opt = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [{"params": [a]}, {"params": [b]}])
    for p in (a, b):
        p.grad = torch.ones(3, 3)
    opt.step()
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["memory"].clone()]
    for key, bad in (("momentum", 1.5), ("lr", -0.1), ("lr", float("nan")), ("weight_decay", -1.0)):
        original = opt.param_groups[1][key]
        opt.param_groups[1][key] = bad
        with pytest.raises(ValueError, match=key):
            opt.step()
        opt.param_groups[1][key] = original
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])       # group 0 untouched too
        assert torch.equal(opt.state[a]["memory"], before[2])
