"""Checkpoints: validate a state dict before it is loaded, and move between optimizers.

``prepare`` turns what ``DeepOptimizer.load_state_dict`` is given into this optimizer's own
format, or refuses it — before anything changes — with the reason:

- a deepopt state dict: groups must match in number, size and route; hyperparameters missing
  from a group (an older version, a hand edit) are back-filled from the optimizer's groups, as
  torch back-fills its defaults; a number ``step`` becomes a tensor; every state entry is
  checked against what the group's rule keeps (keys and shapes);
- a ``torch.optim.AdamW`` / ``torch.optim.SGD`` state dict loads into ``deepopt.adamw`` /
  ``deepopt.sgd`` (the same math): ``exp_avg → memory``, ``exp_avg_sq → second_moment``,
  ``momentum_buffer → memory``;
- anything else (another spec's state, AdamW into Muon, ...) is refused at load.

``convert_state_dict`` carries a ``torch.optim.AdamW`` / ``SGD`` checkpoint into any deepopt
optimizer whose parts have that math (AdamW moments into a matrix rule's AdamW fallback), the
other parameters starting from zero state. ``to_torch_state_dict`` goes the other way for
``deepopt.adamw`` / ``deepopt.sgd``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch_backend._optimizer import DeepOptimizer

_RESERVED = ("params", "param_names", "route", "lr_ratio")
# torch.optim state names ↔ deepopt's, for the optimizers with the same math.
_TORCH_STATE = {"adamw": {"exp_avg": "memory", "exp_avg_sq": "second_moment", "step": "step"},
                "sgd": {"momentum_buffer": "memory"}}
_TORCH_NAMES = {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum")


def _refuse(message: str) -> ValueError:
    return ValueError(f"load_state_dict refused (nothing was changed): {message}")


# --------------------------------------------------------------------------------------------
# torch.optim formats
# --------------------------------------------------------------------------------------------


def _torch_kind(state_dict: dict[str, Any]) -> str | None:
    """``"adamw"`` / ``"sgd"`` for a torch.optim.AdamW / SGD state dict, else None."""
    groups = state_dict["param_groups"]
    keys = {k for st in state_dict["state"].values() for k in st}
    if groups and all("betas" in g and "amsgrad" in g for g in groups) \
            and keys <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}:
        return "adamw"
    if groups and all("momentum" in g and "dampening" in g for g in groups) and keys <= {"momentum_buffer"}:
        return "sgd"
    return None


def _torch_group_hparams(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    """A torch.optim group's hyperparameters under deepopt's names; refuses what differs."""
    if kind == "adamw":
        if group.get("amsgrad"):
            raise _refuse("the torch.optim.AdamW checkpoint uses amsgrad=True, which deepopt.adamw "
                          "does not implement")
        if not group.get("decoupled_weight_decay", True) and group["weight_decay"] != 0:
            raise _refuse("the checkpoint is torch.optim.Adam's with coupled (L2) weight decay; "
                          "deepopt.adamw decouples it")
        return dict(lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group.get("maximize", False),
                    nesterov=False)
    return dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                maximize=group.get("maximize", False), decoupled_weight_decay=False,
                # torch's buffer starts as the first gradient: deepopt's undamped first write.
                undamped_first_step=group["dampening"] != 0)


def _torch_param_state(kind: str, state: dict[str, Any], undamped: bool = False) -> dict[str, Any]:
    names = _TORCH_STATE[kind]
    out = {names[k]: v for k, v in state.items() if k in names and v is not None}
    if kind == "adamw" and "step" in out:
        out["step"] = torch.as_tensor(out["step"], dtype=torch.float32).detach().cpu().clone()
    if kind == "sgd" and undamped and "memory" in out:
        out["step"] = torch.tensor(1.0)                   # past the first (undamped) write
    return out


def _from_torch(opt: DeepOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A torch.optim.AdamW / SGD state dict as this (same-math) optimizer's, or refuse."""
    kind = _torch_kind(state_dict)
    spec = opt.spec
    if kind is None:
        raise _refuse("its groups have no 'route': it is neither a deepopt checkpoint nor one of "
                      "torch.optim.AdamW / torch.optim.SGD (the optimizers deepopt can read)")
    source = _TORCH_NAMES[kind]
    same_math = spec.name == kind and all(g["route"] == "rule" for g in opt.param_groups)
    if not same_math:
        raise _refuse(f"it is a {source} checkpoint, and deepopt.{spec.name}'s update is not "
                      f"{source}'s; torch_backend.convert_state_dict(state_dict, opt) carries its "
                      "state over where the math is the same and starts the rest from zero")
    saved = state_dict["param_groups"]
    if len(saved) != len(opt.param_groups):
        raise _refuse(f"the {source} checkpoint has {len(saved)} parameter groups, this optimizer "
                      f"{len(opt.param_groups)}")
    groups, state = [], {}
    for g, s in zip(opt.param_groups, saved):
        hp = _torch_group_hparams(kind, s)
        hp = {k: v for k, v in hp.items() if k in g}
        kept = {k: s[k] for k in _SCHEDULER_KEYS if k in s}
        groups.append({**{k: v for k, v in g.items() if k != "params"}, **hp, **kept,
                       "params": list(s["params"])})
        for pid in s["params"]:
            if pid in state_dict["state"]:
                state[pid] = _torch_param_state(kind, state_dict["state"][pid],
                                                hp.get("undamped_first_step", False))
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------
# deepopt format
# --------------------------------------------------------------------------------------------


