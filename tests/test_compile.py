"""``torch.compile(opt.step)``: every spec of the table traces into one graph (no ``.item()``,
no data-dependent branch) and computes what the eager step computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo

import deepopt
import torch_backend
from torch_backend import _native

# Entries whose math reads the step count t (bias corrections, torch's first write, M3's
# period): where a graph used to break. The default run checks them on the default (foreach)
# path; `-m slow` checks every entry of the table on both twins.
T_DEPENDENT = ("sgd_damped_torch", "adamw_nesterov", "muon_optax", "dmgd_dot_previous_adam", "m3")


def _model(device: str = "cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)).double().to(device)


def _check_compiled_equals_eager(spec, foreach: bool, device: str = "cpu", backend: str = "eager",
                                 tensor_lr: bool | str = False, rtol: float = 1e-12, atol: float = 1e-14) -> None:
    """``backend="eager"``: the graph, not inductor's kernels; ``tensor_lr``: the compiled
    optimizer's groups take their lr as a float64 tensor on the parameters' device (``"cpu"``:
    on the CPU, where a scheduler keeps it, whatever the parameters' device)."""
    eager_model, compiled_model, eager, traced, step = _twins(spec, backend, foreach=foreach, device=device)
    if tensor_lr:                                            # before the first (compiling) call
        for group in traced.param_groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float64, device="cpu" if tensor_lr == "cpu" else device)
    gen = torch.Generator().manual_seed(1)
    for t in range(4):                                       # m3 entries write their slow level
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(device)
            q.grad = p.grad.clone()
        eager.step()
        if t == 1:                                           # state exists: the steady-state step
            explained = dynamo.explain(traced.step)()
            assert explained.graph_break_count == 0, _why(explained)
        else:
            step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)
        for key, value in eager.state[p].items():
            got = traced.state[q][key]
            if key == "step":   # dynamo moves an optimizer's step counts to the parameters' device
                got = got.to(value.device)   # (its `_init_group` hook, as for torch.optim's own)
            torch.testing.assert_close(got, value, rtol=rtol, atol=atol,
                                       msg=lambda m, key=key: f"state[{key!r}]: {m}")


def _twins(spec, backend: str, foreach: bool | None = None, device: str = "cpu"):
    """Two equal models, each with an optimizer of ``spec``, and the second's step compiled
    with ``backend``: ``(eager_model, compiled_model, eager, traced, compiled step)``."""
    eager_model = _model(device)
    compiled_model = copy.deepcopy(eager_model)
    eager = torch_backend.compile(spec, eager_model.named_parameters(), foreach=foreach)
    traced = torch_backend.compile(spec, compiled_model.named_parameters(), foreach=foreach)
    dynamo.reset()
    return eager_model, compiled_model, eager, traced, torch.compile(traced.step, backend=backend)


def _why(explained) -> str:
    """Where the graph broke: dynamo's reasons with their frames, and each graph's last ops (a
    break with no recorded reason still shows where one graph ends and the next begins)."""
    reasons = [f"{r.reason} at {[str(f)[:120] for f in (r.user_stack or [])[-2:]]}" for r in explained.break_reasons]
    ends = [[str(op)[:80] for op in ops[-3:]] for ops in explained.ops_per_graph]
    return f"{explained.graph_count} graphs; reasons {reasons}; each graph's last ops {ends}"


@pytest.mark.specs(*T_DEPENDENT)
def test_compiled_step_has_no_graph_break_and_equals_eager(spec):
    _check_compiled_equals_eager(spec, foreach=True)


@pytest.mark.slow
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_every_spec_compiles_whole_on_both_twins(spec, foreach):
    _check_compiled_equals_eager(spec, foreach)


@pytest.mark.gpu
@pytest.mark.specs(*T_DEPENDENT)
def test_compiled_step_on_cuda_has_no_graph_break_and_equals_eager(spec):
    """On CUDA a graph break at the step count or the lr would also be a host sync."""
    _check_compiled_equals_eager(spec, foreach=True, device="cuda")


