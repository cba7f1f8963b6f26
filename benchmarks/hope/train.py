"""Train HOPE or the Transformer++ baseline with a deepopt optimizer.

    python -m benchmarks.hope.train --model hope --optimizer adamw --preset cpu-tiny \\
        --steps 200 --out runs/hope/hope-adamw

Writes DIR/metrics.jsonl (one line per logged step: step, loss, tokens_per_s, lr, elapsed_s)
and DIR/summary.json (final_train_loss, val_loss, val_bpb, tokens_per_s, params,
peak_memory_bytes, the full config, git SHA, library versions, device and the command).

Conventions: lr follows linear warm-up then cosine decay to 10% of the peak; outer gradients
are clipped to norm 1.0; `final_train_loss` is the mean of the last 10 logged-step losses;
`val_bpb` = val loss / ln 2 per predicted unit (bits per byte on byte corpora, bits per
answer token on MQAR); `tokens_per_s` counts training tokens after the first `warm` steps
(compilation and allocator warm-up excluded); on CPU `peak_memory_bytes` is the process's
peak RSS, on CUDA `torch.cuda.max_memory_allocated`. On CUDA the model runs under bf16
autocast and `torch.compile` when it compiles (falls back to eager, with a printed note).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import deepopt
import torch_backend
from benchmarks._common import environment

from .data import DataSource
from .presets import DEFAULT_LR, PRESETS, build_model

# deepopt presets a run can name (`custom` needs a rule, so it is not one)
OPTIMIZERS = ("adamw", "sgd", "muon", "dmgd", "m3", "delta_momentum")
# set by the harness, not by --opt
RESERVED_OPT_KEYS = ("lr", "fallback", "routing")


# -----------------------------------------------------------------------------
# Optimizer: a deepopt spec compiled by torch_backend


def optimizer_names():
    """The OPTIMIZERS this deepopt provides."""
    return tuple(n for n in OPTIMIZERS if callable(getattr(deepopt, n, None)))


def parse_opt(text):
    """'key=value' -> (key, value); the value is a Python literal (0.3, 32, (0.9, 0.99), True)
    or, failing that, a string (`--opt readout=newton_schulz`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"--opt {text!r}: expected KEY=VALUE, e.g. --opt inner_lr=0.3")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _is_matrix_param(name, shape):
    """2-D hidden weights take matrix rules; embeddings/head (tied), norms, N-D states do not."""
    return len(shape) == 2 and not name.startswith(("wte.", "lm_head."))


def _to_fallback(name, shape):
    return not _is_matrix_param(name, shape)


def build_spec(name: str, lr: float, opts: dict, fallback_lr: float):
    """deepopt.<name>(lr, **opts) with HOPE's routing: matrix rules take the 2-D hidden weights;
    embeddings, norms, biases and the N-D memory states go to AdamW at `fallback_lr` (no decay).

    Raises ValueError naming what was wrong: an unknown optimizer, a key that is not one of the
    builder's hyperparameters, or a value the builder's own validation rejects.
    """
    if name not in optimizer_names():
        raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(optimizer_names())}")
    builder = getattr(deepopt, name)
    params = inspect.signature(builder).parameters
    allowed = [k for k in params if k not in RESERVED_OPT_KEYS]
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise ValueError(f"--opt {', '.join(bad)}: not a hyperparameter of deepopt.{name}; "
                         f"allowed: {', '.join(allowed)} (lr: use --lr, fallback lr: --fallback-lr)")
    kwargs = dict(opts, lr=lr)
    if "routing" in params:
        kwargs["routing"] = deepopt.Routing(fallback_patterns=(r"^wte\.", r"^lm_head\."), fallback_if=_to_fallback)
    if "fallback" in params:
        kwargs["fallback"] = deepopt.adamw(lr=fallback_lr, weight_decay=0.0)
    try:
        return builder(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"deepopt.{name}(lr={lr}, {', '.join(f'{k}={v!r}' for k, v in opts.items())}): {e}") from None


def make_optimizer(spec, model: torch.nn.Module):
    """-> (torch.optim.Optimizer, a one-line description) for a spec from `build_spec`."""
    opt = torch_backend.compile(spec, model.named_parameters())
    return opt, f"deepopt.{spec.name} via torch_backend.compile"


