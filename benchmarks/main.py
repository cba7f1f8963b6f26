"""The main job: every optimizer through both backends, then the HOPE cpu-tiny comparison.

    python -m benchmarks.main [--out runs]
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from benchmarks import compare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs")
    parser.add_argument("--skip-hope", action="store_true", help="only the optimizer comparison")
    args = parser.parse_args(argv)
    print("== 1. deepopt optimizers through torch_backend and jax_backend ==")
    compare.main(["--out", os.path.join(args.out, "compare")])
    if args.skip_hope:
        return
    if importlib.util.find_spec("benchmarks.hope.compare") is None:
        print("\n(benchmarks.hope.compare is not available; skipping the HOPE comparison)")
        return
    from benchmarks.hope import compare as hope_compare

    print("\n== 2. HOPE (DMGD, AdamW) and Transformer++ (AdamW), cpu-tiny, stdlib byte corpus ==")
    hope_compare.main(["--preset", "cpu-tiny", "--out", os.path.join(args.out, "hope")])


if __name__ == "__main__":
    main()
