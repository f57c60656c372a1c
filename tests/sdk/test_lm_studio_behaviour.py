"""Where LM Studio's SDK raises, when it connects, and what a traceback shows."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import trio

import lmkernel as lms

from ..conftest import TINY

SDK = Path(lms.__file__).resolve().parent


def test_an_unknown_preset_surfaces_from_the_stream_not_from_complete_stream(tiny_model):
    model = tiny_model
    stream = model.complete_stream("the cat", preset="no-such-preset")  # no error yet
    with pytest.raises(lms.LMStudioPresetNotFoundError, match="No preset named 'no-such-preset'"):
        stream.wait_for_result()
    with pytest.raises(lms.LMStudioPresetNotFoundError):
        stream.result()
    with pytest.raises(lms.LMStudioPresetNotFoundError):
        for _ in model.complete_stream("the cat", preset="no-such-preset"):
            pass
    with pytest.raises(lms.LMStudioPresetNotFoundError):
        model.complete("the cat", preset="no-such-preset")

    async def use_async():
        async with lms.AsyncClient() as client:
            handle = await client.llm.model(TINY)
            stream = await handle.complete_stream("the cat", preset="x")
            with pytest.raises(lms.LMStudioPresetNotFoundError):
                await stream.wait_for_result()

    asyncio.run(use_async())
    trio.run(use_async)


def internal_frames(exc: BaseException) -> list[str]:
    return [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_tb(exc.__traceback__)
            if Path(f.filename).resolve().is_relative_to(SDK)]


@pytest.mark.parametrize("call", [
    lambda model: model.complete("x", config={"temperature": -1}),
    lambda model: lms.llm("no/such/model"),
    lambda model: model.complete_stream("x", preset="none").result(),
    lambda model: list(model.complete_stream("x", preset="none")),
])
def test_tracebacks_of_lmkernel_errors_end_at_the_users_call(tiny_model, call):
    model = tiny_model
    with pytest.raises(lms.LMKernelError) as caught:
        call(model)
    frames = internal_frames(caught.value)
    assert frames and all(frame.startswith("_public.py:") for frame in frames), frames
    assert len(frames) == 1, frames  # one frame of the API boundary, none of the machinery


def test_full_tracebacks_on_request(tiny_model, monkeypatch):
    monkeypatch.setenv("LMKERNEL_FULL_TRACEBACKS", "1")
    with pytest.raises(lms.LMKernelError) as caught:
        tiny_model.complete("x", config={"temperature": -1})
    assert len(internal_frames(caught.value)) > 3


def test_async_client_connects_off_the_loop_on_first_use():
    async def use():
        client = lms.AsyncClient()
        assert client._link.ready() is None  # nothing connected yet
        handle = await client.llm.model(TINY)
        assert client._link.ready() is not None
        assert (await handle.complete("the cat", config={"maxTokens": 2})).stats.predicted_tokens_count >= 1
        await client.aclose()
        with pytest.raises(lms.LMKernelConnectionError, match="This client is closed"):
            await client.llm.list_loaded()

    asyncio.run(use())
    trio.run(use)


ATEXIT = """
    import atexit, sys
    import lmkernel as lms

    key = sys.argv[1]

    def access_default_client(client):
        print("During shutdown:", [m.identifier for m in client.list_loaded_models()], flush=True)
        print("completion:", len(lms.llm(key).complete("the cat", config={"maxTokens": 3}).content) >= 0, flush=True)

    atexit.register(access_default_client, lms.get_default_client())
    print("Prior to shutdown:", [m.identifier for m in lms.list_loaded_models()])
    print("Loaded:", repr(lms.llm(key).identifier))
"""


def test_the_default_client_works_in_an_atexit_hook():
    # LM Studio's misc/atexit-example.py, plus a completion in the hook.
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(ATEXIT), TINY],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Prior to shutdown: [")
    loaded = lines[1].removeprefix("Loaded: ")
    assert lines[2].startswith("During shutdown: [") and loaded in lines[2]
    assert lines[3] == "completion: True"


@pytest.mark.parametrize("use, feature", [
    (lambda client, model: model.respond("hi"), "Chat"),
    (lambda client, model: model.respond_stream("hi"), "Chat"),
    (lambda client, model: model.apply_prompt_template("hi"), "Chat"),
    (lambda client, model: model.act("hi", []), "Tool use"),
    (lambda client, model: client.embedding, "Embedding"),
    (lambda client, model: client.files, "File handling"),
    (lambda client, model: client.repository, "Model download"),
    (lambda client, model: client.prepare_image("x.png"), "Image input"),
])
def test_methods_of_missing_features_raise_naming_the_feature(tiny_model, use, feature):
    with lms.Client() as client:
        with pytest.raises(lms.LMKernelNotImplementedError, match=f"^{feature}.* is not implemented in lmkernel"):
            use(client, client.llm.model(TINY))

    async def use_async():
        async with lms.AsyncClient() as client:
            model = await client.llm.model(TINY)
            with pytest.raises(lms.LMKernelNotImplementedError, match=f"^{feature}"):
                result = use(client, model)
                if inspect.isawaitable(result):
                    await result

    asyncio.run(use_async())