def set_lr(opt, lr_scale, base_lrs):
    for g, base in zip(opt.param_groups, base_lrs):
        if isinstance(g["lr"], torch.Tensor):  # tensor lrs avoid torch.compile recompiles
            g["lr"].fill_(base * lr_scale)
        else:
            g["lr"] = base * lr_scale


def lr_scale_at(step, steps, warmup):
    """Linear warm-up over `warmup` steps, then cosine to 0.1 of the peak at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# Evaluation and bookkeeping


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """-> (mean loss over every supervised unit of the fixed val batches, accuracy, units)."""
    model.eval()
    total, count, correct = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits, _ = model(x)
        mask = y != -100
        logits = logits.float()[mask]
        total += torch.nn.functional.cross_entropy(logits, y[mask], reduction="sum").item()
        correct += (logits.argmax(-1) == y[mask]).sum().item()
        count += int(mask.sum())
    model.train()
    return total / count, correct / count, count


@torch.no_grad()
def memory_stats(model, batches, device, autocast):
    """Per Titans layer over the given val batches: M_memory's retention α (mean, 5th percentile),
    the fraction of tokens whose η sits at its cap, and the end-of-sequence state-norm ratio
    ‖φ_T‖ / ‖φ₀‖ of M_memory (mean over sequences and heads; 1 = unchanged, 0 = erased)."""
    model.eval()
    model.record_memory_stats(True)
    per_layer = [dict(alpha=[], eta_at_cap=[], eta=[], state_norm_ratio=[]) for _ in model.blocks]
    for x, _ in batches:
        with autocast():
            model(x.to(device))
        for acc, block in zip(per_layer, model.blocks):
            for key, value in (block.titans.stats or {}).items():
                acc[key].append(value.cpu())
    model.record_memory_stats(False)
    model.train()
    out = []
    for acc in per_layer:
        if not acc["alpha"]:
            out.append(None)
            continue
        alpha, ratio = torch.cat(acc["alpha"]).double(), torch.cat(acc["state_norm_ratio"]).double()
        out.append(dict(alpha_mean=alpha.mean().item(), alpha_p05=torch.quantile(alpha, 0.05).item(),
                        eta_mean=torch.cat(acc["eta"]).double().mean().item(),
                        eta_at_cap=torch.cat(acc["eta_at_cap"]).double().mean().item(),
                        state_norm_ratio=ratio.mean().item()))
    return out


def device_info(device):
    if device.type == "cuda":
        return dict(type="cuda", name=torch.cuda.get_device_name(device), count=torch.cuda.device_count())
    return dict(type="cpu", name=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                cpu_count=os.cpu_count())


def peak_memory(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# -----------------------------------------------------------------------------
# The run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hope.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("hope", "transformer"), default="hope")
    ap.add_argument("--optimizer", choices=optimizer_names(), default="adamw", help="a deepopt preset")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--max-train-seconds", type=float, default=None,
                    help="stop training after the step that passes this wall time, then evaluate as usual; "
                         "the lr schedule stays the one of --steps (summary: steps_completed, stopped_early)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr (default: the preset's lr for the optimizer, else presets.DEFAULT_LR)")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", type=parse_opt,
                    help="any hyperparameter of the deepopt preset, e.g. --opt hidden=32 --opt inner_lr=0.3 "
                         "(repeatable; validated by the preset before any work)")
    ap.add_argument("--fallback-lr", type=float, default=None,
                    help="AdamW lr of the parameters a matrix rule does not take (embeddings, norms, memory "
                         "states) for muon, dmgd, m3, ... (default: presets.DEFAULT_LR['adamw'])")
    ap.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE", type=_model_opt,
                    help="override a HOPE config field, e.g. --model-opt generator_writes=off (repeatable)")
    ap.add_argument("--train-writes", choices=("on", "off"), default="on",
                    help="off: static HOPE (no in-context writes in training or evaluation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=("stdlib", "mqar", "file"), default="stdlib")
    ap.add_argument("--data-path", default=None, help="text file for --data file")
    ap.add_argument("--mqar-vocab", type=int, default=None, help="default: the preset's, else 64")
    ap.add_argument("--mqar-pairs", type=int, default=None, help="default: the preset's, else 8")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--compile", choices=("auto", "on", "scans", "off"), default="auto",
                    help="torch.compile the model (auto: on CUDA), or only HOPE's sequential scans "
                         "(Hope.compile_scans; minutes of compilation on a small CPU)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="replay each micro-batch's forward+backward as CUDA graphs "
                         "(torch.cuda.make_graphed_callables): removes the per-kernel launch cost that bounds "
                         "small models on a GPU; CUDA and an eager model only (--compile off, no checkpointing); "
                         "falls back to eager, with a printed note, if capture fails")
    ap.add_argument("--nonfinite", choices=("skip", "raise"), default="skip",
                    help="a step whose loss or gradient norm is not finite: skip its update (the default; "
                         "the run fails past 1%% of its steps, at least 5) or raise at once; the summary lists "
                         "each skipped step with the parameters whose gradients were not finite")
    ap.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                    help="bf16 autocast (auto: on CUDA; bf16 also runs it on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--warm", type=int, default=3, help="steps left out of tokens/s")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="rows per forward/backward; gradients accumulate to --batch (default: the preset's)")
    ap.add_argument("--checkpoint", choices=("auto", "on", "off"), default="auto",
                    help="activation checkpointing per HOPE sub-layer (auto: the preset's)")
    ap.add_argument("--plan", action="store_true",
                    help="write OUT/plan.json (memory and FLOPs of one training step, measured at the preset's "
                         "shapes on the meta device) and exit without training")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]["train"]
    args.mqar_vocab = args.mqar_vocab or preset.get("mqar_vocab", 64)
    args.mqar_pairs = args.mqar_pairs or preset.get("mqar_pairs", 8)
    default_lr = dict(DEFAULT_LR, **preset.get("lr", {}))  # a preset's own lr wins (cpu-mqar's AdamW)
    if args.lr is None and args.optimizer not in default_lr:
        ap.error(f"--lr is required with --optimizer {args.optimizer} (defaults exist for {', '.join(default_lr)})")
    args.lr = args.lr if args.lr is not None else default_lr[args.optimizer]
    if args.max_train_seconds is not None and not args.max_train_seconds > 0:
        ap.error(f"--max-train-seconds must be > 0, got {args.max_train_seconds}")
    args.fallback_lr = args.fallback_lr if args.fallback_lr is not None else DEFAULT_LR["adamw"]
    try:  # the preset's own validation, before any data is loaded
        build_spec(args.optimizer, args.lr, dict(args.opt), args.fallback_lr)
    except ValueError as e:
        ap.error(str(e))
    return args


def _model_opt(text):
    """'key=value' -> (key, value) typed like HopeConfig's field; a clear error otherwise."""
    from dataclasses import fields

    from .model import HopeConfig

    key, sep, raw = text.partition("=")
    types = {f.name: f.type for f in fields(HopeConfig)}
    if not sep or key not in types:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
    kind = str(types[key])
    try:
        if raw.lower() == "none" and "None" in kind:
            value = None
        elif kind.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            value = raw.lower() in ("true", "1")
        elif kind.startswith("int"):
            value = int(raw)
        elif kind.startswith("float"):
            value = float(raw)
        elif kind.startswith("tuple"):
            value = tuple(int(p) for p in raw.split(","))
        else:
            value = raw
        HopeConfig(**{key: value})  # the config's own validation
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"--model-opt {text!r}: {e}") from None
    return key, value


