"""Validation closes its holes (issue 9): ranges and finiteness for every numeric key, values
that cross the wire, valid Unicode at the SDK boundary, declared keys that reach the engine.

The config rules are unit tests of the parser; the reproductions from the issue run through
``import lmkernel as lms`` on the tiny test model, and each ends by showing the model still
serves.
"""

from __future__ import annotations

from types import MappingProxyType

import msgspec
import pytest

import lmkernel as lms
from lmkernel.kernel import messages as m
from lmkernel.kernel._prediction import (
    DEFAULT_SAMPLING,
    effective_config,
    sampling_from_config,
)
from lmkernel.kernel.config import (
    MAX_NESTING,
    parse_load_config,
    parse_prediction_config,
    wire_problem,
)
from lmkernel.plugins.contract import Sampling

from ..conftest import TINY

TOP_K_RULE = "expected a whole number from 0 to 2147483647 (0 or -1 disables top-k)"
INT64_RULE = "expected an integer that fits in 64 bits (-2**63 to 2**63-1)"


def _pred(key: str) -> str:
    return f"Invalid prediction config value for {key!r}: "


def _load(key: str) -> str:
    return f"Invalid load config value for {key!r}: "


PREDICTION_ERRORS = [
    ({"topKSampling": float("inf")}, _pred("topKSampling") + "expected a finite number, got inf"),
    ({"topKSampling": float("-inf")}, _pred("topKSampling") + "expected a finite number, got -inf"),
    ({"topKSampling": float("nan")}, _pred("topKSampling") + "expected a finite number, got nan"),
    ({"topKSampling": 10**12}, _pred("topKSampling") + TOP_K_RULE + ", got 1000000000000"),
    ({"topKSampling": 2**31}, _pred("topKSampling") + TOP_K_RULE + ", got 2147483648"),
    ({"topKSampling": 40.5}, _pred("topKSampling") + TOP_K_RULE + ", got 40.5"),
    ({"topKSampling": -2}, _pred("topKSampling") + TOP_K_RULE + ", got -2"),
    ({"topKSampling": True}, _pred("topKSampling") + "expected a number, got True"),
    ({"topKSampling": 2**70}, _pred("topKSampling") + INT64_RULE + ", got 1180591620717411303424"),
    ({"maxTokens": 2**70}, _pred("maxTokens") + INT64_RULE + ", got 1180591620717411303424"),
    ({"maxTokens": -(2**64)}, _pred("maxTokens") + INT64_RULE + ", got -18446744073709551616"),
    ({"maxTokens": 10**5000}, _pred("maxTokens") + INT64_RULE + ", got <an integer of 16610 bits>"),
    ({"maxTokens": 3.0}, _pred("maxTokens") + "expected an integer or True or False, got 3.0"),
    ({"temperature": float("nan")}, _pred("temperature") + "expected a finite number, got nan"),
    ({"temperature": float("inf")}, _pred("temperature") + "expected a finite number, got inf"),
    ({"temperature": 10**400}, _pred("temperature") + "expected a number, got 100000000000000000...0000000000000000000"),
    ({"temperature": True}, _pred("temperature") + "expected a number, got True"),
    ({"topPSampling": float("nan")}, _pred("topPSampling") + "expected a finite number, got nan"),
    ({"topPSampling": 0}, _pred("topPSampling") + "expected a number in (0, 1], or False, got 0"),
    ({"minPSampling": True}, _pred("minPSampling") + "expected a number in [0, 1], or False, got True"),
    ({"minPSampling": float("-inf")}, _pred("minPSampling") + "expected a finite number, got -inf"),
    ({"repeatPenalty": float("inf")}, _pred("repeatPenalty") + "expected a finite number, got inf"),
    ({"repeatPenalty": 0}, _pred("repeatPenalty") + "expected a finite number > 0, or False, got 0"),
    ({"cpuThreads": 2**31}, _pred("cpuThreads") + "expected an integer from 1 to 2147483647, got 2147483648"),
    ({"cpuThreads": 0}, _pred("cpuThreads") + "expected an integer from 1 to 2147483647, got 0"),
    ({"speculativeDecodingNumDraftTokensExact": 0},
     _pred("speculativeDecodingNumDraftTokensExact") + "expected an integer from 1 to 2147483647, got 0"),
    ({"speculativeDecodingMinDraftLengthToConsider": -1},
     _pred("speculativeDecodingMinDraftLengthToConsider") + "expected an integer from 0 to 2147483647, got -1"),
    ({"speculativeDecodingMinContinueDraftingProbability": 1.5},
     _pred("speculativeDecodingMinContinueDraftingProbability") + "expected a number in [0, 1], got 1.5"),
    ({"draftModel": ""}, _pred("draftModel") + "expected a non-empty string, got ''"),
    ({"stopStrings": ["ok", "\ud800"]},
     _pred("stopStrings")[:-2] + " at [1]: expected valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
    ({"stopStrings": ["ok", ""]}, _pred("stopStrings") + "expected a list of non-empty strings, got ['ok', '']"),
    ({"rawTools": {"tools": [{"x": float("nan")}]}},
     _pred("rawTools")[:-2] + " at ['tools'][0]['x']: expected a finite number, got nan"),
    ({"rawTools": {"n": 2**64}}, _pred("rawTools")[:-2] + " at ['n']: " + INT64_RULE + ", got 18446744073709551616"),
    ({"rawTools": {"\udcff": 1}},
     _pred("rawTools")[:-2] + ": expected keys in valid Unicode, got '\\udcff' (lone surrogate '\\udcff' at index 0)"),
    ({"promptTemplate": {"a": b"x"}},
     _pred("promptTemplate")[:-2] + " at ['a']: expected plain data (None, bool, int, float, str, list, dict), got bytes b'x'"),
    ({"promptTemplate": {"a": MappingProxyType({"b": 1})}},
     _pred("promptTemplate")[:-2] + " at ['a']: expected plain data (None, bool, int, float, str, list, dict), got mappingproxy "),
    ({"promptTemplate": {"a": {1, 2}}},
     _pred("promptTemplate")[:-2] + " at ['a']: expected plain data (None, bool, int, float, str, list, dict), got set {1, 2}"),
    ({"structured": {"type": "json", "jsonSchema": {"maximum": float("inf")}}},
     _pred("structured")[:-2] + " at ['jsonSchema']['maximum']: expected a finite number, got inf"),
    ({"\ud800": 1}, "Unknown prediction config key '\\ud800' (known keys:"),
    ({"y" * 300: 1}, "Unknown prediction config key 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy...yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy' (known keys:"),
    ({"maxTokens": None, "max_tokens": 3}, "prediction config key 'maxTokens' is given twice (as 'max_tokens' too)"),
    (lms.LlmPredictionConfig(temperature=float("nan")), _pred("temperature") + "expected a finite number, got nan"),
    (lms.LlmPredictionConfig(top_k_sampling=float("inf")), _pred("topKSampling") + "expected a finite number, got inf"),
]

LOAD_ERRORS = [
    ({"seed": -1}, _load("seed") + "expected an integer from 0 to 9223372036854775807, got -1"),
    ({"seed": 2**64}, _load("seed") + INT64_RULE + ", got 18446744073709551616"),
    ({"seed": True}, _load("seed") + "expected an integer, got True"),
    ({"contextLength": 2**31}, _load("contextLength") + "expected an integer from 1 to 2147483647, got 2147483648"),
    ({"contextLength": float("inf")}, _load("contextLength") + "expected an integer, got inf"),
    ({"contextLength": 2**70}, _load("contextLength") + INT64_RULE + ", got 1180591620717411303424"),
    ({"evalBatchSize": 0}, _load("evalBatchSize") + "expected an integer from 1 to 2147483647, got 0"),
    ({"numExperts": 2**40}, _load("numExperts") + "expected an integer from 1 to 2147483647, got 1099511627776"),
    ({"maxConcurrentPredictions": 2**40},
     _load("maxConcurrentPredictions") + "expected an integer from 1 to 2147483647, got 1099511627776"),
    ({"maxQueuedPredictions": -1}, _load("maxQueuedPredictions") + "expected an integer from 0 to 2147483647, got -1"),
    ({"ropeFrequencyBase": float("nan")}, _load("ropeFrequencyBase") + "expected a finite number, got nan"),
    ({"ropeFrequencyScale": -1.0}, _load("ropeFrequencyScale") + "expected a finite number >= 0 (0: the model's own), got -1.0"),
    ({"gpu": {"ratio": float("inf")}}, _load("gpu")[:-2] + " at ['ratio']: expected a finite number, got inf"),
    ({"backend": ""}, _load("backend") + "expected a non-empty string, got ''"),
    ({"backend": "\udcff"}, _load("backend") + "expected valid Unicode text, got '\\udcff' (lone surrogate '\\udcff' at index 0)"),
    ({"llamaKCacheQuantizationType": "\ud800x"},
     _load("llamaKCacheQuantizationType") + "expected valid Unicode text, got '\\ud800x' (lone surrogate '\\ud800' at index 0)"),
]


@pytest.mark.parametrize(("config", "message"), PREDICTION_ERRORS)
def test_prediction_config_rules(config, message):
    with pytest.raises(lms.LMKernelConfigError) as info:
        parse_prediction_config(config)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("config", "message"), LOAD_ERRORS)
