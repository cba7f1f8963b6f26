"""DMGD's memory per bucket in JAX: deepopt's C++ kernel (an XLA custom call) against XLA's ops.

    python -m benchmarks.dmgd_kernel [--full] [--threads 1] [--buckets 4] [--repeats 40] --out DIR
    python -m benchmarks.dmgd_kernel --step [--threads 1] [--repeats 200] --out DIR

For each bucket shape of step_cost's GPT-2-like model (``--quick`` widths by default, GPT-2
small's with ``--full``) and each layout (optax's ``(in, out)`` leaves, read as the matrix view's
columns, and torch's ``(out, in)``), one jitted call of ``_deep_memory.native_bucket`` and one of
``deep_memory_kernel`` on the same stacks (the state donated, as a training step donates it),
timed interleaved (benchmarks/_common.py). Reports each one's median time and GFLOP/s (the
memory's seven products, ``14 m n h`` FLOPs per matrix) and the per-round ratio custom call ÷
XLA ops. Where the kernel cannot be built the custom call's column is empty.

``--step``: the whole jitted step of step_cost's ``dmgd_memory`` contender (``--quick`` model,
DMGD's memory alone with the AdamW fallback, params and state donated), traced once with the
custom call and once with the XLA ops, timed interleaved in one process: the per-round ratio is
what the kernel changes in a training step, free of the drift between separate runs. Beside
them, the step without the model's 1-D leaves and with its DMGD matrices only, with XLA's
fusion count of each: what the fallback's many small leaves cost; and the step with the
fallback's small leaves left unpacked (``fallback_per_leaf``, jax_backend/_packing.py), with
the per-round ratio packed ÷ per leaf.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks._threads import limit_threads

SHAPES = {"quick": [(384, 128), (128, 128), (512, 128), (128, 512)],     # (m, n): c_attn, c_proj, c_fc, mlp.c_proj
          "full": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
          "tiny": [(24, 8), (8, 8)]}


def _measure(memory, transposed: bool, m: int, n: int, b: int, repeats: int, rng, built: bool) -> dict:
    """One bucket of ``b`` m×n matrices: the XLA ops and (where built) the custom call, jitted
    with the state donated, timed interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import _common
    from jax_backend import _deep_memory

    h = memory.hidden
    leaf = (n, m) if transposed else (m, n)
    state = [jnp.asarray(rng.normal(size=(b, *leaf)) * 1e-3, jnp.float32),
             jnp.asarray(rng.normal(size=(b, h, n)) * 0.1, jnp.float32),
             jnp.zeros((b, n, h), jnp.float32), jnp.zeros((b,), jnp.float32)]
    grads = [jnp.asarray(rng.normal(size=leaf) * 1e-3, jnp.float32) for _ in range(b)]
    calls = {"xla_ops": lambda s, w1, w2, nu, gs: _deep_memory.deep_memory_kernel(
        memory, s, w1, w2, nu, jnp.stack(gs), jnp.stack(gs), None, transposed=transposed)[:5]}
    if built:
        calls["custom_call"] = lambda s, w1, w2, nu, gs: _deep_memory.native_bucket(
            memory, s, w1, w2, nu, None, list(gs), [], transposed=transposed)[:5]

    def timed(fn):
        fn = jax.jit(fn, donate_argnums=(0, 1, 2, 3))
        held = [jnp.copy(x) for x in state]

        def call():
            out = fn(*held, grads)
            held[:] = out[:4]
            jax.block_until_ready(out)
        return call

    times = _common.interleaved({name: timed(fn) for name, fn in calls.items()}, warmup=3, repeats=repeats)
    flops = 14 * m * n * h * b
    row = {"layout": "optax" if transposed else "torch", "m": m, "n": n, "bucket": b,
           **{name: {"ms": _common.summary(t, 1e3), "gflops": flops / float(np.median(t)) / 1e9}
              for name, t in times.items()}}
    if built:
        row["custom_call_over_xla_ops"] = _common.ratio_summary(times["custom_call"], times["xla_ops"])
    return row


