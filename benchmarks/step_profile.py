"""Where one optimizer step's time goes: torch's profiler over deepopt steps, op by op.

    python -m benchmarks.step_profile [--device cpu|cuda] [--size quick|full] [--only muon,m3] [--steps 10] --out DIR

For each named spec of :func:`benchmarks.step_cost.deepopt_specs` (torch; ``dmgd_memory`` is
DMGD's memory alone), on ``step_cost``'s GPT-2 shapes: build the optimizer, take ``--steps``
steps to warm it (state made, a whole M3 period seen), then record ``--steps`` more under
``torch.profiler``. Prints, per spec, the wall time per step and the ops that take the most
device time (CUDA) or self CPU time (CPU), each with its calls per step; writes
``DIR/step_profile.json``. Step cost itself is :mod:`benchmarks.step_cost`'s (interleaved,
against anchors); this says where a step's time goes, to choose what to fuse.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import _common


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--size", default="quick", choices=("quick", "full", "tiny"))
    ap.add_argument("--only", default="muon,m3", help="comma-separated deepopt_specs names")
    ap.add_argument("--steps", type=int, default=10, help="steps recorded (and as many before, to warm)")
    ap.add_argument("--top", type=int, default=20, help="ops listed per spec")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    _common.limit_threads(args.threads)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import deepopt
    import torch_backend
    from benchmarks.step_cost import deepopt_specs, gpt2_shapes

    specs = deepopt_specs(deepopt, "torch")
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(specs)
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}; choose from {sorted(specs)}")
    shapes = gpt2_shapes(args.size)
    gen = torch.Generator().manual_seed(0)
    grads = {n: (torch.randn(s, generator=gen) * 1e-3).to(args.device) for n, s in shapes}
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"

    rows = {}
    for name in only:
        params = []
        for n, s in shapes:
            p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(args.device))
            p.grad = grads[n]
            params.append((n, p))
        opt = torch_backend.compile(specs[name], params)
        for _ in range(args.steps):
            opt.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                opt.step()
            sync()
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key), reverse=True)
        ops = []
        for e in events[:args.top]:
            ops.append({"op": e.key, "calls_per_step": e.count / args.steps,
                        "self_device_ms_per_step": getattr(e, "self_device_time_total", 0.0) / 1e3 / args.steps,
                        "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps})
        device_total = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()) / 1e3 / args.steps
        cpu_total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.steps
        rows[name] = {"wall_ms_per_step": wall * 1e3, "device_ms_per_step": device_total,
                      "cpu_ms_per_step": cpu_total, "ops": ops}
        print(f"\n{name}: {wall * 1e3:.3f} ms per step (unprofiled), device {device_total:.3f} ms, "
              f"host {cpu_total:.3f} ms per step (profiled)")
        print(_common.fmt_table(["op", "calls/step", "device ms/step", "self cpu ms/step"],
                                [[o["op"][:60], round(o["calls_per_step"], 1), round(o["self_device_ms_per_step"], 4),
                                  round(o["self_cpu_ms_per_step"], 4)] for o in ops]))
        del opt, params
        sys.stdout.flush()
    result = {"benchmark": "step_profile",
              "config": {"device": args.device, "size": args.size, "steps": args.steps, "threads": args.threads},
              "environment": _common.environment(args.device), "specs": rows}
    print(f"wrote {_common.write_json(args.out / 'step_profile.json', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
