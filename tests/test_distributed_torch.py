"""deepopt under FSDP2 (DTensor shards) and DDP, on 2 gloo processes on the CPU.

Each test spawns one world of two processes (``torch.multiprocessing``, a free localhost
port, one thread each) that runs a whole table of cases and returns plain numbers; the
assertions run here. Oracles: a single-process run of the same model on the concatenated
batch (FSDP2 parity), the unsplit run (DDP split, bit for bit), and ``CommDebugMode``'s count of
collectives (independent of ``ns_steps``).

Model: a frozen layer, a 5×7 weight (uneven shards: 3 + 2 rows), two 5×5 weights (one bucket
of two), a 1×5 head (fewer rows than ranks: one rank holds none) and biases (the fallback).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import pickle
import re
import socket
import tempfile

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import deepopt  # noqa: E402
import torch_backend  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
#: Entries of tests/conftest.py's SPECS that the default run checks: every preset, both
#: low-precision Newton–Schulz dtypes (bfloat16 is torch's default), DMGD as a deep Muon, and
#: M3 with its slow write inside the run at step 3 ("m3", frequency 3) and every 2 steps.
DEFAULT = ("sgd_heavy_ball", "adamw", "delta_momentum", "muon_bfloat16", "muon_float32", "dmgd_newton_schulz",
           "m3", "m3_decay")
#: Specs whose collectives are counted at ns_steps 2 and 5: each whole-matrix phase costs two
#: collectives per bucket of same-shape matrices (to the owners, back to the shards), and the
#: model has three matrix buckets (5×7, 2 × 5×5, 1×5). M3's slow read-out runs at step 2.
#: DMGD's memory takes three per bucket (rows to the owners, rows back, θ to every rank), its
#: Newton–Schulz read-out none of its own (it runs on the owner, before the rows go back).
COUNTED = {"muon_bfloat16": 3 * 2, "muon_float32": 3 * 2, "m3_decay": 3 * 2 * 2, "dmgd_newton_schulz": 3 * 3}
TOL = 1e-4          # max |Δ| / max |W| after training, per parameter


# --------------------------------------------------------------------------------------------
# Harness: spawn a world, run a worker on every rank, collect what each returns
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, worker, args: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))                      # as torchrun sets them
    # A mismatched collective fails within 90 s instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    try:
        result = worker(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def spawn(worker, *args, world: int = WORLD) -> list:
    """Run ``worker(rank, world, *args)`` on ``world`` gloo processes; return each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_entry, args=(world, _free_port(), worker, args, out_dir), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.a = torch.nn.Linear(7, 5)                  # 5×7: 3 + 2 rows
        self.b1 = torch.nn.Linear(5, 5, bias=False)     # b1, b2: one bucket of two
        self.b2 = torch.nn.Linear(5, 5, bias=False)
        self.head = torch.nn.Linear(5, 1)               # 1×5: rank 1 holds no row

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.frozen(x))))
        return self.head(torch.tanh(self.b1(h)) + torch.tanh(self.b2(h)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _batches(steps: int, world: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4 * world, 7, generator=g), torch.randn(4 * world, 1, generator=g))
            for _ in range(steps)]


def _train(model, opt, batches, rank: int | None, world: int) -> None:
    """``rank``: train on that rank's quarter of each batch (None: the whole batch)."""
    for x, y in batches:
        if rank is not None:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _fsdp(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.a, model.b1, model.b2, model.head):
        fully_shard(layer)
    return fully_shard(model)


def _full(model) -> dict:
    from torch.distributed.tensor import DTensor

    from torch_backend._distributed import canonical_name

    return {canonical_name(n): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def _rel_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in b)


# --------------------------------------------------------------------------------------------
# FSDP2: parity with one process, collectives independent of ns_steps
# --------------------------------------------------------------------------------------------


