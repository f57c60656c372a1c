"""Structured output: a JSON schema or a GBNF grammar, enforced token by token.

The grammar engine is llguidance (MIT, no dependencies, abi3 wheels for Linux x86_64/aarch64
and macOS arm64): it compiles JSON schemas (``$defs``/``$ref``, enums, bounds), Lark and GBNF
grammars, and computes the allowed-token bitmask of one step in tens of microseconds, against
a decode step of milliseconds. The rest lives here, once for every backend:

* :func:`check_setting` refuses a malformed ``structured`` setting on the kernel thread, at the
  request, in microseconds (no schema, no grammar, a grammar too long to convert quickly).
* :func:`grammar_for` turns a setting into llguidance grammar text, and :class:`Grammars` (one
  per worker, on the model's engine thread: the only work a request costs beyond it is bounded
  and its own model's) builds the tokenizer llguidance needs from the engine's
  :class:`~lmkernel.plugins.Vocabulary` once, converts and compiles each setting once
  (identical requests share the compiled matcher) and makes a :class:`GrammarConstraint` per
  sequence.
* :class:`GrammarConstraint` holds a sequence's grammar state. The engine asks it for the mask
  before each sample, passing the token it sampled last; the worker tells it every token the
  engine reported. Whichever comes first advances the matcher and the other is checked against
  it, so the state advances once whatever an engine's pipelining (MLX samples one token ahead
  of what it reports, llama.cpp reports each token before it samples the next).

When the grammar is complete its mask allows only the engine's end tokens (and a chat turn's
end), so the engine ends the sequence with ``eos``: stop reason ``eosFound``. ``maxTokens``
cuts it like any prediction (``maxPredictedTokensReached``, the text kept, unparsed).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..errors import LMKernelUnsupportedConfigError, LMKernelValueError
from ..plugins.contract import Engine, TokenConstraint, Vocabulary
from ._boundary import PluginValueError
from .config import LlmStructuredPredictionSetting

log = logging.getLogger("lmkernel.kernel")

__all__ = ["MAX_GBNF_CHARS", "GrammarConstraint", "Grammars", "check_setting", "closed", "grammar_for"]

#: Whitespace a JSON value may have between its tokens: llama.cpp's JSON-schema grammars' own
#: (what LM Studio enforces): one space, or one or two newlines and an indent of at most 20.
#: llguidance's default allows any run, and a small model can then write spaces until maxTokens.
JSON_WHITESPACE = r"(?:\x20|\n{1,2}[\x20\t]{0,20})?"
#: Compiled grammars a worker keeps (each sequence gets a copy of its grammar's matcher).
MAX_COMPILED = 32
#: The longest GBNF grammar accepted, in characters. llguidance converts GBNF to Lark in Python,
#: in time quadratic in the number of rules (measured: 22,700 characters of 1,000 rules 0.55 s,
#: 48,700 characters 2.1 s); llama.cpp's own grammars (json.gbnf, c.gbnf ...) are 1 to 2 kB.
MAX_GBNF_CHARS = 20_000


def _llguidance():
    import llguidance  # noqa: PLC0415 - imported on the first structured request

    return llguidance


def check_setting(setting: LlmStructuredPredictionSetting | None) -> LlmStructuredPredictionSetting | None:
    """The setting a prediction's output must follow, ``None`` for none (or ``{"type": "none"}``).

    Raises :class:`~lmkernel.LMKernelValueError` naming the rule for a setting without its
    schema or grammar, or a GBNF grammar over :data:`MAX_GBNF_CHARS`. Cheap: what compiling
    finds (an unknown ``$ref``, a ``pattern`` with look-around, GBNF that does not convert) is
    found on the model's worker.
    """
    if setting is None or setting.type == "none":
        return None
    if setting.type == "json":
        if setting.json_schema is None:
            raise LMKernelValueError(
                'structured output of type "json" needs a jsonSchema (a JSON schema object), got none')
        return setting
    grammar = setting.gbnf_grammar
    if not grammar or not grammar.strip():
        raise LMKernelValueError(
            f'structured output of type "gbnf" needs a gbnfGrammar (GBNF text), got {grammar!r}')
    if len(grammar) > MAX_GBNF_CHARS:
        raise LMKernelValueError(
            f"structured gbnfGrammar is {len(grammar)} characters long; the limit is {MAX_GBNF_CHARS}")
    return setting


def grammar_for(setting: LlmStructuredPredictionSetting) -> str:
    """The llguidance grammar of a setting :func:`check_setting` let through.

    Raises :class:`~lmkernel.LMKernelValueError` when a GBNF grammar does not convert.
    """
    llg = _llguidance()
    if setting.type == "json":
        schema = setting.json_schema
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                json.dumps(closed(schema)), overrides={"lenient": True, "whitespace_pattern": JSON_WHITESPACE})
        except (ValueError, TypeError) as exc:
            raise LMKernelValueError(f"structured jsonSchema is not a JSON schema object: {exc}") from None
    try:
        return llg.grammar_from("gbnf", setting.gbnf_grammar)
    except Exception as exc:  # noqa: BLE001 - the converter raises what it meets: all are the grammar's fault
        raise LMKernelValueError(f"structured gbnfGrammar is not a valid GBNF grammar: {_first_line(exc)}") from None


_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
              "contains", "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: object) -> object:
    """``schema`` with ``"additionalProperties": false`` on every object schema that lists
    ``properties`` and says nothing of other keys (nor ``patternProperties``).

    JSON Schema allows any other key by default, and a model then adds keys of its own (SmolLM2
    wrote a ``published_in`` into a pydantic ``Book``). llama.cpp's schema grammars, which LM
    Studio enforces, and OpenAI's strict mode both allow only the listed keys unless told.
    Composition stays open: a schema with ``allOf`` (or ``anyOf``/``oneOf`` beside properties of
    its own), its parts and the definitions they name, since each part lists only some of the
    keys the whole allows (closing them would make ``{"a": 1, "b": 2}`` unsatisfiable).
    """
    if not isinstance(schema, dict):
        return schema
    shared = set()  # the definitions a composition's part names: they stay open
    _composed_refs(schema, shared)
    return _close(schema, shared, open_=False, path="#")


def _parts(schema: dict) -> list:
    """The parts of a composition whose keys combine with ``schema``'s own (none if it composes nothing)."""
    parts = list(schema.get("allOf") or []) if isinstance(schema.get("allOf"), list) else []
    if isinstance(schema.get("properties"), dict):
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list):
                parts += schema[key]
    return parts


