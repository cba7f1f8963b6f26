"""DMGD's memory as an XLA custom call on the CPU (``csrc/deep_memory_ffi.cpp``), built on first use.

The kernel is the one torch_backend runs (``deepopt/csrc/deep_memory.h``: each matrix's rows in
cache-sized blocks, three visits, register-tiled products; docs/math.md §5, "Cost"), behind
XLA's FFI (``jax.ffi``): :func:`jax_backend._deep_memory.scale_by_deep_memory` calls it for each
bucket of same-shape leaves in place of the ~40 XLA ops of
:func:`~jax_backend._deep_memory.deep_memory_kernel`, on the leaves as optax stores them
(``(in, out)``: the header's columns' layout) or as torch does.

It is built with the system's C++ compiler (``$CXX``, else ``c++``) against the FFI headers that
jaxlib ships (:func:`jax.ffi.include_dir`): ~10 s, once per machine, CPU, compiler flags, source and
jax version, cached in :func:`build_directory` and shared by later processes
(``jax_backend.build_kernels()`` builds it ahead). ``DEEPOPT_NATIVE`` says whether to build
(:mod:`deepopt._native`): ``auto`` warns once and keeps XLA's ops if the build fails, ``1``
raises, ``0`` never builds.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import warnings

import jax
import jaxlib

from deepopt._native import CPU_FLAGS, HEADERS, cpu_signature, fingerprint, setting

SOURCE = pathlib.Path(__file__).with_name("csrc") / "deep_memory_ffi.cpp"
#: :data:`deepopt._native.CPU_FLAGS` (``-march=native``: the build is per CPU, :func:`build_name`);
#: ``-fvisibility=hidden``: the library exports its handler only.
FLAGS = [*CPU_FLAGS, "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-return-type"]
#: The handler's symbol in the library, and the name XLA knows it by.
SYMBOL, TARGET = "DeepoptDmgdMemory", "deepopt_dmgd_memory"
_log = logging.getLogger("deepopt")


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def build_name() -> str:
    """The library's name: the source's and headers' text and path, the compiler and its flags,
    jax's, jaxlib's and Python's versions and the CPU's signature in it, so that a changed kernel,
    another jax or another CPU never loads a stale or foreign build."""
    return "deepopt_xla_" + fingerprint((SOURCE, *HEADERS), compiler(), " ".join(FLAGS), jax.__version__,
                                        jaxlib.__version__, sys.version, cpu_signature())


def build_directory() -> pathlib.Path:
    """Where the builds live: ``$DEEPOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/deepopt``, else
    ``~/.cache/deepopt``."""
    root = os.environ.get("DEEPOPT_CACHE_DIR")
    if not root:
        root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "deepopt"
    return pathlib.Path(root)


def library() -> pathlib.Path:
    """The built library's path (it may not exist yet)."""
    return build_directory() / f"{build_name()}.so"


def _compile(path: pathlib.Path) -> None:
    """Build the library at ``path``: into a temporary file beside it, then renamed, so that a
    process never loads a half-written library and two builds at once both end well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{jax.ffi.include_dir()}", *(f"-I{d}" for d in sorted({str(h.parent) for h in HEADERS}))]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler(), *FLAGS, *includes, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler()} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _ffi_api() -> bool:
    """Whether this jax has the FFI calls the kernel uses (``jax.ffi.ffi_call`` with
    ``vmap_method``); the package allows older jax, which then runs XLA's ops."""
    ffi = getattr(jax, "ffi", None)
    return ffi is not None and "vmap_method" in inspect.signature(ffi.ffi_call).parameters


@functools.cache
def target() -> str | None:
    """The custom call's name, the library built (if need be), loaded and registered with XLA for
    the CPU; None where ``DEEPOPT_NATIVE=0`` or (``auto``) the build failed."""
    value = setting()
    if value == "0":
        return None
    if not _ffi_api():
        _log.info("deepopt: jax %s has no jax.ffi.ffi_call(vmap_method=...); DMGD's memory runs XLA's ops",
                  jax.__version__)
        return None
    try:
        path = library()
        if not path.is_file():
            _log.info("deepopt: building its XLA CPU kernel into %s (once, ~10 s)", path)
            _compile(path)
        handler = getattr(ctypes.CDLL(str(path)), SYMBOL)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    except Exception as exc:   # no compiler, no headers, a failed build: all end the same way
        if value == "1":
            raise RuntimeError(f"deepopt's XLA CPU kernel could not be built (DEEPOPT_NATIVE=1): {exc}") from exc
        warnings.warn(f"deepopt's XLA CPU kernel could not be built ({type(exc).__name__}: {exc}); DMGD's memory "
                      "runs XLA's ops instead (same results, slower). DEEPOPT_NATIVE=0 skips the build.",
                      RuntimeWarning, stacklevel=2)
        return None
    return TARGET


def build() -> pathlib.Path:
    """Build (or find) the kernel now rather than at the first step that needs it, e.g. in a job's
    set-up; returns the library's path. Raises where it is off or cannot be built."""
    if target() is None:
        raise RuntimeError("deepopt's XLA CPU kernel was not built: DEEPOPT_NATIVE=0, or the build failed "
                           "(its warning says why)")
    return library()


__all__ = ["FLAGS", "SOURCE", "SYMBOL", "TARGET", "build", "build_directory", "build_name", "compiler", "library",
           "target"]
