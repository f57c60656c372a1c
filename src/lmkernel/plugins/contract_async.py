"""The asynchronous engine contract: engines that run on the kernel's trio loop.

Some engines are asynchronous by nature: a model on a server (an OpenAI-compatible endpoint:
vLLM, llama.cpp's server, another ``lmkernel serve``), or an engine with its own scheduler.
Polling them from a thread step by step would only add latency, so they implement this
contract instead of :class:`~lmkernel.plugins.Engine`'s ``step``:

* :meth:`AsyncBackend.load_async` opens the model, on the kernel's trio loop;
* :meth:`AsyncEngine.generate` is an async generator per sequence: it yields
  :class:`Prefill` (prompt progress, where the engine knows it), :class:`Text` (generated text
  with the number of tokens it holds, where known) and ends with one :class:`Finish`. The
  kernel runs each sequence in its own task; to cancel one it cancels that task, so the
  generator's ``finally`` (or ``async with``) is where a server's stream is closed;
* tokenizing is optional: an engine without a tokenizer raises :class:`NotImplementedError`
  from :meth:`AsyncEngine.tokenize`, and the kernel then uses the counts and the context limit
  the engine reports (the server's) instead of its own (``docs/plugins.md`` says what changes).

What the kernel still does for every engine, async or not: stop strings (it stops the
generator when one is found), ``maxTokens`` (given to :meth:`~AsyncEngine.generate` as
``max_tokens``; the kernel ends the sequence if an engine overruns it), stop reasons, stats,
progress fractions, config validation, and a bound on every wait (``LMKERNEL_ENGINE_TIMEOUT``
between two events, ``LMKERNEL_LOAD_TIMEOUT`` for a load). An exception raised by
:meth:`~AsyncEngine.generate` fails that sequence only: it is the request's server failing,
not the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .contract import Backend, Engine, LoadOptions, Sampling

__all__ = ["AsyncBackend", "AsyncEngine", "Finish", "Generation", "GenerationEvent", "Prefill", "Text"]


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One sequence to generate.

    Exactly one of ``prompt`` (a completion: the text to continue, as given) and ``messages``
    (a conversation: OpenAI-shaped ``{"role", "content"}`` dicts, for an engine whose
    :attr:`AsyncEngine.chat` is true; the engine applies the model's template) is set.
    ``max_tokens``: the most tokens to generate (``None``: up to the engine's own limit).
    """

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    sampling: Sampling
    max_tokens: int | None = None
    seed: int | None = None


@dataclass(slots=True)
class Prefill:
    """``processed`` of ``total`` prompt tokens are read (``cached`` of them found computed)."""

    processed: int
    total: int
    cached: int = 0


@dataclass(slots=True)
class Text:
    """Generated text; ``tokens`` how many tokens it holds (1 when the engine does not know)."""

    text: str
    tokens: int = 1


@dataclass(slots=True)
class Finish:
    """The sequence ended: ``"eos"`` (the model ended it) or ``"length"`` (``max_tokens`` or the
    engine's context limit). The counts, where the engine knows them (a server's ``usage``),
    replace the kernel's own in the prediction's stats."""

    reason: Literal["eos", "length"]
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    cached_tokens: int | None = None


GenerationEvent = Prefill | Text | Finish


class AsyncEngine(ABC):
    """A loaded model whose methods are coroutines on the kernel's trio loop.

    Never block in them (no sleeping, no blocking I/O, no long compute: hand that to
    ``trio.to_thread``); every sequence runs concurrently with the others.
    """

    #: Context window in tokens (prompt plus generated) the model accepts: a server's limit
    #: as it reports it, or as configured. The kernel refuses prompts that cannot fit by length.
    context_length: int
    #: Whether :meth:`generate` takes ``messages`` (a chat): the engine renders the conversation.
    chat: bool = False

    @abstractmethod
    def generate(self, request: Generation) -> AsyncIterator[GenerationEvent]:
        """Generate one sequence (an async generator): events, then exactly one :class:`Finish`."""

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; raise :class:`NotImplementedError` (the default) when it has no tokenizer."""
        raise NotImplementedError("this engine has no tokenizer")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the engine (connections, memory). Called once, when the model unloads."""


class AsyncBackend(Backend):
    """A backend whose engines are :class:`AsyncEngine`: the kernel calls :meth:`load_async`."""

    @abstractmethod
    async def load_async(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> AsyncEngine:
        """Open the model on the kernel's trio loop, reporting progress from 0.0 to 1.0."""

    def load(self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]) -> Engine:
        raise TypeError(f"backend {self.name!r} is asynchronous: the kernel calls load_async()")
