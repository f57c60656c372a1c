"""``lmkernel serve`` fronting remote models: a fleet behind one endpoint.

The upstream is another ``lmkernel serve`` (one of the servers the remote backend talks to),
serving the tiny test model; the front is a second ``lmkernel serve`` that knows the upstream
only through ``LMKERNEL_REMOTE``. Through the front, with the official ``openai`` client and
with lmkernel's own ``Client``, the answers are the upstream's, token for token.
"""

from __future__ import annotations

import openai
import pytest

import lmkernel as lms

from ..conftest import TINY_KEY
from ..serve_helpers import Server

REMOTE_KEY = f"remote/up/{TINY_KEY}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    upstream = Server("--model", TINY_KEY)
    config = tmp_path_factory.mktemp("remote") / "remote.toml"
    config.write_text(f'[servers.up]\nurl = "{upstream.url}/v1"\nmodels = ["{TINY_KEY}"]\n')
    try:
        front = Server("--model", REMOTE_KEY, env={"LMKERNEL_REMOTE": str(config)})
    except BaseException:
        upstream.stop()
        raise
    yield upstream, front
    assert front.stop() == 0
    assert upstream.stop() == 0


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_front_lists_and_serves_the_upstreams_model(fleet):
    upstream, front = fleet
    with _client(front) as via_front, _client(upstream) as direct:
        assert REMOTE_KEY in [model.id for model in via_front.models.list()]
        settings = {"prompt": "The cat sat on the", "max_tokens": 12, "temperature": 0}
        fronted = via_front.completions.create(model=REMOTE_KEY, **settings)
        original = direct.completions.create(model=TINY_KEY, **settings)
        assert fronted.choices[0].text == original.choices[0].text != ""
        assert fronted.choices[0].finish_reason == "length" and fronted.usage.completion_tokens == 12
        # the upstream's usage reached the front: its prompt count, not a guess
        assert fronted.usage.prompt_tokens == original.usage.prompt_tokens
        streamed = via_front.completions.create(model=REMOTE_KEY, stream=True, **settings)
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == original.choices[0].text


def test_lmkernels_own_client_through_the_front_and_a_stop_string(fleet):
    upstream, front = fleet
    with lms.Client(front.host) as client, lms.Client(upstream.host) as direct:
        model = client.llm.model(REMOTE_KEY)
        local = direct.llm.model(TINY_KEY).complete("Once upon a time", config={"maxTokens": 10, "temperature": 0})
        remote = model.complete("Once upon a time", config={"maxTokens": 10, "temperature": 0})
        assert remote.content == local.content and remote.stats.stop_reason == "maxPredictedTokensReached"
        # the upstream's /v1/models says its context length, and the front enforces it
        assert model.get_context_length() == direct.llm.model(TINY_KEY).get_context_length()
        stop = local.content[3:6]
        cut = model.complete("Once upon a time", config={"maxTokens": 10, "temperature": 0, "stopStrings": [stop]})
        assert cut.content == local.content[:local.content.index(stop)]
        assert cut.stats.stop_reason == "stopStringFound"
        with pytest.raises(lms.LMKernelPromptTooLongError):  # the upstream counted it and said so
            model.complete("x " * 5000, config={"maxTokens": 2, "contextOverflowPolicy": "stopAtLimit"})
        assert model.complete("Once upon a time", config={"maxTokens": 10, "temperature": 0}).content == local.content
        # sampling with LM Studio's defaults (top-k, min-p, repeat penalty): an lmkernel server refuses
        # fields the OpenAI API lacks, and the remote backend then sends it only the OpenAI API's own
        sampled = model.complete("Once upon a time", config={"maxTokens": 5, "temperature": 0.7})
        assert sampled.stats.predicted_tokens_count == 5 and sampled.stats.stop_reason == "maxPredictedTokensReached"


def test_lmkernel_serve_takes_the_extended_sampling_fields(fleet):
    upstream, _ = fleet
    with _client(upstream) as direct:
        settings = {"model": TINY_KEY, "prompt": "The cat sat on the", "max_tokens": 12}
        greedy = direct.completions.create(temperature=0, **settings).choices[0].text
        for extra in ({"top_k": 1}, {"top_k": 1, "min_p": 0.05, "repeat_penalty": 1.0, "repetition_penalty": 1.0}):
            # top-k 1 keeps only the likeliest token: at temperature 1 it is greedy decoding
            assert direct.completions.create(temperature=1.0, extra_body=extra, **settings).choices[0].text == greedy
        with pytest.raises(openai.BadRequestError) as refused:  # the chat endpoint reads them too (a field error first)
            direct.chat.completions.create(model=TINY_KEY, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, extra_body={"top_k": -2})
        assert refused.value.body["param"] == "top_k"
        for extra, field in (({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repeat_penalty": 0}, "repeat_penalty"),
                             ({"repeat_penalty": 1.1, "repetition_penalty": 1.2}, "repetition_penalty")):
            with pytest.raises(openai.BadRequestError) as refused:
                direct.completions.create(temperature=1.0, extra_body=extra, **settings)
            assert refused.value.body["param"] == field and field in refused.value.body["message"]
