"""The default fallback lr ratio: Muon on matrices, AdamW at ``ratio × lr`` on the rest.

Sweeps the ratio on two models of ``benchmarks/convergence.py`` — the MLP classifier (head and
biases on the fallback) and the byte-level Transformer++ (embeddings, norms and biases on the
fallback) — at Muon's swept-best lr and 3× that, several seeds each, and prints the mean final
eval loss per ratio, then each ratio's mean rank and its total excess loss over the best ratio
of each setting. ``deepopt._presets.DEFAULT_FALLBACK_LR_RATIO`` is the ratio with the best
mean rank over both models and both lrs, ties broken by the smaller total excess loss (3 seeds,
2026-11-25: 0.1 and 0.3 tied at rank 2.75; excess 0.36 vs 0.29, so 0.3).

    python -m benchmarks.fallback_ratio [--seeds 3] [--ratios 0.01,0.03,0.1,0.3,1,3]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from benchmarks import convergence
from benchmarks._threads import limit_threads

TASKS = {"mlp": (r"^4\.",), "lm": (r"^wte\.",)}     # fallback patterns: the head / the embeddings


def run(seeds: int, ratios: list[float]) -> dict:
    import deepopt

    budget = convergence.BUDGETS["quick"]
    results: dict = {}
    for task_name, patterns in TASKS.items():
        task = convergence.TASK_LIST[task_name]
        centre = convergence.CENTRES[task_name]["muon"]
        for lr in (centre, 3 * centre):
            for ratio in ratios:
                def spec(lr=lr, ratio=ratio, patterns=patterns):
                    return deepopt.muon(lr, weight_decay=0.0, routing=deepopt.Routing(
                        fallback_patterns=patterns)).with_fallback(
                        deepopt.adamw(lr * ratio, weight_decay=0.0), lr_ratio=ratio)
                finals = [convergence.train_run(task, spec, seed, budget, "quick")["final"]
                          for seed in range(seeds)]
                key = f"{task_name} lr={lr:g}"
                results.setdefault(key, {})[ratio] = finals
                mean = float(np.mean(finals)) if all(map(math.isfinite, finals)) else math.inf
                print(f"{key:16s} ratio={ratio:<6g} final={mean:.4f} ± {np.std(finals):.4f}", flush=True)
    return results


def summary(results: dict, ratios: list[float]) -> list[tuple[float, float, float]]:
    """``(ratio, mean rank, total excess loss)`` over the (task, lr) settings, best first."""
    ranks: dict[float, list[int]] = {r: [] for r in ratios}
    excess = dict.fromkeys(ratios, 0.0)
    for by_ratio in results.values():
        means = [np.mean(by_ratio[r]) if all(map(math.isfinite, by_ratio[r])) else math.inf for r in ratios]
        for r, rank, m in zip(ratios, np.argsort(np.argsort(means)) + 1, means):
            ranks[r].append(int(rank))
            excess[r] += float(m - min(means))
    return sorted(((r, float(np.mean(ranks[r])), excess[r]) for r in ratios), key=lambda x: (x[1], x[2]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ratios", default="0.01,0.03,0.1,0.3,1,3")
    parser.add_argument("--json", default=None, help="write the raw finals here")
    args = parser.parse_args(argv)
    limit_threads(1)
    ratios = [float(r) for r in args.ratios.split(",")]
    results = run(args.seeds, ratios)
    print("ratio: mean rank (1 = best), total excess loss —",
          ", ".join(f"{r:g}: {k:.2f}, {e:.3f}" for r, k, e in summary(results, ratios)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {str(r): v for r, v in d.items()} for k, d in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
