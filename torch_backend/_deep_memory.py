"""DMGD's deep momentum memory on torch tensors (docs/math.md §5; NL eq. 50).

:func:`deep_memory_kernel` is the scale-stable write and read on stacks of same-shape matrix
views ``(B, m, n)``, writing the memory's state into the stacks it is given; :data:`KERNEL` is
the memory's entry in ``_functional.MEMORIES``: it runs the kernel once per bucket of
same-shape parameters and applies σ.

Persistent stacks. Eagerly, a bucket's state lives in stacks ``(B, …)``, one per state entry,
and each parameter's entries are rows of them (views): the kernel then writes the state where
it lives, with no per-step ``torch.stack`` of the state and no copy back. The stacks are made
on a bucket's first step (:func:`state_rows`) and found again on later steps from the entries
themselves (``entry._base``); an entry that is not the row of one stack in bucket order (after
``load_state_dict``, a deepcopy or unpickling, a changed bucket: a parameter without a gradient)
makes that entry's stack anew, once. A bucket of one needs no stack (its entries, viewed with a
batch dimension of one). Under ``torch.compile`` and where the state dicts are per-step copies
(local shards of distributed parameters) the state is stacked and copied back each step instead.
On CPU a bucket also keeps its full-size temporaries between steps (:data:`_WORK`: one or two
``(B, m, n)`` buffers, not state), and a step's buckets share one buffer for the gradients'
stack (:data:`_STACKS`). Eager buckets run :func:`fused_kernel` (the same update in fewer
full-size passes, equal within rounding; :data:`FUSED` = False runs the op-by-op kernel); on
CPU, deepopt's C++ kernel runs it (:func:`_native_kernel`, ``csrc/deep_memory.cpp``: each
matrix's rows in cache-sized blocks, the gradients read where they are, no stack), with
:func:`fused_kernel` where that kernel is off or unbuilt or refuses a bucket. On CUDA,
:func:`fused_kernel` makes its two full-size passes with deepopt's CUDA kernels where they are
built (``csrc/deep_memory_cuda.cu``: the write's four passes as one, the read's two, and the
outer step where σ is the identity, as one), the thin products that reduce over rows cuBLAS's.
Local shards of distributed parameters run the kernel on whole matrices on their owners
(three collectives per bucket), where a matrix σ (Newton–Schulz) is applied too.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from deepopt import DeepMemory, Identity, UpdateRule, matrix_view_shape
from deepopt._memory import silu_grad
from torch_backend import _distributed, _fused, _native, _readout
from torch_backend._foreach import Tensors, buckets, stack_of
from torch_backend._kernels import MemoryKernel, OuterStep, Read


def deep_memory_kernel(mem: DeepMemory, s: torch.Tensor, w1: torch.Tensor | None,
                       w2: torch.Tensor | None, nu: torch.Tensor | None, g: torch.Tensor,
                       v: torch.Tensor, prev_key: torch.Tensor | None, work: tuple | None = None):
    """DMGD's scale-stable write and read (docs/math.md §5) on stacks.

    s, g, v, prev_key: (B, m, n); w1: (B, h, n); w2: (B, n, h); nu: (B, 1, 1), the value
    scale ν. Writes the new ``S, W₁, W₂, ν`` into ``s, w1, w2, nu`` (and ``Ĝ`` into
    ``prev_key`` with ``keys="previous"``, after reading it). Returns ``(S, W₁, W₂, ν, D̃, Ĝ)``:
    the first four are the stacks given; ``D̃`` is ``s`` itself when the memory is ``S`` alone.

    ``work``: two ``(B, m, n)`` buffers for the full-size temporaries (Ĝ, then D̃; F, then E),
    kept between steps by the caller (see :func:`_workspace`). Ĝ's buffer then holds D̃, and
    the returned Ĝ is None.
    """
    m = s.size(-2)
    alpha, eta = mem.momentum, mem.inner_lr
    w_read, w_err = work if work is not None else (None, None)
    g_hat = torch.div(g, g.norm(dim=-1, keepdim=True).clamp_(min=mem.key_eps), out=w_read)  # Ĝ: rows normalised
    k = g_hat if mem.keys == "current" else prev_key
    if mem.hidden:
        # ν = max(β ν, ‖V‖_F/√m, ε); the MLP's read at φ_{t−1} in units of ν.
        rms = v.norm(dim=(-2, -1), keepdim=True).div_(math.sqrt(m))
        nu.copy_(torch.maximum(nu * mem.scale_decay, rms).clamp_(min=mem.key_eps))
        z = torch.bmm(k, w1.mT)                              # Z = K W₁ᵀ : (B,m,h)
        h = F.silu(z)
        f = torch.bmm(h, w2.mT, out=w_err).mul_(nu)          # F = ν H W₂ᵀ : (B,m,n)
    # E = ∂ℓ/∂M(k_r) row by row: dot −ηV, l2 η(S + F − V).
    # (In place wherever a temporary would be made, and a product by α = 1 is skipped: the
    # values, and so the rounding, are the reference's operation by operation.)
    if mem.objective == "dot":
        e = torch.mul(v, -eta, out=w_err)
    else:
        e = (f.add_(s).sub_(v) if mem.hidden else torch.sub(s, v, out=w_err)).mul_(eta)
    if alpha != 1.0:
        s.mul_(alpha)
    s.sub_(e)                                                # S ← αS − ∇_S
    if mem.hidden:
        # θ: row mean of the gradient in units of ν, rates η/(1 + ηλ̄) per weight.
        e_hat = e.div_(nu)
        # ρ₂ = 1/(1 + (η/m)‖H‖²), ρ₁ = 1/(1 + 1.21η‖W₂‖²): (B,1,1)
        rate_w2 = h.square().sum(dim=(-2, -1), keepdim=True).mul_(eta / m).add_(1).reciprocal_()
        rate_w1 = w2.square().sum(dim=(-2, -1), keepdim=True).mul_(eta * mem.SILU_SLOPE_SQ).add_(1).reciprocal_()
        grad_w2 = torch.bmm(e_hat.mT, h).mul_(rate_w2.div_(m))   # Êᵀ H / m           : (B,n,h)
        grad_w1 = torch.bmm(torch.bmm(e_hat, w2).mul_(silu_grad(z, torch.sigmoid)).mT, k).mul_(rate_w1.div_(m))  # (B,h,n)
        w1.sub_(grad_w1)                                     # no retention on W₁
        if alpha != 1.0:
            w2.mul_(alpha)
        w2.sub_(grad_w2)
        hq = F.silu(torch.bmm(g_hat, w1.mT), inplace=True)  # σ(Q W₁ᵀ): Ĝ's last read
    if mem.keys == "previous":
        prev_key.copy_(g_hat)
    if work is not None:
        g_hat = None                                         # its buffer takes D̃
    if mem.hidden:
        d = torch.bmm(hq, w2.mT, out=w_read).mul_(nu).add_(s)   # D = S + ν σ(Q W₁ᵀ) W₂ᵀ
    else:
        d = s
    if mem.nesterov:
        d = torch.mul(d, alpha, out=w_read).add_(v * eta)
    return s, w1, w2, nu, d, g_hat


#: aten's SiLU backward (``dy ⊙ σ'(x)``) as the overload itself: the packet would resolve it on
#: every call (~0.5 µs of the kernel's per-bucket host time).
_silu_backward = torch.ops.aten.silu_backward.default


def fused_kernel(mem: DeepMemory, s: torch.Tensor, w1: torch.Tensor | None, w2: torch.Tensor | None,
                 nu: torch.Tensor | None, g: torch.Tensor, v: torch.Tensor, prev_key: torch.Tensor | None,
                 buf: torch.Tensor, outer: tuple[Tensors, float] | None = None):
    """:func:`deep_memory_kernel` in fewer full-size passes, temporaries and small ops, equal to it
    within float rounding (not bit for bit). Every product by a per-row or per-matrix scalar moves
    onto the thin ``(B, m, h)`` and ``(B, h, n)`` factors, or into a product:

    - Ĝ is never made: ``Ĝ X = r ⊙ (G X)`` and ``Yᵀ Ĝ = (r ⊙ Y)ᵀ G`` with ``r = 1/max(‖row‖, ε)``
      (``keys="previous"`` writes ``r ⊙ G`` into the previous key, once);
    - nor are ``F``, ``E`` or ``Ê``: with ``P = S − V + (ν H) W₂ᵀ`` (one ``baddbmm``; dot: ``P = −V``,
      not made: ``V`` is used with the signs flipped), ``E = ηP``, ``S ← αS − ηP`` is one ``sub_``
      and ``Ê = (η/ν) P``; the per-matrix rates fold into one scalar per weight,
      ``c₂ = ρ₂ η/(ν m) = 1/(ν (m/η + ‖H‖²))`` and ``c₁ = ρ₁ η/(ν m) = 1/(ν m (1/η + 1.21 ‖W₂‖²))``
      (divided by: no reciprocals; η = 0 gives c = 0, no step on θ):
      ``W₂ ← αW₂ − c₂ (Hᵀ P)ᵀ`` and ``W₁ ← W₁ − ((P W₂) ⊙ σ'(Z) ⊙ c₁ r)ᵀ G``, the latter one
      ``baddbmm_`` into ``W₁`` (its constant 1.21 m as the product's ``alpha``), the former one
      ``addcdiv_`` of ``(νH)ᵀ P`` by ``ν/c₂ = ‖νH‖² + ν² m/η`` (``νH`` is the factor ``F`` takes;
      ``H`` itself is never kept);
    - ``D = S + (ν σ(Q W₁ᵀ)) W₂ᵀ`` is one ``baddbmm`` (Nesterov ``αD + ηV``: α in it too);
    - ``‖V‖`` is read off the row norms when ``V`` is ``G``; ``Êᵀ H`` is made as ``(Hᵀ Ê)ᵀ``,
      the operand order MKL runs fast (``bmm(Ê.mT, H)``: up to 2× slower on a (4, 128, 512) stack).

    ``buf``: one ``(B, m, n)`` buffer, kept between steps by the caller (:func:`_workspace`): it
    holds ``P``, then ``D̃`` (P is spent by then). Returns ``(S, W₁, W₂, ν, D̃, None)``, the first
    four the caller's stacks, written in place (and the previous key); ``D̃`` is ``buf``, or ``s``
    itself when the memory is ``S`` alone without Nesterov.

    On CUDA, where deepopt's CUDA kernels are built and take the bucket (:func:`_cuda_ops`), the
    write ``P``, ``S ← αS − ηP`` (l2) is one pass with ``(νH) W₂ᵀ`` made in it, and so is the read
    ``D̃``; given ``outer`` (the bucket's parameters and lr, where σ is the identity), the read
    makes the outer step ``W ← W − γ D̃`` itself and ``D̃`` is returned as None.
    """
    m = s.size(-2)
    alpha, eta = mem.momentum, mem.inner_lr
    current, dot = mem.keys == "current", mem.objective == "dot"
    r = torch.linalg.vector_norm(g, dim=-1, keepdim=True)  # ‖row‖ : (B,m,1)
    if mem.hidden:                                           # ν = max(β ν, ‖V‖_F/√m, ε)
        rms = torch.linalg.vector_norm(r if v is g else v, dim=(-2, -1), keepdim=True).div_(math.sqrt(m))
        torch.maximum(nu.mul_(mem.scale_decay), rms, out=nu).clamp_(min=mem.key_eps)
    r = r.clamp_(min=mem.key_eps).reciprocal_()              # Ĝ = r ⊙ G
    if not mem.hidden:                                       # S ← αS − E, E = ηP: P = −V or S − V
        if not dot:
            s.lerp_(v, eta) if alpha == 1.0 else s.mul_(alpha - eta).add_(v, alpha=eta)
        else:
            (s if alpha == 1.0 else s.mul_(alpha)).add_(v, alpha=eta)
        if not current:
            torch.mul(g, r, out=prev_key)                    # Ĝ, the next step's key
        return s, w1, w2, nu, torch.mul(s, alpha, out=buf).add_(v, alpha=eta) if mem.nesterov else s, None
    k = g if current else prev_key
    w1t, w2t = w1.mT, w2.mT                                  # views: they follow in-place writes
    z = torch.bmm(k, w1t)                                    # Z = K W₁ᵀ : (B,m,h)
    if current:
        z.mul_(r)
    hn = F.silu(z).mul_(nu)                                  # ν H
    # P (l2), or −P = V (dot): the error E = ηP without its sign
    cuda = _cuda_ops(s)
    if cuda is not None and not dot and cuda.dmgd_write_(s, v, hn, w2, buf, alpha, eta):
        p = buf                                              # P and S ← αS − ηP, one pass
    else:
        p = v if dot else torch.sub(s, v, out=buf).baddbmm_(hn, w2t)   # P = S − V + ν H W₂ᵀ
        if alpha != 1.0:
            s.mul_(alpha)
        s.add_(p, alpha=eta) if dot else s.sub_(p, alpha=eta)   # S ← αS − E
    sign = -1.0 if dot else 1.0
    m_eta = m / eta if eta else math.inf                     # η = 0: c₁ = c₂ = 0, θ stays
    # ν/c₂ = ‖νH‖² + ν² m/η (c₂ Hᵀ = (νH)ᵀ/(ν/c₂)); 1/(1.21 m c₁) = ν (‖W₂‖² + m/(1.21 η m)): (B,1,1)
    d2 = torch.linalg.vector_norm(hn, dim=(-2, -1), keepdim=True).square_().addcmul_(nu, nu, value=m_eta)
    d1 = torch.linalg.vector_norm(w2, dim=(-2, -1), keepdim=True).square_().add_(m_eta / (mem.SILU_SLOPE_SQ * m)).mul_(nu)
    # (P W₂ ⊙ σ'(Z)) in one op (aten's silu_backward: silu_grad's closed form), rows × c₁ r / (1.21 m)
    back = _silu_backward(torch.bmm(p, w2), z)
    back = back.mul_(torch.div(r, d1)) if current else back.div_(d1)
    grad_w2 = torch.bmm(hn.mT, p).mT                         # (νH)ᵀ P, transposed: (B,n,h)
    w1.baddbmm_(back.mT, k, alpha=-sign / (mem.SILU_SLOPE_SQ * m))   # no retention on W₁
    if alpha != 1.0:
        w2.mul_(alpha)
    w2.addcdiv_(grad_w2, d2, value=-sign)                    # W₂ ← αW₂ − c₂ (Hᵀ P)ᵀ
    hq = F.silu(torch.bmm(g, w1t).mul_(r), inplace=True).mul_(nu)   # ν σ(Q W₁ᵀ), Q = Ĝ
    if not current:
        torch.mul(g, r, out=prev_key)                        # Ĝ, the next step's key
    if cuda is not None:                                     # D̃ = a (S + ν σ(Q W₁ᵀ) W₂ᵀ) + c V, one pass
        a, c = (alpha, eta) if mem.nesterov else (1.0, 0.0)
        ps, lr = outer if outer is not None else ([], 0.0)
        if ps and cuda.dmgd_read_(s, v, hq, w2, None, ps, a, c, lr):
            return s, w1, w2, nu, None, None                 # the outer step is made
        if cuda.dmgd_read_(s, v, hq, w2, buf, [], a, c, 0.0):
            return s, w1, w2, nu, buf, None
    if mem.nesterov:                                         # D̃ = αD + ηV
        return s, w1, w2, nu, torch.baddbmm(s, hq, w2t, beta=alpha, alpha=alpha, out=buf).add_(v, alpha=eta), None
    return s, w1, w2, nu, torch.baddbmm(s, hq, w2t, out=buf), None   # D = S + ν σ(Q W₁ᵀ) W₂ᵀ


def _cuda_ops(s: torch.Tensor):
    """``torch.ops.deepopt_cuda`` for a bucket whose stacks are plain float32/float64 CUDA tensors,
    where deepopt's CUDA kernels are built (:func:`_native.cuda_ops`); else None. Its ops check
    the rest and refuse, writing nothing, what they cannot take."""
    if not s.is_cuda or type(s) not in _fused.PLAIN or s.dtype not in (torch.float32, torch.float64):
        return None
    return _native.cuda_ops()


@functools.lru_cache(maxsize=64)
def _entries(mem: DeepMemory, m: int, n: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The memory's state entries (its slots) and the shape of one row of each one's stack:
    slots shaped like the parameter are stacked as its ``m × n`` matrix view. Cached: it is
    asked once per bucket per step."""
    return tuple((slot.key, (m, n) if slot.like_param else slot.shape((), m, n)) for slot in mem.state_slots())


def state_rows(mem: DeepMemory, sts: list[dict], shape: tuple[int, int], rebind: bool = True):
    """The bucket's state as stacks ``(S, W₁, W₂, ν (B,1,1), previous key)`` that the kernel
    writes in place, and the entries to copy back afterwards (:func:`copy_back`).

    An entry that is not the row of a stack (see the module's docstring) is stacked: with
    ``rebind``, its state entries then become that stack's rows (nothing to copy back, and
    the next step finds the stack); without, the stack is a copy, returned in the list.
    """
    m, n = shape
    found: dict[str, torch.Tensor] = {}
    copied = []
    for key, row in _entries(mem, m, n):
        xs = [st[key] for st in sts]
        stack = stack_of(xs, row)
        if stack is None:
            stack = torch.stack([x.reshape(row) for x in xs])
            if rebind:
                for st, x, r in zip(sts, xs, stack.unbind(0)):
                    st[key] = r.view(x.shape)
            else:
                copied.append((key, stack))
        found[key] = stack
    nu = found.get("value_scale")
    stacks = (found["memory"], found.get("mlp_w1"), found.get("mlp_w2"),
              None if nu is None else nu.view(-1, 1, 1), found.get("prev_key"))
    return stacks, copied


#: The stacks :func:`state_rows` found or made for a bucket, with weak references to the
#: entries they were found from (every entry of every parameter, in bucket order), keyed by
#: the first parameter's memory entry. While every entry is still that same object, each is
#: still its stack's row (a tensor keeps its base and offset), so the stacks are taken as they
#: are: ~20 host calls fewer per bucket than :func:`state_rows`'s checks. Any entry replaced
#: (``load_state_dict``, a deepcopy, a changed bucket, a user's assignment) finds them anew.
_ROWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _bucket_rows(mem: DeepMemory, sts: list[dict], shape: tuple[int, int]):
    """:func:`state_rows` (with ``rebind``) through the cache :data:`_ROWS`. A bucket of one
    is not cached: its stacks are views of its entries, which would keep the key alive."""
    if len(sts) == 1:
        return state_rows(mem, sts, shape, True)
    keys = _entries(mem, *shape)
    owner = sts[0]["memory"]
    xs = [st[key] for key, _ in keys for st in sts]
    hit = _ROWS.get(owner)
    if hit is not None and len(hit[0]) == len(xs) and all(r() is x for r, x in zip(hit[0], xs)):
        return hit[1], []
    stacks, copied = state_rows(mem, sts, shape, True)
    xs = [st[key] for key, _ in keys for st in sts]            # the rows, after any rebind
    _ROWS[sts[0]["memory"]] = (tuple(weakref.ref(x) for x in xs), stacks)
    return stacks, copied


def copy_back(sts: list[dict], copied: list) -> None:
    """Write the stacks :func:`state_rows` made as copies into the state entries."""
    for key, stack in copied:
        for st, r in zip(sts, stack.unbind(0)):
            st[key].copy_(r.view_as(st[key]))


def state_stacks(mem: DeepMemory, sts: list[dict], shape: tuple[int, int]):
    """The bucket's state stacked into new tensors (the kernel's inputs; see :func:`state_writeback`)."""
    m, n = shape
    s = torch.stack([st["memory"].reshape(m, n) for st in sts])
    w1 = torch.stack([st["mlp_w1"] for st in sts]) if mem.hidden else None
    w2 = torch.stack([st["mlp_w2"] for st in sts]) if mem.hidden else None
    nu = torch.stack([st["value_scale"] for st in sts]).view(-1, 1, 1) if mem.hidden else None
    prev = torch.stack([st["prev_key"].reshape(m, n) for st in sts]) if mem.keys == "previous" else None
    return s, w1, w2, nu, prev


def state_writeback(mem: DeepMemory, sts: list[dict], s, w1, w2, nu, g_hat) -> None:
    for j, st in enumerate(sts):
        st["memory"].copy_(s[j].view_as(st["memory"]))
        if mem.hidden:
            st["mlp_w1"].copy_(w1[j])
            st["mlp_w2"].copy_(w2[j])
            # Through a (1,) view: torch 2.13's AOTAutograd drops an in-place write into a 0-d
            # float64 CPU graph input (ν of float64 parameters), so a compiled step lost ν.
            st["value_scale"].view(1).copy_(nu[j].view(1))
        if mem.keys == "previous":
            st["prev_key"].copy_(g_hat[j].view_as(st["prev_key"]))


def _run(mem: DeepMemory, sts: list[dict], gs: Tensors, vs: Tensors, shape: tuple[int, int],
         rebind: bool, flats: dict | None = None, shared: bool = False,
         outer: tuple[Tensors, float] | None = None) -> torch.Tensor | None:
    """The kernel on one bucket (its states, gradients and values), the state written where it
    lives; returns ``D̃ (B, m, n)``. ``rebind``: ``sts`` are the optimizer's own dicts (not
    per-step copies), whose entries may become rows of new stacks. ``flats``: the buffers that
    the step's buckets share on CPU (:func:`_step_buffers`), for the gradients' stack.
    ``shared``: D̃ is spent before the next bucket runs, so its buffer is one the step's
    buckets share too (else the bucket's own, :func:`_workspace`). ``outer``: the bucket's
    parameters and lr where σ is the identity: the C++ kernel (on CUDA, the CUDA read) may make
    the outer step ``W ← W − γ D̃`` itself, and then None is returned."""
    if torch.compiler.is_compiling():                        # one graph: stack, then copy back
        g, v = _rows(gs, shape), _values(gs, vs, shape)
        s, w1, w2, nu, prev = state_stacks(mem, sts, shape)
        s, w1, w2, nu, d, g_hat = deep_memory_kernel(mem, s, w1, w2, nu, g, v, prev)
        state_writeback(mem, sts, s, w1, w2, nu, g_hat)
        return d
    (s, w1, w2, nu, prev), copied = _bucket_rows(mem, sts, shape) if rebind else state_rows(mem, sts, shape, False)
    native = FUSED and mem.hidden and s.device.type == "cpu"  # deepopt's CPU kernel, where it takes the bucket
    if native and outer is not None and _native_kernel(mem, s, w1, w2, nu, gs, vs, prev, None, outer) is None:
        copy_back(sts, copied)                               # it made the outer step: no buffer for D̃
        return None
    work = None                                              # CPU workspaces, where s persists
    if s.device.type == "cpu" and all(key != "memory" for key, _ in copied):
        k = 1 if FUSED else 2
        if shared and flats is not None:
            work = tuple(_shared_buffer(flats, s, f"work{j}") for j in range(k))
        else:
            work = _workspace(sts[0]["memory"] if len(sts) == 1 else s, s, k)
    if native:
        d = _native_kernel(mem, s, w1, w2, nu, gs, vs, prev, work[0] if work is not None else torch.empty_like(s))
        if d is not False:
            copy_back(sts, copied)
            return d
    stack = (None if work is None or len(sts) == 1 or flats is None
             else _shared_buffer(flats, s, "grads"))
    g = _rows(gs, shape, stack)
    v = _values(gs, vs, shape, g)
    if FUSED:                                                # the same kernel for every eager bucket
        d = fused_kernel(mem, s, w1, w2, nu, g, v, prev, work[0] if work is not None else torch.empty_like(s),
                         outer if s.is_cuda else None)[4]    # None: its CUDA kernel made the outer step
    else:
        d = deep_memory_kernel(mem, s, w1, w2, nu, g, v, prev, None if work is None else work[:2])[4]
    copy_back(sts, copied)
    return d


def _native_kernel(mem: DeepMemory, s, w1, w2, nu, gs: Tensors, vs: Tensors, prev, out: torch.Tensor | None,
                   outer: tuple[Tensors, float] | None = None):
    """:func:`fused_kernel` on a CPU bucket through deepopt's C++ kernel (``csrc/deep_memory.cpp``:
    each matrix's rows in cache-sized blocks: their norms, the write, the read; the gradients
    read where they are, no stack). Returns ``out`` holding D̃; or, given ``outer`` (the bucket's parameters and lr)
    and no ``out``, None: the outer step ``W ← W − γ D̃`` made in the read's pass, D̃ never
    stored. False where the kernels are off or unbuilt, or the op does not take the bucket (a
    dtype other than float32/float64, a non-contiguous or subclassed tensor, a parameter the step
    cannot be written into), having written nothing."""
    ps, lr = outer if outer is not None else ([], 0.0)
    if out is None and not all(p.is_contiguous() and p.dtype == s.dtype for p in ps):
        return False
    if not {type(s), *map(type, gs), *map(type, ps)} <= _fused.PLAIN:     # no tensor subclass (DTensor, …)
        return False
    native = _native.ops()
    if native is None:
        return False
    values = [] if all(v is x for v, x in zip(vs, gs)) else vs
    done = native.dmgd_memory_(s, w1, w2, nu, gs, values, prev, out, ps, lr, mem.momentum, mem.inner_lr,
                               mem.scale_decay, mem.key_eps, mem.SILU_SLOPE_SQ, mem.objective == "dot",
                               mem.nesterov)
    return False if not done else None if ps else out


def _rows(xs: Tensors, shape: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, m, n)`` of the tensors ``xs``: a view for a bucket of one, else a stack (into ``out``)."""
    if len(xs) == 1:
        return xs[0].reshape(1, *shape)
    return torch.stack([x.reshape(shape) for x in xs], out=out)


def _values(gs: Tensors, vs: Tensors, shape: tuple[int, int], g: torch.Tensor | None = None) -> torch.Tensor:
    """The values' stack: the gradients' own (``g``) when V = G, one stack made once."""
    if all(v is x for v, x in zip(vs, gs)):
        return g if g is not None else _rows(gs, shape)
    return _rows(vs, shape)


#: Whether eager buckets run :func:`fused_kernel` (equal to :func:`deep_memory_kernel` within
#: rounding, ~15% less CPU time per bucket) or :func:`deep_memory_kernel` itself (False: every
#: result bit for bit the op-by-op kernel's). Every eager bucket takes the same kernel, so a
#: bucket split across DDP ranks equals the unsplit bucket bit for bit; ``torch.compile`` and the
#: whole-matrix kernel of sharded (FSDP) buckets run the op-by-op kernel. CUDA buckets take the
#: fused kernel too (plain torch ops, fewer full-size passes: on an H200 the memory alone went
#: from 5.8× its floor with the op-by-op kernel to 4.5×).
FUSED = True

#: Each bucket's full-size temporaries on CPU, kept between steps: freed and allocated anew,
#: a megabyte-sized temporary came back as fresh pages from the OS on every step (page faults
#: made a (4, 512, 128) bmm 2-4× slower). Keyed by the object that persists with the bucket's
#: state (its memory stack, or a bucket of one's memory entry); dropped with it. Not state:
#: no checkpoint or copy sees it. (CUDA's caching allocator keeps freed blocks already.)
_WORK: WeakIdKeyDictionary = WeakIdKeyDictionary()

#: Buffers on CPU that a step's buckets share, one flat buffer per dtype and use, grown to the
#: largest bucket and kept between steps as :data:`_WORK` is, keyed by the first parameter's
#: memory entry (see :func:`_batched`): the gradients' stack (a bucket's stack is spent when its
#: kernel returns) and, when the outer step is made bucket by bucket, the kernel's workspace (D̃
#: is spent then too). One buffer instead of one per bucket: less memory to stream through the
#: caches every step.
_STACKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _workspace(owner: torch.Tensor, like: torch.Tensor, k: int) -> tuple:
    """``k`` buffers shaped like ``like`` (B, m, n) for the kernel: :func:`fused_kernel`'s one,
    :func:`deep_memory_kernel`'s two."""
    work = _WORK.get(owner)
    if work is None or len(work) != k or work[0].shape != like.shape or work[0].dtype != like.dtype:
        work = _WORK[owner] = tuple(torch.empty_like(like) for _ in range(k))
    return work


def _step_buffers(owner: torch.Tensor) -> dict:
    """The flat buffers (:data:`_STACKS`) that ``owner``'s step shares, looked up once a step."""
    flats = _STACKS.get(owner)
    if flats is None:
        flats = _STACKS[owner] = {}
    return flats


def _shared_buffer(flats: dict, like: torch.Tensor, use: str) -> torch.Tensor:
    """A buffer shaped like ``like`` (B, m, n) for ``use`` (``"grads"``: the gradients' stack;
    ``"work0"``, ``"work1"``: the kernel's workspace): a view of the step's flat buffer
    (:func:`_step_buffers`)."""
    flat = flats.get((like.dtype, use))
    if flat is None or flat.numel() < like.numel():
        flat = flats[(like.dtype, use)] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return flat[:like.numel()].view(like.shape)


def _single(rule: UpdateRule, st: dict, g: torch.Tensor, v: torch.Tensor, t, lay=None) -> Read:
    """One parameter: a stack of one (a local shard goes through the batched path's owner)."""
    if lay is not None and lay.sharded:
        read = _batched(rule, [st], [g], [v], None, [lay])
        return Read(read.outs[0])
    d = _run(rule.memory, [st], [g], [v], matrix_view_shape(g.shape), rebind=lay is None)
    return Read(_readout.apply_one(rule, d[0].view_as(g), lay))


def _batched(rule: UpdateRule, states: list[dict], gs: Tensors, vs: Tensors, ts: list | None,
             layouts: list | None = None, apply=None) -> Read:
    """Each bucket of same-shape matrices in one kernel call, then σ. A bucket of local shards
    whose σ reads whole matrices gets σ on the owner, where D̃ is whole already.

    ``apply`` (see :class:`~torch_backend._kernels.MemoryKernel`): each bucket's ``σ(D̃)`` goes
    to the outer step as soon as it is made, while it is in cache, and the buckets share one
    workspace (D̃ is spent before the next bucket runs); the returned read-outs are None."""
    mem = rule.memory
    sigma_whole = _readout.on_whole(rule)
    ds: Tensors = [None] * len(gs)  # type: ignore[list-item]
    done: list[int] = []                                     # σ already applied
    # The shared buffers (eager only: the compiled path stacks anew, and dynamo does not trace
    # into a WeakIdKeyDictionary).
    flats = _step_buffers(states[0]["memory"]) if states and not torch.compiler.is_compiling() else None
    shared = apply is not None and layouts is None
    # σ = identity: the C++ kernel may make the outer step itself, in the read's pass.
    outer = apply if shared and isinstance(apply, OuterStep) and type(rule.readout) is Identity else None
    for (m, n, _, _, lay), idx in buckets(gs, _distributed.sharded_only(layouts)).items():
        sts = [states[i] for i in idx]
        if lay is not None:
            d = _whole(mem, lay, sts, [gs[i] for i in idx], [vs[i] for i in idx], sigma_whole)
            if sigma_whole is not None:
                done += idx
        else:                                                # rebind unless per-step dict copies
            d = _run(mem, sts, [gs[i] for i in idx], [vs[i] for i in idx], (m, n), layouts is None,
                     flats, shared, None if outer is None else ([outer.params[i] for i in idx], outer.lr))
            if d is None:                                    # the kernel made the outer step
                continue
        if shared:                                           # the outer step for this bucket, now
            apply(idx, _readout.apply(rule, [d[j].view_as(gs[i]) for j, i in enumerate(idx)]))
            continue
        for j, i in enumerate(idx):
            ds[i] = d[j].view_as(gs[i])
    if shared:
        return Read(ds)
    if not done:
        return Read(_readout.apply(rule, ds, layouts))
    done_set = set(done)
    outs, rest = list(ds), [i for i in range(len(ds)) if i not in done_set]
    mapped = _readout.apply(rule, [ds[i] for i in rest], None if layouts is None else [layouts[i] for i in rest])
    for j, i in enumerate(rest):
        outs[i] = mapped[j]
    return Read(outs)


#: The deep memory's entry in ``_functional.MEMORIES``.
KERNEL = MemoryKernel(single=_single, batched=_batched, applies=True)


def _whole(mem: DeepMemory, lay, sts: list[dict], gs: Tensors, vs: Tensors,
                       sigma=None) -> torch.Tensor:
    """DMGD on a bucket of local shards: the kernel runs on whole matrices, each on its owner
    (θ's gradients and ν read every row); rows go back to their shards, and θ, ν to every rank.
    Three collectives per bucket. Returns the read-outs ``(B, *local shape)``, through ``sigma``
    (the read-out map, e.g. Newton–Schulz) when given: the owner holds the whole D̃ already,
    so σ costs no collective of its own."""
    m, n = matrix_view_shape(tuple(lay.shape))
    rows = [[st["memory"] for st in sts], gs, vs]
    if mem.keys == "previous":
        rows.append([st["prev_key"] for st in sts])
    whole, b = _distributed.gather_whole(lay, [torch.stack(x) for x in rows])      # (b', k, *shape)
    s, g, v, *prev = (whole[:, j].reshape(-1, m, n) for j in range(len(rows)))
    w1 = w2 = nu = None
    if mem.hidden:                                           # θ, ν: every rank's copy → owner's share
        w1 = _distributed.share_of(lay, torch.stack([st["mlp_w1"] for st in sts]))
        w2 = _distributed.share_of(lay, torch.stack([st["mlp_w2"] for st in sts]))
        nu = _distributed.share_of(lay, torch.stack([st["value_scale"] for st in sts])).view(-1, 1, 1)
    s, w1, w2, nu, d, g_hat = deep_memory_kernel(mem, s, w1, w2, nu, g, v, prev[0] if prev else None)
    if sigma is not None:
        d = sigma(d).to(d.dtype)
    outs = [s, d, g_hat] if prev else [s, d]
    back = _distributed.scatter_whole(lay, [x[:b].reshape(b, *lay.shape) for x in outs], len(sts))
    if mem.hidden:                                           # one all-gather for W₁, W₂ and ν
        h = mem.hidden
        theta = torch.cat([w1.flatten(1), w2.flatten(1), nu.flatten(1)], dim=1)[:b]
        theta = _distributed.share_all(lay, theta, len(sts))
        w1, w2, nu = theta.split([h * n, n * h, 1], dim=1)
        w1, w2 = w1.reshape(-1, h, n), w2.reshape(-1, n, h)
    state_writeback(mem, sts, back[:, 0], w1, w2, nu, back[:, 2] if prev else None)
    return back[:, 1]


__all__ = ["FUSED", "KERNEL", "copy_back", "deep_memory_kernel", "fused_kernel", "state_rows", "state_stacks", "state_writeback"]
