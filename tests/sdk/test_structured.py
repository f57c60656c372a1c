"""Structured output through the SDK: every form LM Studio's SDK accepts, and ``parsed`` as it defines it.

Each form once, on the tiny random-weight model (its output is whatever the grammar forces:
the checks validate it against the schema, so a wrong mask or a lost form fails them), in
process and through ``lmkernel serve`` (the ``transport`` fixture).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import jsonschema
import msgspec
import pydantic
import pytest

import lmkernel as lms

from ..conftest import TINY

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}
GREEDY = {"temperature": 0, "maxTokens": 600}  # a random model may fill each whitespace slot


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)


class Pet(lms.BaseModel):
    kind: Annotated[str, msgspec.Meta(max_length=8)]
    legs: Annotated[int, msgspec.Meta(ge=0, le=8)]


def valid(result: lms.PredictionResult, schema: dict) -> dict:
    """``result`` is complete structured output: ``parsed`` is its text's JSON, valid under ``schema``."""
    assert result.stats.stop_reason == "eosFound", (result.stats.stop_reason, result.content)
    assert result.structured and result.parsed == json.loads(result.content)
    jsonschema.validate(result.parsed, schema)
    assert str(result) == json.dumps(result.parsed, indent=2, sort_keys=True)
    return result.parsed


@pytest.mark.parametrize("response_format", [
    SCHEMA,
    {"type": "json", "jsonSchema": SCHEMA},
    {"type": "json", "json_schema": SCHEMA},
    lms.LlmStructuredPredictionSetting(type="json", json_schema=SCHEMA),
], ids=["schema-dict", "setting-dict", "setting-dict-snake", "setting-object"])
def test_response_format_forms(tiny_model, response_format):
    parsed = valid(tiny_model.complete("x", response_format=response_format, config=GREEDY), SCHEMA)
    assert set(parsed) == {"name", "age", "tags"}  # only the listed keys: the schema says nothing of others


@pytest.mark.parametrize("config", [
    {"structured": {"type": "json", "jsonSchema": SCHEMA}, **GREEDY},
    {"structured": {"type": "json", "json_schema": SCHEMA}, "temperature": 0, "max_tokens": 600},
    lms.LlmPredictionConfig(structured=lms.LlmStructuredPredictionSetting(type="json", json_schema=SCHEMA),
                            temperature=0, max_tokens=600),
], ids=["camel", "snake", "struct"])
def test_the_structured_config_key(tiny_model, config):
    valid(tiny_model.complete("x", config=config), SCHEMA)


def test_model_classes_pydantic_and_lmstudio_base_model(tiny_model):
    person = Person(**valid(tiny_model.complete("x", response_format=Person, config=GREEDY),
                            Person.model_json_schema()))
    assert 0 <= person.age <= 120
    pet = valid(tiny_model.complete("x", response_format=Pet, config=GREEDY), Pet.model_json_schema())
    assert set(pet) == {"kind", "legs"} and isinstance(pet["legs"], int)


def test_streamed_fragments_are_the_json_text(tiny_model):
    stream = tiny_model.complete_stream("x", response_format=SCHEMA, config=GREEDY)
    text = "".join(fragment.content for fragment in stream)
    result = stream.result()
    assert text == result.content
    valid(result, SCHEMA)


@pytest.mark.parametrize("setting", [
    lms.LlmStructuredPredictionSetting(type="gbnf", gbnf_grammar='root ::= "yes" | "no"'),
    {"type": "gbnf", "gbnfGrammar": 'root ::= "yes" | "no"'},
    {"type": "gbnf", "gbnf_grammar": 'root ::= "yes" | "no"'},
])
def test_a_gbnf_grammar_whose_text_is_not_json_keeps_parsed_as_the_text(tiny_model, setting):
    result = tiny_model.complete("x", response_format=setting, config={"temperature": 0.9, "maxTokens": 20})
    assert result.content in ("yes", "no") and result.stats.stop_reason == "eosFound"
    assert result.parsed is result.content and not result.structured  # as LM Studio: JSON objects only


def test_a_gbnf_grammar_of_json_objects_is_parsed(tiny_model):
    grammar = 'root ::= "{\\"ok\\": " ("true" | "false") "}"'
    result = tiny_model.complete("x", config={"structured": {"type": "gbnf", "gbnfGrammar": grammar}, **GREEDY})
    assert result.parsed in ({"ok": True}, {"ok": False}) and result.structured


def test_max_tokens_cut_keeps_the_text_and_parses_nothing(tiny_model):
    long = {"type": "array", "items": {"type": "string", "minLength": 20, "maxLength": 20}, "minItems": 5}
    result = tiny_model.complete("x", response_format=long, config={"temperature": 0, "maxTokens": 12})
    assert result.stats.stop_reason == "maxPredictedTokensReached"
    assert result.content.startswith('[') and result.stats.predicted_tokens_count == 12
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.content)
    assert result.parsed is result.content and not result.structured


def test_a_json_value_that_is_not_an_object_stays_text(tiny_model):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 3}
    result = tiny_model.complete("x", response_format=schema, config=GREEDY)
    assert result.stats.stop_reason == "eosFound"
    jsonschema.validate(json.loads(result.content), schema)
    assert result.parsed is result.content  # LM Studio parses JSON objects only


def test_cancelled_structured_output_is_not_parsed(tiny_model):
    stream = tiny_model.complete_stream("x", response_format={"type": "object"},
                                        config={"temperature": 1.0, "maxTokens": 400})
    for i, _ in enumerate(stream):
        if i == 1:
            stream.cancel()
    result = stream.result()
    assert result.stats.stop_reason == "userStopped" and result.parsed is result.content


@pytest.mark.parametrize(("response_format", "config", "error", "message"), [
    (SCHEMA, {"structured": {"type": "none"}}, lms.LMKernelValueError,
     "Cannot specify both 'response_format' in API call and 'structured' in config"),
    (42, None, lms.LMKernelValueError, "Failed to parse response format: expected a JSON schema dict"),
    (int, None, lms.LMKernelValueError, "response_format class int has no model_json_schema()"),
    ({"type": "json", "jsonSchema": "{}"}, None, lms.LMKernelConfigError,
     "Invalid prediction config value for 'structured'"),
    ({"type": "xml"}, None, lms.LMKernelValueError, "Invalid structured output setting"),
    ({"type": "json", "jsonSchema": {}, "strict": True}, None, lms.LMKernelValueError,
     "is a structured setting, whose keys are type, jsonSchema and gbnfGrammar; unknown key(s): strict"),
])
def test_a_bad_response_format_raises_before_any_compute(tiny_model, response_format, config, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model.complete("x", response_format=response_format, config=config)


def test_structured_none_is_plain_text(tiny_model):
    result = tiny_model.complete("x", response_format={"type": "none"}, config={"temperature": 0, "maxTokens": 5})
    assert result.parsed is result.content and not result.structured


def test_the_async_api_takes_a_response_format():
    async def main():
        async with lms.AsyncClient() as client:
            model = await client.llm.model(TINY)
            stream = await model.complete_stream("x", response_format=Person, config=GREEDY)
            async for _ in stream:
                pass
            return stream.result()

    valid(asyncio.run(main()), Person.model_json_schema())
