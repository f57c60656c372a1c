"""Chat on the real SmolLM2-135M-Instruct, on every installed backend that loads it: respond(),
respond_stream(), apply_prompt_template(), the prefix cache, callbacks, cancel, the async
facades and a remote client. Greedy throughout, so every comparison is exact.
"""

from __future__ import annotations

import asyncio

import pytest
import trio

import lmkernel as lms

from .serve_helpers import Server

GREEDY = {"temperature": 0, "maxTokens": 48}
BACKENDS = ["llamacpp", "mlx"]


@pytest.fixture(scope="module")
def client():
    lms.sync_api._reset_default_client()
    with lms.Client() as client:
        yield client


@pytest.fixture(scope="module", params=BACKENDS)
def smol(request, client, smollm2_gguf):
    """SmolLM2 on one backend, as its own instance (the prompt cache on, its default)."""
    model = client.llm.load_new_instance(str(smollm2_gguf), f"smol-chat-{request.param}",
                                         config={"backend": request.param})
    assert model.get_info().backend == request.param
    yield model
    model.unload()


def test_respond_answers_capitals(smol):
    assert "Berlin" in smol.respond("What is the capital of Germany?", config=GREEDY).content
    chat = lms.Chat()
    chat.add_user_message("What is the capital of Japan?")
    result = smol.respond(chat, config=GREEDY)
    assert "Tokyo" in result.content
    assert result.stats.stop_reason == "eosFound"  # the model ended its turn
    assert result.stats.prompt_tokens_count == len(smol.tokenize(smol.apply_prompt_template(chat)))


def test_a_multi_turn_reply_is_the_completion_of_the_rendered_conversation(smol):
    chat = lms.Chat("You are a geography teacher.")
    chat.add_user_message("What is the capital of Germany?")
    smol.respond(chat, config=GREEDY, on_message=chat.append)
    chat.add_user_message("And what is the capital of Japan?")
    reply = smol.respond(chat, config=GREEDY)
    rendered = smol.apply_prompt_template(chat)
    assert rendered.startswith("<|im_start|>system\nYou are a geography teacher.<|im_end|>\n<|im_start|>user\n")
    assert rendered.endswith("And what is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n")
    completed = smol.complete(rendered, config=GREEDY)
    assert reply.content == completed.content and reply.content
    assert reply.stats.predicted_tokens_count == completed.stats.predicted_tokens_count


