"""``DeepOptimizer``: a deepopt spec compiled to a ``torch.optim.Optimizer``.

Reads like torch.optim: ``__init__`` validates and fills ``defaults``; ``_init_group``
gathers parallel lists; ``step`` calls a functional (``_functional.py``).

Routing. Each parameter group the user passes is split in up to two torch groups: the
parameters the spec's rule takes (``group["route"] == "rule"``) and those its fallback takes
(``"fallback"``), each carrying its own spec's hyperparameters. Both parts share the user
group's ``lr``; the fallback part runs at ``lr × group["lr_ratio"]`` (the spec's
``fallback_lr_ratio``), so schedulers and scripts that write ``group["lr"]`` on every group
keep the ratio. A user group may override any hyperparameter of the main spec by key
(``weight_decay`` and fallback-only keys such as ``betas`` reach the fallback part too), and
of the fallback through a nested ``"fallback": {...}`` dict (``lr`` there is the fallback's lr
at the start, kept as a ratio; or give ``lr_ratio``). A group carrying ``"route"`` (as the
groups of ``opt.param_groups`` do) sends all its parameters there, so an optimizer can be
rebuilt from another's ``param_groups``. Other keys are kept on the group, as torch does
(``initial_lr``, your own markers), unless they look like a misspelt hyperparameter.

Every check runs before anything changes: a bad group is refused whole by
``add_param_group``, and ``step`` validates every group (values, state layout, gradients)
before it updates any parameter or state.
"""

from __future__ import annotations

import difflib
import functools
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch.optim import Optimizer

from deepopt import Spec, UpdateRule, matrix_view_shape
from deepopt._validate import TORCH_PHRASES, check_bool, check_real
from torch_backend import _checkpoint, _distributed
from torch_backend._functional import step_batched, step_single

# Keys of a torch group that are bookkeeping, not hyperparameters of a spec.
_RESERVED = ("params", "param_names", "route", "lr_ratio", "fallback")
# Keys torch's schedulers and optimizers put on groups: kept as they are, never "typos".
_TORCH_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum",
                     "foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad",
                     "decoupled_weight_decay", "name")
# torch.optim flags a group may carry; where they are not the spec's hyperparameters, only a
# false value (torch's default) can be honoured.
_TORCH_FLAG_KEYS = ("fused", "capturable", "differentiable", "maximize", "amsgrad")
_ROUTES = ("rule", "fallback")
# Distinct (route, hyperparameters) rules kept; momentum-cycling schedulers make one per step.
_RULE_CACHE_SIZE = 32


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _layout(rule: UpdateRule) -> tuple:
    """What decides a parameter's state (its slots' keys and shapes; the shapes follow the
    parameter) and whether the rule reads it as a matrix: two rules with one layout share
    state as it is."""
    return (tuple((slot.key, slot.dims) for slot in rule.state_slots()), rule.needs_matrix)