def _specs(table: str) -> dict:
    """Spec factories by name: ``DEFAULT``'s or (``"all"``) the whole table. Each process reads
    them from tests/conftest.py (lambdas do not cross process boundaries)."""
    from conftest import SPECS

    return {name: SPECS[name] for name in DEFAULT} if table == "default" else SPECS


def _fsdp_parity_worker(rank: int, world: int, table: str) -> dict:
    from torch.distributed.tensor import DTensor

    specs = _specs(table)

    out = {}
    batches = _batches(STEPS, world)
    for name in specs:
        for foreach in (True, False):
            spec = specs[name]()
            ref, model = _net(), _fsdp(_net())
            try:
                opt = torch_backend.compile(spec, model.named_parameters(), foreach=foreach)
                _train(model, opt, batches, rank, world)
                full = _full(model)
            except Exception as e:  # reported by the assertion, with the case's name
                out[(name, foreach)] = f"{type(e).__name__}: {e}"
                continue
            # DMGD's θ: Replicate DTensors, equal on every rank.
            theta = [st[k].to_local().clone() for st in opt.state.values() for k in ("mlp_w1", "mlp_w2")
                     if k in st and isinstance(st[k], DTensor)]
            stats = torch_backend.memory_stats(opt) if name == "dmgd_newton_schulz" else None  # every rank
            error = None
            if rank == 0:
                ref_opt = torch_backend.compile(spec, ref.named_parameters(), foreach=foreach)
                _train(ref, ref_opt, batches, None, world)
                error = _rel_error(full, {n: p.detach() for n, p in ref.named_parameters()})
                if stats is not None:
                    out[("stats", foreach)] = (stats, torch_backend.memory_stats(ref_opt))
            out[(name, foreach)] = (error, theta, sum(isinstance(st.get("mlp_w1"), DTensor)
                                                      for st in opt.state.values()))
    if table == "default":
        out["counts"] = {(name, ns): _fsdp_step_counts(specs[name]().replace(ns_steps=ns), world, rank)
                         for name in COUNTED for ns in (2, 5)}
    return out


def _fsdp_step_counts(spec, world: int, rank: int) -> dict:
    """Collectives (by op) inside ``opt.step()`` at step 2 under FSDP2."""
    from torch.distributed.tensor.debug import CommDebugMode

    model = _fsdp(_net())
    opt = torch_backend.compile(spec, model.named_parameters())
    batches = _batches(2, world)
    _train(model, opt, batches[:1], rank, world)
    x, y = batches[1]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    with CommDebugMode() as comm:
        opt.step()
    return {str(op): n for op, n in comm.get_comm_counts().items()}


def _errors_worker(rank: int, world: int) -> dict:
    """Misconfigurations: the message, and whether any parameter or state changed before it."""
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    batches = _batches(2, world)
    cases = {
        "ddp_mesh_with_dtensors": lambda model: torch_backend.compile(
            deepopt.muon(), model.named_parameters(), ddp_mesh=mesh),
        "plain_gradient": lambda model: torch_backend.compile(deepopt.muon(), model.named_parameters()),
    }
    for name, build in cases.items():
        model = _fsdp(_net())
        opt = build(model)
        if name == "plain_gradient":
            _train(model, opt, batches[:1], rank, world)        # state exists: it must stay as it is
        before = _full(model), _state_tensors(opt)
        x, y = batches[1]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        if name == "plain_gradient":                        # as if a hook had replaced it
            model.b1.weight.grad = model.b1.weight.grad.full_tensor()
        try:
            opt.step()
            out[name] = (None, True)
        except ValueError as e:
            after = _full(model), _state_tensors(opt)
            unchanged = (all(torch.equal(before[0][k], after[0][k]) for k in after[0])
                         and all(torch.equal(a, b) for a, b in zip(before[1], after[1])))
            out[name] = (str(e), unchanged)
    return out


