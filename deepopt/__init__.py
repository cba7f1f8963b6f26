"""deepopt: deep / associative-memory optimizers as backend-agnostic specs.

A spec is data (numpy only). Compile it with ``torch_backend.compile(spec, params)`` to a
``torch.optim.Optimizer`` or with ``jax_backend.compile(spec)`` to an
``optax.GradientTransformation``. ``deepopt.reference`` is the numpy statement of the math.
"""

from importlib import metadata as _metadata

from deepopt import reference as reference
from deepopt._coefficients import PRESETS as NS_COEFFICIENT_PRESETS
from deepopt._denominator import SecondMoment as SecondMoment
from deepopt._memory import DeepMemory as DeepMemory
from deepopt._memory import LinearMemory as LinearMemory
from deepopt._memory import Memory as Memory
from deepopt._memory import MultiScaleMemory as MultiScaleMemory
from deepopt._presets import adamw as adamw
from deepopt._presets import custom as custom
from deepopt._presets import delta_momentum as delta_momentum
from deepopt._presets import dmgd as dmgd
from deepopt._presets import m3 as m3
from deepopt._presets import muon as muon
from deepopt._presets import sgd as sgd
from deepopt._readout import Identity as Identity
from deepopt._readout import NewtonSchulz as NewtonSchulz
from deepopt._readout import Readout as Readout
from deepopt._readout import Sign as Sign
from deepopt._readout import newton_schulz as newton_schulz
from deepopt._readout import shape_scale_factor as shape_scale_factor
from deepopt._spec import Routing as Routing
from deepopt._spec import Spec as Spec
from deepopt._spec import UpdateRule as UpdateRule
from deepopt._spec import matrix_view_shape as matrix_view_shape
from deepopt._state import Slot as Slot
from deepopt._values import AdamValues as AdamValues
from deepopt._values import IdentityValues as IdentityValues
from deepopt._values import Values as Values

try:
    __version__ = _metadata.version("deepopt")
except _metadata.PackageNotFoundError:     # run from a source tree without installing it
    __version__ = "0.1.0"                  # keep equal to pyproject.toml's version

__all__ = [
    "__version__", "NS_COEFFICIENT_PRESETS", "AdamValues", "DeepMemory", "Identity", "IdentityValues",
    "LinearMemory", "Memory", "MultiScaleMemory", "NewtonSchulz", "Readout", "Routing", "SecondMoment",
    "Sign", "Slot", "Spec", "UpdateRule", "Values", "adamw", "custom", "delta_momentum", "dmgd", "m3", "matrix_view_shape", "muon",
    "newton_schulz", "reference", "sgd", "shape_scale_factor",
]
