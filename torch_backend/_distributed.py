"""Distributed parameters: FSDP2 / DTensor shards and DDP replicas (docs/distributed.md).

A deepopt step has two kinds of phases. Element-wise phases (values, memory writes, moments,
weight decay, the outer step) act on each entry alone, so they run on each rank's local shard
(``DTensor.to_local()``) with no communication. Whole-matrix phases — Newton–Schulz, the delta
term ``S KᵀK``, DMGD's memory (its θ is shared by all rows, its value scale reads ‖V‖_F), M3's
slow read-out — need every entry of a matrix. For those, the same-shape matrices of a bucket
are stacked and *redistributed* so that each rank holds whole matrices for its share of the
stack (an all-to-all on NCCL; gloo emulates it with an all-gather), the matrix kernel runs on
those whole matrices, and the results are redistributed back to the parameters' shards. The
number of collectives per step is therefore a few per bucket — never a function of
``ns_steps`` — and each rank computes ``1/world`` of the matrices.

For plain parameters replicated by DDP, Newton–Schulz takes the same path when the optimizer
is given ``ddp_mesh``: every rank orthogonalises its share of the matrices, then one
all-gather per bucket shares the results, bit for bit what each rank would have computed.
The delta term and DMGD's memory stay on each replica (:func:`sharded_only`), as does
everything without ``ddp_mesh``.

Everything here is ``torch.distributed`` and DTensor; nothing is home-made communication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from deepopt import matrix_view_shape

# Components a wrapper inserts into parameter names: anywhere (torch.compile, FSDP1,
# activation checkpointing) or at the front (DDP's ``module.``), as DCP's FQNs drop them.
_WRAPPER_ATOMS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_LEADING_ATOMS = frozenset({"module"})


def canonical_name(name: str) -> str:
    """The name a bare model gives a parameter: ``module.`` (DDP, leading), ``_orig_mod.``
    (``torch.compile``), ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.`` removed.

    Routing patterns and DMGD's seeding see this name, so a wrapped and an unwrapped model
    get the same routes and the same state.
    """
    atoms = name.split(".")
    kept = [a for a in atoms if a not in _WRAPPER_ATOMS]
    while len(kept) > 1 and kept[0] in _LEADING_ATOMS:
        kept = kept[1:]
    return ".".join(kept)


@dataclass(frozen=True)
class Layout:
    """Where a parameter's whole matrix lives.

    ``placements`` are the parameter's DTensor placements on ``mesh`` (for a DDP replica,
    ``Replicate()`` on the DDP mesh); ``shape`` is its global shape. Whole-matrix work is
    split over the stack of same-layout matrices: each rank owns ``1/world`` of them along
    every mesh dimension that shards the parameter (DDP: the replicated one).
    """

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    split_replicas: bool = False    # DDP: Replicate() dims also split the work

    @property
    def sharded(self) -> bool:
        """Whether a rank holds only part of each matrix (else it could compute it alone)."""
        return any(isinstance(pl, Shard) for pl in self.placements)

    def stacked(self, lead: int) -> tuple[Placement, ...]:
        """Placements of a stack ``(B, *lead dims, *shape)`` of this layout's local tensors."""
        return tuple(Shard(pl.dim + 1 + lead) if isinstance(pl, Shard) else pl for pl in self.placements)

    def owned(self) -> tuple[Placement, ...]:
        """Placements of a stack whose ranks each hold whole matrices for a share of the stack."""
        return tuple(Shard(0) if isinstance(pl, Shard) or self.split_replicas else pl
                     for pl in self.placements)


