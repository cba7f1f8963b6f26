"""Convergence: the same fixed tasks, budgets and lr sweep for every deepopt optimizer.

    python -m benchmarks.convergence [--quick] [--only sgd,muon] [--tasks lsq,mlp] --out DIR

Tasks (all data generated in-process or read from the Python standard library; nothing is
downloaded; docs/benchmarks.md):

- ``lsq``: least squares ``½‖X Wᵀ − Y‖²`` for one 32×64 matrix W, an ill-conditioned design
  (singular values from 1 to 0.1) and a little label noise; minibatches of 64.
- ``mlp``: a 32→128→128→10 MLP (GELU, biases) on a generated teacher–student classification
  set (labels from a random 2-layer teacher); cross-entropy on a fixed held-out set.
- ``lm``: a tiny byte-level Transformer++ (``benchmarks/hope/transformer.py``) on the stdlib
  corpus (``benchmarks/hope/data.py``; its SHA-256 is recorded); loss on fixed val windows.
- ``mqar``: the same model on multi-query associative recall (``benchmarks/hope/data.py``).

Optimizers: ``sgd`` (momentum 0.9), ``adamw``, ``delta_momentum``, ``muon``, ``dmgd`` (its
defaults), ``m3``, and DMGD variants pinned next to the classic each generalises (hidden 16,
l2, α = 1, η = 0.1; ``DMGD_READOUTS``): ``dmgd_identity`` (identity values and read-out: an
EMA-like memory plus the MLP, degree 1 in the gradient like ``sgd``), ``dmgd_adam``
(``values="adam"``, next to ``adamw``), ``dmgd_ns`` (``readout="newton_schulz"``, the "deep
Muon", next to ``muon``; today equal to ``dmgd``'s defaults), ``dmgd_ns_h0`` (it without the
MLP) and ``dmgd_ns_eta03`` / ``dmgd_ns_h0_eta03`` (both at η = 0.3); all through ``torch_backend``, weight decay 0. Each gets the same sweep of lr multipliers
around its own per-task centre (``CENTRES``); matrix rules send embeddings, biases and norms to
an AdamW fallback whose lr is AdamW's centre for the task times the same multiplier. For the best lr (lowest mean
final loss over seeds) we report the final loss (mean, std, min, max over seeds) and the
steps to reach each task's stated target. Writes ``DIR/convergence.json`` and
``DIR/convergence.png`` (best mean curve per optimizer and task).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import _common

OPTIMIZERS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3", "dmgd_identity", "dmgd_adam",
              "dmgd_ns", "dmgd_ns_h0", "dmgd_ns_eta03", "dmgd_ns_h0_eta03")
TASKS = ("lsq", "mlp", "lm", "mqar")

# Centre of each optimizer's lr sweep, per task: set once from a pilot sweep (the quick sweep
# one half-decade around a first guess) so that each optimizer's best lr lies inside its own
# sweep; the JSON flags any best lr that still lands on an edge. sgd and delta_momentum sum
# gradients (heavy ball: step ≈ lr/(1−0.9) per unit gradient); dmgd_identity's memory is an
# EMA (step ≈ lr); dmgd_adam reads an EMA of G/√v (Adam's scale); muon, m3 and dmgd_ns take
# orthogonalised steps; the literal m3 divides by √(Σ β₂G²); dmgd is whichever its defaults are.
CENTRES = {
    "lsq": {"sgd": 0.3, "adamw": 0.03, "delta_momentum": 0.3, "muon": 0.03, "dmgd": 0.03, "m3": 0.01,
            "dmgd_identity": 1.0, "dmgd_adam": 0.03, "dmgd_ns": 0.03, "dmgd_ns_h0": 0.03,
            "dmgd_ns_eta03": 0.03, "dmgd_ns_h0_eta03": 0.03},
    "mlp": {"sgd": 0.03, "adamw": 1e-3, "delta_momentum": 0.03, "muon": 0.01, "dmgd": 0.01, "m3": 1e-5,
            "dmgd_identity": 0.3, "dmgd_adam": 0.003, "dmgd_ns": 0.01, "dmgd_ns_h0": 0.01,
            "dmgd_ns_eta03": 0.01, "dmgd_ns_h0_eta03": 0.01},
    "lm": {"sgd": 0.1, "adamw": 3e-3, "delta_momentum": 0.1, "muon": 0.03, "dmgd": 0.03, "m3": 3e-3,
            "dmgd_identity": 0.3, "dmgd_adam": 0.003, "dmgd_ns": 0.03, "dmgd_ns_h0": 0.03,
            "dmgd_ns_eta03": 0.03, "dmgd_ns_h0_eta03": 0.03},
    "mqar": {"sgd": 0.3, "adamw": 0.01, "delta_momentum": 0.3, "muon": 0.03, "dmgd": 0.03, "m3": 3e-3,
            "dmgd_identity": 0.3, "dmgd_adam": 0.01, "dmgd_ns": 0.03, "dmgd_ns_h0": 0.03,
            "dmgd_ns_eta03": 0.03, "dmgd_ns_h0_eta03": 0.03},
}


@dataclass
class Budget:
    steps: int            # lsq, mlp
    seq_steps: int        # lm, mqar (a step costs ~20× more)
    eval_every: int
    seeds: int
    multipliers: tuple[float, ...]


BUDGETS = {
    "full": Budget(steps=600, seq_steps=500, eval_every=20, seeds=3,
                   multipliers=tuple(10 ** e for e in (-1.0, -0.5, 0.0, 0.5, 1.0))),
    "quick": Budget(steps=200, seq_steps=150, eval_every=10, seeds=2,
                    multipliers=(10 ** -0.5, 1.0, 10 ** 0.5)),
    "tiny": Budget(steps=8, seq_steps=4, eval_every=4, seeds=1, multipliers=(1.0,)),
}

# Sequence models: (width, batch, context) per size.
SEQ_SHAPE = {"full": (64, 16, 64), "quick": (32, 16, 32), "tiny": (16, 4, 24)}


# --------------------------------------------------------------------------------------------
# Tasks: each builds (model, train_loss(step) -> loss, eval_loss() -> float) for a seed
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    description: str
    build: Callable[[int, str], tuple[nn.Module, Callable[[], torch.Tensor], Callable[[], float]]]
    target: dict          # {"kind": "fraction_of_initial"|"absolute", "value": x}
    fallback_patterns: tuple[str, ...] = ()
    log_y: bool = False
    seq: bool = False     # a sequence model: budget.seq_steps


def _lsq(seed: int, size: str):
    m, n, N, batch = (32, 64, 1024, 64) if size != "tiny" else (8, 16, 128, 32)
    g = torch.Generator().manual_seed(1000 + seed)
    spectrum = torch.logspace(0, -1, n)                               # condition number 10
    x = torch.randn(N, n, generator=g) * spectrum
    w_star = torch.randn(m, n, generator=g) / math.sqrt(n) * 3
    y = x @ w_star.T + 0.01 * torch.randn(N, m, generator=g)
    model = nn.Linear(n, m, bias=False)
    nn.init.zeros_(model.weight)

    def loss_on(xb, yb):
        return 0.5 * (model(xb) - yb).pow(2).sum(-1).mean()

    def train_loss():
        idx = torch.randint(0, N, (batch,), generator=g)
        return loss_on(x[idx], y[idx])

    @torch.no_grad()
    def eval_loss():
        return float(loss_on(x, y))
    return model, train_loss, eval_loss


def _mlp(seed: int, size: str):
    d_in, width, classes, N, batch = (32, 128, 10, 8192, 128) if size != "tiny" else (8, 16, 4, 512, 32)
    g = torch.Generator().manual_seed(2000 + seed)
    teacher = [torch.randn(d_in, 64, generator=g) / math.sqrt(d_in),
               torch.randn(64, classes, generator=g) / math.sqrt(64) * 4]
    x = torch.randn(N + 2048, d_in, generator=g)
    labels = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(-1)
    xt, yt, xv, yv = x[:N], labels[:N], x[N:], labels[N:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                          nn.Linear(width, classes))

    def train_loss():
        idx = torch.randint(0, N, (batch,), generator=g)
        return F.cross_entropy(model(xt[idx]), yt[idx])

    @torch.no_grad()
    def eval_loss():
        return float(F.cross_entropy(model(xv), yv))
    return model, train_loss, eval_loss


_CORPUS: dict[str, Any] = {}


def _stdlib_corpus():
    if "stdlib" not in _CORPUS:
        from benchmarks.hope.data import build_stdlib_corpus

        _CORPUS["stdlib"] = build_stdlib_corpus()
    return _CORPUS["stdlib"]


def _tiny_transformer(vocab: int, size: str):
    from benchmarks.hope.transformer import Transformer, TransformerConfig

    d = SEQ_SHAPE[size][0]
    return Transformer(TransformerConfig(vocab_size=vocab, d_model=d, n_layers=2, n_heads=2,
                                         ffn_hidden=2 * d))


def _lm(seed: int, size: str):
    from benchmarks.hope.data import even_windows, random_windows

    corpus = _stdlib_corpus()
    _, batch, seq = SEQ_SHAPE[size]
    torch.manual_seed(seed)
    model = _tiny_transformer(256, size)
    gen = torch.Generator().manual_seed(3000 + seed)
    val = even_windows(corpus.val, batch, seq, 4 if size != "tiny" else 1)

    def train_loss():
        xb, yb = random_windows(corpus.train, batch, seq, gen)
        return model(xb, yb)[1]

    @torch.no_grad()
    def eval_loss():
        return float(np.mean([float(model(xb, yb)[1]) for xb, yb in val]))
    return model, train_loss, eval_loss


def _mqar(seed: int, size: str):
    from benchmarks.hope.data import mqar_batch

    vocab, pairs = 64, 8
    _, batch, seq = SEQ_SHAPE[size]
    batch *= 2
    torch.manual_seed(seed)
    model = _tiny_transformer(vocab, size)
    gen = torch.Generator().manual_seed(4000 + seed)
    val_gen = torch.Generator().manual_seed(14_000 + seed)
    val = [mqar_batch(batch, seq, vocab, pairs, val_gen) for _ in range(4 if size != "tiny" else 1)]

    def train_loss():
        return model(*mqar_batch(batch, seq, vocab, pairs, gen))[1]

    @torch.no_grad()
    def eval_loss():
        return float(np.mean([float(model(xb, yb)[1]) for xb, yb in val]))
    return model, train_loss, eval_loss


TASK_LIST = {
    "lsq": Task("lsq", "least squares, W 32x64, condition 10, batch 64", _lsq,
                {"kind": "fraction_of_initial", "value": 0.05}, log_y=True),
    "mlp": Task("mlp", "MLP 32-128-128-10 on teacher-student classification, batch 128", _mlp,
                {"kind": "absolute", "value": 0.8}),
    "lm": Task("lm", "byte-level Transformer++ L=2 on the stdlib corpus", _lm,
               {"kind": "absolute", "value": 3.0}, fallback_patterns=(r"^wte\.",), seq=True),
    "mqar": Task("mqar", "Transformer++ L=2 on MQAR (vocab 64, 8 pairs)", _mqar,
                 {"kind": "absolute", "value": 3.3}, fallback_patterns=(r"^wte\.",), seq=True),
}


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def build_spec(name: str, lr: float, fallback_lr: float, patterns: tuple[str, ...], seed: int):
    import deepopt

    routing = deepopt.Routing(fallback_patterns=patterns)
    fallback = deepopt.adamw(fallback_lr, weight_decay=0.0)
    if name == "sgd":
        return deepopt.sgd(lr, momentum=0.9)
    if name == "adamw":
        return deepopt.adamw(lr, weight_decay=0.0)
    if name == "delta_momentum":   # the preset's own routing (element-wise read-out: every parameter)
        return deepopt.delta_momentum(lr, momentum=0.9)
    if name == "muon":
        return deepopt.muon(lr, weight_decay=0.0, routing=routing, fallback=fallback)
    if name == "dmgd":
        return deepopt.dmgd(lr, seed=seed, routing=routing, fallback=fallback)
    if name == "m3":
        return deepopt.m3(lr, routing=routing, fallback=fallback)
    if name in DMGD_READOUTS:
        return deepopt.dmgd(lr, seed=seed, routing=routing, fallback=fallback, **DMGD_READOUTS[name])
    raise ValueError(name)


#: DMGD variants next to the classic each generalises, pinned (not following the defaults):
#: hidden 16, l2 objective, α = 1, η = 0.1, current keys; dmgd_ns_h0 is dmgd_ns without the MLP;
#: the _eta03 pair is the same at η = 0.3 (a shorter memory: S's EMA factor 0.7 instead of 0.9).
_DMGD_PINNED = {"hidden": 16, "inner_lr": 0.1, "objective": "l2", "momentum": 1.0, "keys": "current"}
DMGD_READOUTS = {"dmgd_identity": {**_DMGD_PINNED, "values": "identity", "readout": None},
                 "dmgd_adam": {**_DMGD_PINNED, "values": "adam", "readout": None},
                 "dmgd_ns": {**_DMGD_PINNED, "values": "identity", "readout": "newton_schulz"},
                 "dmgd_ns_h0": {**_DMGD_PINNED, "hidden": 0, "values": "identity", "readout": "newton_schulz"},
                 "dmgd_ns_eta03": {**_DMGD_PINNED, "inner_lr": 0.3, "values": "identity", "readout": "newton_schulz"},
                 "dmgd_ns_h0_eta03": {**_DMGD_PINNED, "hidden": 0, "inner_lr": 0.3, "values": "identity",
                                      "readout": "newton_schulz"}}


def train_run(task: Task, spec_builder: Callable[[], Any], seed: int, budget: Budget, size: str,
              initial: float | None = None) -> dict[str, Any]:
    """One run: eval curve at 0, eval_every, …, steps; stops early once diverged."""
    import torch_backend

    model, train_loss, eval_loss = task.build(seed, size)
    opt = torch_backend.compile(spec_builder(), list(model.named_parameters()))
    curve = [(0, eval_loss())]
    limit = 10 * curve[0][1] + 10                                     # divergence threshold
    diverged = False
    steps = budget.seq_steps if task.seq else budget.steps
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = train_loss()
        value = float(loss.detach())
        if not math.isfinite(value) or value > limit:
            diverged = True
            break
        loss.backward()
        opt.step()
        if step % budget.eval_every == 0 or step == steps:
            ev = eval_loss()
            curve.append((step, ev))
            if not math.isfinite(ev) or ev > limit:
                diverged = True
                break
    final = curve[-1][1] if not diverged else math.inf
    return {"curve": curve, "final": final, "diverged": diverged, "initial": curve[0][1]}


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    for step, loss in curve:
        if math.isfinite(loss) and loss <= threshold:
            return step
    return None


def run_task(task: Task, optimizers: list[str], budget: Budget, size: str, log) -> dict[str, Any]:
    out: dict[str, Any] = {"description": task.description, "target": dict(task.target),
                           "optimizers": {}}
    for name in optimizers:
        sweep = []
        for mult in budget.multipliers:
            lr, fb_lr = CENTRES[task.name][name] * mult, CENTRES[task.name]["adamw"] * mult
            runs = []
            for seed in range(budget.seeds):
                runs.append(train_run(task, lambda n=name, lr=lr, fb=fb_lr, s=seed: build_spec(
                    n, lr, fb, task.fallback_patterns, s), seed, budget, size))
            finals = [r["final"] for r in runs]
            sweep.append({"lr": lr, "fallback_lr": fb_lr if name not in ("sgd", "adamw") else None,
                          "multiplier": mult, "runs": runs,
                          "mean_final": float(np.mean(finals)) if all(map(math.isfinite, finals)) else math.inf})
        best_i = int(np.argmin([s["mean_final"] for s in sweep]))
        best = sweep[best_i]
        finals = np.array([r["final"] for r in best["runs"]])
        thresholds = [_threshold(task.target, r["initial"]) for r in best["runs"]]
        reached = [steps_to(r["curve"], th) for r, th in zip(best["runs"], thresholds)]
        steps = [r for r in reached if r is not None]
        res = {
            "best_lr": best["lr"], "best_multiplier": best["multiplier"],
            "best_lr_at_sweep_edge": best_i in (0, len(sweep) - 1),
            "final_loss": {"mean": float(finals.mean()),
                           "std": float(finals.std()) if np.isfinite(finals).all() else math.inf,
                           "min": float(finals.min()), "max": float(finals.max()),
                           "per_seed": finals.tolist()},
            "steps_to_target": {"per_seed": reached, "n_reached": len(steps),
                                "median": float(np.median(steps)) if steps else None},
            "initial_loss": float(np.mean([r["initial"] for r in best["runs"]])),
            "sweep": [{"lr": s["lr"], "fallback_lr": s["fallback_lr"], "mean_final": s["mean_final"],
                       "per_seed": [r["final"] for r in s["runs"]],
                       "diverged": [r["diverged"] for r in s["runs"]]} for s in sweep],
            "best_curves": [r["curve"] for r in best["runs"]],
        }
        if not math.isfinite(best["mean_final"]):
            res["note"] = "every lr in the sweep diverged"
        out["optimizers"][name] = res
        log(f"  {task.name:5s} {name:15s} best lr {best['lr']:.3g}  final "
            f"{res['final_loss']['mean']:.4g} ± {res['final_loss']['std']:.2g}  "
            f"steps-to-target {res['steps_to_target']['median']} ({len(steps)}/{len(reached)})")
    return out


def _threshold(target: dict, initial: float) -> float:
    return target["value"] * initial if target["kind"] == "fraction_of_initial" else target["value"]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    cols = 2 if len(tasks) > 1 else 1
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        r = results[task]
        for name, res in r["optimizers"].items():
            curves = [c for c in res["best_curves"] if c]
            n = min(len(c) for c in curves)
            steps = [p[0] for p in curves[0][:n]]
            mean = np.mean([[p[1] for p in c[:n]] for c in curves], axis=0)
            ax.plot(steps, mean, label=f"{name} (lr {res['best_lr']:.2g})")
        t = r["target"]
        if t["kind"] == "absolute":
            ax.axhline(t["value"], color="grey", ls=":", lw=1, label="target")
        if TASK_LIST[task].log_y:
            ax.set_yscale("log")
        ax.set_title(f"{task}: {r['description']}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (mean over seeds)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    header = ["task", "optimizer", "best lr", "final loss mean ± std", "steps-to-target (median, reached)",
              "target", "edge?"]
    rows = []
    for task, r in results.items():
        t = r["target"]
        tgt = (f"{t['value']}× initial" if t["kind"] == "fraction_of_initial" else f"loss ≤ {t['value']}")
        for name, res in r["optimizers"].items():
            fl = res["final_loss"]
            st = res["steps_to_target"]
            rows.append([task, name, res["best_lr"],
                         f"{fl['mean']:.4g} ± {fl['std']:.2g}" if math.isfinite(fl["mean"]) else "diverged",
                         f"{st['median']} ({st['n_reached']}/{len(st['per_seed'])})", tgt,
                         "yes" if res["best_lr_at_sweep_edge"] else ""])
    return _common.fmt_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 lrs, 2 seeds, 200 steps (< ~3 min on 2 cores)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated optimizers")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1 is fastest)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per lr (default: the budget's)")
    ap.add_argument("--wide", action="store_true",
                    help="the full budget's 5 lr multipliers (x10^-1 ... 10^1) at any size")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    size = "tiny" if (args.tiny or _common.tiny()) else ("quick" if args.quick else "full")
    budget = BUDGETS[size]
    if size != "tiny" and (args.seeds or args.wide):
        budget = dataclasses.replace(budget, seeds=args.seeds or budget.seeds,
                                     multipliers=BUDGETS["full"].multipliers if args.wide else budget.multipliers)
    optimizers = [o for o in OPTIMIZERS if o in args.only.split(",")]
    tasks = [t for t in TASKS if t in args.tasks.split(",")]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    results = {}
    for task in tasks:
        results[task] = run_task(TASK_LIST[task], optimizers, budget, size, log)
    extra = {}
    if "lm" in tasks:
        extra["stdlib_corpus"] = {k: v for k, v in _stdlib_corpus().meta.items() if k != "root"}
    result = {
        "benchmark": "convergence",
        "config": {"size": size, "steps": budget.steps, "seq_steps": budget.seq_steps,
                   "seq_model_width_batch_context": SEQ_SHAPE[size], "eval_every": budget.eval_every,
                   "seeds": list(range(budget.seeds)), "lr_multipliers": list(budget.multipliers),
                   "lr_centres": CENTRES, "fallback": "adamw(lr = centre_adamw × multiplier, wd 0)",
                   "weight_decay": 0.0, "torch_threads": args.threads,
                   "best_lr_rule": "lowest mean final eval loss over seeds (diverged = inf)",
                   "divergence": "train or eval loss non-finite or > 10·initial + 10", **extra},
        "environment": _common.environment("cpu"),
        "tasks": results,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = _common.write_json(args.out / "convergence.json", result)
    plot(results, args.out / "convergence.png")
    print(table(results))
    print(f"\nwrote {out} and {args.out / 'convergence.png'} ({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
