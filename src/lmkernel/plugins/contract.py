"""The public contract a backend implements.

A *backend* is a small object registered under the entry-point group ``lmkernel.backends``.
It says whether it can run on this machine (and why not), which model folders it accepts,
and loads a model into an *engine*. An engine tokenizes and advances a set of sequences
step by step:

* :meth:`Engine.add` a sequence (prompt tokens plus :class:`Sampling`),
* :meth:`Engine.step` returns what happened in one engine step, as a list of
  :class:`PromptProgress`, :class:`Token` and :class:`SequenceEnd` events,
* :meth:`Engine.remove` a sequence, in any state (waiting, prefilling, decoding).

Structured output (optional): an engine whose :meth:`Engine.vocabulary` describes its tokens
can be handed a :class:`TokenConstraint` per sequence in :meth:`Engine.add`; before sampling
each token of that sequence it asks the constraint which tokens are allowed and samples only
among them. The grammar and its state belong to the kernel (one implementation for every
backend); the engine only applies a bitmask. A backend that can do this lists ``"structured"``
in :attr:`Backend.prediction_keys`; one that does not is refused the key before any compute.

Threading: the kernel calls ``load`` and every engine method from one worker thread per
loaded model, and calls :meth:`Backend.release_thread` on that thread before it ends. An
engine never needs locks, and may keep thread-bound state (MLX streams, CUDA contexts).

What the kernel does for every backend, so an engine must not: stop strings, ``maxTokens``,
the context-length limit, stop reasons, stats, progress fractions, config validation. An
engine reports EOS (``SequenceEnd(reason="eos")``) and ends a sequence with ``"length"``
exactly when the token budget the kernel gave it in :meth:`Engine.add` is spent.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

__all__ = [
    "Availability",
    "Backend",
    "Engine",
    "LoadOptions",
    "ModelDescription",
    "ModelRejected",
    "OfferedModel",
    "PromptProgress",
    "Sampling",
    "SequenceEnd",
    "StepEvent",
    "Token",
    "TokenConstraint",
    "Vocabulary",
    "read_config",
]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not, ``notes`` what it offers."""

    available: bool
    reason: str = ""
    notes: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """What a backend reads from a model folder it accepts, without loading weights.

    The kernel checks it before it lists the model: ``format`` one of the protocol's model
    formats (``safetensors``, ``gguf``, ``exl2`` ...), ``max_context_length`` an integer >= 1,
    ``size_bytes`` an integer >= 0, the strings valid Unicode. A description that breaks a
    rule is skipped and logged as the backend's error.
    """

    architecture: str | None
    format: str
    max_context_length: int
    size_bytes: int
    params_string: str | None = None
    display_name: str | None = None
    #: How the weights are quantized, as their format names it (a GGUF file's type: ``"Q4_K_M"``).
    quantization: str | None = None


@dataclass(frozen=True, kw_only=True)
class OfferedModel:
    """A model a backend offers that is not a folder on disk (a model on a server).

    ``path`` is the name it is listed and loaded under (``remote/<server>/<model id>``): its
    ``LlmInfo.path`` and model key, and what :meth:`Backend.load` is given (as a ``Path``).
    """

    path: str
    description: ModelDescription


class ModelRejected(Exception):
    """Raised by :meth:`Backend.describe` to say why this backend cannot load a folder.

    The message is the reason, short and specific, without the backend's name or the
    folder's path (the kernel adds both): ``"no config.json"``, ``"config.json is not valid
    JSON: Expecting ',' delimiter at line 3, column 5"``, ``"model_type 'foo' is not supported
    by mlx-lm 0.28"``. The kernel shows it when someone names that folder and no backend
    takes it; it never logs it while listing models (most folders are not models).
    """


