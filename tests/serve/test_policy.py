"""The model policy of ``lmkernel serve`` on both protocols: operator models only by default,
the catalog with ``--any-model``, never a filesystem path, ``--max-models``, ``--allow-unload``."""

from __future__ import annotations

import json
import shutil

import pytest

from lmkernel.kernel import messages as m
from lmkernel.kernel.serve._policy import looks_like_path

from ..conftest import TINY, TINY_CTX64, TINY_CTX64_KEY, TINY_KEY
from ..serve_helpers import Server
from ._client import exchange, frame, http_request, native_socket, parse_response, recv_event

NOT_SERVED = ("Model {key!r} is not served here (served: 'tiny'); the operator names the models with --model, "
              "or allows any model of the server's catalog with --any-model")
A_PATH = ("Model key {key!r} looks like a filesystem path: lmkernel serve never loads a model by path for a network "
          "caller; use a model key")
OPERATORS = ("Model {key!r} was loaded by the server's operator (--model) and is not unloaded over the network "
             "(the operator allows it with --allow-unload)")


@pytest.fixture(scope="module")
def strict():
    server = Server("--model", TINY)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def open_server():
    server = Server("--model", TINY, "--any-model", "--allow-unload", "--max-models", "2")
    yield server
    assert server.stop() == 0


def complete(server: Server, model: str | None, max_tokens: int = 3) -> tuple[int, dict]:
    body = {"prompt": "The cat", "max_tokens": max_tokens, "temperature": 0}
    if model is not None:
        body["model"] = model
    request = http_request("POST", "/v1/completions", json.dumps(body).encode(), {"connection": "close"})
    status, _, data = parse_response(exchange(server.host, request))
    return status, json.loads(data)


def ask(server: Server, request: m.Request) -> m.Event:
    """Send one native request on a fresh session; its terminal event."""
    with native_socket(server.host) as sock:
        sock.sendall(frame(request))
        while not m.is_terminal(event := recv_event(sock)):
            pass
        return event


@pytest.mark.parametrize(
    ("key", "path"),
    [("/srv/models/x", True), ("~", True), ("~root/models", True), ("./aa/tiny", True), (".hidden", True),
     ("aa/../../etc", True), ("..", True), ("aa\\tiny", True), ("C:\\models", True), ("c:x", True),
     ("aa//tiny", True), ("aa/tiny", False), ("tiny", False), ("publisher/repo/file.gguf", False),
     ("lmkernel/kjv-demo", False), ("qwen2.5-7b-instruct", False)],
)
def test_what_looks_like_a_path(key, path):
    assert looks_like_path(key) is path


def test_paths_are_refused_without_saying_whether_they_exist(strict, open_server, models_dir, tmp_path):
    keys = [str(models_dir / TINY), str(tmp_path), str(tmp_path / "missing"), "~", "~root/.ssh", "../aa/tiny",
            "aa/../../etc", "C:\\Windows", "aa\\tiny"]
    for server in (strict, open_server):
        for key in keys:
            status, body = complete(server, key)
            assert (status, body["error"]["message"], body["error"]["param"]) == (400, A_PATH.format(key=key),
                                                                                 "model")
            for new_instance in (False, True):
                event = ask(server, m.Load(id=4, model=key, new_instance=new_instance))
                assert isinstance(event, m.Failed) and event.id == 4
                assert (event.error.kind, event.error.message) == ("value", A_PATH.format(key=key))
    assert strict.health()["models"] == open_server.health()["models"] == [TINY_KEY]


def test_odd_keys_are_refused_as_values(strict):
    for key, message in [("y" * 600, "Model key of 600 characters is over the limit of 512"),
                         ("", "Model key '' is empty or has control characters"),
                         ("a\x00b", "Model key 'a\\x00b' is empty or has control characters")]:
        status, body = complete(strict, key)
        assert (status, body["error"]["message"]) == (400, message)
        assert ask(strict, m.Load(id=1, model=key)).error.message == message


def test_only_the_operators_models_by_default(strict):
    status, body = complete(strict, TINY_CTX64)
    assert (status, body["error"]["message"]) == (404, NOT_SERVED.format(key=TINY_CTX64))
    assert ask(strict, m.Load(id=2, model="tiny-ctx64")).error.message == NOT_SERVED.format(key="tiny-ctx64")
    status, body = complete(strict, None)  # no model named: the loaded one
    assert status == 200 and body["model"] == TINY_KEY  # the instance, named by its key
    for key in (TINY, TINY_KEY):  # the operator's key (a path) and the instance's identifier
        status, body = complete(strict, key)
        assert status == 200 and body["model"] == TINY_KEY
    listed = ask(strict, m.ListDownloaded(id=3))
    assert [(info.model_key, info.path) for info in listed.models] == [(TINY_KEY, TINY)]  # not the whole catalog
    status, _, data = parse_response(exchange(strict.host, http_request("GET", "/v1/models", None,
                                                                        {"connection": "close"})))
    assert [model["id"] for model in json.loads(data)["data"]] == [TINY_KEY]  # one model, listed once
    assert strict.health()["models"] == [TINY_KEY]


