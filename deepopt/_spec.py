"""Rules, routing and the optimizer spec: the data a backend compiles.

An :class:`UpdateRule` is the tree of parts (docs/math.md §1–§4) that says what one parameter's step
computes. A :class:`Spec` is what users pass around: a named rule with its flat, torch-style
hyperparameters (``lr``, ``momentum``, ``betas``, ...), an optional fallback spec for
parameters the rule cannot take, and the :class:`Routing` that decides which is which.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from deepopt._denominator import SecondMoment
from deepopt._memory import LinearMemory, Memory
from deepopt._readout import SHAPE_SCALES, Identity, Readout
from deepopt._state import STEP, Slot
from deepopt._validate import check_bool, check_choice, check_int, check_real
from deepopt._values import IdentityValues, Values

# --------------------------------------------------------------------------------------------
# UpdateRule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateRule:
    """One parameter's update (docs/math.md §0): values → memory write → read-out → σ → outer step.

    Per step ``t`` with gradient ``G``, learning rate ``γ`` and weight decay ``λ``::

        G ← −G                              if maximize
        G ← G + λ W                         if not decoupled_weight_decay  (L2, torch SGD/Adam)
        V = P(G)                            values            (docs/math.md §3)
        S_t = S_{t−1}(α I − ζ KᵀK) + η V    memory write      (docs/math.md §2, NL eq. 46–49)
        D̃ = S_t, or α S_t + η V             read-out (Nesterov), optional bias correction
        O = σ(D̃)                            read-out map      (docs/math.md §4)
        O ← O / (√v̂ + ε)                    if denominator    (Adam's second moment)
        W ← W − γ λ W − γ s(W) O            outer step; λ here only if decoupled

    The learning rate and the weight decay strength are not part of the rule: they live in the
    :class:`Spec`'s hyperparameters, where schedulers and parameter groups edit them.
    """

    memory: Memory = LinearMemory()
    values: Values = IdentityValues()
    readout: Readout = Identity()
    denominator: SecondMoment | None = None
    shape_scale: Literal["original", "match_rms_adamw", "none"] = "none"
    decoupled_weight_decay: bool = True
    maximize: bool = False

    def __post_init__(self):
        for role, base in (("memory", Memory), ("values", Values), ("readout", Readout)):
            part = getattr(self, role)
            if not isinstance(part, base):
                raise ValueError(f"{role}={part!r} is invalid: expected one of {_kinds(base)} "
                                 f"(a subclass of deepopt.{base.__name__})")
        if self.denominator is not None and not isinstance(self.denominator, SecondMoment):
            raise ValueError(f"denominator={self.denominator!r} is invalid: expected None or SecondMoment")
        check_choice("shape_scale", self.shape_scale, SHAPE_SCALES)
        check_bool("decoupled_weight_decay", self.decoupled_weight_decay)
        check_bool("maximize", self.maximize)

    @property
    def needs_matrix(self) -> bool:
        """True when the rule reads the parameter as a matrix (docs/math.md §0 matrix view).
        Delta momentum alone does not: 1-D parameters take its recurrence with ζ = 0 (§2)."""
        return self.memory.needs_matrix or self.readout.needs_matrix or self.shape_scale != "none"

    @property
    def stateless(self) -> bool:
        """True when the memory stores nothing (plain SGD)."""
        return self.memory.stateless

    @property
    def counts_steps(self) -> bool:
        """Whether ``t`` enters the rule's math (bias corrections, torch's first write, M3's
        period). Only such rules keep a step count, as torch's SGD and Muon keep none."""
        parts = (self.memory, self.values, self.denominator)
        return any(part is not None and part.counts_steps for part in parts)

    def state_slots(self) -> tuple[Slot, ...]:
        """Every entry of a parameter's state under this rule (docs/math.md §0), in the order
        the backends create them: the step count, the values', the memory's, the
        denominator's. The one definition of the state layout (:mod:`deepopt._state`)."""
        return ((STEP,) if self.counts_steps else ()) + self.values.state_slots() \
            + self.memory.state_slots() + (self.denominator.state_slots() if self.denominator else ())