def test_load_config_rules(config, message):
    with pytest.raises(lms.LMKernelConfigError) as info:
        parse_load_config(config)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "config",
    [
        {"topKSampling": 40.0}, {"topKSampling": 0}, {"topKSampling": -1}, {"topKSampling": 2**31 - 1},
        {"maxTokens": 2**63 - 1}, {"maxTokens": -1}, {"maxTokens": False},
        {"temperature": 1e308, "repeatPenalty": 1e308, "topPSampling": 5e-324, "minPSampling": 1.0},
        {"topPSampling": False, "minPSampling": False, "repeatPenalty": False},
        {"rawTools": {"tools": [{"name": "f", "n": -(2**63), "x": 1.5, "ok": True, "none": None}]}},
        {"stopStrings": ["\u00e9", "\U0001f600", "\x00"]},
    ],
)
def test_values_within_the_rules_pass_and_cross_the_wire(config):
    parsed = parse_prediction_config(config)
    msgspec.msgpack.encode(m.Predict(id=1, model="x", prompt="p", config=parsed.to_dict()))
    assert parse_prediction_config(parsed) == parsed


@pytest.mark.parametrize("config", [{"seed": 0}, {"seed": 2**63 - 1}, {"contextLength": 2**31 - 1, "ropeFrequencyBase": 0}])
def test_load_values_within_the_rules_pass(config):
    assert parse_load_config(config).to_dict() == config


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_nesting_is_bounded_and_cycles_end():
    assert wire_problem(_nested(MAX_NESTING)) is None
    where, rule = wire_problem(_nested(MAX_NESTING + 1))
    assert rule == "at most 32 levels of nested lists and dicts" and where == "[0]" * MAX_NESTING
    cycle: dict = {}
    cycle["a"] = cycle
    with pytest.raises(lms.LMKernelConfigError, match="expected at most 32 levels of nested lists and dicts"):
        parse_prediction_config({"rawTools": cycle})


