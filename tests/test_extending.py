"""docs/extending.md's worked example runs as written, and a new part is one table entry per
backend: its state comes from its slots on every backend, and a part with no kernel is refused
by name."""

from __future__ import annotations

import copy
import pathlib
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import deepopt
import jax_backend
import torch_backend
from deepopt import reference

from _helpers import optax_states

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"
TABLES = (reference.MEMORIES, torch_backend.MEMORIES, jax_backend.MEMORIES)


def _worked_example() -> str:
    text = DOC.read_text()
    section = text[text.index("### Worked example"):text.index("## 3. The tests")]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


@pytest.fixture
def example():
    """The example's namespace; its table entries are removed afterwards."""
    before = [dict(t) for t in TABLES]
    namespace: dict = {"__name__": "__extending__"}
    exec(compile(_worked_example(), "docs/extending.md (worked example)", "exec", dont_inherit=True), namespace)
    yield namespace
    for table, saved in zip(TABLES, before):
        table.clear()
        table.update(saved)


def test_worked_example_registers_one_entry_per_backend(example):
    cls = example["TwoSpeedMemory"]
    assert all(cls in table for table in TABLES)
    assert reference.MEMORIES[cls] is example["two_speed"]


def test_worked_example_state_comes_from_its_slots_on_every_backend(example):
    cls = example["TwoSpeedMemory"]
    spec = deepopt.custom(deepopt.UpdateRule(memory=cls(), values=deepopt.AdamValues()), lr=0.1)
    keys = [slot.key for slot in spec.rule.state_slots()]
    assert keys == ["step", "values_sq", "memory", "slow_memory"]

    assert list(reference.init(spec, {"w": np.zeros((3, 4))})["w"]) == keys
    w = torch.nn.Parameter(torch.zeros(3, 4))
    opt = torch_backend.compile(spec, [w])
    w.grad = torch.ones_like(w)
    opt.step()
    assert list(opt.state[w]) == keys
    assert all(opt.state[w][k].shape == w.shape for k in keys[1:])

    state = jax_backend.compile(spec).init({"w": np.zeros((3, 4), np.float32)})
    (ours,) = optax_states(state, example["TwoSpeedState"])
    assert ours.memory["w"].shape == ours.slow_memory["w"].shape == ours.values_sq["w"].shape == (3, 4)


def test_worked_example_trains_and_its_slow_level_matters(example):
    cls = example["TwoSpeedMemory"]
    grads = [{"w": np.full((2, 3), g)} for g in (1.0, -1.0, 1.0)]
    params = {"w": np.zeros((2, 3))}
    mixed = deepopt.custom(deepopt.UpdateRule(memory=cls(slow_weight=3.0)), lr=0.1)
    plain = deepopt.custom(deepopt.UpdateRule(memory=cls(slow_weight=0.0)), lr=0.1)
    with pytest.raises(AssertionError):                     # the reduction check can fail
        deepopt.testing.assert_reduces_to(mixed, plain, params, grads)


@dataclass(frozen=True)
class _Unregistered(deepopt.Memory):
    def state_slots(self):
        return (deepopt.Slot("memory"),)


def test_a_memory_with_no_kernel_is_refused_by_name():
    spec = deepopt.custom(deepopt.UpdateRule(memory=_Unregistered()), lr=0.1)
    with pytest.raises(NotImplementedError, match=r"_Unregistered.*deepopt\.reference\.MEMORIES"):
        reference.step(spec, {"w": np.zeros(3)}, {"w": np.ones(3)}, reference.init(spec, {"w": np.zeros(3)}))
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    with pytest.raises(NotImplementedError, match=r"_Unregistered.*torch_backend\._functional"):
        torch_backend.compile(spec, [w]).step()
    with pytest.raises(NotImplementedError, match=r"_Unregistered.*jax_backend\._compile"):
        jax_backend.compile(spec)


def test_update_rule_names_the_allowed_parts():
    with pytest.raises(ValueError, match=r"memory=3 is invalid: expected one of DeepMemory, LinearMemory"):
        deepopt.UpdateRule(memory=3)
    with pytest.raises(ValueError, match=r"readout=.*expected one of Identity, NewtonSchulz, Sign"):
        deepopt.UpdateRule(readout=deepopt.LinearMemory())


@dataclass(frozen=True)
class _Ema(deepopt.Memory):
    """An EMA memory under a state key no built-in part uses."""

    def state_slots(self):
        return (deepopt.Slot("ema_buffer"),)


def _ema_kernel(rule, states, gs, vs, ts, layouts=None):
    bufs = [st["ema_buffer"] for st in states]
    torch._foreach_lerp_(bufs, vs, 0.5)
    return torch_backend.Read(torch_backend.apply_readout(rule, [b.clone() for b in bufs], layouts))


def test_a_new_parts_state_round_trips_through_a_checkpoint(monkeypatch):
    monkeypatch.setitem(torch_backend.MEMORIES, _Ema, torch_backend.MemoryKernel(batched=_ema_kernel))
    spec = deepopt.custom(deepopt.UpdateRule(memory=_Ema()), lr=0.1)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    grads = [torch.randn(3, 4) for _ in range(4)]
    opt = torch_backend.compile(spec, [w])
    for g in grads[:2]:
        w.grad = g
        opt.step()
    assert list(opt.state[w]) == ["ema_buffer"]
    saved, w_saved = copy.deepcopy(opt.state_dict()), w.detach().clone()

    w2 = torch.nn.Parameter(w_saved.clone())
    resumed = torch_backend.compile(spec, [w2])
    resumed.load_state_dict(saved)
    for g in grads[2:]:
        w.grad, w2.grad = g, g.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(w2, w, rtol=0, atol=0)
