"""Everything a lent GPU is for, in one time-boxed call.

    python -m benchmarks.gpu_check --out DIR [--budget 540]

A GPU is lent to a session for minutes, so this runs the device checks as one prepared script,
each part in its own process with its own time limit, keeping what finished when a later part
fails or runs out of time:

1. ``tests``: the suite's ``gpu`` tests (``pytest -m gpu``: CUDA trajectories against the
   reference, checkpoints moving between CPU and CUDA, ``torch.compile`` of the step, HOPE's
   chunk kernels); then, while HOPE trains, the JAX backend's tests with JAX on the GPU.
2. ``step_cost``: :mod:`benchmarks.step_cost` at full size (GPT-2 small) on CUDA, torch and
   then JAX, each next to its anchors in one process.
3. ``hope``: the gpu-small comparison the HOPE issue asks for — HOPE+DMGD, HOPE+AdamW and the
   parameter-matched Transformer++ with AdamW, each at its preset default lr, bf16 autocast,
   each step's forward and backward replayed as CUDA graphs (``train --cuda-graph``, ~4× faster
   for HOPE on an H200; ``--no-hope-cuda-graph`` runs them eagerly), the three processes side
   by side on the one GPU. A short probe of all three
   measures the slowest step, and every run then gets the same number of steps: the preset's
   (2000), or fewer where the time left does not allow them (the summary says which). A run
   still going at the deadline stops (``train --max-train-seconds``) and evaluates.
4. ``profile`` (not in the default ``--parts``): the element-wise rules eagerly next to torch's
   fused kernels (``compiled_step --eager-only``: compiling them at full size outlasts a short
   call) and where a step's time goes for muon, M3 and DMGD's memory (``step_profile``).

Writes ``DIR/gpu_check.json`` (each part: command, return code, seconds, its results) and
``DIR/logs/*.log``; prints a summary table last. ``--device cpu --preset cpu-tiny --size tiny``
runs the same pipeline on a CPU (how it is tested without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common

#: The gpu-small runs: (name, model, optimizer); each at its preset default lr (presets.DEFAULT_LR).
HOPE_RUNS = (("hope-dmgd", "hope", "dmgd"), ("hope-adamw", "hope", "adamw"), ("transformer-adamw", "transformer", "adamw"))
PROBE_STEPS, PROBE_WARM = 12, 4
EVAL_SECONDS = 45        # start-up (data, model) plus the three evaluations after training, per run


class Clock:
    """Seconds left of the budget, and a per-part limit that never runs past it."""

    def __init__(self, budget: float):
        self.deadline = time.monotonic() + budget

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, wanted: float) -> float:
        return max(1.0, min(wanted, self.left()))


def steps_that_fit(seconds: float, step_seconds: float, preset_steps: int, least: int = 20) -> int:
    """The number of steps every run can take in ``seconds`` at the slowest run's step time:
    the preset's where they fit, never fewer than ``least`` (the deadline then stops the run)."""
    if step_seconds <= 0:
        return preset_steps
    return max(least, min(preset_steps, int(seconds / step_seconds)))


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_common.REPO), env.get("PYTHONPATH")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def start(cmd: list[str], log: Path, threads: int, **env: str) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w")
    f.write(" ".join(cmd) + "\n\n")
    f.flush()
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=_common.REPO, env=dict(_env(threads), **env))


def finish(proc: subprocess.Popen, timeout: float, t0: float) -> dict[str, Any]:
    """Wait up to ``timeout`` s; a process still running then is killed (rc "timeout")."""
    try:
        rc: Any = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    return {"command": " ".join(proc.args), "rc": rc, "seconds": round(time.monotonic() - t0, 1)}


def run(cmd: list[str], log: Path, timeout: float, threads: int = 8, **env: str) -> dict[str, Any]:
    t0 = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[2:])} (limit {timeout:.0f} s)", flush=True)
    out = finish(start(cmd, log, threads, **env), timeout, t0)
    print(f"    -> rc {out['rc']} in {out['seconds']} s", flush=True)
    return out


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text().strip().splitlines()[-lines:])
    except OSError:
        return ""


