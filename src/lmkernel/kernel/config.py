"""Prediction and load configs: the public structs and their validation.

The LM Studio SDK accepts config dicts with camelCase or snake_case keys, silently drops
keys it does not know, and type-checks only some values. lmkernel validates every key
before any compute: an unknown key raises (suggesting the near match), an ill-typed or
out-of-range value raises naming the key, the rule and the value. Every value must also
cross the wire as plain data (:func:`wire_problem`): no NaN or infinity, no integer beyond
64 bits, no string that is not valid Unicode, anywhere in a config, nested values included.
Which of the valid keys a model can honour is decided later, against its backend.
"""

from __future__ import annotations

import difflib
import functools
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgspec

from .._struct import PublicStruct, snake_to_camel
from ..errors import LMKernelConfigError
from ._values import (  # noqa: F401 - re-exported: the public face of the value checks
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_IDENTIFIER_CHARS,
    MAX_NESTING,
    check_identifier,
    check_ttl,
    show,
    unicode_problem,
    wire_problem,
)

__all__ = [
    "KERNEL_PREDICTION_KEYS",
    "LlmLoadModelConfig",
    "LlmPredictionConfig",
    "LlmStructuredPredictionSetting",
    "parse_load_config",
    "parse_prediction_config",
    "show",
    "unicode_problem",
    "wire_problem",
]

ContextOverflowPolicy = Literal["stopAtLimit", "truncateMiddle", "rollingWindow"]


class LlmStructuredPredictionSetting(PublicStruct):
    """Structured-output request: ``type`` is ``"none"``, ``"json"`` or ``"gbnf"``."""

    type: Literal["none", "json", "gbnf"]
    json_schema: dict[str, Any] | None = None
    gbnf_grammar: str | None = None


class LlmPredictionConfig(PublicStruct):
    """Per-prediction settings (``config=`` of ``complete``); every field is optional.

    Fields: ``max_tokens`` (int >= 1, or -1/False for no limit), ``temperature`` (>= 0;
    0 is greedy), ``stop_strings``, ``context_overflow_policy`` (``"stopAtLimit"``,
    ``"truncateMiddle"``, the default as in LM Studio, or ``"rollingWindow"``), ``top_k_sampling`` (a
    whole number up to 2**31-1; 0 or -1 is off), ``top_p_sampling``, ``min_p_sampling``,
    ``repeat_penalty`` (False disables a sampler), and the rest of LM Studio's keys, which a
    backend may or may not honour. Numbers must be finite, integers must fit 64 bits.
    """

    max_tokens: int | bool | None = None
    temperature: float | None = None
    stop_strings: list[str] | None = None
    tool_call_stop_strings: list[str] | None = None
    context_overflow_policy: ContextOverflowPolicy | None = None
    structured: LlmStructuredPredictionSetting | None = None
    raw_tools: dict[str, Any] | None = None
    top_k_sampling: float | None = None
    repeat_penalty: float | bool | None = None
    min_p_sampling: float | bool | None = None
    top_p_sampling: float | bool | None = None
    cpu_threads: int | None = None
    prompt_template: dict[str, Any] | None = None
    draft_model: str | None = None
    speculative_decoding_num_draft_tokens_exact: int | None = None
    speculative_decoding_min_draft_length_to_consider: int | None = None
    speculative_decoding_min_continue_drafting_probability: float | None = None
    reasoning_parsing: dict[str, Any] | None = None


