"""Model keys, the default model, listing, loading and unloading through the public API."""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
import trio

import lmkernel as lms
from lmkernel.kernel._catalog import demo_model_path

from ..conftest import TINY, TINY_CTX64, TINY_CTX64_KEY, TINY_KEY


def test_llm_without_key_loads_the_default_then_returns_the_first_loaded(fresh_kernel):
    model = lms.llm()
    assert model.identifier == TINY_KEY  # first model in the model folders; an instance is named by its key
    other = lms.llm(TINY_CTX64)
    assert lms.llm().identifier == TINY_KEY and other.identifier == TINY_CTX64_KEY
    assert [m.identifier for m in lms.list_loaded_models()] == [TINY_KEY, TINY_CTX64_KEY]


def test_keys_paths_and_bare_names_resolve(fresh_kernel, tiny_path, transport):
    if transport == "server":  # a network caller never names a folder of the server's disk
        with pytest.raises(lms.LMKernelValueError, match="looks like a filesystem path: lmkernel serve never"):
            lms.llm(str(tiny_path))
    else:
        assert lms.llm(str(tiny_path)).identifier == TINY_KEY  # a folder in the model folders keeps its key
    ctx64 = lms.llm(TINY_CTX64_KEY)  # its key
    info = ctx64.get_info()
    assert (ctx64.identifier, info.model_key, info.path) == (TINY_CTX64_KEY, TINY_CTX64_KEY, TINY_CTX64)
    assert lms.llm(TINY_CTX64).identifier == TINY_CTX64_KEY  # its path: the same instance
    assert lms.llm("Tiny-CTX64").identifier == TINY_CTX64_KEY  # ignoring case
    tiny = lms.llm(TINY)  # by path, as LM Studio's publisher/repo
    assert (tiny.identifier, tiny.get_info().model_key, tiny.get_info().path) == (TINY_KEY, TINY_KEY, TINY)
    assert lms.llm(TINY_KEY) == tiny
    assert sorted(m.identifier for m in lms.list_loaded_models()) == [TINY_KEY, TINY_CTX64_KEY]  # one instance each


def test_a_folder_outside_the_model_folders_is_named_after_it(fresh_kernel, tiny_path, tmp_path, transport):
    if transport == "server":
        pytest.skip("lmkernel serve refuses paths (tests/serve test the refusal)")
    copy = shutil.copytree(tiny_path, tmp_path / "my-model")
    folder = str(copy.resolve())  # named by its absolute path: "my-model" could be another model's key
    model = lms.llm(str(copy))
    info = model.get_info()
    assert (model.identifier, info.model_key, info.path) == (folder, folder, folder)
    assert lms.llm(folder) == model
    with pytest.raises(lms.LMStudioModelNotFoundError, match="No backend can load the folder"):
        lms.llm(str(tmp_path))


def test_unknown_key_lists_what_is_available(fresh_kernel, transport):
    with pytest.raises(lms.LMStudioModelNotFoundError) as info:
        lms.llm("aa/tinny")
    message = str(info.value)
    if transport == "server":  # a network caller is not shown the server's folders
        assert message == "No model in this server's catalog matches the key 'aa/tinny'"
        return
    assert message.startswith("No model matches the key 'aa/tinny'. Did you mean 'aa/tiny'? Available: "
                              "tiny (aa/tiny), tiny-ctx64 (aa/tiny-ctx64), ")


