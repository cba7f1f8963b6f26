"""The small experiment behind DMGD's defaults (``deepopt.dmgd``; MATH §5).

    python -m benchmarks.dmgd_defaults [--quick] --out DIR

On the ``lsq`` and ``mlp`` tasks of ``benchmarks.convergence``:

1. tune the outer lr once per task for DMGD with ``hidden=0`` (the other settings at their
   defaults: l2 objective, α = 1, η = 0.1 — i.e. an EMA of the gradient with β = 0.9);
2. sweep ``inner_lr`` ∈ {0.03, 0.1, 0.3, 1.0} × ``hidden`` ∈ {0, 4, 16, 32}
   × ``objective`` ∈ {"l2" (momentum 1.0), "dot" (momentum 0.9)}, ``keys="current"``, 2 seeds,
   each setting at its best outer lr among that lr × {10^−½, 1, 10^½} (``--fixed-lr``: at that
   lr only — which favours the settings whose step size matches hidden = 0's);
3. run the best setting, and the defaults, again with ``keys="previous"``.

Each setting is scored per task by its final eval loss (mean over seeds) relative to the
defaults' (``momentum=1.0, inner_lr=0.1, hidden=16, objective="l2", keys="current"``), and
overall by the geometric mean of those ratios. A setting is *clearly* better than the defaults
only if on every task its worst seed beats the defaults' best seed. Note that with a fixed
outer lr the step size is not neutral across objectives: at h = 0, "dot" with α = 0.9 is heavy
ball with step ≈ η/(1 − α) = 10η per unit gradient, "l2" with α = 1 an EMA with step ≈ 1.

Writes ``DIR/dmgd_defaults.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import _common
from benchmarks.convergence import BUDGETS, CENTRES, TASK_LIST, train_run

TASKS = ("lsq", "mlp")
DEFAULTS = {"inner_lr": 0.1, "hidden": 16, "objective": "l2", "momentum": 1.0, "keys": "current"}
GRID = {"inner_lr": (0.03, 0.1, 0.3, 1.0), "hidden": (0, 4, 16, 32), "objective": ("l2", "dot")}
MOMENTUM = {"l2": 1.0, "dot": 0.9}
OUTER_MULTIPLIERS = tuple(10 ** e for e in (-1.0, -0.5, 0.0, 0.5, 1.0))
OUTER_CENTRES = {"lsq": 3.0, "mlp": 0.3}     # the hidden = 0 tuning sweeps these × OUTER_MULTIPLIERS
SEEDS = 2
PER_SETTING_MULTIPLIERS = (10 ** -0.5, 1.0, 10 ** 0.5)   # each setting's own outer-lr sweep


def _spec(task: str, lr: float, cfg: dict, seed: int):
    import deepopt

    return deepopt.dmgd(lr, momentum=cfg["momentum"], inner_lr=cfg["inner_lr"], hidden=cfg["hidden"],
                        objective=cfg["objective"], keys=cfg["keys"], seed=seed,
                        fallback=deepopt.adamw(CENTRES[task]["adamw"], weight_decay=0.0))


def _runs(task: str, lr: float, cfg: dict, budget, size: str, seeds: int) -> dict[str, Any]:
    finals, areas = [], []
    for seed in range(seeds):
        r = train_run(TASK_LIST[task], lambda s=seed: _spec(task, lr, cfg, s), seed, budget, size)
        finals.append(r["final"])
        losses = [loss for _, loss in r["curve"]]
        areas.append(float(np.mean(losses)) if not r["diverged"] else math.inf)
    finite = all(map(math.isfinite, finals))
    return {"per_seed": finals, "mean": float(np.mean(finals)) if finite else math.inf,
            "mean_curve_loss": float(np.mean(areas)) if finite else math.inf}


def _tuned(task: str, centre: float, cfg: dict, budget, size: str, seeds: int,
           multipliers: tuple[float, ...]) -> dict[str, Any]:
    """The setting at its best outer lr among ``centre × multipliers`` (lowest mean final loss)."""
    runs = [{"lr": centre * m, **_runs(task, centre * m, cfg, budget, size, seeds)} for m in multipliers]
    return min(runs, key=lambda r: r["mean"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the convergence --quick budget (200 steps)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixed-lr", action="store_true",
                    help="every setting at hidden=0's outer lr (no per-setting lr sweep)")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    size = "tiny" if (args.tiny or _common.tiny()) else ("quick" if args.quick else "full")
    budget = BUDGETS[size]
    grid = GRID if size != "tiny" else {"inner_lr": (0.1,), "hidden": (0, 4), "objective": ("l2", "dot")}
    multipliers = OUTER_MULTIPLIERS if size != "tiny" else (1.0,)
    seeds = SEEDS if size != "tiny" else 1
    per_setting = (1.0,) if (args.fixed_lr or size == "tiny") else PER_SETTING_MULTIPLIERS
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    # 1. Outer lr per task, tuned once for hidden = 0.
    h0 = {**DEFAULTS, "hidden": 0}
    outer: dict[str, Any] = {}
    for task in TASKS:
        sweep = []
        for mult in multipliers:
            lr = OUTER_CENTRES[task] * mult
            sweep.append({"lr": lr, **_runs(task, lr, h0, budget, size, seeds)})
        best = min(sweep, key=lambda s: s["mean"])
        outer[task] = {"lr": best["lr"], "sweep": sweep,
                       "at_sweep_edge": best is sweep[0] or best is sweep[-1]}
        log(f"outer lr for {task}: {best['lr']:.3g} (hidden=0 final {best['mean']:.4g})")

    # 2. The grid, keys = current.
    configs = [{"inner_lr": e, "hidden": h, "objective": o, "momentum": MOMENTUM[o], "keys": "current"}
               for e, h, o in itertools.product(grid["inner_lr"], grid["hidden"], grid["objective"])]
    if not any(_same(c, DEFAULTS) for c in configs):
        configs.append(dict(DEFAULTS))
    results = []
    for cfg in configs:
        row = {"config": cfg, "tasks": {t: _tuned(t, outer[t]["lr"], cfg, budget, size, seeds, per_setting)
                                        for t in TASKS}}
        results.append(row)
        log(f"{_label(cfg):32s} " + "  ".join(f"{t} {row['tasks'][t]['mean']:.4g}" for t in TASKS))
    _score(results)
    ranked = sorted(results, key=lambda r: r["score"])

    # 3. keys = previous for the best setting and for the defaults.
    extra = []
    for base in (ranked[0]["config"], DEFAULTS):
        cfg = dict(base, keys="previous")
        if any(_same(cfg, r["config"]) for r in extra):
            continue
        row = {"config": cfg, "tasks": {t: _tuned(t, outer[t]["lr"], cfg, budget, size, seeds, per_setting)
                                        for t in TASKS}}
        extra.append(row)
        log(f"{_label(cfg):32s} " + "  ".join(f"{t} {row['tasks'][t]['mean']:.4g}" for t in TASKS))
    results += extra
    _score(results)
    ranked = sorted(results, key=lambda r: r["score"])

    default_row = next(r for r in results if _same(r["config"], DEFAULTS))
    best_row = ranked[0]
    clearly = [r for r in ranked if r["clearly_better_than_defaults"]]
    verdict = {
        "defaults": DEFAULTS, "defaults_rank": ranked.index(default_row) + 1, "n_settings": len(results),
        "best": best_row["config"], "best_score": best_row["score"],
        "clearly_better_than_defaults": [r["config"] for r in clearly],
        "defaults_supported": not clearly,
    }
    result = {
        "benchmark": "dmgd_defaults",
        "config": {"size": size, "tasks": list(TASKS), "steps": budget.steps, "eval_every": budget.eval_every,
                   "seeds": list(range(seeds)), "grid": grid, "momentum_by_objective": MOMENTUM,
                   "outer_lr_multipliers": list(multipliers), "outer_lr_centre": OUTER_CENTRES,
                   "per_setting_lr_multipliers": list(per_setting),
                   "fallback": {t: f"adamw({CENTRES[t]['adamw']}, wd 0) for biases" for t in TASKS},
                   "score": "geometric mean over tasks of mean final loss / defaults' mean final loss",
                   "clearly_better": "on every task the worst seed beats the defaults' best seed"},
        "environment": _common.environment("cpu"),
        "outer_lr": outer,
        "results": ranked,
        "verdict": verdict,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = _common.write_json(args.out / "dmgd_defaults.json", result)
    print(table(ranked, default_row))
    print(f"\ndefaults rank {verdict['defaults_rank']}/{len(results)}; best {_label(best_row['config'])} "
          f"(score {best_row['score']:.3f}); clearly better than the defaults: "
          f"{[_label(c) for c in verdict['clearly_better_than_defaults']] or 'none'}")
    print(f"wrote {out} ({result['wall_seconds']:.0f}s)")
    return 0


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in DEFAULTS)


def _label(cfg: dict) -> str:
    return (f"{cfg['objective']} α={cfg['momentum']} η={cfg['inner_lr']} h={cfg['hidden']} "
            f"{cfg['keys']}")


def _score(results: list[dict]) -> None:
    default_row = next(r for r in results if _same(r["config"], DEFAULTS))
    for r in results:
        ratios = [r["tasks"][t]["mean"] / default_row["tasks"][t]["mean"] for t in TASKS]
        r["ratio_to_defaults"] = dict(zip(TASKS, ratios))
        r["score"] = float(np.exp(np.mean(np.log(ratios)))) if all(map(math.isfinite, ratios)) else math.inf
        r["clearly_better_than_defaults"] = bool(not _same(r["config"], DEFAULTS) and all(
            max(r["tasks"][t]["per_seed"]) < min(default_row["tasks"][t]["per_seed"]) for t in TASKS))


def table(ranked: list[dict], default_row: dict) -> str:
    header = ["rank", "objective", "α", "η (inner_lr)", "hidden", "keys",
              *[f"{t} final (seeds)" for t in TASKS], "score (÷ defaults)", "clearly better"]
    rows = []
    for i, r in enumerate(ranked):
        c = r["config"]
        cells = []
        for t in TASKS:
            x = r["tasks"][t]
            at = f" @ lr {x['lr']:.3g}" if "lr" in x else ""
            cells.append("diverged" if not math.isfinite(x["mean"]) else
                         f"{x['mean']:.4g} ({', '.join(f'{v:.3g}' for v in x['per_seed'])}){at}")
        name = "**defaults**" if r is default_row else c["objective"]
        rows.append([i + 1, name, c["momentum"], c["inner_lr"], c["hidden"], c["keys"], *cells,
                     r["score"], "yes" if r["clearly_better_than_defaults"] else ""])
    return _common.fmt_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
