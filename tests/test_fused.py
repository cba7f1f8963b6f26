"""torch's fused AdamW / SGD kernels take the classic rules (torch_backend/_fused.py) and compute
what the foreach twin computes. The variants torch has no kernel for run deepopt's own on the
CPU where it is built (tests/test_native.py); here it is switched off, so they take the path
they take on CUDA and where the build failed: torch's kernel with a pass before or after it."""

from __future__ import annotations

import pytest
import torch

import deepopt
import torch_backend
from torch_backend import _fused, _native
from torch_backend._functional import step_batched

CLASSIC = {
    "adamw": deepopt.adamw(1e-2, weight_decay=0.1),
    "adamw_maximize": deepopt.adamw(1e-2, betas=(0.8, 0.99), eps=1e-6, maximize=True),
    "sgd": deepopt.sgd(0.1),
    "sgd_momentum": deepopt.sgd(0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    "sgd_nesterov": deepopt.sgd(0.05, momentum=0.9, nesterov=True, maximize=True),
    "delta_zeta0": deepopt.delta_momentum(0.05, momentum=0.9, zeta=0.0),
    # a decay pass before the kernel; torch's undamped first write as the kernel's is_first_step
    "sgd_decoupled": deepopt.sgd(0.1, momentum=0.9, weight_decay=0.05, decoupled_weight_decay=True),
    "sgd_torch_first_step": deepopt.sgd(0.1, momentum=0.9, dampening=0.3, undamped_first_step=True),
    "sgd_torch_first_step_decoupled": deepopt.sgd(0.1, momentum=0.9, dampening=0.3, weight_decay=0.05,
                                                  decoupled_weight_decay=True, undamped_first_step=True),
    # the AdamW kernel with its β₁ and lr chosen per step, then one pass putting the memory right
    "adamw_nesterov": deepopt.adamw(1e-2, nesterov=True),
    "adamw_nesterov_decay_maximize": deepopt.adamw(3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                                                   nesterov=True, maximize=True),
    "adamw_nesterov_beta1_zero": deepopt.adamw(1e-2, betas=(0.0, 0.999), weight_decay=0.1, nesterov=True),
}


@pytest.fixture(autouse=True)
def _without_deepopts_kernels(monkeypatch):
    monkeypatch.setattr(_native, "ops", lambda: None)


NOT_CLASSIC = {
    "ema_nesterov": deepopt.custom(deepopt.UpdateRule(memory=deepopt.LinearMemory(0.9, 0.1, nesterov=True)), 0.1),
    "delta": deepopt.delta_momentum(0.05, momentum=0.9),
    "muon": deepopt.muon(0.02),
    # no buffer and η ≠ 1: torch's kernel would ignore η (its dampening needs momentum)
    "stateless_damped": deepopt.custom(deepopt.UpdateRule(memory=deepopt.LinearMemory(0.0, 0.5)), 0.1),
}


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_rules_are_recognised(name):
    assert _fused.classic_kind(CLASSIC[name].rule) in ("adamw", "nadamw", "sgd")


@pytest.mark.parametrize("name", sorted(NOT_CLASSIC))
def test_other_rules_are_not(name):
    assert _fused.classic_kind(NOT_CLASSIC[name].rule) is None


def _run(spec, fused, dtype=torch.float64, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 6)]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    opt = torch_backend.compile(spec, [torch.nn.Parameter(p.clone()) for p in params])  # for its state
    ps = opt.param_groups[0]["params"]
    for p in ps:
        opt._init_state(opt.state[p], spec.rule, p, opt.param_groups[0])
    states = [opt.state[p] for p in ps]
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        with torch.no_grad():
            step_batched(spec.rule, list(ps), grads, states, lr=spec.lr, weight_decay=spec.weight_decay,
                         fused=fused)
    return [p.detach().clone() for p in ps], states


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_fused_path_runs_the_kernel_and_equals_the_foreach_twin(name, monkeypatch):
    spec = CLASSIC[name]
    calls = []
    kernel = "_fused_sgd_" if _fused.classic_kind(spec.rule) == "sgd" else "_fused_adamw_"
    real = getattr(torch, kernel)
    monkeypatch.setattr(torch, kernel, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    fused, fused_states = _run(spec, None)
    assert calls, "the fused kernel was not used"
    calls.clear()
    plain, plain_states = _run(spec, False)
    assert not calls
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for sa, sb in zip(fused_states, plain_states):          # same state layout and values
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-12)


