"""The main job: HOPE+DMGD, HOPE+AdamW and Transformer+AdamW on the stdlib byte corpus.

    python -m benchmarks.hope.compare --preset cpu-tiny --out runs/hope

Each run is its own `python -m benchmarks.hope.train` process (so each has its own peak
memory and a command line that reproduces it alone), same data, seed, batch and step budget;
only model and optimizer change. HOPE+DMGD is skipped, with a note, until `deepopt.dmgd`
exists. Prints a table (val bits per byte, tokens/s, params), writes OUT/comparison.json and
OUT/loss_curves.png.

tokens/s of separate runs on a shared machine mean little (BENCHMARKS.md), so the table adds
an interleaved throughput ratio: HOPE and Transformer++ training steps alternated in this
process after warm-up, median over repeats, with the spread.

The learning rates are each optimizer's default (presets.DEFAULT_LR), not swept: the table
is a health check of the pipeline, not a quality claim.
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

from .presets import PRESETS, build_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = ("hope:dmgd", "hope:adamw", "transformer:adamw")


def available(optimizer: str) -> bool:
    try:
        import deepopt
    except ImportError:
        return optimizer in ("adamw", "sgd", "muon")
    return hasattr(deepopt, optimizer) or optimizer in ("adamw", "sgd", "muon")


def run_one(model, optimizer, args, out_dir):
    cmd = [sys.executable, "-m", "benchmarks.hope.train", "--model", model, "--optimizer", optimizer,
           "--preset", args.preset, "--out", str(out_dir), "--seed", str(args.seed), "--data", "stdlib"]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device:
        cmd += ["--device", args.device]
    print("$ " + " ".join(cmd[1:]).replace(sys.executable, "python"), flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return json.loads((out_dir / "summary.json").read_text())


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
    ax.set_title("HOPE vs Transformer++ on the stdlib byte corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hope.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu-tiny")
    ap.add_argument("--out", default="runs/hope")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma list of model:optimizer")
    ap.add_argument("--no-throughput", action="store_true", help="skip the interleaved throughput ratio")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    summaries, skipped = {}, []
    for item in args.runs.split(","):
        model, optimizer = item.strip().split(":")
        name = f"{model}+{optimizer}"
        if not available(optimizer):
            note = f"skipping {name}: deepopt.{optimizer} is not available yet"
            print(note, flush=True)
            skipped.append(note)
            continue
        summaries[name] = run_one(model, optimizer, args, out / f"{model}-{optimizer}")

    throughput = None
    if not args.no_throughput:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.threads:
            torch.set_num_threads(args.threads)
        throughput = interleaved_throughput(args.preset, device)

    curves = {}
    for name in summaries:
        model, optimizer = name.split("+")
        rows = [json.loads(s) for s in (out / f"{model}-{optimizer}" / "metrics.jsonl").read_text().splitlines()]
        curves[name] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    if curves:
        plot(curves, out / "loss_curves.png")

    header = f"{'run':<20} {'optimizer impl':<44} {'params':>9} {'val loss':>9} {'val bpb':>8} {'tokens/s':>9} {'time s':>7}"
    lines = [header, "-" * len(header)]
    for name, s in summaries.items():
        lines.append(f"{name:<20} {s['optimizer_impl'][:44]:<44} {s['params']:>9,} {s['val_loss']:>9.4f} "
                     f"{s['val_bpb']:>8.4f} {s['tokens_per_s']:>9,.0f} {s['train_time_s']:>7.1f}")
    lines += [f"({n})" for n in skipped]
    if throughput:
        tp = throughput["tokens_per_s"]
        lines.append(f"interleaved throughput (B={throughput['batch']}, T={throughput['seq_len']}, median of "
                     f"{throughput['repeats']}): HOPE {tp['hope']:,.0f} tok/s, Transformer++ {tp['transformer']:,.0f} "
                     f"tok/s, HOPE step time = {throughput['hope_over_transformer_time']:.2f}x Transformer++")
    total = time.perf_counter() - t_start
    lines.append(f"total wall time {total:.0f} s; plot: {out / 'loss_curves.png'}")
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    result = dict(preset=args.preset, runs=summaries, skipped=skipped, throughput=throughput, table=table,
                  wall_time_s=total, command="python -m benchmarks.hope.compare " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
