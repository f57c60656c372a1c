"""Structured output's failures, each owned by its request: a schema or grammar that does not
compile, an engine that cannot constrain, one whose vocabulary breaks or which samples outside
the mask. The request ends with an error naming the problem; the engine is not replaced, a
prediction on another model carries on, and the next request succeeds.

The fault backend (``tests/faults``) is the real MLX backend with faults on command.
"""

from __future__ import annotations

import re

import pytest

import lmkernel as lms
from lmkernel.kernel._placement import check_supported
from lmkernel.kernel._structured import closed
from lmkernel.kernel.config import parse_prediction_config
from lmkernel.plugins.contract import Backend

from ..conftest import TINY
from .test_faults import FAULTY, Bystander, bounded, clear, expect_error, faults, inject  # noqa: F401 - fixture

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}


def structured_complete(key: str = FAULTY, schema: dict = SCHEMA, max_tokens: int = 40):
    return lms.llm(key).complete("the cat sat", response_format=schema,
                                 config={"temperature": 0, "maxTokens": max_tokens})


def healthy(key: str = FAULTY) -> None:
    """A constrained and a plain prediction succeed on ``key`` (its engine was not replaced or broken)."""
    result, _ = bounded(structured_complete, key, limit=60)
    assert isinstance(result, lms.PredictionResult), result
    assert result.stats.stop_reason == "eosFound" and isinstance(result.parsed["n"], int), result.content
    plain = lms.llm(key).complete("the cat", config={"temperature": 0, "maxTokens": 4})
    assert plain.stats.predicted_tokens_count >= 1


@pytest.mark.parametrize(("mode", "cls", "message"), [
    ("none", lms.LMKernelUnsupportedConfigError, "gives no vocabulary, so its output cannot be constrained"),
    ("raise", lms.LMKernelBackendError, "failed while describing its vocabulary model 'faulty': InjectedFault"),
    ("malformed", lms.LMKernelBackendError, "Engine.vocabulary() must return a Vocabulary or None, got 'not a"),
])
def test_an_engine_without_a_usable_vocabulary_fails_only_the_structured_request(faults, mode, cls, message):  # noqa: F811
    lms.llm(FAULTY).unload()  # a fresh engine: the vocabulary is read once per engine
    bystander = Bystander()
    inject(faults, "vocabulary", mode, times=100)
    outcome, _ = bounded(structured_complete, limit=60)
    expect_error(outcome, cls, message)
    plain = lms.llm(FAULTY).complete("the cat", config={"temperature": 0, "maxTokens": 4})  # the engine still serves
    assert plain.stats.predicted_tokens_count >= 1
    bystander.check()
    clear(faults)
    healthy()


def test_an_engine_that_samples_outside_the_mask_fails_that_prediction_only(faults):  # noqa: F811
    healthy()
    bystander = Bystander()
    inject(faults, "add", "unmasked")
    outcome, _ = bounded(structured_complete, limit=60)
    expect_error(outcome, lms.LMKernelBackendError, "failed while constraining its output model 'faulty'",
                 "which the grammar does not allow there")
    bystander.check()
    clear(faults)
    healthy()


@pytest.mark.parametrize(("structured", "message"), [
    ({"type": "json"}, 'structured output of type "json" needs a jsonSchema'),
    ({"type": "gbnf", "gbnfGrammar": " "}, 'structured output of type "gbnf" needs a gbnfGrammar'),
    ({"type": "gbnf", "gbnfGrammar": "root ::= item\n"}, "structured gbnfGrammar is not a valid GBNF grammar"),
    ({"type": "json", "jsonSchema": {"type": "string", "pattern": "(?=a)b"}}, "Invalid structured output setting"),
    ({"type": "json", "jsonSchema": {"$ref": "#/$defs/Missing"}}, "Invalid structured output setting"),
    ({"type": "gbnf", "gbnfGrammar": 'root ::= "a"\n' + "#" * 20_000},
     "structured gbnfGrammar is 20013 characters long; the limit is 20000"),
])
def test_a_setting_that_does_not_compile_is_the_requests_error_and_loses_nothing(structured, message):
    model = lms.llm(TINY)
    with pytest.raises(lms.LMKernelValueError, match=message):
        model.complete("x", config={"structured": structured, "maxTokens": 4})
    result = model.complete("x", response_format=SCHEMA, config={"temperature": 0, "maxTokens": 40})
    assert result.stats.stop_reason == "eosFound" and 0 <= result.parsed["n"] <= 9


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"type": "string", "pattern": "^a{1000000}$"}])
def test_a_grammar_that_gives_out_is_the_requests_error_and_nothing_it_did_not_allow_leaks(schema):
    model = lms.llm(TINY)
    stream = model.complete_stream("x", response_format=schema, config={"maxTokens": 10})
    fragments = []
    with pytest.raises(lms.LMKernelValueError, match="cannot be followed after 0 tokens: the schema or grammar "
                                                     "is too complex or cannot be satisfied"):
        for fragment in stream:
            fragments.append(fragment.content)
    assert fragments == []  # the token sampled once the grammar gave out never reaches the caller
    healthy(TINY)


