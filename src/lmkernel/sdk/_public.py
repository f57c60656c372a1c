"""The API boundary: errors raised to a user end at the user's call.

An :class:`LMKernelError` leaving a public method loses the frames inside lmkernel (as
LM Studio's SDK does), so a traceback shows the user's line and the message, not the
machinery. Set ``LMKERNEL_FULL_TRACEBACKS=1`` to keep every frame (debugging lmkernel).
Other exceptions (bugs) keep their full traceback.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import TypeVar

from ..errors import LMKernelError

F = TypeVar("F", bound=Callable)

__all__ = ["public_api"]


def _full_tracebacks() -> bool:
    return os.environ.get("LMKERNEL_FULL_TRACEBACKS", "") not in ("", "0")


def public_api(fn: F) -> F:
    """Wrap a public function or coroutine function so lmkernel errors leave it trimmed."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def boundary(*args, **kwargs):
            __tracebackhide__ = True  # noqa: F841 - pytest hides this frame too
            try:
                return await fn(*args, **kwargs)
            except LMKernelError as exc:
                if _full_tracebacks():
                    raise
                raise exc.with_traceback(None)  # noqa: B904 - the same exception, without our frames

        return boundary  # type: ignore[return-value]

    @functools.wraps(fn)
    def boundary(*args, **kwargs):
        __tracebackhide__ = True  # noqa: F841
        try:
            return fn(*args, **kwargs)
        except LMKernelError as exc:
            if _full_tracebacks():
                raise
            raise exc.with_traceback(None)  # noqa: B904

    return boundary  # type: ignore[return-value]
