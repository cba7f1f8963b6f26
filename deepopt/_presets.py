"""Named optimizers: presets of the linear-memory rule, not kernels.

Each constructor validates its arguments, records them as the spec's flat hyperparameters and
builds the :class:`~deepopt.UpdateRule` they describe. ``Spec.replace`` calls the constructor
again, so parameter-group overrides are validated the same way.
"""

from __future__ import annotations

import functools
from typing import Any

from deepopt import _coefficients
from deepopt._denominator import SecondMoment
from deepopt._memory import DeepMemory, LinearMemory, MultiScaleMemory
from deepopt._readout import COMPUTE_DTYPES, Identity, NewtonSchulz, Sign, newton_schulz
from deepopt._spec import Routing, Spec, UpdateRule, freeze_hparams
from deepopt._validate import check_bool, check_choice, check_int, check_real
from deepopt._values import AdamValues, IdentityValues

_ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "none")

#: The default fallback (AdamW on what a matrix rule does not take) runs at this fraction of
#: the rule's lr; see ``benchmarks/fallback_ratio.py`` for the measurement behind it.
DEFAULT_FALLBACK_LR_RATIO = 0.3

# torch.optim's execution flags: not part of the math, so a spec does not hold them.
_TORCH_FLAG_DEFAULTS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}


def _refuse_torch_flags(name: str, **flags: Any) -> None:
    for flag, value in flags.items():
        if value != _TORCH_FLAG_DEFAULTS[flag]:
            raise ValueError(f"deepopt.{name}({flag}={value!r}): {flag} is an execution flag of "
                             "torch.optim, not part of the update rule; pass it to "
                             f"torch_backend.compile(spec, params, {flag}={value!r})")


def _betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2)")
    b1 = check_real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    b2 = check_real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return b1, b2


def _shape_scale(adjust_lr_fn: str | None) -> str:
    check_choice("adjust_lr_fn", adjust_lr_fn, _ADJUST_LR_FNS)
    return "original" if adjust_lr_fn is None else adjust_lr_fn


def _ns_readout(ns_coefficients: Any, ns_steps: int, eps: float, normalization: str,
                dtype: str) -> NewtonSchulz:
    check_int("ns_steps", ns_steps, low=1, high=99)
    check_choice("ns_dtype", dtype, COMPUTE_DTYPES)
    if isinstance(ns_coefficients, str):
        check_choice("ns_coefficients", ns_coefficients, tuple(_coefficients.PRESETS))
    return newton_schulz(ns_coefficients, ns_steps, eps=eps, normalization=normalization, dtype=dtype)


def _matrix_spec(name: str, rule: UpdateRule, hp: dict[str, Any], builder: Any, lr: float,
                 fallback: Spec | None, routing: Routing | None) -> Spec:
    """A spec whose rule takes matrix-view parameters (ndim ≥ 2 by default); the others go to
    ``fallback``, by default ``adamw(0.3·lr, weight_decay=0)``."""
    ratio = None if fallback is not None else DEFAULT_FALLBACK_LR_RATIO
    if fallback is None:
        fallback = adamw(lr=lr * DEFAULT_FALLBACK_LR_RATIO, weight_decay=0.0)
    return Spec(name, rule, freeze_hparams(hp), fallback=fallback,
                routing=routing if routing is not None else Routing(), builder=builder,
                fallback_lr_ratio=ratio)


# --------------------------------------------------------------------------------------------


