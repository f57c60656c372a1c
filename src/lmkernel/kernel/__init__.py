"""The trio kernel: protocol, router, model registry, actors and per-prediction logic.

``messages`` and ``config`` are light; the kernel itself (and trio) is imported on first
use, so that ``import lmkernel`` stays fast.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._kernel import Kernel
    from .runtime import InProcessConnection, KernelThread, default_kernel

__all__ = ["InProcessConnection", "Kernel", "KernelThread", "default_kernel"]


def __getattr__(name: str):
    if name == "Kernel":
        from ._kernel import Kernel

        return Kernel
    if name in ("InProcessConnection", "KernelThread", "default_kernel"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
