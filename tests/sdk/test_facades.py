"""One scenario through the sync, asyncio and trio facades, on the real MLX engine.

Each facade runs the same script (load, stream with every callback, cancel, break,
errors) and returns a transcript; the transcripts must be equal.
"""

from __future__ import annotations

import asyncio

import pytest
import trio

import lmkernel as lms

from ..conftest import TINY, TINY_KEY

GREEDY = {"maxTokens": 12, "temperature": 0}


def _summary(result, fragments, calls):
    return {
        "content": result.content,
        "joined": "".join(f.content for f in fragments),
        "stop": result.stats.stop_reason,
        "predicted": result.stats.predicted_tokens_count,
        "tokens_in_fragments": sum(f.tokens_count for f in fragments),
        "calls": calls,
    }


def _callbacks(calls: list):
    return dict(
        on_prompt_processing_progress=lambda p: calls.append(("progress", p)),
        on_first_token=lambda: calls.append(("first",)),
        on_prediction_fragment=lambda f: calls.append(("fragment", f.content)),
        on_message=lambda msg: calls.append(("message", msg.role, msg.content[0].text)),
    )


def run_sync() -> dict:
    out = {}
    with lms.Client() as client:
        model = client.llm.model(TINY)
        calls: list = []
        stream = model.complete_stream("The cat sat on the", config=GREEDY, **_callbacks(calls))
        with pytest.raises(lms.LMStudioRuntimeError, match="not been initiated"):
            stream.result()
        fragments = list(stream)
        out["stream"] = _summary(stream.result(), fragments, calls)
        out["complete"] = model.complete("The cat sat on the", config=GREEDY).content
        stream = model.complete_stream("Once upon a time", config={"maxTokens": 200, "temperature": 0})
        seen = []
        for fragment in stream:
            seen.append(fragment.content)
            stream.cancel()
        out["cancel"] = (len(seen), stream.stats.stop_reason, stream.result().content == "".join(seen))
        stream = model.complete_stream("Once upon a time", config={"maxTokens": 200, "temperature": 0})
        for i, fragment in enumerate(stream):
            if i == 2:
                break
        out["break"] = (stream.result().stats.stop_reason, len(stream.result().content) > 0)
        with pytest.raises(lms.LMStudioModelNotFoundError) as info:
            client.llm.model("no-such-model")
        out["not_found"] = type(info.value).__name__
        with pytest.raises(lms.LMKernelConfigError) as info:
            model.complete_stream("x", config={"max_tokenz": 3})
        out["bad_config"] = str(info.value).split(";")[0]
        out["tokens"] = model.tokenize("The cat")
        out["count"] = model.count_tokens("The cat")
        out["context"] = model.get_context_length()
        out["loaded"] = [m.identifier for m in client.llm.list_loaded()]
    return out


async def run_async() -> dict:
    out = {}
    async with lms.AsyncClient() as client:
        model = await client.llm.model(TINY)
        calls: list = []
        stream = await model.complete_stream("The cat sat on the", config=GREEDY, **_callbacks(calls))
        with pytest.raises(lms.LMStudioRuntimeError, match="not been initiated"):
            stream.result()
        fragments = [f async for f in stream]
        out["stream"] = _summary(stream.result(), fragments, calls)
        out["complete"] = (await model.complete("The cat sat on the", config=GREEDY)).content
        stream = await model.complete_stream("Once upon a time", config={"maxTokens": 200, "temperature": 0})
        seen = []
        async for fragment in stream:
            seen.append(fragment.content)
            await stream.cancel()
        out["cancel"] = (len(seen), stream.stats.stop_reason, stream.result().content == "".join(seen))
        stream = await model.complete_stream("Once upon a time", config={"maxTokens": 200, "temperature": 0})
        i = 0
        async for fragment in stream:
            if i == 2:
                break
            i += 1
        out["break"] = (stream.result().stats.stop_reason, len(stream.result().content) > 0)
        with pytest.raises(lms.LMStudioModelNotFoundError) as info:
            await client.llm.model("no-such-model")
        out["not_found"] = type(info.value).__name__
        with pytest.raises(lms.LMKernelConfigError) as info:
            await model.complete_stream("x", config={"max_tokenz": 3})
        out["bad_config"] = str(info.value).split(";")[0]
        out["tokens"] = await model.tokenize("The cat")
        out["count"] = await model.count_tokens("The cat")
        out["context"] = await model.get_context_length()
        out["loaded"] = [m.identifier for m in await client.llm.list_loaded()]
    return out


@pytest.fixture(scope="module")
def sync_transcript():
    return run_sync()


def test_sync_transcript_is_right(sync_transcript):
    t = sync_transcript
    stream = t["stream"]
    assert stream["content"] == stream["joined"] == t["complete"]
    assert stream["stop"] in ("maxPredictedTokensReached", "eosFound")
    assert stream["tokens_in_fragments"] <= stream["predicted"] <= 12
    calls = stream["calls"]
    progress = [c[1] for c in calls if c[0] == "progress"]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(set(progress))
    kinds = [c[0] for c in calls]
    assert kinds.count("first") == 1 and kinds.index("first") == kinds.index("fragment") - 1
    assert kinds[-1] == "message" and calls[-1][2] == stream["content"]
    assert [c[1] for c in calls if c[0] == "fragment"] and "".join(c[1] for c in calls if c[0] == "fragment") == stream["content"]
    assert t["cancel"] == (1, "userStopped", True)
    assert t["break"] == ("userStopped", True)
    assert t["not_found"] == "LMKernelModelNotFoundError"
    assert t["bad_config"] == "Unknown prediction config key 'max_tokenz'"
    assert t["count"] == len(t["tokens"]) and t["tokens"][0] == 1  # BOS
    assert t["context"] == 4096
    assert TINY_KEY in t["loaded"]  # the instance is named by its key


def test_asyncio_matches_sync(sync_transcript):
    assert asyncio.run(run_async()) == sync_transcript


def test_trio_matches_sync(sync_transcript):
    assert trio.run(run_async) == sync_transcript
