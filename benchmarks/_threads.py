"""Thread limits for the benchmarks, set before numpy, torch or jax start their pools.

Standard library only, so that an entry point can call :func:`limit_threads` before it
imports anything that sizes a thread pool at load time.
"""

from __future__ import annotations

import os
import sys

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_threads(threads: int) -> dict[str, str]:
    """Use ``threads`` CPU threads in torch, XLA and BLAS, in this process and its children.

    Call it before importing torch or jax: XLA reads its flags once, at start-up, and the
    OpenMP / BLAS pools size themselves when first loaded (torch is also set directly if it is
    already imported). With one thread XLA's Eigen pool is turned off; XLA has no flag for a
    pool of another size, so for ``threads > 1`` it keeps its default. Returns the variables set.
    """
    if threads < 1:
        raise ValueError(f"threads={threads!r} is invalid: expected an int ≥ 1")
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "").split()
        for flag in ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"):
            if flag not in flags:
                flags.append(flag)
        os.environ["XLA_FLAGS"] = " ".join(flags)
        if "jax" in sys.modules:
            print("note: jax was imported before the thread limit; XLA keeps its own thread pool",
                  file=sys.stderr)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return {var: os.environ[var] for var in (*THREAD_VARIABLES, "XLA_FLAGS") if var in os.environ}


def pin_to_one_core() -> int | None:
    """Run this process, and the threads it starts, on one CPU core: the first it may use.

    Returns that core, or None where the platform has no affinity call. The one-thread flags of
    :func:`limit_threads` do not hold XLA's CPU runtime to one core everywhere: with jax 0.10 a
    1024² float32 matmul still ran at twice one core's rate on a 2-core machine (two cores), while
    the small matmuls of an optimizer step ran on one. A measurement that must be one core's,
    such as ``step_cost --threads 1``'s floors against its steps, pins.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core