def prepare(opt: DeepOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` checked and completed for ``opt.load_state_dict``; raises before any change."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise _refuse("expected a dict with 'state' and 'param_groups' (an optimizer's state_dict())")
    saved = state_dict["param_groups"]
    if saved and all("route" not in g for g in saved):
        state_dict = _from_torch(opt, state_dict)
        saved = state_dict["param_groups"]
    groups = opt.param_groups
    if len(saved) != len(groups):
        raise _refuse(f"loaded state dict has a different number of parameter groups ({len(saved)} "
                      f"vs {len(groups)}): deepopt splits each group into a rule part and a fallback "
                      "part, so the checkpoint must come from the same spec, routing and groups")
    new_groups, new_state = [], dict(state_dict["state"])
    for i, (g, s) in enumerate(zip(groups, saved)):
        if len(s["params"]) != len(g["params"]):
            raise _refuse(f"loaded state dict contains a parameter group that doesn't match the size "
                          f"of optimizer's group (group {i}: {len(s['params'])} vs {len(g['params'])})")
        route = g["route"]
        if s.get("route") != route:
            raise _refuse(f"group {i} of the checkpoint is the {s.get('route')!r} part, this "
                          f"optimizer's is the {route!r} part: another spec or routing wrote it")
        spec = opt._route_spec(route)
        expected = set(spec.hyperparameters) | ({"lr_ratio"} if route == "fallback" else set())
        missing = sorted(expected - set(s))
        foreign = sorted(k for k in s if k not in expected and k not in _RESERVED and k not in g
                         and k not in _SCHEDULER_KEYS)
        if missing and foreign:
            raise _refuse(f"group {i} has hyperparameters {foreign} that deepopt.{spec.name} does not "
                          f"have and lacks {missing}: another optimizer wrote it")
        s = {**{k: g[k] for k in missing}, **s}           # back-fill, as torch fills defaults
        hp = {k: s[k] for k in spec.hyperparameters}
        try:
            opt._check_overrides(spec, hp)
            rule = spec.replace(**{k: hp[k] for k in opt._rule_keys[route]}).rule
            if route == "fallback":
                opt._rate(s, "lr_ratio")
        except ValueError as e:
            raise _refuse(f"group {i} has an invalid hyperparameter: {e}") from None
        for pid, p in zip(s["params"], g["params"]):
            if pid in new_state:
                new_state[pid] = _check_param_state(opt, spec, rule, p, g, new_state[pid])
        new_groups.append(s)
    return {**state_dict, "state": new_state, "param_groups": new_groups}


def _check_param_state(opt: DeepOptimizer, spec, rule, p: torch.Tensor, group: dict[str, Any],
                       state: dict[str, Any]) -> dict[str, Any]:
    name = opt._names.get(p, "?")
    state = dict(state)
    if "step" in state and not isinstance(state["step"], torch.Tensor):
        state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    # The rule's state layout (its parts' slots) is what the checkpoint must hold; keys beyond
    # it (an earlier setting's, e.g. prev_key) are kept, as torch keeps what it loads.
    expected: dict[str, Any] = {}
    opt._init_state(expected, rule, p, group)
    missing = sorted(k for k in expected if k not in state)
    if missing:
        extra = sorted(k for k in state if k not in expected)
        raise _refuse(f"the state of parameter {name!r} has {sorted(state)}, but deepopt.{spec.name} "
                      f"keeps {sorted(expected)} ({missing} missing"
                      + (f"; {extra} are not this rule's" if extra else "")
                      + "): another optimizer wrote it")
    for key, value in expected.items():
        have = state[key]
        if not isinstance(have, torch.Tensor) or have.shape != value.shape:
            shape = tuple(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise _refuse(f"state {key!r} of parameter {name!r} has shape {shape}, deepopt."
                          f"{spec.name} with these settings needs {tuple(value.shape)}")
    return state


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def convert_state_dict(state_dict: dict[str, Any], opt: DeepOptimizer) -> dict[str, Any]:
    """A ``torch.optim.AdamW`` / ``torch.optim.SGD`` checkpoint as a state dict for ``opt``.

    The checkpoint's groups must be the user groups ``opt`` was built from (same count, same
    parameters in the same order; deepopt's rule/fallback split is undone by position). Each
    parameter whose part of ``opt`` runs the same math (AdamW's moments into an AdamW fallback,
    SGD's buffer into ``deepopt.sgd``) keeps its state; every other parameter starts from zero
    state, exactly as a fresh optimizer would. Hyperparameters are ``opt``'s current ones.

    Example (an AdamW run continued with Muon on its matrices)::

        opt = torch_backend.compile(deepopt.muon(lr=0.02), model.named_parameters())
        opt.load_state_dict(torch_backend.convert_state_dict(torch.load("adamw.pt"), opt))
    """
    kind = _torch_kind(state_dict)
    if kind is None:
        raise ValueError("convert_state_dict reads torch.optim.AdamW or torch.optim.SGD state dicts; "
                         "this one is neither")
    saved = state_dict["param_groups"]
    if len(saved) != len(opt._user_params) or any(
            len(s["params"]) != len(u) for s, u in zip(saved, opt._user_params)):
        raise ValueError(f"the {_TORCH_NAMES[kind]} checkpoint's groups "
                         f"{[len(s['params']) for s in saved]} do not match the parameter groups "
                         f"this optimizer was built from {[len(u) for u in opt._user_params]}")
    source: dict[torch.Tensor, tuple[dict, dict]] = {}
    for s, tensors in zip(saved, opt._user_params):
        for pid, p in zip(s["params"], tensors):
            if pid in state_dict["state"]:
                source[p] = (s, state_dict["state"][pid])
    own = opt.state_dict()
    state: dict[int, dict] = {}
    pid = 0
    for g in opt.param_groups:
        spec = opt._route_spec(g["route"])
        for p in g["params"]:
            if p in source and spec.name == kind:
                s, st = source[p]
                undamped = kind == "sgd" and bool(g.get("undamped_first_step"))
                state[pid] = _torch_param_state(kind, copy.copy(st), undamped)
            pid += 1
    return {"state": state, "param_groups": own["param_groups"]}


def to_torch_state_dict(opt: DeepOptimizer) -> dict[str, Any]:
    """``deepopt.adamw`` / ``deepopt.sgd``'s state dict as ``torch.optim.AdamW`` / ``SGD`` reads it."""
    kind = opt.spec.name
    if kind not in _TORCH_STATE or any(g["route"] != "rule" for g in opt.param_groups):
        raise ValueError(f"to_torch_state_dict reads deepopt.adamw and deepopt.sgd optimizers (the "
                         f"math of torch.optim.AdamW / SGD); this is deepopt.{kind}")
    sd = opt.state_dict()
    groups = []
    for g in sd["param_groups"]:
        if kind == "adamw":
            if g["nesterov"]:
                raise ValueError("deepopt.adamw(nesterov=True) has no torch.optim.AdamW equivalent")
            hp = dict(lr=g["lr"], betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"],
                      amsgrad=False, maximize=g["maximize"], foreach=None, capturable=False,
                      differentiable=False, fused=None, decoupled_weight_decay=True)
        else:
            if g["decoupled_weight_decay"] or (g["dampening"] != 0 and not g["undamped_first_step"]):
                raise ValueError("this deepopt.sgd's settings (decoupled decay, or dampening without "
                                 "undamped_first_step) differ from torch.optim.SGD's math")
            hp = dict(lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
                      weight_decay=g["weight_decay"], nesterov=g["nesterov"], maximize=g["maximize"],
                      foreach=None, differentiable=False, fused=None)
        kept = {k: g[k] for k in _SCHEDULER_KEYS if k in g}
        groups.append({**hp, **kept, "params": g["params"]})
    names = {v: k for k, v in _TORCH_STATE[kind].items()}
    state = {pid: {names[k]: v for k, v in st.items() if k in names} for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": groups}