def init_state(state: dict, rule: UpdateRule, p: torch.Tensor, name: Callable[[], str]) -> None:
    """The zero state of ``rule`` for parameter ``p``: one entry per slot of
    ``rule.state_slots()`` (docs/math.md §0; DMGD's W₁ from the spec's seeded numpy draw).

    Slots shaped like the parameter are ``zeros_like(p)`` (a DTensor for a DTensor: sharded
    alike); per-matrix slots are plain tensors, replicated on a DTensor's mesh (FSDP2). The
    step count is a float32 0-d tensor on the CPU, as in torch.optim; ``torch.compile`` moves it
    to the parameter's device, as it does torch.optim's (dynamo hooks every ``_init_group``), and
    the compiled step reads it there with no host sync. ``name()`` gives the parameter's
    name, asked only by a slot with an initializer (under ``torch.compile``, looking up a dict
    keyed by tensors made dynamo hand every state the first parameter's shape).
    """
    shape = tuple(p.shape)
    m, n = matrix_view_shape(shape) if len(shape) >= 2 else (0, 0)
    per_matrix = []
    for slot in rule.state_slots():
        if slot.key == "step":
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        elif slot.like_param and slot.init is None:
            state[slot.key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        else:
            value = slot.initial(name() if slot.init is not None else "", slot.shape(shape, m, n))
            state[slot.key] = torch.as_tensor(value, dtype=p.dtype, device=p.device)
            per_matrix.append(slot.key)
    if per_matrix:
        _distributed.replicate_like(state, p, tuple(per_matrix))


def _number(value: Any) -> float | None:
    """A group rate as a float (Python and NumPy numbers, 1-element tensors), else None."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _did_you_mean(key: str, known: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
    return match[0] if match else None


class DeepOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` running a deepopt :class:`~deepopt.Spec`.

    Args:
      params: an iterable of tensors, of ``(name, tensor)`` pairs (``model.named_parameters()``,
        needed for name-pattern routing), of param-group dicts, or an ``nn.Module`` (its
        parameters with every name they have: a tied weight goes to the fallback when any of
        its names matches a pattern).
      spec: the deepopt spec (``deepopt.muon(...)``, ...).
      foreach: ``True`` (default when None) runs the batched/foreach functional; ``False`` the
        single-tensor loop. Both compute the same update.
      maximize: ascend instead of descend, for every group and route.
      fused: torch's fused AdamW / SGD kernels for the rules that are exactly those
        (``deepopt.adamw``, ``deepopt.sgd``, AdamW fallbacks): ``None`` uses them on
        float32/float64, ``True`` on half precision too (it runs the batched path), ``False``
        never.
      capturable, differentiable: torch.optim's flags; only ``False`` is accepted: deepopt reads
        step counts on the host (no CUDA-graph capture) and steps under ``torch.no_grad``.
      ddp_mesh: for plain parameters replicated by DDP, the 1-D ``DeviceMesh`` of their replicas:
        each rank then computes ``1/world`` of the whole-matrix work (Newton–Schulz, …) and one
        all-gather per bucket shares it; the result is the same, bit for bit. DTensor (FSDP2)
        parameters need nothing: they carry their mesh (docs/distributed.md).
    """

    def __init__(self, params: Iterable[Any] | torch.nn.Module, spec: Spec, *,
                 foreach: bool | None = None, maximize: bool = False, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False,
                 ddp_mesh: Any = None) -> None:
        if not isinstance(spec, Spec):
            raise TypeError(f"spec must be a deepopt.Spec, got {type(spec).__name__}")
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach={foreach!r} is invalid: expected None, True or False")
        check_bool("maximize", maximize)
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} is invalid: expected None, True or False")
        if fused and foreach:
            raise ValueError("`fused` and `foreach` cannot be `True` together.")
        if capturable is not False:
            raise ValueError(f"capturable={capturable!r} is not available: a deepopt step reads "
                             "step counts on the host, so it cannot be captured in a CUDA graph")
        if differentiable is not False:
            raise ValueError(f"differentiable={differentiable!r} is not available: deepopt steps "
                             "run under torch.no_grad")
        if isinstance(params, torch.nn.Module):
            params = list(params.named_parameters(remove_duplicate=False))
        self.spec = spec
        self._foreach = True if (foreach is None or fused) else foreach
        self._fused = fused
        self._maximize = maximize
        self._ddp_mesh = _distributed.check_ddp_mesh(ddp_mesh)
        self._names: dict[torch.Tensor, str] = {}      # routing names (positional if unnamed)
        self._user_params: list[list[torch.Tensor]] = []   # each user group's tensors, as given
        self._n_user_groups = 0
        self._reset_caches()
        super().__init__(params, spec.hyperparameters)

    def _reset_caches(self) -> None:
        self._rules: OrderedDict[tuple, tuple[UpdateRule, tuple]] = OrderedDict()  # -> (rule, layout)
        # group index -> the layout its state was checked for (an index, not id(group): dynamo
        # traces no id() of a dict; groups are only appended, and loading a checkpoint resets this)
        self._layouts: dict[int, tuple] = {}
        # The hyperparameters that shape each route's rule (lr and weight decay are read per step).
        self._rule_keys = {route: [k for k in s.hyperparameters if k not in ("lr", "weight_decay")]
                           for route, s in (("rule", self.spec), ("fallback", self.spec.fallback))
                           if s is not None}

    # -- copies: deepcopy, pickle and torch.save(opt) keep the spec and the names ---------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for key in ("spec", "_foreach", "_fused", "_maximize", "_names", "_user_params", "_n_user_groups"):
            state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_caches()                            # also after load_state_dict

    def __repr__(self) -> str:
        return f"DeepOptimizer({self.spec.name}, {len(self.param_groups)} groups)"

    # -- groups ------------------------------------------------------------------------------
    def _route_spec(self, route: str) -> Spec:
        return self.spec if route == "rule" else self.spec.fallback

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a user group; it is split by routing into a rule part and a fallback part.

        All-or-nothing: every check runs before the optimizer changes.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if "params" not in param_group:
            raise ValueError("a param group needs a 'params' entry")
        names, tensors, aliases = self._group_params(param_group)
        parts = self._group_parts(param_group, names, tensors, aliases)

        # torch's checks, on the whole group at once.
        existing = {p for g in self.param_groups for p in g["params"]}
        if not existing.isdisjoint(tensors):
            raise ValueError("some parameters appear in more than one parameter group")
        named = names is not None
        if any(("param_names" in g) != named for g in self.param_groups):
            raise ValueError("all optimizer param groups should be with/without names. cannot add "
                             f"param group {'with' if named else 'without'} names to the optimizer")

        self._warm_rules(parts)                         # builds the rules: the last check
        k = self._n_user_groups
        for i, t in enumerate(tensors):
            self._names.setdefault(t, _distributed.canonical_name(names[i]) if named else f"{k}.{i}")
        self._user_params.append(tensors)
        self._n_user_groups += 1
        self.param_groups.extend(parts)

    def _warm_rules(self, groups: list[dict[str, Any]]) -> None:
        """Build the rules of ``groups`` now, so that a first ``torch.compile``-d step finds them
        cached: building a rule (a spec's builder, frozen dataclasses) does not trace."""
        for group in groups:
            self._rule_and_layout(group)

    def _group_params(self, group: dict[str, Any]):
        """``(names or None, tensors, aliases)`` of a user group; a tensor listed under several
        names (tied weights) appears once, with every name in ``aliases``."""
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs")
        params = list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named) and not all(named):
            raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        if params and all(named):
            pairs = params
        elif "param_names" in group:
            if len(group["param_names"]) != len(params):
                raise ValueError(f"param_names has {len(group['param_names'])} names for {len(params)} params")
            pairs = list(zip(group["param_names"], params))
        else:
            pairs = None
        tensors = [t for _, t in pairs] if pairs is not None else params
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(t).__name__}")
            if not (t.is_leaf or t.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        if pairs is None:
            if len(set(tensors)) != len(tensors):
                raise ValueError("a parameter appears more than once in the group")
            return None, tensors, {}
        aliases: dict[torch.Tensor, list[str]] = {}
        for name, t in pairs:
            if not isinstance(name, str):
                raise TypeError(f"parameter names must be strings, got {name!r}")
            aliases.setdefault(t, []).append(name)
        unique = list(aliases)
        return [aliases[t][0] for t in unique], unique, aliases

    def _group_parts(self, group: dict[str, Any], names: list[str] | None, tensors: list,
                     aliases: dict) -> list[dict[str, Any]]:
        """The torch groups (rule part, fallback part) of one user group, validated."""
        spec, fb = self.spec, self.spec.fallback
        forced = group.get("route")
        if forced is not None and forced not in _ROUTES:
            raise ValueError(f"route={forced!r} is invalid: allowed values are 'rule', 'fallback'")
        if forced == "fallback" and fb is None:
            raise ValueError(f"{spec.name}: route='fallback' but the spec has no fallback")
        rule_hp = set(spec.hyperparameters)
        fb_hp = set(fb.hyperparameters) if fb is not None else set()

        # Which keys are whose: the rule's hyperparameters, the fallback's, or kept as given.
        if forced == "fallback":
            if "fallback" in group:
                raise ValueError("a group with route='fallback' holds the fallback's hyperparameters "
                                 "at top level; a nested 'fallback' dict is not allowed there")
            rule_over: dict[str, Any] = {k: group[k] for k in ("lr",) if k in group}
            fb_over = {k: group[k] for k in fb_hp if k in group and k != "lr"}
            known = fb_hp
        else:
            rule_over = {k: group[k] for k in rule_hp if k in group}
            # Keys only the fallback has reach it (betas); maximize is not one: it would flip
            # the fallback's parameters alone.
            fb_over = {k: group[k] for k in fb_hp - rule_hp - {"maximize"} if k in group}
            if "weight_decay" in group:
                fb_over["weight_decay"] = group["weight_decay"]    # the group's decay is everyone's
            nested = group.get("fallback")
            if nested is not None:
                if not isinstance(nested, dict):
                    raise ValueError(f"fallback={nested!r} is invalid: expected a dict of the fallback's "
                                     "hyperparameters")
                if fb is None:
                    raise ValueError(f"{spec.name}: the group's 'fallback' settings {nested!r} have no "
                                     "effect: the spec has no fallback")
                unknown = sorted(set(nested) - fb_hp - {"lr_ratio"})
                if unknown:
                    raise ValueError(f"{fb.name} (fallback): unknown hyperparameter(s) {unknown}; "
                                     f"allowed: {sorted(fb_hp | {'lr_ratio'})}")
                fb_over.update(nested)
            known = rule_hp | (fb_hp - {"maximize"})
        if "lr_ratio" in group:
            fb_over["lr_ratio"] = group["lr_ratio"]
        extra = {k: v for k, v in group.items() if k not in known and k not in _RESERVED}
        for key in extra:
            if key in _TORCH_FLAG_KEYS and extra[key]:
                raise ValueError(f"{spec.name}: group key {key}={extra[key]!r} is a torch.optim flag that "
                                 f"deepopt.{spec.name} does not take per group; only a false value is "
                                 "accepted (see torch_backend.compile's flags)")
            guess = None if key in _TORCH_GROUP_KEYS else _did_you_mean(key, known | {"lr_ratio"})
            if guess is not None:
                raise ValueError(f"{spec.name}: unknown hyperparameter {key!r}; did you mean {guess!r}? "
                                 f"allowed: {sorted(known)} (other keys are kept on the group as torch "
                                 "does, unless they look like a misspelt hyperparameter)")

        # Validate every value before anything is built.
        self._check_overrides(spec, rule_over)
        lr = rule_over.get("lr", spec.lr)
        ratio = None
        if fb is not None:
            ratio = self._fallback_ratio(fb_over, lr)
            fb_over.pop("lr", None)
            self._check_overrides(fb, fb_over)

        # Routes: forced, or by the spec's routing (a tied weight: fallback if any name says so).
        if names is None and forced is None and spec.routing is not None and spec.routing.fallback_patterns:
            raise ValueError(f"{spec.name}: routing has fallback_patterns {spec.routing.fallback_patterns} "
                             "but the parameters have no names, so no pattern could match; pass "
                             "model.named_parameters() (or the model itself)")
        k = self._n_user_groups
        routed: dict[str, tuple[list, list]] = {"rule": ([], []), "fallback": ([], [])}
        for i, t in enumerate(tensors):
            shape = tuple(t.shape)
            label = names[i] if names is not None else f"{k}.{i}"
            if forced is not None:
                route = forced
                if route == "rule" and spec.rule.needs_matrix and len(shape) < 2:
                    raise ValueError(f"{spec.name}: parameter {label!r} of shape {shape} has fewer than 2 "
                                     "dims but its group has route='rule', a matrix rule")
            else:
                all_names = aliases.get(t, [label])
                all_names = [_distributed.canonical_name(n) for n in all_names]   # DDP, compile, …
                route = ("fallback" if any(spec.route(n, shape) == "fallback" for n in all_names)
                         else "rule")
            routed[route][0].append(label)
            routed[route][1].append(t)

        parts = []
        for route, (part_names, part_tensors) in routed.items():
            if not part_tensors:
                continue
            if route == "rule":
                hp = {**spec.hyperparameters, **rule_over}
            else:
                hp = {**fb.hyperparameters, **fb_over, "lr": lr, "lr_ratio": ratio}
            part = {"params": part_tensors, **hp, **extra, "route": route}
            if names is not None:
                part["param_names"] = part_names
            parts.append(part)
        return parts

    def _fallback_ratio(self, fb_over: dict[str, Any], lr: Any) -> float:
        """The fallback part's ``lr_ratio``: given, from a nested absolute ``lr``, or the spec's."""
        if "lr_ratio" in fb_over:
            return check_real("lr_ratio", _number(fb_over.pop("lr_ratio")), low=0.0)
        if "lr" in fb_over:
            fb_lr = check_real("fallback lr", _number(fb_over["lr"]), low=0.0)
            group_lr = _number(lr)
            if not group_lr:
                raise ValueError(f"the fallback's lr={fb_over['lr']!r} is kept as a ratio of the group's "
                                 f"lr={lr!r}, which is 0; give 'lr_ratio' in the fallback dict instead")
            return fb_lr / group_lr
        return self.spec.fallback_lr_ratio

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
                    value = value.item()
                check_real(key, value, low=0.0)

    def _group_rule(self, group: dict[str, Any]) -> UpdateRule:
        """The rule for a group's current hyperparameters (lr and weight decay are read per step).

        Cached per distinct value, least recently used first out: a scheduler cycling momentum
        makes a new rule every step, and the cache stays small.
        """
        return self._rule_and_layout(group)[0]

    def _rule_and_layout(self, group: dict[str, Any]) -> tuple[UpdateRule, tuple]:
        route = group["route"]
        keys = self._rule_keys[route]
        cache_key = (route, *(_hashable(group[k]) for k in keys))
        entry = self._rules.get(cache_key)
        if entry is None:
            spec = self._route_spec(route)
            rule = spec.replace(**{k: group[k] for k in keys}).rule
            if self._maximize and not rule.maximize:
                rule = replace(rule, maximize=True)
            entry = self._rules[cache_key] = (rule, _layout(rule))
            if len(self._rules) > _RULE_CACHE_SIZE:
                self._rules.popitem(last=False)
        else:
            self._rules.move_to_end(cache_key)
        return entry

    # -- step --------------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any], params: list, grads: list, fresh: list) -> None:
        """Gather the group's parameters with a gradient and their gradients; checks only,
        nothing is written (``fresh``: the parameters whose state is still empty).

        Its arguments are torch.optim's kind (a group, then lists to fill), so under
        ``torch.compile`` dynamo's optimizer hook runs it eagerly and guards the state tensors
        by identity, as it does torch.optim's; with any other argument it traces the body and
        guards each state tensor's dtype, shape and strides every call."""
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"deepopt.{self.spec.name} does not support sparse gradients; "
                                   "use dense gradients (e.g. nn.Embedding(sparse=False))")
            if g.dtype is not p.dtype:
                # torch >= 2.13 lets a gradient differ (``p.grad_dtype``); the state is kept in
                # the parameter's dtype, and a kernel fed both failed mid-step, after writing.
                raise RuntimeError(
                    f"deepopt.{self.spec.name}: parameter {self._names.get(p, '?')!r} is {p.dtype} but its "
                    f"gradient is {g.dtype} (p.grad_dtype); deepopt keeps the state in the parameter's "
                    "dtype and needs gradients of that dtype: leave grad_dtype unset or cast the gradient "
                    "(p.grad = p.grad.to(p.dtype)) before step(). Nothing was updated")
            if p.is_complex():                            # the gradient is too: the same dtype
                raise RuntimeError(f"deepopt.{self.spec.name} does not support complex parameters or "
                                   "gradients; view them as real with torch.view_as_real")
            if len(self.state[p]) == 0:
                fresh.append(p)
            params.append(p)
            grads.append(g)

    def _check_layout(self, group: dict[str, Any], rule: UpdateRule) -> list[tuple[dict, str, Any]]:
        """Check the group's existing state against ``rule``'s (after an edit, a load or a copy).

        Returns the entries to add (state a rule needs that an earlier setting did not keep,
        e.g. momentum 0 → 0.9: it starts from zero, as at a fresh start); raises when a
        setting would change the shape of kept state (dmgd's ``hidden``), or put a parameter
        with fewer than 2 dims under a matrix rule.
        """
        spec = self._route_spec(group["route"])
        fills = []
        for p in group["params"]:
            name = self._names.get(p, "?")
            if rule.needs_matrix and p.ndim < 2:
                raise ValueError(f"deepopt.{spec.name}: the group's settings make it a matrix rule, but "
                                 f"parameter {name!r} of shape {tuple(p.shape)} has fewer than 2 dims; "
                                 "nothing was updated")
            state = self.state.get(p)
            if not state:
                continue
            expected: dict[str, Any] = {}
            self._init_state(expected, rule, p, group)
            for key, value in expected.items():
                have = state.get(key)
                if have is None:
                    fills.append((state, key, value))
                elif isinstance(have, torch.Tensor) and have.shape != value.shape:
                    raise ValueError(
                        f"deepopt.{spec.name}: the group's settings need state {key!r} of parameter "
                        f"{name!r} with shape {tuple(value.shape)}, but it has {tuple(have.shape)}; "
                        "a setting that changes the state's shape (e.g. dmgd's hidden) cannot change "
                        "mid-run: build a new optimizer. Nothing was updated")
        return fills

    def _init_state(self, state: dict, rule: UpdateRule, p: torch.Tensor, group: dict) -> None:
        init_state(state, rule, p, lambda: self._names[p])

    @torch.compiler.disable
    def _init_fresh(self, fresh: list[torch.Tensor], rule: UpdateRule, group: dict) -> None:
        """The zero state of parameters stepped for the first time. Eager under
        ``torch.compile``: traced, a state that breaks the graph (DMGD's W₁, drawn from a
        seed of the parameter's name) made dynamo compile a frame per parameter, and past its
        recompile limit (8) the rest of the first step ran uncompiled."""
        for p in fresh:
            self._init_state(self.state[p], rule, p, group)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Every group's rule, rates, gradients and state layout are checked before anything is
        written, so a bad value edited into any group raises with all parameters and state as
        they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans, fills, layouts = [], [], []
        for i, group in enumerate(self.param_groups):
            rule, layout = self._rule_and_layout(group)
            lr = self._rate(group, "lr")
            if "lr_ratio" in group:
                lr = lr * self._rate(group, "lr_ratio")     # not *=: a tensor lr is the group's own
            wd = self._rate(group, "weight_decay")
            if self._layouts.get(i) != layout:
                fills += self._check_layout(group, rule)
                layouts.append((i, layout))
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            fresh: list[torch.Tensor] = []
            self._init_group(group, params, grads, fresh)
            states = [self.state[p] for p in params]
            if isinstance(lr, torch.Tensor) and params and lr.device != params[0].device:
                lr = lr.to(params[0].device)   # under compile: a scheduler's CPU lr read where the kernels run
            shards = _distributed.layouts(params, grads, getattr(self, "_ddp_mesh", None),
                                          lambda p: self._names.get(p, "?"))
            plans.append((group, rule, lr, wd, params, grads, states, fresh, shards))

        # Everything checked: write.
        for state, key, value in fills:
            state[key] = value
        self._layouts.update(layouts)
        functional = (functools.partial(step_batched, fused=self._fused) if self._foreach
                      else step_single)
        for group, rule, lr, wd, params, grads, states, fresh, shards in plans:
            if fresh:
                self._init_fresh(fresh, rule, group)
            if params:
                if shards is None:
                    functional(rule, params, grads, states, lr=lr, weight_decay=wd)
                else:                                   # local shards (docs/distributed.md)
                    local_states = _distributed.local_states(states)
                    functional(rule, [_distributed.local(p) for p in params],
                               [_distributed.local(g) for g in grads], local_states,
                               lr=lr, weight_decay=wd, layouts=shards)
                    _distributed.carry_back(states, local_states)
        return loss

    @staticmethod
    def _rate(group: dict[str, Any], key: str) -> Any:
        if key == "lr" and isinstance(group[key], torch.Tensor) and torch.compiler.is_compiling():
            # A tensor lr stays a tensor under torch.compile, as torch.optim's does: no .item()
            # (no graph break, no host sync), and a scheduler writing into it recompiles nothing.
            # Its value is not read on the host, so it is checked by eager steps only.
            if group[key].numel() != 1:
                raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(group[key].shape)}")
            return group[key].reshape(())
        value = _number(group[key])
        if value is None or not (0 <= value < float("inf")):
            message = f"param group {key}={group[key]!r} is invalid: expected a finite number >= 0"
            phrase = TORCH_PHRASES.get(key)
            raise ValueError(f"{phrase}: {group[key]!r} ({message})" if phrase else message)
        return value

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, of an earlier deepopt version, or of the
        ``torch.optim`` optimizer with the same math (``torch.optim.AdamW`` into
        ``deepopt.adamw``, ``torch.optim.SGD`` into ``deepopt.sgd``).

        Missing hyperparameters are back-filled from this optimizer's groups and a number
        ``step`` becomes a tensor. A checkpoint of another optimizer is refused here, with the
        reason, before anything changes; :func:`torch_backend.convert_state_dict` carries over
        what can be (e.g. AdamW moments into a matrix rule's fallback).
        """
        super().load_state_dict(_checkpoint.prepare(self, state_dict))
        self._warm_rules(self.param_groups)


def compile(spec: Spec, params: Iterable[Any] | torch.nn.Module, *, foreach: bool | None = None,
            maximize: bool = False, fused: bool | None = None, capturable: bool = False,
            differentiable: bool = False, ddp_mesh: Any = None) -> DeepOptimizer:
    """Compile a deepopt spec into a ``torch.optim.Optimizer`` over ``params``.

    ``params`` as ``torch.optim`` takes them (tensors, ``named_parameters()``, group dicts) or
    the ``nn.Module`` itself. The flags are :class:`DeepOptimizer`'s.

    Example::

        opt = torch_backend.compile(deepopt.muon(lr=0.02), model.named_parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        for x, y in data:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    """
    return DeepOptimizer(params, spec, foreach=foreach, maximize=maximize, fused=fused,
                         capturable=capturable, differentiable=differentiable, ddp_mesh=ddp_mesh)
