"""deepopt's own CPU kernels (torch_backend/_native.py, csrc/elementwise.cpp): the element-wise
variants torch has no fused kernel for run them, compute what the foreach twin computes, and
leave every tensor as it was where they cannot take a step."""

from __future__ import annotations

import copy

import pytest
import torch

import deepopt
import torch_backend
from torch_backend import _fused, _native

from _helpers import ELEMENTWISE_VARIANTS, count_fused_kernels, spy_ops

VARIANTS = ELEMENTWISE_VARIANTS
SHAPES = [(5, 3), (3,), (4, 6), (1,)]


@pytest.fixture
def calls(native, monkeypatch):
    """Counts the kernel's step calls and what they returned, its ``fused_groups`` checks, and
    torch's fused kernels' calls."""
    seen = {"native": [], "checks": 0, "torch": 0}

    def record(name, result):
        if name == "fused_groups":
            seen["checks"] += 1
        else:
            seen["native"].append(result)

    spy = spy_ops(native, record)
    monkeypatch.setattr(_native, "ops", lambda: spy)
    count_fused_kernels(monkeypatch, seen)
    return seen


def _train(spec, fused, *, dtype=torch.float64, steps=6, init=None, skip_first=()):
    """``steps`` steps of ``spec`` on SHAPES (or ``init``); the parameters in ``skip_first`` get no
    gradient at the first step. Returns the parameters and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    init = init if init is not None else [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = torch_backend.compile(spec, ps, fused=fused)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        for j, p in enumerate(ps):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.grad = None if (t == 0 and j in skip_first) else grad
        opt.step()
    return ps, opt


def _assert_same(a, b, *, rtol=0.0, atol=1e-12):
    (ps, opt), (qs, oqt) = a, b
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        assert opt.state[p].keys() == oqt.state[q].keys()
        for key in opt.state[p]:
            torch.testing.assert_close(opt.state[p][key], oqt.state[q][key], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_run_deepopts_kernel_and_equal_the_foreach_twin(name, calls):
    spec = VARIANTS[name]
    assert _fused.is_variant(_fused.classic_kind(spec.rule), spec.rule, spec.weight_decay)
    kernel = _train(spec, None, skip_first=(1,))
    assert calls["native"] == [True] * 6 and calls["torch"] == 0
    twin = _train(spec, False, skip_first=(1,))
    assert calls["native"] == [True] * 6 and calls["torch"] == 0
    _assert_same(kernel, twin)
    # a parameter without a gradient at the first step starts one step later (t per tensor)
    assert [float(kernel[1].state[p]["step"]) for p in kernel[0] if "step" in kernel[1].state[p]] in (
        [], [6.0, 5.0, 6.0, 6.0])


@pytest.mark.parametrize("name", ["sgd_torch_first_step_decoupled", "adamw_nesterov_decay_maximize"])
def test_float32_stays_within_rounding_of_the_foreach_twin(name, calls):
    spec = VARIANTS[name]
    kernel, twin = _train(spec, None, dtype=torch.float32, steps=40), _train(spec, False, dtype=torch.float32, steps=40)
    assert calls["native"] == [True] * 40
    _assert_same(kernel, twin, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_take_one_call(calls):
    spec = VARIANTS["adamw_nesterov"]
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen, dtype=torch.float64)]
    kernel, twin = _train(spec, None, init=init, steps=3), _train(spec, False, init=init, steps=3)
    assert calls["native"] == [True] * 3
    _assert_same(kernel, twin, rtol=1e-6, atol=1e-7)


def test_the_kernel_refuses_a_list_it_cannot_take_whole_before_writing(native):
    """Every tensor is checked before any is written: a list whose last entry the kernel cannot
    take (non-contiguous, another dtype, another size, a count that is not float32) returns
    False with every parameter, buffer and count as it was."""
    def lists():
        gen = torch.Generator().manual_seed(3)
        make = lambda *s: torch.randn(*s, generator=gen)
        return [make(4), make(3, 2)], [make(4), make(3, 2)], [make(4), make(3, 2)], [make(4), make(3, 2)], \
            [torch.tensor(2.0), torch.tensor(5.0)]
    bad = {"non_contiguous": lambda x: torch.randn(2, 3).t(), "dtype": lambda x: x.double(),
           "size": lambda x: torch.randn(5)}
    for which in range(4):
        for how, spoil in bad.items():
            ps, gs, bs, vs, steps = lists()
            [ps, gs, bs, vs][which][1] = spoil([ps, gs, bs, vs][which][1])
            before = copy.deepcopy((ps, gs, bs, vs, steps))
            if which < 3:                                  # SGD has no second moment
                assert not native.sgd_(ps, gs, bs, steps, 0.1, 0.1, True, 0.9, 0.1, False, False), (which, how)
            assert not native.nadamw_(ps, gs, bs, vs, steps, 0.1, 0.9, 0.99, 1e-8, 0.1, False), (which, how)
            for xs, ys in zip((ps, gs, bs, vs, steps), before):
                assert all(torch.equal(x, y) for x, y in zip(xs, ys)), (which, how)
    ps, gs, bs, vs, steps = lists()
    for where in ("meta", "cuda"):                 # another device: False, not the dispatcher's error
        if where == "cuda" and not torch.cuda.is_available():
            continue
        other = [x.to(where) for x in ps]
        assert not native.sgd_(other, [x.to(where) for x in gs], [x.to(where) for x in bs], [], 0.1, 0.0, True,
                               0.9, 0.0, False, False)
        assert not native.sgd_([ps[0], other[1]], gs, bs, [], 0.1, 0.0, True, 0.9, 0.0, False, False)
        assert torch.equal(ps[0], lists()[0][0])
    assert not native.nadamw_(ps, gs, bs, vs, [steps[0], steps[1].double()], 0.1, 0.9, 0.99, 1e-8, 0.1, False)
    assert not native.nadamw_(ps, gs, bs, vs, [], 0.1, 0.9, 0.99, 1e-8, 0.1, False)   # NAdam needs t
    assert float(steps[0]) == 2.0


@pytest.mark.parametrize("name", ["sgd_torch_first_step_decoupled", "adamw_nesterov_decay_maximize"])
def test_a_transposed_parameter_takes_the_foreach_twin(name, calls):
    """torch's kernels and deepopt's walk storage in order; a transposed parameter (its state
    is contiguous) is refused by deepopt's kernel, with nothing written, and by
    ``_fused.fused_groups``: the foreach twin takes the step."""
    spec = VARIANTS[name]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(6, 4, generator=gen, dtype=torch.float64).t(), torch.randn(5, generator=gen,
                                                                                   dtype=torch.float64)]
    kernel = _train(spec, None, init=init, steps=4)
    assert calls["native"] == [False] * 4 and calls["torch"] == 0
    _assert_same(kernel, _train(spec, False, init=init, steps=4))


def test_half_precision_keeps_torchs_kernel(calls, monkeypatch):
    """``fused=True`` in bfloat16: the kernel takes float32/float64 only, so the step is torch's
    kernel with its decay pass, bit for bit what it is without deepopt's kernels."""
    spec = VARIANTS["sgd_decoupled"]
    init = [torch.randn(4, 5, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)]
    kernel = _train(spec, True, init=init, steps=3)
    assert calls["native"] == [False] * 3 and calls["torch"] == 3
    monkeypatch.setattr(_native, "ops", lambda: None)
    without = _train(spec, True, init=init, steps=3)
    assert torch.equal(kernel[0][0], without[0][0])


