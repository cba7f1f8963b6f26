"""HOPE vs Transformer++ with each optimizer at its best learning rate, over seeds.

    python -m benchmarks.hope.compare --out runs/hope                 # reduced (the main job's)
    python -m benchmarks.hope.compare --grid full --out runs/hope-full  # the full grid

Runs (model:optimizer): HOPE+AdamW, HOPE+DMGD, HOPE+Muon, static HOPE+AdamW (no in-context
writes in training or evaluation) and Transformer++ with AdamW and Muon, on the stdlib byte
corpus. Each run is its own `python -m benchmarks.hope.train` process (its own peak memory,
a command line that reproduces it alone); same data, batch and step budget, only the model,
optimizer, lr and seed change.

Fairness: every model × optimizer gets an lr sweep and seeds; the table reports, per pair, the
lr with the best mean val bits/byte over seeds, with the seed spread (min–max) at that lr.
DMGD and Muon give the parameters they do not take (embeddings, norms, memory states) to
AdamW at the best AdamW lr of the same model from this sweep (stated in the table), so the
AdamW runs go first.

  --grid full     4 lrs × 3 seeds, the preset's steps (cpu-tiny: 200): 72 runs.
  --grid reduced  2 lrs × 1 seed, 100 steps (the main job's default): 12 runs; a quick check
                  of the pipeline and a first reading, not a result.

The table adds, for HOPE, the same trained model evaluated with every in-context write
switched off and the memory statistics of layer 0, and an interleaved throughput ratio
(HOPE and Transformer++ steps alternated in this process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks._common import environment

from .presets import PRESETS, build_model

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = ("hope:adamw", "hope:dmgd", "hope:muon", "hope-static:adamw", "transformer:adamw", "transformer:muon")
# lr grids, centred on each optimizer's usual small-model lr (× ~√3 steps)
LR_GRID = {"adamw": (1e-3, 3e-3, 1e-2, 3e-2), "muon": (5e-3, 1e-2, 2e-2, 4e-2), "dmgd": (5e-3, 1e-2, 2e-2, 4e-2)}
GRIDS = {
    "full": dict(lrs=LR_GRID, seeds=(0, 1, 2), steps=None),
    "reduced": dict(lrs={k: v[1:3] for k, v in LR_GRID.items()}, seeds=(0,), steps=100),
}


def run_one(model, optimizer, lr, seed, args, out_dir, fallback_lr=None):
    """One train process -> its summary (read back from OUT/summary.json)."""
    static = model == "hope-static"
    cmd = [sys.executable, "-m", "benchmarks.hope.train", "--model", "hope" if static else model,
           "--optimizer", optimizer, "--lr", repr(lr), "--preset", args.preset, "--out", str(out_dir),
           "--seed", str(seed), "--data", "stdlib", "--no-progress", "--threads", str(args.threads)]
    if static:
        cmd += ["--train-writes", "off"]
    if fallback_lr is not None:
        cmd += ["--fallback-lr", repr(fallback_lr)]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.device:
        cmd += ["--device", args.device]
    print("$ " + " ".join(["python", *cmd[1:]]), flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / "summary.json").read_text())


def sweep(pairs, grid, args, out, fallback_lrs):
    """-> {name: {lr: [summary per seed]}} for every model:optimizer in `pairs`."""
    jobs = []
    for model, optimizer in pairs:
        for lr in grid["lrs"][optimizer]:
            for seed in grid["seeds"]:
                fb = fallback_lrs.get(model) if optimizer != "adamw" else None
                jobs.append((model, optimizer, lr, seed, fb))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, m, o, lr, s, args, out / f"{m}-{o}" / f"lr{lr:g}-seed{s}", fb)
                   for m, o, lr, s, fb in jobs]
        results = [f.result() for f in futures]
    table = {}
    for (m, o, lr, _, _), summary in zip(jobs, results):
        table.setdefault(f"{m}+{o}", {}).setdefault(lr, []).append(summary)
    return table


def best_lr(by_lr):
    """-> (lr with the lowest mean val bpb over seeds, its summaries)."""
    lr = min(by_lr, key=lambda k: statistics.fmean(s["val_bpb"] for s in by_lr[k]))
    return lr, by_lr[lr]


def interleaved_throughput(preset, device, repeats=7, batch=None, seq_len=None):
    """Median training-step time of HOPE and Transformer++, alternated A, B, A, B, … after warm-up."""
    train_cfg = PRESETS[preset]["train"]
    B, T = batch or train_cfg["batch"], seq_len or train_cfg["seq_len"]
    torch.manual_seed(0)
    models = {k: build_model(k, preset, 256)[0].to(device) for k in ("hope", "transformer")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    x = torch.randint(0, 256, (B, T + 1), device=device)

    def step(k):
        _, loss = models[k](x[:, :-1], x[:, 1:])
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()
        loss.item()

    times = {k: [] for k in models}
    for k in models:  # warm-up
        step(k)
    for _ in range(repeats):
        for k in models:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(k)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(
        batch=B, seq_len=T, repeats=repeats,
        median_step_s=med, min_step_s={k: min(v) for k, v in times.items()},
        max_step_s={k: max(v) for k, v in times.items()},
        tokens_per_s={k: B * T / v for k, v in med.items()},
        hope_over_transformer_time=med["hope"] / med["transformer"],
    )


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats / byte)")
    ax.set_title("HOPE vs Transformer++ on the stdlib byte corpus (best lr, seed 0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results, fallback_lrs):
    header = (f"{'run':<20} {'best lr':>8} {'fb lr':>7} {'val bpb (mean, min–max)':>25} {'writes off':>10} "
              f"{'α mean/p05':>11} {'η cap':>6} {'‖φ_T‖/‖φ₀‖':>10} {'tok/s':>7} {'params':>8}")
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        bpb = [s["val_bpb"] for s in r["summaries"]]
        s0 = r["summaries"][0]
        off = statistics.fmean(s["val_bpb_writes_off"] for s in r["summaries"]) if "val_bpb_writes_off" in s0 else None
        ms = (s0.get("memory_stats") or [None])[0]
        model = name.split("+")[0]
        fb = fallback_lrs.get(model) if not name.endswith("+adamw") else None
        mem = (f"{ms['alpha_mean']:.2f}/{ms['alpha_p05']:.2f}", f"{ms['eta_at_cap']:.2f}",
               f"{ms['state_norm_ratio']:.2f}") if ms else ("-", "-", "-")
        spread = f"{statistics.fmean(bpb):.4f} ({min(bpb):.4f}–{max(bpb):.4f})"
        lines.append(
            f"{name:<20} {r['lr']:>8.3g} {(f'{fb:.3g}' if fb else '-'):>7} {spread:>25} "
            f"{(f'{off:.4f}' if off is not None else '-'):>10} {mem[0]:>11} {mem[1]:>6} {mem[2]:>10} "
            f"{statistics.fmean(s['tokens_per_s'] for s in r['summaries']):>7,.0f} {s0['params']:>8,}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hope.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu-tiny")
    ap.add_argument("--out", default="runs/hope")
    ap.add_argument("--grid", choices=tuple(GRIDS), default="reduced",
                    help="full: 4 lrs × 3 seeds at the preset's steps; reduced: 2 lrs × 1 seed, 100 steps")
    ap.add_argument("--steps", type=int, default=None, help="override the grid's step count")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads threads)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma list of model:optimizer from: " + ", ".join(RUNS))
    ap.add_argument("--no-throughput", action="store_true", help="skip the interleaved throughput ratio")
    args = ap.parse_args(argv)
    grid = GRIDS[args.grid]
    if args.steps is None:
        args.steps = grid["steps"]
    pairs = [tuple(item.strip().split(":")) for item in args.runs.split(",")]
    for m, o in pairs:
        if f"{m}:{o}" not in RUNS:
            ap.error(f"--runs {m}:{o}: expected some of {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # AdamW first: its best lr per model is the fallback lr of that model's matrix-rule runs
    sweeps = sweep([p for p in pairs if p[1] == "adamw"], grid, args, out, {})
    fallback_lrs = {}
    for name, by_lr in sweeps.items():
        model = name.split("+")[0]
        fallback_lrs[model] = best_lr(by_lr)[0]
    if "hope" in fallback_lrs:  # static HOPE shares the model's parameter set
        fallback_lrs.setdefault("hope-static", fallback_lrs["hope"])
    for m in ("hope", "transformer"):  # no AdamW run of this model: the optimizer's default
        fallback_lrs.setdefault(m, 3e-3)
    sweeps.update(sweep([p for p in pairs if p[1] != "adamw"], grid, args, out, fallback_lrs))
    results = {}
    for m, o in pairs:
        lr, summaries = best_lr(sweeps[f"{m}+{o}"])
        results[f"{m}+{o}"] = dict(lr=lr, summaries=summaries,
                                   all_lrs={str(k): [s["val_bpb"] for s in v] for k, v in sweeps[f"{m}+{o}"].items()})

    throughput = None
    if not args.no_throughput:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.set_num_threads(args.threads)
        throughput = interleaved_throughput(args.preset, device)

    curves = {}
    for name, r in results.items():
        m, o = name.split("+")
        path = out / f"{m}-{o}" / f"lr{r['lr']:g}-seed{r['summaries'][0]['config']['args']['seed']}" / "metrics.jsonl"
        rows = [json.loads(s) for s in path.read_text().splitlines()]
        curves[name] = ([r_["step"] for r_ in rows], [r_["loss"] for r_ in rows])
    if curves:
        plot(curves, out / "loss_curves.png")

    lines = format_table(results, fallback_lrs)
    lines.append(f"grid {args.grid}: lrs {grid['lrs']}, seeds {list(grid['seeds'])}, steps {args.steps or 'preset'}; "
                 "best lr = lowest mean val bpb over seeds; 'fb lr' = AdamW lr of the parameters the matrix "
                 "rule does not take; 'writes off' = the same trained HOPE with every in-context write off; "
                 "memory stats of layer 0")
    if throughput:
        tp = throughput["tokens_per_s"]
        lines.append(f"interleaved throughput (B={throughput['batch']}, T={throughput['seq_len']}, median of "
                     f"{throughput['repeats']}): HOPE {tp['hope']:,.0f} tok/s, Transformer++ {tp['transformer']:,.0f} "
                     f"tok/s, HOPE step time = {throughput['hope_over_transformer_time']:.2f}x Transformer++")
    total = time.perf_counter() - t_start
    lines.append(f"total wall time {total:.0f} s; plot: {out / 'loss_curves.png'}")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    result = dict(preset=args.preset, grid=args.grid, lrs=grid["lrs"], seeds=list(grid["seeds"]), steps=args.steps,
                  fallback_lrs=fallback_lrs, results=results, throughput=throughput, table=table, wall_time_s=total,
                  command="python -m benchmarks.hope.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
                  environment=environment(args.device or "cpu"))     # SHA, versions, machine (each run has its own too)
    (out / "comparison.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
