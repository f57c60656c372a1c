"""Make MLX's CPU matmuls use a fast BLAS when the machine has one.

The ``mlx[cpu]`` wheel for Linux links the reference netlib BLAS, about 30x slower than
OpenBLAS for float32 GEMM. Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is
imported makes MLX's ``cblas_sgemm`` bind to it. This is process-wide and only works before
the first ``import mlx.core``; :func:`preload` is called by the backend before it imports MLX.

This copy of OpenBLAS serves MLX only (numpy carries its own), so lmkernel loads it with a
short thread timeout (``OPENBLAS_THREAD_TIMEOUT``, :data:`THREAD_TIMEOUT`) unless the user set
one: OpenBLAS's idle workers otherwise spin in ``sched_yield`` for about 2**28 cycles after
every threaded call, which on a small machine takes a core from the Python threads that
drive generation (measured on 2 vCPUs, tiny float32 Llama: 1.2 ms of spinning per 3 ms token;
decode and prefill of larger models unchanged). The variable is read once, while the library
loads, and the environment is restored afterwards.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: str | None = None

#: OpenBLAS's idle-worker spin before sleeping, as log2 of CPU cycles (4 is its minimum).
THREAD_TIMEOUT = "4"


def find() -> str | None:
    """Return the path of a fast BLAS library (``LMKERNEL_BLAS`` overrides), if any."""
    override = os.environ.get("LMKERNEL_BLAS")
    if override is not None:
        return override if override and Path(override).exists() else None
    return next((p for p in _CANDIDATES if Path(p).exists()), None)


def preload() -> str | None:
    """Load the fast BLAS globally if MLX is not imported yet; return what is in use."""
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    path = find()
    if path and "mlx.core" not in sys.modules:
        _load(path)
        _loaded = path
    return _loaded


def _load(path: str) -> None:
    """Load OpenBLAS globally, with :data:`THREAD_TIMEOUT` unless the environment sets one."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = THREAD_TIMEOUT
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]


def describe() -> str:
    """Say which BLAS MLX will use, for ``lmkernel backends``."""
    if not sys.platform.startswith("linux"):
        return "Accelerate/Metal"
    path = _loaded or find()
    if path:
        return f"OpenBLAS ({path})"
    return "bundled reference BLAS (slow: install Debian's libopenblas0-pthread)"
