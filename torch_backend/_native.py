"""deepopt's own CPU kernels (``csrc/elementwise.cpp``), built on first use.

torch has fused CPU kernels for SGD and AdamW exactly as torch.optim defines them, and
:mod:`torch_backend._fused` hands those rules to them. Three variants have none: SGD with
decoupled weight decay, SGD with torch's undamped first write when it is paired with it or with
a Nesterov read, and AdamW with the NAdam read. Through torch's ops they cost an extra pass of
every parameter or memory, and on the CPU torch's foreach ops run one op per tensor. These
kernels make each of them one loop per tensor that reads and writes every word once, and
advance the step counts themselves (docs/benchmarks.md has the measurements).

They are built with ``torch.utils.cpp_extension`` (g++ and ninja) the first time a step needs
them, once per machine and torch version: ~20 s, cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and shared by later processes. ``DEEPOPT_NATIVE`` says whether:

- unset or ``auto``: build on first use; if the build fails, warn once and run the torch ops;
- ``1``: build on first use and raise if the build fails;
- ``0``: never build; the torch ops run.

Only CPU float32/float64 tensors take them (on CUDA the torch ops run: torch.compile is the fused
path there). Results equal the torch ops' within float rounding (``tests/test_native.py``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform
import warnings

import torch

SOURCE = pathlib.Path(__file__).with_name("csrc") / "elementwise.cpp"
SETTINGS = ("auto", "0", "1")
#: ``-march=native``: the vector width of the machine (AVX2/AVX-512 where it has them), as torch's own
#: CPU kernels pick at run time; the build is per CPU (:func:`build_name`).
FLAGS = ["-O3", "-march=native", "-fno-math-errno"]
_log = logging.getLogger("deepopt")


def setting() -> str:
    value = os.environ.get("DEEPOPT_NATIVE", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"DEEPOPT_NATIVE={value!r} is invalid: expected one of {', '.join(SETTINGS)} "
                         "(auto: build deepopt's CPU kernels on first use, fall back if that fails; "
                         "1: build them or raise; 0: never)")
    return value


def cpu_signature() -> str:
    """What the build's ``-march=native`` code depends on: the CPU's feature flags (Linux), else
    the processor's name."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags or platform.processor()}"


def build_name() -> str:
    """The extension's name: the source's, torch's and the CPU's signature in it, so that a
    changed kernel, another torch or another CPU (a home directory shared across machines)
    never loads a stale or foreign build from the shared cache."""
    key = SOURCE.read_bytes() + torch.__version__.encode() + cpu_signature().encode()
    return f"deepopt_kernels_{hashlib.sha256(key).hexdigest()[:12]}"


@functools.cache
def ops():
    """``torch.ops.deepopt`` with the kernels loaded (built if need be), or None where
    ``DEEPOPT_NATIVE=0`` or (``auto``) the build failed."""
    value = setting()
    if value == "0":
        return None
    try:
        from torch.utils import cpp_extension

        _log.info("deepopt: loading its CPU kernels (%s; built once, ~20 s)", build_name())
        cpp_extension.load(name=build_name(), sources=[str(SOURCE)], extra_cflags=FLAGS,
                           is_python_module=False, verbose=False)
    except Exception as exc:   # no compiler, no ninja, a failed build: all end the same way
        if value == "1":
            raise RuntimeError(f"deepopt's CPU kernels could not be built (DEEPOPT_NATIVE=1): {exc}") from exc
        warnings.warn(f"deepopt's CPU kernels could not be built ({type(exc).__name__}: {exc}); SGD with "
                      "decoupled decay or torch's first write, and AdamW with the NAdam read, run torch's ops "
                      "instead (same results, slower). DEEPOPT_NATIVE=0 skips the build.",
                      RuntimeWarning, stacklevel=2)
        return None
    return torch.ops.deepopt


__all__ = ["FLAGS", "SOURCE", "build_name", "cpu_signature", "ops", "setting"]
