"""DMGD's deep momentum memory (docs/math.md §5; NL eq. 50) as an optax transform.

The memory of each leaf is ``M_φ(q) = S + ν W₂ silu(W₁ q)`` applied to the rows ``q`` of its
matrix view; one inner gradient step per optimizer step writes it, one read at the current
normalised gradient gives ``D̃``. The batched kernel :func:`deep_memory_kernel` works on
stacks of matrix views, ``(..., m, n)``, or of their transposes, ``(..., n, m)`` — optax's
``(in, out)`` kernels as stored, so no m×n array is transposed. Batch axes (stacked heads,
scanned layers) ride on ``einsum``'s ellipsis, each matrix with its own ``S``, ``W₁``, ``W₂``, ν.

Persistent stacks. Unless the parameters are sharded on a mesh, the memory's state is kept as
one stack per bucket of same-shape, same-dtype leaves (:class:`LeafStacks`), and each step runs
the kernel once per bucket on those stacks: only the gradients are stacked per step, the state
is read and written where it lives. :meth:`DeepMemoryState.per_leaf` gives the state leaf by
leaf, as the parameters are laid out. On a mesh the state stays per leaf, sharded like the
parameters. Measured on ``step_cost --quick``'s 16 matrices (one CPU core, interleaved):
- the memory alone (``readout=None``, or ``"sign"``) took 0.88–0.89 of the per-leaf state's
  time for the whole step;
- stacking the per-leaf state anew every step took 1.085 of it;
- with a Newton–Schulz read-out after the memory (the default deep Muon), the stacks took
  1.05–1.08 of the time. The cause is not established: materialising the read-out's slices
  changed nothing. So ``jax_backend.compile`` keeps that rule's state per leaf (``stacks=False``).

deepopt's C++ kernel. On the CPU, each bucket of float32/float64 stacks runs the kernel torch
runs too (``deepopt/csrc/deep_memory.h``) as an XLA custom call (:func:`native_bucket`,
:mod:`jax_backend._native`) instead of :func:`deep_memory_kernel`'s ~40 XLA ops: each matrix's
rows in cache-sized blocks, the gradients read where they are (not stacked), the state written
in place. Where it is not built (``DEEPOPT_NATIVE=0``, no compiler) or JAX computes elsewhere,
the XLA ops run. Measured against them (``python -m benchmarks.dmgd_kernel``; benchmarks/README.md,
"Fourteenth round"), on one thread per bucket: 0.58–0.77 of the time in torch's layout and
0.81–1.08 in optax's (the view's columns, where a block of rows spans every row of storage); a
whole ``step_cost --quick`` step, 0.94–0.98 of the time on one thread and 0.67–0.79 on two (the
matrices shared among XLA's threads).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepopt import AdamValues, DeepMemory, IdentityValues
from deepopt._memory import silu_grad
from jax_backend import _native
from jax_backend._routing import path_name
from jax_backend._sharding import params_mesh
from jax_backend._state import init_state
from jax_backend._transforms import MatrixView, apply_values


def _einsum(spec: str):
    return lambda a, b: jnp.einsum(spec, a, b)


# The kernel's products for each storage of the m×n quantities (S, G, V, D): the matrix view
# itself, ``(..., m, n)``, with H as m×h; or its transpose, ``(..., n, m)`` (optax's (in, out)
# kernels), with H as h×m. The operand orders are the ones XLA's CPU dot runs fast (contracting
# the lhs's last axis): on a 512×128 matrix with h = 16 the slow orders cost 2–8× as much
# (transposed B^T K: the h×n product is made as its n×h transpose, ~25% faster than "hm,nm->hn").
_EINSUMS = {
    False: {"Z = K W1^T": _einsum("...mn,...hn->...mh"), "F = H W2^T": _einsum("...mh,...nh->...mn"),
            "E^T H": lambda e, h: jnp.swapaxes(_einsum("...mh,...mn->...hn")(h, e), -1, -2),
            "E W2": _einsum("...mn,...nh->...mh"), "B^T K": _einsum("...mh,...mn->...hn")},
    True: {"Z = K W1^T": lambda k, w1: _einsum("...hn,...nm->...hm")(w1, k),
           "F = H W2^T": lambda h, w2: _einsum("...nh,...hm->...nm")(w2, h),
           "E^T H": _einsum("...nm,...hm->...nh"),
           "E W2": lambda e, w2: _einsum("...nh,...nm->...hm")(w2, e),
           # The barrier keeps the transpose out of the dot: XLA folds it in otherwise, and the
           # product runs as "hm,nm->hn" (~25% slower on a 128×512 view, ~5% of the kernel).
           "B^T K": lambda b, k: jnp.swapaxes(jax.lax.optimization_barrier(
               _einsum("...nm,...hm->...nh")(k, b)), -1, -2)},
}


def deep_memory_kernel(memory: DeepMemory, s: jax.Array, w1: jax.Array | None,
                       w2: jax.Array | None, nu: jax.Array | None, g: jax.Array, v: jax.Array,
                       prev_key: jax.Array | None, *, transposed: bool = False,
                       after: jax.Array | None = None):
    """DMGD's scale-stable write and read on stacks of matrix views (docs/math.md §5).

    s, g, v, prev_key: ``(..., m, n)`` — or ``(..., n, m)``, the matrix views' transposes, with
    ``transposed=True`` (optax's ``(in, out)`` kernels as they are: every product below names
    its axes, so no m×n array is ever transposed); w1: ``(..., h, n)``; w2: ``(..., n, h)``;
    nu: ``(...)``, the value scale ν (``None`` with w1, w2 when ``hidden = 0``; ``prev_key``
    ``None`` for ``keys="current"``). Returns ``(S, W₁, W₂, ν, D̃, Ĝ)`` in the inputs' layout.

    ``after``: a scalar zero (:func:`_zero_after`) added to ``W₁``, where this matrix's products
    start, so that XLA schedules them after the matrix the zero came from; it changes no value.
    None: no order. (Not to ``G²`` as well: with the zero as a second operand, jax 0.10's CPU
    reduction of the row sums ran at half speed, ~24 against ~11 µs on 128×512; left unordered,
    step_cost's 16 matrices took 0.959 of the time with warm caches and 1.007 with a 48 MB
    flush before each step, 300 alternated rounds each.)
    """
    ein = _EINSUMS[transposed]
    m = s.shape[-1] if transposed else s.shape[-2]
    alpha, eta = memory.momentum, memory.inner_lr

    # Keys and queries: Ĝ = r ⊙ G, each row of the view (length n) times r = 1/max(‖row‖, ε).
    # Ĝ is never made: a product with it is the product with G, its rows then scaled by r
    # (Ĝ X = r ⊙ (G X), Yᵀ Ĝ = (r ⊙ Y)ᵀ G), and when V is G (the same array) ‖V‖² is the sum
    # of the rows' squares: one pass over G, not three.
    row = -2 if transposed else -1
    sq_rows = jnp.sum(g * g, axis=row, keepdims=True)
    if after is not None and w1 is not None:
        w1 = w1 + after.astype(w1.dtype)
    r = 1 / jnp.maximum(jnp.sqrt(sq_rows), memory.key_eps)   # (..., m, 1), or (..., 1, m) transposed
    current = memory.keys == "current"
    k = g if current else prev_key

    # ν = max(β ν, ‖V‖_F/√m, ε); the MLP's read at φ_{t−1} in units of ν: H = silu(K W₁ᵀ), F = ν H W₂ᵀ.
    if memory.hidden:
        # The barrier keeps ‖V‖² a sum of the row sums: XLA folds a sum of sums into one sum
        # of G², which then has two readers and is written out (on CPU: a full-size write and
        # read more per matrix than the one fused pass over G).
        sq_v = (jnp.sum(jax.lax.optimization_barrier(sq_rows), axis=(-2, -1)) if v is g
                else jnp.sum(v * v, axis=(-2, -1)))
        rms = jnp.sqrt(sq_v) / jnp.sqrt(jnp.asarray(m, v.dtype))
        nu = jnp.maximum(jnp.maximum(memory.scale_decay * nu, rms), memory.key_eps).astype(v.dtype)
        scale = nu[..., None, None]
        z = ein["Z = K W1^T"](k, w1)                      # m×h
        z = z * r if current else z
        h = jax.nn.silu(z)
        f = ein["F = H W2^T"](scale * h, w2)              # m×n, ν on the thin factor
    # E = ∂ℓ/∂M(k_r) = η P, row by row: dot P = −v_r; l2 P = M(k_r) − v_r.
    if memory.objective == "dot":
        p = -v
    else:
        p = (s + f if memory.hidden else s) - v

    # Write: S ← αS − E; θ: row mean of its gradient in units of ν, rates η/(1 + ηλ̄) per weight.
    s = alpha * s - eta * p                               # ∇_S = E, row by row
    if memory.hidden:
        e_scale = eta / scale                             # Ê = (η/ν) P, applied to the thin products
        sq = lambda x: jnp.sum(x * x, axis=(-2, -1))[..., None, None]
        rate_w2 = 1 / (1 + (eta / m) * sq(h))                              # λ̄ = ‖H‖²/m
        rate_w1 = 1 / (1 + eta * memory.SILU_SLOPE_SQ * sq(w2))            # λ̄ = 1.21‖W₂‖²
        grad_w2 = ein["E^T H"](p, h) * (e_scale * rate_w2 / m)             # Êᵀ H / m   : n×h
        back = ein["E W2"](p, w2) * (e_scale * silu_grad(z, jax.nn.sigmoid))   # (Ê W₂) ⊙ silu'(Z)
        grad_w1 = ein["B^T K"](back * r if current else back, k) * (rate_w1 / m)   # [·]ᵀ K / m : h×n
        w1 = w1 - grad_w1                                 # no retention on W₁
        w2 = alpha * w2 - grad_w2
        # Read D = M_{φ_t}(Q) = S + ν silu(Q W₁ᵀ) W₂ᵀ at Q = Ĝ_t.
        d = s + ein["F = H W2^T"](scale * jax.nn.silu(ein["Z = K W1^T"](g, w1) * r), w2)
    else:
        d = s
    if memory.nesterov:
        d = alpha * d + eta * v                           # D̃ = αD + ηV
    return s, w1, w2, nu, d, g * r


def native_ready(memory: DeepMemory, dtype) -> bool:
    """Whether :func:`native_bucket` takes a bucket of ``dtype``: a memory with an MLP
    (``hidden > 0``), float32 or float64, JAX computing on the CPU (its default backend), and the
    kernel built (:func:`jax_backend._native.target`: asked last, so nothing else starts a build)."""
    return (memory.hidden > 0 and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
            and jax.default_backend() == "cpu" and _native.target() is not None)


def native_bucket(memory: DeepMemory, s: jax.Array, w1: jax.Array, w2: jax.Array, nu: jax.Array,
                  prev_key: jax.Array | None, gs: list, vs: list, *, transposed: bool):
    """:func:`deep_memory_kernel` on one bucket's stacks through deepopt's C++ kernel, an XLA
    custom call on the CPU (:mod:`jax_backend._native`; the header ``deepopt/csrc/deep_memory.h``).

    s, w1, w2, nu, prev_key: the bucket's stacks, as :func:`deep_memory_kernel` takes them; gs:
    the bucket's gradients, one array per leaf in the kernel's layout (not stacked: the kernel
    reads them where they are); vs: the values likewise, or empty where V = G. Returns what
    :func:`deep_memory_kernel` returns (``Ĝ`` None unless ``keys="previous"``); equal to it within
    float rounding. The state is written in place where the caller donates it (else XLA copies it
    first). Differentiable: its JVP is :func:`deep_memory_kernel`'s (for meta-gradients through a
    step), and ``vmap`` runs it once per batch element.
    """
    previous = prev_key is not None
    m, n = (s.shape[-1], s.shape[-2]) if transposed else (s.shape[-2], s.shape[-1])

    def ops(state, gs, vs):
        s, w1, w2, nu, prev = state
        g = jnp.stack(gs)
        s, w1, w2, nu, d, g_hat = deep_memory_kernel(memory, s, w1, w2, nu, g, jnp.stack(vs) if vs else g, prev,
                                                     transposed=transposed)
        return (s, w1, w2, nu, g_hat if previous else None), d

    @jax.custom_jvp
    def kernel(state, gs, vs):
        held = [x for x in state if x is not None]                    # S, W₁, W₂, ν, [Ĝ]: in place
        call = jax.ffi.ffi_call(_native.TARGET, [*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in held),
                                                 jax.ShapeDtypeStruct(s.shape, s.dtype)],
                                input_output_aliases={i: i for i in range(len(held))}, vmap_method="sequential")
        *new, d = call(*held, *gs, *vs, m=np.int64(m), n=np.int64(n), h=np.int64(memory.hidden),
                       momentum=np.float64(memory.momentum), inner_lr=np.float64(memory.inner_lr),
                       scale_decay=np.float64(memory.scale_decay), eps=np.float64(memory.key_eps),
                       slope_sq=np.float64(memory.SILU_SLOPE_SQ), dot=np.int64(memory.objective == "dot"),
                       nesterov=np.int64(memory.nesterov), transposed=np.int64(transposed),
                       previous=np.int64(previous), values=np.int64(bool(vs)))
        return (*new[:4], new[4] if previous else None), d

    kernel.defjvp(lambda primals, tangents: jax.jvp(ops, primals, tangents))
    (s, w1, w2, nu, g_hat), d = kernel((s, w1, w2, nu, prev_key), tuple(gs), tuple(vs))
    return s, w1, w2, nu, d, g_hat


def _in_order() -> bool:
    """Whether the step runs the matrices' kernels one after the other, in tree order.

    Left to itself XLA's CPU scheduler runs the leaves breadth-first (every matrix's first
    product, then every second, …), so each matrix's ``G``, ``P`` and temporaries leave the L2
    cache between its products, which then read them from L3 or memory. Optimization barriers
    do not order work on the CPU (they are gone before scheduling); a data dependence does:
    each matrix's kernel takes a zero computed from the previous one's read-out. Measured on
    ``step_cost --quick``'s 16 matrices (the memory alone, one core): ~10% less time per step.
    Only with one device on the CPU: with several, a scalar of one matrix would be a collective
    for every sharded leaf; GPU schedules were not measured.
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _zero_after(x: jax.Array) -> jax.Array:
    """A scalar 0 that XLA cannot compute before ``x`` (any finite, infinite or NaN value)."""
    t = x.reshape(-1)[0]
    return jnp.nan_to_num(jnp.clip(t, -1, 1)) * 0