def _suite_worker(rank: int, world: int, root: str, ports: list[int]) -> dict:
    """Every default case in one world (spawning one costs more than most cases)."""
    out = {"fsdp": _fsdp_parity_worker(rank, world, "default"), "ddp": _ddp_worker(rank, world, "default"),
           "dcp": _dcp_worker(rank, world, "default", root), "errors": _errors_worker(rank, world)}
    dist.destroy_process_group()
    out["readme"] = _readme_worker(rank, world, ports, root)
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return spawn(_suite_worker, str(tmp_path_factory.mktemp("distributed")), [_free_port(), _free_port()])


@pytest.mark.parametrize("case, message", [
    ("ddp_mesh_with_dtensors", "is a DTensor .* but the optimizer was given ddp_mesh"),
    ("plain_gradient", "is a DTensor with placements .* but its gradient is a plain tensor"),
])
def test_misconfiguration_raises_before_any_change(suite, case, message):
    for rank_result in suite:
        error, unchanged = rank_result["errors"][case]
        assert error is not None and re.search(message, error), error
        assert unchanged, "a parameter or state changed before the error"


@pytest.fixture(scope="module")
def fsdp_results(suite):
    return [r["fsdp"] for r in suite]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name", DEFAULT)
def test_fsdp2_matches_one_process(fsdp_results, name, foreach):
    r0, r1 = (r[(name, foreach)] for r in fsdp_results)
    assert not isinstance(r0, str), r0
    assert not isinstance(r1, str), r1
    error, theta0, n_theta = r0
    assert error < TOL, f"{name}: full parameters differ from one process by {error:.2e} (relative)"
    if name.startswith("dmgd"):
        assert n_theta == 4, "every DMGD matrix keeps W₁/W₂/ν as Replicate DTensors"
        for a, b in zip(theta0, r1[1]):
            assert torch.equal(a, b), "W₁/W₂ differ across ranks"


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_fsdp2_memory_stats_match_one_process(fsdp_results, foreach):
    """torch_backend.memory_stats gathers DTensor state: the same diagnostics as one process."""
    sharded, single = fsdp_results[0][("stats", foreach)]
    assert set(sharded) == set(single) == {"a.weight", "b1.weight", "b2.weight", "head.weight"}
    for name, want in single.items():
        for key, value in want.items():
            assert sharded[name][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (name, key)


@pytest.mark.parametrize("name", list(COUNTED))
def test_fsdp2_collectives_per_step_do_not_depend_on_ns_steps(fsdp_results, name):
    counts = fsdp_results[0]["counts"]
    few, many = counts[(name, 2)], counts[(name, 5)]
    assert few == many, f"{name}: collectives change with ns_steps: {few} vs {many}"
    assert sum(many.values()) == COUNTED[name], many


# --------------------------------------------------------------------------------------------
# DDP: wrapped names, the split of whole-matrix work; DCP: resume under DDP and FSDP2
# --------------------------------------------------------------------------------------------

#: ``fallback_patterns`` written for the bare model: the head goes to the fallback.
HEAD_TO_FALLBACK = deepopt.Routing(fallback_patterns=(r"^head\.",))


#: Collectives in a DDP step with ``ddp_mesh``: one all-gather per bucket of matrices whose
#: Newton–Schulz is split (the head is on the fallback: buckets 5×7 and 2 × 5×5). The delta
#: term and DMGD's memory run on each replica, as without ``ddp_mesh``.
DDP_GATHERS = {"sgd_heavy_ball": 0, "adamw": 0, "delta_momentum": 0, "muon_bfloat16": 2, "muon_float32": 2,
               "dmgd_newton_schulz": 2, "m3": 2 * 2, "m3_decay": 2}   # "m3" writes its slow level at step 3


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def _state_tensors(opt) -> list:
    """Every state tensor in parameter order (local shards), for bitwise comparisons."""
    from torch_backend._distributed import local

    return [local(v).clone() for p in (q for g in opt.param_groups for q in g["params"])
            for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]


def _ddp_worker(rank: int, world: int, table: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = init_device_mesh("cpu", (world,))
    batches = _batches(STEPS, world)
    out = {}
    for name, make in _specs(table).items():
        runs = []
        for split in (False, True):
            spec = make().with_routing(HEAD_TO_FALLBACK) if make().fallback is not None else make()
            model = _ddp(_net())
            opt = torch_backend.compile(spec, model.named_parameters(), ddp_mesh=mesh if split else None)
            _train(model, opt, batches[:-1], rank, world)
            x, y = batches[-1]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
            with CommDebugMode() as comm:
                opt.step()
            routes = {n: g["route"] for g in opt.param_groups for n in g.get("param_names", ())}
            runs.append(([p.detach().clone() for p in model.parameters()], _state_tensors(opt),
                         comm.get_total_counts(), routes))
        out[name] = runs
    return out


@pytest.fixture(scope="module")
def ddp_results(suite):
    return [r["ddp"] for r in suite]


@pytest.mark.parametrize("name", DEFAULT)
def test_ddp_split_is_bit_identical_to_unsplit(ddp_results, name):
    for rank_result in ddp_results:
        (p0, s0, comm0, routes), (p1, s1, comm1, _) = rank_result[name]
        assert comm0 == 0, "without ddp_mesh the step communicates nothing"
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)), f"{name}: parameters differ with ddp_mesh"
        assert len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1)), f"{name}: state differs"
        assert comm1 == DDP_GATHERS[name], f"{name}: {comm1} collectives with ddp_mesh"
        if name in ("muon_bfloat16", "dmgd_newton_schulz", "m3"):
            # DDP names parameters "module.head.weight": patterns see "head.weight".
            assert routes["module.head.weight"] == "fallback" and routes["module.a.weight"] == "rule"
    for a, b in zip(ddp_results[0][name][1][0], ddp_results[1][name][1][0]):
        assert torch.equal(a, b), f"{name}: replicas diverged"


