"""torch_backend behaviour: twins agree, exact resume, groups, routing, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepopt
import torch_backend
import torch_backend._readout  # the module whose newton_schulz the batching test counts

import _helpers

# Two same-shape matrices (one batched bucket), their transpose, a 3-D kernel and a bias.
SHAPES = {"a": (4, 6), "b": (4, 6), "c": (6, 4), "d": (3, 2, 2), "bias": (6,)}


#: How far two computations of one trajectory may drift apart (absolute, 12 steps of O(lr)
#: updates), by the spec's compute dtype: float64 rounding; float32's (measured: 6e-8 between
#: the twins, 1e-7 from the reference); bfloat16's (a one-ulp flip is ~4e-3 of an element).
TWIN_ATOL = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-3}
REFERENCE_ATOL = {"float64": 1e-10, "float32": 1e-6}


def test_batched_twin_equals_single_tensor_loop(spec):
    """foreach=True (buckets of same-shape tensors) == foreach=False (one tensor at a time),
    for every table entry, to the rounding of the dtype it computes in."""
    params, grads = _helpers.random_problem(SHAPES, 12)
    batched = torch_backend.run_trajectory(spec, params, grads, foreach=True)
    single = torch_backend.run_trajectory(spec, params, grads, foreach=False)
    _helpers.assert_trajectories_close(batched, single, rtol=0, atol=TWIN_ATOL[_helpers.compute_dtype(spec)])
    assert not np.allclose(batched[-1]["a"], params["a"])


@pytest.mark.specs(where=lambda spec: _helpers.compute_dtype(spec) in REFERENCE_ATOL)
def test_batched_twin_equals_reference(spec):
    """The float64 reference, for every entry that does not round to bfloat16 (that one is
    bounded in test_jax_backend's bfloat16 test)."""
    params, grads = _helpers.random_problem(SHAPES, 12)
    batched = torch_backend.run_trajectory(spec, params, grads, foreach=True)
    _helpers.assert_trajectories_close(batched, _helpers.reference_run(spec, params, grads), rtol=0,
                                       atol=REFERENCE_ATOL[_helpers.compute_dtype(spec)])


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


@pytest.mark.gpu
@pytest.mark.specs(where=_helpers.exact_in_float64)
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_cuda_trajectory_equals_reference(spec, foreach):
    """On a CUDA device (float64, both twins): the reference's trajectory to the tolerance the
    CPU run meets, with a gradient missing now and then."""
    params, grads = _helpers.random_problem(SHAPES, 12, missing=(("a", 3), ("bias", 5)))
    ours = _helpers.torch_run(spec, params, grads, device="cuda", foreach=foreach)
    _helpers.assert_trajectories_close(ours, _helpers.reference_run(spec, params, grads), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ours[3]["a"], ours[2]["a"])      # the missing gradient: no step


@pytest.mark.gpu
@pytest.mark.specs(where=_helpers.exact_in_float64)
@pytest.mark.parametrize("direction", ["cuda_to_cpu", "cpu_to_cuda"])
def test_checkpoint_moves_between_cpu_and_cuda(spec, direction):
    """A checkpoint written on one device resumes on the other (``map_location="cpu"`` one way,
    a plain load the other, where ``load_state_dict`` moves the state to the parameters): the
    reference's trajectory to the tolerance of the CUDA trajectory test."""
    import io

    first, then = ("cuda", "cpu") if direction == "cuda_to_cpu" else ("cpu", "cuda")
    params, grads = _helpers.random_problem(SHAPES, 10)
    part = _helpers.torch_params(params, device=first)
    opt = torch_backend.compile(spec, part.items())
    for g in grads[:6]:
        _helpers.torch_step(opt, part, g)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": {n: p.detach() for n, p in part.items()}}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True, map_location="cpu" if then == "cpu" else None)
    resumed = {n: torch.nn.Parameter(t.to(then).clone()) for n, t in saved["params"].items()}
    opt2 = torch_backend.compile(spec, resumed.items())
    opt2.load_state_dict(saved["opt"])
    for g in grads[6:]:
        _helpers.torch_step(opt2, resumed, g)
    ref = _helpers.reference_run(spec, params, grads)[-1]
    for n, p in resumed.items():
        assert p.device.type == then
        np.testing.assert_allclose(p.detach().cpu().numpy(), ref[n], rtol=0, atol=1e-10, err_msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_state_dict_exact_resume(spec, model_problem, dtype):
    """Stop after 7 of 12 steps, checkpoint through torch.save, resume: bit for bit the
    uninterrupted run (parameters and state), in float32 and float64."""
    params, grads = model_problem
    _helpers.assert_resume_is_exact(spec, params, grads, cut=7, dtype=dtype)


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


@pytest.mark.specs("muon")
def test_conv_kernel_uses_matrix_view_like_reference(spec):
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).double()
    params = {"w": conv.weight.detach().numpy().copy()}
    grads = [{"w": np.random.default_rng(k).standard_normal((4, 3, 3, 3))} for k in range(3)]
    ours = torch_backend.run_trajectory(spec, params, grads)
    _helpers.assert_trajectories_close(ours, _helpers.reference_run(spec, params, grads), rtol=1e-7, atol=1e-12)


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


@pytest.mark.specs("adamw_nesterov", "muon_optax")
def test_nadam_read_with_step_counts_apart_equals_the_single_twin(spec):
    """The batched NAdam read, ``(c₁ + c₂)·lerp(V, S, c₁/(c₁ + c₂))`` with its scale folded into
    the step size (AdamW) or multiplied back before Newton–Schulz (Muon's fallback and read),
    equals the single-tensor twin's ``c₁S + c₂V`` when one parameter starts two steps late, so
    its ``t`` (and so its weights and scale) differ from the rest of the group's."""
    shapes = {"w": (4, 6), "v": (4, 6), "bias": (6,)}
    runs = {}
    for foreach in (True, False):
        gen = torch.Generator().manual_seed(1)
        params = {k: torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
                  for k, s in shapes.items()}
        opt = torch_backend.compile(spec, list(params.items()), foreach=foreach)
        for t in range(6):
            for k, p in params.items():
                g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.grad = None if (k == "v" and t < 2) else g
            opt.step()
        assert float(opt.state[params["v"]]["step"]) == 4 and float(opt.state[params["w"]]["step"]) == 6
        runs[foreach] = {k: p.detach().clone() for k, p in params.items()}
    for k in shapes:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=0, atol=1e-12, msg=k)


