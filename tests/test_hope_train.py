"""HOPE training harness (benchmarks/hope/train.py, presets.py, transformer.py)."""

import json
import math
import re

import pytest
import torch

import deepopt
import torch_backend
from benchmarks.hope import train
from benchmarks.hope.model import Hope
from benchmarks.hope.presets import DEFAULT_LR, PRESETS, hope_config, matched_transformer_config
from benchmarks.hope.transformer import Transformer, TransformerConfig, apply_rope, rope_tables


def test_smoke_train_writes_metrics_and_summary(tmp_path):
    out = tmp_path / "run"
    summary = train.main(["--model", "hope", "--optimizer", "adamw", "--preset", "cpu-tiny", "--steps", "4",
                          "--batch", "2", "--seq-len", "32", "--out", str(out), "--no-progress", "--warm", "1"])
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]  # short runs log every step
    assert all({"step", "loss", "tokens_per_s"} <= r.keys() and math.isfinite(r["loss"]) for r in lines)
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("final_train_loss", "val_loss", "val_bpb", "tokens_per_s", "params", "peak_memory_bytes",
                "config", "git_sha", "versions", "device", "command"):
        assert key in on_disk, key
    # the recorded numbers are the ones computed another way
    assert on_disk["val_bpb"] == pytest.approx(on_disk["val_loss"] / math.log(2))
    assert on_disk["final_train_loss"] == pytest.approx(sum(r["loss"] for r in lines) / len(lines))
    assert on_disk["params"] == Hope(hope_config("cpu-tiny", 256)).num_params()
    assert on_disk["config"]["data"]["source"] == "stdlib" and len(on_disk["config"]["data"]["sha256"]) == 64
    assert summary["val_loss"] == on_disk["val_loss"]


def test_smoke_train_transformer_on_mqar(tmp_path):
    out = tmp_path / "run"
    train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "2", "--batch", "2", "--seq-len", "40",
                "--data", "mqar", "--mqar-vocab", "32", "--mqar-pairs", "6", "--out", str(out), "--no-progress"])
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["data"]["source"] == "mqar" and 0.0 <= s["val_accuracy"] <= 1.0


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2  # argparse's usage error, before any work
    return capsys.readouterr().err


def test_max_train_seconds_stops_early_and_still_evaluates(tmp_path, capsys):
    """A time-boxed run (a lent GPU's minutes): training stops after the step that passes the
    limit, keeps the lr schedule of --steps, and evaluates as usual; the summary says so."""
    out = tmp_path / "run"
    s = train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "50", "--batch", "2",
                    "--seq-len", "32", "--max-train-seconds", "1e-9", "--out", str(out), "--no-progress"])
    assert (s["steps"], s["steps_completed"], s["stopped_early"]) == (50, 1, "max_train_seconds")
    assert math.isfinite(s["val_bpb"]) and math.isfinite(s["final_train_loss"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0] and lines[0]["lr"] == pytest.approx(train.lr_scale_at(0, 50, 20) * 3e-3)
    full = train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "2", "--batch", "2",
                       "--seq-len", "32", "--max-train-seconds", "600", "--out", str(tmp_path / "b"), "--no-progress"])
    assert (full["steps_completed"], full["stopped_early"]) == (2, None)
    with pytest.raises(SystemExit):
        train.parse_args(["--max-train-seconds", "0", "--out", str(tmp_path)])
    assert "--max-train-seconds must be > 0" in capsys.readouterr().err


def _nan_gradient_at(monkeypatch, bad_steps, param="norm_f.weight"):
    """Make ``param``'s gradient NaN in the training steps ``bad_steps`` (a hook on the model that
    train.py builds; one backward per step); returns a dict that will hold that model."""
    built = {}

    def build(*args, **kwargs):
        model, cfg = real_build(*args, **kwargs)
        calls = iter(range(10_000))
        dict(model.named_parameters())[param].register_hook(
            lambda g: g * float("nan") if next(calls) in bad_steps else g)
        built["model"] = model
        return model, cfg

    real_build = train.build_model
    monkeypatch.setattr(train, "build_model", build)
    return built