def _composed_refs(schema: object, refs: set) -> None:
    if isinstance(schema, dict):
        for part in _parts(schema):
            if isinstance(part, dict) and isinstance(part.get("$ref"), str):
                refs.add(part["$ref"])
        for value in schema.values():
            _composed_refs(value, refs)
    elif isinstance(schema, list):
        for item in schema:
            _composed_refs(item, refs)


def _close(schema: object, shared: set, *, open_: bool, path: str) -> object:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    composed = bool(_parts(schema))
    parts = {id(part) for part in _parts(schema)}
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _close(out[key], shared, open_=False, path=f"{path}/{key}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_close(item, shared, open_=id(item) in parts, path=f"{path}/{key}/{i}")
                        for i, item in enumerate(out[key])]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _close(sub, shared, open_=f"{path}/{key}/{name}" in shared, path=f"{path}/{key}/{name}")
                        for name, sub in out[key].items()}
    if (not open_ and not composed and isinstance(schema.get("properties"), dict)
            and "additionalProperties" not in schema and "patternProperties" not in schema
            and "unevaluatedProperties" not in schema):
        out["additionalProperties"] = False
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


class _TokenList:
    """A vocabulary given as token bytes, in the shape llguidance's ``TokenizerWrapper`` reads."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.tokens = list(vocabulary.tokens or ())
        self.eos_token_id = vocabulary.end_tokens[0]
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        self._tokenize = vocabulary.tokenize

    def __call__(self, text: bytes) -> list[int]:
        return list(self._tokenize(text))  # type: ignore[misc]


def _check_vocabulary(vocabulary: object) -> Vocabulary:
    if not isinstance(vocabulary, Vocabulary):
        raise PluginValueError(f"Engine.vocabulary() must return a Vocabulary or None, got {vocabulary!r:.120}")
    if not isinstance(vocabulary.size, int) or vocabulary.size < 1:
        raise PluginValueError(f"Vocabulary.size must be a positive integer, got {vocabulary.size!r:.80}")
    ends = list(vocabulary.end_tokens)
    if not ends or not all(isinstance(t, int) and 0 <= t < vocabulary.size for t in ends):
        raise PluginValueError(f"Vocabulary.end_tokens must be token ids below its size, got {ends!r:.120}")
    if vocabulary.tokenizer_json is None and (vocabulary.tokens is None or vocabulary.tokenize is None):
        raise PluginValueError("a Vocabulary needs tokenizer_json, or tokens and tokenize")
    return vocabulary


class Grammars:
    """One worker's grammar side: the engine's llguidance tokenizer and its compiled grammars."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tokenizer = None  # llguidance.LLTokenizer, built from the engine's vocabulary once
        self._vocabulary: Vocabulary | None = None
        self._compiled: OrderedDict[str, object] = OrderedDict()

    def new_engine(self) -> None:
        """A fresh engine was loaded: what was built from the old one goes."""
        self._tokenizer = self._vocabulary = None
        self._compiled.clear()

    def constraint(self, engine: Engine, setting: LlmStructuredPredictionSetting, call: Callable,
                   stops: frozenset[int]) -> GrammarConstraint:
        """A new sequence's constraint for ``setting`` (``call`` runs the engine's plugin code, timed).

        Raises :class:`~lmkernel.LMKernelValueError` when the setting does not compile,
        :class:`~lmkernel.LMKernelUnsupportedConfigError` when the engine gives no vocabulary.
        """
        if self._tokenizer is None:
            self._build_tokenizer(engine, call)
        assert self._vocabulary is not None
        key = setting.gbnf_grammar if setting.type == "gbnf" else json.dumps(setting.json_schema, sort_keys=True)
        key = f"{setting.type}:{key}"
        matcher = self._compiled.get(key)
        if matcher is None:
            matcher = _llguidance().LLMatcher(self._tokenizer, grammar_for(setting), log_level=0)  # errors: ours
            if matcher.is_error():
                raise LMKernelValueError(f"Invalid structured output setting: {matcher.get_error()[:1000]}")
            for warning in matcher.get_grammar_warnings():
                log.warning("model %s: structured output: %s", self._name, warning)
            self._compiled[key] = matcher
            if len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return GrammarConstraint(matcher.deep_copy(), self._vocabulary, stops)

    def _build_tokenizer(self, engine: Engine, call: Callable) -> None:
        vocabulary = call("while describing its vocabulary", engine.vocabulary)
        if vocabulary is None:
            raise LMKernelUnsupportedConfigError(
                f"Model {self._name!r}: its engine ({type(engine).__name__}) gives no vocabulary, "
                "so its output cannot be constrained (structured output)")
        vocabulary = _check_vocabulary(vocabulary)
        llg = _llguidance()
        ends = list(vocabulary.end_tokens)
        try:
            if vocabulary.tokenizer_json is not None:
                tokenizer = llg.LLTokenizer(vocabulary.tokenizer_json, n_vocab=vocabulary.size, eos_token=ends)
            else:
                tokens = _TokenList(vocabulary)
                tokens.tokens += [b""] * (vocabulary.size - len(tokens.tokens))
                tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(tokens), n_vocab=vocabulary.size, eos_token=ends)
        except Exception as exc:  # noqa: BLE001 - what the engine described could not be read: its error
            raise PluginValueError(f"llguidance could not read the engine's vocabulary: {_first_line(exc)}") from None
        self._tokenizer, self._vocabulary = tokenizer, vocabulary


