"""The experiment behind DMGD's defaults (``deepopt.dmgd``; docs/math.md §5).

    python -m benchmarks.dmgd_defaults [--quick] [--tasks lsq,mlp,lm] [--seeds 3] --out DIR
    python -m benchmarks.dmgd_defaults --examples --out DIR     # the no-argument check

DMGD's update is homogeneous of degree 1 in the gradient scale with identity values and an
identity read-out (like SGD momentum: the right lr depends on the gradient scale) and of
degree 0 with ``values="adam"`` or ``readout="newton_schulz"`` (like Adam / Muon: the lr
transfers). The read-out family therefore sets the lr scale, and every setting gets its own lr
sweep. On the ``lsq``, ``mlp`` and ``lm`` tasks of ``benchmarks.convergence`` (same models,
data, budgets, and an AdamW fallback at AdamW's centre for biases, norms and embeddings):

1. settings: read-out family ∈ {``identity`` (the memory read as is: EMA-like),
   ``adam`` (``values="adam"``), ``ns`` (``readout="newton_schulz"``: a "deep Muon")}
   × ``hidden`` ∈ {0, 16} × ``inner_lr`` ∈ {0.1, 0.3}; ``objective="l2"``, ``momentum=1``,
   ``keys="current"``;
2. each setting at its own best outer lr among its family's per-task centre ×
   {10^−1, 10^−½, 1, 10^½, 10} (``--fixed-lr``: the centre only), 3 seeds;
3. the best setting and the defaults again with ``keys="previous"``.

Score per task: final eval loss (mean over seeds) ÷ the reference's (plain EMA momentum:
identity family, ``hidden=0``, η = 0.1); overall: the geometric mean of those ratios (lsq's
ratios span decades, lm's a few percent: read the per-task columns too). Whether the MLP
matters is read from each ``hidden=16`` setting against the same setting at ``hidden=0``
(each at its own best lr): on a task it is *clearly* better (worse) if every seed of it beats
(loses to) every seed of the other; since seed i is the same task instance for every setting,
"better (worse) on every seed" is the paired version; otherwise "within noise". "Clearly
better than the defaults" uses the unpaired rule on every task.

Writes ``DIR/dmgd_defaults.json`` and prints a table. ``--examples`` instead trains
``deepopt.dmgd()``, ``muon()``, ``adamw()`` (no argument) and each DMGD read-out at its
documented lr on the README's ten-line PyTorch example and a small CNN; writes
``DIR/dmgd_examples.json``.
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

TASKS = ("lsq", "mlp", "lm")
#: deepopt.dmgd's defaults (the lr is per family: FAMILY_LR_DEFAULT).
DEFAULTS = {"family": "ns", "inner_lr": 0.1, "hidden": 16, "objective": "l2", "momentum": 1.0,
            "keys": "current"}
REFERENCE = {"family": "identity", "inner_lr": 0.1, "hidden": 0, "objective": "l2", "momentum": 1.0,
             "keys": "current"}
FAMILIES = {"identity": {"values": "identity", "readout": None}, "adam": {"values": "adam", "readout": None},
            "ns": {"values": "identity", "readout": "newton_schulz"}}
GRID = {"family": tuple(FAMILIES), "hidden": (0, 16), "inner_lr": (0.1, 0.3)}
# Per-family, per-task centre of the outer-lr sweep (a pilot put every best lr inside
# centre × 10^±1): identity reads the EMA of G (step ≈ lr per unit gradient), adam an EMA of
# G/√v (Adam's scale), ns an orthogonal matrix (Muon's scale, s(W) = √max(1, m/n)).
LR_CENTRES = {
    "identity": {"lsq": 1.0, "mlp": 0.3, "lm": 0.1},
    "adam": {"lsq": 0.03, "mlp": 3e-3, "lm": 3e-3},
    "ns": {"lsq": 0.03, "mlp": 0.01, "lm": 0.03},
}
MULTIPLIERS = tuple(10 ** e for e in (-1.0, -0.5, 0.0, 0.5, 1.0))
SEEDS = 3


def _spec(task: str, lr: float, cfg: dict, seed: int):
    import deepopt

    return deepopt.dmgd(lr, momentum=cfg["momentum"], inner_lr=cfg["inner_lr"], hidden=cfg["hidden"],
                        objective=cfg["objective"], keys=cfg["keys"], seed=seed,
                        routing=deepopt.Routing(fallback_patterns=TASK_LIST[task].fallback_patterns),
                        fallback=deepopt.adamw(CENTRES[task]["adamw"], weight_decay=0.0),
                        **FAMILIES[cfg["family"]])


def _runs(task: str, lr: float, cfg: dict, budget, size: str, seeds: int) -> dict[str, Any]:
    finals, areas = [], []
    for seed in range(seeds):
        r = train_run(TASK_LIST[task], lambda s=seed: _spec(task, lr, cfg, s), seed, budget, size)
        finals.append(r["final"])
        losses = [loss for _, loss in r["curve"]]
        areas.append(float(np.mean(losses)) if not r["diverged"] else math.inf)
    finite = all(map(math.isfinite, finals))
    return {"per_seed": finals, "mean": float(np.mean(finals)) if finite else math.inf,
            "std": float(np.std(finals)) if finite else math.inf,
            "mean_curve_loss": float(np.mean(areas)) if finite else math.inf}


def _tuned(task: str, cfg: dict, budget, size: str, seeds: int,
           multipliers: tuple[float, ...]) -> dict[str, Any]:
    """The setting at its best outer lr among its family's centre × ``multipliers``."""
    centre = LR_CENTRES[cfg["family"]][task]
    runs = [{"lr": centre * m, **_runs(task, centre * m, cfg, budget, size, seeds)} for m in multipliers]
    i = int(np.argmin([r["mean"] for r in runs]))
    best = dict(runs[i])
    best["at_sweep_edge"] = len(runs) > 1 and i in (0, len(runs) - 1)
    best["sweep"] = [{"lr": r["lr"], "mean": r["mean"], "per_seed": r["per_seed"]} for r in runs]
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the convergence --quick step budget")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from " + ",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--fixed-lr", action="store_true",
                    help="every setting at its family's lr centre (no per-setting lr sweep)")
    ap.add_argument("--examples", action="store_true",
                    help="instead: every preset with no argument on the README example and a small CNN")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.examples:
        return examples(args.out, args.seeds, args.threads)
    size = "tiny" if (args.tiny or _common.tiny()) else ("quick" if args.quick else "full")
    budget = BUDGETS[size]
    tasks = tuple(t for t in TASKS if t in args.tasks.split(","))
    if size == "tiny":
        tasks = tuple(t for t in tasks if t in ("lsq", "mlp"))
    grid = GRID if size != "tiny" else {"family": ("identity", "ns"), "hidden": (0, 4), "inner_lr": (0.1,)}
    seeds = args.seeds if size != "tiny" else 1
    multipliers = (1.0,) if (args.fixed_lr or size == "tiny") else MULTIPLIERS
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    def run(cfg: dict) -> dict:
        row = {"config": cfg, "tasks": {t: _tuned(t, cfg, budget, size, seeds, multipliers) for t in tasks}}
        log(f"{_label(cfg):34s} " + "  ".join(
            f"{t} {row['tasks'][t]['mean']:.4g} @ {row['tasks'][t]['lr']:.3g}" for t in tasks))
        return row

    # 1–2. The grid, keys = current, each setting at its own best lr.
    configs = [{"family": f, "inner_lr": e, "hidden": h, "objective": "l2", "momentum": 1.0, "keys": "current"}
               for f, h, e in itertools.product(grid["family"], grid["hidden"], grid["inner_lr"])]
    for must in (REFERENCE, DEFAULTS):
        if not any(_same(c, must) for c in configs):
            configs.append(dict(must))
    results = [run(cfg) for cfg in configs]
    _score(results, tasks)
    ranked = sorted(results, key=lambda r: r["score"])

    # 3. keys = previous for the best setting with an MLP (keys are unused at hidden = 0) and
    #    for the defaults.
    extra: list[dict] = []
    for base in (next(r["config"] for r in ranked if r["config"]["hidden"] > 0), DEFAULTS):
        cfg = dict(base, keys="previous")
        if not any(_same(cfg, r["config"]) for r in extra):
            extra.append(run(cfg))
    results += extra
    _score(results, tasks)
    ranked = sorted(results, key=lambda r: r["score"])

    default_row = next(r for r in results if _same(r["config"], DEFAULTS))
    best_row = ranked[0]
    clearly = [r for r in ranked if r["clearly_better_than_defaults"]]
    verdict = {
        "defaults": DEFAULTS, "defaults_rank": ranked.index(default_row) + 1, "n_settings": len(results),
        "best": best_row["config"], "best_score": best_row["score"],
        "clearly_better_than_defaults": [r["config"] for r in clearly],
        "defaults_supported": not clearly,
        "mlp_vs_hidden0": [{"config": r["config"], **r["vs_hidden0"]} for r in results if "vs_hidden0" in r],
    }
    result = {
        "benchmark": "dmgd_defaults",
        "config": {"size": size, "tasks": list(tasks), "steps": budget.steps, "seq_steps": budget.seq_steps,
                   "eval_every": budget.eval_every, "seeds": list(range(seeds)), "grid": grid,
                   "families": FAMILIES, "lr_centres": LR_CENTRES, "lr_multipliers": list(multipliers),
                   "reference": REFERENCE, "torch_threads": args.threads,
                   "fallback": {t: f"adamw({CENTRES[t]['adamw']}, wd 0)" for t in tasks},
                   "score": "geometric mean over tasks of mean final loss / reference's mean final loss",
                   "clearly": "on a task, every seed of one beats every seed of the other"},
        "environment": _common.environment("cpu"),
        "outer_lr": {t: {"lr": default_row["tasks"][t]["lr"], "of": "defaults"} for t in tasks},
        "results": ranked,
        "verdict": verdict,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = _common.write_json(args.out / "dmgd_defaults.json", result)
    print(table(ranked, default_row, tasks))
    print("\nhidden>0 vs the same setting at hidden=0 (final-loss ratio; clearly = seeds separate):")
    for r in results:
        if "vs_hidden0" in r:
            print(f"  {_label(r['config']):34s} " + "  ".join(
                f"{t} {v['ratio']:.3f}{' ' + v['verdict'] if v['verdict'] != 'within noise' else ''}"
                for t, v in r["vs_hidden0"].items()))
    print(f"\ndefaults rank {verdict['defaults_rank']}/{len(results)}; best {_label(best_row['config'])} "
          f"(score {best_row['score']:.3f}); clearly better than the defaults: "
          f"{[_label(c) for c in verdict['clearly_better_than_defaults']] or 'none'}")
    print(f"wrote {out} ({result['wall_seconds']:.0f}s)")
    return 0


def _same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in DEFAULTS)


