"""DMGD's C++ kernel for CPU buckets (torch_backend/csrc/deep_memory.cpp, called by
``_deep_memory._native_kernel``): what eager CPU optimizers run, equal to the op-by-op kernel
within float rounding for every variant and for shapes that reach every tail of its loops
(rows not a multiple of the register tile, columns not a multiple of the vector lanes, a
hidden width padded to the lanes, several row blocks); the same bits for a matrix whatever
bucket or thread count it runs in; and, where it cannot take a bucket, nothing written and the
Python kernel run instead."""

from __future__ import annotations

import copy

import pytest
import torch

import deepopt
import torch_backend
from torch_backend import _deep_memory, _native

from _helpers import DEEP_MEMORY_VARIANTS, random_steps

VARIANTS = DEEP_MEMORY_VARIANTS
# (bucket, m, n): one row block and a 1×1 matrix; rows and columns off the tile and the lanes;
# several row blocks (~64 KB of rows each: 512 columns make blocks of 30 float32 rows, or of
# 12 float64 ones, so 50 rows are two blocks, the last one short, or five).
SHAPES = [(3, 7, 5), (1, 1, 1), (2, 13, 21), (2, 50, 512), (1, 70, 300)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=2e-4, atol=2e-6)}


def _inputs(mem: deepopt.DeepMemory, b, m, n, dtype, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)   # noqa: E731
    h = mem.hidden
    prev = torch.nn.functional.normalize(r(b, m, n), dim=-1) if mem.keys == "previous" else None
    return {"s": r(b, m, n) * scale, "w1": r(b, h, n), "w2": r(b, n, h) * 0.1,
            "nu": torch.full((b, 1, 1), scale, dtype=dtype), "prev": prev,
            "g": [r(m, n) * scale for _ in range(b)]}


def _call(native, mem, st, g, v, out, params=(), lr=0.0):
    return native.dmgd_memory_(st["s"], st["w1"], st["w2"], st["nu"], g, v, st["prev"], out, list(params), lr,
                               mem.momentum, mem.inner_lr, mem.scale_decay, mem.key_eps, mem.SILU_SLOPE_SQ,
                               mem.objective == "dot", mem.nesterov)


