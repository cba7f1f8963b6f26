"""Shared pieces of the deepopt benchmarks (how they measure: docs/benchmarks.md).

- :func:`limit_threads`: pin torch's, XLA's and the BLAS libraries' thread pools before
  those libraries start (they share the cores; oversubscribed, step times swing severalfold).
- :func:`environment`: what every result file records — git SHA (and whether the tree was
  dirty), deepopt and library versions, device name, thread count, command line, date.
- :func:`interleaved`: the timer. Callables run round-robin (A, B, C, A, B, C, …) after a
  warm-up, so slow drifts of a shared machine hit every contender alike; each callable must
  return only when its work is done (synchronise inside it).
- :func:`summary` / :func:`ratio_summary`: median with spread (quartiles, min, max); ratios
  are taken per round (A_i / B_i, measured back to back) and then summarised.
- :func:`write_json`: strict JSON (no NaN/inf; numpy scalars converted).
- :func:`jax_step`: a jitted optax training step (parameters and state donated) as a timed
  callable, with XLA's fusion count of it.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._threads import THREAD_VARIABLES, limit_threads

__all__ = ["environment", "fmt_table", "interleaved", "jax_step", "limit_threads", "ratio_summary", "summary",
           "tiny", "write_json"]

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Environment record
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    """The installed version of a distribution, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Config-independent facts about this run: code version, libraries, machine, command."""
    # A copy of the tree names its commit in DEEPOPT_GIT_SHA: a lent GPU's copy carried a .git
    # whose HEAD was older than the tree it ran, so that .git says nothing (dirty: unknown).
    named = os.environ.get("DEEPOPT_GIT_SHA")
    status = None if named else _git("status", "--porcelain", "--untracked-files=no")
    env: dict[str, Any] = {
        "git_sha": named or _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": " ".join(["python", "-m", _module_name(), *sys.argv[1:]]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {m: _version(m) for m in ("deepopt", "numpy", "torch", "jax", "optax", "matplotlib", "tqdm")},
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "thread_limits": {var: os.environ.get(var) for var in (*THREAD_VARIABLES, "XLA_FLAGS")},
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name()
        else:
            env["device_name"] = env["cpu"]
    except ImportError:
        env["device_name"] = env["cpu"]
    return env


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else (sys.argv[0] or "?")


def jax_devices() -> list[str] | None:
    try:
        import jax

        return [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001
        return None


def jax_step(tx: Any, params: Any, grads: Any) -> tuple[Callable[[], None], int]:
    """One optax training step as a timed callable: ``tx.update`` then ``optax.apply_updates``,
    jitted with the parameters and the state donated, compiled and run once here (so a caller
    that patches what the trace sees patches around this call). Returns the callable, which
    steps the held copies and waits for them, and XLA's fusion count of the compiled step."""
    import re

    import jax
    import jax.numpy as jnp
    import optax

    jitted = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)),
                     donate_argnums=(0, 1))
    carry = [jax.tree.map(jnp.copy, params)]
    carry.append(tx.init(carry[0]))
    fusions = len(re.findall(r"= \S+ fusion\(", jitted.lower(*carry, grads).compile().as_text()))
    carry[:] = jitted(*carry, grads)

    def call():
        carry[:] = jitted(*carry, grads)
        jax.block_until_ready(carry)
    return call, fusions


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int,
                max_seconds: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each callable, measured round-robin after ``warmup`` rounds.

    The order inside a round rotates (A B C, B C A, …) so no contender always runs right after
    the same one. Stops early, after at least 5 rounds, once ``max_seconds`` have passed.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if max_seconds is not None and r >= 4 and time.perf_counter() - start > max_seconds:
            break
    return times


def summary(xs: list[float], scale: float = 1.0) -> dict[str, float]:
    """Median, quartiles, min and max of ``xs`` times ``scale``."""
    a = np.asarray(xs, dtype=np.float64) * scale
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size)}


def ratio_summary(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ratios num_i / den_i (measured back to back), summarised; ``of_means`` is
    mean(num) / mean(den) (the amortised ratio when some steps cost more than others)."""
    n = min(len(num), len(den))
    out = summary([a / b for a, b in zip(num[:n], den[:n])])
    out["of_means"] = float(np.mean(num[:n]) / np.mean(den[:n]))
    return out


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None               # strict JSON: NaN/inf → null
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def write_json(path: Path | str, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n")
    return path


def fmt_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (also readable printed)."""
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            if v == 0:
                return "0"
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def tiny() -> bool:
    """Hidden smaller-than-quick size for the smoke tests (``--tiny`` or DEEPOPT_BENCH_TINY=1)."""
    return os.environ.get("DEEPOPT_BENCH_TINY", "") not in ("", "0")
