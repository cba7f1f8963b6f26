"""Communication and step time of deepopt's optimizers on FSDP2, next to torch.optim.Muon.

    python -m benchmarks.distributed                # world 2: gloo on CPU, NCCL when 2+ GPUs
    python -m benchmarks.distributed --quick        # fewer timed steps

Each spec steps an FSDP2 model (``fully_shard`` per layer, then the model) of ``--layers``
blocks ``Linear(d, 4d) → GELU → Linear(4d, d)``. For one ``opt.step()`` it records the
collectives by op (``CommDebugMode``) and the bytes each rank puts into them, then times
``opt.step()`` (median of interleaved rounds, a barrier on each side) and reports it as a
ratio to ``torch.optim.Muon`` (matrices) + ``torch.optim.AdamW`` (biases) stepping the same
sharded model. torch.optim.Muon has no distributed code: DTensor runs its Newton–Schulz
matmuls and communicates inside every iteration. Writes ``runs/distributed.json``.
On gloo, DTensor emulates an all-to-all by an all-gather (it says so in a warning).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

from benchmarks._threads import limit_threads

SPECS = ("sgd", "adamw", "delta_momentum", "muon", "dmgd", "m3")


def _spec(name: str):
    import deepopt

    return {"sgd": lambda: deepopt.sgd(0.02, momentum=0.9), "adamw": lambda: deepopt.adamw(1e-3),
            "delta_momentum": lambda: deepopt.delta_momentum(0.02), "muon": lambda: deepopt.muon(0.02),
            "dmgd": lambda: deepopt.dmgd(0.02, readout="newton_schulz"),
            "m3": lambda: deepopt.m3(1e-3, frequency=1)}[name]()   # M3: its slow write every step


def _model(d: int, layers: int, device):
    import torch

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
              for _ in range(layers)]
    return torch.nn.Sequential(*blocks).to(device)


class _Bytes:
    """Bytes this rank hands to collectives inside a ``CommDebugMode`` (functional collectives
    and c10d ops: the size of every tensor argument)."""

    def __init__(self) -> None:
        self.total = 0

    def mode(self):
        import torch
        from torch.distributed.tensor.debug import CommDebugMode

        counter = self

        class Mode(CommDebugMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if "c10d" in name and "wait" not in name and "wrap" not in name:
                    for a in torch.utils._pytree.tree_leaves((args, kwargs)):
                        if isinstance(a, torch.Tensor):
                            counter.total += a.numel() * a.element_size()
                return super().__torch_dispatch__(func, types, args, kwargs)

        return Mode()


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    limit_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torch_backend
    from benchmarks._common import interleaved, ratio_summary, summary, write_json

    cuda = cfg["cuda"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    mesh = init_device_mesh(device.type, (world,))
    d, layers = cfg["d"], cfg["layers"]

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def build(name):
        model = _model(d, layers, device)
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if name == "torch.optim.Muon":
            mats = [p for p in model.parameters() if p.ndim == 2]
            vecs = [p for p in model.parameters() if p.ndim < 2]
            opts = [torch.optim.Muon(mats, lr=0.02), torch.optim.AdamW(vecs, lr=0.02 * 0.3)]
        else:
            opts = [torch_backend.compile(_spec(name), model.named_parameters())]
        torch.manual_seed(rank)
        x = torch.randn(16, d, device=device)
        model(x).square().mean().backward()                 # gradients stay: steps reuse them

        def step():
            sync()
            for opt in opts:
                opt.step()
            sync()

        return step, opts

    steps, comm = {}, {}
    for name in ("torch.optim.Muon", *cfg["specs"]):
        step, opts = build(name)
        step()                                              # state exists: count a steady step
        nbytes = _Bytes()
        with nbytes.mode() as mode:
            for opt in opts:
                opt.step()
        comm[name] = {"collectives": {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()},
                      "total": mode.get_total_counts(), "bytes": nbytes.total}
        steps[name] = step
    times = interleaved(steps, warmup=1, repeats=cfg["repeats"])
    if rank == 0:
        base = times["torch.optim.Muon"]
        rows = {name: {**comm[name], "step_ms": summary(times[name], 1e3),
                       "ratio_to_torch_muon": ratio_summary(times[name], base)} for name in steps}
        write_json(out, {"config": cfg, "results": rows})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--d", type=int, default=128, help="model width (blocks d → 4d → d)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--quick", action="store_true", help="5 timed rounds")
    parser.add_argument("--specs", nargs="+", default=list(SPECS), choices=SPECS)
    parser.add_argument("--out", default="runs/distributed.json")
    args = parser.parse_args(argv)
    limit_threads(1)
    import torch
    import torch.multiprocessing as mp

    from benchmarks._common import environment, fmt_table, write_json

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.world
    cfg = {"world": args.world, "backend": "nccl" if cuda else "gloo", "cuda": cuda, "d": args.d,
           "layers": args.layers, "repeats": 5 if args.quick else args.repeats, "specs": args.specs}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        mp.spawn(_worker, args=(args.world, port, cfg, str(raw)), nprocs=args.world, join=True)
        import json

        result = json.loads(raw.read_text())
    result["environment"] = environment("cuda" if cuda else "cpu")
    path = write_json(args.out, result)
    rows = [[name, r["total"], ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "—",
             r["bytes"] / 1024, r["step_ms"]["median"], r["ratio_to_torch_muon"]["median"]]
            for name, r in result["results"].items()]
    print(f"world {args.world} ({cfg['backend']}), FSDP2, {args.layers} × (Linear({args.d}, {4 * args.d}), "
          f"Linear({4 * args.d}, {args.d})); per opt.step(), per rank")
    print(fmt_table(["optimizer", "collectives", "by op", "KiB sent", "step ms (median)",
                     "÷ torch.optim.Muon"], rows))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
