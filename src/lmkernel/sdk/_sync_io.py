"""How the sync facade waits: in the calling thread (the twin of :mod:`._async_io`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["run_blocking", "waker"]


def waker() -> None:
    """No waker: a sync caller blocks on the inbox itself."""
    return None


def run_blocking(fn: Callable[[], T]) -> T:
    """Run ``fn`` here: the calling thread is the one that waits."""
    return fn()
