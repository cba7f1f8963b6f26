"""``memory_stats``: what the deep part of each DMGD memory contributes (docs/math.md §5)."""

from __future__ import annotations

import torch

from deepopt import DeepMemory, reference


def _host(x: torch.Tensor):
    """A float64 numpy copy of the whole tensor (a DTensor shard is gathered: a collective)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return x.detach().double().cpu().numpy()


def memory_stats(opt: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    """Per DMGD parameter (by name), the deep memory's diagnostics at its current gradient.

    For every parameter whose rule is a deep memory and that has both state and a ``.grad``
    (call it after ``backward()``, before or after ``step()``)::

        mlp_share    ‖ν f_θ(Q)‖_F / ‖S‖_F    the MLP's read against the linear part's
        inner_loss   ‖M_φ(Q) − V‖²_F / ‖V‖²_F  how well the memory predicts the values
        value_scale  ν                        the MLP's output unit

    computed by :func:`deepopt.reference.deep_memory_stats` (float64, on the host: a
    diagnostic, not a per-step cost). ``jax_backend.memory_stats`` gives the same numbers.
    Under FSDP2 the shards are gathered (collectives): call it on every rank.

    Example::

        loss.backward(); opt.step()
        for name, s in torch_backend.memory_stats(opt).items():
            print(name, s["mlp_share"], s["inner_loss"])
    """
    out: dict[str, dict[str, float]] = {}
    for group in opt.param_groups:
        rule = opt._group_rule(group)
        if not isinstance(rule.memory, DeepMemory):
            continue
        for p in group["params"]:
            state = opt.state.get(p)
            if not state or p.grad is None:
                continue
            host = {k: (_host(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
            host.setdefault("step", 0)
            grad = _host(p.grad)
            out[opt._names[p]] = reference.deep_memory_stats(rule, host, grad)
    return out


__all__ = ["memory_stats"]
