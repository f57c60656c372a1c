"""Chat in the kernel, its mechanics, with the scripted backend (it echoes its prompt, one letter a step).

What is proved on real models (the template's text, Berlin and Tokyo, equality with complete())
is in tests/sdk/test_chat.py; here: where the conversation is rendered, that a turn's end token
ends the prediction whatever the engine says, and that every failure ends its own request only.
"""

from __future__ import annotations

import json

import pytest

from lmkernel.kernel import messages as m

from .test_kernel import Client, run
from .test_kernel import scripted as scripted  # noqa: F401 - the fixture

# Each message as its content and a '|', then 'A:' as the generation prompt; '|' is the end of a turn.
TEMPLATE = "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}" \
           "{% if add_generation_prompt %}A:{% endif %}"


def user(text: str) -> m.ChatMessage:
    return m.ChatMessage(role="user", content=text)


@pytest.fixture
def with_template(scripted, tmp_path):  # noqa: F811
    (tmp_path / "one" / "chat_template.jinja").write_text(TEMPLATE)
    (tmp_path / "one" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "|", "bos_token": "^"}))
    return scripted


def test_a_chat_is_rendered_with_the_models_template_and_ends_at_the_turns_end(with_template):
    backend, kernel = with_template

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        # The engine echoes "hi|A:" back: 'h', 'i', then '|' (the template's end of turn) ends it.
        events = await client.until_done(client.request(
            m.Predict, model="one", messages=[user("hi")], config={"maxTokens": 50}))
        assert backend.prompts[-1] == "hi|A:"
        assert "".join(e.content for e in events if isinstance(e, m.Fragment)) == "hi"
        assert events[-1].stats.stop_reason == "eosFound" and events[-1].stats.predicted_tokens_count == 2
        assert events[-1].stats.prompt_tokens_count == len("hi|A:")
        # A prompt (complete) with the same text is not a chat: no turn end, it runs to its limit.
        events = await client.until_done(client.request(m.Predict, model="one", prompt="hi|A:",
                                                        config={"maxTokens": 6}))
        assert "".join(e.content for e in events if isinstance(e, m.Fragment)) == "hi|A:h"
        rendered = await client.until_done(client.request(
            m.ApplyTemplate, model="one", messages=[user("a"), m.ChatMessage(role="assistant", content="b")]))
        assert rendered[-1] == m.TemplateText(id=rendered[-1].id, text="a|b|A:")
        bare = await client.until_done(client.request(
            m.ApplyTemplate, model="one", messages=[user("a")], add_generation_prompt=False, omit_eos_token=True))
        assert bare[-1].text == "a"

    run(kernel, scenario)


def test_a_model_without_a_template_fails_the_chat_alone(scripted):  # noqa: F811
    backend, kernel = scripted

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        failed = (await client.until_done(client.request(m.Predict, model="one", messages=[user("hi")])))[-1]
        assert isinstance(failed, m.Failed) and failed.error.kind == "value"
        assert failed.error.message.startswith("Model 'one' has no chat template")
        failed = (await client.until_done(client.request(m.ApplyTemplate, model="one", messages=[user("hi")])))[-1]
        assert isinstance(failed, m.Failed) and failed.error.kind == "value" and "'one'" in failed.error.message
        done = (await client.until_done(client.request(m.Predict, model="one", prompt="ab",
                                                       config={"maxTokens": 2})))[-1]
        assert isinstance(done, m.Finished)  # the model goes on serving

    run(kernel, scenario)


def test_a_template_that_refuses_the_conversation_fails_that_request(scripted, tmp_path):  # noqa: F811
    backend, kernel = scripted
    (tmp_path / "one" / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
        "{{ messages[0]['content'] }}")

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        refused = (await client.until_done(client.request(
            m.Predict, model="one", messages=[m.ChatMessage(role="assistant", content="x")])))[-1]
        assert isinstance(refused, m.Failed) and refused.error.kind == "value"
        assert refused.error.message == (
            "The model's chat template refused this conversation: first message must be the user")
        done = (await client.until_done(client.request(
            m.Predict, model="one", messages=[user("ok")], config={"maxTokens": 2})))[-1]
        assert isinstance(done, m.Finished) and backend.prompts[-1] == "ok"

    run(kernel, scenario)


def test_chat_frames_cross_the_wire_checked():
    request = m.Predict(id=3, model="x", messages=[user("hé"), m.ChatMessage(role="system", content="s")])
    assert m.decode_request(m.encode(request)) == request
    bad = m.encode({"op": "predict", "id": 4, "model": "x", "messages": [{"role": "tool", "content": "t"}]})
    with pytest.raises(Exception, match="Invalid enum value 'tool'"):
        m.decode_request(bad)


def test_a_chat_whose_rendered_text_cannot_fit_is_refused_before_tokenizing(with_template):
    backend, kernel = with_template

    async def scenario(client: Client):
        await client.until_done(client.request(m.Load, model="one"))
        # 200,000 one-letter messages: 200,000 characters of content (the kernel's first check lets
        # them by), 400,000 rendered ('x|' each): over 256 characters per token of the context of 1000.
        many = [user("x")] * 200_000
        refused = (await client.until_done(client.request(m.Predict, model="one", messages=many)))[-1]
        assert isinstance(refused, m.Failed) and refused.error.kind == "prompt_too_long"
        assert refused.error.message.startswith("The prompt is 400002 characters but model 'one' has a context length")
        assert len(backend.prompts) == 0  # never tokenized, never reached the engine
        done = (await client.until_done(client.request(
            m.Predict, model="one", messages=[user("ok")], config={"maxTokens": 2})))[-1]
        assert isinstance(done, m.Finished)

    run(kernel, scenario)