def test_the_rendered_prompt_is_transformers_own(smol, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    from lmkernel.kernel._chat_template import find_chat_template

    template = find_chat_template(smollm2_gguf, "smollm2")
    conversations = [
        [("user", "Hi")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Zürich — 東京?")],
    ]
    for turns in conversations:
        chat = lms.Chat.from_history({"messages": [{"role": r, "content": c} for r, c in turns]})
        reference = transformers.PreTrainedTokenizerFast(
            tokenizer_object=__import__("tokenizers").Tokenizer(__import__("tokenizers").models.BPE()),
            **template.special_tokens)
        reference.chat_template = template.source
        expected = reference.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                                 add_generation_prompt=True)
        assert smol.apply_prompt_template(chat) == expected


def test_ten_turns_reuse_the_prefix_and_say_what_the_uncached_model_says(client, smol, smollm2_gguf):
    backend = smol.get_info().backend
    uncached = client.llm.load_new_instance(str(smollm2_gguf), f"smol-nocache-{backend}",
                                            config={"backend": backend, "promptCacheBytes": 0})
    try:
        chats = {name: lms.Chat("You answer in one short sentence.") for name in ("cached", "uncached")}
        previous_prompt = 0
        for turn in range(10):
            question = f"Name a country whose name starts with the letter {'ABCDEFGHIJ'[turn]}."
            replies = {}
            for name, model in (("cached", smol), ("uncached", uncached)):
                chats[name].add_user_message(question)
                replies[name] = model.respond(chats[name], config={"temperature": 0, "maxTokens": 24},
                                              on_message=chats[name].append)
            cached, plain = replies["cached"], replies["uncached"]
            assert cached.content == plain.content, f"turn {turn + 1}"
            assert plain.stats.cached_prompt_tokens_count == 0
            if turn > 0:
                assert cached.stats.cached_prompt_tokens_count >= previous_prompt, f"turn {turn + 1}"
            previous_prompt = cached.stats.prompt_tokens_count
    finally:
        uncached.unload()


def test_callbacks_and_chat_append_as_for_completions(smol):
    chat = lms.Chat()
    chat.add_user_message("What is the capital of Germany?")
    seen: list = []
    stream = smol.respond_stream(
        chat, config=GREEDY, on_message=chat.append, on_first_token=lambda: seen.append("first"),
        on_prediction_fragment=lambda f: seen.append(f.content),
        on_prompt_processing_progress=lambda p: seen.append(p))
    fragments = [fragment.content for fragment in stream]
    result = stream.result()
    progress = [s for s in seen if isinstance(s, float)]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    assert seen.index("first") > seen.index(1.0)
    assert [s for s in seen if isinstance(s, str) and s != "first"] == fragments
    assert "".join(fragments) == result.content
    assert chat._get_history()["messages"][-1] == {
        "role": "assistant", "content": [{"type": "text", "text": result.content}]}


def test_cancel_and_break_end_a_reply(smol):
    stream = smol.respond_stream("Tell me a long story about a dragon.", config={"temperature": 0, "maxTokens": 400})
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
    assert stream.result().stats.stop_reason == "userStopped"
    stream = smol.respond_stream("Tell me a long story about a dragon.", config={"temperature": 0, "maxTokens": 400})
    for _ in stream:
        break  # stops the generation, as for completions; the partial reply stays usable
    assert stream.result().stats.stop_reason == "userStopped"
    assert "Berlin" in smol.respond("What is the capital of Germany?", config=GREEDY).content  # still serving


def test_a_model_without_a_template_is_a_clear_error(client, tiny_path):
    tiny = client.llm.model(str(tiny_path))
    with pytest.raises(lms.LMKernelValueError, match=r"Model '[^']+' has no chat template .*use complete\(\)"):
        tiny.respond("Hi")
    with pytest.raises(lms.LMKernelValueError, match="has no chat template"):
        tiny.apply_prompt_template(lms.Chat("x"))
    assert tiny.complete("Hi", config={"maxTokens": 2}).stats.predicted_tokens_count == 2


def test_what_chat_does_not_do_yet_says_so(smol):
    with pytest.raises(lms.LMKernelNotImplementedError, match="Tool use"):
        smol.act(lms.Chat(), [])
    with pytest.raises(lms.LMKernelNotImplementedError, match="Tool use"):
        smol.apply_prompt_template("Hi", {"toolDefinitions": [{"type": "function"}]})
    with pytest.raises(lms.LMKernelValueError, match="Unknown apply_prompt_template\\(\\) option 'omitBos'"):
        smol.apply_prompt_template("Hi", {"omitBos": True})


def test_async_facades_respond(smol):
    identifier = smol.identifier

    async def ask() -> str:
        async with lms.AsyncClient() as client:
            model = await client.llm.model(identifier)
            chat = lms.Chat()
            chat.add_user_message("What is the capital of Japan?")
            stream = await model.respond_stream(chat, config=GREEDY)
            text = "".join([f.content async for f in stream])
            assert text == (await model.respond(chat, config=GREEDY)).content
            return text

    assert "Tokyo" in asyncio.run(ask())
    assert "Tokyo" in trio.run(ask)


def test_a_remote_client_gets_the_same_reply(smollm2_gguf, client):
    server = Server("--model", str(smollm2_gguf))
    try:
        local = client.llm.load_new_instance(str(smollm2_gguf), "smol-local", config={"backend": "llamacpp"})
        chat = lms.Chat("Be brief.")
        chat.add_user_message("What is the capital of Germany?")
        with lms.Client(server.host) as remote:
            model = remote.llm.model(str(smollm2_gguf))
            assert model.apply_prompt_template(chat) == local.apply_prompt_template(chat)
            assert model.get_info().backend == "llamacpp"
            assert model.respond(chat, config=GREEDY).content == local.respond(chat, config=GREEDY).content
        local.unload()
    finally:
        assert server.stop() == 0
