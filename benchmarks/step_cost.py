"""Step cost: one optimizer step of deepopt next to torch.optim and optax, side by side.

    python -m benchmarks.step_cost [--quick] [--device cpu|cuda] [--threads 1] [--only sgd,adamw] --out DIR

Parameters are shaped like GPT-2 small (token and position embeddings, 12 blocks of attention
qkv/proj and MLP fc/proj matrices with biases, layernorm vectors; ``--quick`` scales widths,
depth and vocabulary down for a CPU). For each spec, deepopt and its anchor run interleaved in
one process (docs/benchmarks.md): ``torch_backend.compile`` next to ``torch.optim`` (foreach, and
fused where the device supports it), and ``jax_backend.compile`` next to optax under
``jax.jit``. Embeddings go to the AdamW fallback on both sides, as torch's Muon docs advise.

Reported per contender: median step time and spread, the ratio to the anchor (per round, A and
B measured back to back), optimizer-state bytes per parameter (counted from the actual state),
and the hardware floor — element-wise phases at the measured copy bandwidth, matrix phases at
the measured matmul rate (Newton–Schulz ``4m²n + 2m³`` per iteration for m ≤ n; DMGD
``14·m·n·h`` with its default L2 objective, ``12·m·n·h`` with the dot objective, docs/math.md §5;
delta momentum's ``S KᵀK`` ``4m²n``) — with ``time / floor``. The rates are measured next to
each group, right before and right after its rounds (:func:`run_group`); ``rates`` in the JSON
are the start-of-run ones, for reference. The
dmgd groups (torch and JAX) also time the deep memory alone (``readout=None``; floor: DMGD's matmuls without
Newton–Schulz). JAX rows also record how many times the jitted step was traced (1 = no
recompilation).

Contenders come from one table per backend (:func:`torch_table`, :func:`jax_table`: spec →
its entries, anchor and note). Writes ``DIR/step_cost.json`` after every group (``"complete":
false`` until the last, so a run cut short by a time limit keeps what it measured) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _common
from benchmarks._threads import pin_to_one_core

SPECS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3")
EMBED_PATTERNS = (r"^wte\.", r"^wpe\.")   # embeddings take the AdamW fallback (torch Muon docs)

# Hyperparameters shared by both sides of every pair.
LR = {"sgd": 0.01, "adamw": 1e-3, "delta_momentum": 0.01, "muon": 0.02, "dmgd": 0.02, "m3": 0.02}
MOMENTUM = 0.9            # sgd, delta_momentum
ADAMW_WD = 0.01
MUON_WD = 0.1
NS_STEPS = 5
M3_PERIOD = 10            # deepopt.m3's default frequency: each timed sample covers one period

TARGETS = {  # (backend, spec) -> (max ratio, reference contender); standing in benchmarks/README.md
    ("torch", "sgd"): (1.1, "torch.optim.SGD(fused)"),
    ("torch", "adamw"): (1.1, "torch.optim.AdamW(fused)"),
    ("torch", "muon"): (1.0, "torch.optim.Muon+AdamW"),
    ("torch", "dmgd"): (1.5, "deepopt.muon"),
    ("torch", "m3"): (1.3, "deepopt.muon"),
    # "every spec ≤ 1.1× its optax counterpart": only these three have one.
    **{("jax", s): (1.1, None) for s in ("sgd", "adamw", "muon")},
}


# --------------------------------------------------------------------------------------------
# Parameter sets
# --------------------------------------------------------------------------------------------


SIZES = {  # vocab, context, width, depth
    "full": (50257, 1024, 768, 12),     # GPT-2 small, 124M parameters
    "quick": (4096, 256, 128, 4),
    "tiny": (256, 32, 32, 2),
}


def gpt2_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, torch shape) of a GPT-2-like model; Linear weights are (out, in) as in torch."""
    vocab, ctx, d, depth = SIZES[size]
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (ctx, d))]
    for i in range(depth):
        b = f"h.{i}."
        shapes += [
            (b + "ln_1.weight", (d,)), (b + "ln_1.bias", (d,)),
            (b + "attn.c_attn.weight", (3 * d, d)), (b + "attn.c_attn.bias", (3 * d,)),
            (b + "attn.c_proj.weight", (d, d)), (b + "attn.c_proj.bias", (d,)),
            (b + "ln_2.weight", (d,)), (b + "ln_2.bias", (d,)),
            (b + "mlp.c_fc.weight", (4 * d, d)), (b + "mlp.c_fc.bias", (4 * d,)),
            (b + "mlp.c_proj.weight", (d, 4 * d)), (b + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def is_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """Takes the matrix rule (Muon, DMGD, …): ≥ 2-D and not an embedding."""
    import re

    return len(shape) >= 2 and not any(re.search(p, name) for p in EMBED_PATTERNS)


# --------------------------------------------------------------------------------------------
# Floors (docs/benchmarks.md, "Against the hardware floor, too")
# --------------------------------------------------------------------------------------------

# fp32 words a fused kernel must move per parameter element per step (read + write).
WORDS = {
    "sgd": 5,        # read p, g, S; write S, p
    "adamw": 7,      # read p, g, m, v; write m, v, p      (28 B in fp32)
    "muon": 6,       # read g, S; write S; read NS output, p; write p
    "delta_momentum": 5,
    "dmgd": 5,       # S, p and g as sgd; the MLP weights (2nh per matrix) are negligible
    "dmgd_memory": 5,  # dmgd with readout=None: the memory alone, the same bytes
    "m3": 10,        # read p, g, M¹, V, O², Σ; write M¹, V, Σ, p
}


def ns_flops(m: int, n: int, steps: int = NS_STEPS) -> float:
    a, b = min(m, n), max(m, n)
    return steps * (4 * a * a * b + 2 * a ** 3)


def dmgd_products(memory) -> int:
    """The m×n-by-thin products of one DMGD write and read per matrix (docs/math.md §5): the
    write's ``K W₁ᵀ``, ``Êᵀ H``, ``Ê W₂``, ``[·]ᵀ K`` and the read's ``Q W₁ᵀ``, ``H W₂ᵀ``; the L2
    objective's error also needs the memory's read before the write, ``H W₂ᵀ``: a seventh."""
    return 7 if memory.objective == "l2" else 6


def floor_terms(kind: str, shapes: list[tuple[str, tuple[int, ...]]], itemsize: int = 4,
                hidden: int = 16, route: Callable[[str, tuple[int, ...]], str] | None = None,
                fallback_kind: str = "adamw", products: int = 7) -> dict[str, float]:
    """Bytes moved and matmul FLOPs of one step of ``kind`` over ``shapes``.

    ``route(name, shape)`` says which parameters take the rule (``"rule"``) and which its
    element-wise fallback (``"fallback"``, costed as ``fallback_kind``); by default the
    matrices of :func:`is_matrix` take matrix rules and everything else AdamW. ``hidden`` and
    ``products`` (:func:`dmgd_products`) are DMGD's: each product costs ``2·m·n·h`` FLOPs.
    """
    nbytes, flops = 0.0, 0.0
    for name, shape in shapes:
        numel = math.prod(shape)
        if route is None:
            taken = kind in ("sgd", "adamw") or is_matrix(name, shape)
        else:
            taken = route(name, shape) == "rule"
        if not taken:
            nbytes += WORDS[fallback_kind] * itemsize * numel
            continue
        nbytes += WORDS[kind] * itemsize * numel
        if len(shape) < 2:
            continue                                                  # element-wise on vectors
        m, n = shape[0], math.prod(shape[1:])
        if kind == "muon":
            flops += ns_flops(m, n)
        elif kind == "delta_momentum":
            flops += 4 * min(m, n) ** 2 * max(m, n)                 # (S Kᵀ) K on the short side
        elif kind == "dmgd":                                          # the default: a deep Muon
            flops += 2 * products * m * n * hidden + ns_flops(m, n)   # docs/math.md §5, then §4
        elif kind == "dmgd_memory":                                   # readout=None: §5 alone
            flops += 2 * products * m * n * hidden
        elif kind == "m3":
            flops += ns_flops(m, n) * (1 + 1 / M3_PERIOD)            # fast NS + amortised slow NS
    return {"bytes": nbytes, "flops": flops}


@dataclass(frozen=True)
class Probe:
    """What a floor's rate is measured on, timed next to each group of contenders: an in-place
    pass over a buffer (``term="bytes"``: the copy bandwidth) or a square matmul
    (``term="flops"``, in ``dtype``). ``amount``: the bytes or FLOPs of one call."""

    term: str
    dtype: str
    amount: float
    step: Callable[[], Any]


def probe_times(probes: dict[str, Probe], calls: int = 4) -> dict[str, list[float]]:
    """Seconds per call of each probe, ``calls`` calls after one to warm up."""
    out = {}
    for name, p in probes.items():
        p.step()
        out[name] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            p.step()
            out[name].append(time.perf_counter() - t0)
    return out


def rates_of(probes: dict[str, Probe]) -> dict[str, float]:
    """The start-of-run rates (best of seven calls per probe), as the JSON's ``rates``."""
    times = probe_times(probes, calls=7)
    return {"copy_bytes_per_s" if p.term == "bytes" else f"matmul_{p.dtype}_flops_per_s": p.amount / min(times[n])
            for n, p in probes.items()}


def floor_at(terms: dict[str, float], dtype: str, probes: dict[str, Probe], rates: dict[str, float]) -> float:
    """The floor in seconds, bytes at the copy probe's rate and FLOPs at the matmul probe's of
    ``dtype`` (else float32's); element-wise and matrix phases run one after the other, so
    their floors add."""
    copy = next(n for n, p in probes.items() if p.term == "bytes")
    mm = next((n for n, p in probes.items() if p.term == "flops" and p.dtype == dtype),
              next((n for n, p in probes.items() if p.term == "flops" and p.dtype == "float32"), None))
    return terms["bytes"] / rates[copy] + (terms["flops"] / rates[mm] if terms["flops"] else 0.0)


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One row of a contender table: how to build a contender, before it is built."""

    name: str
    role: str                        # "deepopt", "deepopt-variant", "deepopt-reference" or "anchor"
    build: Callable[..., Any]        # torch: (named params) -> optimizer(s); jax: () -> optax transform
    floor_kind: str                  # which floor model applies (a key of WORDS)
    ns_dtype: str = "float32"        # matmul dtype of the matrix phase (which rate applies)
    spec: Any = None                 # the deepopt spec, whose routing the floor follows


@dataclass(frozen=True)
class Plan:
    """A contender table's value: the entries of one group, its anchor and its note."""

    entries: tuple[Entry, ...]
    anchor: str                      # name of the anchor entry (the ratio's denominator)
    note: str = ""
    amortize: int = 0     # > 0: time exactly this many consecutive steps (one period) and report means


@dataclass
class Contender:
    name: str
    role: str
    step: Callable[[], Any] | None   # one timed sample (synchronised)
    state_bytes: Callable[[], int] | None = None
    floor_kind: str = ""
    ns_dtype: str = "float32"
    error: str | None = None
    extra: dict = field(default_factory=dict)
    route: Callable[[str, tuple[int, ...]], str] | None = None   # deepopt spec routing (floor)
    fallback_kind: str = "adamw"
    hidden: int = 16                 # DMGD's MLP width and products per matrix (the floor's FLOPs)
    products: int = 7


@dataclass
class Group:
    backend: str
    spec: str
    contenders: list[Contender]
    anchor: str | None                      # name of the anchor contender (the ratio's denominator)
    amortize: int = 0
    note: str = ""


def _failed(entry: Entry, e: Exception) -> Contender:
    """An unsupported configuration is a result (status "unsupported"), any other error too."""
    return Contender(entry.name, entry.role, None, error=f"{type(e).__name__}: {e}".splitlines()[0],
                     floor_kind=entry.floor_kind,
                     extra={"status": "unsupported" if isinstance(e, NotImplementedError) else "error"})


def _with_floor_routing(c: Contender, entry: Entry, shape_of=lambda shape: shape) -> Contender:
    """The floor follows the deepopt spec's own routing (which parameters take the rule)."""
    if entry.spec is not None:
        spec = entry.spec
        c.route = lambda name, shape: spec.route(name, shape_of(shape))
        c.fallback_kind = spec.fallback.name if spec.fallback is not None else entry.floor_kind
        memory = spec.rule.memory
        if hasattr(memory, "hidden"):                             # DeepMemory
            c.hidden, c.products = memory.hidden, dmgd_products(memory)
    return c


def build_groups(backend: str, table: dict[str, Plan], make: Callable[[Entry], Contender],
                 only: set[str]):
    """Yield one group at a time, in ``SPECS`` order, so only one group's copies are alive.
    The anchors of a group are not built when its deepopt contender cannot run."""
    for spec in SPECS:
        if spec not in only:
            continue
        plan = table[spec]
        contenders: list[Contender] = []
        for entry in plan.entries:
            contenders.append(make(entry))
            if entry.role == "deepopt" and contenders[-1].step is None:
                break
        yield Group(backend, spec, contenders, plan.anchor, plan.amortize, plan.note)


def deepopt_specs(deepopt, backend: str) -> dict[str, Any]:
    """The deepopt side of every group: same hyperparameters as its anchor. Matrix rules send
    the embeddings to an AdamW fallback, as the anchors do; Muon follows the conventions of the
    backend's own Muon (torch: clamped norm, bf16 Newton–Schulz; optax: tests/test_jax_anchors.py)."""
    routing = deepopt.Routing(fallback_patterns=EMBED_PATTERNS)

    def fallback(lr, **kw):
        return deepopt.adamw(lr, weight_decay=0.0, **kw)

    if backend == "torch":
        muon = deepopt.muon(LR["muon"], weight_decay=MUON_WD, ns_steps=NS_STEPS, routing=routing,
                            fallback=fallback(LR["muon"]))
    else:
        muon = deepopt.muon(LR["muon"], weight_decay=MUON_WD, eps=1e-8, ns_steps=NS_STEPS,
                            ns_normalization="add", ns_dtype="input", bias_correction=True,
                            routing=routing, fallback=fallback(LR["muon"], eps=1e-8, nesterov=True))
    return {
        "sgd": deepopt.sgd(LR["sgd"], momentum=MOMENTUM),
        "adamw": deepopt.adamw(LR["adamw"], weight_decay=ADAMW_WD),
        # the preset as users get it (its own default routing), momentum as the SGD anchor
        "delta_momentum": deepopt.delta_momentum(LR["delta_momentum"], momentum=MOMENTUM),
        "muon": muon,
        "dmgd": deepopt.dmgd(LR["dmgd"], routing=routing, fallback=fallback(LR["dmgd"]),
                             ns_dtype="bfloat16" if backend == "torch" else "input"),   # as each backend's muon
        # the deep memory alone (no Newton–Schulz read-out): a second row of the dmgd group
        "dmgd_memory": deepopt.dmgd(LR["dmgd"], readout=None, routing=routing, fallback=fallback(LR["dmgd"])),
        "m3": deepopt.m3(LR["m3"], frequency=M3_PERIOD, routing=routing, fallback=fallback(LR["m3"]),
                         ns_dtype="bfloat16" if backend == "torch" else "input"),   # as each backend's muon
    }


M3_NOTE = f"no exact anchor (nearest: Muon); mean over {M3_PERIOD} consecutive steps (one slow write)"


# ---- torch ---------------------------------------------------------------------------------


def torch_table(deepopt, torch, torch_backend) -> dict[str, Plan]:
    """Contenders per spec: deepopt's optimizer, torch.optim's (foreach and fused)."""
    specs = deepopt_specs(deepopt, "torch")

    def ours(name: str, kind: str | None = None, ns_dtype: str = "float32", role: str = "deepopt",
             label: str | None = None) -> Entry:
        spec = specs[name]
        return Entry(label or f"deepopt.{name}", role, lambda ps: torch_backend.compile(spec, ps),
                     kind or name, ns_dtype, spec)

    def sgd(variant: str, lr: float) -> Entry:
        return Entry(f"torch.optim.SGD({variant})", "anchor", lambda ps: torch.optim.SGD(
            [p for _, p in ps], lr=lr, momentum=MOMENTUM, **{variant: True}), "sgd")

    def adamw(variant: str) -> Entry:
        return Entry(f"torch.optim.AdamW({variant})", "anchor", lambda ps: torch.optim.AdamW(
            [p for _, p in ps], lr=LR["adamw"], weight_decay=ADAMW_WD, **{variant: True}), "adamw")

    def muon_adamw(ps):
        mats = [p for n, p in ps if is_matrix(n, tuple(p.shape))]
        rest = [p for n, p in ps if not is_matrix(n, tuple(p.shape))]
        return [torch.optim.Muon(mats, lr=LR["muon"], weight_decay=MUON_WD, momentum=0.95,
                                 nesterov=True, ns_steps=NS_STEPS),
                torch.optim.AdamW(rest, lr=LR["muon"], weight_decay=0.0, foreach=True)]

    torch_muon = Entry("torch.optim.Muon+AdamW", "anchor", muon_adamw, "muon", "bfloat16")
    return {   # torch ≥ 2.4 has fused SGD/AdamW on CPU as well as CUDA
        "sgd": Plan((ours("sgd"), sgd("foreach", LR["sgd"]), sgd("fused", LR["sgd"])),
                    "torch.optim.SGD(foreach)"),
        "adamw": Plan((ours("adamw"), adamw("foreach"), adamw("fused")), "torch.optim.AdamW(foreach)"),
        "delta_momentum": Plan((ours("delta_momentum"), sgd("foreach", LR["delta_momentum"])),
                               "torch.optim.SGD(foreach)",
                               "no exact anchor: SGD momentum is delta momentum with zeta=0 (no S·KᵀK matmuls)"),
        "muon": Plan((ours("muon", ns_dtype="bfloat16"), torch_muon), torch_muon.name),
        "dmgd": Plan((ours("dmgd", ns_dtype="bfloat16"),
                      ours("dmgd_memory", role="deepopt-variant", label="deepopt.dmgd(readout=None)"),
                      ours("muon", ns_dtype="bfloat16", role="deepopt-reference"), torch_muon),
                     torch_muon.name, "default dmgd (a deep Muon: hidden=16, Newton–Schulz in bf16 as muon), and "
                     "the memory alone (readout=None, floor: DMGD's matmuls only); target is vs deepopt.muon"),
        "m3": Plan((ours("m3", ns_dtype="bfloat16"), ours("muon", ns_dtype="bfloat16", role="deepopt-reference"),
                    torch_muon), torch_muon.name, M3_NOTE + "; bf16 Newton–Schulz as muon; target is vs deepopt.muon",
                   amortize=M3_PERIOD),
    }


def torch_groups(shapes, device: str, only: set[str]):
    """Yields one group at a time, so only one group's parameter copies are alive."""
    import torch

    import deepopt
    import torch_backend

    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=gen) * 0.02 for n, s in shapes}
    grads = {n: (torch.randn(s, generator=gen) * 1e-3).to(device) for n, s in shapes}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fresh() -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for n, _ in shapes:
            p = torch.nn.Parameter(init[n].to(device).clone())
            p.grad = grads[n]          # shared: no optimizer here writes to its gradients
            out.append((n, p))
        return out

    def make(entry: Entry) -> Contender:
        try:
            opts = entry.build(fresh())
            opts = opts if isinstance(opts, list) else [opts]
            for o in opts:                                    # one step outside timing: state exists
                o.step()
            sync()
        except Exception as e:  # noqa: BLE001 - an unsupported configuration is a result
            return _failed(entry, e)

        def step():
            for o in opts:
                o.step()
            sync()

        def state_bytes():
            return sum(v.numel() * v.element_size() for o in opts for st in o.state.values()
                       for v in st.values() if isinstance(v, torch.Tensor))

        return _with_floor_routing(Contender(entry.name, entry.role, step, state_bytes, entry.floor_kind,
                                             entry.ns_dtype), entry)

    yield from build_groups("torch", torch_table(deepopt, torch, torch_backend), make, only)