def test_a_non_finite_gradient_skips_its_update_and_is_reported(tmp_path, monkeypatch):
    """The update of a step with a NaN gradient is skipped (the optimizer is not stepped, so
    parameters and state stay as they were), the run goes on, and the summary names the step and
    the parameter whose gradient was not finite (read before clipping spreads the NaN)."""
    built = _nan_gradient_at(monkeypatch, {2})
    updates = []
    real_step = torch_backend.DeepOptimizer.step
    monkeypatch.setattr(torch_backend.DeepOptimizer, "step", lambda self, *a: updates.append(1) or real_step(self, *a))
    s = train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "5", "--batch", "2",
                    "--seq-len", "32", "--out", str(tmp_path / "run"), "--no-progress"])
    assert (s["skipped_steps"], s["steps_completed"], len(updates)) == (1, 5, 4)
    (record,) = s["nonfinite"]
    assert record["step"] == 2 and record["params"] == ["norm_f.weight"] and math.isnan(record["grad_norm"])
    assert record["weights"] == []                           # the weights were finite: the backward made the NaN
    assert math.isfinite(s["final_train_loss"]) and math.isfinite(s["val_bpb"])
    assert all(torch.isfinite(p).all() for p in built["model"].parameters())
    # the first skipped step's weights and batch, to replay it elsewhere
    saved = torch.load(s["nonfinite_file"], weights_only=False)
    assert saved["step"] == 2 and saved["model"] == "transformer" and saved["x"].shape == (2, 32)
    replay, _ = train.build_model("transformer", saved["preset"], 256, **saved["model_opts"])
    replay.load_state_dict(saved["state_dict"])
    assert math.isfinite(replay(saved["x"], saved["y"])[1].item())


def test_nonfinite_raise_and_too_many_skips_fail_the_run(tmp_path, monkeypatch):
    _nan_gradient_at(monkeypatch, {1})
    with pytest.raises(FloatingPointError, match=r"step 1 .*--nonfinite raise"):
        train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "3", "--batch", "2", "--seq-len",
                    "32", "--nonfinite", "raise", "--out", str(tmp_path / "a"), "--no-progress"])
    _nan_gradient_at(monkeypatch, set(range(1, 100)))
    with pytest.raises(FloatingPointError, match=r"6 so far.*at most 5 skipped"):
        train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "20", "--batch", "2", "--seq-len",
                    "32", "--out", str(tmp_path / "b"), "--no-progress"])


def test_wrong_optimizer_is_rejected_by_argparse_listing_only_optimizers(capsys, monkeypatch):
    # loading data would fail loudly: the rejection must come before it
    monkeypatch.setattr(train, "DataSource", None)
    err = _cli_error(capsys, ["--optimizer", "no_such_rule", "--out", "x"])
    listed = err.split("choose from")[1]
    assert "adamw" in listed and "dmgd" in listed
    for not_an_optimizer in ("custom", "reference", "newton_schulz", "Routing", "testing"):
        assert not_an_optimizer not in listed


@pytest.mark.parametrize("opt, message", [
    ("hiden=32", "hiden: not a hyperparameter of deepopt.dmgd; allowed: .*hidden"),
    ("inner_lr=-1", "inner_lr"),
    ("lr=0.1", "lr: not a hyperparameter.*use --lr"),
    ("novalue", "expected KEY=VALUE"),
])
def test_bad_opt_is_a_clear_error_before_any_work(capsys, opt, message):
    err = _cli_error(capsys, ["--optimizer", "dmgd", "--opt", opt, "--out", "x"])
    assert re.search(message, err), err


def test_opt_values_reach_the_optimizer_and_the_fallback_lr_is_stated():
    args = train.parse_args(["--optimizer", "dmgd", "--opt", "hidden=4", "--opt", "inner_lr=0.3",
                             "--lr", "0.05", "--fallback-lr", "0.002", "--out", "x"])
    spec = train.build_spec(args.optimizer, args.lr, dict(args.opt), args.fallback_lr)
    model = Hope(hope_config("cpu-tiny", 256))
    opt, _ = train.make_optimizer(spec, model)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[names[id(p)]] = float(g["lr"]) * g.get("lr_ratio", 1.0)  # the lr it runs at
    hp = dict(spec.hparams)
    assert hp["hidden"] == 4 and hp["inner_lr"] == 0.3
    assert lrs["blocks.0.titans.w_q.weight"] == 0.05  # 2-D hidden weight: the matrix rule
    for name in ("wte.weight", "blocks.0.titans.mem_w1", "blocks.0.norm.weight"):  # the fallback
        assert lrs[name] == pytest.approx(0.002), name


