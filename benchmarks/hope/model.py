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
    η_t = min(s_η · softplus(w_ηᵀ M_η(x̃_t) + b_η), η_max)            (s_η = 4, η_max = 16)
    α_t = sigmoid(w_αᵀ M_α(x̃_t) + b_α)                              (b_α = 4 at init)
    v̂_t = M_{φ_{t−1}}(v_t)                                           self-generated target
    ℓ_t(φ) = ½ ‖M_φ(k_t) − v̂_t‖²
    for each layer W ∈ {W₁, W₂} of M_memory, with x_in its input and δ = ∂ℓ_t/∂(W x_in):
        W_t = α_t W_{t−1} − η′_t c_t δ x_inᵀ,   η′_t = η_t / (1 + η_t ‖x_in‖²)    (DGD, §7)
        c_t = min(1, 1 / ‖δ x_inᵀ‖_F)                                    inner clip
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
    DGD's η′ makes any η safe — the corrected fraction η‖x‖²/(1 + η‖x‖²) stays below 1 — so
    the cap is 16 and the scale 4 (≈ 40% correction per write at init).
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
   η_t = min(eta_scale · softplus(·), eta_max), α_t = sigmoid(·) ∈ (0, 1), bias initialised
   to `alpha_bias_init` (α ≈ 0.98).