def test_struct_holding_junk_is_a_config_error():
    with pytest.raises(lms.LMKernelConfigError, match="prediction config holds a value that is not plain data"):
        parse_prediction_config(lms.LlmPredictionConfig(temperature=object()))


# ---- declared keys reach the engine -----------------------------------------------------


def test_declared_prediction_keys_reach_the_engine_in_sampling_extra():
    config = parse_prediction_config(
        {"maxTokens": 3, "temperature": 0.5, "cpuThreads": 4, "draftModel": "d", "stopStrings": ["x"], "topKSampling": 7}
    )
    assert sampling_from_config(config).extra == {}
    declared = frozenset({"cpuThreads", "temperature", "topKSampling", "maxTokens", "stopStrings"})
    sampling = sampling_from_config(config, declared)
    assert dict(sampling.extra) == {"cpuThreads": 4}  # not draftModel (undeclared), not kernel or Sampling keys
    assert (sampling.temperature, sampling.top_k) == (0.5, 7)
    assert effective_config(config, sampling)["cpuThreads"] == 4


def test_sampling_stays_frozen_hashable_and_comparable():
    a, b = Sampling(extra={"k": [1]}), Sampling(extra={"k": [1]})
    assert a == b and hash(a) == hash(b) and a != Sampling()
    assert hash(Sampling(temperature=0)) == hash(Sampling(temperature=0))
    with pytest.raises(TypeError):
        a.extra["k"] = 2  # read-only
    assert DEFAULT_SAMPLING.extra == {}


