"""Timing helpers shared by the benchmark scripts (measured the same way on every path)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any


def timed(pieces: Iterable[tuple[str, int]]) -> tuple[float, float, int]:
    """Consume (text, tokens) pieces; return (time to first text, tokens/s after it, tokens).

    A piece with no text yet (a token the detokenizer holds back) counts with the next one.
    """
    start = time.perf_counter()
    stamps, pending = [], 0
    for text, tokens in pieces:
        pending += tokens
        if text:
            stamps.append((time.perf_counter(), pending))
            pending = 0
    first, last = stamps[0][0], stamps[-1][0]
    later = sum(n for _, n in stamps[1:])
    return first - start, later / (last - first), sum(n for _, n in stamps)


def run_threads(n: int, work: Callable[[int], Any]) -> tuple[list[Any], float]:
    """Run ``work(i)`` on ``n`` threads released together; return results and wall seconds."""
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start
