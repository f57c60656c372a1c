"""``response_format`` on ``lmkernel serve``'s OpenAI endpoints: ``json_schema`` and ``json_object``
answers that parse and follow their schema (the real SmolLM2-135M-Instruct for chats, the tiny
random model for ``/v1/completions``), whole and streamed, ``finish_reason`` ``stop`` when the
grammar completed and ``length`` when ``max_tokens`` cut it; a 400 naming the rule, the value and
the field for a ``response_format`` the endpoint cannot read and for a schema the kernel refuses
(even for a stream that waited in the queue), and the server serving on after each."""

from __future__ import annotations

import json
import os
import time

import jsonschema
import pytest

import lmkernel as lms

from ..conftest import TINY, USER_MODELS
from ..serve_helpers import Server
from ._client import connect, http_request, parse_response, recv_all

SMOL = "smollm2-135m-instruct"  # the catalog key of the smollm2_gguf fixture's model
ONE_SLOT = "tiny-one-slot"  # an instance of TINY that runs one prediction at a time
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "landmarks", "capital"],
}
AS_CITY = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
LOOK_AHEAD = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}}}


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    env = {"LMKERNEL_MODELS": os.pathsep.join([os.environ["LMKERNEL_MODELS"], str(USER_MODELS)])}
    s = Server("--model", SMOL, "--model", TINY, env=env)
    with lms.Client(api_host=s.host) as client:
        client.llm.load_new_instance(TINY, ONE_SLOT, config={"maxConcurrentPredictions": 1})
    yield s
    assert s.stop() == 0


def is_city(text: str) -> dict:
    """``text`` read as JSON, checked against CITY, with no key CITY does not list."""
    answer = json.loads(text)
    jsonschema.validate(answer, CITY)
    assert set(answer) == set(CITY["properties"])
    return answer


def chat(oai, response_format, **options):
    return oai.chat.completions.create(model=SMOL, messages=FRANCE, temperature=0, response_format=response_format,
                                       **options)


def complete(oai, response_format, **options):
    options = {"model": TINY, "max_tokens": 300, **options}
    return oai.completions.create(prompt="The cat", temperature=0,
                                  extra_body={"response_format": response_format}, **options)


def post(server, path: str, body: dict) -> tuple[int, dict]:
    """Send ``body`` on a fresh connection: (status, the JSON answer)."""
    with connect(server.host) as sock:
        sock.sendall(http_request("POST", path, json.dumps(body).encode(), {"connection": "close"}))
        status, _, data = parse_response(recv_all(sock))
    return status, json.loads(data)


@pytest.fixture(scope="module")
def paris(oai):
    """The whole greedy chat answer as a CITY."""
    return chat(oai, AS_CITY)


def test_a_chat_answer_follows_the_json_schema(paris):
    choice = paris.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert is_city(choice.message.content)["city"] == "Paris"


def test_a_streamed_chat_answer_is_the_whole_one(oai, paris):
    chunks = list(chat(oai, AS_CITY, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == paris.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks[-2:]] == [None, "stop"]


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {
    "name": "anything", "description": "Any object", "strict": False}}], ids=["json_object", "no_schema"])
def test_json_object_and_a_json_schema_without_a_schema_are_any_object(oai, response_format):
    done = chat(oai, response_format, max_tokens=200)
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_follows_the_json_schema(oai, stream):
    if stream:
        chunks = list(complete(oai, AS_CITY, stream=True))
        text, finish = "".join(chunk.choices[0].text for chunk in chunks), chunks[-1].choices[0].finish_reason
        assert text == complete(oai, AS_CITY).choices[0].text
    else:
        done = complete(oai, AS_CITY)
        text, finish = done.choices[0].text, done.choices[0].finish_reason
    assert finish == "stop"
    is_city(text)  # a random-weight model writes a CITY too: the grammar allows nothing else


def test_text_is_unconstrained(oai):
    done = complete(oai, {"type": "text"}, max_tokens=8)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
    assert done.choices[0].text == complete(oai, None, max_tokens=8).choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cuts_the_json_with_length(oai, paris, stream):
    whole = paris.choices[0].message.content
    if stream:
        chunks = list(chat(oai, AS_CITY, max_tokens=5, stream=True))
        text, finish = "".join(chunk.choices[0].delta.content or "" for chunk in chunks), chunks[-1].choices[0]
        finish = finish.finish_reason
    else:
        done = chat(oai, AS_CITY, max_tokens=5)
        text, finish = done.choices[0].message.content, done.choices[0].finish_reason
        assert done.usage.completion_tokens == 5
    assert finish == "length" and whole.startswith(text) and len(text) < len(whole)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_a_cut_completion_says_length(oai):
    done = complete(oai, AS_CITY, max_tokens=4)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
    assert complete(oai, AS_CITY).choices[0].text.startswith(done.choices[0].text)


SCHEMA_AT = "response_format.json_schema"