5. Inner-gradient clipping (Titans NaNs without it): each layer's per-token gradient
   δ x_inᵀ is scaled by min(1, inner_clip / ‖δ‖‖x_in‖) before the step, in every path
   alike; `inner_clip=None` turns it off.
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
   W₂ frozen, tested; W₂: the proximal step on the Gauss–Newton model of ℓ), with decoupled
   retention (α W instead of W) and the k kᵀ shrink applied once (NL eq. 93 applies it twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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
    eta_scale: float = 4.0       # η_t = min(eta_scale · softplus(·), eta_max) (ablation: 0.5 was inert)
    eta_max: float = 16.0        # DGD's η′ = η/(1+η‖x‖²) keeps every η contractive
    eta_bias_init: float = 0.0   # η read-out bias at init: η = eta_scale · softplus(0) ≈ 0.69 eta_scale
    alpha_bias_init: float = 4.0  # sigmoid(4) ≈ 0.982 retention at init
    inner_clip: float | None = 1.0  # per-token inner-gradient Frobenius clip
    out_read: str = "causal"     # "causal" (retrieve after store), "strict" (before) or "boundary"
    generator_writes: str = "off"  # M_k, M_v, M_η, M_α static, or written with M_memory's α / their own
    generator_inputs: str = "separate"  # a fixed projection x̃ per generator, or one "shared" by all four
    key_shift_init: bool = True  # x̃_k's convolution starts at the previous token (needs separate inputs)
    out_norm: bool = False       # per-head RMSNorm of the read o before W_o

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must divide into n_heads={self.n_heads}")
        choices = dict(out_read=("causal", "strict", "boundary"), generator_writes=("shared", "separate", "off"),
                       generator_inputs=("shared", "separate"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.key_shift_init and (self.generator_inputs != "separate" or self.conv_size < 2):
            raise ValueError("key_shift_init=True needs generator_inputs='separate' and conv_size >= 2; "
                             "pass key_shift_init=False with shared inputs")
        self.cms_periods = tuple(int(p) for p in self.cms_periods)


# -----------------------------------------------------------------------------
# Memory algebra: residual MLP, closed-form inner gradients, DGD


def _silu_grad(z):  # z: any shape
    # d/dz [z σ(z)] = σ(z) (1 + z (1 − σ(z)))
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


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
# Self-modifying Titans


class CausalDepthwiseConv(nn.Module):
    """Causal depthwise 1-D convolution over time, window `size`, started near identity."""

    def __init__(self, channels, size):
        super().__init__()
        self.size = size
        w = torch.randn(channels, 1, size) * 0.02
        w[:, 0, -1] += 1.0  # the current token's tap: starts as (almost) a pass-through
        self.weight = nn.Parameter(w)

    def forward(self, x):  # x: (B, T, channels)
        x = F.pad(x.transpose(1, 2), (self.size - 1, 0))  # left pad: output t sees ≤ t
        return F.conv1d(x, self.weight, groups=self.weight.shape[0]).transpose(1, 2)


class SelfModifyingTitans(nn.Module):
    def __init__(self, cfg: HopeConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.d_model, cfg.n_heads
        d, f = D // H, cfg.mem_hidden
        self.n_head, self.head_dim = H, d
        self.writes = True  # False: every read uses φ₀ (static HOPE / writes-off evaluation)
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
        y, _, _ = mem_apply(w1, w2, xin)  # (B,H,4,n,d)
        k = F.normalize(y[:, :, MEM_K], dim=-1)
        v = y[:, :, MEM_V]
        eta_pre = (y[:, :, MEM_ETA] * self.eta_w[:, None, :]).sum(-1) + self.eta_b[:, None]
        eta = torch.clamp(self.cfg.eta_scale * F.softplus(eta_pre), max=self.cfg.eta_max)
        ya = y[:, :, MEM_ALPHA]
        log_a = F.logsigmoid((ya * self.alpha_w[:, None, :]).sum(-1) + self.alpha_b[:, None]).unsqueeze(2)
        if self.cfg.generator_writes == "separate":
            log_g = F.logsigmoid((ya * self.gen_alpha_w[:, None, :]).sum(-1) + self.gen_alpha_b[:, None])
            log_a = torch.cat([log_g.unsqueeze(2).expand(-1, -1, MEM_OUT, -1), log_a], dim=2)
        return k, v, eta, log_a  # log α: decay products as cumsums

    def chunk(self, w1, w2, k, v, eta, log_alpha, q):
        """One chunk of eq. 90: boundary-state gradients, in-chunk output reads per `out_read`.

        w1: (B, H, M, d, f), w2: (B, H, M, f, d)  the written memories at the chunk's left
            boundary, M_memory last (M = 5, or 1 when the generators are static)
        k, v: (B, H, C, d) keys (unit) and values;  eta: (B, H, C);  log_alpha: (B, H, M|1, C)
        q: (B, H, C, d) unit queries
        returns o (B, H, C, d) and the written memories at the chunk's right boundary
        """
        clip = self.cfg.inner_clip
        vhat, _, _ = mem_apply(w1, w2, v.unsqueeze(2))  # (B,H,M,C,d): v̂_□ = M_□(v)
        e, a, g = mem_inner_grad(w1, w2, k.unsqueeze(2), vhat)  # (B,H,M,C,d|f|f)
        k_sq = (k * k).sum(-1).unsqueeze(2)  # (B,H,1,C); = 1 up to rounding
        s1 = dgd_rate(eta.unsqueeze(2), (a * a).sum(-1), (e * e).sum(-1), clip)  # W₁: input a
        s2 = dgd_rate(eta.unsqueeze(2), k_sq, (g * g).sum(-1), clip)  # W₂: input k
        # decay products: cum_t = Σ_{r≤t} log α_r, so Π_{s<r≤t} α_r = exp(cum_t − cum_s)
        cum = log_alpha.cumsum(-1)  # (B, H, M|1, C)
        total = cum[..., -1:]
        carry = torch.exp(total - cum)  # Π_{r>t} α_r
        keep = torch.exp(total).unsqueeze(-1)  # (B,H,M|1,1,1)
        # Σ_t c_t e_t a_tᵀ as one matmul per memory: (d×C)(C×f), likewise (f×C)(C×d)
        new_w1 = keep * w1 - ((carry * s1).unsqueeze(-1) * e).transpose(-1, -2) @ a
        new_w2 = keep * w2 - ((carry * s2).unsqueeze(-1) * g).transpose(-1, -2) @ k.unsqueeze(2)

        w1o, w2o = w1[:, :, -1], w2[:, :, -1]  # M_memory
        read = self.cfg.out_read
        if read == "boundary":
            o, _, _ = mem_apply(w1o, w2o, q)
            return o, new_w1, new_w2
        # o_t = M_{φ_t}(q_t) with φ_t = A_t φ_b − Σ_{s≤t} D_ts s_s G_s ("causal", s ≤ t), or
        # o_t = M_{φ_{t−1}}(q_t): A_{t−1}, D_{t−1,s} and s < t ("strict", NL eq. 94)
        C = q.shape[2]
        cum_o = cum[:, :, -1]  # (B, H, C)
        cum_r = cum_o - log_alpha[:, :, -1] if read == "strict" else cum_o  # log A at the read
        mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 if read == "strict" else 0)
        dmat = torch.exp((cum_r.unsqueeze(-1) - cum_o.unsqueeze(-2)).masked_fill(~mask, float("-inf")))
        a_t = torch.exp(cum_r).unsqueeze(-1)  # (B,H,C,1): A_t = Π_{r≤t} α_r
        # W₂,t q_t = A_t W₂,b q_t − Σ_s D_ts s2_s (k_s·q_t) g_s   : (C×C)(C×f)
        scores2 = dmat * (q @ k.transpose(-1, -2)) * s2[:, :, -1].unsqueeze(-2)
        z = a_t * (q @ w2o.transpose(-1, -2)) - scores2 @ g[:, :, -1]
        h = F.silu(z)  # (B,H,C,f)
        # W₁,t h_t = A_t W₁,b h_t − Σ_s D_ts s1_s (a_s·h_t) e_s    : (C×C)(C×d)
        scores1 = dmat * (h @ a[:, :, -1].transpose(-1, -2)) * s1[:, :, -1].unsqueeze(-2)
        o = q + a_t * (h @ w1o.transpose(-1, -2)) - scores1 @ e[:, :, -1]
        return o, new_w1, new_w2

    def forward(self, x, chunk_size=None, reference=False, return_state=False):
        """x: (B, T, D) (already normalised) -> (B, T, D).

        reference=True runs `titans_reference` (per-token loop) with the same chunk size.
        return_state: also the final fast state (w1, w2) of all five memories, (B, H, 5, ·, ·).
        """
        B, T, D = x.shape
        C = chunk_size or self.cfg.chunk_size
        xin = self._gen_heads(self.conv_in(self.w_in(x)))  # (B,H,G,T,d)
        q = F.normalize(self._heads(self.conv_q(self.w_q(x))), dim=-1)  # (B,H,T,d)
        # per-sequence fast state, starting from the meta-learned φ₀ (expand: no copy)
        w1 = self.mem_w1.unsqueeze(0).expand(B, *self.mem_w1.shape)
        w2 = self.mem_w2.unsqueeze(0).expand(B, *self.mem_w2.shape)
        stats = dict(eta=[], log_alpha=[]) if self.record_stats else None
        if not self.writes:
            o, _, _ = mem_apply(self.mem_w1[:, MEM_OUT], self.mem_w2[:, MEM_OUT], q)
        elif reference:
            o, w1, w2 = titans_reference(self, w1, w2, xin, q, C, stats)
        else:
            static = self.cfg.generator_writes == "off"
            if static:  # generators fixed at φ₀: one read for the whole sequence
                gens = self.generate(self.mem_w1[None, :, :MEM_OUT], self.mem_w2[None, :, :MEM_OUT], xin)
                m1, m2 = w1[:, :, MEM_OUT:], w2[:, :, MEM_OUT:]
            else:
                m1, m2 = w1, w2
            outs = []
            for s in range(0, T, C):
                if static:
                    k, v = gens[0][:, :, s : s + C], gens[1][:, :, s : s + C]
                    eta, log_a = gens[2][..., s : s + C], gens[3][..., s : s + C]
                else:
                    k, v, eta, log_a = self.generate(m1[:, :, :MEM_OUT], m2[:, :, :MEM_OUT], xin[..., s : s + C, :])
                if stats is not None:
                    stats["eta"].append(eta)
                    stats["log_alpha"].append(log_a[:, :, -1])
                o_c, m1, m2 = self.chunk(m1, m2, k, v, eta, log_a, q[:, :, s : s + C])
                outs.append(o_c)
            o = torch.cat(outs, dim=2)
            if static:
                w1, w2 = torch.cat([w1[:, :, :MEM_OUT], m1], 2), torch.cat([w2[:, :, :MEM_OUT], m2], 2)
            else:
                w1, w2 = m1, m2
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
        _, _, a = mem_apply(b1, b2, k5)  # W₁'s layer input at this token
        eta5 = eta[:, :, None, 0]  # (B,H,1)
        r1 = eta5 / (1 + eta5 * (a * a).sum((-1, -2)))  # η′ with ‖x_in‖² = ‖a‖²
        r2 = eta5 / (1 + eta5 * (k5 * k5).sum((-1, -2)))  # η′ with ‖x_in‖² = ‖k‖²
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
        u = self.norm(x)
        return u, self.w_key(u), self.w_value(u)

    def forward(self, x, reference=False, return_states=False):
        """x: (B, T, D) -> (B, T, D). return_states: also the fast weights in force per period."""
        if not self.writes:
            y = x + F.silu(self.norm(x) @ self.w_up.T) @ self.w_down.T
            return (y, [(self.w_up, self.w_down)]) if return_states else y
        if reference:
            return cms_reference(self, x, return_states)
        B, T, _ = x.shape
        P, eta = self.period, self.eta()
        u, key, val = self.views(x)
        up = self.w_up.unsqueeze(0).expand(B, *self.w_up.shape)  # (B, f, D)
        down = self.w_down.unsqueeze(0).expand(B, *self.w_down.shape)  # (B, D, f)
        outs, states = [], []
        for s in range(0, T, P):
            states.append((up, down))
            outs.append(F.silu(u[:, s : s + P] @ up.transpose(1, 2)) @ down.transpose(1, 2))
            if s + P <= T:  # the period is complete: write after token t = s + P ≡ 0 mod P
                kp, vp = key[:, s : s + P], val[:, s : s + P]  # (B, P, D)
                z = kp @ up.transpose(1, 2)  # (B, P, f)
                a = F.silu(z)
                e = a @ down.transpose(1, 2) - vp  # ∂ℓ/∂(output), (B, P, D)
                g = (e @ down) * _silu_grad(z)  # ∂ℓ/∂z, (B, P, f)
                c_down = clip_factor((a * a).sum(-1), (e * e).sum(-1), self.clip)  # (B, P)
                c_up = clip_factor((kp * kp).sum(-1), (g * g).sum(-1), self.clip)
                # Σ_t ∇ℓ_t: one weighted outer-product sum per weight
                down = down - eta * (c_down.unsqueeze(-1) * e).transpose(1, 2) @ a  # (D×P)(P×f)
                up = up - eta * (c_up.unsqueeze(-1) * g).transpose(1, 2) @ kp  # (f×P)(P×D)
        y = x + torch.cat(outs, dim=1)
        return (y, states) if return_states else y


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
        return x + self.titans(self.norm(x), chunk_size=chunk_size, reference=reference)

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
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if targets is not None:
            flat = logits.flatten(0, 1)
            flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
            loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
        return logits, loss