def test_top_k_maps_to_an_int_and_minus_one_is_off():
    assert sampling_from_config(parse_prediction_config({"topKSampling": 40.0})).top_k == 40
    assert sampling_from_config(parse_prediction_config({"topKSampling": -1})).top_k == 0


# ---- the reproductions, in-process ------------------------------------------------


def _still_serves(model) -> None:
    result = model.complete("The", config={"maxTokens": 3, "temperature": 0})
    assert result.stats.predicted_tokens_count == 3


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"topKSampling": float("inf")}, _pred("topKSampling") + "expected a finite number, got inf"),
        ({"topKSampling": 10**12}, _pred("topKSampling") + TOP_K_RULE + ", got 1000000000000"),
        ({"maxTokens": 2**70}, _pred("maxTokens") + INT64_RULE + ", got 1180591620717411303424"),
        ({"stopStrings": ["\ud800"]},
         _pred("stopStrings")[:-2] + " at [0]: expected valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
    ],
)
def test_complete_refuses_values_that_used_to_crash(tiny_model, config, message):
    with pytest.raises(lms.LMKernelConfigError) as info:
        tiny_model.complete("x", config=config)
    assert str(info.value) == message
    _still_serves(tiny_model)


def test_top_k_beyond_the_vocabulary_is_off_and_does_not_poison_the_model(tiny_model):
    def ends_normally(result) -> None:  # sampled at temperature 1: a random model may draw its end token
        stats = result.stats
        assert (stats.stop_reason, stats.predicted_tokens_count) == ("maxPredictedTokensReached", 4) \
            or (stats.stop_reason == "eosFound" and stats.predicted_tokens_count < 4), stats

    for top_k in (10**6, 2**31 - 1):
        ends_normally(tiny_model.complete("The", config={"topKSampling": top_k, "temperature": 1.0, "maxTokens": 4}))
    ends_normally(tiny_model.complete("The", config={"temperature": 1.0, "maxTokens": 4}))  # the default top-k
    _still_serves(tiny_model)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda model: model.complete("\ud800"),
         "The prompt must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (lambda model: model.complete_stream("ok \udcff"),
         "The prompt must be valid Unicode text, got 'ok \\udcff' (lone surrogate '\\udcff' at index 3)"),
        (lambda model: model.tokenize("\ud800"),
         "The text to tokenize must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (lambda model: model.tokenize(["a", "\ud800"]),
         "Text 1 to tokenize must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (lambda model: model.tokenize(5), "tokenize() takes a string or an iterable of strings, got 5"),
        (lambda model: lms.llm("\ud800"),
         "A model key must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (lambda model: lms.llm(""), "A model key must be a non-empty string, got ''"),
        (lambda model: lms.llm(TINY, ttl=float("nan")),
         "ttl must be a positive number of seconds or None, got nan (finite, at most 2**63-1; None: never unload for idleness)"),
        (lambda model: lms.llm(TINY, ttl=float("inf")), "ttl must be a positive number of seconds or None, got inf"),
        (lambda model: lms.llm(TINY, ttl=2**70), "ttl must be a positive number of seconds or None, got 1180591620717411303424"),
        (lambda model: lms.llm(TINY, ttl=True), "ttl must be a positive number of seconds or None, got True"),
        (lambda model: lms.Client().llm.load_new_instance(TINY, "\ud800"),
         "An instance identifier must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (lambda model: lms.Client().llm.unload("\ud800"),
         "A model identifier must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (lambda model: lms.Client().llm.get_model_info(5), "A model identifier must be a string, got int: 5"),
    ],
)
def test_sdk_refuses_invalid_text_before_encoding(tiny_model, call, message):
    with pytest.raises(lms.LMKernelValueError) as info:
        call(tiny_model)
    assert str(info.value).startswith(message)
    _still_serves(tiny_model)


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        ("y" * 300, lms.LMKernelModelNotFoundError,
         ("No model matches the key 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy...yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy': a model key"
          " or path is at most 4096 bytes with at most 255 bytes between slashes (this one: 300 bytes, longest part 300)")),
        ("~nosuchuser/x", lms.LMKernelModelNotFoundError, "No model folder at '~nosuchuser/x': the path does not exist"),
        ("a\0b", lms.LMKernelValueError, "A model key cannot contain a NUL character, got 'a\\x00b'"),
    ],
)
def test_odd_keys_are_not_found_and_the_kernel_lives(tiny_model, key, error, message):
    with pytest.raises(error) as info:
        lms.llm(key)
    assert str(info.value).startswith(message)
    _still_serves(tiny_model)
    _still_serves(lms.llm(TINY))


