"""deepopt's own CPU kernels (``csrc/elementwise.cpp``, ``csrc/deep_memory.cpp``) and CUDA kernels
(``csrc/elementwise_cuda.cu``, ``csrc/deep_memory_cuda.cu``), built on first use.

torch has fused CPU kernels for SGD and AdamW exactly as torch.optim defines them, and
:mod:`torch_backend._fused` hands those rules to them. Three variants have none: SGD with
decoupled weight decay, SGD with torch's undamped first write, and AdamW with the NAdam read.
Through torch's ops each costs a pass more over every parameter or memory (and on the CPU
torch's foreach ops run one op per tensor). The kernels in ``elementwise.cpp`` make each of them
one loop per tensor that reads and writes every word once and advances the step counts itself
(benchmarks/README.md, "Twelfth round": 0.80–1.07× torch's fused kernels). A fourth op,
``fused_groups``, is :func:`_fused.fused_groups`' per-tensor checks in C++.

``deep_memory.cpp`` is DMGD's memory (docs/math.md §5) for one bucket of same-shape matrices, the
plain C++ of ``deepopt/csrc/deep_memory.h`` (which jax_backend serves to XLA as well):
:func:`_deep_memory.fused_kernel`'s write and read as passes over each matrix's rows in
cache-sized blocks (their norms, the write, the read), its seven thin products register-tiled
loops, instead of ~40 torch ops over the whole bucket (benchmarks/README.md, "Thirteenth round").

They are built with ``torch.utils.cpp_extension`` (g++, ninja) the first time a step needs them
(a variant's, or DMGD's on the CPU): ~25 s, once per machine, CPU, Python and torch version, cached in
:func:`build_directory` and shared by later processes (``torch_backend.build_kernels()`` builds them
ahead). The classic rules use them only once built (:func:`loaded`), so ``deepopt.sgd`` or
``deepopt.adamw`` alone never waits for a build. ``DEEPOPT_NATIVE`` says whether to build
(:mod:`deepopt._native`: ``auto``, ``1`` or ``0``; jax_backend's kernel reads it too).

The ops take CPU float32/float64 tensors and check every tensor before writing any. Results equal
torch's ops within float rounding (``tests/test_native.py``, ``tests/test_deep_memory_native.py``).

**On CUDA** (:func:`cuda_ops`, ``torch.ops.deepopt_cuda``, for CUDA float32/float64 tensors) the
three variants run ``csrc/elementwise_cuda.cu``: the same ops as on the CPU, as one multi-tensor
launch per dtype (and step-count case) over the whole group, where torch's kernel and one pass
more would run. Both builds compute each element with ``csrc/elementwise_rules.h``. DMGD's memory
runs ``csrc/deep_memory_cuda.cu`` for its two full-size passes, the write and the read (with the
outer step), each with its thin product made in the pass; its other products stay cuBLAS's
(:func:`_deep_memory.fused_kernel`). benchmarks/README.md, "Sixteenth round", has the figures. The
CUDA library is built with nvcc the first time a CUDA step needs it (~12–16 s on an H200), for
the visible GPUs' architectures (or ``TORCH_CUDA_ARCH_LIST``), and cached beside the CPU build;
``DEEPOPT_NATIVE`` applies to it as well.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import sys
import warnings

import torch

from deepopt._native import CPU_FLAGS, HEADERS, cpu_signature, fingerprint, setting

CSRC = pathlib.Path(__file__).with_name("csrc")
SOURCES = tuple(CSRC / name for name in ("elementwise.cpp", "deep_memory.cpp"))
#: The CUDA library's sources: the torch op (host compiler) and its kernels (nvcc).
CUDA_SOURCES = tuple(CSRC / name for name in ("elementwise_cuda.cpp", "elementwise_cuda.cu", "deep_memory_cuda.cpp",
                                               "deep_memory_cuda.cu"))
#: torch_backend's own headers: those both libraries include, then the CUDA library's alone; each
#: build's name hashes the ones it includes.
SHARED_HEADERS = tuple(CSRC / name for name in ("elementwise_rules.h", "tensor_lists.h"))
LOCAL_HEADERS = SHARED_HEADERS + tuple(CSRC / name for name in ("elementwise_cuda.h", "deep_memory_cuda.h"))
#: :data:`deepopt._native.CPU_FLAGS` (``-march=native``: the machine's vector width, as torch's own CPU
#: kernels pick at run time; the build is per CPU, :func:`build_name`). ``-fopenmp``: without
#: it ``at::parallel_for`` compiles to a plain loop, and the kernels ran on one thread whatever
#: ``torch.get_num_threads()`` said (the OpenMP runtime is torch's own ``libgomp.so.1``, loaded
#: first). Elsewhere (macOS's compiler takes no plain ``-fopenmp``) the kernels run on one thread.
OPENMP = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
FLAGS = [*CPU_FLAGS, *(["-fopenmp"] if OPENMP else [])]
#: No fast math: the CUDA kernels divide and take square roots as IEEE does, as torch's kernels do.
CUDA_FLAGS = ["-O3"]
_log = logging.getLogger("deepopt")


def build_name() -> str:
    """The extension's name: the source's text and path, the compiler flags, torch's, Python's and
    the CPU's signature in it, so that a changed kernel, another torch or another CPU (a home directory
    shared across machines) never loads a stale or foreign build from the shared cache, and two
    installs never rebuild one another's (ninja rebuilds when the source's path changes, under a
    process that may have the library loaded)."""
    return "deepopt_kernels_" + fingerprint((*SOURCES, *HEADERS, *SHARED_HEADERS), " ".join(FLAGS), torch.__version__,
                                            sys.version, cpu_signature())


def build_directory(name: str | None = None) -> pathlib.Path:
    """Where a build lives: ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
    one folder per build, named by it (default :func:`build_name`)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return pathlib.Path(root) / (name or build_name())


