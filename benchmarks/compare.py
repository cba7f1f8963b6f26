"""Every deepopt optimizer through both backends on one small problem, side by side.

    python -m benchmarks.compare [--steps 150] [--threads 1] [--out runs/compare]

A two-layer MLP regresses a fixed random teacher on generated data. torch trains
``nn.Linear`` weights ``(out, in)``; JAX trains optax-style kernels ``(in, out)`` with the
default layout, whose matrix view is the same ``out × in`` (docs/math.md §0), so the two runs are the
same math from the same start. The table shows the losses, how far apart the two backends'
parameters ended, and the step times; ``compare.json`` adds the run's provenance (git SHA,
deepopt and library versions, command, date: ``benchmarks/_common.py``).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import deepopt
from benchmarks import _common

OPTIMIZERS = {
    "sgd": lambda: deepopt.sgd(0.05, momentum=0.9, nesterov=True),
    "adamw": lambda: deepopt.adamw(3e-3, weight_decay=0.01),
    "delta_momentum": lambda: deepopt.delta_momentum(0.05, momentum=0.9, zeta=0.5),
    "muon": lambda: deepopt.muon(0.02, weight_decay=0.01, ns_dtype="float32"),
    "dmgd": lambda: deepopt.dmgd(0.05),
    "m3": lambda: deepopt.m3(3e-3, frequency=8),
}
IN, HIDDEN, OUT, BATCH = 16, 32, 4, 128


def make_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    teacher = rng.standard_normal((IN, OUT)).astype(np.float32)
    y = np.tanh(x @ teacher).astype(np.float32)
    params = {                                            # torch layout: weight (out, in)
        "fc1.weight": (rng.standard_normal((HIDDEN, IN)) / np.sqrt(IN)).astype(np.float32),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": (rng.standard_normal((OUT, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32),
        "fc2.bias": np.zeros(OUT, np.float32),
    }
    return x, y, params


def run_torch(spec, x, y, params, steps):
    import torch

    import torch_backend

    tensors = {n: torch.nn.Parameter(torch.tensor(p)) for n, p in params.items()}
    opt = torch_backend.compile(spec, list(tensors.items()))
    xt, yt = torch.tensor(x), torch.tensor(y)

    def loss_fn():
        h = torch.tanh(xt @ tensors["fc1.weight"].T + tensors["fc1.bias"])
        return ((h @ tensors["fc2.weight"].T + tensors["fc2.bias"] - yt) ** 2).mean()

    losses, start = [], time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    final = {n: t.detach().numpy().copy() for n, t in tensors.items()}
    return losses + [loss_fn().item()], final, elapsed / steps


def run_jax(spec, x, y, params, steps):
    import jax
    import jax.numpy as jnp
    import optax

    import jax_backend

    # optax layout: kernels (in, out), nested like a flax params tree. The dotted pytree paths
    # are torch's names ("fc1.weight"), so DMGD, which seeds W₁ by parameter name, starts from
    # the same memory on both backends.
    tree = {layer: {"weight": jnp.asarray(params[f"{layer}.weight"].T), "bias": jnp.asarray(params[f"{layer}.bias"])}
            for layer in ("fc1", "fc2")}
    tx = jax_backend.compile(spec)

    def loss_fn(p):
        h = jnp.tanh(x @ p["fc1"]["weight"] + p["fc1"]["bias"])
        return jnp.mean((h @ p["fc2"]["weight"] + p["fc2"]["bias"] - y) ** 2)

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = tx.init(tree)
    p, state, loss = step(tree, state)                    # compile outside the timer
    losses = [float(loss)]
    start = time.perf_counter()
    for _ in range(steps - 1):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    elapsed = time.perf_counter() - start
    final = {f"{layer}.weight": np.asarray(p[layer]["weight"]).T for layer in ("fc1", "fc2")}
    final.update({f"{layer}.bias": np.asarray(p[layer]["bias"]) for layer in ("fc1", "fc2")})
    return losses + [float(loss_fn(p))], final, elapsed / max(steps - 1, 1)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and XLA (default: leave the libraries' own)")
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args(argv)
    if args.threads is not None:
        _common.limit_threads(args.threads)
    x, y, params = make_problem()
    rows = []
    for name, make in OPTIMIZERS.items():
        spec = make()
        t_losses, t_params, t_step = run_torch(spec, x, y, params, args.steps)
        j_losses, j_params, j_step = run_jax(spec, x, y, params, args.steps)
        gap = max(float(np.abs(t_params[n] - j_params[n]).max()) for n in t_params)
        rows.append(dict(optimizer=name, initial_loss=t_losses[0], torch_final_loss=t_losses[-1],
                         jax_final_loss=j_losses[-1], max_param_gap_torch_vs_jax=gap,
                         torch_ms_per_step=1e3 * t_step, jax_ms_per_step=1e3 * j_step))

    header = f"{'optimizer':<15} {'initial':>8} {'torch':>8} {'jax':>8} {'max|Δθ|':>9} {'torch ms':>9} {'jax ms':>7}"
    print(f"\nMLP {IN}-{HIDDEN}-{OUT} regression, {args.steps} steps, float32, loss = mean squared error.\n"
          "max|Δθ|: torch vs jax parameters at the end (float32 rounding, amplified by the\n"
          "dynamics; the tests prove step-by-step equality in float64). ms: whole training step\n"
          "(forward, backward, optimizer); JAX's is one jitted function.")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['optimizer']:<15} {r['initial_loss']:8.4f} {r['torch_final_loss']:8.4f} "
              f"{r['jax_final_loss']:8.4f} {r['max_param_gap_torch_vs_jax']:9.2e} "
              f"{r['torch_ms_per_step']:9.3f} {r['jax_ms_per_step']:7.3f}")
    _common.write_json(os.path.join(args.out, "compare.json"),
                       {"environment": _common.environment(), "steps": args.steps, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
