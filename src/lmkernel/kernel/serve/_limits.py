"""Connection slots and the open-file limit of ``lmkernel serve``.

A server holds at most ``max_connections`` connections. A connection that has not yet sent a
whole request (a silent socket, a dribbled HTTP head, an HTTP keep-alive between requests, a
native connection before its handshake) is *idle* and may be evicted, oldest first, to make
room for a new one: a flood of idle sockets cannot lock real clients out. When every slot is
busy the new connection is refused with an answer (HTTP 503, or a native ``Failed`` frame).
"""

from __future__ import annotations

import logging

import trio

log = logging.getLogger("lmkernel.serve")

FD_HEADROOM = 256  # open files beyond the connections: model files, threads' pipes, listeners


class Slot:
    """One connection's place among the server's connections."""

    __slots__ = ("evicted", "idle_since", "scope", "started")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.started = trio.current_time()
        self.idle_since: float | None = self.started
        self.evicted = False

    def idle(self) -> None:
        """Mark the connection idle (evictable) from now, unless it already is."""
        if self.idle_since is None:
            self.idle_since = trio.current_time()

    def busy(self) -> None:
        """Mark the connection busy: a request is being served; it is not evicted."""
        self.idle_since = None


class Slots:
    """At most ``limit`` connections; idle ones give way to new ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._live: dict[Slot, None] = {}
        self.refusing = 0  # connections being answered with a refusal right now
        self.lingering = 0  # closed connections draining their client's last bytes

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, slot: Slot) -> bool:
        """Take a place for ``slot``, evicting the longest-idle connection if full; ``False`` if none."""
        if len(self._live) >= self.limit:
            idle = [s for s in self._live if s.idle_since is not None]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.idle_since)
            victim.evicted = True
            victim.scope.cancel()
            del self._live[victim]
        self._live[slot] = None
        return True

    def leave(self, slot: Slot) -> None:
        self._live.pop(slot, None)


class ClientTooSlow(Exception):
    """A client did not take the server's bytes within the idle timeout."""


async def send_all(stream: trio.abc.SendStream, data: bytes, timeout: float) -> None:
    """Write ``data``; :class:`ClientTooSlow` if the client has not taken it all after ``timeout`` s."""
    with trio.move_on_after(timeout) as scope:
        await stream.send_all(data)
    if scope.cancelled_caught:
        raise ClientTooSlow(f"the client did not read {len(data)} bytes within {timeout:g} s")


def raise_open_file_limit(needed: int) -> tuple[int, int] | None:
    """Raise this process's soft open-file limit to ``needed`` (at most the hard limit).

    Never lowers it. Returns the (soft, hard) limits after, or ``None`` where the platform has none.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, exc)
    return soft, hard
