"""Wrapped models route and seed like bare ones; distributed options are checked up front.

No process group needed: DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` and the FSDP1 /
activation-checkpointing wrappers only change names, which these tests write by hand.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import deepopt  # noqa: E402
import torch_backend  # noqa: E402
from torch_backend._distributed import canonical_name  # noqa: E402


@pytest.mark.parametrize("wrapped, bare", [
    ("module.0.weight", "0.weight"),
    ("_orig_mod.0.weight", "0.weight"),
    ("module._orig_mod.0.weight", "0.weight"),
    ("_orig_mod.module.0.weight", "0.weight"),
    ("layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.weight", "layers.0.attn.weight"),
    ("encoder.module.weight", "encoder.module.weight"),     # a user's own submodule named "module"
    ("0.weight", "0.weight"),
])
def test_canonical_name_strips_wrapper_components(wrapped, bare):
    assert canonical_name(wrapped) == bare


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                               torch.nn.Linear(8, 3))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("preset", ["muon", "dmgd"])
def test_wrapped_names_get_the_bare_routes_and_state(prefix, preset):
    routing = deepopt.Routing(fallback_patterns=(r"^3\.",))           # the head, by its bare name
    spec = {"muon": deepopt.muon(0.02, routing=routing),
            "dmgd": deepopt.dmgd(0.02, routing=routing)}[preset]
    bare, wrapped = _model(), _model()
    opts = [torch_backend.compile(spec, bare.named_parameters()),
            torch_backend.compile(spec, [(prefix + n, p) for n, p in wrapped.named_parameters()])]
    routes = [[(len(g["params"]), g["route"]) for g in opt.param_groups] for opt in opts]
    assert routes[0] == routes[1]
    fallback = next(g for g in opts[1].param_groups if g["route"] == "fallback")
    assert prefix + "3.weight" in fallback["param_names"]           # names as given, routes as bare
    x = torch.randn(16, 6)
    for model, opt in zip((bare, wrapped), opts):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(bare.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)                    # same routes, same (name-seeded) DMGD state


def test_ddp_mesh_must_be_a_device_mesh():
    model = _model()
    with pytest.raises(TypeError, match="ddp_mesh must be a torch.distributed.device_mesh.DeviceMesh"):
        torch_backend.compile(deepopt.muon(0.02), model.named_parameters(), ddp_mesh="cpu")
