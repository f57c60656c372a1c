"""Stop strings on streamed text, with hold-back of a partial match.

Text arrives in pieces (one per token). A piece is released as soon as no stop string can
still start inside it; the tail that could be the beginning of a stop string is held back
until the next piece decides. The stop string itself is never released.
"""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back what may be emitted and whether a stop string was hit."""

    __slots__ = ("_stops", "_pending", "stopped", "matched")

    def __init__(self, stop_strings: list[str]) -> None:
        self._stops = [s for s in stop_strings if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add ``text``; return the part that is now safe to emit."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._pending + text
        hits = [(buffer.find(s), s) for s in self._stops if s in buffer]
        if hits:
            index, stop = min(hits)
            self.stopped, self.matched, self._pending = True, stop, ""
            return buffer[:index]
        keep = self._partial_suffix(buffer)
        self._pending = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Release what is held back (the text ended without completing a stop string)."""
        pending, self._pending = self._pending, ""
        return pending

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