def test_t_dependent_scalars_are_made_once_into_one_buffer():
    """A compiled step's per-tensor scalars (bias corrections, step sizes: 0-d tensors, Python
    numbers mixed in) become the entries of one float64 buffer, so inductor's loops read them
    instead of recomputing each (a power per element, in float64) inside every element's loop."""
    from torch_backend._foreach import made

    values = [torch.tensor(2.0, dtype=torch.float64), 3.0, torch.tensor(0.5, dtype=torch.float32)]
    got = made(values, [torch.zeros(2)] * 3)
    assert [float(v) for v in got] == [2.0, 3.0, 0.5]
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in got)
    assert got[0]._base is not None and all(v._base is got[0]._base for v in got)
    numbers = [1.0, 2.0]                                        # Python numbers only: as they are
    assert made(numbers, [torch.zeros(1)] * 2) is numbers
    # Each value lives where the tensor that reads it lives (no host scalar reaches a device
    # kernel): one buffer for tensors on one device, else each value on its own tensor's device.
    meta = made([torch.tensor(1.0), 2.0], [torch.zeros(1, device="meta")] * 2)
    assert all(v.device.type == "meta" for v in meta) and meta[0]._base is meta[1]._base
    split = made([torch.tensor(1.0), 2.0], [torch.zeros(1), torch.zeros(1, device="meta")])
    assert [v.device.type for v in split] == ["cpu", "meta"] and float(split[0]) == 1.0


@pytest.mark.specs("sgd_heavy_ball", "adamw", "dmgd_newton_schulz")
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_inductor_compiled_step_equals_eager(spec, tensor_lr):
    """Through inductor's kernels (not only the graph), with the scalars made once, a float or
    a tensor lr: the same parameters and state as the eager step, to float64 rounding. Two
    failures this caught: under compile the classic rules take the foreach twin (inductor
    cannot trace torch's fused kernels, and ``torch.compile(opt.step)`` of plain
    ``deepopt.sgd`` or ``deepopt.adamw`` failed, with a float lr as with a tensor one); DMGD's
    ν of float64 parameters is written through a view (AOTAutograd dropped the write into the
    0-d tensor, and the compiled run drifted from the eager one from its second step)."""
    _check_compiled_equals_eager(spec, foreach=True, backend="inductor", tensor_lr=tensor_lr)


@pytest.mark.slow
@pytest.mark.specs("adamw_nesterov", "sgd_damped_torch", "sgd_decoupled_decay", "dmgd_dot_previous_adam", "m3",
                   "muon", "delta_momentum")
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_inductor_compiled_step_equals_eager_more_rules(spec, tensor_lr):
    _check_compiled_equals_eager(spec, foreach=True, backend="inductor", tensor_lr=tensor_lr)


@pytest.mark.gpu
@pytest.mark.specs("sgd_heavy_ball", "adamw", "dmgd_newton_schulz")
@pytest.mark.parametrize("tensor_lr", [False, True, "cpu"], ids=["float_lr", "tensor_lr", "cpu_tensor_lr"])
def test_inductor_compiled_step_on_cuda_equals_eager(spec, tensor_lr):
    """Through inductor's CUDA kernels, where the eager step runs torch's fused kernels. On an
    H100 with torch 2.11 the first compiled step of adamw (float lr) and DMGD (float and tensor
    lr) failed to launch a kernel ("CUDA driver error: invalid argument") that took a
    t-dependent scalar computed on the CPU, from a step count made in that step; with t, the
    made scalars and a CPU tensor lr on the parameters' device, all nine cases pass there."""
    _check_compiled_equals_eager(spec, foreach=True, device="cuda", backend="inductor", tensor_lr=tensor_lr)


@pytest.mark.slow
def test_every_spec_through_inductor_equals_eager(spec, spec_name):
    """The whole table through inductor's kernels (several minutes). Half-precision steps are compared
    with inductor rounding each bf16 intermediate as eager does (``emulate_precision_casts``;
    without it a bf16 Newton–Schulz differs from eager by its rounding, ~2% of an entry after
    four steps). ``muon_float32``'s float32 products, which inductor orders its own way, are
    compared to float32 rounding (they differ by ~1e-6 relative)."""
    import torch._inductor.config as inductor_config

    tolerance = {"rtol": 1e-5, "atol": 1e-7} if spec_name == "muon_float32" else {}
    with inductor_config.patch(emulate_precision_casts=True):
        _check_compiled_equals_eager(spec, foreach=True, backend="inductor", **tolerance)