def _kinds(base: type) -> str:
    """The classes deriving from ``base`` that exist now, by name (those a user adds too)."""
    seen, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop(0)
        seen.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return ", ".join(sorted(seen))


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Which parameters a matrix rule takes; the others go to the spec's fallback.

    A parameter goes to the fallback when its ``ndim < min_ndim``, when any regular expression
    in ``fallback_patterns`` is found (``re.search``) in its name, or when
    ``fallback_if(name, shape)`` is true. Names are torch's ``named_parameters()`` names and, in
    JAX, the pytree path joined with dots (``{"params": {"embed": {"w": x}}}`` →
    ``"params.embed.w"``), so one routing gives one assignment on both backends.
    """

    min_ndim: int = 2
    fallback_patterns: tuple[str, ...] = ()
    fallback_if: Callable[[str, tuple[int, ...]], bool] | None = None

    def __post_init__(self):
        check_int("min_ndim", self.min_ndim, low=0)
        patterns = self.fallback_patterns
        if isinstance(patterns, str):
            patterns = (patterns,)
        patterns = tuple(patterns)
        for p in patterns:
            if not isinstance(p, str):
                raise ValueError(f"fallback_patterns entry {p!r} is invalid: expected a regular expression string")
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"fallback_patterns entry {p!r} is not a valid regular expression: {e}") from None
        object.__setattr__(self, "fallback_patterns", patterns)
        if self.fallback_if is not None and not callable(self.fallback_if):
            raise ValueError(f"fallback_if={self.fallback_if!r} is invalid: expected a callable (name, shape) -> bool")

    def to_fallback(self, name: str, shape: tuple[int, ...]) -> bool:
        shape = tuple(int(s) for s in shape)
        if len(shape) < self.min_ndim:
            return True
        if any(re.search(p, name) for p in self.fallback_patterns):
            return True
        return bool(self.fallback_if(name, shape)) if self.fallback_if is not None else False


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------

Builder = Callable[..., "Spec"]


@dataclass(frozen=True)
class Spec:
    """A named optimizer: rule + hyperparameters + fallback + routing. Compile it with
    ``torch_backend.compile(spec, params)`` or ``jax_backend.compile(spec)``.

    ``hparams`` are flat and named as in ``torch.optim`` (they become each torch parameter
    group's keys); ``replace(**changes)`` rebuilds the spec through its constructor, so every
    change is validated exactly as at construction.

    The fallback's learning rate is a ratio of the spec's: ``fallback.lr ==
    fallback_lr_ratio × lr``. The ratio is derived from the fallback's own lr when not given,
    and it is what the backends keep when the lr changes (``replace(lr=...)``, a parameter
    group's ``lr``, a scheduler, a script writing ``group["lr"]``, JAX's ``learning_rate=``).
    """

    name: str
    rule: UpdateRule
    hparams: tuple[tuple[str, Any], ...]
    fallback: Spec | None = None
    routing: Routing | None = None
    builder: Builder = field(default=None, compare=False, repr=False)
    fallback_lr_ratio: float | None = None

    def __post_init__(self):
        hp = dict(self.hparams)
        for key in ("lr", "weight_decay"):
            if key not in hp:
                raise ValueError(f"a Spec's hparams must contain {key!r}; got {sorted(hp)}")
        check_real("lr", hp["lr"], low=0.0)
        check_real("weight_decay", hp["weight_decay"], low=0.0)
        if self.fallback is not None:
            if not isinstance(self.fallback, Spec):
                raise ValueError(f"fallback={self.fallback!r} is invalid: expected a deepopt Spec or None")
            if self.fallback.rule.needs_matrix:
                raise ValueError(f"fallback={self.fallback.name!r} is a matrix rule; a fallback must be "
                                 "element-wise (e.g. deepopt.adamw or deepopt.sgd)")
        if self.routing is not None and not isinstance(self.routing, Routing):
            raise ValueError(f"routing={self.routing!r} is invalid: expected a deepopt.Routing or None")
        self._set_fallback_lr_ratio(float(hp["lr"]))

    def _set_fallback_lr_ratio(self, lr: float) -> None:
        """The fallback runs at ``fallback_lr_ratio × lr``: derive the ratio from the fallback's
        own lr when it is not given, else rescale the fallback's lr to it."""
        ratio = self.fallback_lr_ratio
        if self.fallback is None:
            if ratio is not None:
                raise ValueError(f"fallback_lr_ratio={ratio!r} is invalid: the spec has no fallback")
            return
        fb_lr = self.fallback.lr
        if ratio is None:
            if lr == 0.0 and fb_lr != 0.0:
                raise ValueError(f"{self.name}: lr=0 leaves the fallback's lr={fb_lr!r} without a ratio; "
                                 "state it with spec.with_fallback(fallback, lr_ratio=...)")
            ratio = fb_lr / lr if lr != 0.0 else 1.0
        ratio = check_real("fallback_lr_ratio", ratio, low=0.0)
        object.__setattr__(self, "fallback_lr_ratio", ratio)
        if fb_lr != ratio * lr:
            fb_hp = {**self.fallback.hyperparameters, "lr": ratio * lr}
            object.__setattr__(self, "fallback", replace(self.fallback, hparams=freeze_hparams(fb_hp)))

    # -- hyperparameters ----------------------------------------------------------------------
    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The flat hyperparameters, as a fresh dict (torch ``defaults``)."""
        return dict(self.hparams)

    @property
    def lr(self) -> float:
        return dict(self.hparams)["lr"]

    @property
    def weight_decay(self) -> float:
        return dict(self.hparams)["weight_decay"]

    def replace(self, **changes: Any) -> Spec:
        """A copy with some hyperparameters changed, re-validated by the spec's constructor."""
        if not changes:
            return self
        hp = self.hyperparameters
        unknown = sorted(set(changes) - set(hp))
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameter(s) {unknown}; "
                             f"allowed: {sorted(hp)}")
        new = self.builder(**{**hp, **changes})
        # The fallback keeps its ratio to lr (so its lr follows an lr change).
        return replace(new, fallback=self.fallback, routing=self.routing,
                       fallback_lr_ratio=self.fallback_lr_ratio)

    # -- routing ------------------------------------------------------------------------------
    def with_fallback(self, fallback: Spec | None, *, lr_ratio: float | None = None) -> Spec:
        """A copy with another fallback spec. Its lr becomes a ratio of this spec's lr
        (``fallback.lr / lr``) unless ``lr_ratio`` states one; the fallback then runs at
        ``lr_ratio × lr`` — under group overrides, schedulers and scripts that write
        ``group["lr"]`` alike."""
        return replace(self, fallback=fallback, fallback_lr_ratio=lr_ratio)

    def with_routing(self, routing: Routing | None = None, **kwargs: Any) -> Spec:
        """A copy with new routing: a :class:`Routing`, or its fields as keywords."""
        if routing is not None and kwargs:
            raise ValueError("pass either a Routing or its fields as keywords, not both")
        return replace(self, routing=routing if routing is not None else Routing(**kwargs))

    def route(self, name: str, shape: tuple[int, ...]) -> Literal["rule", "fallback"]:
        """Where the parameter ``name`` of ``shape`` goes."""
        if self.routing is None or not self.routing.to_fallback(name, shape):
            if self.rule.needs_matrix and len(shape) < 2:
                raise ValueError(f"{self.name}: parameter {name!r} of shape {tuple(shape)} has fewer "
                                 "than 2 dims but routing sends it to a matrix rule")
            return "rule"
        if self.fallback is None:
            raise ValueError(f"{self.name}: parameter {name!r} of shape {tuple(shape)} is routed to "
                             "the fallback but the spec has none; pass fallback=deepopt.adamw(...)")
        return "fallback"


def matrix_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """docs/math.md §0 torch layout: ``(out, in, *rest)`` → ``m = out``, ``n = in · prod(rest)``."""
    if len(shape) < 2:
        raise ValueError(f"a matrix view needs at least 2 dims, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


def freeze_hparams(hparams: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(hparams.items())
