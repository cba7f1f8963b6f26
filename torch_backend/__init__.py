"""Compile deepopt specs to ``torch.optim.Optimizer``.

    opt = torch_backend.compile(deepopt.muon(lr=0.02), model.named_parameters())
"""

from torch_backend._checkpoint import convert_state_dict as convert_state_dict
from torch_backend._checkpoint import to_torch_state_dict as to_torch_state_dict
from torch_backend._newton_schulz import newton_schulz as newton_schulz
from torch_backend._optimizer import DeepOptimizer as DeepOptimizer
from torch_backend._optimizer import compile as compile
from torch_backend._stats import memory_stats as memory_stats
from torch_backend._trajectory import run_trajectory as run_trajectory

__all__ = ["DeepOptimizer", "compile", "memory_stats", "newton_schulz", "run_trajectory"]