def _dcp_worker(rank: int, world: int, table: str, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def keys(osd) -> list[str]:
        return sorted(f"{fqn}/{k}" for fqn, st in osd["state"].items() for k in st)

    def load(model, opt, path):
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        fresh_keys = keys(sd["optim"])
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        return fresh_keys

    batches = _batches(4, world)
    out = {}
    for name, make in _specs(table).items():
        res = {}
        for kind, wrap in (("fsdp", _fsdp), ("ddp", _ddp)):
            path = os.path.join(root, f"{name}-{kind}")
            model = wrap(_net())
            opt = torch_backend.compile(make(), model.named_parameters())
            _train(model, opt, batches[:2], rank, world)
            osd = get_optimizer_state_dict(model, opt)
            dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=path)
            _train(model, opt, batches[2:], rank, world)
            straight, state = _full(model), _state_tensors(opt)

            model2 = wrap(_net())
            opt2 = torch_backend.compile(make(), model2.named_parameters())
            fresh_keys = load(model2, opt2, path)
            _train(model2, opt2, batches[2:], rank, world)
            resumed, state2 = _full(model2), _state_tensors(opt2)
            exact = (all(torch.equal(straight[k], resumed[k]) for k in straight) and len(state) == len(state2)
                     and all(torch.equal(a, b) for a, b in zip(state, state2)))
            res[kind] = (exact, keys(osd), fresh_keys, straight)
        model3 = _ddp(_net())                               # the FSDP2 checkpoint, into DDP
        opt3 = torch_backend.compile(make(), model3.named_parameters())
        load(model3, opt3, os.path.join(root, f"{name}-fsdp"))
        _train(model3, opt3, batches[2:], rank, world)
        res["fsdp_to_ddp"] = _rel_error(_full(model3), res["fsdp"][3])
        out[name] = res
    return out