def _first_line(log: Path, text: str) -> str | None:
    """The first line of ``log`` that contains ``text`` (a run's printed note), or None."""
    try:
        return next((line for line in log.read_text().splitlines() if text in line), None)
    except OSError:
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hope_part(args, clock: Clock, py: list[str], out: Path, logs: Path) -> dict[str, Any]:
    from benchmarks.hope.presets import PRESETS
    from benchmarks.hope.train import GRAPH_FALLBACK

    common = ["--preset", args.preset, "--device", args.device, "--no-progress"]
    if args.batch:
        common += ["--batch", str(args.batch)]
    if args.seq_len:
        common += ["--seq-len", str(args.seq_len)]
    part: dict[str, Any] = {"runs": {}, "concurrent": len(HOPE_RUNS)}

    def launch(phase: str, *extra: str) -> dict[str, subprocess.Popen]:
        """Every run of HOPE_RUNS side by side, under out/phase/name; scans exist only in HOPE,
        so the Transformer++ is compiled whole or not at all."""
        procs = {}
        for name, model, opt in HOPE_RUNS:
            compile_ = args.hope_compile if model == "hope" or args.hope_compile != "scans" else "off"
            graph = ["--cuda-graph"] if args.hope_cuda_graph else []
            procs[name] = start(py + ["benchmarks.hope.train", "--model", model, "--optimizer", opt, *common,
                                      "--compile", compile_, *graph, *extra, "--out", str(out / phase / name)],
                                logs / f"{phase}-{name}.log", args.threads)
        return procs

    # Probe: all three side by side, as they will train; the slowest step sets everyone's steps.
    t0 = time.monotonic()
    procs = launch("probe", "--steps", str(PROBE_STEPS), "--warm", str(PROBE_WARM))
    probe = {name: finish(p, clock.limit(args.probe_seconds), t0) for name, p in procs.items()}
    step_s = {}
    for name, res in probe.items():
        fallback = _first_line(logs / f"probe-{name}.log", GRAPH_FALLBACK)
        if fallback:  # said now: the runs that follow will be eager, at several times the step time
            res["graph_fallback"] = fallback
            print(f"[{time.strftime('%H:%M:%S')}] hope probe {name}: {fallback}", flush=True)
        s = _read_json(out / "probe" / name / "summary.json")
        if s and s.get("tokens_per_s"):
            step_s[name] = s["config"]["batch"] * s["config"]["seq_len"] / s["tokens_per_s"]
            res["step_seconds"] = step_s[name]
        else:
            res["log_tail"] = _tail(logs / f"probe-{name}.log")
    part["probe"] = probe
    if not step_s:
        part["status"] = "probe failed"
        return part
    train_seconds = clock.left() - EVAL_SECONDS
    steps = steps_that_fit(train_seconds, max(step_s.values()), PRESETS[args.preset]["train"]["steps"])
    part.update(steps=steps, preset_steps=PRESETS[args.preset]["train"]["steps"],
                train_seconds_allowed=round(train_seconds, 1), slowest_step_seconds=max(step_s.values()))
    print(f"[{time.strftime('%H:%M:%S')}] hope: probe step seconds {step_s}; {steps} steps each "
          f"(preset {part['preset_steps']}), {train_seconds:.0f} s to train", flush=True)

    t0 = time.monotonic()
    procs = launch("hope", "--steps", str(steps), "--max-train-seconds", f"{max(1.0, train_seconds):.0f}")
    if args.jax_tests:   # correctness only, while the GPU is shared: it does not touch the timings above
        part["jax_tests"] = run(py + ["pytest", "-q", "-p", "no:cacheprovider", "tests/test_jax_backend.py"],
                                logs / "tests-jax.log", clock.limit(args.jax_tests_seconds), threads=4)
        part["jax_tests"]["summary"] = _tail(logs / "tests-jax.log", 1)
    for name, p in procs.items():
        res = finish(p, clock.limit(clock.left()), t0)
        s = _read_json(out / "hope" / name / "summary.json")
        if s:
            res.update({k: s.get(k) for k in ("val_bpb", "val_bpb_writes_off", "final_train_loss", "tokens_per_s",
                                               "steps", "steps_completed", "stopped_early", "skipped_steps", "peak_memory_bytes",
                                               "params", "train_time_s", "val_tokens")})
            res["lr"] = s["config"]["lr"]
            res["compiled"] = s["config"]["compiled"]
            res["fallback_lr"] = s["config"]["optimizer"]["fallback_lr"]
        else:
            res["log_tail"] = _tail(logs / f"hope-{name}.log")
        fallback = _first_line(logs / f"hope-{name}.log", GRAPH_FALLBACK)
        if fallback:
            res["graph_fallback"] = fallback
        part["runs"][name] = res
    part["status"] = "ok" if all(r.get("val_bpb") is not None for r in part["runs"].values()) else "incomplete"
    return part


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) else str(x)