class LlmLoadModelConfig(PublicStruct):
    """Load-time settings (``config=`` of ``llm()``, ``model()``, ``load_new_instance()``).

    lmkernel's own additions: ``backend``, the backend to load with (overriding the
    automatic choice); ``max_concurrent_predictions``, how many predictions run together
    in one batch (default 16); ``max_queued_predictions``, how many more may wait for a
    place before new ones are refused (default 256); ``prompt_cache_bytes``, the most memory
    the model's prompt cache may keep (earlier turns of a conversation, shared prefixes; least
    recently used entries go first; 0 turns reuse off; default 1 GiB on MLX, while llama.cpp
    keeps its cache in the cells its slots already reserve).
    """

    gpu: dict[str, Any] | None = None
    gpu_strict_vram_cap: bool | None = None
    offload_kv_cache_to_gpu: bool | None = msgspec.field(default=None, name="offloadKVCacheToGpu")
    context_length: int | None = None
    rope_frequency_base: float | None = None
    rope_frequency_scale: float | None = None
    eval_batch_size: int | None = None
    flash_attention: bool | None = None
    keep_model_in_memory: bool | None = None
    seed: int | None = None
    use_fp16_for_kv_cache: bool | None = msgspec.field(default=None, name="useFp16ForKVCache")
    try_mmap: bool | None = None
    num_experts: int | None = None
    llama_k_cache_quantization_type: str | bool | None = None
    llama_v_cache_quantization_type: str | bool | None = None
    backend: str | None = None
    max_concurrent_predictions: int | None = None
    max_queued_predictions: int | None = None
    prompt_cache_bytes: int | None = None


DEFAULT_MAX_CONCURRENT = 16
DEFAULT_MAX_QUEUED = 256

# What the kernel itself implements, for every backend (the rest is the backend's job).
KERNEL_PREDICTION_KEYS = frozenset({"maxTokens", "stopStrings", "contextOverflowPolicy"})
KERNEL_LOAD_KEYS = frozenset({"contextLength", "backend", "maxConcurrentPredictions", "maxQueuedPredictions"})

# Spellings from other APIs that users reach for, mapped to ours.
_ALIASES = {
    "maxNewTokens": "maxTokens",
    "maxPredictedTokens": "maxTokens",
    "stop": "stopStrings",
    "temp": "temperature",
    "topP": "topPSampling",
    "topK": "topKSampling",
    "minP": "minPSampling",
    "repetitionPenalty": "repeatPenalty",
    "nCtx": "contextLength",
    "numCtx": "contextLength",
}

