"""Hand-written backwards of HOPE's scans (benchmarks/hope/fused.py) against autograd, float64.

Oracles: autograd through the CMS level's own `scan` (which tests/test_hope_model.py holds to
the per-token reference), autograd through `F.conv1d` for the causal convolution, and
`torch.autograd.gradcheck` (finite differences) of each Function.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.hope.fused import CausalConv, CMSScan, GeneratorRead, Normalize, RMSNorm, TitansScan
from benchmarks.hope.model import CMSLevel, Hope, HopeConfig, SelfModifyingTitans, chunk_constants

F64 = torch.float64


def level(period, clip, seed=0):
    torch.manual_seed(seed)
    cfg = HopeConfig(d_model=16, n_heads=2, mem_hidden=8, cms_hidden=16, cms_periods=(period,), n_layers=1,
                     inner_clip=clip, cms_eta_init=0.05)
    return CMSLevel(cfg, period).to(F64)


def loss_and_grads(module, inputs, fused):
    """Σ y ⊙ r for a fixed random r, and its gradients in every input and parameter."""
    for m in module.modules():
        if isinstance(m, (CMSLevel, SelfModifyingTitans)):
            m.fused = fused
    y = module(*inputs)
    y = y[1] if isinstance(y, tuple) else y  # Hope returns (logits, loss)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    leaves = [t for t in inputs if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad((y * r).sum(), leaves, allow_unused=True)
    return y.detach(), [torch.zeros(()) if g is None else g for g in grads]


@pytest.mark.parametrize("clip", [1.0, 0.05, None])  # 0.05: most rows' clip is active
@pytest.mark.parametrize("period,T", [(2, 12), (3, 11), (4, 16), (4, 5), (5, 5)])  # ragged, one write, none
def test_cms_scan_equals_autograd_scan(period, T, clip):
    lvl = level(period, clip)
    x = (torch.randn(2, T, 16, generator=torch.Generator().manual_seed(1), dtype=F64) * 3).requires_grad_()
    y_fused, g_fused = loss_and_grads(lvl, (x,), fused=True)
    y_ref, g_ref = loss_and_grads(lvl, (x,), fused=False)
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", [0.3, None])
def test_cms_scan_gradcheck(clip):
    """Finite differences of every input, η_c included (B = 2, three periods of 3, D = 4, f = 5)."""
    g = torch.Generator().manual_seed(0)
    B, P, n, D, f = 2, 3, 3, 4, 5
    key, val = (torch.randn(B, (n - 1) * P, D, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    u = torch.randn(B, n * P, D, generator=g, dtype=F64).requires_grad_()
    up_t = (torch.randn(B, D, f, generator=g, dtype=F64) * 0.5).requires_grad_()
    down_t = (torch.randn(B, f, D, generator=g, dtype=F64) * 0.5).requires_grad_()
    eta_c = torch.tensor(0.2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: CMSScan.apply(*t, P, clip), (key, val, u, up_t, down_t, eta_c))


def _cms_inputs(B=2, P=3, n=4, D=4, f=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    key, val = (torch.randn(B, (n - 1) * P, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    u = torch.randn(B, n * P, D, generator=g, dtype=dtype).requires_grad_()
    up_t = (torch.randn(B, D, f, generator=g, dtype=dtype) * 0.5).requires_grad_()
    down_t = (torch.randn(B, f, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return key, val, u, up_t, down_t, torch.tensor(0.2, dtype=dtype, requires_grad=True)


def test_cms_scan_reuses_its_workspaces_without_mixing_calls():
    """CMSScan keeps its saved tensors in a CPU workspace that its backward gives back for the next
    call: two scans outstanding at once (two layers) take two buffers, and a second round reusing
    them gives the same values and gradients as the first."""
    from benchmarks.hope import fused

    fused._WORKSPACES.clear()
    a, b = _cms_inputs(seed=0), _cms_inputs(seed=1)

    def both():
        ya, yb = CMSScan.apply(*a, 3, 0.3), CMSScan.apply(*b, 3, 0.3)
        ga = torch.autograd.grad(ya.square().sum(), a)
        gb = torch.autograd.grad(yb.square().sum(), b)
        return ya.detach(), yb.detach(), ga, gb

    first = both()
    free = {k: list(v) for k, v in fused._WORKSPACES._free.items()}
    assert sum(len(v) for v in free.values()) == 3  # two forward workspaces, one backward one in turn
    second = both()
    assert {k: len(v) for k, v in fused._WORKSPACES._free.items()} == {k: len(v) for k, v in free.items()}
    assert all(any(x is y for y in free[k]) for k, v in fused._WORKSPACES._free.items() for x in v)  # reused
    for s, t in zip(first, second):
        for x, y in zip(s if isinstance(s, tuple) else (s,), t if isinstance(t, tuple) else (t,)):
            assert torch.equal(x, y)


def test_cms_scan_retained_graph_backs_up_twice_or_fails_loudly():
    """retain_graph: a second backward gives the same gradients while no other scan has reused the
    workspace, and raises (autograd's version check) once one has, never a wrong gradient."""
    from benchmarks.hope import fused

    fused._WORKSPACES.clear()
    inputs = _cms_inputs()
    y = CMSScan.apply(*inputs, 3, 0.3)
    g1 = torch.autograd.grad(y.square().sum(), inputs, retain_graph=True)
    g2 = torch.autograd.grad(y.square().sum(), inputs, retain_graph=True)
    for x, z in zip(g1, g2):
        assert torch.equal(x, z)
    CMSScan.apply(*_cms_inputs(seed=1), 3, 0.3)  # takes the same workspace and writes it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.square().sum(), inputs)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_model_loss_and_gradients_equal_autograd_scans(checkpoint):
    torch.manual_seed(0)
    model = Hope(HopeConfig(d_model=16, n_heads=2, mem_hidden=8, cms_hidden=16, cms_periods=(2, 4), n_layers=2,
                            chunk_size=4, cms_eta_init=0.05)).to(F64).set_checkpointing(checkpoint)
    idx = torch.randint(0, 256, (2, 14))
    loss_fused, g_fused = loss_and_grads(model, (idx[:, :-1], idx[:, 1:]), fused=True)
    loss_ref, g_ref = loss_and_grads(model, (idx[:, :-1], idx[:, 1:]), fused=False)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def ran_fused(y, name="CMSScan"):
    """Whether y's autograd graph holds a node of the Function `name`."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if name in type(node).__name__:
            return True
        todo += [nxt for nxt, _ in node.next_functions]
    return False


def test_fused_path_is_the_eager_default_and_falls_back():
    """The hand-written backward runs by default, also under autocast (in float32); return_states
    and compiled scans take the autograd scan (its grad_fn tells which ran)."""
    lvl = level(2, 1.0)
    x = torch.randn(2, 6, 16, dtype=F64, requires_grad=True)
    assert lvl.fused
    assert ran_fused(lvl(x))
    assert not ran_fused(lvl(x, return_states=True)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lvl.float()(x.float())
    assert ran_fused(y) and y.dtype == torch.float32
    model = Hope(HopeConfig(d_model=16, n_heads=2, mem_hidden=8, cms_hidden=16, cms_periods=(2,), n_layers=1))
    model.compile_scans(True)
    assert not model.blocks[0].cms[0].fused and not model.blocks[0].titans.fused
    model.compile_scans(False)
    assert model.blocks[0].cms[0].fused and model.blocks[0].titans.fused
    assert ran_fused(model.blocks[0].titans(torch.randn(2, 6, 16)), "TitansScan")


def test_a_backward_inside_autocast_runs_in_the_forwards_dtype():
    """A backward called inside bf16 autocast (as a CUDA graph's capture calls it) used to mix a
    bf16 gradient with float32 saved tensors in one baddbmm; it now runs as outside autocast."""
    from benchmarks.hope.presets import build_model

    torch.manual_seed(0)
    model, _ = build_model("hope", "cpu-tiny", 256)
    x, y = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    params = list(model.parameters())
    grads = {}
    for inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = model(x, y)[1]
            if inside:
                grads[inside] = torch.autograd.grad(loss, params, allow_unused=True)
        if not inside:
            grads[inside] = torch.autograd.grad(loss, params, allow_unused=True)
    for a, b in zip(grads[True], grads[False]):
        if b is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.float(), b.float(), rtol=0.1, atol=0.1 * float(b.abs().max()) + 1e-6)


def conv1d_reference(x, w):
    """The causal depthwise convolution as `F.conv1d` computes it: channels first, left-padded."""
    K = w.shape[1]
    return F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w.unsqueeze(1), groups=w.shape[0]).transpose(1, 2)


@pytest.mark.parametrize("T,K", [(12, 4), (3, 4), (1, 4), (7, 1)])  # shorter than the window, one token, no shift
def test_causal_conv_equals_conv1d(T, K):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 6, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(6, K, generator=g, dtype=F64).requires_grad_()
    r = torch.randn(2, T, 6, generator=g, dtype=F64)
    outs = []
    for fn in (CausalConv.apply, conv1d_reference):
        y = fn(x, w)
        outs.append((y.detach(), *torch.autograd.grad((y * r).sum(), (x, w))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_conv_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(3, 4, generator=g, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(CausalConv.apply, (x, w))


def titans_layer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_heads=2, mem_hidden=8, n_layers=1, chunk_size=4, inner_clip=0.3)
    return SelfModifyingTitans(HopeConfig(**{**cfg, **kw})).to(F64)


@pytest.mark.parametrize("clip", [0.3, 0.02, None])  # 0.02: most rows' clips are active
@pytest.mark.parametrize("w2_rate", ["gauss-newton", "input"])
@pytest.mark.parametrize("T,C", [(12, 4), (11, 4), (5, 8)])  # whole chunks, a ragged last one, one chunk
@pytest.mark.parametrize("gen", ["off", "separate"])  # static generators (one chunk write of M_memory), or all five
def test_titans_chunk_equals_autograd_scan(clip, w2_rate, T, C, gen):
    """The layer with `TitansScan` (fused, the default) against autograd through chunk_grads + chunk_write;
    return_state also checks the last chunk's write. Static generators: one TitansScan over the complete
    chunks, then a ragged one alone; written generators: one TitansScan per chunk."""
    layer = titans_layer(inner_clip=clip, w2_rate=w2_rate, chunk_size=C, generator_writes=gen)
    x = torch.randn(2, T, 16, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_()
    r = torch.randn(2, T, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    outs = []
    for fused in (True, False):
        layer.fused = fused
        y, (w1, w2) = layer(x, return_state=True)
        loss = (y * r).sum() + (w1 * w1).sum() + (w2 * r[0, 0, :8, None]).sum()
        outs.append((y.detach(), *torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)))
    for a, b in zip(*outs):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip,w2_rate,n,write_last", [(0.3, "gauss-newton", 3, True), (None, "input", 2, True),
                                                       (0.3, "gauss-newton", 2, False), (0.05, "input", 2, False),
                                                       (None, "gauss-newton", 1, False)])
def test_titans_scan_gradcheck(clip, w2_rate, n, write_last):
    """Finite differences of every input of n chunks (N = 2 rows, C = 3, d = 4, f = 5)."""
    g = torch.Generator().manual_seed(0)
    N, C, d, f = 2, 3, 4, 5
    w1t = (torch.randn(N, f, d, generator=g, dtype=F64) * 0.5).requires_grad_()
    w2t = (torch.randn(N, d, f, generator=g, dtype=F64) * 0.5).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(N, n, C, d, generator=g, dtype=F64), dim=-1)
    v = torch.randn(N, n, C, d, generator=g, dtype=F64)
    eta = torch.rand(N, n, C, generator=g, dtype=F64) + 0.5
    log_a = -torch.rand(N, n, C, generator=g, dtype=F64) * 0.1
    c = chunk_constants(k, v, eta, log_a, clip)
    names = ["x", "k_norm", "k_sq", "eta", "eta_c", "s2", "carry", "keep"]
    inputs = [c[name].detach().clone().requires_grad_() for name in names]
    if w2_rate == "gauss-newton":
        inputs[5] = None  # no s2_in: W₂'s rate from the curvature

    def fn(w1t, w2t, *rest):
        return TitansScan.apply(w1t, w2t, *rest, clip, write_last)

    assert torch.autograd.gradcheck(fn, (w1t, w2t, *inputs))


def _collapse(keep, n=24, C=16, N=2, d=64, f=64, at=4):
    """n chunks of TitansScan in float32 at η = 16 with values of norm ~100, the state's size per
    chunk and the gradient of the end state in the initial one, where chunk `at` writes nothing and
    keeps `keep` of the state (the collapse seen on the H200: a head at α ≈ 0 whose last tokens do
    not write). From a tiny state the writes regrow it ~1e5-fold every two chunks, so ∂(end)/∂(tiny
    state) is ~1/keep: past float32's range for keep = 1e-42."""
    g = torch.Generator().manual_seed(0)
    w1t = (torch.randn(N, f, d, generator=g) / math.sqrt(f)).requires_grad_()
    w2t = (torch.randn(N, d, f, generator=g) / math.sqrt(d)).requires_grad_()
    k = F.normalize(torch.randn(N, n, C, d, generator=g), dim=-1)
    v = torch.randn(N, n, C, d, generator=g) * 100 / math.sqrt(d)
    eta = torch.full((N, n, C), 16.0)
    eta[:, at] = 0.0
    log_a = torch.full((N, n, C), math.log(0.9))
    log_a[:, at] = math.log(keep) / C
    c = chunk_constants(k, v, eta, log_a, 0.3)
    outs = TitansScan.apply(w1t, w2t, c["x"], c["k_norm"], c["k_sq"], c["eta"], c["eta_c"], None,
                            c["carry"], c["keep"], 0.3, True)
    size = outs[5].abs().amax((0, 2, 3))  # the state's largest entry at each chunk boundary
    grads = torch.autograd.grad(outs[-2].sum() + outs[-1].sum(), (w1t, w2t))
    return size, all(bool(torch.isfinite(t).all()) for t in grads)


def test_a_collapsed_state_overflows_float32_gradients_and_the_retention_floor_prevents_it():
    """keep = 1e-42 (α ≈ 0.0024 per token, no floor): the state falls to ~1e-42, regrows to ~1
    and the gradient is not finite. The default floor α_min bounds a chunk's keep below by
    α_min^C, and from there the gradient stays finite."""
    size, finite = _collapse(1e-42)
    assert size[5] < 1e-40 and size[-1] > 1e-2  # collapsed, then regrown
    assert not finite
    floor = HopeConfig().alpha_min ** 16
    size, finite = _collapse(floor)
    assert size[5] < 1e-3 * size[4] and finite


@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 3, 4, 8), (8,)])
def test_rms_norm_equals_torch_rms_norm(shape):
    """`fused.RMSNorm` against autograd through `nn.RMSNorm` (float64), and finite differences."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2).requires_grad_()
    norm = torch.nn.RMSNorm(shape[-1], eps=1e-6).to(F64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g, dtype=F64))
    r = torch.randn(shape, generator=g, dtype=F64)
    y = RMSNorm.apply(x, norm.weight, norm.eps)
    y_ref = norm(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the same operators forward
    for a, b in zip(torch.autograd.grad((y * r).sum(), (x, norm.weight)),
                    torch.autograd.grad((y_ref * r).sum(), (x, norm.weight))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, w: RMSNorm.apply(a, w, 1e-6), (x, norm.weight))


def _generator_read_reference(rows, w1, w2, r):
    """`fused.GeneratorRead` as autograd computes it: full reads of the first Q memories, the read-out of the rest."""
    Q = r.shape[0]
    act = F.silu(torch.bmm(rows, w2.transpose(1, 2)))
    y = rows + torch.bmm(act, w1.transpose(1, 2))
    return y[:Q], (y[Q:] * r).sum(-1, keepdim=True)


def test_generator_read_equals_autograd():
    """`fused.GeneratorRead` (the static generators' reads) against autograd through the plain residual
    MLP reads (float64), and finite differences of every input."""
    g = torch.Generator().manual_seed(0)
    Q, R, d, f = 4, 7, 3, 5
    rows = torch.randn(2 * Q, R, d, generator=g, dtype=F64).requires_grad_()
    w1 = torch.randn(2 * Q, d, f, generator=g, dtype=F64).requires_grad_()
    w2 = torch.randn(2 * Q, f, d, generator=g, dtype=F64).requires_grad_()
    r = torch.randn(Q, 1, d, generator=g, dtype=F64).requires_grad_()
    out, ref = GeneratorRead.apply(rows, w1, w2, r), _generator_read_reference(rows, w1, w2, r)
    rk, rp = torch.randn(Q, R, d, generator=g, dtype=F64), torch.randn(Q, R, 1, generator=g, dtype=F64)
    grads = [torch.autograd.grad((o[0] * rk).sum() + (o[1] * rp).sum(), (rows, w1, w2, r)) for o in (out, ref)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(GeneratorRead.apply, (rows, w1, w2, r))


def test_normalize_equals_f_normalize():
    """`fused.Normalize` against autograd through `F.normalize` (float64, a zero row included: the
    clamp's branch), on a transposed view as the model's queries, and finite differences."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=F64)
    x[0, 1, 2] = 0.0
    x = x.transpose(1, 2).requires_grad_()
    r = torch.randn(x.shape, generator=g, dtype=F64)
    y, y_ref = Normalize.apply(x, 1e-12), F.normalize(x, dim=-1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad((y * r).sum(), x)[0], torch.autograd.grad((y_ref * r).sum(), x)[0],
                               rtol=1e-12, atol=1e-12)
    xs = torch.randn(3, 4, generator=g, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: Normalize.apply(a, 1e-12), (xs,))