def _label(cfg: dict) -> str:
    return f"{cfg['family']} η={cfg['inner_lr']} h={cfg['hidden']} {cfg['keys']}"


def _separation(a: list[float], b: list[float]) -> str:
    """Seed i is the same task instance (data, teacher, initialisation) for every setting, so
    besides the unpaired test (every seed of a beats every seed of b: "clearly") we report the
    paired one (a beats b on every seed: "better on every seed"); else "within noise"."""
    if max(a) < min(b):
        return "clearly better"
    if min(a) > max(b):
        return "clearly worse"
    if all(x < y for x, y in zip(a, b)):
        return "better on every seed"
    if all(x > y for x, y in zip(a, b)):
        return "worse on every seed"
    return "within noise"


def _score(results: list[dict], tasks: tuple[str, ...]) -> None:
    ref = next(r for r in results if _same(r["config"], REFERENCE))
    default_row = next(r for r in results if _same(r["config"], DEFAULTS))
    for r in results:
        ratios = [r["tasks"][t]["mean"] / ref["tasks"][t]["mean"] for t in tasks]
        r["ratio_to_reference"] = dict(zip(tasks, ratios))
        r["score"] = float(np.exp(np.mean(np.log(ratios)))) if all(map(math.isfinite, ratios)) else math.inf
        r["clearly_better_than_defaults"] = bool(not _same(r["config"], DEFAULTS) and all(
            max(r["tasks"][t]["per_seed"]) < min(default_row["tasks"][t]["per_seed"]) for t in tasks))
        if r["config"]["hidden"] > 0:
            h0 = next((x for x in results if _same(x["config"], {**r["config"], "hidden": 0})), None)
            if h0 is not None:
                r["vs_hidden0"] = {t: {"ratio": r["tasks"][t]["mean"] / h0["tasks"][t]["mean"],
                                       "paired_ratios": [x / y for x, y in zip(r["tasks"][t]["per_seed"],
                                                                               h0["tasks"][t]["per_seed"])],
                                       "verdict": _separation(r["tasks"][t]["per_seed"], h0["tasks"][t]["per_seed"])}
                                   for t in tasks}


