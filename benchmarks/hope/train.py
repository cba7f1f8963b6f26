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
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .data import DataSource
from .presets import DEFAULT_LR, PRESETS, build_model

STANDIN_NAMES = ("adamw", "sgd", "muon")


# -----------------------------------------------------------------------------
# Optimizer: deepopt spec compiled by torch_backend, torch.optim stand-ins until they exist


def _is_matrix_param(name, p):
    """2-D hidden weights take matrix rules; embeddings/head (tied), norms, N-D states do not."""
    return p.ndim == 2 and not name.startswith(("wte.", "lm_head."))


def make_optimizer(name: str, model: torch.nn.Module, lr: float):
    """-> (torch.optim.Optimizer, note). deepopt's spec when it exists, else a torch stand-in."""
    try:
        import deepopt
    except ImportError:
        deepopt = None
    try:
        import torch_backend
    except ImportError:
        torch_backend = None
    builder = getattr(deepopt, name, None) if deepopt is not None else None
    compile_fn = getattr(torch_backend, "compile", None) if torch_backend is not None else None
    if callable(builder) and callable(compile_fn):
        kwargs = dict(lr=lr)
        routing_cls = getattr(deepopt, "Routing", None)
        if routing_cls is not None and "routing" in _parameters(builder):
            # matrix rules on 2-D hidden weights only (same split as the torch stand-in)
            kwargs["routing"] = routing_cls(
                fallback_patterns=(r"^wte\.", r"^lm_head\."), fallback_if=lambda n, shape: len(shape) != 2)
        if "fallback" in _parameters(builder) and name != "adamw" and hasattr(deepopt, "adamw"):
            # element-wise params at AdamW's own lr, not the matrix rule's (as the stand-in)
            kwargs["fallback"] = deepopt.adamw(lr=DEFAULT_LR["adamw"], weight_decay=0.0)
        spec = builder(**kwargs)
        return compile_fn(spec, model.named_parameters()), f"deepopt.{name} via torch_backend.compile"
    if name not in STANDIN_NAMES:
        known = sorted(set(STANDIN_NAMES) | {n for n in dir(deepopt or object) if _is_builder(deepopt, n)})
        raise ValueError(f"unknown optimizer {name!r}: neither deepopt nor the torch stand-ins have it; "
                         f"known names: {', '.join(known)}")
    missing = "deepopt." + name if builder is None else "torch_backend.compile"
    note = f"STAND-IN: {missing} is not available; using torch.optim for {name!r}"
    print(note, flush=True)
    params = list(model.named_parameters())
    if name == "adamw":
        return torch.optim.AdamW([p for _, p in params], lr=lr), note
    if name == "sgd":
        return torch.optim.SGD([p for _, p in params], lr=lr, momentum=0.9), note
    matrix = [p for n, p in params if _is_matrix_param(n, p)]
    other = [p for n, p in params if not _is_matrix_param(n, p)]
    return _Chained([torch.optim.Muon(matrix, lr=lr), torch.optim.AdamW(other, lr=3e-3)]), note + \
        " (torch.optim.Muon on 2-D hidden weights, AdamW lr 3e-3 on the rest)"


def _parameters(fn):
    import inspect

    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def _is_builder(mod, n):
    return not n.startswith("_") and n.islower() and callable(getattr(mod, n))


class _Chained(torch.optim.Optimizer):
    """Two optimizers stepped together (Muon + AdamW fallback stand-in)."""

    def __init__(self, opts):
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]
        self.defaults, self.state = {}, {}

    def step(self, closure=None):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


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
    """Mean loss over every supervised unit of the fixed val batches, and answer accuracy."""
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
    return total / count, correct / count


