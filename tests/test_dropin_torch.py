"""torch_backend as a drop-in torch.optim.Optimizer: copies, schedulers, group edits,
checkpoints from other optimizers, torch's flags and wording (each compared with torch.optim
or with the same run done another way)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import deepopt
import torch_backend


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _step(opt, params, seed):
    for p, g in zip(params, _grads(params, seed)):
        p.grad = g.to(p.dtype)
    opt.step()


# --------------------------------------------------------------------------------------------
# Copies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [deepopt.muon(0.02), deepopt.dmgd(0.05, hidden=4), deepopt.adamw(0.01),
                                  deepopt.custom(deepopt.UpdateRule(readout=deepopt.Sign()), lr=0.01)],
                         ids=["muon", "dmgd", "adamw", "custom"])
def test_deepcopy_pickle_and_torch_save_give_optimizers_that_step_like_the_original(spec):
    model = _model()
    opt = torch_backend.compile(spec, model.named_parameters())
    params = list(model.parameters())
    for k in range(3):
        _step(opt, params, k)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    copies.append(torch.load(buf, weights_only=False))
    for k in range(3, 6):
        _step(opt, params, k)
    for m, o in copies:
        assert o.spec == spec
        for k in range(3, 6):
            _step(o, list(m.parameters()), k)
        for p, q in zip(params, m.parameters()):
            assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Schedulers and scripts that write group values
# --------------------------------------------------------------------------------------------


def test_momentum_cycling_scheduler_equals_torch_sgd_with_a_bounded_rule_cache():
    ours, ref = _model(), _model()
    opt = torch_backend.compile(deepopt.sgd(0.05, momentum=0.9), ours.parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=300) for o in (opt, ref_opt)]
    for k in range(300):
        for o, m, s in ((opt, ours, scheds[0]), (ref_opt, ref, scheds[1])):
            _step(o, list(m.parameters()), k)
            s.step()
    assert len({g["momentum"] for g in opt.param_groups}) == 1 and len(opt._rules) <= 32
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_numpy_scalars_as_group_values_equal_python_numbers():
    a, b = _model(), _model()
    opt_a = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [
        {"params": a.parameters(), "lr": np.float32(0.05), "momentum": np.float64(0.8),
         "weight_decay": np.int64(0)}])
    opt_b = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [
        {"params": b.parameters(), "lr": float(np.float32(0.05)), "momentum": 0.8, "weight_decay": 0}])
    for k in range(3):
        _step(opt_a, list(a.parameters()), k)
        _step(opt_b, list(b.parameters()), k)
        opt_a.param_groups[0]["lr"] = np.float32(0.02)             # a numpy-written schedule
        opt_b.param_groups[0]["lr"] = float(np.float32(0.02))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_fallback_lr_is_a_ratio_of_the_group_lr_that_survives_script_writes():
    """nanoGPT's train.py writes group["lr"] on every group each step."""
    model, ref = _model(), _model()
    spec = deepopt.muon(0.02, weight_decay=0.0).with_fallback(deepopt.adamw(0.002, weight_decay=0.0))
    assert spec.fallback_lr_ratio == pytest.approx(0.1)
    opt = torch_backend.compile(spec, model.named_parameters())
    biases = [p for n, p in ref.named_parameters() if n.endswith("bias")]
    ref_opt = torch.optim.AdamW(biases, lr=0.002, weight_decay=0.0)
    for k in range(5):
        lr = 0.02 * (k + 1) / 5                                    # warm-up written by the script
        for group in opt.param_groups:
            group["lr"] = lr
        for group in ref_opt.param_groups:
            group["lr"] = lr * spec.fallback_lr_ratio
        _step(opt, list(model.parameters()), k)
        _step(ref_opt, list(ref.parameters()), k)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if n.endswith("bias"):
            torch.testing.assert_close(p, q)
    # The default fallback states its ratio too.
    from deepopt._presets import DEFAULT_FALLBACK_LR_RATIO
    assert deepopt.muon(lr=0.02).fallback.lr == 0.02 * DEFAULT_FALLBACK_LR_RATIO
    assert deepopt.muon(lr=0.02).replace(lr=0.04).fallback.lr == 0.04 * DEFAULT_FALLBACK_LR_RATIO