@jax.tree_util.register_pytree_node_class
class LeafStacks:
    """One state field of a deep memory, one stack per bucket of same-shape leaves.

    ``stacks[b]`` is ``(B_b, *row)``: row ``j`` is the field of leaf ``buckets[b][j]`` (an index
    into the flattened parameters, ``treedef``), in the kernel's layout — the leaf's own shape
    under ``layout="optax"``, its ``m × n`` matrix view under ``"torch"``. A pytree whose
    children are the stacks (so ``jit``, ``tree.map`` and checkpoints see plain arrays) and whose
    static part is the bucketing; :meth:`per_leaf` gives the field laid out as the parameters.
    """

    def __init__(self, stacks: tuple, treedef: Any, buckets: tuple[tuple[int, ...], ...],
                 shapes: tuple[tuple[int, ...], ...]):
        self.stacks, self.treedef, self.buckets, self.shapes = tuple(stacks), treedef, buckets, shapes

    def tree_flatten(self):
        return self.stacks, (self.treedef, self.buckets, self.shapes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(tuple(children), *aux)

    def per_leaf(self) -> Any:
        """The field as a pytree like the parameters: each leaf's row of its bucket's stack, in
        the leaf's shape (``shapes``: the per-leaf shape of this field)."""
        leaves: list = [None] * self.treedef.num_leaves
        for stack, idx in zip(self.stacks, self.buckets):
            for j, i in enumerate(idx):
                leaves[i] = stack[j].reshape(self.shapes[i])
        return self.treedef.unflatten(leaves)

    def __eq__(self, other):
        """As a NamedTuple compares: the static part, then the children (``tree.map`` results
        such as shapes compare by value; arrays, as in any tuple, have no single truth value)."""
        if not isinstance(other, LeafStacks):
            return NotImplemented
        return self.tree_flatten()[1] == other.tree_flatten()[1] and self.stacks == other.stacks

    __hash__ = None                           # mutable children, as a list's

    def __repr__(self) -> str:
        return f"LeafStacks({[getattr(x, 'shape', x) for x in self.stacks]}, buckets={self.buckets})"


class DeepMemoryState(NamedTuple):
    """State of :func:`scale_by_deep_memory`. Per leaf of shape ``(*batch, in, out)``
    (optax layout) or ``(out, in, *rest)`` (torch layout, no batch), matrix view ``m × n``.

    ``memory``, ``mlp_w1``, ``mlp_w2``, ``value_scale`` and ``prev_key`` are :class:`LeafStacks`
    (one stack per bucket of same-shape leaves), except on a mesh or with ``stacks=False``
    (``compile`` before a Newton–Schulz read-out), where each is a pytree like the parameters;
    :meth:`per_leaf` gives the latter form either way. ``values_sq`` is always a pytree like the
    parameters."""

    count: jax.Array          # shape=(), int32: t of docs/math.md §0
    memory: Any               # S, per leaf shaped like its parameter (m×n per matrix)
    mlp_w1: Any               # W₁, shape=(*batch, h, n) per leaf; None when hidden = 0
    mlp_w2: Any               # W₂, shape=(*batch, n, h) per leaf, starts at 0; None when hidden = 0
    value_scale: Any          # ν, shape=(*batch,) per leaf, starts at 0; None when hidden = 0
    prev_key: Any             # Ĝ_{t−1}, like the parameters; None unless keys="previous"
    values_sq: optax.Updates  # v of AdamValues (docs/math.md §3), like the parameters; None otherwise

    def per_leaf(self) -> DeepMemoryState:
        """This state with every field a pytree like the parameters (unstacked)."""
        return self._replace(**{f: getattr(self, f).per_leaf() for f in _STACKED
                                if isinstance(getattr(self, f), LeafStacks)})


#: The fields of :class:`DeepMemoryState` kept as :class:`LeafStacks` off a mesh.
_STACKED = ("memory", "mlp_w1", "mlp_w2", "value_scale", "prev_key")


def _buckets(leaves: list) -> tuple[tuple[int, ...], ...]:
    """Indices of same-shape, same-dtype leaves, bucket by bucket in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((tuple(x.shape), jnp.dtype(x.dtype)), []).append(i)
    return tuple(tuple(idx) for idx in groups.values())


def _kernel_layout(view: MatrixView):
    """A leaf shaped like its parameter as the kernel takes it: as it is under ``layout="optax"``
    (``(..., in, out)``, the view's transpose, ``transposed=True``), else its ``m × n`` view."""
    return (lambda x: x) if view.layout == "optax" else view.to_matrix


def _stacked_state(state: DeepMemoryState, params: Any, view: MatrixView) -> DeepMemoryState:
    """``state`` (per leaf, from :func:`init_state`) with its per-matrix fields as :class:`LeafStacks`."""
    leaves, treedef = jax.tree.flatten(params)
    buckets = _buckets(leaves)
    row = _kernel_layout(view)

    def stacks(tree, like_param: bool):
        if tree is None:
            return None
        xs = treedef.flatten_up_to(tree)
        shapes = tuple(tuple(x.shape) for x in xs)
        rows = [row(x) if like_param else x for x in xs]
        return LeafStacks(tuple(jnp.stack([rows[i] for i in idx]) for idx in buckets), treedef, buckets, shapes)

    return state._replace(memory=stacks(state.memory, True), mlp_w1=stacks(state.mlp_w1, False),
                          mlp_w2=stacks(state.mlp_w2, False), value_scale=stacks(state.value_scale, False),
                          prev_key=stacks(state.prev_key, True))


def scale_by_deep_memory(
    memory: DeepMemory,
    values: IdentityValues | AdamValues | None = None,
    *,
    view: MatrixView,
    stacks: bool = True,
) -> optax.GradientTransformation:
    """Write the gradient into a deep momentum memory and read it out (docs/math.md §5, NL eq. 50)::

        V_t = P(G_t)                                     values (docs/math.md §3)
        Ĝ_t = G_t, each row / max(‖row‖, key_eps)        on each matrix view
        K = Ĝ_t (keys="current") or Ĝ_{t−1}; Q = Ĝ_t
        H = silu(K W₁ᵀ), F = H W₂ᵀ, Z = K W₁ᵀ
        E = −η V (dot)  or  η (S + F − V) (l2)           ∂ℓ/∂M(k_r), row by row
        S  ← α S  − E
        W₂ ← α W₂ − Eᵀ H / m                             row mean for the shared θ
        W₁ ← α W₁ − [(E W₂) ⊙ silu'(Z)]ᵀ K / m
        D  = S + silu(Q W₁ᵀ) W₂ᵀ;  D̃ = D, or α D + η V (Nesterov)

    Initial state: ``S = 0``, ``W₂ = 0`` (the memory starts as plain momentum),
    ``W₁ = memory.initial_w1(name, n)`` with ``name`` the leaf's dotted pytree path
    (:func:`jax_backend.path_name`), so torch, JAX and the reference start from the same
    ``W₁``. A leaf with batch axes (optax layout, e.g. a stacked ``(L, in, out)`` kernel) is
    ``L`` independent memories that all start from the one ``W₁`` drawn for the leaf's name
    (a name identifies a leaf, not a matrix of it); their ``W₁`` diverge from the first step.
    With ``stacks`` and off a mesh the state is kept as one stack per bucket of same-shape
    leaves (see the module's docstring and :class:`DeepMemoryState`).

    Args:
      memory: the :class:`deepopt.DeepMemory` (α = momentum, η = inner_lr, h = hidden).
      values: :class:`deepopt.IdentityValues` (None means this) or :class:`deepopt.AdamValues`.
      view: the matrix view; every leaf must have ndim ≥ 2 (route 1-D leaves to a fallback).
      stacks: keep the state as stacks per bucket (off a mesh); False keeps it per leaf.
        ``jax_backend.compile`` passes False when a Newton–Schulz read-out follows (see the
        module's docstring).
    """
    if view is None:
        raise ValueError("a deep memory needs a matrix view")
    previous = memory.keys == "previous"
    transposed = view.layout == "optax"        # (..., in, out) is the view's transpose: used as is
    row = _kernel_layout(view)

    slots = (IdentityValues() if values is None else values).state_slots() + memory.state_slots()

    def init_fn(params):
        def check(path, p):                   # every leaf needs a matrix view, hidden = 0 too
            if len(p.shape) < 2:
                raise ValueError(f"a deep memory needs leaves with ndim ≥ 2; "
                                 f"{path_name(path)!r} has shape {tuple(p.shape)}")

        jax.tree_util.tree_map_with_path(check, params)
        state = init_state(DeepMemoryState, slots, params, view)
        return _stacked_state(state, params, view) if stacks and params_mesh(params) is None else state

    def stacked_update(updates, vals, state: DeepMemoryState):
        """One kernel call per bucket, on the state's stacks; the gradients (and values other
        than the gradients) stacked for it."""
        st = state.memory
        leaves, treedef = jax.tree.flatten(updates)
        if treedef != st.treedef:
            raise ValueError(f"the updates' tree {treedef} is not the one this state was made for, {st.treedef}")
        vleaves = treedef.flatten_up_to(vals)
        field = lambda f, b: None if getattr(state, f) is None else getattr(state, f).stacks[b]
        ds: list = []
        new = {f: [] for f in _STACKED}
        ordered = memory.hidden and _in_order()
        last = None
        for b, idx in enumerate(st.buckets):
            same = all(vleaves[i] is leaves[i] for i in idx)
            state_b = (st.stacks[b], field("mlp_w1", b), field("mlp_w2", b), field("value_scale", b))
            if native_ready(memory, st.stacks[b].dtype):     # deepopt's C++ kernel (an XLA custom call)
                s, w1, w2, nu, d, g_hat = native_bucket(
                    memory, *state_b, field("prev_key", b), [row(leaves[i]) for i in idx],
                    [] if same else [row(vleaves[i]) for i in idx], transposed=transposed)
            else:
                g = jnp.stack([row(leaves[i]) for i in idx])
                v = g if same else jnp.stack([row(vleaves[i]) for i in idx])
                s, w1, w2, nu, d, g_hat = deep_memory_kernel(   # V = G: the kernel reads ‖V‖ off Ĝ's row norms
                    memory, *state_b, g, v, field("prev_key", b), transposed=transposed,
                    after=_zero_after(last) if ordered and last is not None else None)
                last = d                        # one bucket after another (see _in_order)
            for f, x in zip(_STACKED, (s, w1, w2, nu, g_hat if previous else None)):
                new[f].append(x)
            ds.append(d)
        fields = {f: None if getattr(state, f) is None else
                  LeafStacks(tuple(new[f]), st.treedef, st.buckets, getattr(state, f).shapes) for f in _STACKED}
        return LeafStacks(tuple(ds), st.treedef, st.buckets, st.shapes).per_leaf(), fields   # D̃ shaped as S

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        values_sq, vals = apply_values(values, state.values_sq, updates, count)
        if isinstance(state.memory, LeafStacks):
            d, fields = stacked_update(updates, vals, state)
            return d, DeepMemoryState(count=count, values_sq=values_sq, **fields)

        def leaf(g, v, s, w1, w2, nu, prev, after=None):
            back = (lambda x: x) if transposed else (lambda x: view.from_matrix(x, g.shape))
            gm = row(g)                       # V = G (identity values): one array, so the
            s, w1, w2, nu, d, g_hat = deep_memory_kernel(   # kernel reads ‖V‖ off Ĝ's row norms
                memory, row(s), w1, w2, nu, gm, gm if v is g else row(v), row(prev) if previous else None,
                transposed=transposed, after=after)
            return back(s), w1, w2, back(d), back(g_hat) if previous else None, nu

        # Fields a config does not use are None; give tree.map a None per leaf in their place.
        absent = jax.tree.map(lambda _: None, updates)
        fields = (updates, vals, state.memory,
                  state.mlp_w1 if memory.hidden else absent,
                  state.mlp_w2 if memory.hidden else absent,
                  state.value_scale if memory.hidden else absent,
                  state.prev_key if previous else absent)
        if memory.hidden and _in_order():
            # One matrix after another (see _in_order): each starts after the last one's read-out.
            treedef = jax.tree.structure(updates)
            outs: list = []
            for args in zip(*(treedef.flatten_up_to(f) for f in fields)):
                outs.append(leaf(*args, after=_zero_after(outs[-1][3]) if outs else None))
            results = treedef.unflatten(outs)
        else:
            results = jax.tree.map(leaf, *fields)
        # Unzip the per-leaf tuples into one tree per field (updates gives the structure).
        field = lambda i: jax.tree.map(lambda _, r: r[i], updates, results)
        new_state = DeepMemoryState(
            count=count,
            memory=field(0),
            mlp_w1=field(1) if memory.hidden else None,
            mlp_w2=field(2) if memory.hidden else None,
            value_scale=field(5) if memory.hidden else None,
            prev_key=field(4) if previous else None,
            values_sq=values_sq,
        )
        return field(3), new_state

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["DeepMemoryState", "LeafStacks", "deep_memory_kernel", "scale_by_deep_memory"]
