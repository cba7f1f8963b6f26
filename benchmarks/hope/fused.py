"""Hand-written backwards of HOPE's sequential scans and its causal convolution (`model.py`), for eager training.

A training step is bound by operator dispatch: autograd records every small operator of a
sequential write loop and replays each one's backward node (with its own allocations and
engine overhead). Here a whole scan is one `torch.autograd.Function`: the forward runs the
writes without recording, keeps what the backward needs, and the backward is one reverse
loop over the writes with the operators it needs, fused where an operator allows it
(`baddbmm` accumulations, `silu_backward` for x ⊙ silu′(z)); every part that does not depend
on the reverse recurrence (the reads' backward, per-row factors) is batched outside the loop.
Same function and gradients as the autograd scans (`tests/test_hope_fused.py`, float64).

Notation: B batch, P period, D width, f hidden width; a per-row scalar is kept as (…, P, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_silu_bwd = torch.ops.aten.silu_backward  # (x, z) -> x ⊙ silu′(z), one operator


def _period_major(x, n):
    """(B, n·P, D) -> (n·B, P, D), rows (period, batch): the layout of the stacked CMS states."""
    B, L, D = x.shape
    return x.view(B, n, L // n, D).transpose(0, 1).reshape(n * B, L // n, D)


def _batch_major(x, B):
    """(n·B, P, D) -> (B, n·P, D), `_period_major`'s inverse (a copy)."""
    nB, P, D = x.shape
    return x.view(nB // B, B, P, D).transpose(0, 1).reshape(B, nB // B * P, D)


def _clip_slopes(c, x_norm, y_norm, clip):
    """Slopes of a clipped rate c = η / max(‖x‖‖y‖, clip) in ‖x‖ and ‖y‖, divided by those norms.

    ∂c/∂x = −c x / ‖x‖² where ‖x‖‖y‖ ≥ clip (else 0), likewise for y; returns the factors
    −c/‖x‖², −c/‖y‖² (0 where the clip is not active), so ∂c/∂x = factor · x.
    """
    active = x_norm * y_norm >= clip
    return (torch.where(active, -c / (x_norm * x_norm), 0.0), torch.where(active, -c / (y_norm * y_norm), 0.0))


class CMSScan(torch.autograd.Function):
    """A written CMS level's MLP reads, `CMSLevel.scan` with a hand-written backward.

    Inputs: key, val (B, (n−1)P, D) the level's κ, ν rows of its n − 1 complete periods
    before the last; u (B, nP, D) its normalised input, zero-padded to n periods; up_t
    (B, D, f) = W_upᵀ and down_t (B, f, D) = W_downᵀ the initial state; eta_c: 0-dim η_ℓ ·
    clip (η_ℓ without a clip); period P; clip (float or None). Returns the reads
    r (B, nP, D), r_i = σ(u_i W_up,iᵀ) W_down,iᵀ for period i at the state φ_i in force.

    Write i (rows k, v of period i, state (W, V) = (W_upᵀ, W_downᵀ)):
        z = k W,  a = silu(z),  e = a V − v,  ĝ = e Vᵀ,  g = ĝ ⊙ silu′(z)
        c_d = η_c / max(‖a‖‖e‖, clip),  c_u = η_c / max(‖k‖‖g‖, clip)   (per row)
        V ← V − aᵀ (c_d e),  W ← W − kᵀ (c_u g)
    Backward of write i, given the gradients dW, dV of the state after it (signs folded:
    the loop carries n_x = −dL/dx for the write's intermediates):
        n_Ed = a dV,  n_Eu = k dW                                  (E_d = c_d e, E_u = c_u g)
        n_e = c_d n_Ed + ⟨n_Ed, e⟩ (−c_d/‖e‖²) e + n_ĝ V,   n_ĝ = n_g ⊙ silu′(z)
        n_g = c_u n_Eu + ⟨n_Eu, g⟩ (−c_u/‖g‖²) g
        n_a = E_d dVᵀ + ⟨n_Ed, e⟩ (−c_d/‖a‖²) a + n_e Vᵀ
        n_z = n_a ⊙ silu′(z) + n_g ⊙ ĝ ⊙ silu″(z)
        n_k = E_u dWᵀ + ⟨n_Eu, g⟩ (−c_u/‖k‖²) k + n_z Wᵀ,   dv = n_e
        dW ← dW − kᵀ n_z + (read i's uᵀ dz_r),   dV ← dV − n_ĝᵀ e − aᵀ n_e + (read i's hᵀ dr)
        dη_c = −Σ (c_d ⟨n_Ed, e⟩ + c_u ⟨n_Eu, g⟩) / η_c
    (the (−c/‖x‖²) slopes are 0 where a row's clip is inactive, `_clip_slopes`).
    """

    @staticmethod
    def forward(ctx, key, val, u, up_t, down_t, eta_c, period, clip):
        B, L, D = key.shape
        n = L // period + 1
        keys = key.view(B, n - 1, period, D).unbind(1)
        k_norms = torch.linalg.vector_norm(key, dim=-1, keepdim=True).view(B, n - 1, period, 1).unbind(1)
        # every state φ_0 … φ_{n−1}, written in place of a stack: (n, B, D, f) and (n, B, f, D),
        # period-major so that each state is contiguous and `baddbmm` writes it with no copy
        ups = up_t.new_empty(n, *up_t.shape)
        downs = down_t.new_empty(n, *down_t.shape)
        ups[0], downs[0] = up_t, down_t
        steps = []
        for i, (k, v, kn) in enumerate(zip(keys, val.view(B, n - 1, period, D).unbind(1), k_norms)):
            w, v_ = ups[i], downs[i]
            z = torch.bmm(k, w)  # (B, P, f)
            a = F.silu(z)
            e = torch.baddbmm(v, a, v_, beta=-1)  # a V − v, (B, P, D)
            gh = torch.bmm(e, v_.transpose(1, 2))  # ĝ = e Vᵀ
            g = _silu_bwd(gh, z)
            if clip is None:
                c_d = c_u = eta_c
                norms = ()
            else:
                norms = (torch.linalg.vector_norm(a, dim=-1, keepdim=True),
                         torch.linalg.vector_norm(e, dim=-1, keepdim=True),
                         torch.linalg.vector_norm(g, dim=-1, keepdim=True))
                c_d = eta_c / torch.clamp_min(norms[0] * norms[1], clip)
                c_u = eta_c / torch.clamp_min(kn * norms[2], clip)
            e_d, e_u = c_d * e, c_u * g
            torch.baddbmm(v_, a.transpose(1, 2), e_d, alpha=-1, out=downs[i + 1])
            torch.baddbmm(w, k.transpose(1, 2), e_u, alpha=-1, out=ups[i + 1])
            steps.append((z, a, e, gh, g, e_d, e_u, c_d, c_u, *norms))
        ups, downs = ups.flatten(0, 1), downs.flatten(0, 1)  # (n·B, D, f), (n·B, f, D)
        u = _period_major(u, n)  # (n·B, P, D)
        zr = torch.bmm(u, ups)
        h = F.silu(zr)
        ctx.period, ctx.clip, ctx.n_step = period, clip, len(steps[0])
        ctx.save_for_backward(key, u, ups, downs, zr, h, eta_c, *(t for s in steps for t in s))
        return _batch_major(torch.bmm(h, downs), B)

    @staticmethod
    def backward(ctx, dr):
        # The forward's dtype, whatever autocast is doing around the backward: a backward called
        # inside autocast (a CUDA graph's capture, say) would otherwise mix bf16 and float32.
        saved = ctx.saved_tensors                            # unpacked once (checkpointing allows no more)
        with torch.autocast(dr.device.type, enabled=False):
            return CMSScan._backward(ctx, saved, dr.to(saved[0].dtype))

    @staticmethod
    def _backward(ctx, saved, dr):
        key, u, ups, downs, zr, h, eta_c, *flat = saved
        P, clip, m = ctx.period, ctx.clip, ctx.n_step
        steps = [flat[i : i + m] for i in range(0, len(flat), m)]
        B, L, D = key.shape
        n = L // P + 1
        # the reads' backward, batched over periods
        dr = _period_major(dr, n)  # (n·B, P, D), as the forward's reads
        dzr = _silu_bwd(torch.bmm(dr, downs.transpose(1, 2)), zr)  # (n·B, P, f)
        du = _batch_major(torch.bmm(dzr, ups.transpose(1, 2)), B)
        per = [t.view(n, B, *t.shape[1:]).unbind(0) for t in (ups, downs, u, h, dr, dzr)]
        ups_i, downs_i, u_i, h_i, dr_i, dzr_i = per
        # the clip slopes of every write, batched (per-row scalars)
        if clip is not None:
            rate_d, rate_u, na, ne, ng = (torch.stack([s[i] for s in steps]) for i in (7, 8, 9, 10, 11))
            kn = torch.linalg.vector_norm(key, dim=-1, keepdim=True).view(B, n - 1, P, 1).transpose(0, 1)
            fa, fe = (t.unbind(0) for t in _clip_slopes(rate_d, na, ne, clip))
            fk, fg = (t.unbind(0) for t in _clip_slopes(rate_u, kn, ng, clip))
        keys = key.view(B, n - 1, P, D).unbind(1)
        dw = torch.bmm(u_i[-1].transpose(1, 2), dzr_i[-1])  # accumulated in place from here
        dv_ = torch.bmm(h_i[-1].transpose(1, 2), dr_i[-1])
        n_keys, n_vals, eta_terms = [], [], []
        for i in range(n - 2, -1, -1):
            z, a, e, gh, g, e_d, e_u, c_d, c_u = steps[i][:9]
            k, w, v_ = keys[i], ups_i[i], downs_i[i]
            n_ed = torch.bmm(a, dv_)  # −dL/dE_d
            n_eu = torch.bmm(k, dw)  # −dL/dE_u
            q_d = (n_ed * e).sum(-1, keepdim=True)
            q_u = (n_eu * g).sum(-1, keepdim=True)
            eta_terms += [c_d * q_d, c_u * q_u]
            if clip is None:
                n_e, n_g = c_d * n_ed, c_u * n_eu
                n_a = torch.bmm(e_d, dv_.transpose(1, 2))
                n_k = torch.bmm(e_u, dw.transpose(1, 2))
            else:
                n_e = torch.addcmul(c_d * n_ed, q_d * fe[i], e)
                n_g = torch.addcmul(c_u * n_eu, q_u * fg[i], g)
                n_a = torch.baddbmm(q_d * fa[i] * a, e_d, dv_.transpose(1, 2))
                n_k = torch.baddbmm(q_u * fk[i] * k, e_u, dw.transpose(1, 2))
            n_gh = _silu_bwd(n_g, z)
            n_e.baddbmm_(n_gh, v_)
            n_a.baddbmm_(n_e, v_.transpose(1, 2))
            # n_z = n_a ⊙ silu′(z) + n_g ⊙ ĝ ⊙ silu″(z), silu″(z) = σ(1 − σ)(2 + z − 2 silu(z))
            sig = torch.sigmoid(z)
            n_z = torch.ops.aten.sigmoid_backward(n_g * gh, sig).mul_(torch.add(z, a, alpha=-2).add_(2))
            n_z.add_(_silu_bwd(n_a, z))
            n_keys.append(n_k.baddbmm_(n_z, w.transpose(1, 2)))
            n_vals.append(n_e)
            dw.baddbmm_(k.transpose(1, 2), n_z, alpha=-1).baddbmm_(u_i[i].transpose(1, 2), dzr_i[i])
            dv_.baddbmm_(n_gh.transpose(1, 2), e, alpha=-1).baddbmm_(a.transpose(1, 2), n_e, alpha=-1)
            dv_.baddbmm_(h_i[i].transpose(1, 2), dr_i[i])
        dkey = torch.cat(n_keys[::-1], 1).neg_()
        dval = torch.cat(n_vals[::-1], 1)
        deta = -torch.stack(eta_terms).sum() / eta_c if ctx.needs_input_grad[5] else None
        return dkey, dval, du, dw, dv_, deta, None, None


class CausalConv(torch.autograd.Function):
    """Causal depthwise convolution over time in the (B, T, C) layout: `CausalDepthwiseConv`'s function.

    Inputs: x (B, T, C); w (C, K) the taps, w[:, K − 1] on the current token. Returns
        y_t = Σ_{j<K} w[:, K − 1 − j] ⊙ x_{t−j}      (x_{t−j} = 0 before the start)
    as K shifted multiply-adds on x's own layout; backward:
        dx_s = Σ_j w[:, K − 1 − j] ⊙ dy_{s+j},   dw[:, K − 1 − j] = Σ_{b, t} dy_t ⊙ x_{t−j}.
    `F.conv1d` needs channels first: a transpose, a left pad and mkldnn's layout copies of x
    and of y, forward and backward, which at cpu-tiny (C = 256, T = 128) cost more than the
    convolution's own arithmetic. Computed in x's dtype (w is cast to it, dw back to w's).
    """

    @staticmethod
    def forward(ctx, x, w):
        T, K = x.shape[1], w.shape[1]
        wx = w.to(x.dtype)
        y = x * wx[:, K - 1]
        for j in range(1, min(K, T)):
            y[:, j:].addcmul_(x[:, : T - j], wx[:, K - 1 - j])
        ctx.save_for_backward(x, wx)
        ctx.w_dtype = w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wx = ctx.saved_tensors
        T, K = x.shape[1], wx.shape[1]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dy * wx[:, K - 1]
            for j in range(1, min(K, T)):
                dx[:, : T - j].addcmul_(dy[:, j:], wx[:, K - 1 - j])
        if ctx.needs_input_grad[1]:
            taps = [(dy[:, j:] * x[:, : T - j]).sum((0, 1)) if j < T else dy.new_zeros(dy.shape[-1])
                    for j in range(K - 1, -1, -1)]
            dw = torch.stack(taps, 1).to(ctx.w_dtype)
        return dx, dw