def test_unload_and_new_instances_over_the_network(strict):
    assert ask(strict, m.GetInfo(id=1, model=TINY)).info.path == TINY
    for key in (TINY, TINY_KEY):  # its path (the operator's key) and its identifier
        event = ask(strict, m.Unload(id=5, model=key))
        assert (event.error.kind, event.error.message) == ("value", OPERATORS.format(key=key))
    with native_socket(strict.host) as sock:  # a new instance is the caller's: it may unload it
        sock.sendall(frame(m.Load(id=6, model=TINY, new_instance=True)))
        while not m.is_terminal(loaded := recv_event(sock)):
            pass
        assert loaded.info.identifier == f"{TINY_KEY}:2"
        sock.sendall(frame(m.Unload(id=7, model=f"{TINY_KEY}:2")))
        assert isinstance(recv_event(sock), m.Done)
    assert strict.health()["models"] == [TINY_KEY]


def test_any_model_loads_catalog_keys_up_to_the_cap(open_server):
    status, body = complete(open_server, TINY_CTX64)
    assert status == 200 and body["model"] == TINY_CTX64_KEY
    for key in (TINY_CTX64_KEY, "Tiny-CTX64", TINY_KEY):  # other names of loaded models: no new load
        status, body = complete(open_server, key)
        assert status == 200 and body["model"] == key.lower()
    assert open_server.health()["models"] == [TINY_KEY, TINY_CTX64_KEY]
    event = ask(open_server, m.Load(id=8, model=TINY, new_instance=True))
    assert (event.error.kind, event.error.message) == (
        "queue_full", "This server holds its limit of 2 loaded model(s) (--max-models); cannot load 'aa/tiny'")
    status, body = complete(open_server, "nope")
    assert (status, body["error"]["message"]) == (404, "No model in this server's catalog matches the key 'nope'")
    status, _, data = parse_response(exchange(open_server.host, http_request("GET", "/v1/models", None,
                                                                             {"connection": "close"})))
    assert [model["id"] for model in json.loads(data)["data"]][:2] == [TINY_KEY, TINY_CTX64_KEY]
    # --allow-unload: the operator's model too; asking for it again loads it from where it was.
    assert isinstance(ask(open_server, m.Unload(id=9, model=TINY)), m.Done)
    assert isinstance(ask(open_server, m.Unload(id=9, model=TINY_CTX64)), m.Done)
    assert open_server.health()["models"] == []
    status, _, data = parse_response(exchange(open_server.host, http_request("GET", "/v1/models", None,
                                                                             {"connection": "close"})))
    ids = [model["id"] for model in json.loads(data)["data"]]
    assert ids[0] == TINY and TINY_KEY not in ids  # the operator's model once, under the operator's name
    assert complete(open_server, None)[1]["model"] == TINY_KEY  # nothing loaded: the operator's first model
    assert open_server.health()["models"] == [TINY_KEY]


def test_no_model_named_and_none_loaded_is_refused_without_operator_models():
    server = Server()
    try:
        status, body = complete(server, None)
        assert (status, body["error"]["param"]) == (404, "model")
        assert body["error"]["message"] == ("No model is loaded on this server, and it loads no model on request "
                                            "(the operator names models with --model)")
    finally:
        assert server.stop() == 0


def test_an_operators_model_from_a_folder_is_served_by_its_name(models_dir, tmp_path):
    """A folder outside the models folders is named by its absolute path: the operator's instance of
    one answers to that name (the server publishes it), while any other path is still refused."""
    folder = shutil.copytree(models_dir / TINY, tmp_path / "run7")
    name = str(folder.resolve())
    server = Server("--model", str(folder))
    try:
        assert server.health()["models"] == [name]
        status, body = complete(server, name)
        assert status == 200 and body["model"] == name
        event = ask(server, m.Load(id=1, model=name))
        assert isinstance(event, m.Loaded) and event.info.identifier == name and event.already_loaded
        for key in (str(tmp_path), name + "/", str(models_dir / TINY)):
            status, body = complete(server, key)
            assert (status, body["error"]["message"]) == (400, A_PATH.format(key=key))
        event = ask(server, m.Unload(id=2, model=name))
        assert (event.error.kind, event.error.message) == ("value", OPERATORS.format(key=name))
        assert server.health()["models"] == [name]
    finally:
        assert server.stop() == 0