def torch_probes(device: str, size: str) -> dict[str, Probe]:
    """The floor's probes in torch here: an in-place pass over 64 MB (``--quick``; 256 MB at
    full size) and a square matmul in float32 and bfloat16."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    numel = {"full": 64, "quick": 16, "tiny": 1}[size] * 2**20
    x = torch.randn(numel, device=device)

    def synced(fn):
        def step():
            fn()
            sync()
        return step

    # In place, as the optimizer steps write their state and parameters (and as jax_probes):
    # ``y.copy_(x)`` into another buffer also reads y's lines before writing them on a CPU, and
    # measured ~25 GB/s where ``x.add_(1)`` moves 47 (2-core EPYC, one thread).
    probes = {"floor: copy": Probe("bytes", "", 2 * numel * 4, synced(lambda: x.add_(1.0)))}
    n = {"full": 2048, "quick": 1024, "tiny": 256}[size] * (4 if device == "cuda" else 1)
    for dt_name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        probes[f"floor: matmul {dt_name}"] = Probe("flops", dt_name, 2 * n**3, synced(lambda a=a, b=b: a @ b))
    return probes


# ---- jax -----------------------------------------------------------------------------------


def jax_table(deepopt, optax, jax_backend, shapes) -> dict[str, Plan]:
    """Contenders per spec: deepopt's transformation, optax's (``optax.contrib.muon`` for matrix
    rules without an exact optax counterpart)."""
    specs = deepopt_specs(deepopt, "jax")
    # A static tree (a callable would also be called on optax's masked trees): None → Adam.
    muon_dims = {n: (optax.contrib.MuonDimensionNumbers() if is_matrix(n, s) else None) for n, s in shapes}

    def ours(name: str, role: str = "deepopt", label: str | None = None) -> Entry:
        spec = specs[name]
        return Entry(label or f"deepopt.{name}", role, lambda: jax_backend.compile(spec), name, spec=spec)

    def sgd(lr: float) -> Entry:
        return Entry("optax.sgd", "anchor", lambda: optax.sgd(lr, momentum=MOMENTUM), "sgd")

    optax_muon = Entry("optax.contrib.muon", "anchor", lambda: optax.contrib.muon(
        LR["muon"], ns_steps=NS_STEPS, beta=0.95, eps=1e-8, weight_decay=MUON_WD,
        muon_weight_dimension_numbers=muon_dims), "muon")
    return {
        "sgd": Plan((ours("sgd"), sgd(LR["sgd"])), "optax.sgd"),
        "adamw": Plan((ours("adamw"), Entry("optax.adamw", "anchor", lambda: optax.adamw(
            LR["adamw"], weight_decay=ADAMW_WD), "adamw")), "optax.adamw"),
        "delta_momentum": Plan((ours("delta_momentum"), sgd(LR["delta_momentum"])), "optax.sgd",
                               "no exact anchor: SGD momentum is delta momentum with zeta=0"),
        "muon": Plan((ours("muon"), optax_muon), optax_muon.name),
        "dmgd": Plan((ours("dmgd"), ours("dmgd_memory", role="deepopt-variant", label="deepopt.dmgd(readout=None)"),
                      optax_muon), optax_muon.name,
                     "no exact anchor (nearest: Muon); and the memory alone (readout=None, floor: DMGD's matmuls only)"),
        "m3": Plan((ours("m3"), optax_muon), optax_muon.name, M3_NOTE, amortize=M3_PERIOD),
    }


def jax_groups(shapes, only: set[str]):
    """Yields one group at a time (see :func:`torch_groups`)."""
    import jax
    import jax.numpy as jnp
    import optax

    import deepopt
    import jax_backend

    rng = np.random.default_rng(0)

    def jshape(shape):   # optax layout: kernels are (in, out)
        return tuple(reversed(shape)) if len(shape) == 2 else shape

    init = {n: jnp.asarray(rng.normal(size=jshape(s)) * 0.02, jnp.float32) for n, s in shapes}
    grads = {n: jnp.asarray(rng.normal(size=jshape(s)) * 1e-3, jnp.float32) for n, s in shapes}
    shared: dict[str, Contender] = {}

    def make(entry: Entry) -> Contender:
        """A jitted contender; anchors are compiled once and reused by every group."""
        if entry.role == "anchor" and entry.name in shared:
            return shared[entry.name]
        c = _make(entry)
        if entry.role == "anchor" and c.step is not None:
            shared[entry.name] = c
        return c

    def _make(entry: Entry) -> Contender:
        traces = {"n": 0}
        try:
            tx = entry.build()

            def step_fn(params, state, g):
                traces["n"] += 1                               # runs only when jax traces
                updates, state = tx.update(g, state, params)
                return optax.apply_updates(params, updates), state

            jitted = jax.jit(step_fn, donate_argnums=(0, 1))
            carry = {"p": jax.tree.map(jnp.copy, init)}
            carry["s"] = tx.init(carry["p"])
            n_params = sum(x.size for x in jax.tree.leaves(carry["p"]))
            carry["p"], carry["s"] = jitted(carry["p"], carry["s"], grads)
            jax.block_until_ready(carry["p"])
            after_first = traces["n"]
            carry["p"], carry["s"] = jitted(carry["p"], carry["s"], grads)
            jax.block_until_ready(carry["p"])
            after_second = traces["n"]
        except Exception as e:  # noqa: BLE001 - unsupported specs are a result, not a crash
            return _failed(entry, e)

        def step():
            carry["p"], carry["s"] = jitted(carry["p"], carry["s"], grads)
            jax.block_until_ready((carry["p"], carry["s"]))

        def state_bytes():
            return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry["s"])
                       if hasattr(x, "dtype"))

        c = Contender(entry.name, entry.role, step, state_bytes, entry.floor_kind)
        c.extra = {"traces_after_first_step": after_first, "traces_after_second_step": after_second,
                   "traces": traces, "n_params": n_params}
        return _with_floor_routing(c, entry, jshape)    # optax layout → torch shapes for routing

    yield from build_groups("jax", jax_table(deepopt, optax, jax_backend, shapes), make, only)


def jax_probes(size: str) -> dict[str, Probe]:
    """The floor's probes in JAX here (see :func:`torch_probes`): a donated in-place pass and a
    float32 matmul, each jitted."""
    import jax
    import jax.numpy as jnp

    numel = {"full": 64, "quick": 16, "tiny": 1}[size] * 2**20
    buf = {"x": jnp.ones((numel,), jnp.float32)}
    add = jax.jit(lambda v: v + 1.0, donate_argnums=0)   # read + write each element, in place

    def bump():
        buf["x"] = add(buf["x"])
        jax.block_until_ready(buf["x"])
    n = {"full": 2048, "quick": 1024, "tiny": 256}[size]
    a = jnp.ones((n, n), jnp.float32) * 0.5
    mm = jax.jit(lambda u: u @ u)
    return {"floor: copy": Probe("bytes", "", 2 * numel * 4, bump),
            "floor: matmul float32": Probe("flops", "float32", 2 * n**3, lambda: jax.block_until_ready(mm(a)))}


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def run_group(group: Group, shapes, probes: dict[str, Probe], n_params: int, warmup: int,
              repeats: int, max_seconds: float) -> tuple[list[dict], dict]:
    """Time the group's contenders interleaved, and price their floors at the probes' best rates
    over four calls right before and four right after the group (best, as the start-of-run
    rates are: the floor is what the machine can do). Measured once at the start of a run, the
    rates left a shared machine's drift in the floors: a float32 matmul rate of 59 to 85
    GFLOP/s between runs within an hour. Timed in every round, the probes' 64 MB pass evicted
    the steps' state from the caches and moved the ratios to the anchors (torch SGD from 1.10×
    to 1.25× the fused kernel)."""
    live = {c.name: c for c in group.contenders if c.step is not None}
    terms = {c.name: floor_terms(c.floor_kind, shapes, route=c.route, fallback_kind=c.fallback_kind,
                                 hidden=c.hidden, products=c.products) for c in live.values()}
    have = {p.dtype for p in probes.values() if p.term == "flops"}
    need = {c.ns_dtype if c.ns_dtype in have else "float32" for c in live.values() if terms[c.name]["flops"]}
    used = {n: p for n, p in probes.items() if p.term == "bytes" or p.dtype in need}
    if group.amortize:
        # Warm up for a whole period (the first slow write is a one-off: ~1 s under jit on CPU),
        # then time one whole period of single steps: the mean includes exactly one slow write.
        warmup, repeats, max_seconds = group.amortize, group.amortize, None
    before = probe_times(used) if live else {}
    times = _common.interleaved({n: c.step for n, c in live.items()}, warmup=warmup,
                                repeats=repeats, max_seconds=max_seconds) if live else {}
    after = probe_times(used) if live else {}
    rates = {n: p.amount / min(before[n] + after[n]) for n, p in used.items()} if live else {}
    stat = "mean" if group.amortize else "median"
    ratio_key = "of_means" if group.amortize else "median"
    rows = []
    for c in group.contenders:
        row: dict[str, Any] = {"backend": group.backend, "spec": group.spec, "contender": c.name,
                               "role": c.role,
                               "status": "ok" if c.step else c.extra.get("status", "error")}
        if c.step is None:
            row["error"] = c.error
            rows.append(row)
            continue
        row["time_ms"] = _common.summary(times[c.name], 1e3)
        row["headline_stat"] = stat
        row["state_bytes_per_param"] = c.state_bytes() / n_params
        t = terms[c.name]
        fl = floor_at(t, c.ns_dtype, used, rates)
        row["floor"] = {"math": c.floor_kind, "bytes": t["bytes"], "matmul_flops": t["flops"],
                        "matmul_dtype": c.ns_dtype, "ms": fl * 1e3, "rates": rates}
        row["time_over_floor"] = row["time_ms"][stat] / (fl * 1e3)
        row["ratios"] = {f"vs {o}": _common.ratio_summary(times[c.name], times[o])
                         for o in live if o != c.name}
        row.update(c.extra and {"jit": {"traces_after_first_step": c.extra["traces_after_first_step"],
                                        "traces_after_second_step": c.extra["traces_after_second_step"],
                                        "traces_total": c.extra["traces"]["n"],
                                        "recompiled": c.extra["traces"]["n"] != 1}} or {})
        rows.append(row)

    # One summary per (backend, spec): deepopt vs its anchor, and the target.
    main = next(c for c in group.contenders if c.role == "deepopt")
    pair: dict[str, Any] = {"backend": group.backend, "spec": group.spec, "deepopt": main.name,
                            "anchor": group.anchor, "note": group.note, "headline_stat": stat}
    target = TARGETS.get((group.backend, group.spec))
    if main.step is None:
        pair.update(status=main.extra.get("status", "error"), error=main.error)
        return rows, pair
    ref = group.anchor if target is None or target[1] is None else target[1]
    by_name = {r["contender"]: r for r in rows}
    pair["status"] = "ok"
    pair["deepopt_ms"] = by_name[main.name]["time_ms"][stat]
    if group.anchor in live:
        pair["anchor_ms"] = by_name[group.anchor]["time_ms"][stat]
        pair["ratio"] = by_name[main.name]["ratios"][f"vs {group.anchor}"]
        pair["ratio_headline"] = pair["ratio"][ratio_key]
    if target is not None:
        pair["target"] = {"max_ratio": target[0], "vs": ref}
        if ref in live:
            r = by_name[main.name]["ratios"][f"vs {ref}"][ratio_key]
            pair["target"].update(ratio=r, met=bool(r <= target[0]))
    pair["time_over_floor"] = by_name[main.name]["time_over_floor"]
    variants = {c.name: {"ms": by_name[c.name]["time_ms"][stat],
                         "time_over_floor": by_name[c.name]["time_over_floor"]}
                for c in group.contenders if c.role == "deepopt-variant" and c.step is not None}
    if variants:                                    # e.g. dmgd's memory alone (readout=None)
        pair["variants"] = variants
    pair["state_bytes_per_param"] = by_name[main.name]["state_bytes_per_param"]
    if "jit" in by_name[main.name]:
        pair["recompiled"] = by_name[main.name]["jit"]["recompiled"]
    return rows, pair


def print_table(rows: list[dict]) -> str:
    header = ["backend", "spec", "contender", "median ms", "IQR ms", "ratio vs anchor [IQR]",
              "state B/param", "floor ms", "time/floor", "traces"]
    table = []
    anchors = {}
    for r in rows:
        if r["role"] == "anchor" and (r["backend"], r["spec"]) not in anchors:
            anchors[(r["backend"], r["spec"])] = r["contender"]
    for r in rows:
        if r["status"] != "ok":
            table.append([r["backend"], r["spec"], r["contender"], r["status"], r.get("error", "")[:60],
                          None, None, None, None, None])
            continue
        t = r["time_ms"]
        a = anchors.get((r["backend"], r["spec"]))
        ratio = r["ratios"].get(f"vs {a}") if a and a != r["contender"] else None
        if ratio and r["headline_stat"] == "mean":
            rs = f"{ratio['of_means']:.2f} (of means)"
        elif ratio:
            rs = f"{ratio['median']:.2f} [{ratio['q1']:.2f}–{ratio['q3']:.2f}]"
        else:
            rs = "(anchor)"
        tr = r.get("jit", {}).get("traces_total")
        table.append([r["backend"], r["spec"], r["contender"],
                      t["median"] if r["headline_stat"] == "median" else f"{t['mean']:.3g} (mean)",
                      f"{t['q1']:.3g}–{t['q3']:.3g}", rs, r["state_bytes_per_param"], r["floor"]["ms"],
                      r["time_over_floor"], tr])
    return _common.fmt_table(header, table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down GPT-2 shapes (CPU, < 1 min)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--only", default=",".join(SPECS), help="comma-separated specs to run")
    ap.add_argument("--backends", default="torch,jax", help="comma-separated: torch, jax")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a group's rounds once this many seconds have passed, after at least 5 "
                         "(default 2.5 at --quick, 60 at full size): where a group's slowest contender "
                         "takes ~1 s a step (bf16 Newton–Schulz on a CPU without bf16 hardware), more "
                         "seconds give its fast rows more than 5 samples")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and XLA CPU threads (default: the libraries' own); 1 is steadier on a busy machine, "
                         "and pins the process to one core (XLA's large matmuls otherwise use every core, so the "
                         "floor's matmul rate would not be the one core the steps get)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    pinned = None
    if args.threads:
        _common.limit_threads(args.threads)      # before torch or jax is imported
        if args.threads == 1 and args.device == "cpu":
            pinned = pin_to_one_core()

    size = "tiny" if (args.tiny or _common.tiny()) else ("quick" if args.quick else "full")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SPECS)
    if unknown:
        ap.error(f"unknown specs {sorted(unknown)}; choose from {SPECS}")
    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    repeats = args.repeats or {"tiny": 3, "quick": 15, "full": 10}[size]
    warmup = {"tiny": 1, "quick": 3, "full": 2}[size]
    max_seconds = {"tiny": 1.0, "quick": 2.5, "full": 60.0}[size] if args.max_seconds is None else args.max_seconds
    if max_seconds <= 0:
        ap.error(f"--max-seconds must be positive, got {args.max_seconds}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device visible to torch")
    warnings.filterwarnings("ignore", message=".*[Dd]onat.*")

    shapes = gpt2_shapes(size)
    n_params = sum(math.prod(s) for _, s in shapes)
    n_matrix = sum(math.prod(s) for n, s in shapes if is_matrix(n, s))
    t_start = time.perf_counter()
    print(f"step_cost: size={size} ({n_params/1e6:.2f}M params, {n_matrix/1e6:.2f}M in hidden "
          f"matrices), device={args.device}", flush=True)

    rows: list[dict] = []
    pairs: list[dict] = []
    rates: dict[str, dict] = {}
    env = _common.environment(args.device)
    env["jax_devices"] = None
    result = {
        "benchmark": "step_cost",
        "config": {"size": size, "shapes": SIZES[size], "n_params": n_params,
                   "n_matrix_params": n_matrix, "embedding_routing": list(EMBED_PATTERNS),
                   "lr": LR, "momentum": MOMENTUM, "adamw_weight_decay": ADAMW_WD,
                   "muon_weight_decay": MUON_WD, "ns_steps": NS_STEPS, "m3_frequency": M3_PERIOD,
                   "warmup_rounds": warmup, "repeats": repeats, "max_seconds_per_group": max_seconds,
                   "dtype": "float32",
                   "torch_threads": args.threads, "pinned_core": pinned,
                   "floor_model": {"words_per_element": WORDS,
                                   "rule": "bytes/copy bandwidth + matmul FLOPs/matmul rate; "
                                           "NS 5·(4m²n+2m³), DMGD 14·m·n·h (L2; 12·m·n·h dot) + its NS, delta 4m²n"}},
        "environment": env,
        "rates": rates,
        "pairs": pairs,
        "rows": rows,
        "complete": False,
    }

    def save(backend: str, spec: str) -> Path:
        """Write what is measured so far: a run stopped by a time limit keeps its finished groups."""
        result["wall_seconds"] = time.perf_counter() - t_start
        print(f"  {backend} {spec}: done ({result['wall_seconds']:.0f}s)", flush=True)
        return _common.write_json(args.out / "step_cost.json", result)

    if "torch" in backends:
        import torch

        probes = torch_probes(args.device, size)
        rates["torch"] = rates_of(probes)
        for g in torch_groups(shapes, args.device, only):
            r, p = run_group(g, shapes, probes, n_params, warmup, repeats, max_seconds)
            rows += r
            pairs.append(p)
            save("torch", g.spec)
            del g                          # free this group's parameter copies before the next
    if "jax" in backends:
        env["jax_devices"] = _common.jax_devices()
        probes = jax_probes(size)
        rates["jax"] = rates_of(probes)
        for g in jax_groups(shapes, only):
            r, p = run_group(g, shapes, probes, n_params, warmup, repeats, max_seconds)
            rows += r
            pairs.append(p)
            save("jax", g.spec)
            del g

    result["complete"] = True
    out = _common.write_json(args.out / "step_cost.json", result)
    table = print_table(rows)
    print(table)
    print()
    print(pairs_table(pairs))
    print(f"\nwrote {out} ({result['wall_seconds']:.0f}s)")
    return 0


def pairs_table(pairs: list[dict]) -> str:
    header = ["backend", "spec", "deepopt ms", "anchor", "anchor ms", "ratio", "target",
              "met", "time/floor", "recompiled"]
    rows = []
    for p in pairs:
        if p["status"] != "ok":
            rows.append([p["backend"], p["spec"], p["status"], p.get("anchor"), None, None,
                         None, None, None, p.get("error", "")[:70]])
            continue
        t = p.get("target", {})
        tgt = f"≤ {t['max_ratio']} vs {t['vs']}" if t else None
        rows.append([p["backend"], p["spec"], p["deepopt_ms"], p["anchor"], p.get("anchor_ms"),
                     p.get("ratio_headline"), tgt,
                     (f"{'yes' if t['met'] else 'no'} ({t['ratio']:.2f})" if "met" in t else None),
                     p["time_over_floor"], p.get("recompiled")])
    return _common.fmt_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
