"""A scripted asynchronous backend for kernel mechanics (never used to prove a feature works on a model).

It offers two models (``scripted-async/one`` and ``scripted-async/two``, no folders); the engine
"generates" the characters of its prompt back, one :class:`Text` per character, ``delay``
seconds apart. Knobs on the backend: ``mode`` (``"raise"`` after two pieces, ``"malformed"``,
``"hang"`` after one piece, ``"no_finish"``, ``"overrun"`` (ignores ``max_tokens``),
``"refuse"`` (a prompt too long, as a server says it), ``"usage"`` (its Finish reports counts)),
``load_mode`` (``"raise"``, ``"hang"``, ``"wrong"``), ``offered_mode`` (``"raise"``,
``"malformed"``, ``"hang"``, ``"partial"``: a server it could not list). ``closed`` counts generations whose cleanup ran.
"""

from __future__ import annotations

from pathlib import Path

import trio

from lmkernel import LMKernelPromptTooLongError
from lmkernel.plugins import (
    AsyncBackend,
    AsyncEngine,
    Availability,
    Finish,
    Generation,
    ModelDescription,
    ModelRejected,
    OfferedModel,
    Prefill,
    Text,
)

DESCRIPTION = ModelDescription(architecture=None, format="remote", max_context_length=1000, size_bytes=0)


class ScriptedAsyncEngine(AsyncEngine):
    chat = True

    def __init__(self, backend: ScriptedAsyncBackend) -> None:
        self.backend = backend
        self.context_length = 1000

    async def generate(self, request: Generation):
        backend = self.backend
        mode = backend.mode  # as it was when this generation started
        backend.requests.append(request)
        text = request.prompt if request.prompt is not None else request.messages[-1]["content"]
        try:
            if mode == "refuse":
                raise LMKernelPromptTooLongError("the server scripted counted 5000 tokens, more than its 1000")
            if mode == "malformed":
                yield Text(123)
            if mode == "surrogate":
                yield Text("\ud83d")
            yield Prefill(0, len(text))
            yield Prefill(len(text), len(text))
            sent = 0
            for i, char in enumerate(text):
                if request.max_tokens is not None and sent >= request.max_tokens and mode != "overrun":
                    yield Finish("length")
                    return
                await trio.sleep(backend.delay)
                if mode == "raise" and i == 2:
                    raise ConnectionError("scripted server went away")
                if mode == "hang" and i == 1:
                    await trio.sleep_forever()
                yield Text(char)
                sent += 1
            if mode == "no_finish":
                return
            usage = mode == "usage"
            yield Finish("eos", prompt_tokens=7 if usage else None, generated_tokens=sent * 2 if usage else None)
        finally:
            backend.closed += 1

    async def tokenize(self, text: str) -> list[int]:
        if self.backend.mode == "tokenize":
            return [ord(c) for c in text]
        raise NotImplementedError("scripted engines have no tokenizer")

    async def aclose(self) -> None:
        self.backend.engines_closed += 1


class ScriptedAsyncBackend(AsyncBackend):
    name = "scripted-async"
    prediction_keys = frozenset({"temperature"})

    def __init__(self) -> None:
        self.unconfigured = False
        self.mode = ""
        self.load_mode = ""
        self.offered_mode = ""
        self.delay = 0.01
        self.requests: list[Generation] = []
        self.closed = 0
        self.engines_closed = 0
        self.loads = 0

    def availability(self) -> Availability:
        return Availability(False, "not configured yet") if self.unconfigured else Availability(True)

    def describe(self, path: Path):
        raise ModelRejected("offers models, not folders")

    def offered_models(self):
        if self.offered_mode == "raise":
            raise OSError("the listing server is down")
        if self.offered_mode == "hang":
            import time

            time.sleep(30)
        models = [OfferedModel(path=f"scripted-async/{name}", description=DESCRIPTION) for name in ("one", "two")]
        if self.offered_mode == "malformed":
            models += ["not a model", OfferedModel(path="/abs/path", description=DESCRIPTION)]
        return models

    def offer_problems(self):
        return ["server three (http://127.0.0.1:9/v1): could not connect"] if self.offered_mode == "partial" else []

    async def load_async(self, path: Path, options, on_progress) -> AsyncEngine:
        self.loads += 1
        if self.load_mode == "raise":
            raise ConnectionRefusedError("scripted server refused the connection")
        if self.load_mode == "hang":
            await trio.sleep_forever()
        if self.load_mode == "wrong":
            return "not an engine"
        on_progress(0.5)
        on_progress(1.0)
        return ScriptedAsyncEngine(self)