@pytest.mark.parametrize("spec", [deepopt.sgd(0.1, momentum=0.9), deepopt.adamw(1e-2), deepopt.muon(0.02),
                                  deepopt.dmgd(1e-2), deepopt.m3(0.02)], ids=lambda s: s.name)
def test_a_gradient_of_another_dtype_raises_before_anything_changes(spec):
    """torch >= 2.13 lets a gradient's dtype differ from its parameter's (``p.grad_dtype``:
    float32 gradients of bfloat16 parameters). deepopt keeps the state in the parameter's dtype:
    such a gradient is refused, naming the parameter and both dtypes, before any parameter,
    state entry or step count changes (torch.optim's AdamW fails inside its kernels instead;
    deepopt's adamw, muon, dmgd and m3 failed mid-step, after advancing their step counts)."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).bfloat16()
    opt = torch_backend.compile(spec, model.named_parameters())
    model(torch.randn(4, 8, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()                                              # state made, with bf16 gradients
    opt.zero_grad()
    model[1].weight.grad_dtype = torch.float32
    model(torch.randn(4, 8, dtype=torch.bfloat16)).float().sum().backward()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match=r"'1\.weight' is torch\.bfloat16 but its gradient is torch\.float32"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, st in state.items() for k, v in st.items())


@pytest.mark.parametrize("case", ["transposed_parameter", "transposed_gradient"])
def test_a_transposed_parameter_or_gradient_steps_as_a_contiguous_one(spec, case):
    """Every spec of the table on a (4, 6) weight stored transposed, or given a transposed
    gradient, steps as on contiguous tensors: a kernel that walks storage in order (torch's fused
    ones, deepopt's) must not take them (docs: README "Flags"; torch 2.13's fused AdamW does)."""
    def run(mode):
        gen = torch.Generator().manual_seed(3)
        x, b = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
        w = torch.nn.Parameter(x.t().clone() if mode == "transposed_parameter" else x.t().contiguous())
        bias = torch.nn.Parameter(b.clone())
        opt = torch_backend.compile(spec, [("w", w), ("b", bias)])
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
            w.grad = grad.t() if mode == "transposed_gradient" else grad.t().contiguous()
            bias.grad = torch.randn(5, generator=g, dtype=torch.float64)
            opt.step()
        return w.detach(), bias.detach()

    for a, b in zip(run(case), run("contiguous")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