def sgd(
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    undamped_first_step: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    differentiable: bool = False,
) -> Spec:
    r"""Stochastic gradient descent with heavy-ball momentum: a Hebbian linear memory.

    Symbols: γ = ``lr``, α = ``momentum`` (retention), η = 1 − ``dampening`` (inner rate),
    λ = ``weight_decay``; ``S`` is the momentum buffer.

    Initial state: ``S_0 = 0`` (no state at all when ``momentum = 0``).

    Update at step t (docs/math.md §2, NL eq. 46–49 with ζ = 0)::

        G ← G + λ W                 coupled L2 decay, as torch.optim.SGD
        S_t = α S_{t−1} + η G       one unit step on  −η⟨S, G⟩ + ((1−α)/2)‖S‖²   (NL eq. 46)
        D̃ = S_t  or  α S_t + η G    Nesterov read-out
        W ← W − γ D̃

    Args:
      lr: learning rate γ (parameter units per gradient unit).
      momentum: retention α in [0, 1].
      dampening: 1 − η; η = 1 is torch's heavy ball.
      nesterov: Nesterov read-out; needs ``momentum > 0`` and ``dampening = 0`` (as torch).
      weight_decay: λ ≥ 0, coupled (added to the gradient) unless ``decoupled_weight_decay``.
      maximize: ascend instead of descend.
      decoupled_weight_decay: apply λ as ``W ← W − γλW`` (docs/math.md §0) instead of as L2.
      undamped_first_step: torch's quirk — the first write uses η = 1 (its buffer starts as a
        copy of ``G_1``). Off by default (docs/math.md §2); set it to reproduce torch with dampening.
      foreach, fused, differentiable: torch.optim's execution flags, accepted at their defaults
        only (a spec holds the math); pass them to ``torch_backend.compile``.

    Example::

        spec = deepopt.sgd(lr=0.1, momentum=0.9, nesterov=True)
        opt = torch_backend.compile(spec, model.parameters())   # a torch.optim.Optimizer
        tx = jax_backend.compile(spec)                          # an optax.GradientTransformation

    Conventions: lr multiplies the whole step; the buffer starts at zero, which equals torch's
    ``buf = G_1`` when dampening is 0. Equals ``torch.optim.SGD`` and
    ``optax.chain(optax.add_decayed_weights(λ), optax.sgd(γ, α, nesterov))``.

    References: Polyak (1964); Sutskever et al. (2013); NL §4.
    """
    _refuse_torch_flags("sgd", foreach=foreach, fused=fused, differentiable=differentiable)
    lr = check_real("lr", lr, low=0.0)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    dampening = check_real("dampening", dampening, low=0.0, high=1.0)
    check_bool("nesterov", nesterov)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (nesterov=True "
                         "requires momentum > 0 and dampening = 0; got "
                         f"momentum={momentum}, dampening={dampening})")
    # Without momentum there is no buffer to damp: torch ignores dampening, and so do we.
    memory = LinearMemory(momentum=momentum, inner_lr=1.0 - dampening if momentum > 0 else 1.0,
                          nesterov=nesterov,
                          undamped_first_write=check_bool("undamped_first_step", undamped_first_step))
    rule = UpdateRule(memory=memory, maximize=check_bool("maximize", maximize),
                      decoupled_weight_decay=check_bool("decoupled_weight_decay", decoupled_weight_decay))
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
              weight_decay=weight_decay, maximize=maximize,
              decoupled_weight_decay=decoupled_weight_decay, undamped_first_step=undamped_first_step)
    return Spec("sgd", rule, freeze_hparams(hp), builder=sgd)


def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    nesterov: bool = False,
    maximize: bool = False,
    amsgrad: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
) -> Spec:
    r"""AdamW: an EMA memory read with bias correction, divided by Adam's second moment.

    Symbols: γ = ``lr``, β₁ = α (retention of the first-moment memory), η = 1 − β₁,
    β₂, ε = ``eps``, λ = ``weight_decay``; ``S`` first moment, ``v`` second moment.

    Initial state: ``S_0 = 0``, ``v_0 = 0``.

    Update at step t (NL App. B: Adam is the optimal element-wise L2 memory)::

        S_t = β₁ S_{t−1} + (1 − β₁) G          EMA memory (docs/math.md §2, η = 1 − α)
        v_t = β₂ v_{t−1} + (1 − β₂) G²
        O   = (S_t / (1 − β₁ᵗ)) / (√(v_t / (1 − β₂ᵗ)) + ε)
        W ← W − γ λ W − γ O                    decoupled decay, unadjusted γ

    Args:
      lr: learning rate γ.
      betas: (β₁, β₂), each in [0, 1).
      eps: ε ≥ 0 added to the denominator.
      weight_decay: decoupled λ ≥ 0 (torch default 1e-2; optax's adamw defaults to 1e-4).
      nesterov: NAdam-style read-out ``β₁ S_t/(1−β₁ᵗ⁺¹) + (1−β₁) G/(1−β₁ᵗ)``
        (optax's ``adamw(nesterov=True)``, which ``optax.contrib.muon`` uses as its fallback).
      maximize: ascend instead of descend.
      amsgrad: only ``False`` (AMSGrad is not implemented).
      foreach, fused, capturable, differentiable: torch.optim's execution flags, accepted at
        their defaults only; pass them to ``torch_backend.compile``.

    Example::

        opt = torch_backend.compile(deepopt.adamw(lr=3e-4), model.parameters())

    Conventions: equals ``torch.optim.AdamW`` (amsgrad off) and ``optax.adamw``
    (eps_root = 0); the memory is element-wise, so every parameter shape is accepted.

    References: Kingma & Ba (2015); Loshchilov & Hutter (2019); Dozat (2016) for NAdam.
    """
    _refuse_torch_flags("adamw", foreach=foreach, fused=fused, capturable=capturable,
                        differentiable=differentiable)
    if amsgrad is not False:
        raise ValueError(f"deepopt.adamw(amsgrad={amsgrad!r}): AMSGrad is not implemented; "
                         "amsgrad=False (torch's default) is the only allowed value")
    lr = check_real("lr", lr, low=0.0)
    b1, b2 = _betas(betas)
    eps = check_real("eps", eps, low=0.0)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    memory = LinearMemory(momentum=b1, inner_lr=1.0 - b1, nesterov=check_bool("nesterov", nesterov),
                          bias_correction=True)
    rule = UpdateRule(memory=memory, denominator=SecondMoment(beta2=b2, eps=eps),
                      maximize=check_bool("maximize", maximize))
    hp = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, nesterov=nesterov,
              maximize=maximize)
    return Spec("adamw", rule, freeze_hparams(hp), builder=adamw)


