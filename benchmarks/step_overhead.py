"""Host overhead of one optimizer step: deepopt next to torch's fused kernels on tiny tensors.

    python -m benchmarks.step_overhead [--threads 1] [--repeats 40] --out DIR

On a GPU an element-wise step is a few short kernels, so what the host does per step — the
Python between ``opt.step()`` and the kernel launch: gathering parameters, gradients and
states, checking them, grouping them for the fused kernel — is most of its time. On an H200 at
GPT-2-small size, ``deepopt.sgd`` was 0.18 ms over ``torch.optim.SGD(fused=True)`` (1.20×,
``benchmarks/results/gpu_h200``). This measures that overhead on the CPU: GPT-2 small's 148
tensors, each 4×4, so the arithmetic is negligible and the time is the host's. Interleaved in
one process (docs/benchmarks.md); each sample is 10 steps. Writes ``DIR/step_overhead.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import _common

N_TENSORS = 148          # GPT-2 small: 2 embeddings, 12 × 12 per block, 2 final norm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    _common.limit_threads(args.threads)

    import torch

    import deepopt
    import torch_backend

    def params():
        ps = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(N_TENSORS)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    opts = {
        "deepopt.sgd": torch_backend.compile(deepopt.sgd(0.01, momentum=0.9), params()),
        "torch.optim.SGD(fused)": torch.optim.SGD(params(), lr=0.01, momentum=0.9, fused=True),
        "deepopt.adamw": torch_backend.compile(deepopt.adamw(1e-3, weight_decay=0.01), params()),
        "torch.optim.AdamW(fused)": torch.optim.AdamW(params(), lr=1e-3, weight_decay=0.01, fused=True),
    }

    def ten(opt):
        def run():
            for _ in range(10):
                opt.step()
        return run

    times = _common.interleaved({k: ten(o) for k, o in opts.items()}, warmup=3, repeats=args.repeats)
    rows = []
    for ours, anchor in (("deepopt.sgd", "torch.optim.SGD(fused)"), ("deepopt.adamw", "torch.optim.AdamW(fused)")):
        ms = _common.summary(times[ours], 100.0)         # 10 steps per sample: ms per step
        anchor_ms = _common.summary(times[anchor], 100.0)
        rows.append({"deepopt": ours, "anchor": anchor, "deepopt_ms": ms, "anchor_ms": anchor_ms,
                     "overhead_ms": ms["median"] - anchor_ms["median"],
                     "ratio": _common.ratio_summary(times[ours], times[anchor])})
    result = {"benchmark": "step_overhead", "config": {"tensors": N_TENSORS, "shape": [4, 4],
                                                       "steps_per_sample": 10, "repeats": args.repeats,
                                                       "threads": args.threads},
              "environment": _common.environment("cpu"), "rows": rows}
    out = _common.write_json(args.out / "step_overhead.json", result)
    print(_common.fmt_table(["deepopt", "ms / step", "anchor", "ms / step", "ratio", "overhead ms"],
                            [[r["deepopt"], r["deepopt_ms"]["median"], r["anchor"], r["anchor_ms"]["median"],
                              r["ratio"]["median"], r["overhead_ms"]] for r in rows]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