def run(args):
    preset = PRESETS[args.preset]["train"]
    steps = args.steps if args.steps is not None else preset["steps"]
    batch = args.batch or preset["batch"]
    seq_len = args.seq_len or preset["seq_len"]
    lr = args.lr
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cuda" if device.type == "cuda" else "cpu")   # the code that trains, read now

    data = DataSource(args.data, seq_len, batch, path=args.data_path, mqar_vocab=args.mqar_vocab,
                      mqar_pairs=args.mqar_pairs, val_batches=preset["val_batches"], seed=args.seed)
    model, model_cfg = build_model(args.model, args.preset, data.vocab_size, **dict(args.model_opt))
    model.to(device)
    if args.train_writes == "off":
        if args.model != "hope":
            raise ValueError("--train-writes off applies to --model hope")
        model.set_writes(False)
    n_params = model.num_params()
    spec = build_spec(args.optimizer, lr, dict(args.opt), args.fallback_lr)
    opt, opt_note = make_optimizer(spec, model)
    base_lrs = [float(g["lr"]) for g in opt.param_groups]

    use_cuda = device.type == "cuda"

    # bf16 autocast: on by default on CUDA; --amp bf16 runs the same path on CPU (CI covers it).
    use_amp = args.amp == "bf16" or (args.amp == "auto" and use_cuda)

    def autocast():  # a captured graph must not hold autocast's cached casts of the weights
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not args.cuda_graph)

    micro = min(args.micro_batch or preset.get("micro_batch") or batch, batch)
    checkpointing = args.checkpoint == "on" or (args.checkpoint == "auto" and preset.get("checkpoint", False))
    if checkpointing and hasattr(model, "set_checkpointing"):
        model.set_checkpointing(True)
    fwd, compiled = model, False
    if args.compile == "scans":
        if args.model != "hope":
            raise ValueError("--compile scans applies to --model hope")
        model.compile_scans()  # falls back to eager per scan, with a warning, if compiling fails
        compiled = "scans"
    elif args.compile == "on" or (args.compile == "auto" and use_cuda and not args.cuda_graph):
        try:
            fwd, compiled = torch.compile(model), True
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            print(f"torch.compile unavailable ({type(e).__name__}: {e}); running eager", flush=True)
    if args.cuda_graph:
        problem = cuda_graph_problem(use_cuda, compiled, checkpointing, micro, batch)
        if problem:
            raise ValueError(f"--cuda-graph {problem}")
        fwd, compiled = cuda_graphed(model, micro, seq_len, device, autocast)

    gen = torch.Generator().manual_seed(args.seed)
    log_every = max(1, preset["log_every"] if steps >= 50 else 1)
    metrics = open(out / "metrics.jsonl", "w")
    losses, tokens_timed, time_timed = [], 0, 0.0
    t_start = t_log = time.perf_counter()
    tokens_since_log = 0
    try:
        from tqdm import tqdm

        # In a log (no terminal) a redraw is a whole line: draw rarely there.
        interactive = sys.stderr.isatty()
        bar = tqdm(range(steps), disable=args.no_progress, desc=f"{args.model}+{args.optimizer}",
                   dynamic_ncols=True, mininterval=1.0 if interactive else 15.0)
    except ImportError:
        bar = range(steps)
    steps_completed = 0
    skipped, last_loss = [], None                  # last_loss: the last finite loss since the last log
    params = list(model.parameters())
    max_skips = max(5, steps // 100)                # more than 1% of the steps: the run has diverged
    for step in bar:
        if step > 0 and args.max_train_seconds is not None and time.perf_counter() - t_start >= args.max_train_seconds:
            break                                   # at least one step, so the summary has a loss
        t0 = time.perf_counter()
        x, y = data.train_batch(gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        set_lr(opt, lr_scale_at(step, steps, preset["warmup"]), base_lrs)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for xm, ym in zip(x.split(micro), y.split(micro)):  # gradient accumulation
            try:
                with autocast():
                    _, part = fwd(xm, ym)
            except Exception as e:  # noqa: BLE001 - torch.compile errors surface on the first call
                if not compiled:
                    raise
                print(f"torch.compile failed ({type(e).__name__}); falling back to eager", flush=True)
                fwd, compiled = model, False
                with autocast():
                    _, part = fwd(xm, ym)
            part = part * (xm.shape[0] / x.shape[0])  # equal supervised units per row: the batch mean
            part.backward()
            loss = loss + part.detach()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # one host sync per step, before the update: a non-finite loss or gradient skips the step
        loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, grad_norm)
            opt.step()
            last_loss = loss_value
        else:
            skipped.append(dict(step=step, loss=loss_value, grad_norm=norm_value, params=nonfinite(model, of_grads=True),
                                weights=nonfinite(model, of_grads=False)))
            if len(skipped) == 1:                   # what it takes to replay the first one elsewhere
                save_nonfinite(out / NONFINITE_FILE, model, model_cfg, x, y, step, args, use_amp)
            opt.zero_grad(set_to_none=True)
            if args.nonfinite == "raise" or len(skipped) > max_skips:
                raise FloatingPointError(f"non-finite loss or gradient at step {step} ({len(skipped)} so far, "
                                         f"--nonfinite {args.nonfinite}, at most {max_skips} skipped): {skipped[-3:]}")
            print(f"step {step}: loss {loss_value}, gradient norm {norm_value}: step skipped "
                  f"(non-finite gradients in {skipped[-1]['params'][:4]})", flush=True)
        n_tok = x.numel()
        if step >= args.warm:
            tokens_timed += n_tok
            time_timed += time.perf_counter() - t0
        tokens_since_log += n_tok
        if step % log_every == 0 or step == steps - 1:
            now = time.perf_counter()
            tps = tokens_since_log / max(now - t_log, 1e-9)
            t_log, tokens_since_log = now, 0
            if last_loss is not None:               # a skipped step has no loss of its own
                losses.append(last_loss)
            last_loss = None
            rec = dict(step=step, loss=loss_value, tokens_per_s=tps, lr=opt.param_groups[0]["lr"] if not
                       isinstance(opt.param_groups[0]["lr"], torch.Tensor) else float(opt.param_groups[0]["lr"]),
                       elapsed_s=now - t_start)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if hasattr(bar, "set_postfix") and time_timed > 0:  # the summary's tokens/s, so far
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_timed / time_timed:,.0f}",
                                refresh=interactive)
        steps_completed = step + 1
    if hasattr(bar, "close"):
        bar.close()
    metrics.close()
    train_time = time.perf_counter() - t_start

    val_loss, val_acc, val_tokens = evaluate(model, data.val_batches, device, autocast)
    diagnostics = {}
    if args.model == "hope":  # the same trained model with every in-context write switched off
        model.set_writes(False)
        off_loss, off_acc, _ = evaluate(model, data.val_batches, device, autocast)
        model.set_writes(args.train_writes == "on")
        diagnostics = dict(val_loss_writes_off=off_loss, val_bpb_writes_off=off_loss / math.log(2),
                           val_accuracy_writes_off=off_acc,
                           memory_stats=memory_stats(model, data.val_batches[:8], device, autocast))
    tps = tokens_timed / time_timed if time_timed > 0 else float("nan")
    summary = dict(
        model=args.model, optimizer=args.optimizer, optimizer_impl=opt_note, preset=args.preset,
        final_train_loss=float(np.mean(losses[-10:])), val_loss=val_loss, val_bpb=val_loss / math.log(2),
        val_unit=data.unit, val_accuracy=val_acc, val_tokens=val_tokens, **diagnostics,
        tokens_per_s=tps, params=n_params,
        peak_memory_bytes=peak_memory(device), steps=steps, steps_completed=steps_completed,
        skipped_steps=len(skipped), nonfinite=skipped[:20],
        nonfinite_file=str(out / NONFINITE_FILE) if skipped else None,
        stopped_early="max_train_seconds" if steps_completed < steps else None, train_time_s=train_time,
        config=dict(args=_plain(vars(args)), steps=steps, batch=batch, seq_len=seq_len, lr=lr,
                    optimizer=dict(name=args.optimizer, lr=lr, opts=_plain(dict(args.opt)),
                                   fallback_lr=args.fallback_lr if spec.fallback is not None else None,
                                   group_lrs=base_lrs),
                    micro_batch=micro, checkpointing=checkpointing,
                    warmup=preset["warmup"], grad_clip=1.0, compiled=compiled, bf16_autocast=use_amp,
                    autocast="bf16" if use_cuda else None, model=_plain(asdict(model_cfg)), data=data.meta),
        git_sha=(env["git_sha"] or "unknown") + ("-dirty" if env["git_dirty"] else ""),
        versions={"python": env["python"], **env["versions"]}, device=device_info(device), environment=env,
        command=" ".join([sys.executable, "-m", "benchmarks.hope.train", *sys.argv[1:]])
        if sys.argv and sys.argv[0].endswith("train.py") else getattr(args, "command", None),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    off = (f" (writes off {diagnostics['val_bpb_writes_off']:.4f}, acc {val_acc:.3f} / "
           f"{diagnostics['val_accuracy_writes_off']:.3f})") if diagnostics else f" (acc {val_acc:.3f})"
    print(f"{args.model}+{args.optimizer}: val_loss {val_loss:.4f}  val_bpb {summary['val_bpb']:.4f}{off}  "
          f"tokens/s {tps:,.0f}  params {n_params:,}  -> {out / 'summary.json'}", flush=True)
    return summary


#: The first skipped step's model and batch, in the run's directory (see `save_nonfinite`).
NONFINITE_FILE = "nonfinite_first.pt"


def save_nonfinite(path: Path, model, model_cfg, x, y, step: int, args, bf16: bool) -> None:
    """Save what replays the first non-finite step: the weights that produced it (the update is
    skipped, so they are the step's own), its batch, the model's config and the step's settings.
    ``torch.load`` it on any machine, rebuild the model with ``presets.build_model`` and the
    config, load the weights, and run forward and backward on the batch (in float64, say) to see
    where the NaN starts."""
    torch.save(dict(step=step, model=args.model, preset=args.preset, model_opts=dict(args.model_opt),
                    config=asdict(model_cfg), bf16_autocast=bf16,
                    state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    x=x.detach().cpu(), y=y.detach().cpu()), path)


def nonfinite(model, of_grads: bool) -> list[str]:
    """Names of the parameters whose gradient (``of_grads``) or value has a NaN or an infinity (a
    skipped step's record). Non-finite values mean an earlier update (the optimizer) made them so;
    none, with non-finite gradients, means this step's forward or backward did."""
    tensors = ((name, p.grad if of_grads else p) for name, p in model.named_parameters())
    return [name for name, t in tensors if t is not None and not bool(torch.isfinite(t).all())]


#: The start of the note a run prints when its CUDA-graph capture fails and it trains eagerly
#: (`gpu_check` looks for it in the runs' logs).
GRAPH_FALLBACK = "CUDA graph capture failed"


def cuda_graph_problem(use_cuda: bool, compiled, checkpointing: bool, micro: int, batch: int) -> str | None:
    """Why ``--cuda-graph`` cannot run with these settings (the end of its error), or None."""
    if not use_cuda:
        return "needs --device cuda"
    if compiled:
        return "runs the eager model: add --compile off"
    if checkpointing:
        return "cannot replay checkpointed sub-layers: add --checkpoint off"
    if micro != batch:
        return (f"replays one micro-batch per step: gradient accumulation (micro-batch {micro} < batch {batch}) "
                "could read the graph's gradient buffers while the next replay rewrites them")
    return None


class _Loss(torch.nn.Module):
    """The model's training loss as a module of its own, what a CUDA graph captures: the forward
    under ``autocast``, the backward outside it, as an eager training step runs them."""

    def __init__(self, model, autocast):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, x, y):
        with self.autocast():
            return self.model(x, y)[1]