@pytest.fixture(scope="module")
def dcp_results(suite):
    return [r["dcp"] for r in suite]


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
@pytest.mark.parametrize("name", DEFAULT)
def test_dcp_resume_is_bit_exact(dcp_results, name, kind):
    (exact0, keys0, fresh0, _), (exact1, keys1, fresh1, _) = (r[name][kind] for r in dcp_results)
    assert exact0 and exact1, f"{name} under {kind}: resumed run differs from the straight run"
    assert keys0 == keys1, "state keys differ across ranks"
    assert fresh0 == keys0 == fresh1, "a never-stepped optimizer's state keys differ from a trained one's"
    assert not any(k.startswith("frozen.") for k in keys0), "frozen parameters keep no state"


@pytest.mark.parametrize("name", DEFAULT)
def test_dcp_fsdp2_checkpoint_loads_into_ddp(dcp_results, name):
    error = dcp_results[0][name]["fsdp_to_ddp"]
    assert error < TOL, f"{name}: DDP resumed from the FSDP2 checkpoint differs by {error:.2e}"


# --------------------------------------------------------------------------------------------
# The README's distributed examples, as torchrun would run them
# --------------------------------------------------------------------------------------------


def _readme_examples() -> list[str]:
    import _helpers

    return _helpers.readme_distributed_examples("torch_backend")


def _readme_worker(rank: int, world: int, ports: list[int], root: str) -> list[str]:
    """Run each example as ``torchrun`` would (it initialises its own process group)."""
    dirs = []
    for i, code in enumerate(_readme_examples()):
        os.environ["MASTER_PORT"] = str(ports[i])
        cwd = os.path.join(root, f"readme{i}")
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
        exec(compile(code, "README.md (Distributed)", "exec"), {"__name__": "__main__"})
        assert not dist.is_initialized(), "the example leaves its process group open"
        dirs.append(cwd)
    return dirs


def test_smoke_readme_distributed_examples_run(suite):
    assert len(_readme_examples()) == 2, "README's Distributed section lost its FSDP2+DCP or DDP example"
    dirs = suite[0]["readme"]
    assert len(dirs) == 2
    assert os.path.exists(os.path.join(dirs[0], "ckpt", ".metadata")), "the FSDP2 example saved no checkpoint"