def table(result: dict[str, Any]) -> str:
    lines = []
    t = result["parts"].get("tests", {})
    lines.append(f"gpu tests: rc {t.get('rc')} in {t.get('seconds')} s: {t.get('summary', '')}")
    for key in ("step_cost_torch", "step_cost_jax"):
        sc = result["parts"].get(key)
        if not sc:
            continue
        lines.append(f"{key}: rc {sc['rc']} in {sc['seconds']} s")
        data = _read_json(Path(sc["json"])) if sc.get("json") else None
        for p in (data or {}).get("pairs", []):
            if p.get("status") != "ok":
                lines.append(f"  {p['backend']} {p['spec']}: {p.get('status')} {p.get('error', '')[:80]}")
                continue
            tgt = p.get("target", {})
            target = f"; {_f(tgt['ratio'])}x {tgt['vs']} (target {tgt['max_ratio']})" if tgt else ""
            alone = "".join(f"; {k}: {_f(v['time_over_floor'])}x floor" for k, v in p.get("variants", {}).items())
            lines.append(f"  {p['backend']} {p['spec']}: {_f(p['deepopt_ms'])} ms, {_f(p.get('ratio_headline'))}x "
                         f"{p['anchor']}{target}; {_f(p.get('time_over_floor'))}x floor{alone}")
    cs = result["parts"].get("compiled_step")
    if cs:
        lines.append(f"compiled_step --eager-only: rc {cs['rc']} in {cs['seconds']} s")
        for r in ((_read_json(Path(cs["json"])) if cs.get("json") else None) or {}).get("rows", []):
            lines.append(f"  {r['variant']}: {_f(r['eager_vs_anchor']['median'])}x {r['anchor']}")
    sp = result["parts"].get("step_profile")
    if sp:
        lines.append(f"step_profile: rc {sp['rc']} in {sp['seconds']} s")
        for name, r in ((_read_json(Path(sp["json"])) if sp.get("json") else None) or {}).get("specs", {}).items():
            lines.append(f"  {name}: {_f(r['wall_ms_per_step'])} ms per step")
    h = result["parts"].get("hope")
    if h:
        lines.append(f"hope {result['preset']}: {h.get('status')}, {h.get('steps')} steps each "
                     f"(preset {h.get('preset_steps')}), {h.get('concurrent')} runs side by side")
        for name, r in h.get("runs", {}).items():
            off = r.get("val_bpb_writes_off")
            lines.append(f"  {name}: val bpb {_f(r.get('val_bpb'), 4)}"
                         + (f" (writes off {_f(off, 4)})" if off is not None else "")
                         + f", steps {r.get('steps_completed')}/{r.get('steps')} ({r.get('skipped_steps')} skipped), tok/s {_f(r.get('tokens_per_s'))}, "
                           f"peak {_f((r.get('peak_memory_bytes') or 0) / 2**30)} GiB, compiled {r.get('compiled')}, "
                           f"rc {r.get('rc')} "
                           f"{r.get('log_tail', '')}")
            if r.get("graph_fallback"):
                lines.append(f"    ran eager: {r['graph_fallback']}")
        if "jax_tests" in h:
            lines.append(f"  jax tests on the device: rc {h['jax_tests']['rc']}: {h['jax_tests'].get('summary')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for everything (default 540)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--preset", default="gpu-small", help="HOPE preset (default gpu-small)")
    ap.add_argument("--size", default="full", choices=("full", "quick", "tiny"), help="step_cost shapes")
    ap.add_argument("--parts", default="tests,step_cost,hope", help="comma-separated: tests, step_cost, hope, profile")
    ap.add_argument("--batch", type=int, default=None, help="HOPE batch (default: the preset's)")
    ap.add_argument("--seq-len", type=int, default=None, help="HOPE sequence length (default: the preset's)")
    ap.add_argument("--threads", type=int, default=4, help="CPU threads per HOPE process")
    ap.add_argument("--hope-compile", default="off", choices=("off", "scans", "on"),
                    help="train --compile for the runs (off: eager, as the published table; scans: HOPE's "
                         "scans compiled, the Transformer++ eager; on: both compiled whole)")
    ap.add_argument("--hope-cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="train --cuda-graph for every run (HOPE and the Transformer++ alike): the forward and "
                         "backward replayed as CUDA graphs; a run whose capture fails trains eagerly and says so "
                         "(default: on with --device cuda)")
    ap.add_argument("--tests-seconds", type=float, default=100.0)
    ap.add_argument("--step-cost-seconds", type=float, default=120.0, help="per backend")
    ap.add_argument("--step-cost-backends", default="torch,jax", choices=("torch,jax", "torch", "jax"))
    ap.add_argument("--probe-seconds", type=float, default=90.0)
    ap.add_argument("--profile-seconds", type=float, default=90.0, help="both of the profile part's runs")
    ap.add_argument("--jax-tests", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--jax-tests-seconds", type=float, default=150.0)
    args = ap.parse_args(argv)
    if args.hope_cuda_graph is None:
        args.hope_cuda_graph = args.device == "cuda"
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"tests", "step_cost", "hope", "profile"}
    if unknown:
        ap.error(f"--parts: unknown {sorted(unknown)}; choose from tests, step_cost, hope, profile")
    clock = Clock(args.budget)
    out, logs = args.out, args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m"]
    result: dict[str, Any] = {"benchmark": "gpu_check", "device": args.device, "preset": args.preset,
                              "budget_s": args.budget, "environment": _common.environment(args.device),
                              "parts": {}}
    save = lambda: _common.write_json(out / "gpu_check.json", result)   # after every part
    save()

    if "tests" in parts:
        xdist = ["-n", "4"] if args.device == "cuda" and _has("xdist") else []
        # dynamo's graph-break reasons go to the log (a failing compile test shows them)
        res = run(py + ["pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *xdist], logs / "tests-gpu.log",
                  clock.limit(args.tests_seconds), TORCH_LOGS="graph_breaks")
        res["summary"] = _tail(logs / "tests-gpu.log", 1)
        result["parts"]["tests"] = res
        save()
    if "step_cost" in parts:
        size = [] if args.size == "full" else [f"--{args.size}"]
        for backend in args.step_cost_backends.split(","):
            d = out / f"step_cost_{backend}"
            res = run(py + ["benchmarks.step_cost", "--device", args.device, "--backends", backend, *size,
                            "--out", str(d)], logs / f"step_cost_{backend}.log", clock.limit(args.step_cost_seconds))
            res["json"] = str(d / "step_cost.json") if (d / "step_cost.json").exists() else None
            result["parts"][f"step_cost_{backend}"] = res
            save()
    if "profile" in parts:
        sized = {"compiled_step": ["--tiny"] if args.size == "tiny" else ["--size", args.size],
                 "step_profile": ["--size", args.size, "--only", "muon,m3,dmgd_memory"]}
        extra = {"compiled_step": ["--eager-only", "--repeats", "20"], "step_profile": []}
        for name in ("compiled_step", "step_profile"):
            d = out / name
            res = run(py + [f"benchmarks.{name}", "--device", args.device, *sized[name], *extra[name],
                            "--threads", "4", "--out", str(d)], logs / f"{name}.log",
                      clock.limit(args.profile_seconds / 2), threads=4)
            res["json"] = str(d / f"{name}.json") if (d / f"{name}.json").exists() else None
            result["parts"][name] = res
            save()
    if "hope" in parts:
        result["parts"]["hope"] = hope_part(args, clock, py, out, logs)
        save()
    result["seconds"] = round(args.budget - clock.left(), 1)
    save()
    print(table(result), flush=True)
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