@pytest.mark.parametrize(
    ("response_format", "param", "message"),
    [
        ("json", "response_format", "'response_format' must be an object like {\"type\": \"json_schema\""),
        ({"type": "xml"}, "response_format.type",
         "response_format.type must be 'text', 'json_object' or 'json_schema', got 'xml'"),
        ({"json_schema": {"name": "x", "schema": {}}}, "response_format.type",
         "response_format.type must be 'text', 'json_object' or 'json_schema', got None"),
        ({"type": "json_object", "schema": {"type": "object"}}, "response_format.schema",
         "response_format has an unknown field 'schema'"),
        ({"type": "json_schema"}, SCHEMA_AT, f"{SCHEMA_AT} must be an object like {{\"name\": \"...\", \"schema\""),
        ({"type": "json_schema", "json_schema": CITY}, f"{SCHEMA_AT}.type", f"{SCHEMA_AT} has an unknown field 'type'"),
        ({"type": "json_schema", "json_schema": {"schema": CITY}}, f"{SCHEMA_AT}.name",
         f"{SCHEMA_AT}.name must be 1 to 64 letters, digits, underscores or dashes (a-z, A-Z, 0-9, _, -), got None"),
        ({"type": "json_schema", "json_schema": {"name": "a city", "schema": CITY}}, f"{SCHEMA_AT}.name",
         "got 'a city'"),
        ({"type": "json_schema", "json_schema": {"name": "c" * 65, "schema": CITY}}, f"{SCHEMA_AT}.name",
         "or dashes (a-z, A-Z, 0-9, _, -), got 'ccccc"),
        ({"type": "json_schema", "json_schema": {"name": "city", "schema": "object"}}, f"{SCHEMA_AT}.schema",
         f"{SCHEMA_AT}.schema must be a JSON schema object, got 'object'"),
        ({"type": "json_schema", "json_schema": {"name": "city", "schema": [CITY]}}, f"{SCHEMA_AT}.schema",
         f"{SCHEMA_AT}.schema must be a JSON schema object, got [{{'type': 'object'"),
        ({"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": 1}}, f"{SCHEMA_AT}.strict",
         f"{SCHEMA_AT}.strict must be true, false or null, got 1"),
        ({"type": "json_schema", "json_schema": {"name": "city", "description": 7}}, f"{SCHEMA_AT}.description",
         f"{SCHEMA_AT}.description must be a string, got 7"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_response_format_that_cannot_be_read_is_a_400_naming_the_rule_and_value(
        server, oai, path, response_format, param, message):
    body = {"messages": FRANCE} if path == "/v1/chat/completions" else {"model": TINY, "prompt": "x"}
    status, answer = post(server, path, {**body, "response_format": response_format})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert message in answer["error"]["message"] and answer["error"]["param"] == param
    assert complete(oai, {"type": "json_object"}, max_tokens=1).usage.completion_tokens == 1


@pytest.mark.parametrize(("response_format", "message"), [
    (LOOK_AHEAD, "look-around, including look-ahead and look-behind, is not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nowhere"}}},
     "'/$defs/nowhere' does not exist"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "whole"}}}, "Invalid type: whole"),
])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_schema_the_kernel_refuses_is_a_400_naming_the_problem(server, oai, path, stream, response_format, message):
    body = {"model": SMOL, "messages": FRANCE} if path == "/v1/chat/completions" else {"model": TINY, "prompt": "x"}
    status, answer = post(server, path, {**body, "response_format": response_format, "stream": stream})
    assert status == 400, answer
    assert answer["error"]["message"].startswith("Invalid structured output setting: ")
    assert message in answer["error"]["message"]
    assert (answer["error"]["type"], answer["error"]["param"]) == ("invalid_request_error", "response_format")
    is_city(complete(oai, AS_CITY).choices[0].text)


def test_a_refused_schema_of_a_stream_that_waited_in_the_queue_is_still_a_400(server, oai):
    """The grammar compiles when the prediction leaves the queue: the stream's head waits for it."""
    held = connect(server.host)
    try:
        held.sendall(http_request("POST", "/v1/completions", json.dumps({
            "model": ONE_SLOT, "prompt": "The cat", "max_tokens": 4000, "stream": True}).encode()))
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")  # running: ONE_SLOT's one place is taken
        with connect(server.host) as waiting:
            waiting.sendall(http_request("POST", "/v1/completions", json.dumps({
                "model": ONE_SLOT, "prompt": "x", "stream": True, "response_format": LOOK_AHEAD}).encode(),
                {"connection": "close"}))
            deadline = time.monotonic() + 30
            while server.health()["predictions"] < 2:  # the second one is queued behind the first
                assert time.monotonic() < deadline, "the second prediction never reached the queue"
                time.sleep(0.01)
            held.close()  # the first one is cancelled: the second leaves the queue, and its grammar fails
            status, _, data = parse_response(recv_all(waiting))
        assert status == 400 and "look-around" in json.loads(data)["error"]["message"]
    finally:
        held.close()
    assert complete(oai, {"type": "json_object"}, max_tokens=1, model=ONE_SLOT).usage.completion_tokens == 1


def test_a_body_becomes_the_structured_setting_the_kernel_is_sent():
    from lmkernel.kernel.serve._chat_completions import chat_job
    from lmkernel.kernel.serve._completions import completion_job

    def configs(response_format):
        chat_body = {"messages": FRANCE, "response_format": response_format}
        completion_body = {"prompt": "x", "response_format": response_format}
        return chat_job(json.dumps(chat_body).encode()).config, completion_job(json.dumps(completion_body).encode()).config

    for config in configs(AS_CITY):
        assert config["structured"] == {"type": "json", "jsonSchema": CITY}
    for config in configs({"type": "json_object"}):
        assert config["structured"] == {"type": "json", "jsonSchema": {"type": "object"}}
    for config in configs({"type": "json_schema", "json_schema": {"name": "any", "schema": None}}):
        assert config["structured"] == {"type": "json", "jsonSchema": {"type": "object"}}
    for response_format in ({"type": "text"}, None):
        assert all("structured" not in config for config in configs(response_format))