def layouts(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], ddp_mesh: DeviceMesh | None,
            names: Callable[[torch.Tensor], str]) -> list[Layout | None] | None:
    """Each parameter's :class:`Layout`, or None when no parameter is distributed.

    Checks only (nothing changes): a DTensor parameter needs a DTensor gradient with the same
    placements, made of ``Shard`` and ``Replicate`` (no pending ``Partial`` reduction); a
    ``ddp_mesh`` applies to plain (replicated) parameters only.
    """
    if ddp_mesh is None and not any(issubclass(t, DTensor) for t in {*map(type, params), *map(type, grads)}):
        return None                                   # the common case: nothing distributed
    out: list[Layout | None] = []
    for p, g in zip(params, grads):
        if isinstance(p, DTensor):
            if ddp_mesh is not None:
                raise ValueError(f"parameter {names(p)!r} is a DTensor (FSDP2/tensor parallel) but the "
                                 "optimizer was given ddp_mesh, which is for plain DDP-replicated "
                                 "parameters; leave ddp_mesh out: DTensor parameters carry their mesh")
            if not isinstance(g, DTensor) or g.device_mesh != p.device_mesh or g.placements != p.placements:
                got = (f"a DTensor with placements {tuple(g.placements)}" if isinstance(g, DTensor)
                       else "a plain tensor")
                raise ValueError(f"parameter {names(p)!r} is a DTensor with placements {tuple(p.placements)} "
                                 f"but its gradient is {got}; deepopt needs gradients laid out as their "
                                 "parameters (as FSDP2 leaves them)")
            bad = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
            if bad:
                raise ValueError(f"parameter {names(p)!r} has placements {tuple(p.placements)}; deepopt "
                                 "supports Shard and Replicate placements (reduce Partial ones first)")
            out.append(Layout(p.device_mesh, tuple(p.placements), p.shape))
        elif isinstance(g, DTensor):
            raise ValueError(f"parameter {names(p)!r} is a plain tensor but its gradient is a DTensor")
        elif ddp_mesh is not None:
            out.append(Layout(ddp_mesh, (Replicate(),), p.shape, split_replicas=True))
        else:
            out.append(None)
    return out if any(lay is not None for lay in out) else None


def sharded_only(layouts: list[Layout | None] | None) -> list[Layout | None] | None:
    """``layouts`` with None wherever each rank already holds whole matrices (DDP replicas).

    There, the delta term and DMGD's memory run locally, with no communication: a split
    would save little, and their element-wise ``silu``/``sigmoid`` round differently at
    different positions in a batch (vectorised body, scalar tail), so only Newton–Schulz —
    matmuls, bit for bit wherever it runs — is split across replicas.
    """
    if layouts is None:
        return None
    out = [lay if lay is not None and lay.sharded else None for lay in layouts]
    return out if any(lay is not None for lay in out) else None


def check_ddp_mesh(ddp_mesh: object) -> DeviceMesh | None:
    """Validate the optimizer's ``ddp_mesh`` argument (a 1-D DeviceMesh or None)."""
    if ddp_mesh is None:
        return None
    if not isinstance(ddp_mesh, DeviceMesh):
        raise TypeError(f"ddp_mesh must be a torch.distributed.device_mesh.DeviceMesh (e.g. "
                        f"init_device_mesh('cuda', (world_size,))) or None, got {type(ddp_mesh).__name__}")
    if ddp_mesh.ndim != 1:
        raise ValueError(f"ddp_mesh must be 1-D (the ranks that hold identical replicas), got a "
                         f"{ddp_mesh.ndim}-D mesh of shape {tuple(ddp_mesh.shape)}")
    return ddp_mesh


def local(x):
    """A DTensor's local shard (shares its storage: in-place writes reach the DTensor)."""
    return x.to_local() if isinstance(x, DTensor) else x


def local_states(states: Sequence[dict]) -> list[dict]:
    """Per-parameter state dicts whose tensors are local shards (same storage): per-step copies
    of the optimizer's dicts, whose in-place writes reach its state; an entry a step rebinds
    in them goes back with :func:`carry_back`."""
    return [{k: local(v) for k, v in st.items()} for st in states]


def carry_back(states: Sequence[dict], copies: Sequence[dict]) -> None:
    """Put into the optimizer's ``states`` each entry that a step rebound (or added) in their
    per-step ``copies`` of :func:`local_states`, e.g. a step count moved to its parameter's
    device for torch's fused AdamW kernel: without this the move, and every count after it,
    stayed in the copy, so on CUDA a sharded AdamW took t = 1 at every step. A rebound local
    shard of a DTensor entry goes back as a DTensor laid out as the one it replaces. Call it
    under ``torch.no_grad`` (a DTensor's ``to_local()`` is then its shard itself)."""
    for st, copy in zip(states, copies):
        for key, value in copy.items():
            held = st.get(key)
            if value is local(held):
                continue
            if isinstance(held, DTensor):
                value = DTensor.from_local(value, held.device_mesh, held.placements, run_check=False)
            st[key] = value


