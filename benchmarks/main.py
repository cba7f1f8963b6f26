"""The main job: every deepopt optimizer through both backends, then the HOPE comparison.

    python -m benchmarks.main [--quick] [--threads 1] [--out runs] [--skip-hope]

1. ``benchmarks.compare``: sgd, adamw, delta momentum, muon, DMGD and M3 train one small MLP
   with ``torch_backend`` and with ``jax_backend`` from the same start (losses, the two
   backends' parameter gap, step times).
2. ``benchmarks.hope.compare`` (its reduced grid: 2 lrs × 1 seed, 100 steps): HOPE with AdamW,
   DMGD and Muon, static HOPE (no in-context writes) and Transformer++ with AdamW and Muon, on
   the byte-level corpus built from the Python standard library (preset ``cpu-tiny``).

Thread counts are set before torch or jax is imported (they share the cores; each would
otherwise start a pool as wide as the machine), and are passed on to the HOPE runs.
Everything is written under ``--out``; ``summary.json`` records the durations and the run's
provenance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks._threads import limit_threads

# Printed so that a user knows what to expect before waiting. Measured with --threads 1 on a
# 2-core CPU container shared with other jobs (2026-11-25): default 6.4 min wall for 2.9 min of
# CPU time, --quick 3.1 min wall for 1.2 min of CPU; a quiet machine is near the CPU times.
EXPECTED_MINUTES = {"default": "1.5–7", "quick": "1–3"}   # quiet … busy 2-core machine
QUICK_COMPARE_STEPS = 60
QUICK_HOPE_STEPS = 40

CAVEATS = """\
Caveats:
  - CPU timings on a shared machine are noisy: compare ratios measured side by side in one
    process (benchmarks.step_cost does that), not absolute times across runs.
  - Learning rates are each optimizer's default, not tuned: part 2 checks the pipeline and
    is not a quality claim (docs/benchmarks.md says how quality is measured).
  - The HOPE models are tiny (cpu-tiny preset); the GPU presets are run by
    benchmarks.hope.compare --preset gpu-small on a GPU."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.main",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs", help="output directory (default: runs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch and XLA, also in the HOPE runs (default: 1)")
    parser.add_argument("--quick", action="store_true",
                        help=f"shorter runs ({QUICK_COMPARE_STEPS} MLP steps, {QUICK_HOPE_STEPS} HOPE steps, "
                             "no interleaved throughput)")
    parser.add_argument("--skip-hope", action="store_true", help="only part 1, the optimizer comparison")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads={args.threads} is invalid: expected an int ≥ 1")

    limit_threads(args.threads)          # before numpy, torch or jax is imported
    from benchmarks import _common, compare

    size = "quick" if args.quick else "default"
    print(f"deepopt main job ({size} size, {args.threads} thread(s) for torch and XLA); expected "
          f"{EXPECTED_MINUTES[size]} min on 2 CPU cores.\n{CAVEATS}\n", flush=True)
    start = time.perf_counter()
    durations: dict[str, float] = {}

    print("== 1. deepopt optimizers through torch_backend and jax_backend ==", flush=True)
    compare_args = ["--out", os.path.join(args.out, "compare"), "--threads", str(args.threads)]
    if args.quick:
        compare_args += ["--steps", str(QUICK_COMPARE_STEPS)]
    compare.main(compare_args)
    durations["compare_s"] = time.perf_counter() - start

    if not args.skip_hope:
        from benchmarks.hope import compare as hope_compare

        print("\n== 2. HOPE (AdamW, DMGD, Muon, static) and Transformer++ (AdamW, Muon), cpu-tiny, "
              "stdlib byte corpus, reduced grid ==", flush=True)
        t0 = time.perf_counter()
        hope_args = ["--preset", "cpu-tiny", "--out", os.path.join(args.out, "hope"),
                     "--threads", str(args.threads)]
        if args.quick:
            hope_args += ["--steps", str(QUICK_HOPE_STEPS), "--no-throughput"]
        hope_compare.main(hope_args)
        durations["hope_s"] = time.perf_counter() - t0

    durations["total_s"] = time.perf_counter() - start
    summary = {"environment": _common.environment(), "size": size, "threads": args.threads,
               "expected_minutes": EXPECTED_MINUTES[size], "durations": durations}
    path = _common.write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"\nmain job done in {durations['total_s'] / 60:.1f} min (expected {EXPECTED_MINUTES[size]} min "
          f"on 2 CPU cores); summary in {path}", file=sys.stdout, flush=True)
    return summary


if __name__ == "__main__":
    main()
