"""deepopt's CUDA kernels (torch_backend/_native.py: cuda_ops): the element-wise variants'
(csrc/elementwise_cuda.cu) and DMGD's memory's two full-size passes (csrc/deep_memory_cuda.cu).
On a GPU they run, compute what torch's ops compute (the foreach twin; fused_kernel's ops), and
leave every tensor as it was where they cannot take a step; without one, their launches run
block by block on the CPU (nvcc only), and a CPU step never builds them."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import deepopt
import torch_backend
from torch_backend import _deep_memory, _native

from _helpers import DEEP_MEMORY_VARIANTS, count_fused_kernels, spy_ops
from _helpers import ELEMENTWISE_VARIANTS as VARIANTS

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: More tensors than one launch takes (64), of sizes around a block's chunk (16,384) and a
#: thread round (256 × 4), and empty ones.
SHAPES = [(5, 3), (3,), (0,), (4, 6), (1,), (16384,), (16385,), (128, 129), (1023,), ()] * 7


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return found or (str(pathlib.Path(home, "bin", "nvcc")) if pathlib.Path(home, "bin", "nvcc").is_file() else None)


@pytest.mark.parametrize("harness", ["elementwise_cuda_host.cu", "deep_memory_cuda_host.cu"])
def test_the_kernels_launches_run_on_the_host_as_plain_loops(tmp_path, harness):
    """tests/csrc/*_host.cu run the CUDA kernels' blocks on the CPU, thread by thread, each phase
    before the next. The element-wise kernels' batches (more tensors than a launch takes, empty
    ones, sizes around a chunk): every element visited once, and each rule bit for bit a plain loop
    over the shared element functions. DMGD's passes (rows, columns and h ending inside a tile;
    more matrices than a launch of the outer step takes): bit for bit a plain loop."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc here")
    exe = tmp_path / "host"
    build = subprocess.run([nvcc, "-std=c++17", "-O1", f"-I{ROOT / 'torch_backend' / 'csrc'}",
                            str(ROOT / "tests" / "csrc" / harness), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_a_cpu_step_never_builds_the_cuda_kernels(monkeypatch):
    monkeypatch.setattr(_native, "cuda_ops", lambda: pytest.fail("asked for the CUDA kernels"))
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = torch_backend.compile(VARIANTS["adamw_nesterov"], [p])
    p.grad = torch.randn(4, dtype=torch.float64)
    opt.step()


def test_no_cuda_kernels_without_a_gpu_or_with_the_setting_off(monkeypatch):
    _native.cuda_ops.cache_clear()
    try:
        monkeypatch.setenv("DEEPOPT_NATIVE", "0")
        assert _native.cuda_ops() is None
        _native.cuda_ops.cache_clear()
        monkeypatch.setenv("DEEPOPT_NATIVE", "1")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert _native.cuda_ops() is None            # nothing to build for, even with 1
    finally:
        _native.cuda_ops.cache_clear()


def test_a_failed_cuda_build_warns_or_raises_as_the_setting_says(monkeypatch, tmp_path):
    """As the CPU build: ``auto`` warns once and leaves the step to torch's ops, ``1`` raises, and
    ``build_kernels()`` says so where a GPU is seen (here pretended: the build itself is refused
    before it starts)."""
    from torch.utils import cpp_extension

    def fail(**kwargs):
        assert [pathlib.Path(x).name for x in kwargs["sources"]] == [p.name for p in _native.CUDA_SOURCES]
        raise RuntimeError("no nvcc here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "cuda_build_name", lambda: "deepopt_cuda_kernels_test")
    monkeypatch.setattr(cpp_extension, "load", fail)
    build = _native.cuda_ops.__wrapped__                  # uncached, so each case builds anew
    with pytest.warns(RuntimeWarning, match="CUDA kernels could not be built.*no nvcc here.*on CUDA instead"):
        assert build() is None
    monkeypatch.setenv("DEEPOPT_NATIVE", "1")
    with pytest.raises(RuntimeError, match="CUDA kernels could not be built \\(DEEPOPT_NATIVE=1\\): no nvcc here"):
        build()
    monkeypatch.setenv("DEEPOPT_NATIVE", "auto")
    monkeypatch.setattr(_native, "ops", lambda: object())  # the CPU kernels: built
    monkeypatch.setattr(_native, "cuda_ops", lambda: None)
    with pytest.raises(RuntimeError, match="CUDA kernels were not built"):
        torch_backend.build_kernels()


def test_the_cuda_build_is_named_by_its_sources_and_architectures(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    name = _native.cuda_build_name()
    assert name.startswith("deepopt_cuda_kernels_") and name != _native.build_name()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert _native.cuda_build_name() != name
    assert set(_native.LOCAL_HEADERS) <= {*_native.CSRC.glob("*.h")}


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.fixture
def cuda_calls(monkeypatch):
    """``torch.ops.deepopt_cuda`` (skipped where it cannot be built), its step calls' results
    recorded, and torch's fused kernels' calls counted."""
    ops = _native.cuda_ops()
    if ops is None:
        pytest.skip("deepopt's CUDA kernels could not be built here (see the warning)")
    seen = {"native": [], "torch": 0}
    spy = spy_ops(ops, lambda name, ok: seen["native"].append(ok))
    monkeypatch.setattr(_native, "cuda_ops", lambda: spy)
    count_fused_kernels(monkeypatch, seen)
    return seen


def _start(shapes, device="cuda", dtype=torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)) for s in shapes]


def _grads(shapes, steps, device="cuda", dtype=torch.float64) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]
            for _ in range(steps)]


def _train(spec, fused, *, device="cuda", dtype=torch.float64, steps=6, shapes=SHAPES, skip_first=()):
    """``steps`` steps of ``spec`` from :func:`_start` with :func:`_grads` on any device; the
    parameters in ``skip_first`` get no gradient at the first step. Returns the parameters and
    the optimizer."""
    ps = _start(shapes, device, dtype)
    opt = torch_backend.compile(spec, ps, fused=fused)
    for t, gs in enumerate(_grads(shapes, steps, device, dtype)):
        for j, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if (t == 0 and j in skip_first) else g
        opt.step()
    return ps, opt


def _assert_same(a, b, *, rtol=0.0, atol=1e-12):
    (ps, opt), (qs, oqt) = a, b
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=rtol, atol=atol)
        assert opt.state[p].keys() == oqt.state[q].keys()
        for key in opt.state[p]:
            torch.testing.assert_close(opt.state[p][key].cpu(), oqt.state[q][key].cpu(), rtol=rtol, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_run_the_cuda_kernel_and_equal_the_foreach_twin(name, cuda_calls):
    spec = VARIANTS[name]
    kernel = _train(spec, None, skip_first=(1,))
    assert cuda_calls["native"] == [True] * 6 and cuda_calls["torch"] == 0
    twin = _train(spec, False, skip_first=(1,))
    assert cuda_calls["native"] == [True] * 6 and cuda_calls["torch"] == 0
    _assert_same(kernel, twin)
    steps = [float(kernel[1].state[p]["step"]) for p in kernel[0][:4] if "step" in kernel[1].state[p]]
    assert steps in ([], [6.0, 5.0, 6.0, 6.0])      # t per tensor: the second started a step late
    assert all(kernel[1].state[p]["step"].is_cpu for p in kernel[0] if "step" in kernel[1].state[p])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sgd_torch_first_step_decoupled", "adamw_nesterov_decay_maximize"])
def test_float32_on_cuda_stays_within_rounding_of_the_twin_and_the_cpu_kernel(name, cuda_calls):
    spec = VARIANTS[name]
    kernel = _train(spec, None, dtype=torch.float32, steps=40)
    assert cuda_calls["native"] == [True] * 40
    # Over 40 steps of 70 tensors (~170K elements) 2 elements drifted 1.7e-6 apart on an H200: most
    # likely nvcc's contracted a·b + c (one rounding, where the twin's ops and the CPU loop round twice).
    _assert_same(kernel, _train(spec, False, dtype=torch.float32, steps=40), rtol=1e-5, atol=1e-5)
    _assert_same(kernel, _train(spec, None, device="cpu", dtype=torch.float32, steps=40), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_mixed_dtypes_take_one_call(cuda_calls):
    spec = VARIANTS["adamw_nesterov"]
    ps = [torch.nn.Parameter(torch.randn(4, 3, device="cuda")),
          torch.nn.Parameter(torch.randn(5, device="cuda", dtype=torch.float64))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt, twin = torch_backend.compile(spec, ps), torch_backend.compile(spec, qs, fused=False)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert cuda_calls["native"] == [True] * 3
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["cpu_tensor", "strided_grad", "half", "cuda_count"])
def test_the_cuda_kernel_refuses_what_it_cannot_take_before_writing(case):
    ops = _native.cuda_ops()
    if ops is None:
        pytest.skip("deepopt's CUDA kernels could not be built here")
    dtype = torch.float16 if case == "half" else torch.float32
    ps = [torch.randn(6, 4, device="cuda", dtype=dtype) for _ in range(2)]
    gs = [torch.randn(6, 4, device="cuda", dtype=dtype) for _ in range(2)]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.ones_like(p) for p in ps]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    if case == "cpu_tensor":
        ms[1] = ms[1].cpu()
    elif case == "strided_grad":
        gs[1] = torch.randn(4, 6, device="cuda").t()
    elif case == "cuda_count":
        steps[1] = steps[1].cuda()
    before = [x.clone() for x in (*ps, *ms, *vs, *steps)]
    assert not ops.nadamw_(ps, gs, ms, vs, steps, 0.1, 0.9, 0.999, 1e-8, 0.01, False)
    assert not ops.sgd_(ps, gs, ms, steps, 0.1, 0.01, True, 0.9, 0.0, False, False)
    for x, y in zip((*ps, *ms, *vs, *steps), before):
        assert torch.equal(x, y)
    assert not ops.nadamw_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)],
                           [torch.tensor(0.0)], 0.1, 0.9, 0.999, 1e-8, 0.0, False)   # CPU tensors: False


@pytest.mark.gpu
def test_half_precision_on_cuda_keeps_torchs_kernel(cuda_calls):
    spec = deepopt.sgd(0.1, momentum=0.9, weight_decay=0.05, decoupled_weight_decay=True)
    kernel = _train(spec, True, dtype=torch.bfloat16, steps=3, shapes=[(8, 4), (5,)])
    assert cuda_calls["native"] == [False] * 3 and cuda_calls["torch"] == 3
    _assert_same(kernel, _train(spec, False, dtype=torch.bfloat16, steps=3, shapes=[(8, 4), (5,)]),
                 rtol=0.02, atol=0.05)


@pytest.mark.gpu
def test_the_kernels_run_on_the_current_stream_and_replay_in_a_cuda_graph(cuda_calls):
    """Launched on the device's current stream: a step captured into a CUDA graph (a launch on
    another stream breaks the capture) replays as eager steps run (a rule with no step count)."""
    spec = VARIANTS["sgd_decoupled_maximize_nesterov"]
    shapes = [(64, 32), (100,), (3,)]
    eager = _train(spec, None, steps=4, shapes=shapes)
    ps, grads = _start(shapes), _grads(shapes, 4)
    opt = torch_backend.compile(spec, ps)
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    opt.step()                                       # eagerly: the state is made
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):                    # recorded, not run
        opt.step()
    for gs in grads[1:]:
        for p, g in zip(ps, gs):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    assert cuda_calls["native"] == [True] * 6        # the eager run's four, the first step, the capture
    for p, q in zip(ps, eager[0]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.gpu
def test_a_cuda_step_marks_what_it_wrote_for_autograd(cuda_calls):
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    opt = torch_backend.compile(VARIANTS["adamw_nesterov"], [p])
    p.grad = torch.randn(4, device="cuda")
    version = p._version
    opt.step()
    assert cuda_calls["native"] == [True] and p._version > version


@pytest.mark.gpu
def test_a_checkpoint_moves_between_the_cuda_kernel_and_the_twin(cuda_calls):
    spec, shapes = VARIANTS["adamw_nesterov_decay_maximize"], [(7, 3), (9,)]
    whole = _train(spec, None, steps=6, shapes=shapes)
    ps, opt = _train(spec, None, steps=3, shapes=shapes)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    twin = torch_backend.compile(spec, qs, fused=False)
    twin.load_state_dict(opt.state_dict())
    for gs in _grads(shapes, 6)[3:]:
        for q, g in zip(qs, gs):
            q.grad = g
        twin.step()
    assert cuda_calls["native"] == [True] * 9
    for p, q in zip(whole[0], qs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# -- DMGD's memory on a GPU ---------------------------------------------------------------------

#: (bucket, m, n): rows, columns ending inside a tile (16 × 128); whole tiles; a tiny matrix.
MEMORY_SHAPES = [(3, 37, 300), (2, 64, 256), (1, 5, 7)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=2e-4, atol=2e-6)}


@pytest.fixture
def memory_calls(monkeypatch):
    """``torch.ops.deepopt_cuda`` (skipped where it cannot be built), each DMGD op's calls recorded
    as (name, result); ``seen["off"]()`` turns the kernels off (torch's ops then run)."""
    ops = _native.cuda_ops()
    if ops is None:
        pytest.skip("deepopt's CUDA kernels could not be built here (see the warning)")
    seen = {"calls": [], "on": True}
    spy = spy_ops(ops, lambda name, ok: seen["calls"].append((name, ok)))
    monkeypatch.setattr(_native, "cuda_ops", lambda: spy if seen["on"] else None)
    return seen


def _bucket(mem, b, m, n, dtype, seed=0, scale=1e-3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to("cuda", dtype)   # noqa: E731
    prev = torch.nn.functional.normalize(r(b, m, n), dim=-1) if mem.keys == "previous" else None
    return {"s": r(b, m, n) * scale, "w1": r(b, mem.hidden, n), "w2": r(b, n, mem.hidden) * 0.1,
            "nu": torch.full((b, 1, 1), scale, dtype=dtype, device="cuda"), "prev": prev, "g": r(b, m, n) * scale}


def _fused(mem, x, values, outer=None):
    st = {k: None if v is None else v.clone() for k, v in x.items()}
    v = st["g"] * 0.7 + 1e-4 if values == "separate" else st["g"]
    d = _deep_memory.fused_kernel(mem, st["s"], st["w1"], st["w2"], st["nu"], st["g"], v, st["prev"],
                                  torch.full_like(st["s"], float("nan")), outer)[4]
    return st, d


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("values", ["grads", "separate"])
@pytest.mark.parametrize("shape", MEMORY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", list(DEEP_MEMORY_VARIANTS))
def test_dmgd_memory_on_cuda_equals_torchs_ops(memory_calls, variant, shape, values, dtype):
    mem = deepopt.DeepMemory(**DEEP_MEMORY_VARIANTS[variant])
    x = _bucket(mem, *shape, dtype)
    ours, d = _fused(mem, x, values)
    expected = [("dmgd_write_", True)] if mem.objective == "l2" else []
    assert memory_calls["calls"] == expected + [("dmgd_read_", True)]
    memory_calls["on"] = False
    ref, d_ref = _fused(mem, x, values)
    assert len(memory_calls["calls"]) == len(expected) + 1          # off: torch's ops only
    torch.testing.assert_close(d, d_ref, **TOL[dtype], msg="D")
    for key in ("s", "w1", "w2", "nu", "prev"):
        if ref[key] is not None:
            torch.testing.assert_close(ours[key], ref[key], **TOL[dtype], msg=key)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["default", "dot_previous", "no_nesterov"])
def test_dmgd_read_on_cuda_makes_the_outer_step_given_the_parameters(memory_calls, variant):
    mem = deepopt.DeepMemory(**DEEP_MEMORY_VARIANTS[variant])
    b, m, n = 70, 9, 130                                 # more matrices than one launch takes (64)
    x = _bucket(mem, b, m, n, torch.float64)
    params = [torch.randn(m, n, dtype=torch.float64, device="cuda") for _ in range(b)]
    ref, d_ref = _fused(mem, x, "grads")
    stepped = [p - 0.1 * d for p, d in zip(params, d_ref)]
    ours, d = _fused(mem, x, "grads", (params, 0.1))
    assert d is None and memory_calls["calls"][-1] == ("dmgd_read_", True)
    for p, q in zip(params, stepped):
        torch.testing.assert_close(p, q, **TOL[torch.float64])
    for key in ("s", "w1", "w2", "nu", "prev"):
        if ref[key] is not None:
            assert torch.equal(ours[key], ref[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("readout", [None, "sign"])
def test_dmgd_on_cuda_steps_as_with_torchs_ops(memory_calls, readout):
    """The optimizer (two buckets, one of a single matrix, a bias for the fallback) for six steps
    with the kernels and without: the same parameters within float64 rounding."""
    spec = deepopt.dmgd(0.02, readout=readout)
    shapes = [(40, 24), (40, 24), (24, 40), (40,)]

    def run():
        ps = _start(shapes)
        opt = torch_backend.compile(spec, ps)
        for gs in _grads(shapes, 6):
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        return ps

    ours = run()
    assert {name for name, _ in memory_calls["calls"]} == {"dmgd_write_", "dmgd_read_"}
    assert all(ok for _, ok in memory_calls["calls"])
    memory_calls["on"] = False
    for p, q in zip(ours, run()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_dmgd_ops_refuse_what_they_cannot_take_before_writing(memory_calls):
    ops = _native.cuda_ops()
    mem = deepopt.DeepMemory()
    x = _bucket(mem, 2, 20, 30, torch.float32)
    hn = torch.randn(2, 20, mem.hidden, device="cuda")
    s, v, w2 = x["s"], x["g"], x["w2"]
    before = s.clone()
    p = torch.full_like(s, 7.0)
    assert not ops.dmgd_write_(s, v, hn.half(), w2, p, 0.9, 0.1)             # another dtype
    assert not ops.dmgd_write_(s, v, hn, w2, s, 0.9, 0.1)                    # P would overwrite S
    assert not ops.dmgd_write_(s, v.mT.contiguous().mT, hn, w2, p, 0.9, 0.1)   # not contiguous
    assert not ops.dmgd_write_(s, v, hn[:, :10], w2, p, 0.9, 0.1)            # sizes that do not fit
    params = [torch.zeros(20, 30, device="cuda")]
    assert not ops.dmgd_read_(s, v, hn, w2, None, params, 1.0, 0.0, 0.1)     # one parameter for two
    assert not ops.dmgd_read_(s, v, hn, w2, None, [], 1.0, 0.0, 0.1)         # nowhere to write D̃
    assert not ops.dmgd_read_(s.cpu(), v.cpu(), hn.cpu(), w2.cpu(), p.cpu(), [], 1.0, 0.0, 0.0)   # CPU
    assert torch.equal(s, before) and (p == 7.0).all() and (params[0] == 0).all()