def _state(x: dict) -> dict:
    return {k: (None if v is None else [t.clone() for t in v] if isinstance(v, list) else v.clone())
            for k, v in x.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("values", ["grads", "separate"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_equals_the_op_by_op_kernel(native, variant, shape, values, dtype):
    mem = deepopt.DeepMemory(**VARIANTS[variant])
    b, m, n = shape
    x = _inputs(mem, b, m, n, dtype)
    vs = [g * 0.7 + 1e-4 for g in x["g"]] if values == "separate" else []
    g = torch.stack(x["g"])
    ref = _state(x)
    out_ref = _deep_memory.deep_memory_kernel(mem, ref["s"], ref["w1"], ref["w2"], ref["nu"], g,
                                              torch.stack(vs) if vs else g, ref["prev"])
    ours = _state(x)
    out = torch.full_like(g, float("nan"))                      # every entry written
    assert _call(native, mem, ours, x["g"], vs, out) is True
    tol = TOL[dtype]
    torch.testing.assert_close(out, out_ref[4], **tol, msg="D")
    for key in ("s", "w1", "w2", "nu"):                         # written in place
        torch.testing.assert_close(ours[key], ref[key], **tol, msg=key)
    if mem.keys == "previous":                                  # the next key: Ĝ
        torch.testing.assert_close(ours["prev"], out_ref[5], **tol, msg="previous key")
    for a, b_ in zip(ours["g"], x["g"]):                        # the gradients are only read
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", ["default", "dot_previous", "no_nesterov"])
def test_kernel_makes_the_outer_step_given_the_parameters(native, variant, dtype):
    """With the parameters and lr, the read goes into W ← W − γ D̃ in its own pass: the same
    parameters as D̃ then torch's ``add_``, the same state, and the output buffer untouched."""
    mem = deepopt.DeepMemory(**VARIANTS[variant])
    b, m, n = 2, 50, 40
    x = _inputs(mem, b, m, n, dtype)
    params = [torch.randn(m, n, dtype=dtype) for _ in range(b)]
    ref, ours = _state(x), _state(x)
    out_ref = torch.empty_like(x["s"])
    assert _call(native, mem, ref, x["g"], [], out_ref)
    stepped = [p.clone() for p in params]
    for p, d in zip(stepped, out_ref):
        p.add_(d, alpha=-0.1)
    out = torch.full_like(x["s"], float("nan"))
    versions = [p._version for p in params]
    assert _call(native, mem, ours, x["g"], [], out, params, 0.1)
    assert out.isnan().all()                                    # D̃ went into the step, not here
    assert all(p._version > v for p, v in zip(params, versions))
    for p, q in zip(params, stepped):
        torch.testing.assert_close(p, q, **TOL[dtype])
    for key in ("s", "w1", "w2", "nu", "prev"):
        if ref[key] is not None:
            assert torch.equal(ours[key], ref[key]), key


def test_kernel_steps_many_times_like_the_op_by_op_kernel(native):
    """Forty steps of a stream of gradients (float32, the default memory): the memory's state
    does not drift from the op-by-op kernel's beyond rounding."""
    mem = deepopt.DeepMemory()
    x = _inputs(mem, 2, 37, 45, torch.float32)
    ref, ours = _state(x), _state(x)
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        gs = [torch.randn(37, 45, generator=gen) * 10 ** torch.empty(()).uniform_(-3, 2, generator=gen)
              for _ in range(2)]
        out_ref = _deep_memory.deep_memory_kernel(mem, ref["s"], ref["w1"], ref["w2"], ref["nu"],
                                                  torch.stack(gs), torch.stack(gs), None)[4]
        out = torch.empty_like(ref["s"])
        assert _call(native, mem, ours, gs, [], out)
        torch.testing.assert_close(out, out_ref, rtol=1e-3, atol=1e-5 * out_ref.abs().max().item())
    for key in ("s", "w1", "w2", "nu"):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-3, atol=1e-5 * ref[key].abs().max().item())


def test_a_matrix_gets_the_same_bits_in_any_bucket_and_on_any_thread_count(native):
    mem = deepopt.DeepMemory()
    x = _inputs(mem, 4, 40, 33, torch.float32)
    whole = _state(x)
    out = torch.empty_like(whole["s"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _call(native, mem, whole, x["g"], [], out)
    finally:
        torch.set_num_threads(threads)
    for j in range(4):                                          # each matrix alone, one thread
        one = {k: None if v is None else (v[j:j + 1].clone() if torch.is_tensor(v) else [v[j]])
               for k, v in x.items()}
        out1 = torch.empty_like(one["s"])
        assert _call(native, mem, one, one["g"], [], out1)
        assert torch.equal(out1[0], out[j])
        for key in ("s", "w1", "w2", "nu"):
            assert torch.equal(one[key][0], whole[key][j]), key


def _refusals(x):
    """What the op must refuse: (what, inputs changed)."""
    g = x["g"]
    return {
        "a transposed gradient": dict(g=[g[0].t().contiguous().t()] + g[1:]),
        "a float64 gradient": dict(g=[g[0].double()] + g[1:]),
        "a gradient of another size": dict(g=[g[0][:-1]] + g[1:]),
        "one gradient too few": dict(g=g[:-1]),
        "one value too few": dict(v=[t.clone() for t in g[:-1]]),
        "a meta value": dict(v=[torch.empty_like(g[0], device="meta")] + [t.clone() for t in g[1:]]),
        "a non-contiguous memory": dict(s=x["s"].transpose(1, 2).contiguous().transpose(1, 2)),
        "W₁ of another width": dict(w1=x["w1"][:, :-1]),
        "ν of another length": dict(nu=x["nu"][:-1]),
        "a half-precision state": dict(s=x["s"].half(), w1=x["w1"].half(), w2=x["w2"].half(),
                                       nu=x["nu"].half(), g=[t.half() for t in g]),
        "a bfloat16 output": dict(out=torch.zeros(x["s"].shape, dtype=torch.bfloat16)),
        "no output and no parameters": dict(out=None),
        "no MLP (h = 0)": dict(w1=x["w1"][:, :0], w2=x["w2"][:, :, :0]),
        "a transposed parameter": dict(params=[x["s"][0].t().contiguous().t().clone(), x["s"][1].clone()]),
        "a float64 parameter": dict(params=[x["s"][0].double(), x["s"][1].clone()]),
        "one parameter too few": dict(params=[x["s"][0].clone()]),
    }


@pytest.mark.parametrize("what", list(_refusals(_inputs(deepopt.DeepMemory(), 2, 5, 4, torch.float32))))
def test_kernel_refuses_what_it_cannot_take_and_writes_nothing(native, what):
    mem = deepopt.DeepMemory(keys="previous")
    x = _inputs(mem, 2, 5, 4, torch.float32)
    args = {**x, "v": [], "out": torch.zeros_like(x["s"]), "params": []}
    args.update(_refusals(x)[what])
    before = copy.deepcopy(args)
    st = {k: args[k] for k in ("s", "w1", "w2", "nu", "prev")}
    assert _call(native, mem, st, args["g"], args["v"], args["out"], args["params"], 0.1) is False
    for key, value in before.items():
        for a, b in zip(value if isinstance(value, list) else [value], args[key] if isinstance(value, list) else [args[key]]):
            if a is not None and a.device.type != "meta":
                assert torch.equal(a, b), key


def test_kernel_marks_what_it_writes(native):
    """Version counters move, as torch's in-place ops move them: autograd refuses a backward
    through a state tensor the step changed."""
    mem = deepopt.DeepMemory(keys="previous")
    x = _inputs(mem, 2, 5, 4, torch.float32)
    out = torch.empty_like(x["s"])
    written = [x[k] for k in ("s", "w1", "w2", "nu", "prev")] + [out]
    versions = [t._version for t in written]
    assert _call(native, mem, x, x["g"], [], out)
    assert all(t._version > v for t, v in zip(written, versions))


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (6, 5), "b": (6, 5), "c": (6, 5), "d": (9, 2, 4), "bias": (6,)}
    return {k: torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for k, s in shapes.items()}


def _train(spec, steps=5, dtype=torch.float32):
    params = _params(dtype)
    opt = torch_backend.compile(spec, list(params.items()))
    random_steps(opt, params, steps)
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("spec", ["memory_alone", "deep_muon", "adam_values"])
def test_optimizers_run_it_and_equal_the_python_kernel(native, spec, dtype, monkeypatch):
    spec = {"memory_alone": deepopt.dmgd(0.02, readout=None),
            "deep_muon": deepopt.dmgd(0.02),
            "adam_values": deepopt.dmgd(0.02, values="adam", objective="dot", readout=None)}[spec]
    calls = []
    real = _deep_memory._native_kernel
    monkeypatch.setattr(_deep_memory, "_native_kernel", lambda *a: (lambda d: (calls.append(d), d)[1])(real(*a)))
    pc, oc = _train(spec, dtype=dtype)
    assert calls and all(d is not False for d in calls)        # every bucket, every step: the C++ kernel
    identity = isinstance(spec.rule.readout, deepopt.Identity)   # which also makes the outer step
    assert all((d is None) == identity for d in calls)
    monkeypatch.setattr(_native, "ops", lambda: None)          # deepopt's kernels off: fused_kernel
    pp, op = _train(spec, dtype=dtype)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-5)
    for k in pc:
        torch.testing.assert_close(pc[k], pp[k], **tol, msg=k)
        for key, val in oc.state[pc[k]].items():
            torch.testing.assert_close(val, op.state[pp[k]][key], **tol, msg=f"{k} {key}")


@pytest.mark.parametrize("applies", [True, False], ids=["outer_step_by_bucket", "outer_step_after"])
def test_the_kernel_stacks_no_gradients_and_needs_no_buffer_when_it_steps(native, applies, monkeypatch):
    """The C++ kernel reads each gradient where it is: no step-shared stack of the gradients.
    Where it makes the outer step itself there is no buffer for D̃ either; where the caller
    makes the step afterwards, each bucket keeps one between steps."""
    from deepopt import DeepMemory
    from torch_backend import _functional

    monkeypatch.setitem(_functional.MEMORIES, DeepMemory, _deep_memory.KERNEL._replace(applies=applies))
    params = _params(torch.float64)
    opt = torch_backend.compile(deepopt.dmgd(0.02, readout=None), list(params.items()))
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
    first = opt.state[params["a"]]["memory"]
    bucket = first._base                                        # the (3, 6, 5) bucket's stack
    assert all(use != "grads" for _, use in _deep_memory._STACKS.get(first, {}))
    if applies:
        assert not _deep_memory._STACKS.get(first) and bucket not in _deep_memory._WORK
    else:
        assert [tuple(w.shape) for w in _deep_memory._WORK[bucket]] == [(3, 6, 5)]


def test_a_transposed_parameter_takes_its_read_out_and_the_outer_step_apart(native, monkeypatch):
    """The kernel writes a contiguous parameter's step itself; a transposed one gets D̃ back and
    the caller's outer step, with the same result."""
    calls = []
    real = _deep_memory._native_kernel
    monkeypatch.setattr(_deep_memory, "_native_kernel", lambda *a: (lambda d: (calls.append(d), d)[1])(real(*a)))
    w = torch.randn(6, 4, dtype=torch.float64)
    params = {"w": torch.nn.Parameter(w.t().contiguous().t())}   # (6, 4), column-major
    ref = {"w": torch.nn.Parameter(w.clone())}
    opts = [torch_backend.compile(deepopt.dmgd(0.02, readout=None), list(p.items())) for p in (params, ref)]
    g = torch.randn(6, 4, dtype=torch.float64)
    for _ in range(3):
        params["w"].grad, ref["w"].grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    # column-major: the step is not taken (False), D̃ is (a tensor); row-major: the step (None)
    assert [d is False for d in calls] == [True, False, False] * 3
    assert [d is None for d in calls] == [False, False, True] * 3
    assert not params["w"].is_contiguous()
    torch.testing.assert_close(params["w"], ref["w"], rtol=1e-12, atol=1e-14)


def test_a_refused_bucket_runs_the_python_kernel(native, monkeypatch):
    """A bucket the op refuses (here a transposed gradient) takes fused_kernel, and the step is
    still the update."""
    calls = []
    real = _deep_memory.fused_kernel
    monkeypatch.setattr(_deep_memory, "fused_kernel", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    params = {"w": torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))}
    ref = {"w": torch.nn.Parameter(params["w"].detach().clone())}
    opt = torch_backend.compile(deepopt.dmgd(0.02, readout=None), list(params.items()))
    opt_ref = torch_backend.compile(deepopt.dmgd(0.02, readout=None), list(ref.items()))
    g = torch.randn(6, 4, dtype=torch.float64)
    params["w"].grad, ref["w"].grad = g.t(), g.t().contiguous()
    opt.step()
    assert calls == [1]
    opt_ref.step()
    torch.testing.assert_close(params["w"], ref["w"], rtol=1e-10, atol=1e-13)
