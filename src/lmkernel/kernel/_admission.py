"""Predictions waiting for a place in a model's batch, and which one gets the next place.

Fair between connections: a free place goes to the connection with the fewest running
predictions, and among those to the one served longest ago (round robin), so one client's
backlog cannot keep another's request waiting behind all of it. Within one connection (every
thread of one in-process client) the order is first come, first served.
"""

from __future__ import annotations

import weakref
from collections import Counter, deque
from collections.abc import Iterable

from ._mailbox import Peer
from ._worker import AddSequence


class WaitingRoom:
    """The waiting predictions of one model (kernel loop only)."""

    def __init__(self) -> None:
        self._waiting: deque[tuple[AddSequence, Peer]] = deque()
        self._served: weakref.WeakKeyDictionary[Peer, int] = weakref.WeakKeyDictionary()  # last admission
        self._admissions = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, command: AddSequence, peer: Peer) -> None:
        self._waiting.append((command, peer))

    def discard(self, seq_id: int) -> None:
        self._waiting = deque(item for item in self._waiting if item[0].seq_id != seq_id)

    def clear(self) -> None:
        self._waiting.clear()

    def pop_next(self, running: Iterable[Peer]) -> AddSequence:
        """Take the prediction that gets the next place; ``running``: the peer of each running one."""
        if len({peer for _, peer in self._waiting}) == 1:
            chosen = self._waiting[0]
        else:
            count = Counter(running)
            # min keeps the first of equals: first come, first served within a connection
            chosen = min(self._waiting, key=lambda item: (count[item[1]], self._served.get(item[1], 0)))
        self._waiting.remove(chosen)
        self._admissions += 1
        self._served[chosen[1]] = self._admissions
        return chosen[0]