def read_config(folder: Path) -> dict[str, Any]:
    """Read the Hugging Face ``config.json`` of ``folder``; raise :class:`ModelRejected` saying what is wrong.

    A missing or unreadable file, text that is not UTF-8, invalid JSON (with its line and
    column) and JSON that is not an object each get their own reason.
    """
    if folder.is_file():
        raise ModelRejected(f"a {folder.suffix.lstrip('.').upper() + ' ' if folder.suffix else ''}file, not a model folder")
    try:
        text = (folder / "config.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelRejected("no config.json") from None
    except UnicodeDecodeError as exc:
        raise ModelRejected(f"config.json is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ModelRejected(f"cannot read config.json: {exc.strerror or type(exc).__name__}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelRejected(f"config.json is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # numbers too long to convert, nesting too deep
        raise ModelRejected(f"config.json is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise ModelRejected(f"config.json must hold a JSON object, got a JSON {_JSON_TYPES.get(type(config), 'value')}")
    return config


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """Load settings already validated by the kernel.

    ``context_length`` is the context the kernel will enforce (``None``: the model's own);
    ``max_batch`` the most sequences the kernel will run at once (``maxConcurrentPredictions``);
    ``extra`` holds the other load-config keys (camelCase) the backend declared in
    :attr:`Backend.load_keys` (``promptCacheBytes``, the bound on memory an engine keeps for
    its prompt cache, among them when declared: 0 turns reuse off).
    """

    context_length: int | None = None
    seed: int | None = None
    eval_batch_size: int | None = None
    max_batch: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling settings of one sequence. Neutral values switch a sampler off.

    ``temperature`` 0 means greedy (argmax) and every other setting is ignored. ``top_k``
    is at most 2**31-1 and may exceed the vocabulary (then it is off: an engine clamps it).
    ``extra`` holds the other prediction-config keys (camelCase, validated values) that the
    backend declared in :attr:`Backend.prediction_keys`; it is read-only, and left out of
    the hash.
    """

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.extra, MappingProxyType):
            object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class PromptProgress:
    """``processed`` of ``total`` prompt tokens are in the cache.

    ``cached``: how many of the prompt's first tokens the engine found already computed (a
    prefix kept from an earlier sequence) instead of computing them; an engine with a prompt
    cache reports it in the sequence's first ``PromptProgress`` (then ``processed >= cached``).
    The kernel reports it as ``LlmPredictionStats.cached_prompt_tokens_count``.
    """

    seq_id: int
    processed: int
    total: int
    cached: int = 0


@dataclass(slots=True)
class Token:
    """One generated token and the text it completes (may be ``""`` mid-character)."""

    seq_id: int
    token_id: int
    text: str


@dataclass(slots=True)
class SequenceEnd:
    """The engine ended a sequence: ``"eos"`` (an end token, not reported as a Token) or
    ``"length"`` (its token budget is spent). ``text`` flushes held-back text."""

    seq_id: int
    reason: Literal["eos", "length"]
    text: str = ""


StepEvent = PromptProgress | Token | SequenceEnd


@dataclass(frozen=True, kw_only=True)
class Vocabulary:
    """What the kernel needs to compile a grammar for an engine's tokens (structured output).

    ``size``: the width of the engine's logits (it may exceed the tokenizer's own count; the
    extra ids are never allowed). ``end_tokens``: every id that ends a sequence when sampled
    (EOS, end of turn): allowed exactly when the grammar is complete. Then the tokens themselves,
    one of two ways: ``tokenizer_json``, a Hugging Face ``tokenizers`` JSON (what
    ``PreTrainedTokenizerFast.backend_tokenizer.to_str()`` gives), or ``tokens``, each id's bytes
    (a control token as ``b"\\xff"`` and its text, so that no grammar ever matches it) with
    ``tokenize``, the engine's tokenizer on plain bytes (no BOS, special tokens not parsed).
    """

    size: int
    end_tokens: Sequence[int]
    tokenizer_json: str | None = None
    tokens: Sequence[bytes] | None = None
    tokenize: Callable[[bytes], list[int]] | None = None


class TokenConstraint(ABC):
    """The tokens one sequence may sample next: implemented by the kernel, called by engines.

    The mask is ``words`` 32-bit integers: token ``t`` is allowed when bit ``t % 32`` of word
    ``t // 32`` is set (as ``np.unpackbits(mask.view(np.uint8), bitorder="little")`` reads it).
    """

    #: ``ceil(Vocabulary.size / 32)``: the length of every mask.
    words: int

    @abstractmethod
    def allowed(self, previous: int | None):
        """The mask for the sequence's next token (a NumPy ``int32`` array of :attr:`words`).

        Call it exactly once before sampling each token of the sequence, and set the logits of
        every token it does not allow to minus infinity before any sampler sees them (greedy
        included). ``previous``: the token sampled just before, which the engine reports (or
        has reported) as a :class:`Token`; ``None`` for the first token after :meth:`Engine.add`.
        The array is reused by the next call: apply it first. It never raises; a sequence whose
        engine sampled a token the mask did not allow fails, the engine does not.
        """


class Engine(ABC):
    """A loaded model. All methods run on the model's worker thread."""

    #: Context window in tokens (prompt plus generated) that this instance supports.
    context_length: int

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Encode ``text`` as the model sees a completion prompt (BOS included if the model uses one)."""

    @abstractmethod
    def add(
        self, seq_id: int, prompt_tokens: Sequence[int], sampling: Sampling, max_tokens: int,
        *, constraint: TokenConstraint | None = None,
    ) -> None:
        """Queue a new sequence; its events appear in later :meth:`step` results.

        ``constraint`` (only ever given to an engine whose :meth:`vocabulary` is not ``None``, so
        an engine without structured output may leave the parameter out): before sampling each
        token of this sequence, mask the logits with ``constraint.allowed(previous)``.

        ``max_tokens`` is the token budget the kernel computed (from ``maxTokens`` and the
        context left): after that many :class:`Token` events the engine ends the sequence
        with ``SequenceEnd("length")``, flushing any text its detokenizer held back.

        A ``seq_id`` may come back: when a sequence fills the context under a cutting
        ``contextOverflowPolicy``, the kernel calls :meth:`remove` and then ``add`` again with
        the same id and the cut text (prompt and generated tokens so far) as ``prompt_tokens``.
        Treat it as a new sequence; the text of its tokens continues from those tokens.
        """

    def vocabulary(self) -> Vocabulary | None:
        """This engine's tokens, for structured output; ``None`` (the default): it cannot constrain.

        Called at most once per engine, on its first structured request, so it may be slow.
        """
        return None

    @abstractmethod
    def step(self) -> list[StepEvent]:
        """Advance the active sequences by one engine step and report what happened."""

    @abstractmethod
    def remove(self, seq_id: int) -> None:
        """Drop a sequence in any state; unknown ids are ignored."""

    @property
    @abstractmethod
    def busy(self) -> bool:
        """Whether any sequence is waiting, prefilling or decoding."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory. Called once, on the worker thread."""


class Backend(ABC):
    """A family of engines (one per loaded model), registered as a plugin."""

    #: Short unique name, also the entry-point name (``mlx``, ``exllamav2`` ...).
    name: str
    #: Prediction-config keys (camelCase) this backend honours besides the kernel's own.
    prediction_keys: frozenset[str] = frozenset()
    #: Load-config keys (camelCase) this backend honours besides ``contextLength``.
    load_keys: frozenset[str] = frozenset()
    #: When several available backends accept a model, the highest priority loads it.
    priority: int = 0

    @abstractmethod
    def availability(self) -> Availability:
        """Say whether this backend can run here (cheap: no heavy imports if avoidable)."""

    @abstractmethod
    def describe(self, path: Path) -> ModelDescription | None:
        """Return a description if this backend can load the folder ``path``.

        If it cannot, raise :class:`ModelRejected` saying why (``None`` also refuses the
        folder, with no reason given). Cheap: read headers and configs, never weights.
        """

    @abstractmethod
    def load(
        self, path: Path, options: LoadOptions, on_progress: Callable[[float], None]
    ) -> Engine:
        """Load the model (on its worker thread), reporting progress from 0.0 to 1.0."""

    def offered_models(self) -> Sequence[OfferedModel]:
        """Models this backend offers besides folders on disk (the default: none).

        Called on a kernel thread each time the models are listed, so answer quickly (cache,
        bound any network call). A failure or a hang loses only these models from the listing.
        """
        return ()

    def offer_problems(self) -> Sequence[str]:
        """What kept models out of the last :meth:`offered_models` answer (``"server gpu
        (http://...): could not connect"``), shown when a key names no model; default none."""
        return ()

    def release_thread(self) -> None:  # noqa: B027 - optional hook
        """Release per-thread engine state; called last on every worker thread."""
