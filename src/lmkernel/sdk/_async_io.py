"""How the async facade waits: the loop's waker, and blocking work moved off the loop.

The sync facade's twin is :mod:`._sync_io`; these two modules are the only code that differs
between the facades (``tools/unasync.py`` maps one name to the other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ._connection import current_waker

T = TypeVar("T")

__all__ = ["run_blocking", "waker"]


def waker():
    """The running loop's waker (asyncio or trio): the kernel thread wakes the waiting task with it."""
    return current_waker()


async def run_blocking(fn: Callable[[], T]) -> T:
    """Run ``fn`` (a blocking call, e.g. dialling a server) on a worker thread; the loop keeps running."""
    import sniffio

    if sniffio.current_async_library() == "trio":
        import trio

        return await trio.to_thread.run_sync(fn)
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn)
