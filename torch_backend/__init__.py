"""Compile deepopt specs to ``torch.optim.Optimizer``.

    opt = torch_backend.compile(deepopt.muon(lr=0.02), model.named_parameters())

``MEMORIES``, ``VALUES`` and ``READOUTS`` map each part class to its kernel; a new part is one
entry (docs/extending.md).
"""

from torch_backend._checkpoint import convert_state_dict as convert_state_dict
from torch_backend._checkpoint import to_torch_state_dict as to_torch_state_dict
from torch_backend._functional import MEMORIES as MEMORIES
from torch_backend._functional import VALUES as VALUES
from torch_backend._functional import ValuesKernel as ValuesKernel
from torch_backend._kernels import MemoryKernel as MemoryKernel
from torch_backend._kernels import Read as Read
from torch_backend._native import build as build_kernels
from torch_backend._newton_schulz import newton_schulz as newton_schulz
from torch_backend._optimizer import DeepOptimizer as DeepOptimizer
from torch_backend._optimizer import compile as compile
from torch_backend._readout import READOUTS as READOUTS
from torch_backend._readout import ReadoutKernel as ReadoutKernel
from torch_backend._readout import apply as apply_readout
from torch_backend._stats import memory_stats as memory_stats
from torch_backend._trajectory import run_trajectory as run_trajectory

__all__ = ["MEMORIES", "READOUTS", "VALUES", "DeepOptimizer", "MemoryKernel", "Read", "ReadoutKernel",
           "ValuesKernel", "apply_readout", "build_kernels", "compile", "memory_stats", "newton_schulz",
           "run_trajectory"]