def delta_momentum(
    lr: float,
    momentum: float = 0.9,
    zeta: float | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    readout: str = "identity",
    *,
    ns_coefficients: Any = "muon",
    ns_steps: int = 5,
    eps: float = 1e-7,
    adjust_lr_fn: str | None = None,
    decoupled_weight_decay: bool = False,
    fallback: Spec | None = None,
    routing: Routing | None = None,
) -> Spec:
    r"""Delta momentum: a linear memory trained by L2 regression instead of a dot product.

    Symbols: γ = ``lr``, α = ``momentum``, ζ = ``zeta`` (delta strength), η = 1,
    λ = ``weight_decay``; ``S`` the momentum memory, ``K = G / ‖G‖_F`` the key.

    Initial state: ``S_0 = 0``.

    Update at step t (docs/math.md §2; NL eq. 48–49, "Delta Momentum")::

        G ← G + λ W                              coupled L2 decay (as sgd)
        K  = G / max(‖G‖_F, 1e-12)
        S_t = S_{t−1} (α I − ζ KᵀK) + G          one unit step on
                                                 −⟨S, G⟩ + (ζ/2)‖S Kᵀ‖² + ((1−α)/2)‖S‖²
        D̃ = S_t  or  α S_t + G                   Nesterov read-out
        W ← W − γ s(W) σ(D̃)

    Before adding the new gradient the memory forgets what it stored along the gradient's row
    space. NL prints the factor as ``(α − GᵀG)`` with the raw gradient; deepopt normalises the
    key so the factor's eigenvalues lie in ``[α − ζ, α]``, stable for ``0 ≤ ζ ≤ 1 + α``.

    Args:
      lr: learning rate γ.
      momentum: retention α in [0, 1].
      zeta: ζ in [0, 1 + α]; None means ζ = α, which erases the current direction fully when
        the gradient is rank one. ``zeta=0`` is exactly ``sgd(lr, momentum)``.
      nesterov: Nesterov read-out ``α S_t + G``.
      weight_decay: λ ≥ 0 (coupled unless ``decoupled_weight_decay``).
      readout: σ: ``"identity"``, ``"sign"`` or ``"newton_schulz"`` (a "delta Muon").
      ns_coefficients, ns_steps, eps: Newton–Schulz settings when ``readout="newton_schulz"``.
      adjust_lr_fn: shape scale s(W) for Newton–Schulz read-outs (as ``muon``); 1 otherwise.
      fallback, routing: with ``readout="newton_schulz"``, parameters with fewer than 2 dims go
        to ``fallback`` (default ``adamw(0.3·lr, weight_decay=0)``). With an element-wise read-out
        every parameter takes this rule, and 1-D ones use its recurrence with ζ = 0 (docs/math.md §2),
        so ``delta_momentum(zeta=0)`` is ``sgd`` on every parameter.

    Example::

        spec = deepopt.delta_momentum(lr=0.05, momentum=0.9, zeta=0.5)

    Conventions: the matrix view of a torch ``(out, in, *rest)`` parameter is
    ``out × (in·prod(rest))`` (docs/math.md §0); the product ``S KᵀK`` is taken on the smaller side.

    References: NL §4 eq. 48–49.
    """
    lr = check_real("lr", lr, low=0.0)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    z = momentum if zeta is None else check_real("zeta", zeta, low=0.0, high=1.0 + momentum)
    check_choice("readout", readout, ("identity", "sign", "newton_schulz"))
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    eps = check_real("eps", eps, low=0.0)
    memory = LinearMemory(momentum=momentum, inner_lr=1.0, zeta=z, nesterov=check_bool("nesterov", nesterov))
    sigma, scale = _readout(readout, ns_coefficients, ns_steps, eps, adjust_lr_fn)
    rule = UpdateRule(memory=memory, readout=sigma, shape_scale=scale,
                      decoupled_weight_decay=check_bool("decoupled_weight_decay", decoupled_weight_decay))
    hp = dict(lr=lr, momentum=momentum, zeta=zeta, nesterov=nesterov, weight_decay=weight_decay,
              readout=readout, ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps,
              adjust_lr_fn=adjust_lr_fn, decoupled_weight_decay=decoupled_weight_decay)
    if rule.needs_matrix or routing is not None:         # Newton–Schulz: 1-D goes to the fallback
        return _matrix_spec("delta_momentum", rule, hp, delta_momentum, lr, fallback, routing)
    return Spec("delta_momentum", rule, freeze_hparams(hp), fallback=fallback, builder=delta_momentum)


