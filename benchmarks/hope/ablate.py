"""The ablations behind HOPE's design choices (model.py docstring, benchmarks/README.md).

    python -m benchmarks.hope.ablate --out runs/hope-ablate [--variants base,eta4,...] [--steps N]

Every variant is the same `train` run on MQAR (the recall task the in-context memory exists
for), differing only in the `--model-opt` overrides listed in VARIANTS; each reports MQAR
accuracy with the memory's writes on and off, and the memory statistics of layer 0 and 1.
A variant whose accuracy does not drop with the writes off is not using its memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import train

# name -> HopeConfig overrides. OLD is the design before this ablation; DEFAULT the design it chose, with the
# η scale its runs had (4; the model's default is 1 since, model.py choice 14).
OLD = dict(generator_writes="shared", generator_inputs="shared", key_shift_init=False, eta_scale=0.5, eta_max=1.0)
DEFAULT = dict(generator_writes="off", generator_inputs="separate", key_shift_init=True, eta_scale=4.0, eta_max=16.0)
VARIANTS = {
    "old": OLD,
    "static-gen+eta": dict(OLD, generator_writes="off", eta_scale=4.0, eta_max=16.0),
    "static-gen+eta+inputs": dict(OLD, generator_writes="off", eta_scale=4.0, eta_max=16.0,
                                  generator_inputs="separate"),
    "default": DEFAULT,  # = static-gen+eta+inputs with the key-shift init
    "default+gen-shared": dict(DEFAULT, generator_writes="shared"),
    "default+gen-separate": dict(DEFAULT, generator_writes="separate"),
    "default+eta-small": dict(DEFAULT, eta_scale=0.5, eta_max=1.0),
    "default+strict": dict(DEFAULT, out_read="strict"),
    "default+out-norm": dict(DEFAULT, out_norm=True),
}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hope.ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/hope-ablate")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--preset", default="cpu-mqar")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr, the same for every variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = {}
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        argv_run = ["--model", "hope", "--optimizer", "adamw", "--lr", str(args.lr), "--data", "mqar",
                    "--preset", args.preset, "--seed", str(args.seed), "--threads", str(args.threads),
                    "--out", str(Path(args.out) / name), "--no-progress"]
        if args.steps is not None:
            argv_run += ["--steps", str(args.steps)]
        for k, v in overrides.items():
            argv_run += ["--model-opt", f"{k}={v}"]
        s = train.main(argv_run)
        rows[name] = dict(overrides=overrides, val_accuracy=s["val_accuracy"],
                          val_accuracy_writes_off=s["val_accuracy_writes_off"], val_loss=s["val_loss"],
                          memory_stats=s["memory_stats"], train_time_s=s["train_time_s"])
    header = f"{'variant':<26} {'acc':>6} {'acc off':>7} {'α mean':>7} {'α p05':>6} {'η cap':>6} {'‖φ_T‖/‖φ₀‖':>11}"
    lines = [header]
    for name, r in rows.items():
        ms = r["memory_stats"]

        def per_layer(key, ms=ms):
            return "/".join(f"{m[key]:.2f}" for m in ms)

        lines.append(f"{name:<26} {r['val_accuracy']:>6.3f} {r['val_accuracy_writes_off']:>7.3f} "
                     f"{per_layer('alpha_mean'):>7} {per_layer('alpha_p05'):>6} {per_layer('eta_at_cap'):>6} "
                     f"{per_layer('state_norm_ratio'):>11}")
    table = "\n".join(lines)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.json").write_text(json.dumps(dict(rows=rows, table=table, command=" ".join(
        ["python -m benchmarks.hope.ablate", *(argv if argv is not None else sys.argv[1:])])), indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
