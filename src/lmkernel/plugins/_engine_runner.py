"""Running an engine as the kernel does, for the conformance kit: on one thread, step by step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contract import Backend, Engine, LoadOptions, Sampling, SequenceEnd, Token

GREEDY = Sampling(temperature=0.0)

Decode = Callable[[list[int]], str]


class _EngineThread:
    """Runs engine calls on one thread (the contract's threading rule)."""

    def __init__(self, backend: Backend, path: Path, options: LoadOptions) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._backend = backend
        self._thread = threading.Thread(target=self._run, args=(path, options), daemon=True)
        self._thread.start()
        self.engine: Engine = self.call(lambda e: e)

    def _run(self, path: Path, options: LoadOptions) -> None:
        engine = None
        try:
            engine = self._backend.load(path, options, lambda p: None)
            while (item := self._calls.get()) is not None:
                fn, reply = item
                try:
                    reply.put((True, fn(engine)))
                except BaseException as exc:
                    reply.put((False, exc))
        except BaseException as exc:
            while True:
                item = self._calls.get()
                if item is None:
                    break
                item[1].put((False, exc))
        finally:
            if engine is not None:
                engine.close()
            self._backend.release_thread()

    def call(self, fn: Callable[[Engine], Any]) -> Any:
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._calls.put((fn, reply))
        ok, value = reply.get(timeout=300)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(60)


def _run_all(engine: Engine, limit: int = 10_000) -> dict[int, list]:
    events: dict[int, list] = {}
    for _ in range(limit):
        if not engine.busy:
            return events
        for event in engine.step():
            events.setdefault(event.seq_id, []).append(event)
    raise AssertionError(f"the engine was still busy after {limit} steps")


def _tokens(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, Token)]


def _text(events: list) -> str:
    """The content the kernel would build: every token's text, then what the end flushed."""
    return "".join(e.text for e in events if isinstance(e, Token | SequenceEnd))


def _generate(engine: Engine, prompts: list[list[int]], budget: int) -> list[tuple[list[int], list[int], str]]:
    """Run every prompt at once, greedily: (prompt ids, generated ids, text) for each."""
    for i, prompt in enumerate(prompts):
        engine.add(i, prompt, GREEDY, budget)
    events = _run_all(engine)
    return [(prompt, _tokens(events[i]), _text(events[i])) for i, prompt in enumerate(prompts)]


def _before_a_space(decode: Decode, runs: list[tuple[list[int], list[int], str]]) -> list[int] | None:
    """A prompt's ids plus the generated ids before the first one whose text starts with a space."""
    for prompt, generated, _ in runs:
        shown = decode(prompt)
        for j in range(len(generated)):
            text = decode(prompt + generated[: j + 1])
            if text.startswith(shown) and text[len(shown) : len(shown) + 1] == " ":
                return prompt + generated[:j]
            shown = text
    return None