def _step_ab(repeats: int, built: bool, size: str = "quick") -> dict:
    """step_cost's ``dmgd_memory`` step (``size``: its model's), with the custom call and with the XLA ops;
    and, with the custom call, the same step without the model's 1-D leaves and with its DMGD
    matrices only: what the fallback's leaves cost (each leaf is a fusion of its own in XLA)."""

    import jax.numpy as jnp
    import numpy as np

    import deepopt
    import jax_backend
    from benchmarks import _common, step_cost
    from jax_backend import _compile, _deep_memory

    rng = np.random.default_rng(0)
    shape = lambda s: tuple(reversed(s)) if len(s) == 2 else s   # noqa: E731  optax layout: (in, out)
    shapes = step_cost.gpt2_shapes(size)
    spec = step_cost.deepopt_specs(deepopt, "jax")["dmgd_memory"]
    ready = _deep_memory.native_ready
    fusions: dict[str, int] = {}

    def step(name: str, native: bool, keep=lambda k, s: True, packed: bool = True):
        init = {k: jnp.asarray(rng.normal(size=shape(s)) * 0.02, jnp.float32) for k, s in shapes if keep(k, s)}
        grads = {k: jnp.asarray(rng.normal(size=x.shape) * 1e-3, jnp.float32) for k, x in init.items()}
        packable = _compile.packable
        _compile.packable = packable if packed else (lambda rule: False)
        try:
            tx = jax_backend.compile(spec)
        finally:
            _compile.packable = packable
        _deep_memory.native_ready = ready if native else (lambda *a: False)
        try:                                  # traced (and the route taken) here, once
            call, fusions[name] = _common.jax_step(tx, init, grads)
        finally:
            _deep_memory.native_ready = ready
        return call

    fns = {"xla_ops": step("xla_ops", False),
           "fallback_per_leaf": step("fallback_per_leaf", built, packed=False)}
    if built:
        fns["custom_call"] = step("custom_call", True)
        fns["custom_call_no_1d_leaves"] = step("custom_call_no_1d_leaves", True, lambda k, s: len(s) >= 2)
        fns["custom_call_dmgd_matrices_only"] = step("custom_call_dmgd_matrices_only", True, step_cost.is_matrix)
    times = _common.interleaved(fns, warmup=5, repeats=repeats)
    out = {name: {**_common.summary(t, 1e3), "fusions": fusions[name]} for name, t in times.items()}
    if built:
        out["custom_call_over_xla_ops"] = _common.ratio_summary(times["custom_call"], times["xla_ops"])
    main = times["custom_call" if built else "xla_ops"]
    out["packed_over_per_leaf"] = _common.ratio_summary(main, times["fallback_per_leaf"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="GPT-2 small's shapes (default: step_cost --quick's)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="XLA's CPU threads (1: one core, pinned)")
    ap.add_argument("--buckets", type=int, default=4, help="matrices per bucket (step_cost --quick: 4)")
    ap.add_argument("--step", action="store_true", help="the whole step_cost --quick step instead, in one process")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    limit_threads(args.threads)
    import os

    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    import numpy as np

    from benchmarks import _common
    from deepopt import DeepMemory
    from jax_backend import _native

    size = "tiny" if (args.tiny or _common.tiny()) else "full" if args.full else "quick"
    memory = DeepMemory()
    built = _native.target() is not None
    if args.step:
        started = time.perf_counter()
        size = "tiny" if size == "tiny" else "quick"
        result = {"benchmark": "dmgd_kernel", "mode": "step", "size": size, "threads": args.threads,
                  "kernel_built": built, "environment": _common.environment(),
                  "step_ms": _step_ab(args.repeats, built, size)}
        result["seconds"] = time.perf_counter() - started
        step = result["step_ms"]
        print(_common.fmt_table(["step", "ms", "XLA fusions"], [[name, s["median"], s["fusions"]]
                                                                   for name, s in step.items() if "fusions" in s]))
        if "custom_call_over_xla_ops" in step:
            print(f"custom call / XLA ops, median of rounds: {step['custom_call_over_xla_ops']['median']:.3f}")
        print(f"fallback packed / per leaf, median of rounds: {step['packed_over_per_leaf']['median']:.3f}")
        print(f"wrote {_common.write_json(f'{args.out}/dmgd_kernel.json', result)}")
        return 0
    rng = np.random.default_rng(0)
    rows, table = [], []
    started = time.perf_counter()
    for layout in ("optax", "torch"):
        for m, n in SHAPES[size]:
            row = _measure(memory, layout == "optax", m, n, args.buckets, args.repeats, rng, built)
            rows.append(row)
            table.append([layout, f"{m}×{n}", row["xla_ops"]["ms"]["median"], row["xla_ops"]["gflops"],
                          row.get("custom_call", {}).get("ms", {}).get("median"),
                          row.get("custom_call", {}).get("gflops"),
                          row.get("custom_call_over_xla_ops", {}).get("median")])
    result = {"benchmark": "dmgd_kernel", "mode": "buckets", "size": size, "threads": args.threads, "kernel_built": built,
              "environment": _common.environment(), "rows": rows, "seconds": time.perf_counter() - started}
    print(_common.fmt_table(["layout", "m×n", "XLA ops ms", "GFLOP/s", "custom call ms", "GFLOP/s",
                             "custom call / XLA ops"], table))
    path = _common.write_json(f"{args.out}/dmgd_kernel.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
