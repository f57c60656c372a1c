"""Fuzz the in-process API's configs, prompts and keys (issue 9): every call succeeds or raises
an ``LMKernelError``, never another exception type, and the kernel keeps serving.

Hypothesis draws config dicts of every shape (known keys, their snake_case and alias
spellings, random keys; integers beyond 64 bits, NaN, infinities, lone surrogates, bytes,
nested junk, long strings) and model keys of any length or character. Bounded: a fixed
number of examples per property, derandomized so that a run is repeatable, under a
minute in all. The in-process transport only: the server protocols have their own fuzz.
"""

from __future__ import annotations

from types import MappingProxyType

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import lmkernel as lms
from lmkernel._struct import snake_to_camel
from lmkernel.kernel import messages as m
from lmkernel.kernel.config import (
    LlmLoadModelConfig,
    LlmPredictionConfig,
    parse_load_config,
    parse_prediction_config,
)

from ..conftest import TINY


@pytest.fixture(scope="module", autouse=True)
def transport():
    """In-process only (overrides the SDK suite's in-process/server parametrization)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LMKERNEL_API_HOST", raising=False)
        lms.sync_api._reset_default_client()
        yield "in-process"
        lms.sync_api._reset_default_client()


FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---- strategies ---------------------------------------------------------------------------

CHARS = st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udcff", "\x00", "/", "~", ".", "é", " "])
TEXT = st.text(CHARS, max_size=12)
LONG_TEXT = st.sampled_from(["y" * 300, "a/" + "b" * 256, "é" * 3000, "x" * 10_000])
HUGE_INTS = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 2**70, -(2**70), 10**400])
NUMBERS = st.integers(-3, 3) | st.integers() | HUGE_INTS | st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT | LONG_TEXT | st.binary(max_size=4)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner)
        | st.dictionaries(TEXT | st.integers(0, 3), inner, max_size=3)
        | st.builds(MappingProxyType, st.dictionaries(TEXT, inner, max_size=2))  # a Mapping msgpack cannot encode
    ),
    max_leaves=6,
)

# Values near each key's rules, so that many drawn configs are valid and really run.
_SAMPLER = st.floats(-0.5, 1.5) | st.just(False) | st.sampled_from([0, 1, 0.0, 1.0])
PLAUSIBLE = {
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 1e308, 5e-324]),
    "topKSampling": st.integers(-2, 3000) | st.sampled_from([40.0, 40.5, 2**31 - 1, 10**6, 10**12]),
    "topPSampling": _SAMPLER,
    "minPSampling": _SAMPLER,
    "repeatPenalty": st.floats(-0.5, 3) | st.just(False) | st.sampled_from([1e308]),
    "stopStrings": st.lists(TEXT, max_size=3),
    "contextOverflowPolicy": st.sampled_from(["stopAtLimit", "truncateMiddle", "rollingWindow", "bad"]),
    "cpuThreads": st.integers(-1, 4) | HUGE_INTS,
    "draftModel": TEXT,
    "rawTools": st.dictionaries(TEXT, JUNK, max_size=2),
}
PLAUSIBLE_LOAD = {
    "contextLength": st.integers(-1, 5000) | HUGE_INTS,
    "seed": st.integers(-2, 2**64) | HUGE_INTS,
    "evalBatchSize": st.integers(-1, 600),
    "maxConcurrentPredictions": st.integers(-1, 40) | HUGE_INTS,
    "maxQueuedPredictions": st.integers(-1, 300),
    "ropeFrequencyBase": st.floats(allow_nan=True),
    "gpu": st.dictionaries(TEXT, JUNK, max_size=2),
    "backend": st.sampled_from(["mlx", "exllamav2", "nope", "", "\ud800"]),
}


def _spellings(struct: type[msgspec.Struct]) -> list[str]:
    fields = msgspec.inspect.type_info(struct).fields
    return [f.encode_name for f in fields] + [f.name for f in fields]


def configs(struct: type[msgspec.Struct], plausible: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    keys = st.sampled_from(_spellings(struct) + ["maxNewTokens", "topK", "stop", "raw", "max_tokenz"]) | TEXT | LONG_TEXT
    junk = st.dictionaries(keys, JUNK, max_size=4)
    near = st.fixed_dictionaries({}, optional=plausible)
    return near | junk | st.builds(lambda a, b: {**a, **b}, near, junk)


PREDICTION_CONFIGS = configs(LlmPredictionConfig, PLAUSIBLE)


def _or_off(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.just(False) | values


# Configs within every rule and honoured by the MLX backend: these run on the engine.
RUNNABLE_CONFIGS = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e308]),
    "topKSampling": st.integers(0, 3000) | st.sampled_from([-1, 40.0, 2**31 - 1, 10**6]),
    "topPSampling": _or_off(st.floats(1e-9, 1)),
    "minPSampling": _or_off(st.floats(0, 1)),
    "repeatPenalty": _or_off(st.floats(1e-3, 10) | st.just(1e308)),
    "stopStrings": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "contextOverflowPolicy": st.just("stopAtLimit"),
})
LOAD_CONFIGS = configs(LlmLoadModelConfig, PLAUSIBLE_LOAD)
MODEL_KEYS = (
    TEXT
    | LONG_TEXT
    | st.sampled_from(["", "\0", "a\0b", "\ud800", "~", "~nosuchuser/x", "~root", "/", ".", "..", "aa", "aa/", "aa//tiny",
                       "aa/tiny/", "aa/tiny\0", "TINY", "/definitely/not/here", "/proc/self", "a" * 255, "a" * 256])
    | st.builds(lambda a, b: f"{a}/{b}", TEXT, TEXT)
)


# ---- properties ---------------------------------------------------------------------------


def _clean_error(exc: BaseException) -> None:
    """An error the API may raise: an lmkernel error with a short, printable message."""
    assert isinstance(exc, lms.LMKernelError), f"{type(exc).__name__}: {exc}"
    event(type(exc).__name__)  # --hypothesis-show-statistics tells how often each outcome came
    assert len(str(exc)) < 3000


def _still_serves() -> None:
    result = lms.llm(TINY).complete("The", config={"maxTokens": 3, "temperature": 0})
    assert result.stats.predicted_tokens_count == 3


@settings(FUZZ, max_examples=400)
@given(PREDICTION_CONFIGS)
def test_parse_prediction_config_accepts_only_what_crosses_the_wire(config):
    try:
        parsed = parse_prediction_config(config)
    except Exception as exc:  # noqa: BLE001 - the property: only lmkernel errors
        _clean_error(exc)
        return
    m.encode(m.Predict(id=1, model="x", prompt="p", config=parsed.to_dict()))
    assert parse_prediction_config(parsed.to_dict()) == parsed


@settings(FUZZ, max_examples=300)
@given(LOAD_CONFIGS)
def test_parse_load_config_accepts_only_what_crosses_the_wire(config):
    try:
        parsed = parse_load_config(config)
    except Exception as exc:  # noqa: BLE001
        _clean_error(exc)
        return
    m.encode(m.Load(id=1, model="x", config=parsed.to_dict()))
    assert parse_load_config(parsed.to_dict()) == parsed


def _with_small_budget(config: dict) -> dict:
    kept = {k: v for k, v in config.items() if not (isinstance(k, str) and snake_to_camel(k) in ("maxTokens", "maxNewTokens"))}
    return {**kept, "maxTokens": 2}


@settings(FUZZ, max_examples=150)
@given(prompt=st.sampled_from(["The cat sat on the", "", " "]) | TEXT, config=RUNNABLE_CONFIGS | PREDICTION_CONFIGS)
def test_complete_with_any_config_succeeds_or_raises_an_lmkernel_error(prompt, config):
    model = lms.llm(TINY)
    try:
        result = model.complete(prompt, config=_with_small_budget(config))
    except Exception as exc:  # noqa: BLE001
        _clean_error(exc)
    else:
        assert result.stats.predicted_tokens_count <= 2
        event("completed")


@settings(FUZZ, max_examples=60)
@given(st.one_of(TEXT, LONG_TEXT, st.lists(TEXT | st.integers(), max_size=3), JUNK))
def test_tokenize_anything_succeeds_or_raises_an_lmkernel_error(text):
    try:
        lms.llm(TINY).tokenize(text)
    except Exception as exc:  # noqa: BLE001
        _clean_error(exc)


@settings(FUZZ, max_examples=150)
@given(key=MODEL_KEYS, ttl=st.sampled_from([None, 3600]) | NUMBERS, config=st.none() | LOAD_CONFIGS)
def test_llm_with_any_key_succeeds_or_raises_an_lmkernel_error(fresh_kernel, key, ttl, config):
    try:
        lms.llm(key, ttl=ttl, config=config)
    except Exception as exc:  # noqa: BLE001
        _clean_error(exc)
    else:
        event("loaded")


def test_the_kernel_still_serves_after_the_fuzz(fresh_kernel):
    _still_serves()