def muon(
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: Any = _coefficients.MUON[0],
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    *,
    ns_normalization: str = "clamp",
    ns_dtype: str = "bfloat16",
    bias_correction: bool = False,
    fallback: Spec | None = None,
    routing: Routing | None = None,
) -> Spec:
    r"""Muon: an EMA linear memory, Nesterov read-out, Newton–Schulz read-out map.

    Symbols: γ = ``lr``, α = ``momentum``, η = 1 − α, λ = ``weight_decay``,
    (a, b, c) = ``ns_coefficients``, k = ``ns_steps``; ``S`` the momentum memory.

    Initial state: ``S_0 = 0``.

    Update at step t (docs/math.md §4; NL eq. 52 plus the outer rate and shape scale it omits)::

        S_t = α S_{t−1} + (1 − α) G              EMA memory (docs/math.md §2, ζ = 0)
        D̃  = α S_t + (1 − α) G                   Nesterov read-out (torch: g.lerp(buf, α))
        O   = NS_k^{(a,b,c)}(D̃)                  Newton–Schulz on the matrix view (NL eq. 44)
        W ← W − γ λ W − γ s(W) O                 s = √max(1, m/n) ("original")

    Args (names and defaults as ``torch.optim.Muon``):
      lr: learning rate γ.
      weight_decay: decoupled λ, applied with the unadjusted γ.
      momentum: α in [0, 1].
      nesterov: Nesterov read-out.
      ns_coefficients: an (a, b, c) triple, a per-step table, or a preset name
        (``"muon"``, ``"polar_express"``, ``"cubic"``).
      eps: Newton–Schulz normaliser guard.
      ns_steps: Newton–Schulz iterations k (1–99).
      adjust_lr_fn: shape scale: None/``"original"`` √max(1, m/n), ``"match_rms_adamw"``
        0.2·√max(m, n), ``"none"`` 1.
      ns_normalization: ``"clamp"`` X/max(‖X‖, ε) (torch) or ``"add"`` X/(‖X‖ + ε) (optax).
      ns_dtype: Newton–Schulz compute dtype: ``"bfloat16"`` (torch) or ``"input"`` (optax),
        ``"float32"``, ``"float64"``.
      bias_correction: optax's bias-corrected (NAdam-form) read-out.
      fallback: element-wise spec for the rest (default ``adamw(0.3·lr, weight_decay=0)``).
      routing: which parameters take Muon (default: ndim ≥ 2; add name patterns for
        embeddings and output heads).

    Example::

        spec = deepopt.muon(lr=0.02, routing=deepopt.Routing(fallback_patterns=("embed", "head")))
        opt = torch_backend.compile(spec, model.named_parameters())

    Conventions. Defaults reproduce ``torch.optim.Muon`` (2-D parameters) exactly, including
    bf16 Newton–Schulz. ``optax.contrib.muon(lr, eps=ε, weight_decay=λ)`` is reproduced by
    ``ns_normalization="add", ns_dtype="input", bias_correction=True, eps=ε`` and a fallback of
    ``adamw(lr, eps=ε, weight_decay=0, nesterov=True)`` (optax's fallback inherits Nesterov).
    Because Newton–Schulz normalises first, the buffer's scale (sum vs EMA, bias correction)
    changes σ's output only through ε.

    References: Jordan et al. (2024), https://kellerjordan.github.io/posts/muon/;
    Liu et al., "Muon is Scalable for LLM Training" (2025); NL eq. 44, 52.
    """
    lr = check_real("lr", lr, low=0.0)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    check_bool("nesterov", nesterov)
    eps = check_real("eps", eps, low=0.0)
    check_choice("ns_normalization", ns_normalization, ("clamp", "add"))
    check_bool("bias_correction", bias_correction)
    if bias_correction and momentum >= 1.0:
        raise ValueError("bias_correction=True needs momentum < 1")
    memory = LinearMemory(momentum=momentum, inner_lr=1.0 - momentum, nesterov=nesterov,
                          bias_correction=bias_correction)
    sigma = _ns_readout(ns_coefficients, ns_steps, eps, ns_normalization, ns_dtype)
    rule = UpdateRule(memory=memory, readout=sigma, shape_scale=_shape_scale(adjust_lr_fn))
    hp = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
              ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
              adjust_lr_fn=adjust_lr_fn, ns_normalization=ns_normalization, ns_dtype=ns_dtype,
              bias_correction=bias_correction)
    return _matrix_spec("muon", rule, hp, muon, lr, fallback, routing)