def library(where: pathlib.Path | None = None) -> pathlib.Path:
    """The built library in ``where`` (default :func:`build_directory`)."""
    where = where or build_directory()
    return where / f"{where.name}.so"


def _load(what: str, where: pathlib.Path, sources, **flags) -> bool:
    """Build (if need be) and load the library of ``what`` (``CPU``, ``CUDA``) in ``where``; False
    where the build fails and ``DEEPOPT_NATIVE`` is ``auto`` (with a warning), raising with ``1``."""
    try:
        from torch.utils import cpp_extension

        _log.info("deepopt: loading its %s kernels from %s (built once, ~12–25 s)", what, where)
        where.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=where.name, sources=[str(path) for path in sources], build_directory=str(where),
                           is_python_module=False, verbose=False, **flags)
    except Exception as exc:   # no compiler, no nvcc, no ninja, a failed build: all end the same way
        if setting() == "1":
            raise RuntimeError(f"deepopt's {what} kernels could not be built (DEEPOPT_NATIVE=1): {exc}") from exc
        warnings.warn(f"deepopt's {what} kernels could not be built ({type(exc).__name__}: {exc}); SGD with "
                      "decoupled decay or torch's first write, AdamW with the NAdam read and DMGD's memory "
                      f"run torch's ops{' on CUDA' if what == 'CUDA' else ''} instead (same results, slower). "
                      "DEEPOPT_NATIVE=0 skips the build.", RuntimeWarning, stacklevel=3)
        return False
    return True


@functools.cache
def ops():
    """``torch.ops.deepopt`` with the kernels loaded (built if need be), or None where
    ``DEEPOPT_NATIVE=0`` or (``auto``) the build failed."""
    if setting() == "0" or not _load("CPU", build_directory(), SOURCES, extra_cflags=FLAGS,
                                     extra_include_paths=sorted({str(path.parent) for path in HEADERS}),
                                     extra_ldflags=["-fopenmp"] if OPENMP else []):
        return None
    global _built
    _built = True
    return torch.ops.deepopt


def cuda_architectures() -> str:
    """The GPU architectures the CUDA library is built for: ``TORCH_CUDA_ARCH_LIST`` where set, else
    the visible devices' (as ``torch.utils.cpp_extension`` chooses them)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return listed
    return ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}))


def cuda_build_name() -> str:
    """The CUDA library's name (see :func:`build_name`): its sources and headers, flags, torch's and
    CUDA's versions, Python's, and the architectures it is built for."""
    return "deepopt_cuda_kernels_" + fingerprint((*CUDA_SOURCES, *LOCAL_HEADERS), " ".join(CUDA_FLAGS),
                                                 torch.__version__, str(torch.version.cuda), sys.version,
                                                 cuda_architectures())


@functools.cache
def cuda_ops():
    """``torch.ops.deepopt_cuda`` with the CUDA kernels loaded (built if need be), or None where torch
    sees no CUDA device, ``DEEPOPT_NATIVE=0``, or (``auto``) the build failed."""
    if setting() == "0" or not torch.cuda.is_available():
        return None
    if not _load("CUDA", build_directory(cuda_build_name()), CUDA_SOURCES, extra_cflags=["-O3"],
                 extra_cuda_cflags=CUDA_FLAGS):
        return None
    return torch.ops.deepopt_cuda


def build() -> pathlib.Path:
    """Build (or find) the kernels now rather than at the first step that needs them, e.g. in a
    job's set-up: the CPU kernels and, where torch sees a CUDA device, the CUDA ones; returns the
    CPU library's path. Raises where they are off or cannot be built."""
    if ops() is None:
        raise RuntimeError("deepopt's CPU kernels were not built: DEEPOPT_NATIVE=0, or the build failed "
                           "(its warning says why)")
    if torch.cuda.is_available() and cuda_ops() is None:
        raise RuntimeError("deepopt's CUDA kernels were not built (their warning says why)")
    return library()


def loaded():
    """:func:`ops` where the kernels are loaded already or built on this machine, else None:
    never starts a build. The classic rules' per-step checks use it (:func:`_fused.fused_groups`:
    ~20 µs less host work per step for 52 tensors), so that ``deepopt.sgd`` or ``deepopt.adamw``
    alone never waits for a build; :func:`build` builds it ahead."""
    global _built
    if _built is None:                     # looked once; a later ops() (a variant's step) sets it
        _built = setting() != "0" and library().is_file()
    return ops() if _built else None


#: Whether the kernels are built: None until :func:`loaded` looks or :func:`ops` loads them.
_built: bool | None = None


__all__ = ["CUDA_FLAGS", "CUDA_SOURCES", "FLAGS", "HEADERS", "LOCAL_HEADERS", "SHARED_HEADERS", "SOURCES", "build",
           "build_directory", "build_name", "cpu_signature", "cuda_architectures", "cuda_build_name", "cuda_ops",
           "library", "loaded", "ops", "setting"]