def test_group_weight_decay_and_lr_reach_the_fallback_and_nested_settings_are_checked():
    model = _model()
    spec = deepopt.muon(0.02, routing=deepopt.Routing(fallback_patterns=(r"^2\.",)))
    opt = torch_backend.compile(spec, [
        {"params": list(model.named_parameters())[:2], "weight_decay": 0.3, "lr": 0.01},
        {"params": list(model.named_parameters())[2:], "fallback": {"lr": 0.001, "eps": 1e-6}}])
    parts = {(i, g["route"]): g for i, g in enumerate(opt.param_groups)}
    assert parts[(1, "fallback")]["weight_decay"] == 0.3
    assert parts[(1, "fallback")]["lr"] * parts[(1, "fallback")]["lr_ratio"] == pytest.approx(0.01 * spec.fallback_lr_ratio)
    last = opt.param_groups[-1]
    assert last["route"] == "fallback" and last["eps"] == 1e-6
    assert last["lr"] * last["lr_ratio"] == pytest.approx(0.001)
    with pytest.raises(ValueError, match="weight_decy"):
        torch_backend.compile(spec, [{"params": model.named_parameters(), "fallback": {"weight_decy": 0.1}}])
    with pytest.raises(ValueError, match="no fallback"):
        torch_backend.compile(deepopt.sgd(0.1), [{"params": model.parameters(), "fallback": {"lr": 0.1}}])
    with pytest.raises(ValueError, match="did you mean 'momentum'"):
        torch_backend.compile(deepopt.sgd(0.1), [{"params": model.parameters(), "momentm": 0.5}])


def test_extra_group_keys_are_kept_and_an_optimizer_rebuilds_from_param_groups():
    model = _model()
    spec = deepopt.muon(0.02, routing=deepopt.Routing(fallback_patterns=(r"^2\.",)))
    opt = torch_backend.compile(spec, [{"params": model.named_parameters(), "lr_scale": 0.5}])
    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)      # adds initial_lr
    assert all(g["lr_scale"] == 0.5 and "initial_lr" in g for g in opt.param_groups)
    rebuilt = torch_backend.compile(spec, [dict(g) for g in opt.param_groups])
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]  # noqa: E731
    assert strip(rebuilt.param_groups) == strip(opt.param_groups)
    assert [g["params"] for g in rebuilt.param_groups] == [g["params"] for g in opt.param_groups]


# --------------------------------------------------------------------------------------------
# Group edits and add_param_group: all or nothing
# --------------------------------------------------------------------------------------------


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params})


def _assert_unchanged(opt, params, snap):
    for p, q in zip(params, snap[0]):
        assert torch.equal(p, q)
    for p in params:
        assert set(opt.state[p]) == set(snap[1][id(p)])
        for k, v in opt.state[p].items():
            assert torch.equal(v, snap[1][id(p)][k])


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("spec,edit,match", [
    (deepopt.delta_momentum(0.05), {"readout": "newton_schulz"}, "fewer than 2 dims"),
    (deepopt.dmgd(0.05, hidden=16), {"hidden": 4}, "hidden"),
])
def test_state_layout_edits_are_refused_before_anything_changes(foreach, spec, edit, match):
    model = _model()
    params = list(model.parameters())
    opt = torch_backend.compile(spec, [{"params": params[:2]}, {"params": params[2:]}], foreach=foreach)
    _step(opt, params, 0)
    snap = _snapshot(opt, params)
    for g in opt.param_groups:
        g.update(edit) if g["route"] == "rule" else None
    with pytest.raises(ValueError, match=match):
        _step(opt, params, 1)
    _assert_unchanged(opt, params, snap)