def test_lr_schedule_warmup_then_cosine():
    assert train.lr_scale_at(0, 100, 10) == pytest.approx(0.1)
    assert train.lr_scale_at(9, 100, 10) == pytest.approx(1.0)
    assert train.lr_scale_at(10, 100, 10) == pytest.approx(1.0)
    assert train.lr_scale_at(100, 100, 10) == pytest.approx(0.1)
    mid = 10 + 45
    assert train.lr_scale_at(mid, 100, 10) == pytest.approx(0.1 + 0.9 * 0.5)


@pytest.mark.parametrize("preset", ["cpu-tiny", "cpu-mqar", "gpu-small"])
def test_transformer_is_parameter_matched(preset):
    hcfg = hope_config(preset, 256)
    tcfg = matched_transformer_config(hcfg)
    with torch.device("meta"):
        n_hope, n_tf = Hope(hcfg).num_params(), Transformer(tcfg).num_params()
    assert abs(n_tf - n_hope) / n_hope < 0.01
    assert set(PRESETS) == {"cpu-tiny", "cpu-mqar", "gpu-small", "gpu-125m"}


def test_rope_is_a_relative_position_encoding():
    """⟨R_m q, R_n k⟩ depends only on m − n (RoFormer's defining property)."""
    torch.manual_seed(0)
    d, T = 8, 12
    cos, sin = rope_tables(T, d, 10000.0, "cpu", torch.float64)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rq = apply_rope(q.expand(1, 1, T, d), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, T, d), cos, sin)[0, 0]
    torch.testing.assert_close(rq[5] @ rk[2], rq[9] @ rk[6])
    torch.testing.assert_close(rq[3].norm(), q.norm())


