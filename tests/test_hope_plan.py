"""`train --plan` (benchmarks/hope/plan.py): measured step memory, and GPU presets that fit."""

import json

import pytest
import torch

from benchmarks.hope import train
from benchmarks.hope.plan import measure_saved


def test_saved_bytes_are_what_autograd_keeps():
    """x @ W then tanh: autograd keeps x (for W's gradient) and tanh's output; W is excluded."""
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(5, 8, requires_grad=True)
    saved, fwd, total = measure_saved(lambda x_: torch.tanh(x_ @ w), x, exclude=[w])
    assert saved == (5 * 8 + 5 * 16) * 4
    assert fwd == 2 * 5 * 8 * 16 and total == 3 * fwd  # forward mm; backward: two mms


def test_plan_of_cpu_tiny_is_complete_and_checkpointing_cuts_activations(tmp_path):
    base = ["--plan", "--device", "cpu", "--preset", "cpu-tiny", "--seq-len", "32", "--no-progress"]
    off = train.main([*base, "--checkpoint", "off", "--out", str(tmp_path / "off")])
    on = train.main([*base, "--checkpoint", "on", "--out", str(tmp_path / "on")])
    on_disk = json.loads((tmp_path / "on" / "plan.json").read_text())
    for key in ("peak_bytes", "flops_per_step", "tokens_per_step", "params_bytes", "optimizer_state_bytes",
                "activation_bytes"):
        assert on_disk[key] > 0, key
    assert on["activation_bytes"] < off["activation_bytes"]
    assert on["flops_per_step"] > off["flops_per_step"]  # the recompute
    # AdamW keeps two moments per parameter (plus step counters)
    assert 2 * off["params_bytes"] <= off["optimizer_state_bytes"] <= 2.01 * off["params_bytes"]
    assert off["peak_bytes"] == 2 * off["params_bytes"] + off["optimizer_state_bytes"] + off["activation_bytes"]
    assert off["tokens_per_step"] == 8 * 32


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpu-small", "gpu-125m"])
def test_gpu_presets_fit_in_70_gb(tmp_path, preset):
    for model, optimizer in (("hope", "adamw"), ("hope", "dmgd")):
        p = train.main(["--plan", "--device", "cpu", "--preset", preset, "--model", model, "--optimizer", optimizer,
                        "--out", str(tmp_path / f"{model}-{optimizer}")])
        assert p["peak_bytes"] <= 70e9, (preset, optimizer, p["peak_bytes"])