# --------------------------------------------------------------------------------------------
# The whole spec table of tests/conftest.py (slow: python -m pytest -q -m slow tests/test_distributed_torch.py)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_table_spec_under_fsdp2_ddp_and_dcp(tmp_path):
    from conftest import SPECS

    fsdp = spawn(_fsdp_parity_worker, "all")
    ddp = spawn(_ddp_worker, "all")
    ckpt = spawn(_dcp_worker, "all", str(tmp_path))
    failures = []
    for name in SPECS:
        for foreach in (True, False):
            r = fsdp[0][(name, foreach)]
            if isinstance(r, str) or r[0] >= TOL:
                failures.append(f"fsdp2 {name} foreach={foreach}: {r if isinstance(r, str) else r[0]}")
        for rank_result in ddp:
            (p0, s0, *_), (p1, s1, *_) = rank_result[name]
            if not (all(torch.equal(a, b) for a, b in zip(p0, p1)) and all(torch.equal(a, b) for a, b in zip(s0, s1))):
                failures.append(f"ddp split {name}: not bit-identical")
        for kind in ("fsdp", "ddp"):
            if not all(r[name][kind][0] for r in ckpt) or ckpt[0][name][kind][1] != ckpt[1][name][kind][1]:
                failures.append(f"dcp {kind} {name}: resume not exact or keys differ across ranks")
        if ckpt[0][name]["fsdp_to_ddp"] >= TOL:
            failures.append(f"dcp fsdp->ddp {name}: {ckpt[0][name]['fsdp_to_ddp']:.2e}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_smoke_benchmark_distributed(tmp_path):
    """``python -m benchmarks.distributed`` runs and writes its table (a tiny model)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "distributed.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--d", "32", "--layers", "1",
                           "--repeats", "2", "--specs", "muon", "--out", str(out)],
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    # Two matrix buckets (32→128, 128→32), two collectives each; torch.optim.Muon: per iteration.
    assert results["muon"]["total"] == 2 * 2 < results["torch.optim.Muon"]["total"], results


def _hsdp_worker(rank: int, world: int) -> dict:
    """HSDP: a 2-D mesh (replicate × shard), parameters ``(Replicate(), Shard(0))``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    batches = _batches(STEPS, world)
    out = {}
    specs = _specs("all")
    for name in ("muon_bfloat16", "delta_momentum", "dmgd_newton_schulz", "m3_decay"):
        spec = specs[name]()
        ref, model = _net(), _net()
        for layer in (model.a, model.b1, model.b2, model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch_backend.compile(spec, model.named_parameters())
        _train(model, opt, batches, rank, world)
        full = _full(model)
        if rank == 0:
            _train(ref, torch_backend.compile(spec, ref.named_parameters()), batches, None, world)
            out[name] = _rel_error(full, {n: p.detach() for n, p in ref.named_parameters()})
    return out


@pytest.mark.slow
def test_hsdp_on_a_2d_mesh_matches_one_process():
    errors = spawn(_hsdp_worker, world=4)[0]
    assert errors and all(e < TOL for e in errors.values()), errors


@pytest.fixture
def one_process_mesh():
    """A gloo world of one process, in this process, and its 1-D CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_step_count_rebound_in_a_shards_state_copy_reaches_the_optimizer(one_process_mesh, monkeypatch):
    """Local shards step through per-step copies of the state dicts (``local_states``). On CUDA
    the fused AdamW path moves each step count to its parameter's device, rebinding it in the
    copy: the count then stayed in the copy, and the optimizer's stayed 0 (t = 1 at every
    step). Here the move is a clone (this CPU has no second device), on a one-process world."""
    from torch_backend import _fused

    real = _fused.step_fused

    def moved(kind, rule, params, grads, states, *args, **kwargs):
        for st in states:
            st["step"] = st["step"].clone()               # as .to(p.device) rebinds it on CUDA
        return real(kind, rule, params, grads, states, *args, **kwargs)

    monkeypatch.setattr(_fused, "step_fused", moved)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch_backend.compile(deepopt.adamw(1e-2), model, ddp_mesh=one_process_mesh)
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert [float(st["step"]) for st in opt.state.values()] == [3.0, 3.0]


def test_carry_back_returns_rebound_entries_and_keeps_the_rest(one_process_mesh):
    """``carry_back``: an entry rebound in a copy goes back (a DTensor's as a DTensor laid out
    as before), an added one is added, and an entry written in place stays the same object."""
    from torch.distributed.tensor import DTensor, Replicate

    from torch_backend import _distributed

    sharded = DTensor.from_local(torch.zeros(2, 3), one_process_mesh, [Replicate()], run_check=False)
    plain, kept = torch.zeros(()), torch.ones(4)
    states = [{"memory": sharded, "step": plain, "other": kept}]
    with torch.no_grad():
        copies = _distributed.local_states(states)
        copies[0]["other"].add_(1)                         # in place: reaches the state already
        copies[0]["memory"] = torch.full((2, 3), 5.0)      # rebound
        copies[0]["step"] = torch.tensor(7.0)
        copies[0]["added"] = torch.tensor(1.0)
        _distributed.carry_back(states, copies)
    st = states[0]
    assert isinstance(st["memory"], DTensor) and st["memory"].placements == (Replicate(),)
    assert torch.equal(st["memory"].to_local(), torch.full((2, 3), 5.0))
    assert float(st["step"]) == 7.0 and float(st["added"]) == 1.0
    assert st["other"] is kept and torch.equal(kept, torch.full((4,), 2.0))