def test_state_layout_edits_that_add_state_take_effect_from_zero():
    model = _model()
    params = list(model.parameters())
    spec = deepopt.dmgd(0.05, hidden=4)
    opt = torch_backend.compile(spec, model.named_parameters())
    _step(opt, params, 0)
    for g in opt.param_groups:
        if g["route"] == "rule":
            g.update(keys="previous", values="adam")
    _step(opt, params, 1)
    w = params[0]
    assert {"prev_key", "values_sq", "step"} <= set(opt.state[w]) and int(opt.state[w]["step"]) == 1
    # An sgd group edited from momentum 0 to 0.9 starts its buffer at zero, as a fresh sgd would.
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    opt = torch_backend.compile(deepopt.sgd(0.1), [p])
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    fresh = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), [q])
    q.data.copy_(p.detach())
    for o, x in ((opt, p), (fresh, q)):
        x.grad = torch.full((3,), 0.5)
        o.step()
    assert torch.equal(p, q)


def test_add_param_group_is_all_or_nothing():
    w, v = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    opt = torch_backend.compile(deepopt.muon(0.02), [w])
    groups = copy.copy(opt.param_groups)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [v, torch.nn.Parameter(torch.randn(3)), w]})
    with pytest.raises(ValueError, match="fallback"):
        torch_backend.compile(deepopt.muon(0.02).with_fallback(None), [v]).add_param_group(
            {"params": [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]})
    assert opt.param_groups == groups and v not in opt._names
    opt.add_param_group({"params": [v]})                         # still usable
    assert opt.param_groups[-1]["params"] == [v]


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def test_name_patterns_need_names():
    spec = deepopt.muon(0.02, routing=deepopt.Routing(fallback_patterns=(r"^2\.",)))
    with pytest.raises(ValueError, match="no names"):
        torch_backend.compile(spec, _model().parameters())
    opt = torch_backend.compile(spec, _model())                  # the module itself: named
    assert {g["route"] for g in opt.param_groups} == {"rule", "fallback"}


def test_tied_weights_match_a_pattern_on_any_of_their_names():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(10, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    spec = deepopt.muon(0.02, routing=deepopt.Routing(fallback_patterns=(r"^lm_head\.",)))
    opt = torch_backend.compile(spec, Tied())
    assert [g["route"] for g in opt.param_groups] == ["fallback"]
    assert opt.param_groups[0]["param_names"] == ["wte.weight"]


# --------------------------------------------------------------------------------------------
# torch's flags, dtypes and wording
# --------------------------------------------------------------------------------------------


def test_torch_flags_are_honoured_or_refused_clearly():
    model = _model()
    with pytest.raises(ValueError, match="`fused` and `foreach` cannot be `True` together"):
        torch_backend.compile(deepopt.adamw(), model.parameters(), fused=True, foreach=True)
    # fused=True runs torch's fused AdamW kernel (fused=False never does): the same steps.
    runs = {}
    for fused in (True, False):
        m = _model()
        opt = torch_backend.compile(deepopt.adamw(0.01), m.parameters(), fused=fused)
        _train(opt, list(m.parameters()), 3)
        runs[fused] = list(m.parameters())
    for p, q in zip(*runs.values()):
        torch.testing.assert_close(p, q)
    for flag in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=flag):
            torch_backend.compile(deepopt.adamw(), model.parameters(), **{flag: True})
    with pytest.raises(ValueError, match="torch_backend.compile"):
        deepopt.adamw(1e-3, fused=True)
    with pytest.raises(ValueError, match="AMSGrad"):
        deepopt.adamw(1e-3, amsgrad=True)
    assert deepopt.adamw(1e-3, foreach=None, fused=None, amsgrad=False) == deepopt.adamw(1e-3)
    # maximize=True on any spec equals descending on the negated gradient.
    a, b = _model(), _model()
    up = torch_backend.compile(deepopt.muon(0.02), a.named_parameters(), maximize=True, fused=False,
                               capturable=False, differentiable=False, foreach=False)
    down = torch_backend.compile(deepopt.muon(0.02), b.named_parameters())
    for k in range(3):
        for p, q, g in zip(a.parameters(), b.parameters(), _grads(list(a.parameters()), k)):
            p.grad, q.grad = g, -g
        up.step(), down.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_bf16_decoupled_weight_decay_rounds_once_like_the_single_tensor_loop():
    ps = {fe: [torch.nn.Parameter(torch.full((4, 4), 10.0, dtype=torch.bfloat16)),
               torch.nn.Parameter(torch.full((4,), 3.0, dtype=torch.bfloat16))] for fe in (True, False)}
    spec = deepopt.sgd(0.02, weight_decay=0.1, decoupled_weight_decay=True)
    for fe, params in ps.items():
        opt = torch_backend.compile(spec, params, foreach=fe)
        for _ in range(3):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
    for p, q in zip(ps[True], ps[False]):
        assert torch.equal(p, q)
    # float32 math rounded to bf16 once per step: 10 · 0.998 rounds back to 10.
    assert ps[True][0][0, 0].item() == 10.0