class GrammarConstraint(TokenConstraint):
    """One sequence's grammar state (see the module docstring).

    ``problem`` says why the sequence must fail; the worker checks it after each step. An
    :class:`~lmkernel.LMKernelValueError` is the request's: its grammar hit one of llguidance's
    limits (too many items in a row, a lexer too large) or cannot be satisfied, though the engine
    sampled only what the masks allowed. A :class:`PluginValueError` is the engine's: it sampled a
    token its mask did not allow, or reported other tokens than it sampled.
    """

    def __init__(self, matcher, vocabulary: Vocabulary, stops: frozenset[int] = frozenset()) -> None:
        self._matcher = matcher
        self.words = (vocabulary.size + 31) // 32
        self._mask = np.zeros(self.words, dtype=np.int32)
        self._ends = frozenset(vocabulary.end_tokens)
        self._first_end = min(self._ends)
        # a chat turn's end tokens that the engine does not end on itself: allowed with the end tokens
        self._stops = sorted(t for t in stops - self._ends if 0 <= t < vocabulary.size)
        self._tokens: list[int] = []  # the generated tokens the matcher consumed, in order
        self._engine_at = 0  # how many of them the engine passed as ``previous``
        self._kernel_at = 0  # how many of them the worker observed
        self.problem: LMKernelValueError | PluginValueError | None = None

    def allowed(self, previous: int | None) -> np.ndarray:
        if previous is not None and previous not in self._ends:  # MLX feeds its end token back one step ahead
            self._engine_at = self._advance(previous, self._engine_at)
        if self.problem is None:
            self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            if self._matcher.is_error():
                self.problem = self._grammar_failed()
        if self.problem is not None:
            self._mask.fill(-1)  # never an all-masked row (NaN); the worker fails the sequence after this step
        elif self._stops and self._mask[self._first_end >> 5] >> (self._first_end & 31) & 1:
            for t in self._stops:
                self._mask[t >> 5] |= np.int32(np.uint32(1 << (t & 31)).view(np.int32))
        return self._mask

    def observe(self, token: int) -> None:
        """The worker saw the engine report ``token`` for this sequence."""
        self._kernel_at = self._advance(token, self._kernel_at)

    def restart(self) -> None:
        """The sequence was added again (its window was cut): its next ``allowed`` has no ``previous``."""
        self._engine_at = self._kernel_at

    def _advance(self, token: int, at: int) -> int:
        if self.problem is not None:
            return at + 1
        if at < len(self._tokens):
            if self._tokens[at] != token:
                self.problem = PluginValueError(f"the engine reported token {token} as generated token {at + 1}, "
                                                f"but had sampled token {self._tokens[at]} there")
        elif not self._matcher.consume_token(token):
            # The mask it was sampled under is still this one: allowed there, the grammar itself gave out.
            masked = 0 <= token < self.words * 32 and not (self._mask[token >> 5] >> (token & 31)) & 1
            self.problem = PluginValueError(
                f"the engine sampled token {token}, which the grammar does not allow there "
                f"(after {len(self._tokens)} tokens)") if masked else self._grammar_failed()
        else:
            self._tokens.append(token)
        return at + 1

    def _grammar_failed(self) -> LMKernelValueError:
        """The request's error: its grammar cannot go on (llguidance's reason, without its parser state)."""
        reason = self._matcher.get_error().split("<state>")[0].strip().splitlines()
        reason = reason[0][:300] if reason else "no reason given"
        return LMKernelValueError(
            f"The structured output setting cannot be followed after {len(self._tokens)} tokens: the schema or "
            f"grammar is too complex or cannot be satisfied ({reason})")