def test_transformer_causality():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(d_model=16, n_heads=2, n_layers=2, ffn_hidden=32)).double()
    idx = torch.randint(0, 256, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6


@pytest.mark.parametrize("model", ["hope", "transformer"])
def test_bf16_autocast_path_runs_on_cpu(tmp_path, model):
    """The GPU path's bf16 autocast, exercised on CPU: finite loss, recorded in the summary."""
    out = tmp_path / "run"
    train.main(["--model", model, "--optimizer", "adamw", "--steps", "3", "--batch", "2", "--seq-len", "32",
                "--preset", "cpu-tiny", "--amp", "bf16", "--out", str(out), "--no-progress"])
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["bf16_autocast"] is True
    assert math.isfinite(s["final_train_loss"]) and math.isfinite(s["val_loss"])


def test_compare_picks_the_best_mean_over_seeds_and_reports_the_spread():
    from benchmarks.hope import compare

    def summary(bpb, off=None):
        s = dict(val_bpb=bpb, tokens_per_s=1000.0, params=10, config=dict(args=dict(seed=0)))
        if off is not None:
            s.update(val_bpb_writes_off=off, memory_stats=[dict(alpha_mean=0.9, alpha_p05=0.5, eta_at_cap=0.1,
                                                                 state_norm_ratio=1.2)])
        return s

    # lr 0.01 has the best single seed, lr 0.003 the best mean: the mean decides
    by_lr = {0.003: [summary(3.0, 3.5), summary(3.2, 3.6)], 0.01: [summary(2.9, 3.4), summary(3.5, 3.7)]}
    lr, best = compare.best_lr(by_lr)
    assert lr == 0.003 and best == by_lr[0.003]
    lines = compare.format_table({"hope+adamw": dict(lr=lr, summaries=best)}, {})
    row = lines[2]
    assert "3.1000 (3.0000–3.2000)" in row and "3.5500" in row and "0.90/0.50" in row


def test_compare_help_and_bad_runs(capsys):
    from benchmarks.hope import compare

    with pytest.raises(SystemExit):
        compare.main(["--help"])
    out = capsys.readouterr().out
    assert "best learning rate" in out and "--grid" in out
    with pytest.raises(SystemExit):
        compare.main(["--runs", "hope:sgd", "--out", "unused"])
    assert "expected some of" in capsys.readouterr().err


def test_compile_scans_is_a_hope_option(tmp_path):
    with pytest.raises(ValueError, match="--compile scans applies to --model hope"):
        train.main(["--model", "transformer", "--optimizer", "adamw", "--steps", "1", "--batch", "2", "--seq-len", "40",
                    "--data", "mqar", "--mqar-vocab", "32", "--mqar-pairs", "6", "--compile", "scans",
                    "--out", str(tmp_path / "run"), "--no-progress"])


def test_a_preset_lr_is_the_default_and_lr_overrides_it():
    base = ["--optimizer", "adamw", "--out", "unused"]
    assert train.parse_args([*base, "--preset", "cpu-mqar"]).lr == 1e-3  # the MQAR recipe's own AdamW lr
    assert train.parse_args([*base, "--preset", "cpu-tiny"]).lr == DEFAULT_LR["adamw"]
    assert train.parse_args([*base, "--preset", "cpu-mqar", "--lr", "3e-3"]).lr == 3e-3
    assert train.parse_args(["--optimizer", "muon", "--out", "unused", "--preset", "cpu-mqar"]).lr == DEFAULT_LR["muon"]


def test_compare_end_to_end_records_provenance(tmp_path):
    """A two-run compare (Transformer++ + AdamW, reduced grid, 2 steps) writes comparison.json
    with its table, every run's summary and the environment (git SHA, versions, command)."""
    from benchmarks.hope import compare

    out = tmp_path / "cmp"
    result = compare.main(["--runs", "transformer:adamw", "--steps", "2", "--jobs", "1", "--no-throughput",
                           "--out", str(out)])
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["environment"]["versions"]["deepopt"] == deepopt.__version__
    assert "git_sha" in saved["environment"] and saved["command"].startswith("python -m benchmarks.hope.compare")
    runs = saved["results"]["transformer+adamw"]["summaries"]
    assert len(runs) == 1 and all(s["steps"] == 2 and math.isfinite(s["val_bpb"]) for s in runs)
    assert result["table"] == saved["table"]


def test_cuda_graph_is_a_cuda_option(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs --device cuda"):
        train.main(["--model", "hope", "--optimizer", "adamw", "--steps", "1", "--batch", "2", "--seq-len", "32",
                    "--device", "cpu", "--cuda-graph", "--out", str(tmp_path / "run"), "--no-progress"])


def test_cuda_graph_refuses_what_it_cannot_replay():
    assert train.cuda_graph_problem(True, False, False, 16, 16) is None
    assert "--compile off" in train.cuda_graph_problem(True, True, False, 16, 16)
    assert "--checkpoint off" in train.cuda_graph_problem(True, False, True, 16, 16)
    assert "gradient accumulation (micro-batch 8 < batch 16)" in train.cuda_graph_problem(True, False, False, 8, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["hope", "transformer"])
def test_cuda_graph_replays_the_eager_loss_and_gradients(kind):
    """The captured forward+backward equals the eager one (bf16 autocast, as training runs it),
    on new inputs after capture: the graphs read the inputs and parameters, not the capture's."""
    from benchmarks.hope.presets import build_model

    torch.manual_seed(0)
    model, _ = build_model(kind, "cpu-tiny", 256)
    model.cuda()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    fwd, how = train.cuda_graphed(model, 2, 32, torch.device("cuda"), autocast)
    assert how == "cuda-graph"
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):                                       # the second replay after a parameter update
        x, y = (torch.randint(0, 256, (2, 32), generator=gen).cuda() for _ in range(2))
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = fwd(x, y)[1]
        loss.backward()
        graphed = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        with autocast():
            eager = model(x, y)[1]
        eager.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-4)
        for g, p in zip(graphed, model.parameters()):     # unused parameters: no gradient either way
            assert (g is None) == (p.grad is None)
            if g is not None:
                torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(1e-2 * p.grad)
