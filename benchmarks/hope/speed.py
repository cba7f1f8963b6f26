"""HOPE step cost against the parameter-matched Transformer++: aten ops and interleaved time.

    python -m benchmarks.hope.speed [--preset cpu-tiny] [--repeats 15] [--threads 1] [--variants old,default] [--compile]

Counts the aten operators one forward + backward dispatches (a TorchDispatchMode), and times
forward + backward of each model alternated A, B, C, A, B, C, … in this process after
warm-up (one thread unless --threads), reporting medians and each model's ratio to the eager
Transformer++. "old" is the HOPE design before the ablation (ablate.OLD), "default" today's;
`--variants default` times today's HOPE and the Transformer++ alone. The models share the
process's allocator, so the ratio moves with which others are in it (glibc returns freed memory
to the system and the next step faults it back in): compare ratios taken with the same variants.
--compile adds "hope[compiled]" (today's HOPE with `Hope.compile_scans()`) and
"transformer[compiled]" (the whole Transformer++ under torch.compile), so a compiled HOPE
is also compared with a compiled baseline; their compile times are printed (the op count
of a compiled model is that of its compiled graphs' calls, not comparable, so not shown).

--processes N times each model alone in a fresh process instead: N rounds, each running one
process per model (the order swapped every round), each process warming up and reporting its
median of --repeats steps. It prints every round's ratio and their median. Nothing is shared
then, so neither model's allocations change the other's page faults (in one process HOPE's
reused workspaces made the Transformer++ ~12% slower); the price is the noise between
processes, which the rounds average out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ablate import OLD
from .presets import PRESETS, build_model

VARIANTS = {"old": OLD, "default": {}}
_REPO = Path(__file__).resolve().parents[2]   # where `python -m benchmarks.hope.speed` runs


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hope.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-tiny", choices=tuple(PRESETS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="old,default",
                    help="comma-separated HOPE variants to time: old, default (default: both)")
    ap.add_argument("--compile", action="store_true", help="also time compiled HOPE scans and a compiled Transformer++")
    ap.add_argument("--processes", type=int, default=0, metavar="N",
                    help="time each model alone in its own process, N rounds alternated (see above)")
    ap.add_argument("--alone", help=argparse.SUPPRESS)  # a --processes child: time this one model, print JSON
    args = ap.parse_args(argv)
    if args.processes < 0:
        ap.error(f"--processes {args.processes}: expected a number of rounds >= 1 (0: one process)")
    torch.set_num_threads(args.threads)
    train_cfg = PRESETS[args.preset]["train"]
    B, T = train_cfg["batch"], train_cfg["seq_len"]
    torch.manual_seed(0)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected a comma-separated subset of {sorted(VARIANTS)}")
    if args.processes:
        if args.compile:
            ap.error("--processes times eager models only; drop --compile")
        return _in_processes(args, [f"hope[{k}]" for k in variants] + ["transformer"], B, T)
    if args.alone is not None:
        return _alone(args, B, T)
    models = {name: _build(name, args.preset) for name in [f"hope[{k}]" for k in variants] + ["transformer"]}
    x = torch.randint(0, 256, (B, T + 1))

    def step(m):
        _fwd_bwd(m, x)

    ops = {}
    for name, m in models.items():
        with _CountOps() as c:
            step(m)
        ops[name] = c.n
    compile_s = {}
    if args.compile:
        torch.manual_seed(0)
        compiled = {"hope[compiled]": build_model("hope", args.preset, 256)[0].compile_scans(),
                    "transformer[compiled]": torch.compile(build_model("transformer", args.preset, 256)[0])}
        for name, m in compiled.items():
            t0 = time.perf_counter()
            step(m)  # compiles
            compile_s[name] = time.perf_counter() - t0
            print(f"  {name}: first step (compilation) {compile_s[name]:.0f} s", flush=True)
        models.update(compiled)
    times = {k: [] for k in models}
    for m in models.values():
        step(m)
    for _ in range(args.repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            step(m)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tf = med["transformer"]
    print(f"{args.preset}: B={B}, T={T}, {args.threads} thread(s), median of {args.repeats} interleaved fwd+bwd")
    for name in models:
        n_ops = f"{ops[name]:>7,} aten ops" if name in ops else " " * 16
        print(f"  {name:<21} {n_ops}   {med[name] * 1e3:8.1f} ms   {med[name] / tf:5.2f}x Transformer++   "
              f"params {sum(p.numel() for p in models[name].parameters()):,}")
    return dict(ops=ops, median_s=med, ratio={k: v / tf for k, v in med.items()}, compile_s=compile_s)


def _fwd_bwd(m, x):
    _, loss = m(x[:, :-1], x[:, 1:])
    loss.backward()


def _build(name: str, preset: str):
    """The model a row of the table names: "transformer" or "hope[VARIANT]"."""
    if name == "transformer":
        return build_model("transformer", preset, 256)[0]
    return build_model("hope", preset, 256, **VARIANTS[name[len("hope["):-1]])[0]


def _alone(args, B: int, T: int) -> dict:
    """One model in this process: a warm-up step, then the median of --repeats steps, as JSON."""
    m = _build(args.alone, args.preset)
    x = torch.randint(0, 256, (B, T + 1))
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        _fwd_bwd(m, x)
        if i:                                                # the first step warms up
            times.append(time.perf_counter() - t0)
    out = dict(model=args.alone, median_s=statistics.median(times))
    print(json.dumps(out), flush=True)
    return out


def _in_processes(args, names: list[str], B: int, T: int) -> dict:
    """Each model alone in a fresh process, ``args.processes`` rounds, the order swapped each round."""
    med: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.processes):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd = [sys.executable, "-m", "benchmarks.hope.speed", "--preset", args.preset, "--repeats",
                   str(args.repeats), "--threads", str(args.threads), "--alone", name]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=_REPO)
            line = done.stdout.strip().splitlines()[-1]
            med[name].append(json.loads(line)["median_s"])
    ratios = {k: [a / b for a, b in zip(v, med["transformer"])] for k, v in med.items()}
    print(f"{args.preset}: B={B}, T={T}, {args.threads} thread(s), "
          f"each model alone in its own process, {args.processes} round(s) of median-of-{args.repeats} fwd+bwd")
    for name in names:
        per_round = ", ".join(f"{x:.2f}" for x in ratios[name])
        print(f"  {name:<21} {statistics.median(med[name]) * 1e3:8.1f} ms   "
              f"{statistics.median(ratios[name]):5.2f}x Transformer++ (median of rounds: {per_round})")
    return dict(median_s={k: statistics.median(v) for k, v in med.items()}, per_round_s=med,
                ratio={k: statistics.median(v) for k, v in ratios.items()}, per_round_ratio=ratios)


if __name__ == "__main__":
    main()