def table(ranked: list[dict], default_row: dict, tasks: tuple[str, ...] = TASKS) -> str:
    header = ["rank", "family", "η (inner_lr)", "hidden", "keys",
              *[f"{t} final mean ± std @ best lr" for t in tasks], "score (÷ reference)", "clearly better"]
    rows = []
    for i, r in enumerate(ranked):
        c = r["config"]
        cells = []
        for t in tasks:
            x = r["tasks"][t]
            edge = " (edge)" if x.get("at_sweep_edge") else ""
            cells.append("diverged" if not math.isfinite(x["mean"]) else
                         f"{x['mean']:.4g} ± {x['std']:.2g} @ {x['lr']:.3g}{edge}")
        name = f"**{c['family']}** (defaults)" if r is default_row else c["family"]
        rows.append([i + 1, name, c["inner_lr"], c["hidden"], c["keys"], *cells,
                     r["score"], "yes" if r["clearly_better_than_defaults"] else ""])
    return _common.fmt_table(header, rows)


# --------------------------------------------------------------------------------------------
# --examples: each preset with no argument on the README's examples
# --------------------------------------------------------------------------------------------

#: What ``--examples`` trains: every preset with no argument (``deepopt.dmgd()`` must do about
#: as well as the others do with theirs), plus each DMGD read-out at its documented default lr.
EXAMPLE_SPECS = {
    "dmgd()": lambda d: d.dmgd(),
    "muon()": lambda d: d.muon(),
    "adamw()": lambda d: d.adamw(),
    "sgd(1e-2, momentum=0.9)": lambda d: d.sgd(1e-2, momentum=0.9),
    "dmgd(0.02, readout='newton_schulz')": lambda d: d.dmgd(0.02, readout="newton_schulz"),
    "dmgd(1e-3, values='adam', readout=None)": lambda d: d.dmgd(1e-3, values="adam", readout=None),
    "dmgd(0.3, readout=None)": lambda d: d.dmgd(0.3, readout=None),
    "dmgd(0.1, readout=None)": lambda d: d.dmgd(0.1, readout=None),
    "muon(0.02)": lambda d: d.muon(0.02),
}