def test_torch_wording_is_kept():
    with pytest.raises(ValueError, match="Invalid momentum value: -0.5"):
        deepopt.sgd(0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        deepopt.adamw(-0.1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        deepopt.adamw(betas=(0.9, 1.5))
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch_backend.compile(deepopt.sgd(0.1), [p])
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _train(opt, params, steps, start=0):
    for k in range(start, start + steps):
        _step(opt, params, k)


def test_missing_hyperparameters_are_back_filled_and_a_number_step_is_accepted():
    full, part = _model(), _model()
    spec = deepopt.adamw(0.01)
    opt_full = torch_backend.compile(spec, full.parameters())
    _train(opt_full, list(full.parameters()), 6)
    opt = torch_backend.compile(spec, part.parameters())
    _train(opt, list(part.parameters()), 3)
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["eps"]                             # an older or hand-edited file
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    resumed = torch_backend.compile(spec, part.parameters())
    resumed.load_state_dict(sd)
    _train(resumed, list(part.parameters()), 3, start=3)
    for p, q in zip(full.parameters(), part.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_torch_optim_checkpoints_load_where_the_math_is_the_same(kind):
    torch_model, ours = _model(), _model()
    if kind == "adamw":
        ref = torch.optim.AdamW(torch_model.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
        spec = deepopt.adamw(0.5)
    else:
        ref = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9, dampening=0.3)
        spec = deepopt.sgd(0.5)
    _train(ref, list(torch_model.parameters()), 3)
    ours.load_state_dict(torch_model.state_dict())
    opt = torch_backend.compile(spec, ours.parameters())
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train(ref, list(torch_model.parameters()), 4, start=3)
    _train(opt, list(ours.parameters()), 4, start=3)
    for p, q in zip(torch_model.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q)
    # ... and back: torch.optim resumes from deepopt's state.
    back = (torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)(torch_model.parameters(), lr=1.0)
    back.load_state_dict(copy.deepcopy(torch_backend.to_torch_state_dict(opt)))
    torch_model.load_state_dict(ours.state_dict())
    _train(back, list(torch_model.parameters()), 2, start=7)
    _train(opt, list(ours.parameters()), 2, start=7)
    for p, q in zip(torch_model.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q)


def test_another_optimizers_checkpoint_is_refused_at_load_and_adamw_converts_into_a_fallback():
    model = _model()
    params = list(model.parameters())
    sgd_opt = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), params)
    _train(sgd_opt, params, 2)
    adamw_opt = torch_backend.compile(deepopt.adamw(0.01), params)
    with pytest.raises(ValueError, match="another optimizer"):
        adamw_opt.load_state_dict(sgd_opt.state_dict())
    assert len(adamw_opt.state) == 0

    ref_model = _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.003, weight_decay=0.0)
    _train(ref, list(ref_model.parameters()), 3)
    model.load_state_dict(ref_model.state_dict())
    spec = deepopt.muon(0.02).with_fallback(deepopt.adamw(0.003, weight_decay=0.0))
    opt = torch_backend.compile(spec, model.named_parameters())
    with pytest.raises(ValueError, match="convert_state_dict"):
        opt.load_state_dict(ref.state_dict())
    opt.load_state_dict(torch_backend.convert_state_dict(copy.deepcopy(ref.state_dict()), opt))
    names = dict(model.named_parameters())
    assert "memory" in opt.state[names["0.bias"]] and len(opt.state[names["0.weight"]]) == 0
    _train(ref, list(ref_model.parameters()), 2, start=3)
    _train(opt, params, 2, start=3)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if n.endswith("bias"):                                   # the fallback continued AdamW
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name,spec", [
    ("sgd", deepopt.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd_damped", deepopt.sgd(0.1, momentum=0.9, dampening=0.5, undamped_first_step=True)),
    ("adamw", deepopt.adamw(1e-2, weight_decay=0.1)),
    ("adamw_nesterov", deepopt.adamw(1e-2, nesterov=True)),
    ("delta", deepopt.delta_momentum(0.05, momentum=0.9, zeta=0.7, weight_decay=0.01)),
    ("m3", deepopt.m3(0.01, frequency=3, weight_decay=0.1)),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_foreach_and_single_tensor_twins_round_alike(name, spec, dtype):
    """torch's foreach ops round a Python scalar to a half dtype, Tensor ops do not: the twins
    would drift apart by ulps (131 of 320 seeded fp16 cases before)."""
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        init = [torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)]
        grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(5)]
        out = {}
        for foreach in (True, False):
            ps = [torch.nn.Parameter(p.to(dtype)) for p in init]
            opt = torch_backend.compile(spec, ps, foreach=foreach)
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.to(dtype)
                opt.step()
            out[foreach] = ps
        for a, b in zip(out[True], out[False]):
            assert torch.equal(a, b), (name, seed)


