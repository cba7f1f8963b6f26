"""What deepopt's C++ kernels share across backends (no torch, no jax here).

DMGD's memory is plain C++ in ``csrc/deep_memory.h`` (docs/math.md §5, "Cost"); torch_backend
serves it as a torch op (``torch_backend/_native.py``) and jax_backend as an XLA custom call
(``jax_backend/_native.py``). Both build it on first use for the machine's CPU and read one
setting, ``DEEPOPT_NATIVE``:

- unset or ``auto``: build on first use; if the build fails, warn once and run the array ops;
- ``1``: build on first use and raise if the build fails;
- ``0``: never build or load; the array ops run.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
from collections.abc import Iterable

SETTINGS = ("auto", "0", "1")
#: The headers both backends' kernels include.
HEADERS = (pathlib.Path(__file__).with_name("csrc") / "deep_memory.h",)
#: The C++ compiler flags every CPU build of them starts with (each backend adds its own):
#: ``-march=native``, the machine's vector width (AVX2/AVX-512 where it has them), so a build is
#: per CPU (:func:`cpu_signature`); no ``-ffast-math``, only no ``errno`` from the math library.
CPU_FLAGS = ("-O3", "-march=native", "-fno-math-errno")


def setting() -> str:
    """``DEEPOPT_NATIVE``, checked: one of :data:`SETTINGS`."""
    value = os.environ.get("DEEPOPT_NATIVE", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"DEEPOPT_NATIVE={value!r} is invalid: expected one of {', '.join(SETTINGS)} "
                         "(auto: build deepopt's CPU kernels on first use, fall back if that fails; "
                         "1: build them or raise; 0: never)")
    return value


def cpu_signature() -> str:
    """What a build's ``-march=native`` code depends on: the CPU's feature flags (Linux), else
    the processor's name."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags or platform.processor()}"


def fingerprint(files: Iterable[pathlib.Path], *parts: str) -> str:
    """12 hex digits of a build's inputs: each file's path and text, then ``parts`` (flags,
    library versions, :func:`cpu_signature`): a build named by it is never a stale or foreign one."""
    key = "\n".join((*(f"{path}\n{path.read_text()}" for path in files), *parts))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


__all__ = ["CPU_FLAGS", "HEADERS", "SETTINGS", "cpu_signature", "fingerprint", "setting"]
