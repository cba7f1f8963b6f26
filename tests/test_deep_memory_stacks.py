"""DMGD's persistent state stacks (torch_backend/_deep_memory.py): a bucket's state lives in
stacks whose rows are the parameters' state entries, so a steady-state step neither stacks nor
copies state; whatever breaks the rows (load_state_dict, deepcopy, pickling, a parameter
without a gradient, a new group) is stacked anew once, and every result equals, bit for bit,
the path that stacks and copies back on every step. These compare bit for bit with the op-by-op
kernel (``FUSED = False``); the fused CPU kernel equals it within rounding
(tests/test_deep_memory_fast.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.overrides import TorchFunctionMode

import deepopt
import torch_backend
from torch_backend import _deep_memory

# Three same-shape matrices (one bucket of three), a 3-D kernel with the same matrix view
# (4 × 6) in that bucket too, a bucket of one and a vector (the fallback).
SHAPES = {"a": (4, 6), "b": (4, 6), "c": (4, 6), "d": (4, 3, 2), "e": (6, 5), "bias": (6,)}
VARIANTS = {
    "default": {},
    "memory_alone": {"readout": None},
    "dot_previous_adam": {"objective": "dot", "keys": "previous", "values": "adam", "readout": None},
    "nesterov_momentum": {"momentum": 0.9, "nesterov": True},
    "no_mlp": {"hidden": 0, "readout": None},
}
KEYS = ("memory", "mlp_w1", "mlp_w2", "value_scale", "prev_key")


@pytest.fixture(autouse=True)
def _op_by_op(monkeypatch):
    """Bit-for-bit comparisons need the op-by-op kernel on both sides."""
    monkeypatch.setattr(_deep_memory, "FUSED", False)


def _spec(variant: str) -> deepopt.Spec:
    return deepopt.dmgd(0.02, **VARIANTS[variant])


def _params(dtype=torch.float64) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for k, s in SHAPES.items()}


def _grads(steps: int, dtype=torch.float64, missing: dict[int, str] | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in range(steps):
        out.append({k: None if (missing or {}).get(t) == k else torch.randn(s, generator=gen, dtype=dtype)
                    for k, s in SHAPES.items()})
    return out


def _step(opt, params, grads) -> None:
    for k, p in params.items():
        p.grad = grads[k]
    opt.step()


def _copy_path_run(mem, sts, gs, vs, shape, rebind, flats=None, shared=False, outer=None):
    """The path before persistent stacks: stack the gradients, values and state, run the
    kernel on new tensors, copy the state back."""
    g = torch.stack([x.reshape(shape) for x in gs])
    v = torch.stack([x.reshape(shape) for x in vs])
    s, w1, w2, nu, prev = _deep_memory.state_stacks(mem, sts, shape)
    s, w1, w2, nu, d, g_hat = _deep_memory.deep_memory_kernel(mem, s, w1, w2, nu, g, v, prev)
    _deep_memory.state_writeback(mem, sts, s, w1, w2, nu, g_hat)
    return d


def _snapshot(opt, params) -> tuple[dict, dict]:
    state = {k: {key: v.clone() for key, v in opt.state[p].items()} for k, p in params.items()}
    return {k: p.detach().clone() for k, p in params.items()}, state


def _assert_equal(a, b) -> None:
    (pa, sa), (pb, sb) = a, b
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
        assert sa[k].keys() == sb[k].keys(), k
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)


def _run(variant, grads, *, foreach=True, fused=None, copy_path=False, monkeypatch=None, between=None):
    """Parameters and state after ``grads``; ``between(t, opt, params) -> (opt, params)`` runs
    after step t (a reload, a copy, …)."""
    params = _params()
    opt = torch_backend.compile(_spec(variant), list(params.items()), foreach=foreach, fused=fused)
    with monkeypatch.context() as mp:
        if copy_path:
            mp.setattr(_deep_memory, "_run", _copy_path_run)
        for t, g in enumerate(grads):
            _step(opt, params, g)
            if between is not None:
                opt, params = between(t, opt, params)
    return _snapshot(opt, params)


class _StateTraffic(TorchFunctionMode):
    """Counts ``torch.stack`` calls reading a state entry and ``copy_`` calls writing one."""

    def __init__(self, opt):
        super().__init__()
        self.entries = [v for st in opt.state.values() for k, v in st.items() if k in KEYS]
        self.ptrs = {v.data_ptr() for v in self.entries}
        self.stacks = self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.stack and any(x.data_ptr() in self.ptrs for x in args[0]):
            self.stacks += 1
        if func is torch.Tensor.copy_ and any(args[0] is v for v in self.entries):
            self.copies += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_steady_state_steps_neither_stack_nor_copy_state(variant, foreach, fused, monkeypatch):
    monkeypatch.setattr(_deep_memory, "FUSED", fused)
    params = _params()
    opt = torch_backend.compile(_spec(variant), list(params.items()), foreach=foreach)
    grads = _grads(4)
    _step(opt, params, grads[0])                    # the first step makes the stacks
    ptrs = {(k, key): v.data_ptr() for k, p in params.items() for key, v in opt.state[p].items()}
    entries = {(k, key): v for k, p in params.items() for key, v in opt.state[p].items()}
    for g in grads[1:]:
        with _StateTraffic(opt) as traffic:
            _step(opt, params, g)
        assert (traffic.stacks, traffic.copies) == (0, 0)
    after = {(k, key): v for k, p in params.items() for key, v in opt.state[p].items()}
    assert all(after[x] is entries[x] and after[x].data_ptr() == ptrs[x] for x in ptrs)
    if foreach:                                     # one bucket: rows of one stack per entry
        bucket = [opt.state[params[k]] for k in ("a", "b", "c", "d")]
        for key in bucket[0]:
            if key in KEYS:
                base = bucket[0][key]._base
                assert base is not None and base.shape[0] == 4
                assert all(st[key]._base is base for st in bucket)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_persistent_stacks_equal_stacking_every_step(variant, foreach, monkeypatch):
    """Bit for bit, through a missing gradient (the bucket shrinks, then grows back)."""
    grads = _grads(6, missing={2: "b", 3: "a"})
    ours = _run(variant, grads, foreach=foreach, monkeypatch=monkeypatch)
    copied = _run(variant, grads, foreach=foreach, copy_path=True, monkeypatch=monkeypatch)
    _assert_equal(ours, copied)


def _reload(kind: str):
    """After step 2: a fresh optimizer loading a copy of the state dict, a deepcopy of the
    optimizer and its parameters, or a pickle round trip (torch.save / torch.load)."""

    def between(t, opt, params):
        if t != 2:
            return opt, params
        spec, foreach = opt.spec, opt._foreach
        if kind == "load_state_dict":
            fresh = torch_backend.compile(spec, list(params.items()), foreach=foreach)
            fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
            return fresh, params
        if kind == "deepcopy":
            return copy.deepcopy((opt, params))
        buf = io.BytesIO()
        torch.save((opt, params), buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return between


@pytest.mark.parametrize("kind", ["load_state_dict", "deepcopy", "pickle"])
@pytest.mark.parametrize("variant", ["default", "dot_previous_adam"])
def test_resume_after_a_copy_equals_the_unbroken_run(variant, kind, monkeypatch):
    grads = _grads(6)
    unbroken = _run(variant, grads, monkeypatch=monkeypatch)
    resumed = _run(variant, grads, monkeypatch=monkeypatch, between=_reload(kind))
    _assert_equal(resumed, unbroken)
    copied = _run(variant, grads, copy_path=True, monkeypatch=monkeypatch, between=_reload(kind))
    _assert_equal(resumed, copied)


def test_a_loaded_state_is_restacked_once_then_persists():
    params = _params()
    spec = _spec("default")
    opt = torch_backend.compile(spec, list(params.items()))
    grads = _grads(5)
    for g in grads[:2]:
        _step(opt, params, g)
    fresh = torch_backend.compile(spec, list(params.items()))
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    with _StateTraffic(fresh) as traffic:           # the loaded entries are no stack's rows
        _step(fresh, params, grads[2])
    assert traffic.stacks > 0 and traffic.copies == 0
    for g in grads[3:]:
        with _StateTraffic(fresh) as traffic:
            _step(fresh, params, g)
        assert (traffic.stacks, traffic.copies) == (0, 0)


def test_state_dict_holds_each_parameter_s_own_rows():
    """A checkpoint of persistent stacks round-trips: each entry has its parameter's shape and
    values, and a torch.save of the whole state dict stores each stack once."""
    params = _params()
    opt = torch_backend.compile(_spec("default"), list(params.items()))
    for g in _grads(2):
        _step(opt, params, g)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    for i, (k, p) in enumerate(params.items()):
        for key, value in opt.state[p].items():
            assert torch.equal(loaded["state"][i][key], value), (k, key)
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert buf.getbuffer().nbytes < 2 * state_bytes + 20_000


def test_a_new_param_group_joins_the_bucket(monkeypatch):
    grads = _grads(5)

    def add_group(t, opt, params):
        if t == 1:
            extra = torch.nn.Parameter(torch.ones(4, 6, dtype=torch.float64))
            opt.add_param_group({"params": [("extra", extra)]})
            params = {**params, "extra": extra}
        return opt, params

    def with_extra_grads(run_grads):
        gen = torch.Generator().manual_seed(2)
        return [{**g, "extra": torch.randn(4, 6, generator=gen, dtype=torch.float64)} for g in run_grads]

    def run(copy_path):
        params = _params()
        opt = torch_backend.compile(_spec("memory_alone"), list(params.items()))
        extra_grads = with_extra_grads(grads)
        with monkeypatch.context() as mp:
            if copy_path:
                mp.setattr(_deep_memory, "_run", _copy_path_run)
            for t, g in enumerate(grads):
                _step(opt, params, {**g, "extra": extra_grads[t]["extra"]} if "extra" in params else g)
                opt, params = add_group(t, opt, params)
        return _snapshot(opt, params)

    _assert_equal(run(False), run(True))


def test_eager_stacks_then_compiled_steps_equal_eager(monkeypatch):
    """Eager steps leave the state as rows of stacks; a compiled step then stacks and copies
    back (one graph), and equals the eager run. (The AdamW fallback runs its foreach twin on
    both sides: a compiled step does not run torch's fused kernel.)"""
    grads = _grads(5)
    eager = _run("default", grads, fused=False, monkeypatch=monkeypatch)
    params = _params()
    opt = torch_backend.compile(_spec("default"), list(params.items()), fused=False)
    torch._dynamo.reset()
    compiled = torch.compile(opt.step, backend="eager")
    for t, g in enumerate(grads):
        for k, p in params.items():
            p.grad = g[k]
        (opt.step if t < 2 else compiled)()
    _assert_equal(_snapshot(opt, params), eager)


@pytest.mark.parametrize("applies", [True, False], ids=["outer_step_by_bucket", "outer_step_after"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
def test_cpu_workspace_is_reused_is_not_state_and_goes_with_the_optimizer(fused, applies, monkeypatch):
    """On CPU the kernel's full-size temporaries are kept between steps (a fresh megabyte came
    back from the OS as new pages every step); they are no state and die with the optimizer.
    The fused kernel needs one (P, then D̃), the op-by-op kernel two (Ĝ then D̃; F then E). The
    buckets of more than one share one buffer for the gradients' stack, as large as the
    largest; when the outer step is made bucket by bucket (``applies``: D̃ is spent before the
    next bucket runs) they share the workspace too, else each bucket keeps its own. (The Python
    kernels: deepopt's C++ kernel stacks no gradients, tests/test_deep_memory_native.py.)"""
    import gc

    from deepopt import DeepMemory
    from torch_backend import _functional, _native

    gc.collect()          # an earlier test's optimizer in a reference cycle: not counted below
    monkeypatch.setattr(_native, "ops", lambda: None)
    monkeypatch.setattr(_deep_memory, "FUSED", fused)
    monkeypatch.setitem(_functional.MEMORIES, DeepMemory, _deep_memory.KERNEL._replace(applies=applies))
    k = 1 if fused else 2
    params = _params()
    opt = torch_backend.compile(_spec("memory_alone"), list(params.items()))
    grads = _grads(3)
    for g in grads[:2]:                                   # the first step rebinds the entries
        _step(opt, params, g)
    bucket = opt.state[params["a"]]["memory"]._base       # the (4, 4, 6) bucket's memory stack
    single = opt.state[params["e"]]["memory"]              # a bucket of one: its entry
    first = opt.state[params["a"]]["memory"]               # the first parameter's: the buffers' key
    shared = _deep_memory._STACKS[first]
    uses = ["grads"] + ([f"work{j}" for j in range(k)] if applies else [])
    assert sorted(shared) == sorted((torch.float64, use) for use in uses)
    assert all(tuple(shared[(torch.float64, use)].shape) == (4 * 4 * 6,) for use in uses)   # the largest
    if applies:
        assert bucket not in _deep_memory._WORK and single not in _deep_memory._WORK
    else:
        work = {id(bucket): _deep_memory._WORK[bucket], id(single): _deep_memory._WORK[single]}
        assert [tuple(w.shape) for w in work[id(bucket)]] == [(4, 4, 6)] * k
        assert [tuple(w.shape) for w in work[id(single)]] == [(1, 6, 5)] * k
    before = dict(shared)
    _step(opt, params, grads[2])
    assert all(_deep_memory._STACKS[first][key] is buf for key, buf in before.items())
    if not applies:
        assert _deep_memory._WORK[bucket] is work[id(bucket)]
        del work
    slots = {slot.key for slot in _spec("memory_alone").rule.state_slots()}
    dmgd_states = [st for st in opt.state_dict()["state"].values() if "mlp_w1" in st]   # not the fallback's
    assert len(dmgd_states) == 5 and all(set(st) == slots for st in dmgd_states)
    n, n_stacks, n_rows = len(_deep_memory._WORK), len(_deep_memory._STACKS), len(_deep_memory._ROWS)
    assert first in _deep_memory._ROWS and single not in _deep_memory._ROWS   # a bucket of one: no cache
    del opt, bucket, single, first, shared, before, dmgd_states
    gc.collect()
    assert len(_deep_memory._WORK) == n - (0 if applies else 2)
    assert len(_deep_memory._STACKS) == n_stacks - 1
    assert len(_deep_memory._ROWS) == n_rows - 1


@pytest.mark.parametrize("key", ["memory", "mlp_w2", "value_scale"])
def test_an_entry_replaced_between_steps_is_restacked(key, monkeypatch):
    """The bucket's stacks are cached by the identity of its entries (``_ROWS``): an entry
    replaced by an equal tensor (a user's assignment) is found and stacked anew, and the run
    goes on as if nothing happened."""
    grads = _grads(5)

    def replace(t, opt, params):
        if t == 1:
            st = opt.state[params["b"]]
            st[key] = st[key].clone()
        return opt, params

    unbroken = _run("memory_alone", grads, monkeypatch=monkeypatch)
    replaced = _run("memory_alone", grads, monkeypatch=monkeypatch, between=replace)
    _assert_equal(replaced, unbroken)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outer_step_by_bucket_equals_the_outer_step_after(variant, fused, monkeypatch):
    """The outer step made bucket by bucket as the read-outs are ready (``MemoryKernel.applies``),
    with decoupled decay, equals bit for bit the one made after every bucket."""
    from deepopt import DeepMemory
    from torch_backend import _functional

    monkeypatch.setattr(_deep_memory, "FUSED", fused)
    grads = _grads(5, missing={2: "b"})

    def run(applies):
        with monkeypatch.context() as mp:
            mp.setitem(_functional.MEMORIES, DeepMemory, _deep_memory.KERNEL._replace(applies=applies))
            params = _params()
            opt = torch_backend.compile(deepopt.dmgd(0.02, weight_decay=0.1, **VARIANTS[variant]),
                                        list(params.items()))
            for g in grads:
                _step(opt, params, g)
            return _snapshot(opt, params)

    _assert_equal(run(True), run(False))
