"""Element-wise rules under ``torch.compile(opt.step)``, next to torch's fused kernels.

    python -m benchmarks.compiled_step [--size quick|full] [--device cpu|cuda] [--eager-only | --no-torch-compiled] [--threads 1] [--repeats 60] --out DIR

Eagerly, ``deepopt.adamw`` and ``deepopt.sgd`` as torch defines them run torch's fused
kernels; their variants that torch has no kernel for — Nesterov AdamW, SGD with decoupled
decay, SGD with dampening and torch's undamped first step — run deepopt's foreach twin.
Compiled, every rule runs the foreach twin as one graph, which inductor makes one loop per
tensor (inductor cannot trace torch's fused kernels). This times each rule eagerly and
compiled (inductor, a tensor lr) next to the torch fused kernel of the same family, and
torch.optim's own foreach step of that family compiled (a float lr: torch's foreach AdamW
takes a tensor lr only with ``capturable=True``), interleaved in one process
(docs/benchmarks.md), pinned to one core with ``--threads 1``, on ``step_cost``'s shapes:
``--size quick`` 52 tensors, 1.35M parameters, where a compiled call's fixed cost (dynamo's
guards, inductor's size checks: ~0.2–0.3 ms) shows; ``--size full`` GPT-2 small, 148 tensors,
124M parameters. ``--device cuda`` runs the same on a GPU (each call synchronises; the tensor lr
stays a CPU scalar, as a scheduler writes it). Compilation happens before timing (on an H100,
one rule's two compiles at full size took over 150 s); ``--eager-only`` times the eager steps
next to the fused kernels alone, and ``--no-torch-compiled`` leaves out torch.optim's compiled
foreach step (one compile per rule instead of two). Writes ``DIR/compiled_step.json``.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import sys
import warnings
from pathlib import Path

from benchmarks import _common
from benchmarks._threads import pin_to_one_core

#: name -> (deepopt preset call, torch anchor family); lr small so that no run diverges.
VARIANTS = {
    "adamw": ("adamw", dict(lr=1e-3), "adamw"),
    "sgd(momentum=0.9)": ("sgd", dict(lr=1e-2, momentum=0.9), "sgd"),
    "adamw(nesterov=True)": ("adamw", dict(lr=1e-3, nesterov=True), "adamw"),
    "sgd(decoupled_weight_decay=True)": ("sgd", dict(lr=1e-2, momentum=0.9, weight_decay=0.01,
                                                     decoupled_weight_decay=True), "sgd"),
    "sgd(dampening=0.1, undamped_first_step=True)": ("sgd", dict(lr=1e-2, momentum=0.9, dampening=0.1,
                                                                 undamped_first_step=True), "sgd"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compiled_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="quick", choices=("quick", "full"),
                    help="step_cost's GPT-2 shapes: quick (1.35M parameters) or full (124M)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--eager-only", action="store_true", help="no torch.compile: eager steps and the fused kernels")
    ap.add_argument("--no-torch-compiled", action="store_true",
                    help="leave out torch.optim's compiled foreach step (compile deepopt's step only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--only", default="", help="comma-separated names of VARIANTS, as printed (default: all)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # the smoke test's size
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.eager_only and args.no_torch_compiled:
        ap.error("--eager-only compiles nothing; --no-torch-compiled applies to compiled runs")
    # Commas inside a name's parentheses are the name's own: "sgd(dampening=0.1, undamped_first_step=True)".
    only = [v.strip() for v in re.split(r",(?![^()]*\))", args.only) if v.strip()] or list(VARIANTS)
    unknown = set(only) - set(VARIANTS)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    _common.limit_threads(args.threads)
    pinned = pin_to_one_core() if args.threads == 1 else None   # as step_cost: one core, steadier

    import torch

    import deepopt
    import torch_backend
    from benchmarks.step_cost import gpt2_shapes

    size = "tiny" if (args.tiny or _common.tiny()) else args.size
    shapes = gpt2_shapes(size)
    gen = torch.Generator().manual_seed(0)
    init = {n: (torch.randn(s, generator=gen) * 0.02).to(args.device) for n, s in shapes}
    grads = {n: (torch.randn(s, generator=gen) * 1e-3).to(args.device) for n, s in shapes}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def synced(step):
        def call():
            step()
            sync()
        return call

    def params():
        out = []
        for n, _ in shapes:
            p = torch.nn.Parameter(init[n].clone())
            p.grad = grads[n]                        # shared: no optimizer writes to a gradient
            out.append(p)
        return out

    def torch_optim(family: str, **flags):
        if family == "adamw":
            return torch.optim.AdamW(params(), lr=1e-3, **flags)
        return torch.optim.SGD(params(), lr=1e-2, momentum=0.9, **flags)

    def compiled(step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn = torch.compile(step)
            for _ in range(3):                        # state, then the steady-state graph
                fn()
        return fn

    anchor_names = {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}
    rows = []
    for name in only:
        preset, kwargs, family = VARIANTS[name]
        spec = getattr(deepopt, preset)(**kwargs)
        eager = torch_backend.compile(spec, params())
        fns = {"eager": eager.step, "anchor": torch_optim(family, fused=True).step}
        if not args.eager_only:
            traced = torch_backend.compile(spec, params())
            for group in traced.param_groups:         # torch.optim's advice: a tensor lr under compile
                group["lr"] = torch.tensor(group["lr"])
            fns["compiled"] = compiled(traced.step)
            if not args.no_torch_compiled:
                fns["torch_compiled"] = compiled(torch_optim(family, foreach=True).step)
            del traced
        fns = {key: synced(fn) for key, fn in fns.items()}
        times = _common.interleaved(fns, warmup=3, repeats=args.repeats)
        row = {"variant": f"deepopt.{name}", "anchor": f"{anchor_names[family]}(fused)"}
        if "torch_compiled" in fns:
            row["torch_compiled"] = f"torch.compile({anchor_names[family]}(foreach).step)"
        for key in fns:
            row[f"{key}_ms"] = _common.summary(times[key], 1e3)
        for key in fns.keys() - {"anchor"}:
            row[f"{key}_vs_anchor"] = _common.ratio_summary(times[key], times["anchor"])
        del fns, eager                                # the next rule's copies take their place
        gc.collect()
        torch._dynamo.reset()
        rows.append(row)
        print(f"  {name}: done", file=sys.stderr, flush=True)
    result = {"benchmark": "compiled_step",
              "config": {"shapes": size, "tensors": len(shapes),
                         "parameters": sum(math.prod(shape) for _, shape in shapes),
                         "repeats": args.repeats, "threads": args.threads, "pinned_core": pinned, "torch_compile": None if args.eager_only else "inductor, tensor lr",
                         "torch_compiled_anchor": not (args.eager_only or args.no_torch_compiled),
                         "device": args.device},
              "environment": _common.environment(args.device), "rows": rows}
    out = _common.write_json(args.out / "compiled_step.json", result)
    def median(r, key):
        return r[key]["median"] if key in r else "—"

    print(_common.fmt_table(
        ["variant", "eager ms", "compiled ms", "anchor", "anchor ms", "eager / anchor", "compiled / anchor",
         "torch's compiled / anchor"],
        [[r["variant"], median(r, "eager_ms"), median(r, "compiled_ms"), r["anchor"], median(r, "anchor_ms"),
          median(r, "eager_vs_anchor"), median(r, "compiled_vs_anchor"), median(r, "torch_compiled_vs_anchor")]
         for r in rows]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