@pytest.mark.specs("adamw_nesterov", "dmgd_newton_schulz")
def test_compiled_step_after_a_checkpoint_round_trip_and_a_missing_gradient_equals_eager(spec):
    """Dynamo guards the state by identity (its optimizer hook): ``load_state_dict`` puts new
    tensors in the state, and a step without one parameter's gradient gathers other lists; the
    compiled step must follow both (a recompile), not replay a graph over the old tensors."""
    eager_model, compiled_model, eager, traced, step = _twins(spec, "eager")
    gen = torch.Generator().manual_seed(2)
    for t in range(6):
        for i, (p, q) in enumerate(zip(eager_model.parameters(), compiled_model.parameters())):
            p.grad = None if (t == 4 and i == 1) else torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = None if p.grad is None else p.grad.clone()
        eager.step()
        step()
        if t == 2:
            for opt in (eager, traced):
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_first_compiled_steps_compile_as_many_frames_for_any_number_of_parameters():
    """The first compiled step makes the state of every parameter outside the graph, in one
    call: traced, DMGD's W₁ (a draw seeded by the parameter's name) broke the graph inside a
    per-parameter frame, dynamo compiled that frame once per parameter, and past its
    recompile limit (8) the rest of the first step ran uncompiled."""
    from torch._dynamo.utils import counters

    def frames(n_params: int) -> int:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4, bias=False) for _ in range(n_params)]).double()
        opt = torch_backend.compile(deepopt.dmgd(0.02, hidden=2, ns_dtype="input"), model.named_parameters())
        dynamo.reset()
        counters.clear()
        step = torch.compile(opt.step, backend="eager")
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            step()
        assert all(len(opt.state[p]) > 0 for p in model.parameters())
        return counters["frames"]["total"]

    assert frames(12) == frames(3)


@pytest.mark.specs("adamw", "adamw_nesterov", "sgd_decoupled_decay", "muon_bfloat16", "dmgd", "m3")
def test_tensor_lr_stays_a_tensor_and_a_scheduler_recompiles_nothing(spec):
    """A tensor lr under ``torch.compile(opt.step)``, as torch.optim takes one: no ``.item()``
    (the steady-state step is one graph), a scheduler writing into it compiles nothing new, the
    step never writes into it (the fallback's lr_ratio multiplies a copy), and the parameters
    and state are the eager run's with a float lr and the same schedule (a bf16 read-out is
    scaled by a tensor step size in the parameters' precision, as ``alpha=`` does eagerly)."""
    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    eager = torch_backend.compile(spec, eager_model.named_parameters())
    traced = torch_backend.compile(spec, compiled_model.named_parameters())
    lrs = [torch.tensor(group["lr"], dtype=torch.float64) for group in traced.param_groups]
    for group, lr in zip(traced.param_groups, lrs):
        group["lr"] = lr
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (eager, traced)]
    compiled = {"graphs": 0}

    def counting(gm, example_inputs):
        compiled["graphs"] += 1
        return gm.forward

    dynamo.reset()
    step = torch.compile(traced.step, backend=counting)
    gen = torch.Generator().manual_seed(3)
    for t in range(6):
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        if t == 2:
            explained = dynamo.explain(traced.step)()
            assert explained.graph_break_count == 0, _why(explained)
            compiled["graphs"] = 0
        else:
            step()
        eager.step()
        before = [float(lr) for lr in lrs]
        for schedule in schedules:
            schedule.step()
        assert [float(lr) for lr in lrs] == pytest.approx([0.7 * b for b in before], rel=1e-12)
        assert all(group["lr"] is lr for group, lr in zip(traced.param_groups, lrs))
    assert compiled["graphs"] <= 1, f"{compiled['graphs']} graphs compiled after the steady state began"
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("spec", [deepopt.adamw(1e-2, nesterov=True),
                                  deepopt.sgd(0.1, momentum=0.9, dampening=0.3, undamped_first_step=True)],
                         ids=["adamw_nesterov", "sgd_torch_first_step"])
def test_a_step_compiled_after_eager_steps_equals_eager(spec, monkeypatch):
    """Eager steps make a group's step counts one stack (``_foreach.advance``): compiled after
    them, the step takes those counts as views of one tensor that it writes (AOTAutograd's
    aliased inputs) and still traces into one graph, counting as the eager step does. (With
    deepopt's CPU kernels these variants advance their counts in the kernel, so the eager
    steps here run torch's, as on CUDA.)"""
    monkeypatch.setattr(_native, "ops", lambda: None)
    eager_model, compiled_model, eager, traced, step = _twins(spec, "aot_eager")
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        eager.step()
        if t < 2:
            traced.step()
        elif t == 2:
            first = next(iter(traced.state.values()))["step"]
            assert first._base is not None and first._base.numel() == 4   # one stack of the four counts
            explained = dynamo.explain(traced.step)()
            assert explained.graph_break_count == 0, _why(explained)
        else:
            step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
        assert float(traced.state[q]["step"]) == float(eager.state[p]["step"]) == 6.0
