"""Hand-written backwards of HOPE's sequential scans and its causal convolution (`model.py`), for eager training.

A training step is bound by operator dispatch: autograd records every small operator of a
sequential write loop and replays each one's backward node (with its own allocations and
engine overhead). Here a whole scan is one `torch.autograd.Function`: the forward runs the
writes without recording, keeps what the backward needs, and the backward is one reverse
loop over the writes with the operators it needs, fused where an operator allows it
(`baddbmm` accumulations, `silu_backward` for x ⊙ silu′(z)); every part that does not depend
on the reverse recurrence (the reads' backward, per-row factors) is batched outside the loop.
Same function and gradients as the autograd scans (`tests/test_hope_fused.py`, float64).
On the CPU, `CMSScan` keeps what its backward needs (and `CausalConv` its backward's buffer) in
workspaces reused from call to call (`_Workspaces`): freshly allocated each step, that memory
was most of a cpu-tiny step's page faults.

Notation: B batch, P period, D width, f hidden width; a per-row scalar is kept as (…, P, 1).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

_silu_bwd = torch.ops.aten.silu_backward  # (x, z) -> x ⊙ silu′(z), one operator
_silu_bwd_out = torch.ops.aten.silu_backward.grad_input  # the same into grad_input=


def _in_forward_dtype(ctx, backward, *grads):
    """``backward(ctx, saved, *grads)`` in the forward's dtype, whatever autocast is doing around
    it: a backward called inside autocast (a CUDA graph's capture, say) would otherwise mix bf16
    and float32. The saved tensors are unpacked once (checkpointing allows no more); the meta
    device (`plan.py`) has no autocast to turn off."""
    saved = ctx.saved_tensors
    device = grads[0].device.type
    with contextlib.nullcontext() if device == "meta" else torch.autocast(device, enabled=False):
        return backward(ctx, saved, *(g.to(saved[0].dtype) for g in grads))


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
        P, n, f = period, L // period + 1, up_t.shape[-1]
        m = n - 1  # writes
        u_p = u.view(B, n, P, D)
        # Everything the backward needs lives in one flat workspace, reused from call to call on
        # the CPU (`_Workspaces`): at cpu-tiny these ~8 MB per level, freshly allocated every step,
        # were most of a step's page faults (glibc returned them to the system in the backward).
        ws = _WORKSPACES.take(_numel(_cms_saved_shapes(B, m, P, D, f)), key)
        ku, v0, zzs, acts, ys, ghs, gs, eds, eus, ups, downs, rows = _carve(ws, _cms_saved_shapes(B, m, P, D, f))
        # State i serves write i's keys and read i's rows alike, so each period multiplies it once:
        # rows [k_i; u_i] by W_upᵀ, then [a_i; h_i] by W_downᵀ with target rows [v_i; 0], so that
        # one baddbmm gives both e = a V − v and the read h V. Reading each state as it is written
        # also reads it while it is in cache (a batched read after the loop re-read 4 MiB of cold
        # states per p16 level at cpu-tiny, at a third of the products' rate).
        torch.cat([key.view(B, m, P, D), u_p[:, :m]], 2, out=ku)  # (B, n − 1, 2P, D)
        v0[:, :, :P].copy_(val.view(B, m, P, D))  # [v_i; 0]
        v0[:, :, P:].zero_()
        torch.linalg.vector_norm(key.view(B, m, P, D), dim=-1, keepdim=True, out=rows[5].transpose(0, 1))
        # per-write views, one unbind per tensor (indexing in the loop is an operator per view)
        c_ds, c_us, a_norms, e_norms, g_norms, k_norms = (t.unbind(0) for t in rows.unbind(0))
        kus, kts, v0s = ku.unbind(1), ku[:, :, :P].transpose(-1, -2).unbind(1), v0.unbind(1)
        zzs, zs, acts, a_s, ats, ys, es, reads = (t.unbind(0) for t in (
            zzs, zzs[:, :, :P], acts, acts[:, :, :P], acts[:, :, :P].transpose(-1, -2), ys, ys[:, :, :P], ys[:, :, P:]))
        ghs, gs, eds, eus, ups, downs = (t.unbind(0) for t in (ghs, gs, eds, eus, ups, downs))
        w, v_ = up_t, down_t
        for i in range(m):
            torch.bmm(kus[i], w, out=zzs[i])  # [z; z_r], (B, 2P, f)
            torch.ops.aten.silu.out(zzs[i], out=acts[i])
            torch.baddbmm(v0s[i], acts[i], v_, beta=-1, out=ys[i])  # [a V − v; h V], (B, 2P, D)
            a, e = a_s[i], es[i]
            gh = torch.bmm(e, v_.transpose(1, 2), out=ghs[i])  # ĝ = e Vᵀ
            g = _silu_bwd_out(gh, zs[i], grad_input=gs[i])
            if clip is None:
                c_d = c_u = eta_c
            else:
                na = torch.linalg.vector_norm(a, dim=-1, keepdim=True, out=a_norms[i])
                ne = torch.linalg.vector_norm(e, dim=-1, keepdim=True, out=e_norms[i])
                ng = torch.linalg.vector_norm(g, dim=-1, keepdim=True, out=g_norms[i])
                c_d = torch.div(eta_c, torch.clamp_min(na * ne, clip), out=c_ds[i])
                c_u = torch.div(eta_c, torch.clamp_min(k_norms[i] * ng, clip), out=c_us[i])
            e_d, e_u = torch.mul(c_d, e, out=eds[i]), torch.mul(c_u, g, out=eus[i])
            v_ = torch.baddbmm(v_, ats[i], e_d, alpha=-1, out=downs[i])
            w = torch.baddbmm(w, kts[i], e_u, alpha=-1, out=ups[i])
        zr = torch.bmm(u_p[:, -1], w)  # the last period: read, never written
        h = F.silu(zr)
        ctx.clip, ctx.dims = clip, (B, m, P, D, f)
        ctx.save_for_backward(ws, u, eta_c, up_t, down_t, zr, h)
        return torch.cat([*reads, torch.bmm(h, v_)], 1)

    @staticmethod
    def backward(ctx, dr):
        return _in_forward_dtype(ctx, CMSScan._backward, dr)

    @staticmethod
    def _backward(ctx, saved, dr):
        ws, u, eta_c, up0, down0, zr_last, h_last = saved
        clip, (B, m, P, D, f) = ctx.clip, ctx.dims
        n = m + 1
        ku, _, zzs, acts, ys, ghs, gs, eds, eus, ups, downs, rows = _carve(ws, _cms_saved_shapes(B, m, P, D, f))
        ups, downs = [up0, *ups.unbind(0)], [down0, *downs.unbind(0)]  # the state in force at each period
        dr_i = dr.view(B, n, P, D).unbind(1)
        bws = _WORKSPACES.take(_numel(_cms_backward_shapes(m, B, P, f)), dr)
        sig, dsig, silu2, qs = _carve(bws, _cms_backward_shapes(m, B, P, f))
        # σ′ of every write's [z; z_r] and silu″(z) = σ(1 − σ)(2 + z − 2 silu(z)), batched: the loop
        # then multiplies where it called silu_backward (each a sigmoid of its own) before
        torch.sigmoid(zzs, out=sig)
        one_minus = torch.neg(sig, out=dsig).add_(1)  # 1 − σ, in dsig's buffer until σ′ replaces it
        torch.add(zzs[:, :, :P], acts[:, :, :P], alpha=-2, out=silu2).add_(2).mul_(sig[:, :, :P]).mul_(one_minus[:, :, :P])
        torch.addcmul(sig, acts, one_minus, out=dsig)  # σ′ = σ + silu·(1 − σ)
        q_ds, q_us = (t.unbind(0) for t in qs.unbind(0))  # ⟨n_Ed, e⟩, ⟨n_Eu, g⟩ per row, for dη_c after the loop
        if clip is not None:  # the clip slopes of every write, batched (per-row scalars)
            c_ds, c_us, a_norms, e_norms, g_norms, k_norms = rows.unbind(0)
            slopes = (*_clip_slopes(c_ds, a_norms, e_norms, clip), *_clip_slopes(c_us, k_norms, g_norms, clip))
            (fa, fe, fk, fg), c_ds, c_us = (t.unbind(0) for t in slopes), c_ds.unbind(0), c_us.unbind(0)
        # per-write views, one unbind per tensor (indexing in the loop is an operator per view)
        a_s, ats, hts, es, ghs, gs, eds, eus, dsig_z, dsig_r, silu2 = (t.unbind(0) for t in (
            acts[:, :, :P], acts[:, :, :P].transpose(-1, -2), acts[:, :, P:].transpose(-1, -2), ys[:, :, :P], ghs, gs,
            eds, eus, dsig[:, :, :P], dsig[:, :, P:], silu2))
        ks, kts, uts = (t.unbind(1) for t in (ku[:, :, :P], ku[:, :, :P].transpose(-1, -2), ku[:, :, P:].transpose(-1, -2)))
        dzr = _silu_bwd(torch.bmm(dr_i[-1], downs[-1].transpose(1, 2)), zr_last)  # the last read's ∂L/∂z_r
        du_i = [None] * (n - 1) + [torch.bmm(dzr, ups[-1].transpose(1, 2))]
        dw = torch.bmm(u.view(B, n, P, D)[:, -1].transpose(1, 2), dzr)  # accumulated in place from here
        dv_ = torch.bmm(h_last.transpose(1, 2), dr_i[-1])
        dwT, dvT = dw.transpose(1, 2), dv_.transpose(1, 2)  # views: they follow the in-place updates
        n_keys, n_vals = [], []
        for i in range(m - 1, -1, -1):
            a, e, g, e_d, e_u, k, v_, w = a_s[i], es[i], gs[i], eds[i], eus[i], ks[i], downs[i], ups[i]
            vT, wT = v_.transpose(1, 2), w.transpose(1, 2)
            n_ed = torch.bmm(a, dv_)  # −dL/dE_d
            n_eu = torch.bmm(k, dw)  # −dL/dE_u
            q_d = torch.sum(n_ed * e, -1, keepdim=True, out=q_ds[i])
            q_u = torch.sum(n_eu * g, -1, keepdim=True, out=q_us[i])
            if clip is None:
                n_e, n_g = n_ed.mul_(eta_c), n_eu.mul_(eta_c)
                n_a = torch.bmm(e_d, dvT)
                n_k = torch.bmm(e_u, dwT)
            else:
                n_e = n_ed.mul_(c_ds[i]).addcmul_(q_d * fe[i], e)
                n_g = n_eu.mul_(c_us[i]).addcmul_(q_u * fg[i], g)
                n_a = (q_d * fa[i] * a).baddbmm_(e_d, dvT)  # in place: baddbmm would copy the fresh term
                n_k = (q_u * fk[i] * k).baddbmm_(e_u, dwT)
            n_gh = n_g * dsig_z[i]
            n_e.baddbmm_(n_gh, v_)
            n_a.baddbmm_(n_e, vT)
            # n_z = n_a ⊙ silu′(z) + n_g ⊙ ĝ ⊙ silu″(z), in n_g's buffer
            n_z = n_g.mul_(ghs[i]).mul_(silu2[i]).addcmul_(n_a, dsig_z[i])
            n_keys.append(n_k.baddbmm_(n_z, wT))
            n_vals.append(n_e)
            dzr = torch.bmm(dr_i[i], vT).mul_(dsig_r[i])  # read i's ∂L/∂z_r, at state i
            du_i[i] = torch.bmm(dzr, wT)
            dw.baddbmm_(kts[i], n_z, alpha=-1).baddbmm_(uts[i], dzr)
            dv_.baddbmm_(n_gh.transpose(1, 2), e, alpha=-1).baddbmm_(ats[i], n_e, alpha=-1)
            dv_.baddbmm_(hts[i], dr_i[i])
        dkey = torch.cat(n_keys[::-1], 1).neg_()
        dval = torch.cat(n_vals[::-1], 1)
        deta = None
        if ctx.needs_input_grad[5]:
            q_ds, q_us = qs.unbind(0)
            terms = q_ds + q_us if clip is None else q_ds * rows[0] + q_us * rows[1]
            deta = -(terms.sum() * eta_c if clip is None else terms.sum()) / eta_c
        _WORKSPACES.give(bws)
        _WORKSPACES.give(ws)
        return dkey, dval, torch.cat(du_i, 1), dw, dv_, deta, None, None


def _cms_saved_shapes(B, m, P, D, f):
    """`CMSScan`'s saved tensors in its workspace, in order: [k; u] and [v; 0] rows (B, n − 1, 2P, ·),
    then per write (leading n − 1): [z; z_r], [a; h] = silu, [e; read], ĝ, g, E_d, E_u, the states
    after it, and six per-row scalars (c_d, c_u, ‖a‖, ‖e‖, ‖g‖, ‖k‖)."""
    return ((B, m, 2 * P, D), (B, m, 2 * P, D), (m, B, 2 * P, f), (m, B, 2 * P, f), (m, B, 2 * P, D),
            (m, B, P, f), (m, B, P, f), (m, B, P, D), (m, B, P, f), (m, B, D, f), (m, B, f, D), (6, m, B, P, 1))


def _cms_backward_shapes(m, B, P, f):
    """`CMSScan._backward`'s workspace: σ and σ′ of every [z; z_r], silu″(z), and ⟨n_E, ·⟩ per row."""
    return (m, B, 2 * P, f), (m, B, 2 * P, f), (m, B, P, f), (2, m, B, P, 1)


def _numel(shapes):
    return sum(math.prod(s) for s in shapes)


def _carve(buf, shapes):
    """Consecutive views of the flat tensor `buf` with the given shapes."""
    return [t.view(s) for t, s in zip(buf.split([math.prod(s) for s in shapes]), shapes)]


class _Workspaces:
    """Flat buffers kept from one call to the next on the CPU, a free list per (size, dtype).

    A scan takes one for its saved tensors in the forward and gives it back at the end of its
    backward, so a training step reuses the previous step's memory instead of allocating it
    again (glibc hands large freed blocks back to the system, and every page of a fresh one
    faults on first touch). Only CPU buffers are kept (CUDA has its caching allocator, and a
    graph capture its own pool). A buffer is never handed out twice at once; a graph kept with
    ``retain_graph=True`` whose buffer a later forward has reused fails loudly at its second
    backward (autograd's version check on saved tensors), never silently.
    """

    def __init__(self):
        self._free = {}

    def take(self, numel, like):
        free = self._free.get((numel, like.dtype)) if like.device.type == "cpu" else None
        return free.pop() if free else like.new_empty(numel)

    def give(self, buf):
        if buf.device.type == "cpu":
            free = self._free.setdefault((buf.numel(), buf.dtype), [])
            if all(b is not buf for b in free):
                free.append(buf)

    def clear(self):
        self._free.clear()


_WORKSPACES = _Workspaces()


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
        wt = w.to(x.dtype).t().contiguous()  # (K, C): each tap contiguous (a column of w, stride K, is not vectorised)
        y = x * wt[K - 1]
        for j in range(1, min(K, T)):
            y[:, j:].addcmul_(x[:, : T - j], wt[K - 1 - j])
        ctx.save_for_backward(x, wt)
        ctx.w_dtype = w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt = ctx.saved_tensors
        T, K = x.shape[1], wt.shape[0]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = dy * wt[K - 1]
            for j in range(1, min(K, T)):
                dx[:, : T - j].addcmul_(dy[:, j:], wt[K - 1 - j])
        if ctx.needs_input_grad[1]:
            B, _, C = x.shape
            buf = _WORKSPACES.take(x.numel(), x)  # one buffer for the K lag products, kept between calls
            taps = [torch.mul(dy[:, j:], x[:, : T - j], out=buf[: B * (T - j) * C].view(B, T - j, C)).sum((0, 1))
                    if j < T else dy.new_zeros(C) for j in range(K - 1, -1, -1)]
            _WORKSPACES.give(buf)
            dw = torch.stack(taps, 1).to(ctx.w_dtype)
        return dx, dw


class TitansScan(torch.autograd.Function):
    """The Titans memory's chunk writes (`model.chunk_grads` + `model.chunk_write` per chunk), hand-written backward.

    Inputs, for n chunks of C tokens (N rows, d width, f hidden; per-row scalars (N, n, C, 1)):
    w1t (N, f, d) = W₁ᵀ, w2t (N, d, f) = W₂ᵀ the state before the first chunk; x (N, n, 2C, d) =
    [v; k] per chunk; k_norm, k_sq = ‖k‖, ‖k‖²; eta, eta_c = η, η · clip (η without a clip);
    s2_in: W₂'s rate η/(1 + η‖k‖²) for w2_rate="input", None for "gauss-newton"; carry
    (N, n, C, 1), keep (N, n, 1, 1) the decays; clip (float or None); write_last: also write
    the last chunk and return the end state. Returns, stacked (N, n, …): e, a, g, s1, s2 (as
    `chunk_grads`) and each chunk's boundary state w1t, w2t; then, if write_last, the end state.
    Chunk i, from its boundary state (W₁ᵀ, W₂ᵀ):

        z = x W₂ᵀ, h = silu(z), [v̂; y_k] = x + h W₁ᵀ, a = h_k, e = y_k − v̂
        σ′ = silu′(z_k), ĝ = e W₁, g = ĝ ⊙ σ′
        s1 = η_c / ((1 + η‖a‖²) max(‖a‖‖e‖, clip))
        s2 = s2₀ clip / max(‖k‖‖g‖, clip),  s2₀ = η / (1 + η ‖k‖² m),  m = (σ′ ⊙ σ′) c,  c_j = ‖W₁[:, j]‖²
        W₁ᵀ ← keep W₁ᵀ − aᵀ (carry s1 e),   W₂ᵀ ← keep W₂ᵀ − kᵀ (carry s2 g)

    (without a clip the max(·) factors are 1; "input": s2₀ = s2_in.) Autograd records ~50
    operators per chunk and replays ~160, each a node with its own dispatch and allocation. Here
    the forward is unrecorded, and the backward runs the chain rule of the lines above in one
    reverse loop whose state gradients flow chunk to chunk; what does not depend on them — the
    per-row slopes of s1, s2 (zero where a clip is inactive, `_clip_slopes`) and the gradients of
    the per-row inputs, linear in ∂L/∂s1, ∂L/∂s2 — is batched over all chunks before or after it.
    One chunk (n = 1) is the same function, so the layer's other paths (a ragged last chunk,
    written generators) call it chunk by chunk.
    """

    @staticmethod
    def forward(ctx, w1t, w2t, x, k_norm, k_sq, eta, eta_c, s2_in, carry, keep, clip, write_last):
        n, C = x.shape[1], x.shape[2] // 2
        gauss_newton = s2_in is None
        outs = [[] for _ in range(7)]  # e, a, g, s1, s2, w1t, w2t per chunk
        per, rows = [], [[] for _ in range(6)]  # the backward loop's tensors; per-row ‖a‖, ‖e‖, ‖g‖, q1, s2₀, m
        one = x.new_ones(())  # 1 + b·c as one addcmul
        ones_f = one.expand(x.shape[0], C, w2t.shape[-1])  # σ′(z) = silu_backward(1, z), one operator
        eta_ksq = eta * k_sq if gauss_newton else None  # η‖k‖², batched over the chunks
        chunks = [t.unbind(1) if t is not None else [None] * n
                  for t in (x, k_norm, eta_ksq, eta, eta_c, s2_in, carry, keep)]
        for i, (xi, kn_i, eksq_i, eta_i, etac_i, s2in_i, carry_i, keep_i) in enumerate(zip(*chunks)):
            z = torch.bmm(xi, w2t)
            act = F.silu(z)
            vhat, yk = torch.baddbmm(xi, act, w1t).split(C, dim=1)
            a, zk = act[:, C:], z[:, C:]
            e = yk - vhat
            dsig = _silu_bwd(ones_f, zk)  # σ′(z_k)
            gh = torch.bmm(e, w1t.transpose(1, 2))
            g = gh * dsig
            a_norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
            q1 = torch.addcmul(one, eta_i * a_norm, a_norm)  # 1 + η‖a‖²
            dsig2 = colsq = m = None
            if gauss_newton:
                dsig2 = dsig * dsig
                colsq = (w1t * w1t).sum(-1, keepdim=True)
                m = torch.bmm(dsig2, colsq)
                s2_0 = eta_i / torch.addcmul(one, eksq_i, m)
            else:
                s2_0 = s2in_i
            if clip is None:
                e_norm = g_norm = None
                s1 = etac_i / q1
                s2 = s2_0
            else:
                e_norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True)
                g_norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
                s1 = etac_i / (q1 * torch.clamp_min(a_norm * e_norm, clip))
                s2 = s2_0 * clip / torch.clamp_min(kn_i * g_norm, clip)
            cs1, cs2 = carry_i * s1, carry_i * s2
            u1, u2 = cs1 * e, cs2 * g
            for lst, t in zip(outs, (e, a, g, s1, s2, w1t, w2t)):
                lst.append(t)
            for lst, t in zip(rows, (a_norm, e_norm, g_norm, q1, s2_0, m)):
                lst.append(t)
            per += [z, act, gh, g, dsig, dsig2, colsq, cs1, cs2, u1, u2]
            if i + 1 < n or write_last:
                w1t = (keep_i * w1t).baddbmm_(a.transpose(1, 2), u1, alpha=-1)
                w2t = (keep_i * w2t).baddbmm_(xi[:, C:].transpose(1, 2), u2, alpha=-1)
        stacked = [torch.stack(lst, 1) for lst in outs]
        rows = [None if lst[0] is None else torch.stack(lst, 1) for lst in rows]
        ctx.clip, ctx.write_last, ctx.n_per = clip, write_last, len(per) // n
        ctx.save_for_backward(x, k_norm, k_sq, eta, eta_c, carry, keep, *stacked, *rows, *per)
        return (*stacked, w1t, w2t) if write_last else tuple(stacked)

    @staticmethod
    def backward(ctx, *grads):
        return _in_forward_dtype(ctx, TitansScan._backward, *grads)

    @staticmethod
    def _backward(ctx, saved, dE, dA, dG, dS1, dS2, dW1B, dW2B, dw1_end=None, dw2_end=None):
        x, k_norm, k_sq, eta, eta_c, carry, keep, E, A, G, S1, S2, W1B, W2B = saved[:14]
        a_norm, e_norm, g_norm, q1, s2_0, m = saved[14:20]
        per, clip, m_per = saved[20:], ctx.clip, ctx.n_per
        n, C = x.shape[1], x.shape[2] // 2
        gauss_newton = m is not None
        # per-row slopes of every chunk, batched: ∂s1/∂a = A1·a, ∂s1/∂e = fe·e, ∂s2/∂g = fg·g, ∂s2/∂s2₀ = c2
        a_sq = a_norm * a_norm
        A1 = -2 * eta * S1 / q1
        if clip is None:
            den1, c2 = q1, 1.0
        else:
            fa, fe = _clip_slopes(S1, a_norm, e_norm, clip)
            fk, fg = _clip_slopes(S2, k_norm, g_norm, clip)
            A1 = A1 + fa
            den1 = q1 * torch.clamp_min(a_norm * e_norm, clip)
            c2 = clip / torch.clamp_min(k_norm * g_norm, clip)
        if gauss_newton:
            mf = -c2 * s2_0 * s2_0  # ∂s2/∂(‖k‖² m)
            dm_f = mf * k_sq  # ∂s2/∂m
        # silu″(z_k) = σ(1 − σ)(2 + z − 2 silu(z)) of every chunk, batched (the forward does not need it)
        zk = torch.stack([per[i * m_per][:, C:] for i in range(n)], 1)
        sig = torch.sigmoid(zk)
        silu2 = torch.add(zk, A, alpha=-2).add_(2).mul_(sig).mul_(1 - sig).unbind(1)
        gw1, gw2 = (dw1_end, dw2_end) if ctx.write_last else (None, None)
        ds1s, ds2s, ps, gws, dxs = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n
        # per-chunk views, one unbind each (W₁ᵀ, W₂ᵀ and x also transposed)
        chunks = [None if t is None else t.unbind(1) for t in (
            W1B, W2B, x, E, A, dE, dA, dG, dS1, dS2, dW1B, dW2B, carry, keep, A1, dm_f if gauss_newton else None,
            fe if clip is not None else None, fg if clip is not None else None,
            W1B.transpose(-1, -2), W2B.transpose(-1, -2), x.transpose(-1, -2))]
        for i in range(n - 1, -1, -1):
            z, act, gh, g, dsig, dsig2, colsq, cs1, cs2, u1, u2 = per[i * m_per : (i + 1) * m_per]
            (w1t, w2t, xi, e, a, de, da, dg, ds1, ds2, dw1b, dw2b, carry_i, keep_i, A1_i, dmf_i, fe_i, fg_i,
             w1, w2, xit) = (None if c is None else c[i] for c in chunks)
            dkw = None
            if gw1 is not None:  # the write: W₁ᵀ′ = keep W₁ᵀ − aᵀ u1, W₂ᵀ′ = keep W₂ᵀ − kᵀ u2
                n1 = torch.bmm(a, gw1)  # −∂L/∂u1
                n2 = torch.bmm(xi[:, C:], gw2)  # −∂L/∂u2
                p1 = (n1 * e).sum(-1, keepdim=True)
                p2 = (n2 * g).sum(-1, keepdim=True)
                da = torch.baddbmm(da, u1, gw1.transpose(1, 2), alpha=-1)
                dkw = torch.bmm(u2, gw2.transpose(1, 2))  # −∂L/∂k through the write
                de = torch.addcmul(de, cs1, n1, value=-1)
                dg = torch.addcmul(dg, cs2, n2, value=-1)
                ds1 = torch.addcmul(ds1, carry_i, p1, value=-1)
                ds2 = torch.addcmul(ds2, carry_i, p2, value=-1)
                ps[i], gws[i] = (p1, p2), (gw1, gw2)
            ds1s[i], ds2s[i] = ds1, ds2
            if clip is not None:
                dg = torch.addcmul(dg, ds2 * fg_i, g)
                de = torch.addcmul(de, ds1 * fe_i, e)
            da = torch.addcmul(da, ds1 * A1_i, a)
            ddsig = dg * gh  # ∂L/∂σ′
            if gauss_newton:  # m = (σ′ ⊙ σ′) c
                dm = ds2 * dmf_i
                ddsig.addcmul_(dm * colsq.transpose(1, 2), dsig, value=2)
                dcolsq = torch.bmm(dsig2.transpose(1, 2), dm)
            dgh = dg * dsig
            de = torch.baddbmm(de, dgh, w1t)
            dy = torch.cat([-de, de], dim=1)  # ∂L/∂[v̂; y_k]
            dact = torch.bmm(dy, w1)
            dact[:, C:] += da
            dz = _silu_bwd(dact, z)
            dz[:, C:].addcmul_(ddsig, silu2[i])
            dx = torch.baddbmm(dy, dz, w2)
            if dkw is not None:
                dx[:, C:] -= dkw
            dxs[i] = dx
            nw1 = torch.baddbmm(dw1b, act.transpose(1, 2), dy).baddbmm_(dgh.transpose(1, 2), e)
            if gauss_newton:
                nw1.addcmul_(dcolsq, w1t, value=2)
            nw2 = torch.baddbmm(dw2b, xit, dz)
            if gw1 is not None:
                nw1.addcmul_(keep_i, gw1)
                nw2.addcmul_(keep_i, gw2)
            gw1, gw2 = nw1, nw2
        # the per-row inputs' gradients, linear in ∂L/∂s1, ∂L/∂s2 and the writes' p1, p2
        ds1, ds2 = torch.stack(ds1s, 1), torch.stack(ds2s, 1)
        deta_c = ds1 / den1
        deta = ds1 * (-S1 / q1 * a_sq)
        dk_norm = dk_sq = ds2_in = None
        if gauss_newton:
            den2 = 1 + eta * (k_sq * m)
            deta = deta + ds2 * c2 / (den2 * den2)
            dk_sq = ds2 * mf * m
        else:
            ds2_in = ds2 * c2
        if clip is not None:
            dk_norm = ds2 * fk * k_norm
        nw = n if ps[-1] is not None else n - 1  # chunks written
        dcarry = torch.zeros_like(S1)
        dkeep = torch.zeros_like(keep)
        if nw:
            p1, p2 = (torch.stack([p[j] for p in ps[:nw]], 1) for j in range(2))
            dcarry[:, :nw] = -(S1[:, :nw] * p1 + S2[:, :nw] * p2)
            g1, g2 = (torch.stack([gw[j] for gw in gws[:nw]], 1) for j in range(2))
            dkeep[:, :nw] = ((g1 * W1B[:, :nw]).sum((-1, -2), keepdim=True)
                             + (g2 * W2B[:, :nw]).sum((-1, -2), keepdim=True))
        return gw1, gw2, torch.stack(dxs, 1), dk_norm, dk_sq, deta, deta_c, ds2_in, dcarry, dkeep, None, None