def test_torch_flags_in_a_group_are_refused_unless_false():
    model = _model()
    with pytest.raises(ValueError, match="maximize=True"):
        torch_backend.compile(deepopt.muon(0.02), [{"params": model.named_parameters(), "maximize": True}])
    with pytest.raises(ValueError, match="amsgrad=True"):
        torch_backend.compile(deepopt.adamw(), [{"params": model.parameters(), "amsgrad": True}])
    opt = torch_backend.compile(deepopt.muon(0.02), [{"params": model.named_parameters(), "maximize": False,
                                                      "foreach": None, "fused": None}])
    sgd = torch_backend.compile(deepopt.sgd(0.1), [{"params": _model().parameters(), "maximize": True}])
    assert sgd.param_groups[0]["maximize"] is True and opt.param_groups[0]["maximize"] is False


def test_the_fused_flag_decides_whether_torchs_fused_kernel_runs(monkeypatch):
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for fused, expected in ((True, 3), (None, 3), (False, 0)):
        calls.clear()
        m = _model()
        _train(torch_backend.compile(deepopt.adamw(0.01), m.parameters(), fused=fused), list(m.parameters()), 3)
        assert len(calls) == expected, (fused, len(calls))


# --------------------------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [deepopt.adamw(0.01), deepopt.dmgd(0.05, hidden=4)], ids=lambda s: s.name)
def test_grad_scaler_steps_as_unscaled_training_and_skips_a_step_with_an_inf(spec):
    """``torch.amp.GradScaler``: ``scaler.step(opt)`` unscales the gradients and then steps, so
    training with a power-of-two loss scale equals training without one, bit for bit; a step
    whose gradients hold an inf is skipped with every parameter and state entry unchanged, and
    the scale backs off."""
    plain_model, scaled_model = _model(), _model()
    plain = torch_backend.compile(spec, plain_model.named_parameters())
    scaled = torch_backend.compile(spec, scaled_model.named_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(5, 6, generator=gen)
        plain_model(x).square().sum().backward()
        plain.step()
        plain.zero_grad()
        scaler.scale(scaled_model(x).square().sum()).backward()
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
    for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
        assert torch.equal(p, q)
    params = [p.detach().clone() for p in scaled_model.parameters()]
    state = copy.deepcopy(scaled.state_dict()["state"])
    scaler.scale(scaled_model(torch.randn(5, 6, generator=gen)).square().sum()).backward()
    scaled_model[0].weight.grad[0, 0] = float("inf")
    scaler.step(scaled)
    scaler.update()
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(p, q) for p, q in zip(scaled_model.parameters(), params))
    after = scaled.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, st in state.items() for k, v in st.items())