@pytest.mark.parametrize(("config", "message"), [
    ({"type": "xml"}, "its type must be 'none', 'json' or 'gbnf', got 'xml'"),
    ({"type": "json", "jsonSchema": True}, "jsonSchema must be a JSON schema object (a dict), got True"),
    ({"type": "gbnf", "gbnfGrammar": 5}, "gbnfGrammar must be GBNF text (a string), got 5"),
])
def test_a_malformed_structured_value_says_what_is_wrong(config, message):
    with pytest.raises(lms.LMKernelConfigError, match=re.escape(message)):
        lms.llm(TINY).complete("x", config={"structured": config})


def test_a_backend_that_cannot_constrain_refuses_the_key_before_any_compute():
    class Plain(Backend):
        name = "plain"
        prediction_keys = frozenset({"temperature"})
        availability = describe = load = None  # type: ignore[assignment]

    config = parse_prediction_config({"structured": {"type": "json", "jsonSchema": SCHEMA}})
    with pytest.raises(lms.LMKernelUnsupportedConfigError,
                       match=r"Structured output \(response_format, or the config key 'structured'\) is not "
                             r"supported by backend 'plain' \(model 'm'\)"):
        check_supported(config, Plain(), "m")
    check_supported(parse_prediction_config({"structured": {"type": "none"}}), Plain(), "m")  # asks for nothing


def test_objects_allow_only_their_listed_keys_unless_the_schema_says_otherwise():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
                       "open": {"type": "object", "properties": {}, "additionalProperties": True},
                       "any": {"type": "object"}},
        "$defs": {"D": {"properties": {"x": {"enum": [{"properties": {}}]}}}},
        "items": [{"properties": {}}],
    }
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # a property named "properties" stays a property
    assert out["properties"]["open"]["additionalProperties"] is True
    assert "additionalProperties" not in out["properties"]["any"]  # {"type": "object"}: any object
    assert out["$defs"]["D"]["additionalProperties"] is False
    assert out["$defs"]["D"]["properties"]["x"]["enum"] == [{"properties": {}}]  # values are not schemas
    assert out["items"][0]["additionalProperties"] is False
    assert schema["properties"]["properties"] == {"type": "object", "properties": {"a": {"type": "integer"}}}


class _ByteTokens:
    """A vocabulary of the 256 bytes and an end token: grammars checked text by text, no model."""

    tokens = [bytes([i]) for i in range(256)] + [b"\xffend"]
    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


def accepts(schema: dict, text: str) -> bool:
    import llguidance

    from lmkernel.kernel._structured import grammar_for
    from lmkernel.kernel.config import LlmStructuredPredictionSetting

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokens()))
    setting = LlmStructuredPredictionSetting(type="json", json_schema=schema)
    matcher = llguidance.LLMatcher(tokenizer, grammar_for(setting), log_level=0)
    return all(matcher.consume_token(b) for b in text.encode()) and matcher.is_accepting()


def test_composed_schemas_stay_open_where_they_compose():
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                      {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert accepts(both, '{"a": 1, "b": 2}')
    based = {"$defs": {"Base": {"type": "object", "properties": {"id": {"type": "integer"}}}},
             "allOf": [{"$ref": "#/$defs/Base"}], "properties": {"name": {"type": "string"}}}
    assert accepts(based, '{"id": 1, "name": "x"}')
    assert not accepts({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a": 1, "b": 2}')


def test_exclusive_bounds_exclude_their_value():
    assert not accepts({"type": "number", "exclusiveMinimum": 3, "maximum": 10}, "3")
    assert not accepts({"type": "number", "minimum": 3, "exclusiveMaximum": 3.5}, "3.5")
    assert not accepts({"type": "integer", "exclusiveMinimum": 3, "maximum": 4}, "3")
    assert accepts({"type": "number", "exclusiveMinimum": 3, "maximum": 3.5}, "3.25")


@pytest.mark.xfail(strict=True, reason="llguidance 1.9.1: an exclusive whole-number minimum under an upper bound "
                                       "less than 1 above it lets the minimum itself through (not reported upstream "
                                       "yet: no network here); strict, so a fixed llguidance shows up here")
def test_a_narrow_range_above_an_exclusive_whole_minimum_excludes_it():
    assert not accepts({"type": "number", "exclusiveMinimum": 3, "maximum": 3.5}, "3")
