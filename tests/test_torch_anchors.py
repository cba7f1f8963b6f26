"""Oracle (c): deepopt through torch_backend == torch.optim, step by step."""

from __future__ import annotations

import pytest
import torch

import deepopt
import torch_backend

SHAPES = [(5, 3), (3,), (4, 6), (2, 3, 2)]
MATRIX_SHAPES = [(5, 3), (3, 7), (8, 8), (6, 4)]


def _run_pair(make_anchor, spec, shapes, *, steps=32, dtype=torch.float64, seed=0, foreach=None):
    """Drive the anchor optimizer and the compiled spec with the same gradients; return max error."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    anchor, ours = make_anchor(a), torch_backend.compile(spec, b, foreach=foreach)
    err = 0.0
    for _ in range(steps):
        grads = [torch.randn(*s, generator=gen, dtype=dtype) for s in shapes]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        anchor.step()
        ours.step()
        err = max(err, max((p - q).abs().max().item() for p, q in zip(a, b)))
    moved = max((p - q).abs().max().item() for p, q in zip(a, init))
    assert moved > 1e-3, "parameters did not move: the comparison would be vacuous"
    return err


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.8, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
]


@pytest.mark.parametrize("kw", SGD_CASES, ids=str)
@pytest.mark.parametrize("foreach", [True, False])
def test_sgd_equals_torch(kw, foreach):
    err = _run_pair(lambda p: torch.optim.SGD(p, **kw), deepopt.sgd(**kw), SHAPES, foreach=foreach)
    assert err < 1e-12


def test_sgd_dampening_reproduces_torch_only_under_flag():
    kw = dict(lr=0.1, momentum=0.9, dampening=0.3)
    anchor = lambda p: torch.optim.SGD(p, **kw)  # noqa: E731
    assert _run_pair(anchor, deepopt.sgd(**kw, undamped_first_step=True), SHAPES) < 1e-12
    # docs/math.md §2 default: S_0 = 0 and every write damped — differs from torch from step 1 on.
    assert _run_pair(anchor, deepopt.sgd(**kw), SHAPES) > 1e-3


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.0, maximize=True),
], ids=str)
@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_equals_torch(kw, foreach):
    err = _run_pair(lambda p: torch.optim.AdamW(p, **kw), deepopt.adamw(**kw), SHAPES, foreach=foreach)
    assert err < 1e-12


@pytest.mark.parametrize("kw", [
    dict(lr=0.02),
    dict(lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(lr=0.01, adjust_lr_fn="match_rms_adamw", weight_decay=0.05),
    dict(lr=0.02, ns_steps=3, ns_coefficients=(3.0, -3.2, 1.2), eps=1e-6),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_muon_equals_torch(kw, dtype):
    # Both run Newton–Schulz in bfloat16 (torch's convention, deepopt.muon's default): the
    # tolerance is a few bf16 ulps of an O(1) update scaled by lr, accumulated over the steps.
    err = _run_pair(lambda p: torch.optim.Muon(p, **kw), deepopt.muon(**kw), MATRIX_SHAPES, dtype=dtype)
    assert err < 50 * kw["lr"] * 2**-8


def test_muon_differs_from_torch_when_conventions_differ():
    # optax's conventions (NS in the input dtype, +eps, bias correction) are not torch's: the
    # anchor test above must be able to fail.
    spec = deepopt.muon(0.02, ns_dtype="float64", ns_normalization="add", bias_correction=True)
    err = _run_pair(lambda p: torch.optim.Muon(p, lr=0.02), spec, MATRIX_SHAPES, steps=5)
    assert err > 1e-4


def test_delta_momentum_zeta0_equals_sgd_momentum_torch():
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    err = _run_pair(lambda p: torch.optim.SGD(p, **kw), deepopt.delta_momentum(**kw, zeta=0.0),
                    MATRIX_SHAPES)
    assert err < 1e-12


@pytest.mark.parametrize("make_sched", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=40),
], ids=["step", "cosine", "onecycle"])
def test_lr_schedulers_act_like_on_torch_sgd(make_sched):
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    oa = torch.optim.SGD(a, lr=0.1, momentum=0.9)
    ob = torch_backend.compile(deepopt.sgd(0.1, momentum=0.9), b)
    sa, sb = make_sched(oa), make_sched(ob)
    lrs = []
    for _ in range(30):
        grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step(), ob.step(), sa.step(), sb.step()
        lrs.append(ob.param_groups[0]["lr"])
    assert len(set(lrs)) > 3, "the schedule did not change the lr"
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
