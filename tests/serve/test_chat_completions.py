"""``POST /v1/chat/completions`` on ``lmkernel serve``, through the official ``openai`` client, on the
real SmolLM2-135M-Instruct (greedy); the same conversation over the native protocol; 400s naming the
field for what the endpoint cannot honour, and the server serving on after each."""

from __future__ import annotations

import json
import os

import openai
import pytest

import lmkernel as lms
from lmkernel.kernel import messages as m
from lmkernel.sdk._ops import prepare_prediction
from lmkernel.sdk._sync_stream import PredictionStream

from ..conftest import TINY, TINY_KEY, USER_MODELS
from ..serve_helpers import Server

SMOL = "smollm2-135m-instruct"  # the catalog key of the smollm2_gguf fixture's model
GERMANY = [{"role": "user", "content": "What is the capital of Germany?"}]
JAPAN = "What is the capital of Japan?"
# What the HTTP endpoint sends the kernel at temperature 0: the native requests below send the same.
GREEDY = {"temperature": 0, "topPSampling": False, "topKSampling": 0, "minPSampling": False, "repeatPenalty": False,
          "contextOverflowPolicy": "stopAtLimit"}


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    env = {"LMKERNEL_MODELS": os.pathsep.join([os.environ["LMKERNEL_MODELS"], str(USER_MODELS)])}
    s = Server("--model", SMOL, "--model", TINY, env=env)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def germany(oai):
    """The whole greedy answer to GERMANY."""
    return oai.chat.completions.create(model=SMOL, messages=GERMANY, temperature=0)


def test_a_whole_answer_with_its_usage(germany):
    assert germany.object == "chat.completion" and germany.id.startswith("chatcmpl-") and germany.model == SMOL
    choice = germany.choices[0]
    assert choice.message.role == "assistant" and "Berlin" in choice.message.content
    assert choice.finish_reason == "stop" and choice.index == 0
    usage = germany.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens


def test_streamed_chunks_join_to_the_whole_answer_then_usage(oai, germany):
    chunks = list(oai.chat.completions.create(model=SMOL, messages=GERMANY, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    first, *texts, last, tally = chunks
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert "".join(chunk.choices[0].delta.content for chunk in texts) == germany.choices[0].message.content
    assert all(chunk.choices[0].finish_reason is None for chunk in [first, *texts])
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert tally.choices == [] and tally.usage.completion_tokens == germany.usage.completion_tokens
    assert tally.usage.prompt_tokens == germany.usage.prompt_tokens


def test_a_stream_without_usage_asked_has_none(oai):
    chunks = list(oai.chat.completions.create(model=SMOL, messages=GERMANY, temperature=0, max_tokens=2, stream=True))
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stop", ["Berlin", ["nowhere", "Berlin"]])
def test_a_stop_string_ends_the_answer_before_it(oai, germany, stop):
    whole = germany.choices[0].message.content
    done = oai.chat.completions.create(model=SMOL, messages=GERMANY, temperature=0, stop=stop)
    assert done.choices[0].message.content == whole[: whole.index("Berlin")]
    assert done.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("limit", [{"max_tokens": 3}, {"max_completion_tokens": 3},
                                   {"max_tokens": 3, "max_completion_tokens": 3}])
def test_a_token_limit_ends_the_answer_with_length(oai, germany, limit):
    done = oai.chat.completions.create(model=SMOL, messages=GERMANY, temperature=0, **limit)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 3
    assert germany.choices[0].message.content.startswith(done.choices[0].message.content)


def test_a_conversation_of_several_turns_developer_role_and_text_parts(oai):
    done = oai.chat.completions.create(model=SMOL, temperature=0, max_tokens=40, messages=[
        {"role": "developer", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                     {"type": "text", "text": "of Germany?"}]},
        {"role": "assistant", "content": "The capital of Germany is Berlin."},
        {"role": "user", "content": JAPAN},
    ])
    assert "Tokyo" in done.choices[0].message.content


def test_the_native_protocol_carries_a_chat_as_in_process(server, oai, smollm2_gguf):
    conversation = [m.ChatMessage(role="user", content=JAPAN)]

    def respond(client: lms.Client, identifier: str) -> str:
        prep = prepare_prediction(identifier, conversation, response_format=None, config=GREEDY, preset=None)
        return PredictionStream(client._connection(), prep.make, prep.callbacks, prep.refused).wait_for_result().content

    with lms.Client(api_host=server.host) as remote:
        over_the_network = respond(remote, SMOL)
    with lms.Client() as local:
        model = local.llm.model(str(smollm2_gguf))
        try:
            in_process = respond(local, model.identifier)
        finally:
            model.unload()
    over_http = oai.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": JAPAN}], temperature=0)
    assert "Tokyo" in in_process
    assert over_the_network == in_process == over_http.choices[0].message.content


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize(
    ("request_args", "param", "message"),
    [
        ({"messages": [{"role": "system", "content": "Be brief."}, *GERMANY, {"role": "user", "content": [IMAGE]}]},
         "messages[2].content[0].type", "messages[2].content[0].type 'image_url' is not supported"),
        ({"messages": [*GERMANY, {"role": "tool", "content": "42", "tool_call_id": "call_1"}]},
         "messages[1].role", "messages[1].role 'tool' is not supported"),
        ({"messages": [{"role": "user", "content": "x", "name": "ann"}]},
         "messages[0].name", "messages[0].name is not supported"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role", "got 'critic'"),
        ({"messages": []}, "messages", "'messages' must hold at least one message"),
        ({"messages": GERMANY, "extra_body": {"best_of": 2}}, "best_of", "unknown field `best_of`"),
        ({"messages": GERMANY, "n": 2}, "n", "'n' is not supported by lmkernel's chat completions endpoint (got 2)"),
        ({"messages": GERMANY, "seed": 7}, "seed", "'seed' is not supported"),
        ({"messages": GERMANY, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
         "'tools' is not supported"),
        ({"messages": GERMANY, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens",
         "'max_tokens' (3) and 'max_completion_tokens' (4) differ"),
        ({"messages": GERMANY, "max_completion_tokens": 0}, "max_completion_tokens",
         "'max_completion_tokens' must be an integer from 1"),
        ({"messages": GERMANY, "temperature": -1}, "temperature", "'temperature'"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(oai, request_args, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=SMOL, **request_args)
    assert caught.value.status_code == 400 and message in caught.value.message
    assert caught.value.param == param
    assert oai.chat.completions.create(model=SMOL, messages=GERMANY, max_tokens=1).usage.completion_tokens == 1


def test_neutral_values_of_refused_fields_are_accepted(oai):
    done = oai.chat.completions.create(
        model=SMOL, messages=GERMANY, max_tokens=1, n=1, logprobs=False, frequency_penalty=0, presence_penalty=0,
        response_format={"type": "text"}, tool_choice="none", store=False, user="ann", stream_options=None)
    assert done.usage.completion_tokens == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_without_a_chat_template_is_a_400_naming_it(oai, stream):
    with pytest.raises(openai.BadRequestError, match=f"Model '{TINY_KEY}' has no chat template") as caught:
        oai.chat.completions.create(model=TINY, messages=GERMANY, max_tokens=4, stream=stream)
    assert caught.value.status_code == 400
    assert oai.completions.create(model=TINY, prompt="The cat", max_tokens=2).usage.completion_tokens <= 2
    assert oai.chat.completions.create(model=SMOL, messages=GERMANY, max_tokens=1).usage.completion_tokens == 1


def test_a_body_becomes_the_conversation_and_config_the_kernel_is_sent():
    from lmkernel.kernel.serve._chat_completions import chat_job

    job = chat_job(json.dumps({"model": SMOL, "max_completion_tokens": 9, "stop": "x", "top_p": 0.5, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c", "refusal": None, "tool_calls": None, "annotations": []},
    ]}).encode())
    assert job.messages == [m.ChatMessage(role="system", content="Be brief."), m.ChatMessage(role="user", content="ab"),
                            m.ChatMessage(role="assistant", content="c")]
    assert (job.model, job.stream, job.include_usage) == (SMOL, False, False)
    assert job.config == {**GREEDY, "temperature": 1.0, "topPSampling": 0.5, "maxTokens": 9, "stopStrings": ["x"]}
    assert "maxTokens" not in chat_job(json.dumps({"messages": GERMANY}).encode()).config  # no limit by default
