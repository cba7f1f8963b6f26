"""Compile deepopt specs to ``optax.GradientTransformation``.

    tx = jax_backend.compile(deepopt.muon(lr=0.02))      # an optax.GradientTransformation

The pieces are optax-style ``scale_by_*`` transforms; ``run_trajectory`` is the
backend-comparison protocol of ``deepopt.testing``. ``MEMORIES``, ``VALUES`` and ``READOUTS``
map each part class to its transform or kernel; a new part is one entry (docs/extending.md).
"""

from jax_backend._compile import MEMORIES as MEMORIES
from jax_backend._compile import compile as compile
from jax_backend._compile import then_readout as then_readout
from jax_backend._deep_memory import DeepMemoryState as DeepMemoryState
from jax_backend._deep_memory import LeafStacks as LeafStacks
from jax_backend._deep_memory import scale_by_deep_memory as scale_by_deep_memory
from jax_backend._multiscale import MultiScaleState as MultiScaleState
from jax_backend._multiscale import scale_by_multiscale_memory as scale_by_multiscale_memory
from jax_backend._native import build as build_kernels
from jax_backend._newton_schulz import newton_schulz as newton_schulz
from jax_backend._packing import Packed as Packed
from jax_backend._packing import PackedState as PackedState
from jax_backend._packing import pack_small_leaves as pack_small_leaves
from jax_backend._routing import param_labels as param_labels
from jax_backend._routing import path_name as path_name
from jax_backend._state import init_state as init_state
from jax_backend._stats import memory_stats as memory_stats
from jax_backend._trajectory import run_trajectory as run_trajectory
from jax_backend._transforms import READOUTS as READOUTS
from jax_backend._transforms import VALUES as VALUES
from jax_backend._transforms import LinearMemoryState as LinearMemoryState
from jax_backend._transforms import MatrixView as MatrixView
from jax_backend._transforms import SecondMomentState as SecondMomentState
from jax_backend._transforms import apply_values as apply_values
from jax_backend._transforms import scale_by_linear_memory as scale_by_linear_memory
from jax_backend._transforms import scale_by_readout as scale_by_readout
from jax_backend._transforms import scale_by_second_moment as scale_by_second_moment
from jax_backend._transforms import scale_by_shape as scale_by_shape

__all__ = [
    "MEMORIES", "READOUTS", "VALUES", "apply_values", "build_kernels", "init_state", "then_readout",
    "DeepMemoryState", "LeafStacks", "LinearMemoryState", "MatrixView", "MultiScaleState", "Packed", "PackedState",
    "SecondMomentState", "compile", "memory_stats", "newton_schulz", "pack_small_leaves", "param_labels",
    "path_name", "run_trajectory",
    "scale_by_deep_memory", "scale_by_linear_memory", "scale_by_multiscale_memory",
    "scale_by_readout", "scale_by_second_moment", "scale_by_shape",
]
