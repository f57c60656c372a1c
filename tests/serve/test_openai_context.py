"""The OpenAI API's context rule on ``lmkernel serve``: a prompt longer than the context is a 400,
and generation stops at the limit with finish_reason ``length`` (the SDK's default policy cuts
prompts instead; OpenAI clients expect the refusal)."""

from __future__ import annotations

import openai
import pytest

from ..conftest import TINY_CTX64
from ..serve_helpers import Server


@pytest.fixture(scope="module")
def oai():
    server = Server("--model", TINY_CTX64)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()
    assert server.stop() == 0


def test_a_prompt_longer_than_the_context_gets_400_naming_the_numbers(oai):
    model = oai.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match=r"context length of 64") as caught:
        oai.completions.create(model=model, prompt="the cat sat on the mat " * 40, max_tokens=4)
    assert caught.value.status_code == 400
    # the kernel's advice (a contextOverflowPolicy) is not offered: this API has no such field
    assert caught.value.body["message"].endswith(
        "has a context length of 64: it leaves no room for an answer; send a shorter prompt (this API does not cut "
        "prompts)")
    assert "contextOverflowPolicy" not in caught.value.body["message"]


def test_generation_stops_at_the_context_limit_with_finish_reason_length(oai):
    model = oai.models.list().data[0].id
    done = oai.completions.create(model=model, prompt="the cat", max_tokens=500, temperature=0)
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens + done.usage.completion_tokens <= 64
