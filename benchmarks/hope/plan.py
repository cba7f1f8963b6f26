"""`train --plan`: the memory and FLOPs of one training step, measured without the GPU.

    python -m benchmarks.hope.train --plan --device cpu --preset gpu-125m --model hope \\
        --optimizer adamw --out runs/plan-125m

writes OUT/plan.json:

  params_bytes, grads_bytes  every parameter once (tied weights once), in float32
  optimizer_state_bytes      the optimizer's state after one real step on the CPU model
  activation_bytes           what autograd keeps for the backward of one micro-batch:
      measured by running each segment (the Titans sub-layer, each CMS level; the embedding
      and head) at the preset's micro-batch shapes on the meta device and summing the bytes
      of every tensor autograd saves (`torch.autograd.graph.saved_tensors_hooks`; parameters
      excluded, each tensor object once). Without checkpointing every segment's saved tensors
      are held; with it only each segment's input is held, plus, during the backward, one
      segment's recomputed saved tensors (the largest) and as many bytes again for the
      gradients flowing through it (an allowance, stated as such in the breakdown).
  peak_bytes                 params + grads + optimizer state + activations
  flops_per_step             matmul/conv/attention FLOPs of forward + backward (+ the
      checkpointed recompute) for the whole batch, from torch's FlopCounterMode on the same
      meta-device runs; element-wise work is not counted
  tokens_per_step            batch × seq_len

Activations are counted in float32 (the CPU default; bf16 autocast on a GPU halves most of
them, so the plan is an upper bound there).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .presets import PRESETS, build_model


def _nbytes(t):
    return t.numel() * t.element_size()


def measure_saved(fn, *inputs, exclude=()):
    """Run fn(*inputs) forward + backward; -> (bytes autograd saved for the backward, FLOPs of
    the forward, FLOPs of forward + backward). Tensors in `exclude` (parameters) do not count."""
    skip = {id(p) for p in exclude}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
        return t

    with FlopCounterMode(display=False) as fwd_count:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*inputs)
    saved = total
    with FlopCounterMode(display=False) as bwd_count:
        (out[1] if isinstance(out, tuple) else out).float().sum().backward()
    fwd = fwd_count.get_total_flops()
    return saved, fwd, fwd + bwd_count.get_total_flops()


def optimizer_state_bytes(args, model):
    """Bytes of the optimizer's state after one step with zero gradients on the real model."""
    from .train import build_spec, make_optimizer

    spec = build_spec(args.optimizer, args.lr, dict(args.opt), args.fallback_lr)
    opt, _ = make_optimizer(spec, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += _nbytes(v)
    return total


def plan(args):
    preset = PRESETS[args.preset]["train"]
    batch = args.batch or preset["batch"]
    seq_len = args.seq_len or preset["seq_len"]
    micro = min(args.micro_batch or preset.get("micro_batch") or batch, batch)
    checkpoint = args.checkpoint == "on" or (args.checkpoint == "auto" and preset.get("checkpoint", False))
    vocab = args.mqar_vocab if args.data == "mqar" else 256
    overrides = dict(args.model_opt)
    t0 = time.perf_counter()

    model, cfg = build_model(args.model, args.preset, vocab, **overrides)  # real, on the CPU
    params = {id(p): p for p in model.parameters()}
    params_bytes = sum(_nbytes(p) for p in params.values())
    state_bytes = optimizer_state_bytes(args, model)
    del model

    with torch.device("meta"):
        meta, _ = build_model(args.model, args.preset, vocab, **overrides)
        idx = torch.zeros(micro, seq_len, dtype=torch.long)
        x = torch.empty(micro, seq_len, cfg.d_model, requires_grad=True)
    if args.model == "hope":
        block = meta.blocks[0]
        segments = [("titans", block._titans), *((f"cms[{i}]", lvl) for i, lvl in enumerate(block.cms))]
    else:
        from .transformer import rope_tables

        block = meta.blocks[0]
        cos, sin = rope_tables(seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base, "meta", torch.float32)
        segments = [("block", lambda h: block(h, cos, sin))]
    seg_rows = []
    for name, fn in segments:
        saved, fwd, total = measure_saved(fn, x, exclude=meta.parameters())
        seg_rows.append(dict(segment=name, saved_bytes=saved, input_bytes=_nbytes(x), fwd_flops=fwd, flops=total))

    def head(idx_):  # embedding, final norm, tied head, loss: the parts outside the blocks
        h = meta.wte(idx_)
        logits = meta.lm_head(meta.norm_f(h))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx_.flatten())

    head_saved, _, head_flops = measure_saved(head, idx, exclude=meta.parameters())
    L = cfg.n_layers
    if checkpoint:
        held = L * sum(r["input_bytes"] for r in seg_rows)
        largest = max(r["saved_bytes"] for r in seg_rows)
        activation = held + 2 * largest + head_saved
        breakdown = dict(held_segment_inputs=held, largest_segment_recompute=largest,
                         gradient_allowance=largest, head=head_saved)
    else:
        activation = L * sum(r["saved_bytes"] for r in seg_rows) + head_saved
        breakdown = dict(all_segments=L * sum(r["saved_bytes"] for r in seg_rows), head=head_saved)
    n_micro = -(-batch // micro)
    flops_micro = L * sum(r["flops"] + (r["fwd_flops"] if checkpoint else 0) for r in seg_rows) + head_flops
    peak = 2 * params_bytes + state_bytes + activation
    return dict(
        preset=args.preset, model=args.model, optimizer=args.optimizer, batch=batch, micro_batch=micro,
        micro_batches=n_micro, seq_len=seq_len, checkpointing=checkpoint, n_layers=L,
        params=sum(p.numel() for p in params.values()), params_bytes=params_bytes, grads_bytes=params_bytes,
        optimizer_state_bytes=state_bytes, activation_bytes=activation, activation_breakdown=breakdown,
        segments=seg_rows, peak_bytes=peak, peak_gib=peak / 2**30, flops_per_step=flops_micro * n_micro,
        tokens_per_step=batch * seq_len, dtype="float32", measured_in_s=time.perf_counter() - t0,
    )


def write_plan(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(plan(args), command=getattr(args, "command", None))
    (out / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model} {args.preset}: peak {result['peak_bytes'] / 1e9:.2f} GB (activations "
          f"{result['activation_bytes'] / 1e9:.2f} GB, micro-batch {result['micro_batch']}×{result['micro_batches']}, "
          f"checkpointing {'on' if result['checkpointing'] else 'off'}), {result['flops_per_step'] / 1e12:.2f} TFLOP "
          f"per step, {result['tokens_per_step']:,} tokens -> {out / 'plan.json'}", flush=True)
    return result