def test_fused_false_and_the_classic_rules_never_run_it(calls):
    _train(VARIANTS["adamw_nesterov"], False)
    _train(deepopt.adamw(1e-2, weight_decay=0.1), None)
    _train(deepopt.sgd(0.1, momentum=0.9, weight_decay=0.01), None)   # coupled decay: torch's own SGD
    _train(deepopt.sgd(0.1, momentum=0.9, decoupled_weight_decay=True), None)   # λ = 0: nothing to decouple
    assert calls["native"] == [] and calls["torch"] == 18
    assert calls["checks"] == 18                        # the classic rules' checks, in C++ once built


def test_a_checkpoint_moves_between_the_kernel_and_the_twin(native):
    """The state is the same entries either way: three steps through the kernel, saved, loaded
    into a ``fused=False`` optimizer and three more equal six steps of the twin."""
    spec = VARIANTS["sgd_torch_first_step_decoupled"]
    ps, opt = _train(spec, None, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    oqt = torch_backend.compile(spec, qs, fused=False)
    oqt.load_state_dict(saved)
    g = torch.Generator().manual_seed(9)
    twin_ps, twin = _train(spec, False, steps=3)
    for _ in range(3):
        for p, q in zip(qs, twin_ps):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        oqt.step()
        twin.step()
    _assert_same((qs, oqt), (twin_ps, twin))


@pytest.mark.parametrize("name", ["adamw_nesterov_decay_maximize", "sgd_torch_first_step_decoupled"])
def test_threads_split_the_list_without_changing_a_bit(native, name):
    """The list's elements, all tensors together, are split across torch's threads (ranges may
    end inside a tensor or span several small ones); an element's arithmetic does not depend
    on which thread does it."""
    spec = VARIANTS[name]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(300, 1000, generator=gen), *(torch.randn(7, 11, generator=gen) for _ in range(30)),
            torch.randn(20000, generator=gen), torch.zeros(0), torch.randn(3, generator=gen)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _train(spec, None, init=init, steps=2)
        torch.set_num_threads(2)
        two = _train(spec, None, init=init, steps=2)
    finally:
        torch.set_num_threads(threads)
    _assert_same(one, two, atol=0.0)


def test_the_setting_and_a_failed_build(monkeypatch):
    from torch.utils import cpp_extension

    build = _native.ops.__wrapped__                       # uncached, so each case builds anew
    monkeypatch.setenv("DEEPOPT_NATIVE", "0")
    monkeypatch.setattr(cpp_extension, "load", lambda **k: pytest.fail("built with DEEPOPT_NATIVE=0"))
    assert build() is None

    def fail(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setenv("DEEPOPT_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here.*DEEPOPT_NATIVE=0"):
        assert build() is None
    monkeypatch.setenv("DEEPOPT_NATIVE", "1")
    with pytest.raises(RuntimeError, match="DEEPOPT_NATIVE=1.*no compiler here"):
        build()
    monkeypatch.setenv("DEEPOPT_NATIVE", "yes")
    with pytest.raises(ValueError, match=r"DEEPOPT_NATIVE='yes' is invalid: expected one of auto, 0, 1"):
        build()


def test_a_failed_build_leaves_the_step_to_torchs_path(monkeypatch):
    """Where the kernels are not built the variants run as before (torch's kernel with a pass)."""
    monkeypatch.setattr(_native, "ops", lambda: None)
    spec = VARIANTS["adamw_nesterov"]
    _assert_same(_train(spec, None), _train(spec, False))


def test_the_build_is_named_by_its_source_and_torch(monkeypatch, tmp_path):
    name = _native.build_name()
    assert name.startswith("deepopt_kernels_") and name == _native.build_name()
    names = set()
    for k, source in enumerate(_native.SOURCES):              # each source: copied, or edited
        copied, edited = tmp_path / f"a{k}" / source.name, tmp_path / f"b{k}" / source.name
        for path, extra in ((copied, b""), (edited, b"\n// edited\n")):
            path.parent.mkdir()
            path.write_bytes(source.read_bytes() + extra)
            monkeypatch.setattr(_native, "SOURCES", tuple(path if s == source else s for s in _native.SOURCES))
            names.add(_native.build_name())
            monkeypatch.undo()
    assert len(names | {name}) == 5      # another install's copy, or an edit: a build of its own


def test_a_step_marks_what_it_wrote_for_autograd(native):
    """Like torch's in-place ops, the kernel bumps the version of every tensor it writes, so a
    backward through a value the step changed raises instead of using the new value."""
    x = torch.randn(5, requires_grad=True)
    y = x * 2
    loss = (y * y).sum()                                   # saves y for the backward
    buf, count = torch.zeros(5), torch.tensor(0.0)
    with torch.no_grad():
        assert native.sgd_([y], [torch.randn(5)], [buf], [count], 0.1, 0.0, False, 0.9, 0.0, False, False)
    assert y._version == buf._version == count._version == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_fused_groups_in_cpp_equals_the_python_checks(native, monkeypatch):
    """``fused_groups``' checks made by the C++ op (where the kernels are built) group and refuse
    exactly as the Python loop does, over random lists: dtypes, devices (meta stands in for a
    device the fused kernels do not take), transposed parameters or gradients, gradients of
    another dtype or device, sparse gradients."""
    import random

    rng = random.Random(0)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

    def tensor(dtype, device="cpu", transposed=False):
        x = torch.zeros(3, 2, dtype=dtype, device=device)
        return x.t() if transposed else x

    cases = 0
    for _ in range(400):
        params, grads = [], []
        for _ in range(rng.randint(1, 5)):
            dtype = rng.choice(dtypes)
            p = tensor(dtype, "meta" if rng.random() < 0.05 else "cpu", rng.random() < 0.1)
            g = tensor(dtype, p.device, rng.random() < 0.1)
            roll = rng.random()
            if roll < 0.05:
                g = g.to(rng.choice(dtypes))
            elif roll < 0.08:
                g = torch.zeros(p.shape, dtype=dtype).to_sparse()
            params.append(p)
            grads.append(g)
        for fused, kind in ((None, "sgd"), (True, "adamw"), (True, "nadamw")):
            monkeypatch.setattr(_native, "loaded", lambda: native)
            in_cpp = _fused.fused_groups(params, grads, fused, kind)
            monkeypatch.setattr(_native, "loaded", lambda: None)
            in_python = _fused.fused_groups(params, grads, fused, kind)
            assert in_cpp == in_python, ([(p.dtype, p.device, p.stride()) for p in params], fused, kind)
            cases += in_python is not None
    assert cases > 100                                   # both outcomes were reached often


def test_the_classic_rules_use_the_kernels_checks_only_once_built(native, monkeypatch, tmp_path):
    """``loaded()`` never builds: with nothing built in the extensions directory the classic
    rules keep the Python checks; once built (here: the library's file appears), they load it."""
    calls = []
    monkeypatch.setattr(_native, "ops", lambda: (calls.append(1), native)[1])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_built", None)
    assert _native.loaded() is None and not calls
    built = _native.library()
    built.parent.mkdir(parents=True)
    built.touch()
    assert _native.loaded() is None and not calls          # looked once: no file check every step
    monkeypatch.setattr(_native, "_built", None)
    assert _native.loaded() is native and calls == [1]
    monkeypatch.setattr(_native, "_built", None)
    monkeypatch.setenv("DEEPOPT_NATIVE", "0")
    assert _native.loaded() is None                         # off means off, built or not


def test_build_kernels_returns_the_library_or_says_why_not(native, monkeypatch):
    path = torch_backend.build_kernels()
    assert path.is_file() and path.name == f"{_native.build_name()}.so"
    monkeypatch.setattr(_native, "ops", lambda: None)
    with pytest.raises(RuntimeError, match="DEEPOPT_NATIVE=0, or the build failed"):
        torch_backend.build_kernels()


def test_a_step_on_another_device_neither_builds_nor_calls_the_kernel(monkeypatch):
    """The kernels are for CPU tensors: a group whose tensors live elsewhere (meta stands in for
    CUDA here) goes straight to torch's path, without building anything."""
    monkeypatch.setattr(_native, "ops", lambda: pytest.fail("asked for the CPU kernels"))
    monkeypatch.setattr(_native, "loaded", lambda: None)   # the checks' op: only where built
    spec = VARIANTS["adamw_nesterov"]
    ps = [torch.zeros(3, device="meta")]
    states = [{"memory": torch.zeros(3, device="meta"), "second_moment": torch.zeros(3, device="meta"),
               "step": torch.tensor(0.0)}]
    assert not _fused.step_classic("nadamw", spec.rule, ps, [torch.zeros(3, device="meta")], states,
                                   fused=None, lr=0.1, weight_decay=0.0)     # meta: no fused kernel either


@pytest.mark.parametrize("name", ["sgd_torch_first_step_decoupled", "adamw_nesterov_decay_maximize"])
def test_empty_and_0d_parameters(name, calls):
    init = [torch.zeros(0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64),
            torch.ones(2, 0, 3, dtype=torch.float64)]
    kernel, twin = _train(VARIANTS[name], None, init=init, steps=3), _train(VARIANTS[name], False, init=init, steps=3)
    assert calls["native"] == [True] * 3
    _assert_same(kernel, twin)
    assert float(kernel[0][1].detach()) != 1.5


def test_the_kernels_use_torchs_threads_where_torch_uses_openmp():
    """Without ``-fopenmp`` ``at::parallel_for`` compiles to a plain loop: the kernels ran on one
    thread whatever ``torch.set_num_threads`` said. On Linux with torch's OpenMP they are built
    with it, and run in torch's own OpenMP runtime (no second ``libgomp`` in the process)."""
    import sys

    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch without OpenMP, or not Linux: the kernels run on one thread")
    assert "-fopenmp" in _native.FLAGS
    if _native.ops() is None:
        pytest.skip("deepopt's CPU kernels could not be built here")
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes
