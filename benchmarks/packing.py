"""The fallback's small leaves in JAX: packed into one vector per dtype against leaf by leaf.

    python -m benchmarks.packing [--threads 1] [--leaves 34] [--sizes 128,512,...] [--repeats 200] --out DIR

For each leaf size, a pytree of ``--leaves`` 1-D float32 leaves of that size (step_cost
``--quick``'s GPT-2 has 34 small leaves) is stepped by ``deepopt.adamw`` (weight decay 0.01) as a
matrix rule's fallback steps it (``jax_backend.pack_small_leaves``, ``max_size`` above every size
here) and leaf by leaf (as ``deepopt.adamw`` alone, optax's layout); and by ``optax.adamw``,
the anchor. Each step is one jitted call, ``optax.apply_updates`` inside, the parameters and
the state donated, timed interleaved (benchmarks/_common.py). Reports the median step time and
the per-round ratio packed ÷ per leaf: where it passes 1, the concatenation and the slices cost
more than the fusions they save, which sets ``jax_backend._packing.MAX_PACKED_SIZE``.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks._threads import limit_threads

SIZES = (128, 512, 2048, 4096, 8192, 32768, 131072)


def _measure(leaves: int, size: int, repeats: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    import optax

    import deepopt
    import jax_backend
    from benchmarks import _common

    rng = np.random.default_rng(size)
    params = {f"b{i}": jnp.asarray(rng.normal(size=size), jnp.float32) for i in range(leaves)}
    grads = {k: jnp.asarray(rng.normal(size=size) * 1e-3, jnp.float32) for k in params}
    spec = deepopt.adamw(1e-3, weight_decay=0.01)
    txs = {"packed": jax_backend.pack_small_leaves(jax_backend.compile(spec), max_size=size),
           "per_leaf": jax_backend.compile(spec),
           "optax.adamw": optax.adamw(1e-3, weight_decay=0.01)}
    fusions: dict[str, int] = {}

    def timed(name, tx):
        call, fusions[name] = _common.jax_step(tx, params, grads)
        return call

    times = _common.interleaved({name: timed(name, tx) for name, tx in txs.items()}, warmup=5, repeats=repeats)
    return {"leaf_size": size, "leaves": leaves,
            **{name: {"ms": _common.summary(t, 1e3), "fusions": fusions[name]} for name, t in times.items()},
            "packed_over_per_leaf": _common.ratio_summary(times["packed"], times["per_leaf"]),
            "packed_over_optax": _common.ratio_summary(times["packed"], times["optax.adamw"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="XLA's CPU threads (1: one core, pinned)")
    ap.add_argument("--leaves", type=int, default=34, help="1-D leaves in the tree (step_cost --quick: 34)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated leaf sizes")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    limit_threads(args.threads)
    import os

    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    from benchmarks import _common

    tiny = args.tiny or _common.tiny()
    sizes = (16, 64) if tiny else tuple(int(s) for s in args.sizes.split(",") if s.strip())
    leaves = 4 if tiny else args.leaves
    started = time.perf_counter()
    rows = [_measure(leaves, size, 3 if tiny else args.repeats) for size in sizes]
    result = {"benchmark": "packing", "threads": args.threads, "environment": _common.environment(),
              "rows": rows, "seconds": time.perf_counter() - started}
    print(_common.fmt_table(
        ["leaf size", "packed ms", "per leaf ms", "optax.adamw ms", "fusions (packed / per leaf)",
         "packed / per leaf"],
        [[r["leaf_size"], r["packed"]["ms"]["median"], r["per_leaf"]["ms"]["median"], r["optax.adamw"]["ms"]["median"],
          f"{r['packed']['fusions']} / {r['per_leaf']['fusions']}", r["packed_over_per_leaf"]["median"]]
         for r in rows]))
    print(f"wrote {_common.write_json(f'{args.out}/packing.json', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