def test_half_precision_is_fused_only_on_request():
    spec = CLASSIC["adamw"]
    bf16 = [torch.zeros(3, dtype=torch.bfloat16)]
    assert _fused.fused_groups(bf16, bf16, None) is None
    assert _fused.fused_groups(bf16, bf16, True) == [[0]]
    assert _fused.fused_groups(bf16, bf16, False) is None
    assert _fused.fused_groups(bf16, [torch.zeros(3)], True) is None        # grad of another dtype
    mixed = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(3)]
    assert _fused.fused_groups(mixed, mixed, None) == [[0, 2], [1]]
    assert _fused.classic_kind(spec.rule) == "adamw"


@pytest.mark.parametrize("name", ["sgd_torch_first_step", "adamw_nesterov_decay_maximize"])
def test_step_count_dependent_kernels_are_per_tensor_when_step_counts_differ(name):
    """A parameter without a gradient at the first step starts one step later: the SGD kernel's
    ``is_first_step`` is then true for it alone, in a call of its own, as the foreach twin's
    first write is per tensor; the Nesterov AdamW's ``c₁``, ``c₂`` are per step count too."""
    spec = CLASSIC[name]
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    runs = {}
    for fused in (None, False):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = torch_backend.compile(spec, ps, fused=fused)
        g = torch.Generator().manual_seed(5)
        for t in range(4):
            for j, p in enumerate(ps):
                p.grad = None if (t == 0 and j == 1) else torch.randn(p.shape, generator=g, dtype=p.dtype)
            opt.step()
        runs[fused] = (ps, opt)
    (fps, fopt), (pps, popt) = runs[None], runs[False]
    assert [float(fopt.state[p]["step"]) for p in fps] == [4.0, 3.0]
    for a, b in zip(fps, pps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for key in fopt.state[a]:
            torch.testing.assert_close(fopt.state[a][key], popt.state[b][key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw_nesterov", "adamw_nesterov_decay_maximize"])
def test_nesterov_adamw_through_the_kernel_in_float32(name):
    """In float32 the kernel path (the memory rewritten from the kernel's ``S'`` each step)
    stays within float32 rounding of the foreach twin over many steps, parameters and state."""
    spec = CLASSIC[name]
    fused, fused_states = _run(spec, None, dtype=torch.float32, steps=40)
    plain, plain_states = _run(spec, False, dtype=torch.float32, steps=40)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for sa, sb in zip(fused_states, plain_states):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_nesterov_adamw_in_half_precision_keeps_the_foreach_twin(monkeypatch):
    """``fused=True`` takes half precision for the classic rules, not for the Nesterov AdamW: its
    memory, written by the kernel and restored by a ``lerp``, would be rounded to bf16 twice a
    step (4 bf16 ulps from the twin after five steps, where AdamW's kernel is 1). Its bf16 steps
    stay the foreach twin's, bit for bit."""
    spec = CLASSIC["adamw_nesterov_decay_maximize"]
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    half, half_states = _run(spec, True, dtype=torch.bfloat16, steps=5)
    assert not calls
    twin, twin_states = _run(spec, False, dtype=torch.bfloat16, steps=5)
    for a, b in zip(half, twin):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    _run(spec, True, dtype=torch.float32, steps=1)              # float32: the kernel, with fused=True too
    assert calls


def test_nesterov_adamw_with_a_zero_lr_changes_no_parameter():
    """γ = 0: the kernel's lr is 0 and so is its weight decay (γλ = 0), parameters unchanged;
    the moments are still written, as the foreach twin writes them."""
    spec = deepopt.adamw(0.0, weight_decay=0.1, nesterov=True)
    init, _ = _run(spec, None, steps=0)
    fused, fused_states = _run(spec, None, steps=3)
    plain, plain_states = _run(spec, False, steps=3)
    for a, b, c in zip(fused, plain, init):
        assert torch.equal(a, c) and torch.equal(b, c)
    for sa, sb in zip(fused_states, plain_states):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", [deepopt.adamw(1e-2), deepopt.adamw(1e-2, nesterov=True),
                                  deepopt.sgd(0.1, momentum=0.9, dampening=0.3, undamped_first_step=True),
                                  deepopt.dmgd(1e-2, values="adam", readout=None)],
                         ids=["adamw", "adamw_nesterov", "sgd_torch_first_step", "dmgd_adam_values"])
def test_step_counts_are_one_stack_that_advances_as_separate_counts_would(spec):
    """Eagerly a group's counts are the elements of one 1-D stack (``_foreach.advance``: one
    ``add_``, not one op per count). Each count still advances only with its parameter's
    gradient; after a load, a deepcopy or a parameter left out the counts are stacked anew and
    go on from where they were; the step equals the foreach twin's with separate counts."""
    import copy

    from torch_backend._foreach import stack_of

    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    runs = {}
    for fused in (None, False):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        runs[fused] = (ps, torch_backend.compile(spec, ps, fused=fused))
    counts = {None: [], False: []}
    g = torch.Generator().manual_seed(7)
    for t in range(7):
        grads = [None if (t in (0, 3) and j == 2) else torch.randn(x.shape, generator=g) for j, x in enumerate(init)]
        for fused, (ps, opt) in runs.items():
            for p, gr in zip(ps, grads):
                p.grad = None if gr is None else gr.clone()
            if t == 4:                                     # a load, then a deepcopy: fresh count tensors
                ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
                opt2 = torch_backend.compile(spec, ps2, fused=fused)
                opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
                ps, opt = runs[fused] = copy.deepcopy((ps2, opt2))   # with its own parameters
                for p, gr in zip(ps, grads):
                    p.grad = None if gr is None else gr.clone()
            opt.step()
            counts[fused].append([float(opt.state[p]["step"]) for p in ps if "step" in opt.state[p]])
            if fused is None:                              # eager: a group's counts are one stack
                for group in opt.param_groups:
                    steps = [opt.state[p]["step"] for p in group["params"] if p.grad is not None]
                    assert not steps or (stack_of(steps, ()) is not None and stack_of(steps, ()).dim() == 1)
    expected = [[1, 1], [2, 2, 1], [3, 3, 2], [4, 4, 2], [5, 5, 3], [6, 6, 4], [7, 7, 5]]
    assert counts[None] == expected and counts[False] == expected
    (a, oa), (b, ob) = runs[None], runs[False]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        for key in oa.state[x]:
            torch.testing.assert_close(oa.state[x][key], ob.state[y][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "adamw_nesterov", "sgd_decoupled"])
@pytest.mark.parametrize("case", ["transposed_parameter", "transposed_gradient"])
def test_tensors_with_other_strides_take_the_foreach_twin(name, case):
    """torch's fused kernels walk each tensor's storage in order: a transposed parameter (whose
    state is contiguous) or a gradient with other strides took a wrong step (0.05–0.7 off after
    three steps, as ``torch.optim.AdamW(fused=True)`` is in torch 2.13). Such a group takes the
    foreach twin."""
    spec = CLASSIC[name]
    runs = {}
    for fused in (None, False):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        p = torch.nn.Parameter(x.t().clone() if case == "transposed_parameter" else x.clone())
        opt = torch_backend.compile(spec, [p], fused=fused)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            grad = torch.randn(p.shape[::-1], generator=g, dtype=torch.float64)
            p.grad = grad.t() if case == "transposed_gradient" else grad.t().contiguous()
            opt.step()
        runs[fused] = p.detach()
    assert not (runs[None].is_contiguous() and case == "transposed_parameter")
    torch.testing.assert_close(runs[None], runs[False], rtol=0, atol=1e-12)