def cuda_graphed(model, micro: int, seq_len: int, device, autocast):
    """-> (fwd, compiled): ``fwd(x, y) -> (None, loss)`` replaying the forward and backward of one
    ``(micro, seq_len)`` micro-batch as CUDA graphs, and ``"cuda-graph"``; or the eager model and
    False, with a printed note, where capture fails (a host sync in the forward, say).

    Only a training-mode call replays the graphs: evaluation runs ``model`` itself, eagerly. The
    parameters keep their storage (the optimizers update them in place), which the graphs read.
    """
    sample = torch.zeros(micro, seq_len, dtype=torch.long, device=device)
    try:
        graphed = torch.cuda.make_graphed_callables(_Loss(model, autocast), (sample, sample.clone()),
                                                    allow_unused_input=True)
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
        print(f"{GRAPH_FALLBACK} ({type(e).__name__}: {str(e)[:200]}); running eager", flush=True)
        model.zero_grad(set_to_none=True)
        return model, False
    return (lambda x, y: (None, graphed(x, y))), "cuda-graph"


def _plain(obj):
    """JSON-safe copy (tuples -> lists)."""
    return json.loads(json.dumps(obj, default=str))


def main(argv=None):
    args = parse_args(argv)
    args.command = " ".join(["python -m benchmarks.hope.train", *(argv if argv is not None else sys.argv[1:])])
    if args.plan:
        from .plan import write_plan

        return write_plan(args)
    return run(args)


if __name__ == "__main__":
    main()