def _readme_torch(spec, seed: int) -> dict[str, float]:
    """The README's "PyTorch in ten lines" (MSE on random targets, 100 steps, cosine schedule),
    with the spec as given (default routing: every matrix, the head included, to the rule)."""
    import torch_backend

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    opt = torch_backend.compile(spec, model.named_parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = float(torch.nn.functional.mse_loss(model(x), y))
    return {"initial": first, "final": final}


def _cnn(spec, seed: int, steps: int = 200) -> dict[str, float]:
    """A small CNN (conv 1→8→16, 3×3, ReLU, max-pool, linear head) on a generated 10-class
    16×16 image set: per class a smooth random template, each image shifted by up to 2 pixels
    plus unit noise; batch 64, cross-entropy on 1024 held-out images."""
    import torch_backend

    g = torch.Generator().manual_seed(5000 + seed)
    templates = torch.nn.functional.avg_pool2d(torch.randn(10, 1, 20, 20, generator=g), 5, 1, 2) * 3

    def draw(n: int):
        labels = torch.randint(0, 10, (n,), generator=g)
        ox, oy = torch.randint(0, 5, (2, n), generator=g)
        imgs = torch.stack([templates[c, :, i:i + 16, j:j + 16] for c, i, j in zip(labels, ox, oy)])
        return imgs + torch.randn(imgs.shape, generator=g), labels

    xv, yv = draw(1024)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10))
    opt = torch_backend.compile(spec, model.named_parameters())
    out: dict[str, float] = {}
    with torch.no_grad():
        out["initial"] = float(torch.nn.functional.cross_entropy(model(xv), yv))
    for step in range(1, steps + 1):
        xb, yb = draw(64)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if step in (60, steps):
            with torch.no_grad():
                out[f"step_{step}"] = float(torch.nn.functional.cross_entropy(model(xv), yv))
    out["final"] = out[f"step_{steps}"]
    return out