def test_load_config_out_of_range_is_refused_before_loading(tiny_model):
    with pytest.raises(lms.LMKernelConfigError, match=r"'seed': expected an integer from 0 to 9223372036854775807, got -1"):
        lms.Client().llm.load_new_instance(TINY, config={"seed": -1})
    with pytest.raises(lms.LMKernelConfigError, match=r"'contextLength': expected an integer that fits in 64 bits"):
        lms.llm(TINY, config={"contextLength": 2**64})
    _still_serves(tiny_model)


def test_exllamav2_turns_a_top_k_as_large_as_the_vocabulary_off():
    """The ExLlamaV2 engine's sampling mapping, on CPU: a fake library records each job's settings."""
    from types import SimpleNamespace

    from lmkernel.backends.exllamav2._engine import ExLlamaV2Engine

    jobs: list[dict] = []
    lib = {
        "Sampler": SimpleNamespace(Settings=SimpleNamespace),
        "torch": SimpleNamespace(long="long", tensor=lambda data, dtype=None: data),
        "Job": lambda **kw: jobs.append(kw) or kw,
    }
    engine = ExLlamaV2Engine.__new__(ExLlamaV2Engine)  # no GPU: only what add() touches
    engine._lib, engine.eos_ids, engine._jobs = lib, [0], {}
    engine.model = SimpleNamespace(config=SimpleNamespace(vocab_size=100))
    engine.generator = SimpleNamespace(enqueue=lambda job: None)
    engine.tokenizer = SimpleNamespace(decode=lambda ids, decode_special_tokens=False: " ".join(map(str, ids)))
    for seq_id, (sampling, top_k) in enumerate([
        (Sampling(temperature=1.0, top_k=10**6), 0),
        (Sampling(temperature=1.0, top_k=100), 0),
        (Sampling(temperature=1.0, top_k=99), 99),
        (Sampling(temperature=0.0, top_k=10**6), 1),  # greedy: top-1
    ]):
        engine.add(seq_id, [1, 2], sampling, 5)
        assert jobs[-1]["gen_settings"].top_k == top_k


def test_engine_text_must_be_valid_unicode():
    """A lone surrogate cannot be encoded for the caller: the engine's malformed event, caught at the boundary."""
    from lmkernel.kernel._boundary import PluginValueError, check_events
    from lmkernel.plugins import SequenceEnd, Token

    for event in (Token(1, 5, "ok \ud83d"), SequenceEnd(1, "eos", "\udc00")):
        with pytest.raises(PluginValueError, match="step\\(\\) returned a malformed event"):
            check_events([event], {1})
    assert check_events([Token(1, 5, "😀 ok")], {1})
