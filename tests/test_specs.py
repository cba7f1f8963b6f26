"""Specs are validated data: bad arguments, replace, routing, hashing, import hygiene."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import deepopt
from deepopt import Routing, adamw, custom, delta_momentum, muon, sgd

NAN = float("nan")

# (builder, kwargs, fragments the message must contain: the argument=value and the allowed range)
BAD_ARGUMENTS = [
    (sgd, dict(lr=-1.0), ["lr=-1.0", "[0, inf]"]),
    (sgd, dict(lr=NAN), ["lr=nan", "finite", "[0, inf]"]),
    (sgd, dict(lr="0.1"), ["lr='0.1'", "real number"]),
    (sgd, dict(lr=0.1, momentum=1.5), ["momentum=1.5", "[0, 1]"]),
    (sgd, dict(lr=0.1, momentum=-0.1), ["momentum=-0.1", "[0, 1]"]),
    (sgd, dict(lr=0.1, momentum=0.9, dampening=1.5), ["dampening=1.5", "[0, 1]"]),
    (sgd, dict(lr=0.1, nesterov="yes"), ["nesterov='yes'", "True or False"]),
    (sgd, dict(lr=0.1, nesterov=True), ["nesterov=True", "momentum > 0", "momentum=0.0"]),
    (sgd, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     ["nesterov=True", "dampening = 0", "dampening=0.1"]),
    (sgd, dict(lr=0.1, weight_decay=-0.1), ["weight_decay=-0.1", "[0, inf]"]),
    (sgd, dict(lr=0.1, maximize=1), ["maximize=1", "True or False"]),
    (sgd, dict(lr=0.1, decoupled_weight_decay=None), ["decoupled_weight_decay=None", "True or False"]),
    (sgd, dict(lr=0.1, undamped_first_step="no"), ["undamped_first_step='no'", "True or False"]),
    (adamw, dict(lr=-1.0), ["lr=-1.0", "[0, inf]"]),
    (adamw, dict(betas=(1.0, 0.999)), ["betas[0]=1.0", "[0, 1)"]),
    (adamw, dict(betas=(0.9, 1.0)), ["betas[1]=1.0", "[0, 1)"]),
    (adamw, dict(betas=(0.9, -0.5)), ["betas[1]=-0.5", "[0, 1)"]),
    (adamw, dict(betas=(0.9,)), ["betas=(0.9,)", "pair"]),
    (adamw, dict(betas=0.9), ["betas=0.9", "pair"]),
    (adamw, dict(eps=-1e-8), ["eps=-1e-08", "[0, inf]"]),
    (adamw, dict(weight_decay=-1.0), ["weight_decay=-1.0", "[0, inf]"]),
    (adamw, dict(nesterov=0), ["nesterov=0", "True or False"]),
    (adamw, dict(maximize="x"), ["maximize='x'", "True or False"]),
    (delta_momentum, dict(lr=-1.0), ["lr=-1.0", "[0, inf]"]),
    (delta_momentum, dict(lr=0.1, momentum=1.1), ["momentum=1.1", "[0, 1]"]),
    (delta_momentum, dict(lr=0.1, zeta=-0.1), ["zeta=-0.1", "[0, 1.9]"]),
    (delta_momentum, dict(lr=0.1, momentum=0.5, zeta=1.6), ["zeta=1.6", "[0, 1.5]"]),
    (delta_momentum, dict(lr=0.1, nesterov="x"), ["nesterov='x'", "True or False"]),
    (delta_momentum, dict(lr=0.1, weight_decay=-1.0), ["weight_decay=-1.0", "[0, inf]"]),
    (delta_momentum, dict(lr=0.1, readout="svd"), ["readout='svd'", "'identity', 'sign', 'newton_schulz'"]),
    (delta_momentum, dict(lr=0.1, readout="newton_schulz", ns_coefficients="foo"),
     ["ns_coefficients='foo'", "'muon', 'polar_express', 'cubic'"]),
    (delta_momentum, dict(lr=0.1, readout="newton_schulz", ns_steps=0), ["ns_steps=0", "[1, 99]"]),
    (delta_momentum, dict(lr=0.1, readout="newton_schulz", ns_steps=100), ["ns_steps=100", "[1, 99]"]),
    (delta_momentum, dict(lr=0.1, readout="newton_schulz", ns_steps=2.5), ["ns_steps=2.5", "integer"]),
    (delta_momentum, dict(lr=0.1, eps=-1.0), ["eps=-1.0", "[0, inf]"]),
    (delta_momentum, dict(lr=0.1, adjust_lr_fn="foo"),
     ["adjust_lr_fn='foo'", "None, 'original', 'match_rms_adamw', 'none'"]),
    (delta_momentum, dict(lr=0.1, decoupled_weight_decay="x"), ["decoupled_weight_decay='x'", "True or False"]),
    (delta_momentum, dict(lr=0.1, fallback=muon()), ["fallback='muon'", "element-wise"]),
    (delta_momentum, dict(lr=0.1, fallback="adamw"), ["fallback='adamw'", "Spec or None"]),
    (delta_momentum, dict(lr=0.1, routing="x"), ["routing='x'", "Routing or None"]),
    (muon, dict(lr=-1.0), ["lr=-1.0", "[0, inf]"]),
    (muon, dict(weight_decay=-1.0), ["weight_decay=-1.0", "[0, inf]"]),
    (muon, dict(momentum=2.0), ["momentum=2.0", "[0, 1]"]),
    (muon, dict(nesterov="x"), ["nesterov='x'", "True or False"]),
    (muon, dict(ns_coefficients="foo"), ["ns_coefficients='foo'", "'muon', 'polar_express', 'cubic'"]),
    (muon, dict(ns_coefficients=()), ["coefficients=()", "(a, b, c) triples"]),
    (muon, dict(eps=-1.0), ["eps=-1.0", "[0, inf]"]),
    (muon, dict(eps=float("inf")), ["eps=inf", "finite"]),
    (muon, dict(ns_steps=0), ["ns_steps=0", "[1, 99]"]),
    (muon, dict(ns_steps=100), ["ns_steps=100", "[1, 99]"]),
    (muon, dict(ns_steps=True), ["ns_steps=True", "integer"]),
    (muon, dict(adjust_lr_fn="foo"), ["adjust_lr_fn='foo'", "'original', 'match_rms_adamw'"]),
    (muon, dict(ns_normalization="foo"), ["ns_normalization='foo'", "'clamp', 'add'"]),
    (muon, dict(ns_dtype="float16"), ["ns_dtype='float16'", "'input', 'bfloat16', 'float32', 'float64'"]),
    (muon, dict(bias_correction="x"), ["bias_correction='x'", "True or False"]),
    (muon, dict(bias_correction=True, momentum=1.0), ["bias_correction=True", "momentum < 1"]),
    (muon, dict(fallback=muon()), ["fallback='muon'", "element-wise"]),
    (muon, dict(routing=3), ["routing=3", "Routing or None"]),
]


def _id(case):
    builder, kwargs, _ = case
    return f"{builder.__name__}-" + "-".join(f"{k}={v!r}"[:30] for k, v in kwargs.items())


@pytest.mark.parametrize("builder,kwargs,fragments", BAD_ARGUMENTS, ids=[_id(c) for c in BAD_ARGUMENTS])
def test_bad_arguments_name_argument_value_and_range(builder, kwargs, fragments):
    with pytest.raises(ValueError, match=re.escape(fragments[0])) as info:
        builder(**kwargs)
    for fragment in fragments[1:]:
        assert fragment in str(info.value), (fragment, str(info.value))


# Former gaps found by this suite (fixed): non-iterable and malformed coefficient tables, and
# ns_* arguments of a preset whose read-out does not use them.
FORMER_GAPS = [
    pytest.param(muon, dict(ns_coefficients=5), "ns_coefficients=5"),
    pytest.param(muon, dict(ns_coefficients=((1.0, 2.0),)), "ns_coefficients=((1.0, 2.0),)"),
    pytest.param(delta_momentum, dict(lr=0.1, ns_steps=0), "ns_steps=0"),
]


@pytest.mark.parametrize("builder,kwargs,fragment", FORMER_GAPS)
def test_bad_arguments_known_gaps(builder, kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        builder(**kwargs)


def test_parts_validate_too():
    with pytest.raises(ValueError, match=re.escape("zeta=2.0 is out of range: allowed [0, 1.5]")):
        deepopt.LinearMemory(momentum=0.5, zeta=2.0)
    with pytest.raises(ValueError, match=re.escape("beta2=1.0 is out of range: allowed [0, 1)")):
        deepopt.AdamValues(beta2=1.0)
    with pytest.raises(ValueError, match=re.escape("steps=-1 is out of range")):
        deepopt.NewtonSchulz(steps=-1)
    with pytest.raises(ValueError, match=re.escape("shape_scale='big'")):
        deepopt.UpdateRule(shape_scale="big")
    with pytest.raises(ValueError, match="memory="):
        deepopt.UpdateRule(memory="heavy ball")
    with pytest.raises(ValueError, match="rule="):
        custom("not a rule", lr=0.1)


# ============================================================================================
# Spec.replace
# ============================================================================================


@pytest.mark.parametrize("spec,changes,fragment", [
    (muon(), dict(lr=-1.0), "lr=-1.0"),
    (muon(), dict(momentum=1.5), "momentum=1.5"),
    (adamw(), dict(betas=(0.9, 1.0)), "betas[1]=1.0"),
    (sgd(0.1, 0.9, nesterov=True), dict(momentum=0.0), "nesterov=True requires momentum > 0"),
    (delta_momentum(0.1, 0.5), dict(zeta=1.6), "zeta=1.6"),
])
def test_replace_revalidates(spec, changes, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        spec.replace(**changes)


@pytest.mark.parametrize("spec", [sgd(0.1), adamw(), delta_momentum(0.1), muon(),
                                  custom(deepopt.UpdateRule(), lr=0.1)])
def test_replace_rejects_unknown_keys(spec):
    with pytest.raises(ValueError, match=re.escape("unknown hyperparameter(s) ['learning_rate']")) as info:
        spec.replace(learning_rate=0.1)
    assert "allowed" in str(info.value) and "'lr'" in str(info.value)


def test_replace_rebuilds_rule_and_keeps_routing():
    routing = Routing(fallback_patterns=("embed",))
    fallback = sgd(0.01, 0.9)
    spec = muon(lr=0.02, momentum=0.9, fallback=fallback, routing=routing)
    new = spec.replace(momentum=0.5, lr=0.1)
    assert new.rule.memory.momentum == 0.5 and new.rule.memory.inner_lr == pytest.approx(0.5)
    assert new.lr == 0.1 and new.hyperparameters["momentum"] == 0.5
    # The fallback keeps its lr as a ratio of the spec's (0.01 / 0.02): 0.1 → 0.05.
    assert new.fallback == fallback.replace(lr=0.05) and new.routing == routing
    assert new.fallback_lr_ratio == spec.fallback_lr_ratio == 0.5
    assert spec.replace() is spec
    assert spec.replace(momentum=0.9, lr=0.02) == spec
    assert custom(deepopt.UpdateRule(), lr=0.1).replace(lr=0.2).lr == 0.2


def test_hyperparameters_are_a_fresh_dict():
    spec = sgd(0.1, 0.9)
    spec.hyperparameters["lr"] = 5.0
    assert spec.lr == 0.1


# ============================================================================================
# Routing
# ============================================================================================

PARAMS = {"embed.weight": (100, 16), "blocks.0.attn.weight": (16, 16), "blocks.0.norm.weight": (16,),
          "blocks.0.conv.weight": (8, 4, 3), "head.weight": (10, 16), "head.bias": (10,)}


@pytest.mark.parametrize("routing,expected_fallback", [
    (Routing(), {"blocks.0.norm.weight", "head.bias"}),
    (Routing(min_ndim=3), {"embed.weight", "blocks.0.attn.weight", "blocks.0.norm.weight",
                           "head.weight", "head.bias"}),
    (Routing(fallback_patterns=("embed", r"^head\.")), {"embed.weight", "blocks.0.norm.weight",
                                                        "head.weight", "head.bias"}),
    (Routing(fallback_patterns="attn"), {"blocks.0.attn.weight", "blocks.0.norm.weight", "head.bias"}),
    (Routing(fallback_if=lambda name, shape: shape[0] >= 100), {"embed.weight", "blocks.0.norm.weight",
                                                                "head.bias"}),
    (Routing(min_ndim=0, fallback_if=lambda name, shape: len(shape) == 3), {"blocks.0.conv.weight"}),
])
@pytest.mark.parametrize("builder", [muon, lambda **kw: delta_momentum(0.1, **kw)])
def test_routing_assignment(routing, expected_fallback, builder):
    spec = builder(routing=routing)
    if routing.min_ndim < 2:           # 1-D params reach the matrix rule only to be refused
        names = {n for n, s in PARAMS.items() if len(s) >= 2}
    else:
        names = set(PARAMS)
    got = {n for n in names if spec.route(n, PARAMS[n]) == "fallback"}
    assert got == expected_fallback & names
    assert {n for n in names if spec.route(n, PARAMS[n]) == "rule"} == names - expected_fallback


def test_routing_refuses_vectors_for_matrix_rules():
    spec = muon(routing=Routing(min_ndim=0))
    with pytest.raises(ValueError, match=re.escape("'head.bias' of shape (10,) has fewer than 2 dims")):
        spec.route("head.bias", (10,))


def test_routing_without_fallback_errors_naming_the_parameter():
    spec = custom(deepopt.UpdateRule(), lr=0.1, routing=Routing(fallback_patterns=("embed",)))
    assert spec.fallback is None
    assert spec.route("blocks.0.weight", (4, 4)) == "rule"
    with pytest.raises(ValueError, match=re.escape("'embed.weight' of shape (100, 16) is routed to the "
                                                   "fallback but the spec has none")):
        spec.route("embed.weight", (100, 16))


def test_default_routing_and_fallback_of_matrix_presets():
    for spec in (muon(lr=0.02), delta_momentum(0.02, readout="newton_schulz"),
                 delta_momentum(0.02, routing=Routing(fallback_patterns=("embed",)))):
        # The default fallback runs AdamW at a stated ratio of the rule's lr.
        assert spec.routing is not None and spec.fallback == adamw(lr=0.02 * 0.3, weight_decay=0.0)
        assert spec.fallback_lr_ratio == 0.3
    assert muon(lr=0.02).routing == Routing()
    # Delta momentum with an element-wise read-out takes every parameter: 1-D ones use its
    # recurrence with ζ = 0 (docs/math.md §2).
    for spec in (sgd(0.1), adamw(), delta_momentum(0.02), delta_momentum(0.02, readout="sign")):
        assert spec.routing is None and spec.fallback is None
        assert spec.route("x", (3,)) == "rule" and spec.route("x", (3, 4, 5)) == "rule"


def test_routing_validation():
    with pytest.raises(ValueError, match=re.escape("'(' is not a valid regular expression")):
        Routing(fallback_patterns=("(",))
    with pytest.raises(ValueError, match=re.escape("fallback_patterns entry 3")):
        Routing(fallback_patterns=(3,))
    with pytest.raises(ValueError, match="fallback_if="):
        Routing(fallback_if="embed")
    with pytest.raises(ValueError, match=re.escape("min_ndim=-1 is out of range")):
        Routing(min_ndim=-1)
    with pytest.raises(ValueError, match="either a Routing or its fields"):
        muon().with_routing(Routing(), min_ndim=3)
    assert muon().with_routing(min_ndim=3).routing == Routing(min_ndim=3)


def test_matrix_view_shape():
    assert deepopt.matrix_view_shape((8, 4, 3, 3)) == (8, 36)
    assert deepopt.matrix_view_shape((5, 7)) == (5, 7)
    with pytest.raises(ValueError, match="at least 2 dims"):
        deepopt.matrix_view_shape((5,))


# ============================================================================================
# Specs are values
# ============================================================================================

BUILDS = [
    lambda: sgd(0.1, 0.9, nesterov=True, weight_decay=1e-4),
    lambda: adamw(3e-4, betas=(0.9, 0.95)),
    lambda: delta_momentum(0.05, 0.9, zeta=0.5, readout="newton_schulz"),
    lambda: muon(lr=0.02, ns_coefficients="polar_express", routing=Routing(fallback_patterns=("embed",))),
    lambda: custom(deepopt.UpdateRule(memory=deepopt.LinearMemory(momentum=0.9, zeta=0.3),
                                      readout=deepopt.newton_schulz("cubic", 10)), lr=0.1),
]


@pytest.mark.parametrize("build", BUILDS)
def test_specs_equal_and_hash_equal_when_built_equal(build):
    a, b = build(), build()
    assert a is not b and a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    c = a.replace(lr=a.lr * 2)
    assert c != a and len({a, c}) == 2


def test_different_specs_differ():
    specs = [build() for build in BUILDS]
    assert len(set(specs)) == len(specs)
    assert muon(ns_dtype="float64") != muon()
    assert sgd(0.1, 0.9) != sgd(0.1, 0.9, nesterov=True)


def test_specs_are_frozen():
    spec = muon()
    with pytest.raises(AttributeError):
        spec.name = "x"
    with pytest.raises(AttributeError):
        spec.rule.memory.momentum = 0.1


def test_presets_build_the_documented_rules():
    """The memory parameters of docs/math.md §2 for each preset."""
    m = sgd(0.1, 0.9, dampening=0.2).rule.memory
    assert (m.momentum, m.inner_lr, m.zeta, m.nesterov) == (0.9, pytest.approx(0.8), 0.0, False)
    m = muon(momentum=0.95).rule.memory
    assert (m.momentum, m.inner_lr, m.nesterov) == (0.95, pytest.approx(0.05), True)
    assert muon().rule.readout.coefficients == ((3.4445, -4.775, 2.0315),)
    assert muon().rule.readout.dtype == "bfloat16" and muon().rule.shape_scale == "original"
    assert delta_momentum(0.1, 0.8).rule.memory.zeta == 0.8                # ζ = α by default
    a = adamw(betas=(0.8, 0.99)).rule
    assert a.memory.bias_correction and a.denominator.beta2 == 0.99
    assert np.isclose(a.memory.inner_lr, 0.2)


@pytest.mark.parametrize("module", ["deepopt", "deepopt.testing"])
def test_import_does_not_pull_backends(module):
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'jax', 'optax', 'torch_backend', "
            "'jax_backend') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