def test_concurrent_loads_are_deduplicated(fresh_kernel):
    handles = []
    threads = [threading.Thread(target=lambda: handles.append(lms.Client().llm.model(TINY))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {h.identifier for h in handles} == {TINY_KEY}
    assert [m.identifier for m in lms.list_loaded_models()] == [TINY_KEY]


def test_load_new_instance_and_unload(fresh_kernel):
    progress: list[float] = []
    with lms.Client() as client:
        first = client.llm.model(TINY)
        second = client.llm.load_new_instance(TINY, on_load_progress=progress.append)
        assert first.identifier == TINY_KEY and second.identifier == f"{TINY_KEY}:2"
        assert second.get_info().model_key == TINY_KEY and second.get_info().path == TINY
        assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(set(progress))
        with pytest.raises(lms.LMStudioServerError, match="identifier 'tiny' already exists"):
            client.llm.load_new_instance(TINY, TINY_KEY)
        assert [m.identifier for m in client.llm.list_loaded()] == [TINY_KEY, f"{TINY_KEY}:2"]
        second.unload()
        assert client.llm.list_loaded() == [first]
        with pytest.raises(lms.LMStudioModelNotFoundError):
            second.complete("x")


def test_list_downloaded_models(fresh_kernel):
    downloaded = lms.list_downloaded_models()
    shipped = ["lmkernel/kjv-demo"] if (demo_model_path() / "config.json").exists() else []
    assert [d.model_key for d in downloaded] == [TINY_KEY, TINY_CTX64_KEY, *shipped]
    assert [d.path for d in downloaded] == [TINY, TINY_CTX64, *shipped]
    assert lms.list_downloaded_models("embedding") == []
    with pytest.raises(lms.LMStudioValueError, match="Unknown model namespace: 'x'"):
        lms.list_downloaded_models("x")
    tiny = downloaded[0]
    assert tiny.info.architecture == "llama" and tiny.info.format == "safetensors"
    assert tiny.model().identifier == TINY_KEY


def test_without_local_models_the_demo_model_is_the_default(fresh_kernel, monkeypatch, tmp_path, transport):
    if transport == "server":
        pytest.skip("changes the model folders of this process, not of the server's")
    monkeypatch.setenv("LMKERNEL_MODELS", str(tmp_path / "empty"))
    monkeypatch.setenv("LMKERNEL_CACHE", str(tmp_path / "cache"))
    model = lms.llm()
    shipped = (demo_model_path() / "config.json").exists()
    assert model.identifier == ("lmkernel/kjv-demo" if shipped else "lmkernel/tiny-random-llama")
    model.unload()
    tiny = lms.llm("lmkernel/tiny-random-llama")  # still there by name, generated on first use
    assert (tmp_path / "cache" / "models" / "lmkernel" / "tiny-random-llama" / "config.json").exists()
    assert tiny.complete("The cat", config={"maxTokens": 3}).stats.predicted_tokens_count <= 3
    tiny.unload()
    shutil.rmtree(tmp_path / "cache")


def test_configure_default_client(fresh_kernel):
    lms.get_default_client()
    with pytest.raises(lms.LMStudioClientError, match="already created"):
        lms.configure_default_client("localhost:1234")


def test_an_unreachable_host_fails_on_first_use_not_in_the_constructor():
    client = lms.Client("127.0.0.1:9")  # as in LM Studio's SDK: nothing connects yet
    assert repr(client) == "Client(api_host='127.0.0.1:9')"
    with pytest.raises(lms.LMKernelConnectionError, match=r"lmkernel is not reachable at 127\.0\.0\.1:9"):
        with client:
            pass
    with pytest.raises(lms.LMKernelConnectionError, match=r"lmkernel is not reachable at 127\.0\.0\.1:9"):
        lms.Client("127.0.0.1:9").list_loaded_models()

    async def async_use():
        client = lms.AsyncClient("127.0.0.1:9")
        with pytest.raises(lms.LMKernelConnectionError, match=r"not reachable at 127\.0\.0\.1:9"):
            async with client:
                pass
        with pytest.raises(lms.LMKernelConnectionError, match=r"not reachable at 127\.0\.0\.1:9"):
            await lms.AsyncClient("127.0.0.1:9").llm.list_loaded()

    asyncio.run(async_use())
    trio.run(async_use)
    with pytest.raises(lms.LMKernelConnectionError, match="An API host is 'host:port', got 'nohost'"):
        lms.Client("nohost")