def replicate_like(state: dict, p: torch.Tensor, keys: Sequence[str]) -> None:
    """Make ``state[key]`` a ``Replicate`` DTensor on ``p``'s mesh (DMGD's θ and ν under FSDP2),
    so checkpoints see one consistent tensor; a no-op for plain parameters."""
    if not isinstance(p, DTensor):
        return
    replicate = [Replicate()] * p.device_mesh.ndim
    for key in keys:
        if key in state and not isinstance(state[key], DTensor):
            state[key] = DTensor.from_local(state[key], p.device_mesh, replicate, run_check=False)


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _redistribute(x: torch.Tensor, mesh: DeviceMesh, src: tuple, dst: tuple, shape: Sequence[int]) -> torch.Tensor:
    """The local part under ``dst`` of the global tensor whose local part under ``src`` is ``x``."""
    shape = tuple(shape)
    dt = DTensor.from_local(x, mesh, src, run_check=False, shape=torch.Size(shape),
                            stride=_contiguous_stride(shape))
    return dt.redistribute(mesh, dst).to_local()


def _padded(x: torch.Tensor, total: int) -> torch.Tensor:
    """A share of one matrix out of a bucket of several, padded with a zero matrix.

    Matrix kernels special-case a batch of one (``newton_schulz`` takes 2-D ``addmm``; a
    one-matrix ``bmm`` rounds differently on CPU), so a share keeps the batched kernels the
    whole bucket would take: the split run then equals the unsplit one bit for bit. Zero
    matrices are fixed points of every kernel here (no division by zero: norms are clamped).
    """
    return torch.cat([x, torch.zeros_like(x)]) if x.size(0) == 1 < total else x


def gather_whole(layout: Layout, stacks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Whole matrices for this rank's share of a bucket.

    ``stacks``: k tensors ``(B, *local shape)`` (same dtype). Returns ``(x, b)``: this rank's
    ``b`` matrices (``b ≈ B / world``; 0 on some ranks when ``B < world``) as ``x: (b', k,
    *global shape)``, ``b' ≥ b`` (see :func:`_padded`; use ``x[:b]`` of any result). One
    collective.
    """
    x = torch.stack(list(stacks), dim=1)
    total = x.size(0)
    full = (total, len(stacks), *layout.shape)
    x = _redistribute(x, layout.mesh, layout.stacked(1), layout.owned(), full)
    return _padded(x, total), x.size(0)


def scatter_whole(layout: Layout, outs: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Back to the parameters' shards: ``outs`` are k tensors ``(b, *global shape)`` from
    :func:`gather_whole`'s share; returns ``(B, k, *local shape)``. One collective."""
    y = torch.stack(list(outs), dim=1)
    full = (total, len(outs), *layout.shape)
    return _redistribute(y, layout.mesh, layout.owned(), layout.stacked(1), full)


def share_of(layout: Layout, x: torch.Tensor) -> torch.Tensor:
    """This rank's share ``(b', ...)`` of a stack ``(B, ...)`` that every rank holds, padded as
    :func:`gather_whole` pads (no communication)."""
    rep = (Replicate(),) * layout.mesh.ndim
    return _padded(_redistribute(x, layout.mesh, rep, layout.owned(), x.shape), x.size(0))


def share_all(layout: Layout, x: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's copy ``(B, ...)`` of a stack computed in shares ``(b, ...)``. One collective."""
    rep = (Replicate(),) * layout.mesh.ndim
    return _redistribute(x, layout.mesh, layout.owned(), rep, (total, *x.shape[1:]))


def map_whole(layout: Layout, fn: Callable[..., torch.Tensor], stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fn`` on whole ``(b, m, n)`` matrices, each computed by one owner; returns ``(B, *local)``.

    ``stacks``: k inputs ``(B, *local shape)``; ``fn`` takes k stacks ``(b, m, n)`` and returns
    one. Two collectives, whatever ``fn`` does.
    """
    m, n = matrix_view_shape(tuple(layout.shape))
    whole, b = gather_whole(layout, stacks)
    y = fn(*(whole[:, j].reshape(-1, m, n) for j in range(len(stacks))))[:b]
    return scatter_whole(layout, [y.reshape(b, *layout.shape)], stacks[0].size(0))[:, 0]
