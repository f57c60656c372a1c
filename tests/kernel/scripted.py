"""A scripted backend for kernel mechanics (never used to prove a feature works on a model).

The engine "generates" the letters of its prompt back, one per step. Knobs: ``fail_at``
(raise on that step of an engine, once: a replacement engine works), ``load_gate`` (block loading until set), ``loads`` (count), ``step_delay`` (seconds per step).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from lmkernel.plugins import (
    Availability,
    Backend,
    Engine,
    LoadOptions,
    ModelDescription,
    PromptProgress,
    Sampling,
    SequenceEnd,
    Token,
)


class ScriptedEngine(Engine):
    def __init__(self, backend: ScriptedBackend) -> None:
        self.backend = backend
        self.context_length = 1000
        self.seqs: dict[int, list] = {}
        self.steps = 0

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def add(self, seq_id, prompt_tokens, sampling: Sampling, max_tokens: int) -> None:
        self.backend.samplings.append(sampling)
        self.backend.prompts.append("".join(map(chr, prompt_tokens)))
        self.seqs[seq_id] = [list(prompt_tokens), max_tokens, 0, False]

    def remove(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    @property
    def busy(self) -> bool:
        return bool(self.seqs)

    def step(self):
        self.steps += 1
        time.sleep(self.backend.step_delay)
        if self.backend.fail_at is not None and self.steps == self.backend.fail_at:
            self.backend.fail_at = None
            raise RuntimeError("scripted engine failure")
        events = []
        for seq_id, seq in list(self.seqs.items()):
            prompt, budget, n, started = seq
            if not started:
                seq[3] = True
                events.append(PromptProgress(seq_id, 0, len(prompt)))
                events.append(PromptProgress(seq_id, len(prompt), len(prompt)))
            token = prompt[n % len(prompt)]
            seq[2] = n + 1
            events.append(Token(seq_id, token, chr(token)))
            if seq[2] >= budget:
                events.append(SequenceEnd(seq_id, "length"))
                del self.seqs[seq_id]
        return events


class ScriptedBackend(Backend):
    name = "scripted"
    prediction_keys = frozenset({"temperature", "cpuThreads"})

    def __init__(self) -> None:
        self.fail_at: int | None = None
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.loads = 0
        self.released_threads = 0
        self.step_delay = 0.001
        self.samplings: list[Sampling] = []
        self.prompts: list[str] = []  # in the order the engine took them

    def availability(self) -> Availability:
        return Availability(True, notes="scripted")

    def describe(self, path: Path) -> ModelDescription | None:
        if not (path / "scripted.txt").exists():
            return None
        return ModelDescription(architecture="scripted", format="safetensors", max_context_length=1000, size_bytes=1)

    def load(self, path: Path, options: LoadOptions, on_progress) -> Engine:
        self.loads += 1
        on_progress(0.5)
        self.load_gate.wait(30)
        return ScriptedEngine(self)

    def release_thread(self) -> None:
        self.released_threads += 1
