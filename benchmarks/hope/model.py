"""HOPE: a self-modifying Titans layer followed by a Continuum Memory System (NL §8).

Reads top to bottom in the order data flows: config → memory algebra (the residual-MLP
memory, its closed-form inner gradients, the DGD step) → self-modifying Titans (generators,
one chunk of eq. 90, the sequential per-token reference) → CMS levels → HOPE block → LM.
The math is docs/math.md §7–§8. Notation: B batch, T tokens, D model width, H heads,
d = D/H head width, f memory hidden width, C chunk size; the five memories are stacked in
the order (k, v, η, α, memory).

The equations implemented (defaults; the options are listed under "Choices")
-----------------------------------------------------------------------------
Every memory is a residual two-layer MLP per head, M_φ(x) = x + W₁ σ(W₂ x), φ = (W₁, W₂),
W₂: f×d, W₁: d×f, σ = SiLU. For each head and token t = 1…T of a sequence:

    x̃_t = conv(x_t W_in),   q_t = normalize(conv(x_t W_q))         fixed projections
    k_t = normalize(M_k(x̃_t)),  v_t = M_v(x̃_t)                     generator memories
    η_t = min(s_η · softplus(w_ηᵀ M_η(x̃_t) + b_η), η_max)            (s_η = 1, η_max = 16)
    α_t = sigmoid(w_αᵀ M_α(x̃_t) + b_α)                              (b_α = 4 at init)
    v̂_t = M_{φ_{t−1}}(v_t)                                           self-generated target
    ℓ_t(φ) = ½ ‖M_φ(k_t) − v̂_t‖²
    for each layer W ∈ {W₁, W₂} of M_memory, with x_in its input and δ = ∂ℓ_t/∂(W x_in):
        W_t = α_t W_{t−1} − η′_t c_t δ x_inᵀ,   η′_t = η_t / (1 + η_t ‖x_in‖² ‖J‖²_F)   (DGD, §7)
        J = ∂M/∂(W x_in): I for W₁ (x_in = a = σ(W₂k)), W₁ diag σ′(W₂k) for W₂ (x_in = k)
        c_t = min(1, 0.3 / ‖δ x_inᵀ‖_F)                                  inner clip (choice 15)
    o_t = M_{φ_t}(q_t)                                                read after the write
    y_t = W_o [o_t]_heads

The generators M_k, M_v, M_η, M_α are fixed at their meta-learned φ₀ (they are not
written; `generator_writes` restores the paper's self-modification, see choice 12). Every
initial state φ₀ is an outer parameter; the fast state is per sequence.

Chunked training (eq. 90 made causal): within a chunk of C tokens starting at state φ_b,
every target v̂ and every inner gradient is taken at φ_b; the recurrence is unrolled in
closed form, φ_t = (Π_{r≤t} α_r) φ_b − Σ_{s≤t} (Π_{s<r≤t} α_r) η′_s c_s G_s, so the
chunk's end state is one weighted sum of outer products and o_t = M_{φ_t}(q_t) for every t
in the chunk comes from C×C masked score matrices (as chunked linear attention). At C = 1
this is the plain per-token recurrence. `titans_reference` computes the same thing token
by token with autograd inner gradients; tests hold the two equal in float64.

CMS (eq. 70–71): levels ℓ = 1…L in sequence, each h ← h + MLP_{φ_ℓ}(RMSNorm(h)) with
MLP(u) = W_down σ(W_up u); φ_ℓ starts at outer parameters and is written only after tokens
t ≡ 0 (mod C_ℓ) with the sum of the per-token gradients of the last C_ℓ tokens, all at the
level's current state: φ_ℓ ← φ_ℓ − η_ℓ Σ_{t in period} c_t ∇ℓ_t(φ_ℓ), with
ℓ_t(φ) = ½ ‖MLP_φ(u_t W_κᵀ) − u_t W_νᵀ‖² (u_t the level's normalised input; W_κ, W_ν outer
parameters) and η_ℓ = η_max,CMS · sigmoid(ρ_ℓ) learned. With η_ℓ = 0 a level is exactly a
Transformer MLP.

"Writes off" (`Hope.set_writes(False)`): every memory reads φ₀ (Titans: o_t = M_{φ₀}(q_t);
CMS: the MLP of φ₀). It is how a run checks that the memory does the remembering, and,
with `train --train-writes off`, the "static HOPE" baseline.

How it was decided (MQAR, `python -m benchmarks.hope.ablate`)
----------------------------------------------------------------
The design before this ablation (generators written with M_memory's α, one input x̃ for all
generators, η = min(0.5 · softplus, 1)) was inert on text (writes off at evaluation: +0.003
bpb) and learned recall slowly. On the MQAR recipe `cpu-mqar` (vocab 64, 6 pairs, T = 48,
B = 32, AdamW lr 3e-3, 1000 steps, seed 0), variants of `ablate.VARIANTS`:

    variant                                       train loss @450  @990   val acc  writes off
    old                                           2.82   (stopped at 530: 2.87)
    static-gen+eta: generators static, η ≤ 16     2.28   1.89   0.212    0.027
    static-gen+eta+inputs: x̃ per generator        3.30   (stopped at 450)
    default: + M_k's conv starts at t − 1         0.55   0.115  0.972    0.028
    Transformer++ (same recipe)                   1.92   1.75   0.213    —

Why these changes:
  * η scale and cap. With the residual MLP's hidden activations a = σ(W₂ k) of norm ~0.5 at
    init, η ≈ 0.35 corrected η‖a‖²/(1 + η‖a‖²) ≈ 8% of a key's recall error per write.
    DGD's η′ makes any η safe for one layer's write — the corrected fraction η‖x‖²/(1 + η‖x‖²)
    stays below 1 — so the cap is 16 and the scale was 4 (≈ 40% correction per write at init).
    That scale held on MQAR (T = 48) but not on long sequences: it is now 1 (choice 14).
  * Static generators. Written with M_memory's α, the k/v/η/α memories decay and drift
    with the state they generate (the old design on text: retention mean 0.59, 5th
    percentile 0.0, η at its cap on 23% of tokens: a feedback loop). Static generators
    remove the loop, and the chunk loop writes one memory instead of five.
  * Keys that are not values. With one x̃ for M_k and M_v, both residual memories pass the
    same features, so a key carried its value token: the model learned "one of the 6 stored
    values" (loss ≈ ln 6, accuracy 0.21) but not which. A projection per generator alone
    learned more slowly; starting x̃_k's causal convolution at the previous token (H3's
    shift for keys, still learnable) makes the key of a value its key token: recall 0.97.
Not ablated for lack of time, kept as options with tests: `out_read="strict"` (NL eq. 94's
s < t read), `out_norm` (Titans' output RMSNorm), `generator_writes="separate"` (the
generators' own retention), α's initialisation (`alpha_bias_init`).

Choices where docs/math.md §8 / the paper are ambiguous (config field where one exists)
----------------------------------------------------------------------------------------
1. Heads and inputs. Memories are per head (d = D/H) to keep per-sequence state small.
   Per-head generator inputs need a mixing of the D features, so x̃ = x W_in is one fixed
   projection shared by M_k, M_v, M_η, M_α (`generator_inputs="separate"`: one each).
   Head outputs are mixed by a fixed W_o, as in attention.
2. Convolutions: causal depthwise, window `conv_size` = 4, on x W_in and x W_q, i.e. right
   after the fixed projections, initialised near identity.
3. q is not adaptive (the paper's ablation finds a fixed q slightly better).
4. η, α memories output d-vectors (the residual MLP is square); a fixed per-head read-out
   vector and bias turn them into one scalar per head and token:
   η_t = min(eta_scale · softplus(·), eta_max), α_t = α_min + (1 − α_min) sigmoid(·) ∈
   (α_min, 1) (choice 16), bias initialised to `alpha_bias_init` (α ≈ 0.98).
5. Inner-gradient clipping (Titans NaNs without it): each layer's per-token gradient
   δ x_inᵀ is scaled by min(1, inner_clip / ‖δ‖‖x_in‖) before the step, in every path
   alike; `inner_clip=None` turns it off. The bound is 0.3 (choice 15).
6. Output read (`out_read`). "causal" (default): o_t reads the state *after* token t's own
   write (Titans' retrieve-after-store). "strict": o_t reads φ_{t−1} (NL eq. 94's s < t).
   "boundary": every read of a chunk uses φ_b. The generators and targets always read φ_b.
   All three are tested against the reference.
7. Targets v̂ are constants inside the inner objective; the outer gradient flows through
   them and through every inner update (no stop-gradient; the initial states are
   nn.Parameters).
8. CMS: periods from the preset (e.g. (16, 64, 256) tokens for GPU presets, shorter for CPU);
   η_ℓ learned per level; no retention in CMS levels; the same inner clipping per token.
9. Fast state is per sequence (batch dimension), reset at the start of every training
   sequence. Sequences are windows of the corpus and may cross a file boundary; the state is
   *not* reset there (the Transformer baseline equally attends across it).
10. The CMS write after a period fires only for a complete period; the tail of a sequence
   shorter than C_ℓ is read but never written (no later token would read that write).
11. Memory init: W₂,0 ~ N(0, 1/d), W₁,0 ~ N(0, 1/f) per memory, so M_k and M_v differ at
   init (with W₁,0 = 0 every memory would be the identity and k = v).
12. `generator_writes`: "off" (default, above); "shared": the generators take the same DGD
   step as M_memory, with the same α_t (the paper's self-modification, the old default);
   "separate": the same step with their own retention read-out α_gen,t.
13. DGD's closed form is applied layer by layer (W₁: the exact proximal minimiser of ℓ with
   W₂ frozen, tested; W₂: a proximal step on the Gauss–Newton model of ℓ, its curvature
   majorised by a scalar, choice 15), with decoupled
   retention (α W instead of W) and the k kᵀ shrink applied once (NL eq. 93 applies it twice).
14. η's scale `eta_scale` = 1 (η ≈ 0.69 at init), not the ablation's 4 (η ≈ 2.8). Each layer's
   DGD rate makes that layer's write contractive alone, but W₁ and W₂ are written together and
   the inner loss is not convex in (W₁, W₂) jointly: the write map's Jacobian over a sequence
   grows exponentially with the number of tokens at η ≈ 2.8, while the forward state stays
   bounded only through the inner clip (no clip: NaN at init). The outer gradient inherits that
   growth. Measured in float64 at init (one Titans layer, D = 64, 2 heads, f = 32, random unit-RMS
   input, ‖∂⟨y, r⟩/∂x‖ with writes on over writes off, seeds 0–2): at s_η = 4, 6.4–8.3 at
   T = 128 and 1.2e4–3.3e4 at T = 512; s_η = 2: 2.2–2.7 and 22–93; s_η = 1: 1.04–1.07 and
   1.2–1.4 (`test_titans_outer_gradient_does_not_grow_with_sequence_length`). Writing W₁ alone
   or W₂ alone at s_η = 4 does not grow; neither bf16 (float64 the same) nor the widths are the
   cause (cpu-tiny's widths at T = 512 grow as gpu-small's). The whole model at gpu-small,
   T = 512, B = 2, float32 CPU, step 0: gradient norm 2.8e5 (writes off: 15.8) at s_η = 4,
   17.9 at s_η = 1; on the H200 the global clip to 1.0 then scaled every other gradient by
   1e-4 … 1e-7 (HOPE plateaued at ~3.3 nats/byte, then NaN). MQAR (`cpu-mqar`, seed 0) at
   s_η = 1: val accuracy 1.0, writes off 0.025. η is learned and climbed back (gpu-small at
   s_η = 1, B = 2: layer 0's mean η 1.93 and gradient norm 4.0e3 at step 80): choice 15.
15. W₂'s rate (`w2_rate="gauss-newton"`) and the inner clip 0.3 (`inner_clip`, was 1.0). W₂'s step
   −η′ g kᵀ moves M(k) by −η′‖k‖² W₁S²W₁ᵀ e to first order (S = diag σ′(W₂k)); the rate
   η/(1 + η‖k‖²) (`w2_rate="input"`, before) ignores W₁S, so at large η W₂'s factor overshoots,
   and with W₁'s own step the joint first-order factor I − η′₁‖a‖² − η′₂‖k‖²W₁S²W₁ᵀ leaves
   [−1, 1]. "gauss-newton" majorises W₂'s curvature by ‖k‖²‖W₁S‖²_F (one bmm per chunk): each
   layer's factor then lies in [0, 1] and the joint one in [−1, 1] for every η
   (`test_w2_step_contracts_its_gauss_newton_model`). One layer, float64, T = 512, the
   input-gradient gain writes on / off (tests' `_write_gain`), seeds 0–2, η pinned at η_max = 16
   (b_η = 50), clip 1.0: "input" 4.9e7–2.2e8; "input" with η_max = 1: 6.4–12, η_max = 2:
   311–2.6e3, η_max = 4: 1.5e4–2.7e5; one joint rate η/(1 + η(‖a‖² + ‖k‖²‖W₁S‖²_F)) for both
   layers with one joint clip: 1.35–1.92; the exact ‖W₁S‖²_op (an SVD per token) for W₂ only:
   1.87–2.04, for a joint rate: 30–35; joint rates from the curvature along e or along the step
   (no max bound): 1.6e5–1.7e6 and 7.2e5–1.6e6; "gauss-newton": 1.40–1.48 (1.02–1.08 at the
   default η; input scaled ×3: 1.5–2.2, "input" 195–893).
   That alone did not stabilise training. gpu-small, B = 2, T = 512, CPU float32, AdamW 3e-3,
   600 s (~340 steps), clip 1.0: gradient norm above 1e3 on 28 of the first 100 steps with
   either rate (max 4.1e6 "input", 1.8e6 "gauss-newton"); val bpb 4.10 and 4.31. Those spikes
   were at η ≈ 0.7–0.9, not at η's cap: the outer gradients of the first chunks' α, η and k grew
   backwards through ~500 writes that the clip, not the rate, bounded. With the weights of that run's
   step 21 and Titans writes on in layer 2 only: gradient norm 2.1e6 at clip 1.0, 27 at 0.5, 6.3
   at 0.3, NaN loss without the clip (all Titans writes off: 6.5). Trained at clip 0.3
   (same run otherwise): "input" had 8 steps above 1e3 in the first 200 (max 1.3e4), val bpb 3.39
   (writes off 3.43); "gauss-newton" none in 338 steps (max 78), val bpb 3.18 (writes off 3.21).
   Seed 1, the former defaults ("input", clip 1.0): 69 steps above 1e3 in the first 200 (max
   5.2e7), val bpb 4.23 (writes off 4.28); the defaults: 2 (steps 49 and 65: 9.9e4, 2.0e4), none
   after step 65, val bpb 3.28 (writes off 3.43). So spikes are rarer, not gone; the writes' own
   benefit stays small (0.03–0.15 bpb). MQAR (`cpu-mqar`, seed 0) at the
   defaults: val accuracy 1.000, writes off 0.038.
   The clip is shared with the CMS levels (their η ≤ 0.1; not separately measured).
16. The retention floor (`alpha_min` = 0.1): α_t = α_min + (1 − α_min) sigmoid(·), computed in log
   space. On an H200, gpu-small without a floor (`gpu_check --parts tests,hope`, 2,000-step schedule,
   CUDA graphs) skipped its first non-finite step at 264 (AdamW) and 341 (DMGD), and stopped after
   the 21st skip (at 1,164 and 1,528; the limit is 20). The loss stayed finite; the gradient was NaN. The saved first
   step (`nonfinite_first.pt`), replayed on the CPU, gave NaN in float32 and a gradient norm of 1.63
   in float64 (one sequence), with the fused and the autograd scans alike: not a kernel bug. The NaN came
   from `TitansScan`'s backward in layer 0. One head had α ≈ 0.002 per token and η at its cap 16,
   with values of norm up to ~300. Its state fell to ~1e-42 over one chunk whose last tokens did
   not write, and the writes then regrew it ~2,000-fold per chunk (the zero state is a saddle:
   there the write is linear in the state). The end state is proportional to that remnant, so
   the remnant's adjoint reached ~1e37–1e39 and overflowed float32. Any chunk keeps at least
   α_min^C of its state, 1e-16 at C = 16: two such chunks in a row leave ~1e32, still inside
   float32. `tests/test_hope_fused.py` rebuilds the collapse: keep 1e-42 gives a NaN gradient,
   α_min^C a finite one. The replayed steps are finite with the floor at every α_min from 1e-3 to
   0.5, and their loss moves by at most 0.013.
   Learning with the floor: on the H200 at α_min = 0.5 (693 steps, eager, three runs side by side)
   there was no non-finite step. HOPE + DMGD reached 1.859 val bpb (writes off 2.857), HOPE + AdamW
   2.221 (3.592), and the Transformer++ 1.701. HOPE + DMGD's train loss lagged the unfloored runs
   (2.14 against 1.58–1.59 at step 200, 1.57 against 1.17–1.33 near step 490). A HOPE + AdamW run
   at 0.5 with CUDA graphs went 420 steps with no skip (2.840). At cpu-tiny with T = 512 (HOPE +
   DMGD, 300 steps, batch 4) the floor made no difference: α_min 0 gave 2.562 and 2.549 val bpb
   (seeds 0, 1), 0.05 gave 2.544 and 2.579, 0.1 gave 2.559 and 2.540, 0.5 gave 2.544 and 2.538.
   At gpu-small's shapes on the CPU (HOPE + DMGD, batch 4, 200 steps, float32, seed 0) neither
   floor cost anything: α_min 0 gave 2.729 val bpb (writes off 2.873), 0.1 gave 2.697 (2.898),
   0.5 gave 2.690 (2.884). The H200's lag at 0.5 is one run at batch 16, unexplained.
   `cpu-mqar` at 0.1: accuracy 0.999, 0.032 with the writes off. 0.1, the default, is the
   smallest floor that keeps the float32 bound above. On the H200 at 0.1 (gpu-small, the
   2,000-step schedule, CUDA graphs, three runs side by side, cut at the deadline): HOPE + DMGD
   went 1,756 steps with no non-finite step and reached 1.333 val bpb (writes off 2.650), ahead of
   the Transformer++'s 1.473 after 2,000 steps, with no lag like the one at 0.5. HOPE + AdamW at
   3e-3 skipped 9 of 1,839 steps (first at 419) and reached 1.763; at 1e-3 it skipped none in
   1,510 steps and reached 1.666. So the floor removes the collapse that stopped the unfloored
   runs; AdamW's rare remaining NaN steps (0.5%) were not replayed (benchmarks/README.md, "The
   fourth session's calls").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from deepopt._memory import silu_grad

from .fused import CausalConv, CMSScan, GeneratorRead, Normalize, RMSNorm, TitansScan

# memory slots, stacked along one axis of the fast state
MEM_K, MEM_V, MEM_ETA, MEM_ALPHA, MEM_OUT = range(5)
N_MEMORIES = 5


@dataclass
class HopeConfig:
    vocab_size: int = 256        # bytes
    d_model: int = 64            # D
    n_layers: int = 2
    n_heads: int = 2             # H; head width d = D / H
    mem_hidden: int = 32         # f, hidden width of every residual-MLP memory
    chunk_size: int = 16         # C of eq. 90
    conv_size: int = 4           # docs/math.md §8: window 4
    cms_periods: tuple[int, ...] = (16, 64)   # C_ℓ, one CMS level each
    cms_hidden: int = 128        # hidden width of each CMS level's MLP
    cms_eta_init: float = 0.01   # η_ℓ at init
    cms_eta_max: float = 0.1     # upper bound of η_ℓ
    eta_scale: float = 1.0       # η_t = min(eta_scale · softplus(·), eta_max); 4 made long sequences chaotic (choice 14)
    eta_max: float = 16.0        # DGD's η′ (with w2_rate="gauss-newton") keeps every η stable (choice 15)
    w2_rate: str = "gauss-newton"  # W₂'s DGD rate: its Gauss–Newton curvature ‖k‖²‖W₁ diag σ′‖_F², or "input": ‖k‖²
    eta_bias_init: float = 0.0   # η read-out bias at init: η = eta_scale · softplus(0) ≈ 0.69 eta_scale
    alpha_bias_init: float = 4.0  # retention at init α_min + (1 − α_min) sigmoid(4) ≈ 0.984
    alpha_min: float = 0.1       # retention floor, α_t ∈ (α_min, 1): no memory collapses to the zero state (choice 16)
    inner_clip: float | None = 0.3  # per-token inner-gradient Frobenius clip (Titans and CMS); 1.0 before choice 15
    out_read: str = "causal"     # "causal" (retrieve after store), "strict" (before) or "boundary"
    generator_writes: str = "off"  # M_k, M_v, M_η, M_α static, or written with M_memory's α / their own
    generator_inputs: str = "separate"  # a fixed projection x̃ per generator, or one "shared" by all four
    key_shift_init: bool = True  # x̃_k's convolution starts at the previous token (needs separate inputs)
    out_norm: bool = False       # per-head RMSNorm of the read o before W_o

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must divide into n_heads={self.n_heads}")
        choices = dict(out_read=("causal", "strict", "boundary"), generator_writes=("shared", "separate", "off"),
                       generator_inputs=("shared", "separate"), w2_rate=("gauss-newton", "input"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not 0.0 <= self.alpha_min < 1.0:
            raise ValueError(f"alpha_min={self.alpha_min!r}: expected 0 <= alpha_min < 1 (0: no floor)")
        if self.key_shift_init and (self.generator_inputs != "separate" or self.conv_size < 2):
            raise ValueError("key_shift_init=True needs generator_inputs='separate' and conv_size >= 2; "
                             "pass key_shift_init=False with shared inputs")
        self.cms_periods = tuple(int(p) for p in self.cms_periods)


# -----------------------------------------------------------------------------
# Memory algebra: residual MLP, closed-form inner gradients, DGD


def _silu_grad(z):  # z: any shape; d/dz [z σ(z)], the closed form deepopt's backends share
    return silu_grad(z, torch.sigmoid)


def mem_apply(w1, w2, x):
    """Residual two-layer memory M(x) = x + W₁ σ(W₂ x), batched over leading dims.

    w1: (..., d, f) output-side weight W₁
    w2: (..., f, d) input-side weight W₂
    x:  (..., n, d) n rows to read
    returns y (..., n, d), z = W₂x (..., n, f), a = σ(z) (..., n, f)
    """
    z = x @ w2.transpose(-1, -2)  # (n, d)(d, f)
    a = F.silu(z)
    y = x + a @ w1.transpose(-1, -2)  # (n, f)(f, d)
    return y, z, a


def mem_inner_grad(w1, w2, k, vhat):
    """Error signals of ℓ = ½‖M(k) − v̂‖² per row, in closed form.

    w1: (..., d, f), w2: (..., f, d)
    k:    (..., n, d) keys
    vhat: (..., n, d) targets (constants of ℓ)
    returns e (..., n, d) = ∂ℓ/∂y, a (..., n, f) = W₁'s input, g (..., n, f) = ∂ℓ/∂z,
    so that ∇_{W₁} ℓ = e aᵀ and ∇_{W₂} ℓ = g kᵀ (outer products per row).
    """
    y, z, a = mem_apply(w1, w2, k)
    e = y - vhat
    g = (e @ w1) * _silu_grad(z)  # W₁ᵀ e per row: (n, d)(d, f)
    return e, a, g


def dgd_rate(eta, x_sq, delta_sq, clip):
    """Per-token scale of δ x_inᵀ in a DGD step: η′ · clip factor.

    eta: (...) inner rate η; x_sq: (...) ‖x_in‖²; delta_sq: (...) ‖δ‖²
    η′ = η / (1 + η ‖x_in‖²) is docs/math.md §7's Sherman–Morrison rate; the clip factor
    min(1, clip / ‖δ x_inᵀ‖_F) uses ‖δ x_inᵀ‖_F = ‖δ‖ ‖x_in‖.
    """
    return eta / (1 + eta * x_sq) * clip_factor(x_sq, delta_sq, clip)


def clip_factor(x_sq, delta_sq, clip):
    """min(1, clip / ‖δ xᵀ‖_F) with ‖δ xᵀ‖_F = ‖δ‖‖x‖; x_sq, delta_sq: (...). 1 if clip is None."""
    if clip is None:
        return torch.ones_like(x_sq * delta_sq)  # broadcast shape of the two
    return torch.clamp(clip / torch.sqrt(x_sq * delta_sq + 1e-30), max=1.0)


def dgd_step(w, x, u, eta, alpha=1.0):
    """One DGD step of a linear memory y = W x towards target u (docs/math.md §7), decoupled retention.

    w: (..., m, n); x: (..., n); u: (..., m); eta, alpha: floats or (...) tensors
        W⁺ = α W − η′ (W x − u) xᵀ,   η′ = η / (1 + η ‖x‖²)
    With α = 1 this is argmin_W′ ½‖W′x − u‖² + (1/2η)‖W′ − W‖² exactly (Sherman–Morrison);
    with α < 1 it is that minimiser minus (1 − α) W. The k kᵀ shrink (here W x xᵀ) appears
    once: NL eq. 93 writes both the shrink and the full L2 gradient, applying it twice.
    """
    eta = torch.as_tensor(eta, dtype=w.dtype, device=w.device)
    alpha = torch.as_tensor(alpha, dtype=w.dtype, device=w.device)
    rate = eta / (1 + eta * (x * x).sum(-1))
    err = (w @ x.unsqueeze(-1)).squeeze(-1) - u  # (..., m)
    return alpha[..., None, None] * w - rate[..., None, None] * err.unsqueeze(-1) * x.unsqueeze(-2)


# -----------------------------------------------------------------------------
# Chunk kernels of the Titans scan (eq. 90), in the layout the scan keeps its state in
#
# A training step is bound by operator dispatch, not FLOPs (cpu-tiny: ~10 µs per op), so the
# scan is split by what depends on the fast state. Only the writes are sequential: the
# inputs of every chunk (`chunk_constants`) are computed for all chunks at once, the loop
# runs `chunk_grads` + `chunk_write` per chunk (eager: `fused.TitansScan`, the same function
# with a hand-written backward), and every chunk's output read (`chunk_read`) is one batched
# call after the loop, from the stacked boundary states.
# Layout: N = rows of memories (B·H·M), 3-D tensors so each product is one `bmm`; the
# state is kept transposed, W₁ᵀ (N, f, d) and W₂ᵀ (N, d, f), which makes every product of
# the loop a plain `bmm` of the stored tensors.


def chunk_constants(k, v, eta, log_alpha, clip):
    """State-independent inputs of chunks' writes and reads; any leading dims (...).

    k, v: (..., C, d) unit keys and values; eta: (..., C) inner rates;
    log_alpha: (..., C) log retention of the written memory; clip: float | None.
    returns a dict of
      x      (..., 2C, d)  values then keys: v̂ = M_b(v) and M_b(k) come from one read
      k      (..., C, d),  kt (..., d, C) = kᵀ
      k_norm (..., C, 1)   ‖k‖ (the clip factor of W₂'s step)
      eta    (..., C, 1);  eta_c = η · clip (η without a clip)
      k_sq   (..., C, 1)   ‖k‖²;  s2 (..., C, 1) W₂'s `w2_rate="input"` rate before clipping, η / (1 + η‖k‖²)
      cum    (..., C)      Σ_{r≤t} log α_r inside the chunk;  log_alpha (..., C)
      carry  (..., C, 1)   Π_{r>t} α_r;  keep (..., 1, 1) = Π_r α_r
    """
    eta = eta.unsqueeze(-1)
    x = torch.cat([v, k], dim=-2)
    k = x[..., k.shape[-2] :, :]  # k in x's contiguous layout (leading dims then merge without a copy)
    k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    cum = log_alpha.cumsum(-1)
    total = cum[..., -1:]
    return dict(x=x, k=k, kt=k.transpose(-1, -2), k_norm=k_norm, eta=eta,
                eta_c=eta * clip if clip is not None else eta, k_sq=k_norm * k_norm,
                s2=eta / (1 + eta * k_norm * k_norm),
                cum=cum, log_alpha=log_alpha, carry=torch.exp(total - cum).unsqueeze(-1),
                keep=torch.exp(total).unsqueeze(-1))


def chunk_grads(w1t, w2t, c, clip, w2_rate="gauss-newton"):
    """The state-dependent half of one chunk's DGD write: error signals and step sizes at φ_b.

    w1t: (N, f, d) = W₁ᵀ, w2t: (N, d, f) = W₂ᵀ  the boundary state φ_b of the written memories
    c: one chunk's `chunk_constants` (leading dim N)
    returns e (N, C, d) = M_b(k) − v̂ = ∂ℓ/∂y, a (N, C, f) = σ(W₂k) = W₁'s input,
    g (N, C, f) = (W₁ᵀ e) ⊙ σ′(W₂k) = ∂ℓ/∂z (as `mem_inner_grad`), and the per-token step
    sizes s1, s2 (N, C, 1) of W₁ (input a) and W₂ (input k): η′ times the clip factor
    min(1, clip/‖δ xᵀ‖_F) = clip / max(‖δ‖‖x‖, clip) (`dgd_rate`). W₁'s η′ = η/(1 + η‖a‖²);
    W₂'s η′ = η/(1 + η‖k‖²‖W₁ diag σ′(z)‖_F²) (w2_rate "gauss-newton", choice 15) or
    η/(1 + η‖k‖²) ("input"), with ‖W₁ diag σ′‖_F² = Σ_j σ′(z_j)² ‖W₁[:, j]‖².
    """
    C = c["x"].shape[-2] // 2
    z = torch.bmm(c["x"], w2t)  # (N, 2C, f): W₂ of [v; k]
    act = F.silu(z)
    vhat, yk = (c["x"] + torch.bmm(act, w1t)).split(C, dim=1)  # M_b(v), M_b(k)
    a, zk = act[:, C:], z[:, C:]
    e = yk - vhat
    sig = torch.sigmoid(zk)
    dsig = torch.addcmul(sig, a, 1 - sig)  # σ′ = σ + silu·(1 − σ)
    g = torch.bmm(e, w1t.transpose(1, 2)) * dsig
    a_norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    eta = c["eta"]
    if w2_rate == "gauss-newton":  # ‖k‖² ‖W₁ diag σ′(z)‖_F²: the rows of W₁ᵀ are W₁'s columns
        curv2 = c["k_sq"] * torch.bmm(dsig * dsig, (w1t * w1t).sum(-1, keepdim=True))
        s2 = eta / (1 + eta * curv2)
    else:
        s2 = c["s2"]
    if clip is None:
        return e, a, g, eta / (1 + eta * a_norm * a_norm), s2
    e_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    s1 = c["eta_c"] / ((1 + eta * a_norm * a_norm) * torch.clamp_min(a_norm * e_norm, clip))
    s2 = s2 * clip / torch.clamp_min(c["k_norm"] * g_norm, clip)
    return e, a, g, s1, s2


def chunk_write(w1t, w2t, c, e, a, g, s1, s2):
    """φ_b -> the chunk's end state: φ = (Π α) φ_b − Σ_t (Π_{r>t} α_r) s_t G_t, one bmm per layer.

    W₁ᵀ ← keep·W₁ᵀ − aᵀ (carry·s1·e),  W₂ᵀ ← keep·W₂ᵀ − kᵀ (carry·s2·g)   (all (N, ·, ·))
    """
    carry = c["carry"]
    w1t = c["keep"] * w1t - torch.bmm(a.transpose(1, 2), carry * s1 * e)
    w2t = c["keep"] * w2t - torch.bmm(c["kt"], carry * s2 * g)
    return w1t, w2t


def chunk_read(w1t, w2t, q, kt, e, a, g, s1, s2, cum, log_alpha, read):
    """Output reads o_t = M_{φ_t}(q_t) of chunks, batched over rows R (chunks × heads × batch).

    w1t (R, f, d), w2t (R, d, f): each chunk's boundary state (the output memory only)
    q (R, C, d) unit queries; kt (R, d, C); e, a, g, s1, s2, cum, log_alpha: as returned by
    `chunk_grads` / `chunk_constants` for those chunks; read: "causal" | "strict" | "boundary".
    φ_t = A_t φ_b − Σ_{s≤t} D_ts s_s G_s with A_t = Π_{r≤t} α_r, D_ts = Π_{s<r≤t} α_r
    ("causal", s ≤ t); "strict" reads φ_{t−1} (A_{t−1}, D_{t−1,s}, s < t: NL eq. 94), so
    W₂,t q_t = A_t W₂,b q_t − Σ_s D_ts s2_s (k_s·q_t) g_s, likewise W₁,t h_t with (a_s·h_t) e_s:
    C×C masked score matrices, as in chunked linear attention.
    returns o (R, C, d)
    """
    if read == "boundary":
        return q + torch.bmm(F.silu(torch.bmm(q, w2t)), w1t)
    C = q.shape[1]
    cum_r = cum - log_alpha if read == "strict" else cum  # log A at the read
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 if read == "strict" else 0)
    dmat = torch.exp((cum_r.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~mask, float("-inf")))  # (R,C,C)
    a_t = torch.exp(cum_r).unsqueeze(-1)  # (R, C, 1)
    scores2 = dmat * torch.bmm(q, kt) * s2.transpose(1, 2)
    # A_t (W₂,b q_t) as (A_t q_t) W₂,b, so that each layer's two products are one bmm and one baddbmm
    z = torch.baddbmm(torch.bmm(a_t * q, w2t), scores2, g, alpha=-1)
    h = F.silu(z)  # (R, C, f)
    scores1 = dmat * torch.bmm(h, a.transpose(1, 2)) * s1.transpose(1, 2)
    return torch.baddbmm(torch.baddbmm(q, a_t * h, w1t), scores1, e, alpha=-1)


# -----------------------------------------------------------------------------
# Self-modifying Titans


def _autograd_form(x) -> bool:
    """Whether the non-scan Functions below give way to their autograd forms: under autocast
    (its own dtype rules) and on the meta device (shape-only planning)."""
    return x.device.type == "meta" or torch.is_autocast_enabled(x.device.type)


def rms_norm(norm, x):
    """``norm(x)`` for an `nn.RMSNorm` over the last dim: `fused.RMSNorm` (hand-written backward)
    outside autocast, the module itself under it (autocast's own dtype rules)."""
    if _autograd_form(x) or norm.weight is None or norm.eps is None or len(norm.normalized_shape) != 1:
        return norm(x)
    return RMSNorm.apply(x, norm.weight, norm.eps)


def normalize(x):
    """``F.normalize(x, dim=-1)``: `fused.Normalize` (hand-written backward) outside autocast."""
    if _autograd_form(x):
        return F.normalize(x, dim=-1)
    return Normalize.apply(x, 1e-12)


def in_float32(fn, *tensors, **kwargs):
    """``fn(*tensors, **kwargs)`` with autocast off and half-precision tensors cast to float32.

    The scans write the fast weights once per chunk or period, hundreds of times per sequence,
    each write a small correction to a state of norm ~1; under bf16 autocast every product of
    those writes would round to 8 bits of mantissa. So the recurrences run in float32, as
    chunked linear-attention kernels keep their state; the projections around them still take
    autocast's bf16. (This was tried first against gpu-small's NaN on an H200 and did not
    prevent it: that was the η scale, choice 14.)
    """
    device = tensors[0].device.type
    half = (torch.float16, torch.bfloat16)
    if device == "meta" or (not torch.is_autocast_enabled(device) and all(t.dtype not in half for t in tensors)):
        return fn(*tensors, **kwargs)
    with torch.autocast(device, enabled=False):
        return fn(*(t.float() if t.dtype in half else t for t in tensors), **kwargs)


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise 1-D convolution over time, window `size`, started near identity."""

    def __init__(self, channels, size):
        super().__init__()
        self.size = size
        w = torch.randn(channels, 1, size) * 0.02
        w[:, 0, -1] += 1.0  # the current token's tap: starts as (almost) a pass-through
        self.weight = nn.Parameter(w)

    def forward(self, x):  # x: (B, T, channels); `fused.CausalConv`, the taps as shifted multiply-adds
        return CausalConv.apply(x, self.weight[:, 0])


class SelfModifyingTitans(nn.Module):
    def __init__(self, cfg: HopeConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.d_model, cfg.n_heads
        d, f = D // H, cfg.mem_hidden
        self.n_head, self.head_dim = H, d
        self.writes = True  # False: every read uses φ₀ (static HOPE / writes-off evaluation)
        self.fused = True  # the chunk writes through `fused.TitansScan` (False: autograd's, as `compile_scans` sets)
        self.record_stats = False  # True: keep the last forward's memory statistics in .stats
        self.stats = None
        self.n_inputs = MEM_OUT if cfg.generator_inputs == "separate" else 1  # G: x̃ per generator or one
        self.w_in = nn.Linear(D, self.n_inputs * D, bias=False)  # generator inputs x̃ (choice 1)
        self.w_q = nn.Linear(D, D, bias=False)  # the fixed query projection
        self.conv_in = CausalDepthwiseConv(self.n_inputs * D, cfg.conv_size)
        if cfg.key_shift_init:  # M_k's input starts as the previous token's features (H3's shift)
            with torch.no_grad():
                w = self.conv_in.weight[MEM_K * D : (MEM_K + 1) * D, 0]  # (D, size), channels of x̃_k
                w[:, -1] -= 1.0
                w[:, -2] += 1.0
        self.conv_q = CausalDepthwiseConv(D, cfg.conv_size)
        # meta-learned initial fast state φ₀ of the five memories, per head (choice 11)
        self.mem_w1 = nn.Parameter(torch.randn(H, N_MEMORIES, d, f) / math.sqrt(f))
        self.mem_w2 = nn.Parameter(torch.randn(H, N_MEMORIES, f, d) / math.sqrt(d))
        # scalar read-outs of M_η and M_α (choice 4); small random so M_η, M_α get gradient
        self.eta_w = nn.Parameter(torch.randn(H, d) * 0.1 / math.sqrt(d))
        self.eta_b = nn.Parameter(torch.full((H,), cfg.eta_bias_init))
        self.alpha_w = nn.Parameter(torch.randn(H, d) * 0.1 / math.sqrt(d))
        self.alpha_b = nn.Parameter(torch.full((H,), cfg.alpha_bias_init))
        if cfg.generator_writes == "separate":  # the generators' own retention read-out
            self.gen_alpha_w = nn.Parameter(torch.randn(H, d) * 0.1 / math.sqrt(d))
            self.gen_alpha_b = nn.Parameter(torch.full((H,), cfg.alpha_bias_init))
        self.out_norm = nn.RMSNorm(d, eps=1e-6) if cfg.out_norm else None
        self.w_o = nn.Linear(D, D, bias=False)

    def _heads(self, x):  # (B, T, D) -> (B, H, T, d)
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def _gen_heads(self, x):  # (B, T, G·D) -> (B, H, G, T, d), G generator inputs
        B, T, _ = x.shape
        return x.view(B, T, self.n_inputs, self.n_head, self.head_dim).permute(0, 3, 2, 1, 4)

    @property
    def n_written(self):
        """How many memories the writes change: 5, or only M_memory when generators are static."""
        return 1 if self.cfg.generator_writes == "off" else N_MEMORIES

    def generate(self, w1, w2, xin):
        """Read M_k, M_v, M_η, M_α at the given (boundary) state.

        w1: (B|1, H, 4, d, f), w2: (B|1, H, 4, f, d) generator memories
        xin: (B, H, G, n, d) inputs, G = 1 (one x̃ for all four) or 4 (one per generator)
        returns k (B,H,n,d) unit, v (B,H,n,d), eta (B,H,n) and log α (B,H,M,n) for the M
        written memories' retentions: M = 1 (one α for all, or only M_memory written) or
        M = 5 (`generator_writes="separate"`: the generators' α four times, then M_memory's).
        """
        if w1.shape[0] == 1 and self.cfg.generator_writes != "separate":  # φ₀ for the whole batch
            yk, v, eta_pre, alpha_pre = self._generate_static(w1[0], w2[0], xin)
        else:
            y, _, _ = mem_apply(w1, w2, xin)  # (B,H,4,n,d)
            yk, v, ye, ya = y.unbind(2)  # one node: its backward stacks, where 4 selects would each fill zeros
            eta_pre = (ye * self.eta_w[:, None, :]).sum(-1)
            alpha_pre = (ya * self.alpha_w[:, None, :]).sum(-1)
        k = normalize(yk)
        eta = torch.clamp(self.cfg.eta_scale * F.softplus(eta_pre + self.eta_b[:, None]), max=self.cfg.eta_max)
        log_a = self._log_retention(alpha_pre + self.alpha_b[:, None]).unsqueeze(2)
        if self.cfg.generator_writes == "separate":
            log_g = self._log_retention((ya * self.gen_alpha_w[:, None, :]).sum(-1) + self.gen_alpha_b[:, None])
            log_a = torch.cat([log_g.unsqueeze(2).expand(-1, -1, MEM_OUT, -1), log_a], dim=2)
        return k, v, eta, log_a  # log α: decay products as cumsums

    def _log_retention(self, pre):
        """log α for read-outs ``pre``: α = α_min + (1 − α_min) sigmoid(pre), in log space (choice 16)."""
        floor = self.cfg.alpha_min
        if floor == 0.0:
            return F.logsigmoid(pre)
        c = math.log(floor)  # log(e^c + e^u) = c + softplus(u − c), with Python scalars only (CUDA graphs)
        return F.softplus(F.logsigmoid(pre) + (math.log1p(-floor) - c)) + c

    def _generate_static(self, w1, w2, xin):
        """`generate` at one state for the whole batch: batch × tokens are the rows of each bmm.

        w1: (H, 4, d, f), w2: (H, 4, f, d); xin: (B, H, G, n, d). returns M_k's and M_v's reads
        (B, H, n, d) and the read-outs w_ηᵀ M_η(x̃), w_αᵀ M_α(x̃) (B, H, n), before their biases.
        Memories are ordered (generator, head): with one x̃ per generator the rows are a view of
        x W_in's (B, T, G, H, d) layout (no copy); the weights, small, are reordered instead.
        M_η and M_α are only read through a vector r, so their second layer is folded into it:
        (x + W₁ σ(W₂x))·r = x·r + σ(W₂x)·(W₁ᵀr): row dot products instead of an f×d product.
        """
        B, H, _, n, d = xin.shape
        rows = xin.expand(B, H, MEM_OUT, n, d).permute(2, 1, 0, 3, 4).reshape(MEM_OUT * H, B * n, d)
        w1, w2 = (w.transpose(0, 1).flatten(0, 1) for w in (w1, w2))  # (4H, d, f), (4H, f, d)
        r = torch.cat([self.eta_w, self.alpha_w]).unsqueeze(1)  # (2H, 1, d)
        # M_k, M_v read in full, M_η, M_α through r: `fused.GeneratorRead` (hand-written backward)
        kv, pre = GeneratorRead.apply(rows, w1, w2, r)  # (2H, B·n, d), (2H, B·n, 1)
        yk, v = kv.view(2, H, B, n, d).transpose(1, 2).unbind(0)
        eta_pre, alpha_pre = pre.view(2, H, B, n).transpose(1, 2).unbind(0)
        return yk, v, eta_pre, alpha_pre

    def scan(self, xin, q, C, keep_state=False, stats=None):
        """The chunked recurrence (eq. 90) from φ₀: writes chunk by chunk, reads batched after.

        xin: (B, H, G, T, d) generator inputs; q: (B, H, T, d) unit queries; C: chunk size
        keep_state: also return the end state (otherwise the last chunk's write, which no
        read needs, is skipped); stats: dict of lists to append η and M_memory's log α to.
        Within a chunk every target and inner gradient is taken at the boundary state φ_b
        (`chunk_grads`), the state steps to the next boundary in closed form (`chunk_write`),
        and the reads of all complete chunks are one `chunk_read` on the stacked φ_b's
        (a ragged last chunk is a second call). Eager (`fused`, the default) the writes are
        `fused.TitansScan`, with a hand-written backward: with static generators one call for
        all complete chunks, else one per chunk; `compile_scans` runs the autograd functions.
        returns o (B, H, T, d) and the end state (w1, w2) of all five memories, (B, H, 5, ·, ·), or None
        """
        B, H, T, d = q.shape
        f, clip, read = self.cfg.mem_hidden, self.cfg.inner_clip, self.cfg.out_read
        static = self.cfg.generator_writes == "off"
        M = self.n_written
        n_full = T // C
        spans = [(s, min(s + C, T)) for s in range(0, T, C)]
        # the written memories' state, rows (b, h, m) flattened, each layer transposed
        w1t = self.mem_w1[:, N_MEMORIES - M :].transpose(-1, -2).expand(B, H, M, f, d).reshape(B * H * M, f, d)
        w2t = self.mem_w2[:, N_MEMORIES - M :].transpose(-1, -2).expand(B, H, M, d, f).reshape(B * H * M, d, f)

        def flat(t):  # (B, H, 1|M, ...) -> (B·H·M, ...): what every written memory sees
            return t.expand(B, H, M, *t.shape[3:]).reshape(B * H * M, *t.shape[3:])

        def constants(k, v, eta, log_a):  # generate()'s outputs -> chunk_constants (leading B·H·M)
            return chunk_constants(flat(k.unsqueeze(2)), flat(v.unsqueeze(2)), flat(eta.unsqueeze(2)), flat(log_a),
                                   clip)

        if static:  # generators fixed at φ₀: one read for the whole sequence, constants for every chunk
            k, v, eta, log_a = self.generate(self.mem_w1[None, :, :MEM_OUT], self.mem_w2[None, :, :MEM_OUT], xin)
            if stats is not None:
                stats["eta"].append(eta)
                stats["log_alpha"].append(log_a[:, :, -1])
            consts = {}  # chunk index -> its constants, for the chunks the loop below writes
            if n_full:
                L = n_full * C

                def head(t, dim):  # the complete chunks' tokens (a slice's backward fills zeros: none if all)
                    return t if L == T else t.narrow(dim, 0, L)

                # leading dims (B, H, n_full) on views of k, v: chunk_constants' concatenation is
                # their one copy into the (B·H, n_full, 2C, d) layout
                full = chunk_constants(*(head(t, 2).unflatten(2, (n_full, C)) for t in (k, v)),
                                       head(eta, -1).unflatten(-1, (n_full, C)),
                                       head(log_a[:, :, 0], -1).unflatten(-1, (n_full, C)), clip)
                full = {name: t.flatten(0, 1) for name, t in full.items()}
                if not self.fused:  # per chunk for the autograd loop (TitansScan takes them stacked)
                    consts.update(enumerate(dict(zip(full, vals)) for vals in zip(*(t.unbind(1) for t in full.values()))))
            if T > n_full * C:
                s = n_full * C
                consts[n_full] = constants(k[:, :, s:], v[:, :, s:], eta[..., s:], log_a[..., s:])

        def fused_write(cs, write_last):  # chunk constants (B·H·M, n, …) -> the TitansScan's outputs
            s2_in = None if self.cfg.w2_rate == "gauss-newton" else cs["s2"]
            return TitansScan.apply(w1t, w2t, cs["x"], cs["k_norm"], cs["k_sq"], cs["eta"], cs["eta_c"], s2_in,
                                    cs["carry"], cs["keep"], clip, write_last)

        groups = []  # (first token, chunks, chunk_read's inputs with rows (B·H·chunks)) per batched read
        first = 0  # the chunks before it were written by one TitansScan
        if static and self.fused and n_full:  # every complete chunk's write in one Function
            out = fused_write(full, keep_state or n_full < len(spans))
            fields = dict(zip(("e", "a", "g", "s1", "s2", "w1t", "w2t"), out), kt=full["kt"], cum=full["cum"],
                          log_alpha=full["log_alpha"])
            groups.append((0, n_full, {name: t.flatten(0, 1) for name, t in fields.items()}))
            if len(out) > 7:
                w1t, w2t = out[7:]
            first = n_full
        kept = []  # per chunk: what its read needs (boundary state, constants, chunk_grads)
        for i, (s, e_) in enumerate(spans):
            if i < first:
                continue
            if static:
                c = consts[i]
            else:
                gen1 = w1t.view(B, H, M, f, d)[:, :, :MEM_OUT].transpose(-1, -2)
                gen2 = w2t.view(B, H, M, d, f)[:, :, :MEM_OUT].transpose(-1, -2)
                k, v, eta, log_a = self.generate(gen1, gen2, xin[..., s:e_, :])
                if stats is not None:
                    stats["eta"].append(eta)
                    stats["log_alpha"].append(log_a[:, :, -1])
                c = constants(k, v, eta, log_a)
            write = keep_state or i + 1 < len(spans)
            if self.fused:  # the same, as a TitansScan of one chunk
                out = fused_write({name: t.unsqueeze(1) for name, t in c.items()}, write)
                (e, a, g, s1, s2), new_state = (t.squeeze(1) for t in out[:5]), out[7:]
            else:
                e, a, g, s1, s2 = chunk_grads(w1t, w2t, c, clip, self.cfg.w2_rate)
                new_state = chunk_write(w1t, w2t, c, e, a, g, s1, s2) if write else ()
            kept.append(dict(w1t=w1t, w2t=w2t, kt=c["kt"], cum=c["cum"], log_alpha=c["log_alpha"],
                             e=e, a=a, g=g, s1=s1, s2=s2))
            if write:
                w1t, w2t = new_state

        def stacked(ts):  # the output memory's rows of (B·H·M, C, ...) per chunk -> (B·H·n, C, ...)
            ts = [t if M == 1 else t.unflatten(0, (B * H, M))[:, -1] for t in ts]
            return ts[0] if len(ts) == 1 else torch.stack(ts, 1).flatten(0, 1)

        for start, group in ((0, kept[: n_full - first]), (n_full * C, kept[n_full - first :])):  # complete, ragged
            if group:
                groups.append((start, len(group), {name: stacked([item[name] for item in group]) for name in group[0]}))
        outs = []
        for start, n, fields in groups:
            Cg = fields["e"].shape[1]
            qg = (q if n * Cg == T else q[:, :, start : start + n * Cg]).reshape(B * H * n, Cg, d)
            o = chunk_read(q=qg, read=read, **fields)
            outs.append(o.view(B, H, n * Cg, d))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if not keep_state:
            return o, None
        w1 = w1t.view(B, H, M, f, d).transpose(-1, -2)
        w2 = w2t.view(B, H, M, d, f).transpose(-1, -2)
        if static:
            w1 = torch.cat([self.mem_w1[None, :, :MEM_OUT].expand(B, -1, -1, -1, -1), w1], 2)
            w2 = torch.cat([self.mem_w2[None, :, :MEM_OUT].expand(B, -1, -1, -1, -1), w2], 2)
        return o, (w1, w2)

    def forward(self, x, chunk_size=None, reference=False, return_state=False):
        """x: (B, T, D) (already normalised) -> (B, T, D).

        reference=True runs `titans_reference` (per-token loop) with the same chunk size.
        return_state: also the final fast state (w1, w2) of all five memories, (B, H, 5, ·, ·).
        """
        B, T, D = x.shape
        C = chunk_size or self.cfg.chunk_size
        xin = self._gen_heads(self.conv_in(self.w_in(x)))  # (B,H,G,T,d)
        q = normalize(self._heads(self.conv_q(self.w_q(x))))  # (B,H,T,d)
        # per-sequence fast state, starting from the meta-learned φ₀ (expand: no copy)
        w1 = self.mem_w1.unsqueeze(0).expand(B, *self.mem_w1.shape)
        w2 = self.mem_w2.unsqueeze(0).expand(B, *self.mem_w2.shape)
        stats = dict(eta=[], log_alpha=[]) if self.record_stats else None
        if not self.writes:
            o, _, _ = mem_apply(self.mem_w1[:, MEM_OUT], self.mem_w2[:, MEM_OUT], q)
        elif reference:
            o, w1, w2 = titans_reference(self, w1, w2, xin, q, C, stats)
        else:
            o, state = in_float32(self.scan, xin, q, C=C, keep_state=return_state or stats is not None, stats=stats)
            if state is not None:
                w1, w2 = state
        if stats is not None:
            self.stats = self._summarise(stats, w1, w2) if stats["eta"] else None
        if self.out_norm is not None:
            o = self.out_norm(o)
        y = self.w_o(o.transpose(1, 2).reshape(B, T, D))
        return (y, (w1, w2)) if return_state else y

    @torch.no_grad()
    def _summarise(self, stats, w1, w2):
        """Per-layer memory statistics of the last forward (M_memory's retention and η, state size)."""
        eta = torch.cat(stats["eta"], -1).float()
        alpha = torch.cat(stats["log_alpha"], -1).float().exp()
        end = torch.sqrt((w1[:, :, MEM_OUT] ** 2).sum((-1, -2)) + (w2[:, :, MEM_OUT] ** 2).sum((-1, -2)))
        start = torch.sqrt((self.mem_w1[:, MEM_OUT] ** 2).sum((-1, -2)) + (self.mem_w2[:, MEM_OUT] ** 2).sum((-1, -2)))
        return dict(alpha=alpha.flatten(), eta_at_cap=(eta >= self.cfg.eta_max * (1 - 1e-6)).float().flatten(),
                    eta=eta.flatten(), state_norm_ratio=(end.float() / start.float()).flatten())


def titans_reference(layer, w1, w2, xin, q, chunk_size, stats=None):
    """Per-token reference of `SelfModifyingTitans.chunk`, computed another way.

    w1: (B, H, 5, d, f), w2: (B, H, 5, f, d) initial state
    xin: (B, H, G, T, d) generator inputs; q: (B, H, T, d)
    Inner gradients come from autograd (torch.func.grad of ½‖M(k) − v̂‖²), the state is
    stepped one token at a time, φ_t = α_t φ_{t−1} − η′_t G_t, with G_t taken at the last
    chunk boundary; o_t is read from φ_t ("causal"), φ_{t−1} ("strict") or φ_b ("boundary").
    At C = 1 the boundary is the previous token: the plain sequential recurrence. With
    static generators all five memories are stepped and the generators' steps thrown away.
    returns o (B, H, T, d) and the final state
    """
    clip, read = layer.cfg.inner_clip, layer.cfg.out_read
    static = layer.cfg.generator_writes == "off"
    written = torch.arange(N_MEMORIES, device=w1.device) == MEM_OUT  # (5,): M_memory only

    def loss(w1_, w2_, k_, vhat_):  # Σ over (B, H, memory) of ½‖M(k) − v̂‖²
        y_, _, _ = mem_apply(w1_, w2_, k_)
        return 0.5 * ((y_ - vhat_) ** 2).sum()

    grad_fn = torch.func.grad(loss, argnums=(0, 1))
    outs = []
    for t in range(q.shape[2]):
        if t % chunk_size == 0:
            b1, b2 = w1, w2  # boundary state φ_b
        k, v, eta, log_alpha = layer.generate(b1[:, :, :MEM_OUT], b2[:, :, :MEM_OUT], xin[..., t : t + 1, :])
        if stats is not None:
            stats["eta"].append(eta)
            stats["log_alpha"].append(log_alpha[:, :, -1])
        k5 = k.unsqueeze(2)  # (B,H,1,1,d), broadcast over the five memories
        vhat, _, _ = mem_apply(b1, b2, v.unsqueeze(2))  # (B,H,5,1,d)
        g1, g2 = grad_fn(b1, b2, k5.expand_as(vhat), vhat)  # (B,H,5,d,f), (B,H,5,f,d)
        _, z, a = mem_apply(b1, b2, k5)  # W₁'s layer input at this token, W₂'s output z
        eta5 = eta[:, :, None, 0]  # (B,H,1)
        r1 = eta5 / (1 + eta5 * (a * a).sum((-1, -2)))  # η′ with ‖x_in‖² = ‖a‖²
        curv2 = (k5 * k5).sum((-1, -2))  # ‖k‖²
        if layer.cfg.w2_rate == "gauss-newton":  # × ‖∂M/∂z‖_F² = ‖W₁ diag σ′(z)‖_F², σ′ by autograd
            dsig = torch.func.grad(lambda z_: F.silu(z_).sum())(z)  # (B,H,5,1,f)
            curv2 = curv2 * ((b1 * dsig) ** 2).sum((-1, -2))
        r2 = eta5 / (1 + eta5 * curv2)
        if clip is not None:
            r1 = r1 * torch.clamp(clip / (g1.flatten(-2).norm(dim=-1) + 1e-15), max=1.0)
            r2 = r2 * torch.clamp(clip / (g2.flatten(-2).norm(dim=-1) + 1e-15), max=1.0)
        alpha = torch.exp(log_alpha)[..., None]  # (B,H,1|5,1,1)
        if static:  # M_memory's α is the only one; the generators keep φ₀
            alpha = torch.where(written[:, None, None], alpha, torch.ones_like(alpha))
            r1, r2 = r1 * written, r2 * written
        prev1, prev2 = w1, w2
        w1 = alpha * w1 - r1[..., None, None] * g1
        w2 = alpha * w2 - r2[..., None, None] * g2
        r1_, r2_ = {"causal": (w1, w2), "strict": (prev1, prev2), "boundary": (b1, b2)}[read]
        o, _, _ = mem_apply(r1_[:, :, MEM_OUT], r2_[:, :, MEM_OUT], q[:, :, t : t + 1])
        outs.append(o)
    return torch.cat(outs, dim=2), w1, w2


# -----------------------------------------------------------------------------
# Continuum Memory System


class CMSLevel(nn.Module):
    """One CMS level: h ← h + MLP_φ(RMSNorm(h)), φ written every `period` tokens."""

    def __init__(self, cfg: HopeConfig, period: int):
        super().__init__()
        D, f = cfg.d_model, cfg.cms_hidden
        self.period, self.clip, self.eta_max = period, cfg.inner_clip, cfg.cms_eta_max
        self.writes = True  # False: the level is the plain MLP of φ₀
        self.fused = True  # eager writes through `fused.CMSScan` (False: autograd's `scan`, as `compile_scans` sets)
        self.norm = nn.RMSNorm(D, eps=1e-6)
        # initial fast weights φ₀ = (W_up, W_down): outer parameters (a Transformer MLP)
        self.w_up = nn.Parameter(torch.randn(f, D) * 0.02)
        self.w_down = nn.Parameter(torch.randn(D, f) * 0.02 / math.sqrt(2 * cfg.n_layers))
        # the level objective's views of its input: ℓ_t = ½‖MLP(u W_κᵀ) − u W_νᵀ‖²
        self.w_key = nn.Linear(D, D, bias=False)
        self.w_value = nn.Linear(D, D, bias=False)
        p = cfg.cms_eta_init / cfg.cms_eta_max
        self.eta_logit = nn.Parameter(torch.tensor(math.log(p / (1 - p))))  # η_ℓ ∈ (0, max)

    def eta(self):
        return self.eta_max * torch.sigmoid(self.eta_logit)

    def views(self, x):  # x: (B, T, D) -> u, κ, ν each (B, T, D)
        u = rms_norm(self.norm, x)
        return u, self.w_key(u), self.w_value(u)

    def forward(self, x, reference=False, return_states=False):
        """x: (B, T, D) -> (B, T, D). return_states: also the fast weights in force per period.

        Only the writes are sequential: the loop steps the state once per period whose
        write a later token reads, then every period's MLP read is one batched product on
        the stacked states (a ragged last period is zero-padded and cut off). Eager
        (`fused`, the default) the loop and reads are `fused.CMSScan`, whose backward is
        hand-written; return_states and `compile_scans` run `scan`. Both run in float32 under
        autocast (`in_float32`).
        """
        if not self.writes:
            y = x + F.silu(rms_norm(self.norm, x) @ self.w_up.T) @ self.w_down.T
            return (y, [(self.w_up, self.w_down)]) if return_states else y
        if reference:
            return cms_reference(self, x, return_states)
        if self.fused and not return_states:
            return in_float32(self.fused_scan, x)
        return in_float32(self.scan, x, return_states=return_states)

    def fused_scan(self, x):
        """`scan`'s function with its writes and reads in one `fused.CMSScan` (hand-written backward);
        a level that never writes (one period) is `scan`'s plain read. κ and ν are one product, and
        only of the (n − 1)P rows that write (the last period's tokens are read, never written:
        half the rows at T = 2P)."""
        B, T, D = x.shape
        P = self.period
        n = -(-T // P)
        if n == 1:
            return self.scan(x)
        u = rms_norm(self.norm, x)
        L = (n - 1) * P
        key, val = (u[:, :L] @ torch.cat([self.w_key.weight, self.w_value.weight]).T).split(D, dim=-1)
        eta_c = self.eta() * (self.clip if self.clip is not None else 1.0)
        up_t = self.w_up.T.contiguous().expand(B, D, -1)
        down_t = self.w_down.T.contiguous().expand(B, -1, D)
        read = CMSScan.apply(key, val, F.pad(u, (0, 0, 0, n * P - T)) if n * P > T else u,
                             up_t, down_t, eta_c, P, self.clip)
        return x + (read if n * P == T else read[:, :T])

    def scan(self, x, return_states=False):
        """The written level: `forward` with writes on (what `Hope.compile_scans` compiles)."""
        B, T, D = x.shape
        P = self.period
        n = -(-T // P)  # periods read, the last possibly ragged
        u, key, val = self.views(x)
        eta_c = self.eta() * (self.clip if self.clip is not None else 1.0)
        # the state, transposed: W_upᵀ (B, D, f), W_downᵀ (B, f, D); contiguous, so that every
        # state after a write is too (a transposed view would make each update a strided copy)
        up_t = self.w_up.T.contiguous().expand(B, D, -1)
        down_t = self.w_down.T.contiguous().expand(B, -1, D)
        states = [(up_t, down_t)]
        if n > 1:  # the writes after periods 1 … n − 1 (complete): the next period reads each
            L = (n - 1) * P
            keys = key[:, :L].reshape(B, n - 1, P, D)
            k_norms = torch.linalg.vector_norm(keys, dim=-1, keepdim=True).unbind(1)
            for kp, kpt, vp, kn in zip(keys.unbind(1), keys.transpose(-1, -2).unbind(1),
                                       val[:, :L].reshape(B, n - 1, P, D).unbind(1), k_norms):
                z = torch.bmm(kp, up_t)  # (B, P, f)
                a = F.silu(z)
                e = torch.bmm(a, down_t) - vp  # ∂ℓ/∂(output), (B, P, D)
                sig = torch.sigmoid(z)
                g = torch.bmm(e, down_t.transpose(1, 2)) * torch.addcmul(sig, a, 1 - sig)  # ∂ℓ/∂z, σ′ = σ + silu·(1 − σ)
                if self.clip is None:
                    c_down = c_up = eta_c
                else:  # η_ℓ · min(1, clip / ‖δ xᵀ‖_F), ‖δ xᵀ‖_F = ‖δ‖‖x‖, per token
                    a_norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
                    e_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
                    g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
                    c_down = eta_c / torch.clamp_min(a_norm * e_norm, self.clip)  # (B, P, 1)
                    c_up = eta_c / torch.clamp_min(kn * g_norm, self.clip)
                # φ ← φ − η_ℓ Σ_t c_t ∇ℓ_t: one outer-product sum per weight, (f×P)(P×D) and (D×P)(P×f)
                down_t = down_t - torch.bmm(a.transpose(1, 2), c_down * e)
                up_t = up_t - torch.bmm(kpt, c_up * g)
                states.append((up_t, down_t))
        if n * P > T:
            u = F.pad(u, (0, 0, 0, n * P - T))
        if n == 1:
            read = F.silu(torch.bmm(u, up_t)) @ down_t
        else:  # every period's read from the state in force, as one bmm per layer
            ups = torch.stack([s[0] for s in states], 1).flatten(0, 1)  # (B·n, D, f)
            downs = torch.stack([s[1] for s in states], 1).flatten(0, 1)  # (B·n, f, D)
            read = torch.bmm(F.silu(torch.bmm(u.reshape(B * n, P, D), ups)), downs).view(B, n * P, D)
        y = x + read[:, :T]
        if return_states:
            return y, [(up.transpose(1, 2), down.transpose(1, 2)) for up, down in states]
        return y


def cms_reference(level, x, return_states=False):
    """Per-token reference of `CMSLevel.forward`: autograd gradients, accumulate, write at t ≡ 0.

    x: (B, T, D). returns y and, if asked, the fast weights *after* each token t (1-indexed),
    so a test can see exactly when they change.
    """
    B, T, _ = x.shape
    u, key, val = level.views(x)
    up = level.w_up.unsqueeze(0).expand(B, *level.w_up.shape)
    down = level.w_down.unsqueeze(0).expand(B, *level.w_down.shape)
    eta = level.eta()

    def loss(up_, down_, k_, v_):  # Σ_b ℓ_t for one token per sequence
        return 0.5 * ((F.silu(k_ @ up_.transpose(1, 2)) @ down_.transpose(1, 2) - v_) ** 2).sum()

    grad_fn = torch.func.grad(loss, argnums=(0, 1))
    acc_up, acc_down = torch.zeros_like(up), torch.zeros_like(down)
    outs, states = [], []
    for t in range(T):
        ut, kt, vt = u[:, t : t + 1], key[:, t : t + 1], val[:, t : t + 1]  # (B, 1, D)
        outs.append(F.silu(ut @ up.transpose(1, 2)) @ down.transpose(1, 2))
        g_up, g_down = grad_fn(up, down, kt, vt)
        if level.clip is not None:
            g_up = g_up * torch.clamp(level.clip / g_up.flatten(1).norm(dim=1), max=1.0)[:, None, None]
            g_down = g_down * torch.clamp(level.clip / g_down.flatten(1).norm(dim=1), max=1.0)[:, None, None]
        acc_up, acc_down = acc_up + g_up, acc_down + g_down
        if (t + 1) % level.period == 0:  # t + 1 ≡ 0 (mod C_ℓ): write, then start a new sum
            up, down = up - eta * acc_up, down - eta * acc_down
            acc_up, acc_down = torch.zeros_like(up), torch.zeros_like(down)
        states.append((up, down))
    y = x + torch.cat(outs, dim=1)
    return (y, states) if return_states else y


# -----------------------------------------------------------------------------
# Optional compilation of the scans


class CompiledOrEager:
    """fn under torch.compile, or fn itself once compiling has failed (with a warning).

    The scans' loops are where a step's operator-dispatch cost is; compiled, each loop body's
    element-wise operators fuse into a few kernels, forward and backward. Compilation needs
    a working inductor backend (on CPU: a C++ compiler) and happens on the first call per
    input shape, so a failure surfaces there, not at wrapping time.
    """

    def __init__(self, fn, **compile_kw):
        self.fn = fn
        self.compiled = torch.compile(fn, **compile_kw)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
                warnings.warn(f"torch.compile of {getattr(self.fn, '__qualname__', self.fn)} failed "
                              f"({type(e).__name__}: {e}); running it eager", RuntimeWarning, stacklevel=2)
                self.compiled = None
        return self.fn(*args, **kwargs)


# -----------------------------------------------------------------------------
# HOPE block and language model


class HopeBlock(nn.Module):
    """x ← x + Titans(RMSNorm(x)); then each CMS level x ← x + MLP_ℓ(RMSNorm(x))."""

    def __init__(self, cfg: HopeConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.titans = SelfModifyingTitans(cfg)
        self.cms = nn.ModuleList(CMSLevel(cfg, p) for p in cfg.cms_periods)
        self.checkpoint = False  # True: keep only each segment's input, recompute it in backward

    def _titans(self, x, chunk_size=None, reference=False):
        return x + self.titans(rms_norm(self.norm, x), chunk_size=chunk_size, reference=reference)

    def segments(self):
        """The checkpointed units, in order: the Titans sub-layer, then each CMS level."""
        return [self._titans, *self.cms]

    def forward(self, x, chunk_size=None, reference=False):  # x: (B, T, D)
        ckpt = self.checkpoint and torch.is_grad_enabled()
        for i, seg in enumerate(self.segments()):
            kw = dict(chunk_size=chunk_size, reference=reference) if i == 0 else dict(reference=reference)
            x = torch.utils.checkpoint.checkpoint(seg, x, use_reentrant=False, **kw) if ckpt else seg(x, **kw)
        return x


class Hope(nn.Module):
    def __init__(self, cfg: HopeConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(HopeBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():  # nanoGPT init for the fixed projections
            if name.endswith(("w_in.weight", "w_q.weight", "w_key.weight", "w_value.weight")):
                nn.init.normal_(p, std=0.02)
            elif name.endswith("w_o.weight"):  # residual output: scaled by depth (GPT-2)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        nn.init.normal_(self.wte.weight, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def set_checkpointing(self, on: bool):
        """Activation checkpointing per Titans sub-layer and per CMS level (same values and
        gradients; the backward recomputes each segment from its saved input)."""
        for block in self.blocks:
            block.checkpoint = bool(on)
        return self

    def compile_scans(self, on: bool = True, **compile_kw):
        """torch.compile every Titans scan and CMS level scan (the sequential loops); the rest
        of the model stays eager. Same math: tests/test_hope_model.py holds the compiled
        model's loss and gradients to the eager ones. on=False restores the eager scans.
        compile_kw go to torch.compile (default dynamic=False: one graph per input shape)."""
        compile_kw.setdefault("dynamic", False)
        for m in self.modules():
            if isinstance(m, (SelfModifyingTitans, CMSLevel)):
                m.__dict__.pop("scan", None)  # back to the class's eager method
                if on:
                    m.scan = CompiledOrEager(m.scan, **compile_kw)
            if isinstance(m, (SelfModifyingTitans, CMSLevel)):
                m.fused = not on  # compiled: the autograd scans, not the hand-written backwards
        return self

    def set_writes(self, on: bool):
        """Switch every in-context write (Titans and CMS) on or off; off, each memory reads φ₀."""
        for m in self.modules():
            if isinstance(m, (SelfModifyingTitans, CMSLevel)):
                m.writes = bool(on)
        return self

    def record_memory_stats(self, on: bool = True):
        """Keep each Titans layer's retention, η and state-norm statistics of the next forwards."""
        for block in self.blocks:
            block.titans.record_stats, block.titans.stats = bool(on), None
        return self

    def forward(self, idx, targets=None, chunk_size=None, reference=False):
        """idx: (B, T) token ids; targets: (B, T) or None (−100 = ignore).

        returns logits (B, T, V) and the mean cross-entropy (None without targets).
        """
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, chunk_size=chunk_size, reference=reference)
        logits = self.lm_head(rms_norm(self.norm_f, x))
        loss = None
        if targets is not None:
            flat = logits.flatten(0, 1)
            flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
            loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
        return logits, loss