def git_sha():
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions():
    out = dict(python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__)
    for mod in ("deepopt", "torch_backend", "tqdm"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            out[mod] = None
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
    ap.add_argument("--optimizer", default="adamw", help="a deepopt preset name (adamw, muon, dmgd, ...)")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default per optimizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=("stdlib", "mqar", "file"), default="stdlib")
    ap.add_argument("--data-path", default=None, help="text file for --data file")
    ap.add_argument("--mqar-vocab", type=int, default=64)
    ap.add_argument("--mqar-pairs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile (auto: on CUDA)")
    ap.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                    help="bf16 autocast (auto: on CUDA; bf16 also runs it on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--warm", type=int, default=3, help="steps left out of tokens/s")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def run(args):
    preset = PRESETS[args.preset]["train"]
    steps = args.steps if args.steps is not None else preset["steps"]
    batch = args.batch or preset["batch"]
    seq_len = args.seq_len or preset["seq_len"]
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.optimizer, 1e-3)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = DataSource(args.data, seq_len, batch, path=args.data_path, mqar_vocab=args.mqar_vocab,
                      mqar_pairs=args.mqar_pairs, val_batches=preset["val_batches"], seed=args.seed)
    model, model_cfg = build_model(args.model, args.preset, data.vocab_size)
    model.to(device)
    n_params = model.num_params()
    opt, opt_note = make_optimizer(args.optimizer, model, lr)
    base_lrs = [float(g["lr"]) for g in opt.param_groups]

    use_cuda = device.type == "cuda"

    # bf16 autocast: on by default on CUDA; --amp bf16 runs the same path on CPU (CI covers it).
    use_amp = args.amp == "bf16" or (args.amp == "auto" and use_cuda)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    fwd, compiled = model, False
    if args.compile == "on" or (args.compile == "auto" and use_cuda):
        try:
            fwd, compiled = torch.compile(model), True
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            print(f"torch.compile unavailable ({type(e).__name__}: {e}); running eager", flush=True)

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
    for step in bar:
        t0 = time.perf_counter()
        x, y = data.train_batch(gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        set_lr(opt, lr_scale_at(step, steps, preset["warmup"]), base_lrs)
        try:
            with autocast():
                _, loss = fwd(x, y)
        except Exception as e:  # noqa: BLE001 - torch.compile errors surface on the first call
            if not compiled:
                raise
            print(f"torch.compile failed ({type(e).__name__}); falling back to eager", flush=True)
            fwd, compiled = model, False
            with autocast():
                _, loss = fwd(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()  # synchronises: the step's time is complete here
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        n_tok = x.numel()
        if step >= args.warm:
            tokens_timed += n_tok
            time_timed += time.perf_counter() - t0
        tokens_since_log += n_tok
        if step % log_every == 0 or step == steps - 1:
            now = time.perf_counter()
            tps = tokens_since_log / max(now - t_log, 1e-9)
            t_log, tokens_since_log = now, 0
            losses.append(loss_value)
            rec = dict(step=step, loss=loss_value, tokens_per_s=tps, lr=opt.param_groups[0]["lr"] if not
                       isinstance(opt.param_groups[0]["lr"], torch.Tensor) else float(opt.param_groups[0]["lr"]),
                       elapsed_s=now - t_start)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", refresh=interactive)
    metrics.close()
    train_time = time.perf_counter() - t_start

    val_loss, val_acc = evaluate(fwd if not compiled else model, data.val_batches, device, autocast)
    tps = tokens_timed / time_timed if time_timed > 0 else float("nan")
    summary = dict(
        model=args.model, optimizer=args.optimizer, optimizer_impl=opt_note, preset=args.preset,
        final_train_loss=float(np.mean(losses[-10:])), val_loss=val_loss, val_bpb=val_loss / math.log(2),
        val_unit=data.unit, val_accuracy=val_acc, tokens_per_s=tps, params=n_params,
        peak_memory_bytes=peak_memory(device), steps=steps, train_time_s=train_time,
        config=dict(args=vars(args), steps=steps, batch=batch, seq_len=seq_len, lr=lr,
                    warmup=preset["warmup"], grad_clip=1.0, compiled=compiled, bf16_autocast=use_amp,
                    autocast="bf16" if use_cuda else None, model=_plain(asdict(model_cfg)), data=data.meta),
        git_sha=git_sha(), versions=versions(), device=device_info(device),
        command=" ".join([sys.executable, "-m", "benchmarks.hope.train", *sys.argv[1:]])
        if sys.argv and sys.argv[0].endswith("train.py") else getattr(args, "command", None),
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.model}+{args.optimizer}: val_loss {val_loss:.4f}  val_bpb {summary['val_bpb']:.4f}  "
          f"tokens/s {tps:,.0f}  params {n_params:,}  -> {out / 'summary.json'}", flush=True)
    return summary


def _plain(obj):
    """JSON-safe copy (tuples -> lists)."""
    return json.loads(json.dumps(obj, default=str))


def main(argv=None):
    args = parse_args(argv)
    args.command = " ".join(["python -m benchmarks.hope.train", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    main()