def _readout(readout: str | None, ns_coefficients: Any, ns_steps: int, eps: float,
             adjust_lr_fn: str | None, ns_dtype: str = "input") -> tuple[Any, str]:
    """σ and s(W) for presets that take ``readout=None|"identity"|"sign"|"newton_schulz"``."""
    check_choice("readout", readout, (None, "identity", "sign", "newton_schulz"))
    ns = _ns_readout(ns_coefficients, ns_steps, eps, "clamp", ns_dtype)   # validated even if unused
    scale = _shape_scale(adjust_lr_fn)
    if readout == "newton_schulz":
        return ns, scale
    return (Sign() if readout == "sign" else Identity()), "none"


def dmgd(
    lr: float = 0.02,
    momentum: float = 1.0,
    inner_lr: float = 0.1,
    hidden: int = 16,
    objective: str = "l2",
    keys: str = "current",
    values: str = "identity",
    readout: str | None = "newton_schulz",
    nesterov: bool = False,
    weight_decay: float = 0.0,
    seed: int = 0,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    ns_coefficients: Any = "muon",
    ns_steps: int = 5,
    ns_dtype: str = "bfloat16",
    adjust_lr_fn: str | None = None,
    fallback: Spec | None = None,
    routing: Routing | None = None,
) -> Spec:
    r"""Deep Momentum Gradient Descent: the momentum is an MLP memory trained online.

    Symbols: γ = ``lr``, α = ``momentum`` (retention of S and W₂), η = ``inner_lr``,
    h = ``hidden``, λ = ``weight_decay``. Memory ``M_φ(q) = S + ν W₂ σ(W₁ q)`` per row q of the
    parameter's matrix view (``S``: m×n, ``W₁``: h×n, ``W₂``: n×h shared by the rows; σ = SiLU;
    ν the value scale, so the MLP reads in units of the gradient's size).

    Initial state: ``S = 0``, ``W₂ = 0`` (starts as plain momentum), ``ν = 0``, ``W₁ ~ N(0, 1)``
    seeded by ``seed`` and the parameter's name — identical on torch and JAX.

    Update at step t (docs/math.md §5; NL eq. 50 gives only ``W ← W + m(u)``, ``m ← αm − η∇ℓ(m; u)``)::

        Ĝ = G with each row divided by its norm;  K = Q = Ĝ  (keys="previous": K = Ĝ_{t−1})
        V = P(G)                                              values: identity or adam
        ν = max(β ν, ‖V‖_F/√m)                               β = |α − η| (l2), α (dot)
        H = σ(K W₁ᵀ), F = ν H W₂ᵀ
        E = −η V  (dot)   or   η (S + F − V)  (l2)            ∂ℓ/∂M(k_r), row by row
        S ← α S − E ;  Ê = E / ν                              θ trains on unit-scale errors
        W₂ ← α W₂ − ρ₂ Êᵀ H / m                               ρ₂ = 1/(1 + η‖H‖²/m)
        W₁ ←   W₁ − ρ₁ [(Ê W₂) ⊙ σ'(K W₁ᵀ)]ᵀ K / m           ρ₁ = 1/(1 + 1.21 η‖W₂‖²)
        D = S + ν σ(Q W₁ᵀ) W₂ᵀ ;  D̃ = D  or  α D + η V        read at φ_t (Nesterov)
        W ← W − γ λ W − γ s(W) σ_out(D̃)                       decoupled decay

    Scale: the update is exactly homogeneous in the gradient — degree 1 (like SGD momentum:
    the lr depends on the gradient's scale) with identity values and read-out, degree 0 (like
    Adam / Muon: the lr transfers) with ``values="adam"`` or a ``"sign"`` / ``"newton_schulz"``
    read-out — and finite for gradients of any scale (``deepopt.testing.assert_scale_stable``).
    ``torch_backend.memory_stats`` / ``jax_backend.memory_stats`` show what the MLP contributes.

    Args:
      lr: learning rate γ.
      momentum: retention α in [0, 1] of S and W₂ (1: no retention loss; W₁ is not decayed).
      inner_lr: η ≥ 0; with ``objective="l2"`` at most 1 + α.
      hidden: MLP width h ≥ 0; 0 means no MLP (a linear memory).
      objective: ``"l2"`` (regression: the memory forgets what it mispredicts; with
        h = 0, α = 1 it is the EMA ``(1 − η)S + ηV``) or ``"dot"`` (Hebbian; h = 0 is heavy ball).
      keys: ``"current"`` or ``"previous"`` (predict this gradient from the last one).
      values: ``"identity"`` or ``"adam"`` (RMS-normalised gradient, β₂ = ``betas[1]``).
      readout: σ_out: None/``"identity"``, ``"sign"`` or ``"newton_schulz"`` (a "deep Muon").
      nesterov: Nesterov read-out.
      weight_decay: decoupled λ.
      seed: seeds W₁'s initialisation.
      betas, eps: β₂ and ε of adam values (β₁ unused; kept for AdamW-shaped configs).
      ns_coefficients, ns_steps, ns_dtype, adjust_lr_fn: Newton–Schulz read-out settings, as
        ``muon``: bf16 by default, like ``muon``, ``m3`` and ``torch.optim.Muon`` (on an H200 a
        GPT-2-small DMGD step with a float32 read-out took 44 ms against muon's 6.4 ms, its
        memory alone 6.1 ms);
        ``ns_dtype="input"`` runs it in the parameters' dtype, the exact algorithm.
      fallback, routing: as ``muon`` (DMGD takes parameters with ndim ≥ 2).

    Example::

        opt = torch_backend.compile(deepopt.dmgd(lr=0.01), model.named_parameters())

    Defaults (``lr=0.02``, ``readout="newton_schulz"``, α = 1, η = 0.1, h = 16, l2, current
    keys: a "deep Muon") come from ``benchmarks/dmgd_defaults.py`` and
    ``benchmarks/convergence.py`` (quick CPU budgets, 3 seeds, lr swept per setting; results in
    ``benchmarks/README.md``). The update is homogeneous of degree 0 in the gradient scale, so
    the lr transfers like Muon's. On the Transformer tasks it beat Muon and AdamW (byte-level
    LM 2.35 vs 2.48 and 2.57, clearly; MQAR 2.72 vs 2.77 on every seed, and 3.11), and the MLP
    is what did it (LM 2.51 without, clearly worse); with no argument it trains the README
    example and a small CNN better than ``muon()`` / ``adamw()`` do with theirs.
    ``inner_lr=0.3`` (S's EMA factor 0.7 instead of 0.9) was 1–2% lower still on LM and MQAR,
    but there the MLP's effect was within noise (``hidden=0`` did as well) and it changes the
    update far less; η = 0.1 is the setting in which the deep memory earns its cost. Newton–Schulz rules are poor on least
    squares (as Muon); use ``values="adam", readout=None`` there. Working lr per read-out (best
    lrs over four tasks): ``"newton_schulz"`` 0.01–0.1 (Muon's range); ``values="adam",
    readout=None`` 1e-3–3e-2 (Adam's range); identity values and read-out (``readout=None``)
    0.3–1 for unit-scale losses — degree 1, so it scales with 1/(gradient scale) like SGD
    momentum's lr; pass a ``fallback`` with an Adam-sized lr then (the default fallback's lr is
    tied to DMGD's). ``hidden=0`` removes the MLP. The default read-out adds Newton–Schulz's
    cost (as Muon) to the MLP's.

    Cost per step ≈ 12·m·n·h FLOPs; state m·n + 2·n·h floats per matrix.

    References: NL §4 eq. 50 (DMGD), §3 (associative memory view).
    """
    lr = check_real("lr", lr, low=0.0)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    check_choice("values", values, ("identity", "adam"))
    _, b2 = _betas(betas)
    eps = check_real("eps", eps, low=0.0)
    memory = DeepMemory(momentum=check_real("momentum", momentum, low=0.0, high=1.0),
                        inner_lr=inner_lr, hidden=hidden, objective=objective, keys=keys,
                        nesterov=nesterov, seed=seed)
    sigma, scale = _readout(readout, ns_coefficients, ns_steps, 1e-7, adjust_lr_fn, ns_dtype)
    rule = UpdateRule(memory=memory, values=AdamValues(b2, eps) if values == "adam" else IdentityValues(),
                      readout=sigma, shape_scale=scale)
    hp = dict(lr=lr, momentum=momentum, inner_lr=inner_lr, hidden=hidden, objective=objective,
              keys=keys, values=values, readout=readout, nesterov=nesterov,
              weight_decay=weight_decay, seed=seed, betas=tuple(betas), eps=eps,
              ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype,
              adjust_lr_fn=adjust_lr_fn)
    return _matrix_spec("dmgd", rule, hp, dmgd, lr, fallback, routing)


