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
    lambda model: [list(stream) for stream in [model.complete_stream("x", config={"maxTokens": 1})] * 2],
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
    (lambda client, model: model.act("hi", []), "Tool use"),
    (lambda client, model: client.embedding.model("x"), "Embedding"),
    (lambda client, model: client.files.prepare_file("x.txt"), "File handling"),
    (lambda client, model: client.repository.search_models("x"), "Model download"),
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


def test_namespaces_of_missing_features_exist_and_list_nothing():
    import inspect as introspect

    with lms.Client() as client:
        assert hasattr(client, "embedding") and hasattr(client, "files") and hasattr(client, "repository")
        introspect.getmembers(client)  # introspection does not trip over them
        assert client.embedding.list_loaded() == [] and client.embedding.list_downloaded() == []
        assert "not implemented" in repr(client.files)

    async def use_async():
        async with lms.AsyncClient() as client:
            assert await client.embedding.list_loaded() == []

    asyncio.run(use_async())


def test_a_remote_host_that_does_not_answer_is_named_a_timeout_and_bad_hosts_are_refused():
    import socket

    from lmkernel.sdk._remote import SocketTransport

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(lms.LMKernelConnectionError, match=r"did not answer lmkernel's handshake within 0\.5 s"):
            SocketTransport(host, None, lambda frame: None, lambda reason: None, timeout=0.5)
    with pytest.raises(lms.LMKernelConnectionError, match="without a scheme, got 'http://127.0.0.1:1234'"):
        lms.Client("http://127.0.0.1:1234")
    with pytest.raises(lms.LMKernelConnectionError, match="port is 1 to 65535, got '127.0.0.1:99999'"):
        lms.Client("127.0.0.1:99999")
