"""One Routing, one assignment: a torch module and the equivalent optax pytree."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch

import deepopt
import jax_backend
import torch_backend


def _torch_model() -> torch.nn.Module:
    return torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(50, 8),
        "blocks": torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)]),
        "conv": torch.nn.Conv1d(8, 4, 3),
        "head": torch.nn.Linear(8, 50),
    })


def _jax_tree() -> dict:
    """The same model as a pytree: kernels (in, out), conv (width, in, out), same names."""
    return {
        "embed": {"weight": jnp.zeros((50, 8))},
        "blocks": [{"weight": jnp.zeros((8, 8)), "bias": jnp.zeros(8)},
                   {"weight": jnp.zeros(8), "bias": jnp.zeros(8)}],
        "conv": {"weight": jnp.zeros((3, 8, 4)), "bias": jnp.zeros(4)},
        "head": {"weight": jnp.zeros((8, 50)), "bias": jnp.zeros(50)},
    }


ROUTINGS = {
    "ndim": deepopt.Routing(),
    "patterns": deepopt.Routing(fallback_patterns=(r"^embed\.", r"^head\.")),
    "min_ndim_3": deepopt.Routing(min_ndim=3),
    "predicate_on_names": deepopt.Routing(fallback_if=lambda name, shape: name.startswith("conv")),
}


@pytest.mark.parametrize("routing", ROUTINGS, ids=str)
@pytest.mark.parametrize("make", [deepopt.muon, deepopt.dmgd, deepopt.m3], ids=lambda f: f.__name__)
def test_same_assignment_on_torch_module_and_pytree(routing, make):
    spec = make(lr=0.01, routing=ROUTINGS[routing])
    opt = torch_backend.compile(spec, _torch_model().named_parameters())
    on_torch = {n: g["route"] for g in opt.param_groups for n in g["param_names"]}
    labels = jax_backend.param_labels(spec)(_jax_tree())
    on_jax = {jax_backend.path_name(p): label
              for p, label in __import__("jax").tree_util.tree_flatten_with_path(labels)[0]}
    assert on_torch == on_jax
    assert set(on_torch.values()) == {"rule", "fallback"}      # both sides exercised