def m3(
    lr: float = 1e-3,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
    slow_weight: float = 1.0,
    frequency: int = 10,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ns_steps: int = 5,
    ns_coefficients: Any = "muon",
    *,
    decay: bool = False,
    slow_decay: bool = False,
    adjust_lr_fn: str = "none",
    ns_dtype: str = "bfloat16",
    fallback: Spec | None = None,
    routing: Routing | None = None,
) -> Spec:
    r"""Multi-scale momentum (M3): a fast and a slow momentum level, both orthogonalised.

    Symbols: γ = ``lr``, (β₁, β₂, β₃) = ``betas``, w = ``slow_weight`` (the paper's α),
    f = ``frequency``, ε = ``eps``. ``M¹`` fast memory, ``M²`` slow memory, ``V`` second moment.

    Initial state: ``M¹ = M² = V = 0``; ``O² = 0`` until the first slow write.

    Update at step t (docs/math.md §6; NL §7.2 eq. 75, Algorithm 1 — the literal algorithm by default)::

        M¹_t = M¹_{t−1} + β₁ G          (decay=True:  β₁ M¹ + (1 − β₁) G)
        V_t  = V_{t−1} + β₂ G²          (decay=True:  β₂ V + (1 − β₂) G², bias-corrected)
        W ← W − γλW − γ s(W) (NS(M¹_t) + w O²) / (√V_t + ε)
        if t ≡ 0 (mod f):  M² ← M² + β₃ Σ_{last f steps} G     (slow_decay: β₃ M² + (1−β₃) Σ G)
                           O² ← NS(M²)   — used for the next f steps

    As printed, M¹ and V are running sums: √V grows like √t, so the literal M3 anneals its
    step like AdaGrad; ``decay=True`` turns both into EMAs (Adam-like). NS normalises, so the
    scale of M¹ and M² does not matter beyond ε.

    Args:
      lr: learning rate γ.
      betas: (β₁, β₂, β₃) in [0, 1].
      slow_weight: w ≥ 0, the slow level's weight.
      frequency: f ≥ 1, steps between slow writes.
      eps: ε of the denominator.
      weight_decay: decoupled λ.
      ns_steps, ns_coefficients: Newton–Schulz settings (both levels).
      decay, slow_decay: EMA variants, see above.
      adjust_lr_fn: shape scale s(W) (``"none"``: the paper has none).
      ns_dtype: Newton–Schulz compute dtype, as ``muon``: ``"bfloat16"`` by default, as
        ``deepopt.muon`` and ``torch.optim.Muon`` (so M3 costs about what Muon costs per step);
        ``"input"`` computes in the parameters' dtype (float64 parameters give the exact
        algorithm, as the reference).
      fallback, routing: as ``muon`` (M3 takes parameters with ndim ≥ 2).

    Example::

        opt = torch_backend.compile(deepopt.m3(lr=1e-3, frequency=16), model.named_parameters())

    References: NL §7.2, eq. 75, Algorithm 1.
    """
    lr = check_real("lr", lr, low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"betas={betas!r} is invalid: expected a triple (beta1, beta2, beta3)")
    b1, b2, b3 = (check_real(f"betas[{i}]", b, low=0.0, high=1.0) for i, b in enumerate(betas))
    check_bool("decay", decay)
    check_bool("slow_decay", slow_decay)
    if decay and (b1 >= 1.0 or b2 >= 1.0):
        raise ValueError(f"decay=True needs betas[0] < 1 and betas[1] < 1; got {betas!r}")
    fast = (LinearMemory(momentum=b1, inner_lr=1.0 - b1) if decay
            else LinearMemory(momentum=1.0, inner_lr=b1))
    memory = MultiScaleMemory(
        fast=fast, slow_inner_lr=(1.0 - b3) if slow_decay else b3,
        slow_momentum=b3 if slow_decay else 1.0,
        period=check_int("frequency", frequency, low=1),
        slow_weight=check_real("slow_weight", slow_weight, low=0.0))
    denominator = (SecondMoment(beta2=b2, eps=check_real("eps", eps, low=0.0), bias_correction=True)
                   if decay else SecondMoment(beta2=b2, eps=check_real("eps", eps, low=0.0),
                                              bias_correction=False, accumulate=True))
    rule = UpdateRule(memory=memory, readout=_ns_readout(ns_coefficients, ns_steps, 1e-7, "clamp", ns_dtype),
                      denominator=denominator, shape_scale=_shape_scale(adjust_lr_fn))
    hp = dict(lr=lr, betas=(b1, b2, b3), slow_weight=slow_weight, frequency=frequency, eps=eps,
              weight_decay=check_real("weight_decay", weight_decay, low=0.0), ns_steps=ns_steps,
              ns_coefficients=ns_coefficients, decay=decay, slow_decay=slow_decay,
              adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
    return _matrix_spec("m3", rule, hp, m3, lr, fallback, routing)


def custom(
    rule: UpdateRule,
    lr: float,
    weight_decay: float = 0.0,
    *,
    name: str = "custom",
    fallback: Spec | None = None,
    routing: Routing | None = None,
) -> Spec:
    """A spec from your own :class:`~deepopt.UpdateRule` (compose parts of docs/math.md §1–§4).

    Its hyperparameters are ``lr`` and ``weight_decay``; other settings live in ``rule``.
    A rule that needs the matrix view (Newton–Schulz, ζ > 0, a shape scale) gets the default
    routing (ndim ≥ 2) and an ``adamw(0.3·lr, weight_decay=0)`` fallback unless given others.

    Example::

        rule = deepopt.UpdateRule(
            memory=deepopt.LinearMemory(momentum=0.9, inner_lr=0.1, zeta=0.3),
            readout=deepopt.newton_schulz("polar_express", steps=5),
            shape_scale="original")
        spec = deepopt.custom(rule, lr=0.02)
    """
    if not isinstance(rule, UpdateRule):
        raise ValueError(f"rule={rule!r} is invalid: expected a deepopt.UpdateRule")
    lr = check_real("lr", lr, low=0.0)
    weight_decay = check_real("weight_decay", weight_decay, low=0.0)
    # A partial of a module-level function, not a closure, so that the spec pickles.
    builder = functools.partial(_custom_builder, rule, name=name, fallback=fallback, routing=routing)

    hp = dict(lr=lr, weight_decay=weight_decay)
    if rule.needs_matrix:
        return _matrix_spec(name, rule, hp, builder, lr, fallback, routing)
    return Spec(name, rule, freeze_hparams(hp), fallback=fallback, routing=routing, builder=builder)


def _custom_builder(rule: UpdateRule, lr: float, weight_decay: float, *, name: str,
                    fallback: Spec | None, routing: Routing | None) -> Spec:
    return custom(rule, lr, weight_decay, name=name, fallback=fallback, routing=routing)