def examples(out_dir: Path, seeds: int, threads: int) -> int:
    """``--examples``: each of EXAMPLE_SPECS on the README's ten-line example and on the CNN."""
    import deepopt

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rows = {}
    for name, make in EXAMPLE_SPECS.items():
        spec = make(deepopt)
        readme = [_readme_torch(spec, s) for s in range(seeds)]
        cnn = [_cnn(spec, s) for s in range(seeds)]
        rows[name] = {"readme_mse": {"per_seed": [r["final"] for r in readme],
                                     "mean": float(np.mean([r["final"] for r in readme])),
                                     "initial": float(np.mean([r["initial"] for r in readme]))},
                      "cnn_ce": {"per_seed": [c["final"] for c in cnn],
                                 "mean": float(np.mean([c["final"] for c in cnn])),
                                 "at_step_60": float(np.mean([c["step_60"] for c in cnn])),
                                 "initial": float(np.mean([c["initial"] for c in cnn]))},
                      "lr": dict(spec.hparams)["lr"]}
        print(f"[{time.perf_counter() - t0:5.0f}s] {name}", flush=True)
    result = {"benchmark": "dmgd_examples",
              "config": {"seeds": list(range(seeds)), "torch_threads": threads,
                         "readme": "README 'PyTorch in ten lines': MSE, 100 steps, cosine, default routing",
                         "cnn": "conv 1-8-16 + linear on generated 10-class 16x16 images, batch 64, 200 steps"},
              "environment": _common.environment("cpu"), "results": rows,
              "wall_seconds": time.perf_counter() - t0}
    out = _common.write_json(out_dir / "dmgd_examples.json", result)
    header = ["spec", "lr", "README example MSE (seeds)", "CNN CE step 60", "CNN CE step 200 (seeds)"]
    print(_common.fmt_table(header, [
        [n, r["lr"], f"{r['readme_mse']['mean']:.3f} ({', '.join(f'{v:.3f}' for v in r['readme_mse']['per_seed'])})",
         f"{r['cnn_ce']['at_step_60']:.3f}",
         f"{r['cnn_ce']['mean']:.3f} ({', '.join(f'{v:.3f}' for v in r['cnn_ce']['per_seed'])})"]
        for n, r in rows.items()]))
    print(f"wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
