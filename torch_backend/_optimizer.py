"""``DeepOptimizer``: a deepopt spec compiled to a ``torch.optim.Optimizer``.

Reads like torch.optim: ``__init__`` validates and fills ``defaults``; ``_init_group``
gathers parallel lists; ``step`` calls a functional (``_functional.py``).

Routing. Each parameter group the user passes is split in up to two torch groups: the
parameters the spec's rule takes (``group["route"] == "rule"``) and those its fallback takes
(``"fallback"``), each carrying its own spec's hyperparameters. Schedulers therefore scale
both, each from its own initial lr. A user group may override any hyperparameter of the main
spec by key, and of the fallback through a nested ``"fallback": {...}`` dict.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from deepopt import AdamValues, DeepMemory, MultiScaleMemory, Spec, UpdateRule, matrix_view_shape
from torch_backend._functional import step_batched, step_single, uses_step_count

# Extra keys a user group may carry that are not hyperparameters.
_PASSTHROUGH_KEYS = ("params", "param_names", "name", "fallback")


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


class DeepOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` running a deepopt :class:`~deepopt.Spec`.

    Args:
      params: an iterable of tensors, of ``(name, tensor)`` pairs (``model.named_parameters()``,
        needed for name-pattern routing), or of param-group dicts.
      spec: the deepopt spec (``deepopt.muon(...)``, ...).
      foreach: ``True`` (default when None) runs the batched/foreach functional; ``False`` the
        single-tensor loop. Both compute the same update.
    """

    def __init__(self, params: Iterable[Any], spec: Spec, *, foreach: bool | None = None) -> None:
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a deepopt.Spec, got {type(spec).__name__}")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach={foreach!r} is invalid: expected None, True or False")
        self.spec = spec
        self._foreach = True if foreach is None else foreach
        self._rules: dict[tuple, UpdateRule] = {}
        # The hyperparameters that shape each route's rule (lr and weight decay are read per step).
        self._rule_keys = {route: [k for k in s.hyperparameters if k not in ("lr", "weight_decay")]
                           for route, s in (("rule", spec), ("fallback", spec.fallback)) if s is not None}
        self._n_user_groups = 0
        self._names: dict[torch.Tensor, str] = {}      # routing names (positional if unnamed)
        super().__init__(params, spec.hyperparameters)

    def __repr__(self) -> str:
        return f"DeepOptimizer({self.spec.name}, {len(self.param_groups)} groups)"

    # -- groups ------------------------------------------------------------------------------
    def _route_spec(self, route: str) -> Spec:
        return self.spec if route == "rule" else self.spec.fallback

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a user group; it is split by routing into a rule part and a fallback part."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs")
        params = list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named) and not all(named):
            raise ValueError("all optimizer params should be with/without names; some names are missing")
        if all(named) and params:
            names, tensors = [n for n, _ in params], [t for _, t in params]
        else:
            names = list(group.get("param_names") or [f"{self._n_user_groups}.{i}" for i in range(len(params))])
            tensors = params
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(t).__name__}")
        self._n_user_groups += 1

        fallback_overrides = dict(group.pop("fallback", None) or {})
        overrides = {k: v for k, v in group.items() if k not in _PASSTHROUGH_KEYS}
        extra = {k: v for k, v in group.items() if k in ("name",)}
        self._check_overrides(self.spec, overrides)

        parts: dict[str, tuple[list, list]] = {"rule": ([], []), "fallback": ([], [])}
        for name, t in zip(names, tensors):
            self._names.setdefault(t, name)
            route = self.spec.route(name, tuple(t.shape))
            parts[route][0].append(name)
            parts[route][1].append(t)
        if fallback_overrides and self.spec.fallback is not None:
            self._check_overrides(self.spec.fallback, fallback_overrides)

        for route, (part_names, part_tensors) in parts.items():
            if not part_tensors:
                continue
            spec = self._route_spec(route)
            hp = spec.hyperparameters
            hp.update(overrides if route == "rule" else fallback_overrides)
            part = {"params": part_tensors, **hp, **extra, "route": route}
            if all(named) and params:
                part["param_names"] = part_names
            # torch's add_param_group fills missing keys from self.defaults (the main spec's);
            # a fallback part already has all of its own, so it must not take the main's too.
            defaults, self.defaults = self.defaults, ({} if route == "fallback" else self.defaults)
            try:
                super().add_param_group(part)
            finally:
                self.defaults = defaults

    @staticmethod
    def _check_overrides(spec: Spec, overrides: dict[str, Any]) -> None:
        """Validate a group's overrides by rebuilding the spec (lr/weight_decay may be tensors)."""
        static = {k: v for k, v in overrides.items() if k not in ("lr", "weight_decay")}
        spec.replace(**static)
        for key in ("lr", "weight_decay"):
            if key in overrides:
                value = overrides[key]
                if isinstance(value, torch.Tensor):
                    if value.numel() != 1:
                        raise ValueError(f"Tensor {key} must be 1-element, got shape {tuple(value.shape)}")
                else:
                    spec.replace(**{key: value})

    def _group_rule(self, group: dict[str, Any]) -> UpdateRule:
        """The rule for a group's current hyperparameters (lr and weight decay are read per step)."""
        keys = self._rule_keys[group["route"]]
        cache_key = (group["route"], *(_hashable(group[k]) for k in keys))
        rule = self._rules.get(cache_key)
        if rule is None:
            spec = self._route_spec(group["route"])
            rule = self._rules[cache_key] = spec.replace(**{k: group[k] for k in keys}).rule
        return rule

    # -- step --------------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any], rule: UpdateRule, params: list, grads: list,
                    states: list) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"deepopt.{self.spec.name} does not support sparse gradients; "
                                   "use dense gradients (e.g. nn.Embedding(sparse=False))")
            if torch.is_complex(p) or torch.is_complex(p.grad):
                raise RuntimeError(f"deepopt.{self.spec.name} does not support complex parameters or "
                                   "gradients; view them as real with torch.view_as_real")
            state = self.state[p]
            if len(state) == 0:
                self._init_state(state, rule, p, group)
            elif "step" not in state and uses_step_count(rule):
                # A group edited mid-run into a rule that counts steps: count from this step.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            params.append(p)
            grads.append(p.grad)
            states.append(state)

    def _init_state(self, state: dict, rule: UpdateRule, p: torch.Tensor, group: dict) -> None:
        """Zero state of MATH §0–§6 (DMGD's W₁ from the spec's seeded numpy draw)."""
        zeros = lambda: torch.zeros_like(p, memory_format=torch.contiguous_format)  # noqa: E731
        mem = rule.memory
        if uses_step_count(rule):
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if not rule.stateless:
            state["memory"] = zeros()                                   # S (M3: fast level M¹)
        if isinstance(mem, DeepMemory):
            _, n = matrix_view_shape(p.shape)
            if mem.hidden:
                w1 = mem.initial_w1(self._names[p], n)
                state["mlp_w1"] = torch.as_tensor(w1, dtype=p.dtype, device=p.device)
                state["mlp_w2"] = p.new_zeros(n, mem.hidden)            # W₂ = 0: starts as momentum
                state["value_scale"] = p.new_zeros(())                  # ν: the MLP's output unit
            if mem.keys == "previous":
                state["prev_key"] = zeros()
        if isinstance(mem, MultiScaleMemory):
            state["slow_memory"] = zeros()                              # M²
            state["slow_readout"] = zeros()                             # O² = σ(M²)
            state["slow_accumulator"] = zeros()                         # Σ V since the last write
        if isinstance(rule.values, AdamValues):
            state["values_sq"] = zeros()
        if rule.denominator is not None:
            state["second_moment"] = zeros()

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Resolve every group's rule and rates before touching anything, so that a bad value
        # edited into any group raises with all parameters and state as they were.
        plans = [(group, self._group_rule(group), self._rate(group, "lr"), self._rate(group, "weight_decay"))
                 for group in self.param_groups]
        functional = step_batched if self._foreach else step_single
        for group, rule, lr, wd in plans:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            states: list[dict] = []
            self._init_group(group, rule, params, grads, states)
            if params:
                functional(rule, params, grads, states, lr=lr, weight_decay=wd)
        return loss

    @staticmethod
    def _rate(group: dict[str, Any], key: str) -> float:
        value = group[key]
        value = value.item() if isinstance(value, torch.Tensor) else value
        if not (isinstance(value, (int, float)) and value >= 0 and value != float("inf")):
            raise ValueError(f"param group {key}={group[key]!r} is invalid: expected a finite number >= 0")
        return float(value)


def compile(spec: Spec, params: Iterable[Any], *, foreach: bool | None = None) -> DeepOptimizer:
    """Compile a deepopt spec into a ``torch.optim.Optimizer`` over ``params``.

    Example::

        opt = torch_backend.compile(deepopt.muon(lr=0.02), model.named_parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    """
    return DeepOptimizer(params, spec, foreach=foreach)
