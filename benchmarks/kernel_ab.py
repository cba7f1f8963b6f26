"""DMGD's C++ memory kernel against itself at another revision, alternated in one process.

    python -m benchmarks.kernel_ab [--against REV] [--size quick|full] [--layouts rows,columns]
                                   [--rounds 200] [--no-flush] --out DIR

Builds ``benchmarks/csrc/deep_memory_ab.cpp`` with two copies of ``deepopt/csrc/deep_memory.h``:
A, the header at ``REV`` (``git show``, default ``HEAD``), and B, the working tree's. Each round
runs both kernels' step over step_cost's buckets of DMGD matrices (``--quick``: four of each of
the GPT-2-like model's four shapes; one thread; the outer step made in the read, as
``readout=None`` runs it), one right after the other in an order that alternates, each after a
48 MB pass that evicts the caches. Reports each side's median and the median of the per-round
ratios B ÷ A, per layout (``rows``: torch's ``(out, in)`` matrices; ``columns``: optax's
``(in, out)`` leaves).

On a shared machine a step's time drifts by ±30% over minutes, more than most changes to the
kernel are worth; the ratio of two steps taken back to back does not drift with it. This is the
measurement behind each change to the kernel's loops (benchmarks/README.md, "Seventeenth round");
``step_cost`` then says where the whole step stands against its floor. The two sides' parameters
at the end are compared too (``max_param_diff``): a change that should keep the math agrees
within float rounding.

Needs a C++ compiler (``$CXX``, else ``c++``) and git; the build flags are the kernels' own
(:data:`deepopt._native.CPU_FLAGS`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import _common
from benchmarks._threads import pin_to_one_core

REPO = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).with_name("csrc") / "deep_memory_ab.cpp"
HEADER = "deepopt/csrc/deep_memory.h"
LAYOUTS = ("rows", "columns")


def buckets_of(size: str) -> list[tuple[int, int, int]]:
    """(count, m, n) of each bucket of step_cost's DMGD matrices at ``size`` (its GPT-2-like model's
    matrices that a matrix rule takes: c_attn, c_proj, c_fc and mlp.c_proj, one per layer)."""
    from collections import Counter

    from benchmarks.step_cost import gpt2_shapes, is_matrix

    counts = Counter(shape for name, shape in gpt2_shapes(size) if is_matrix(name, shape))
    return [(count, m, n) for (m, n), count in counts.items()]


def header_at(rev: str) -> str:
    """The kernel's header at git revision ``rev``; a clear error where git cannot give it."""
    try:
        out = subprocess.run(["git", "show", f"{rev}:{HEADER}"], cwd=REPO, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SystemExit("kernel_ab: needs git, to read the header at the other revision; git is not installed") from None
    if out.returncode != 0:
        raise SystemExit(f"kernel_ab: git cannot show {HEADER} at {rev!r}: {out.stderr.strip()}")
    return out.stdout


def build(a_text: str, b_text: str, where: Path) -> Path:
    """The harness with header A (``a_text``) and B (``b_text``), compiled into ``where``."""
    from deepopt._native import CPU_FLAGS

    paths = []
    for side, text in (("a", a_text), ("b", b_text)):
        path = where / side / "deep_memory.h"
        path.parent.mkdir(parents=True)
        # A last line of its own: GCC's `#pragma once` takes two files of the same text for one.
        path.write_text(f"{text}\n// kernel_ab: side {side}\n")
        paths.append(path)
    exe = where / "deep_memory_ab"
    cmd = [os.environ.get("CXX") or "c++", *CPU_FLAGS, "-std=c++17", f'-DHEADER_A="{paths[0]}"',
           f'-DHEADER_B="{paths[1]}"', str(HARNESS), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit("kernel_ab: the harness did not build (the header at the other revision may not have "
                         f"this kernel's interface, Options and one_matrix):\n{out.stderr[-4000:]}")
    return exe


def measure(exe: Path, memory, buckets, transposed: bool, rounds: int, flush: bool) -> dict:
    """One layout: both kernels' seconds per round, summarised, and the per-round ratio B ÷ A."""
    args = [rounds, int(flush), int(transposed), memory.momentum, memory.inner_lr, memory.scale_decay,
            memory.key_eps, memory.SILU_SLOPE_SQ, int(memory.objective == "dot"), int(memory.nesterov)]
    args += [x for bucket in buckets for x in bucket]
    out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    a, b = data["a_seconds"], data["b_seconds"]
    flops = sum(14 * k * m * n * memory.hidden for k, m, n in buckets)      # seven products, 2·m·n·h each
    return {"a_ms": _common.summary(a, 1e3), "b_ms": _common.summary(b, 1e3),
            "b_over_a": _common.ratio_summary(b, a),
            "a_gflops": flops / min(a) / 1e9, "b_gflops": flops / min(b) / 1e9,
            "max_param_diff": data["max_param_diff"], "max_param": data["max_param"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="git revision of header A (default HEAD)")
    ap.add_argument("--size", default="quick", choices=("quick", "full"))
    ap.add_argument("--tiny", action="store_const", const="tiny", dest="size", help=argparse.SUPPRESS)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: rows, columns")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--no-flush", action="store_true", help="leave the caches warm between steps")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    if not layouts or set(layouts) - set(LAYOUTS):
        ap.error(f"--layouts: expected some of {', '.join(LAYOUTS)}, got {args.layouts!r}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    core = pin_to_one_core()

    import deepopt

    memory = deepopt.dmgd(1e-3, readout=None).rule.memory          # step_cost's dmgd_memory contender
    buckets = buckets_of(args.size)
    with tempfile.TemporaryDirectory(prefix="deepopt_kernel_ab_") as tmp:
        exe = build(header_at(args.against), (REPO / HEADER).read_text(), Path(tmp))
        rows = {layout: measure(exe, memory, buckets, layout == "columns", args.rounds, not args.no_flush)
                for layout in layouts}
    print(f"kernel_ab: A = {HEADER} at {args.against}, B = the working tree's; {args.rounds} rounds, "
          f"{'warm caches' if args.no_flush else 'caches evicted before each step'}, core {core}")
    print(_common.fmt_table(
        ["layout", "A ms", "B ms", "B / A (median of rounds)", "IQR", "A GFLOP/s", "B GFLOP/s", "max |ΔW|"],
        [[layout, r["a_ms"]["median"], r["b_ms"]["median"], r["b_over_a"]["median"],
          f"{r['b_over_a']['q1']:.3f}–{r['b_over_a']['q3']:.3f}", r["a_gflops"], r["b_gflops"], r["max_param_diff"]]
         for layout, r in rows.items()]))
    result = {"benchmark": "kernel_ab", "against": args.against,
              "against_sha": _common._git("rev-parse", args.against), "size": args.size,
              "buckets": buckets, "rounds": args.rounds, "flush": not args.no_flush, "layouts": rows,
              "environment": _common.environment("cpu")}
    print(f"wrote {_common.write_json(args.out / 'kernel_ab.json', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
