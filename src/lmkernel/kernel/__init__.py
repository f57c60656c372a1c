"""The trio kernel: protocol, router, model registry, actors and per-prediction logic."""

from ._kernel import Kernel
from .runtime import InProcessConnection, KernelThread, default_kernel

__all__ = ["InProcessConnection", "Kernel", "KernelThread", "default_kernel"]
