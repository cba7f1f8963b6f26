"""HOPE (self-modifying Titans + Continuum Memory System) vs Transformer++ benchmark.

Run `python -m benchmarks.hope.compare --preset cpu-tiny --out runs/hope` for the main
comparison, or `python -m benchmarks.hope.train --help` for one run.
"""

from .model import Hope as Hope
from .model import HopeConfig as HopeConfig