_Rule = tuple[str, Callable[[Any], bool]]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _whole(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v == int(v) and low <= v <= high


def _at_least(low: float, *, open_: bool = False) -> Callable[[Any], bool]:
    return lambda v: _number(v) and (low < v if open_ else low <= v)


def _positive_or_unlimited(v: Any) -> bool:
    return v is False or v == -1 or (_number(v) and 1 <= v <= INT64_MAX)


def _top_k(v: Any) -> bool:
    return v == -1 or _whole(0, INT32_MAX)(v)


def _sampler_value(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if v is False:
            return True
        if not _number(v):
            return False
        return (low < v if low_open else low <= v) and v <= high

    return check


def _off_or(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is False or check(v)


_COUNT = f"an integer from 1 to {INT32_MAX}"
_PREDICTION_RULES: dict[str, _Rule] = {
    "maxTokens": ("an integer >= 1, or -1 or False for no limit", _positive_or_unlimited),
    "temperature": ("a number >= 0", _at_least(0.0)),
    "stopStrings": ("a list of non-empty strings", lambda v: all(v)),
    "toolCallStopStrings": ("a list of non-empty strings", lambda v: all(v)),
    "topKSampling": (f"a whole number from 0 to {INT32_MAX} (0 or -1 disables top-k)", _top_k),
    "topPSampling": ("a number in (0, 1], or False", _sampler_value(0.0, 1.0, low_open=True)),
    "minPSampling": ("a number in [0, 1], or False", _sampler_value(0.0, 1.0)),
    "repeatPenalty": ("a finite number > 0, or False", _off_or(_at_least(0.0, open_=True))),
    "cpuThreads": (_COUNT, _whole(1, INT32_MAX)),
    "speculativeDecodingNumDraftTokensExact": (_COUNT, _whole(1, INT32_MAX)),
    "speculativeDecodingMinDraftLengthToConsider": (f"an integer from 0 to {INT32_MAX}", _whole(0, INT32_MAX)),
    "speculativeDecodingMinContinueDraftingProbability": ("a number in [0, 1]", _sampler_value(0.0, 1.0)),
    "draftModel": ("a non-empty string", lambda v: v != ""),
}

_LOAD_RULES: dict[str, _Rule] = {
    "contextLength": (_COUNT, _whole(1, INT32_MAX)),
    "evalBatchSize": (_COUNT, _whole(1, INT32_MAX)),
    "numExperts": (_COUNT, _whole(1, INT32_MAX)),
    "maxConcurrentPredictions": (_COUNT, _whole(1, INT32_MAX)),
    "maxQueuedPredictions": (f"an integer from 0 to {INT32_MAX}", _whole(0, INT32_MAX)),
    "promptCacheBytes": (f"an integer from 0 to {INT64_MAX} (0: no prompt cache)", _whole(0, INT64_MAX)),
    "seed": (f"an integer from 0 to {INT64_MAX}", _whole(0, INT64_MAX)),
    "ropeFrequencyBase": ("a finite number >= 0 (0: the model's own)", _at_least(0.0)),
    "ropeFrequencyScale": ("a finite number >= 0 (0: the model's own)", _at_least(0.0)),
    "backend": ("a non-empty string", lambda v: v != ""),
}


@functools.cache
def _fields(struct: type[msgspec.Struct]) -> dict[str, msgspec.inspect.Field]:
    return {f.encode_name: f for f in msgspec.inspect.type_info(struct).fields}


@functools.cache
def _hints(struct: type[msgspec.Struct]) -> dict[str, Any]:
    return typing.get_type_hints(struct)


def _type_name(field: msgspec.inspect.Field) -> str:
    names = {
        msgspec.inspect.IntType: "an integer",
        msgspec.inspect.FloatType: "a number",
        msgspec.inspect.StrType: "a string",
        msgspec.inspect.BoolType: "True or False",
        msgspec.inspect.ListType: "a list",
        msgspec.inspect.DictType: "a dict",
        msgspec.inspect.StructType: "a dict",
        msgspec.inspect.LiteralType: "one of",
    }
    parts = []
    t = field.type
    for member in t.types if isinstance(t, msgspec.inspect.UnionType) else (t,):
        if isinstance(member, msgspec.inspect.NoneType):
            continue
        if isinstance(member, msgspec.inspect.LiteralType):
            parts.append("one of " + ", ".join(repr(v) for v in member.values))
        else:
            parts.append(names.get(type(member), type(member).__name__))
    return " or ".join(parts)


def _canonical_key(key: Any, what: str, known: Mapping[str, Any]) -> str:
    if not isinstance(key, str):
        raise LMKernelConfigError(f"{what} keys must be strings, got {show(key)}")
    camel = snake_to_camel(key)
    if camel in known:
        return camel
    alias = _ALIASES.get(camel)
    hint = ""
    if alias in known:
        hint = f"; did you mean {alias!r}?"
    elif len(camel) <= 100:
        lowered = {k.lower(): k for k in known}
        close = difflib.get_close_matches(camel.lower(), lowered, n=1, cutoff=0.75)
        if close:
            hint = f"; did you mean {lowered[close[0]]!r}?"
    raise LMKernelConfigError(f"Unknown {what} key {show(key)}{hint} (known keys: {', '.join(sorted(known))})")


def _as_mapping(config: Any, struct: type[msgspec.Struct], what: str) -> Mapping[Any, Any]:
    if isinstance(config, struct):
        try:
            return msgspec.to_builtins(config)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LMKernelConfigError(f"{what} holds a value that is not plain data: {exc}") from None
    if not isinstance(config, Mapping):
        raise LMKernelConfigError(
            f"{what} must be a dict or {struct.__name__}, got {type(config).__name__}: {show(config)}"
        )
    return config


def _check_value(camel: str, value: Any, field: msgspec.inspect.Field, hint: Any, rule: _Rule | None, what: str) -> None:
    """Raise :class:`LMKernelConfigError` unless ``value`` has the key's type, crosses the wire and keeps its rule."""
    try:
        msgspec.convert(value, hint)
    except (msgspec.ValidationError, TypeError, ValueError, OverflowError, RecursionError):
        raise LMKernelConfigError(
            f"Invalid {what} value for {camel!r}: expected {_type_name(field)}, got {show(value)}"
        ) from None
    if (problem := wire_problem(value)) is not None:
        where, expected = problem
        where = where if len(where) <= 120 else "..." + where[-117:]
        raise LMKernelConfigError(f"Invalid {what} value for {camel!r}{where and ' at ' + where}: expected {expected}")
    if rule is not None and not rule[1](value):
        raise LMKernelConfigError(f"Invalid {what} value for {camel!r}: expected {rule[0]}, got {show(value)}")


#: The keys of a ``structured`` setting, in both spellings.
STRUCTURED_KEYS = {"type": "type", "jsonSchema": "jsonSchema", "json_schema": "jsonSchema",
                   "gbnfGrammar": "gbnfGrammar", "gbnf_grammar": "gbnfGrammar"}


def _structured_value(value: Any) -> Any:
    """A ``structured`` setting given as a dict, with its keys in camelCase (snake_case accepted, as LM Studio does)."""
    if not isinstance(value, Mapping):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        name = STRUCTURED_KEYS.get(key) if isinstance(key, str) else None
        if name is None:
            raise LMKernelConfigError(
                f"Unknown key {show(key)} in prediction config value for 'structured' "
                f"(its keys: type, jsonSchema, gbnfGrammar)")
        if name in out:
            raise LMKernelConfigError(f"prediction config value for 'structured' gives {name!r} twice")
        out[name] = item
    where = "Invalid prediction config value for 'structured'"
    if out.get("type") not in ("none", "json", "gbnf"):
        raise LMKernelConfigError(f"{where}: its type must be 'none', 'json' or 'gbnf', got {show(out.get('type'))}")
    if out.get("jsonSchema") is not None and not isinstance(out["jsonSchema"], Mapping):
        raise LMKernelConfigError(f"{where}: jsonSchema must be a JSON schema object (a dict), got {show(out['jsonSchema'])}")
    if out.get("gbnfGrammar") is not None and not isinstance(out["gbnfGrammar"], str):
        raise LMKernelConfigError(f"{where}: gbnfGrammar must be GBNF text (a string), got {show(out['gbnfGrammar'])}")
    return out


_NORMALIZE: dict[str, Callable[[Any], Any]] = {"structured": _structured_value}


def _parse(
    config: Any, struct: type[msgspec.Struct], rules: Mapping[str, _Rule], what: str
) -> Any:
    if config is None:
        return struct()
    config = _as_mapping(config, struct, what)
    fields = _fields(struct)
    hints = _hints(struct)
    values: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    for key, value in config.items():
        camel = _canonical_key(key, what, fields)
        if camel in seen:
            raise LMKernelConfigError(f"{what} key {camel!r} is given twice (as {show(key)} too)")
        seen[camel] = key
        if value is None:
            continue
        if camel in _NORMALIZE:
            value = _NORMALIZE[camel](value)
        field = fields[camel]
        _check_value(camel, value, field, hints[field.name], rules.get(camel), what)
        values[camel] = value
    try:
        return msgspec.convert(values, struct)
    except (msgspec.ValidationError, TypeError, ValueError, OverflowError) as exc:  # each value passed: a bug here
        raise LMKernelConfigError(f"Invalid {what}: {exc}") from None


def parse_prediction_config(config: Any) -> LlmPredictionConfig:
    """Validate a prediction config (dict or struct) and return it as a struct.

    Raises :class:`~lmkernel.LMKernelConfigError` for an unknown key (with the near match),
    a key given twice in both spellings, or a value of the wrong type or range.
    """
    return _parse(config, LlmPredictionConfig, _PREDICTION_RULES, "prediction config")


def parse_load_config(config: Any) -> LlmLoadModelConfig:
    """Validate a load config (dict or struct) and return it as a struct."""
    return _parse(config, LlmLoadModelConfig, _LOAD_RULES, "load config")


def set_keys(config: msgspec.Struct) -> set[str]:
    """Return the camelCase keys a config struct sets (its non-``None`` fields)."""
    return set(msgspec.to_builtins(config))