class RMSNorm(torch.autograd.Function):
    """``F.rms_norm(x, (D,), weight, eps)`` over the last dim with a hand-written backward.

    Forward as torch's own (x · rsqrt(mean(x²) + eps), then · weight: the same operators, the
    same values); backward, with x̂ = x · r, r = rsqrt(mean(x²) + eps), g = dy ⊙ weight:
        dx = r (g − x̂ ⟨g, x̂⟩ / D),   dweight = Σ_rows dy ⊙ x̂
    (autograd's backward of the decomposition is ~20 operators: pow, mean, rsqrt and two
    products, each with its own node). For float32/float64 outside autocast (`model.rms_norm`
    picks it); under autocast the model keeps `F.rms_norm`.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, dy):
        xhat, r, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            g = dy * weight
            m = (g * xhat).sum(-1, keepdim=True)
            dx = torch.addcmul(g, xhat, m, value=-1.0 / xhat.shape[-1]).mul_(r)
        return dx, dw, None


class GeneratorRead(torch.autograd.Function):
    """The static generators' reads (`SelfModifyingTitans._generate_static`) with a hand-written backward.

    Inputs: rows (2Q, R, d) the inputs of the 2Q generator memories (M_k, M_v then M_η, M_α, Q = 2H),
    w1 (2Q, d, f) = W₁, w2 (2Q, f, d) = W₂, r (Q, 1, d) the read-out vectors of the last Q. Returns
        kv (Q, R, d) = x + W₁ σ(W₂x)   of the first Q (M_k, M_v)
        pre (Q, R, 1) = (x + W₁ σ(W₂x))·r = x·r + σ(W₂x)·(W₁ᵀr)   of the last Q (M_η, M_α)
    Backward, with a = σ(z), z = W₂x, w = W₁ᵀr of the last Q and dp = ∂L/∂pre:
        da = [dkv W₁;  dp wᵀ],  dz = da ⊙ σ′(z),  dx = dz W₂ + [dkv;  dp r]
        dW₂ = dzᵀ x,  dW₁ = [dkvᵀ a;  rᵀ (dpᵀ a)],  dr = dpᵀ x + (dpᵀ a) W₁ᵀ
    (as autograd through the split, the products and the row dot products: ~60 operators, most of
    them small element-wise ones; here 13).
    """

    @staticmethod
    def forward(ctx, rows, w1, w2, r):
        Q = r.shape[0]
        # z and σ(z), what the backward needs, in a workspace reused from call to call (`_Workspaces`)
        ws = _WORKSPACES.take(2 * rows.shape[0] * rows.shape[1] * w2.shape[1], rows)
        z, act = ws.view(2, rows.shape[0], rows.shape[1], w2.shape[1]).unbind(0)
        torch.bmm(rows, w2.transpose(1, 2), out=z)  # (2Q, R, f)
        torch.ops.aten.silu.out(z, out=act)
        kv = torch.baddbmm(rows[:Q], act[:Q], w1[:Q].transpose(1, 2))
        w1r = torch.bmm(r, w1[Q:])  # (W₁ᵀr)ᵀ, (Q, 1, f)
        pre = torch.baddbmm(torch.bmm(rows[Q:], r.transpose(1, 2)), act[Q:], w1r.transpose(1, 2))  # (Q, R, 1)
        ctx.save_for_backward(rows, w1, w2, r, ws, w1r)
        return kv, pre

    @staticmethod
    def backward(ctx, dkv, dpre):
        return _in_forward_dtype(ctx, GeneratorRead._backward, dkv, dpre)

    @staticmethod
    def _backward(ctx, saved, dkv, dpre):
        rows, w1, w2, r, ws, w1r = saved
        Q = r.shape[0]
        z, act = ws.view(2, *rows.shape[:2], w2.shape[1]).unbind(0)
        bws = _WORKSPACES.take(z.numel(), z)  # ∂L/∂σ(z), then ∂L/∂z in place
        dz = bws.view(z.shape)
        torch.bmm(dkv, w1[:Q], out=dz[:Q])
        torch.mul(dpre, w1r, out=dz[Q:])
        _silu_bwd_out(dz, z, grad_input=dz)
        drows = torch.bmm(dz, w2)
        drows[:Q].add_(dkv)
        drows[Q:].addcmul_(dpre, r)
        dw2 = torch.bmm(dz.transpose(1, 2), rows)
        dpt = dpre.transpose(1, 2)  # (Q, 1, R)
        dw1r = torch.bmm(dpt, act[Q:])  # (Q, 1, f)
        dw1 = torch.empty_like(w1)
        torch.bmm(dkv.transpose(1, 2), act[:Q], out=dw1[:Q])
        torch.bmm(r.transpose(1, 2), dw1r, out=dw1[Q:])
        dr = torch.baddbmm(torch.bmm(dpt, rows[Q:]), dw1r, w1[Q:].transpose(1, 2))
        _WORKSPACES.give(bws)
        _WORKSPACES.give(ws)
        return drows, dw1, dw2, dr


class Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=-1, eps=eps)`` with a hand-written backward.

    Forward as torch's (x / max(‖x‖, eps)); backward, with n = max(‖x‖, eps) and y = x / n:
        dx = (dy − y ⟨dy, y⟩ [‖x‖ ≥ eps]) / n
    (autograd's backward through the norm, the clamp, the expand and the division is ~15
    operators; here 5).
    """

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        n = norm.clamp_min(eps)
        y = x / n
        ctx.save_for_backward(y, n, norm >= eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _in_forward_dtype(ctx, Normalize._backward, dy)

    @staticmethod
    def _backward(ctx, saved, dy):
        y, n, active = saved
        s = (dy * y).sum(-1, keepdim=True).mul_(active)
        return torch.addcmul(dy, y, s, value=-1).div_(n), None
