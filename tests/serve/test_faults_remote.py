"""The fault matrix through ``lmkernel serve``: the native protocol and the OpenAI HTTP API.

Same fault plugin and faults as ``tests/kernel/test_faults.py`` (in-process facades), in a
server subprocess that has the plugin on its ``PYTHONPATH``. The affected request ends with
a clear error within its bound, a stream on another model carries on, the server stays up
and the next request succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import lmkernel as lms

from ..conftest import TINY, TINY_KEY
from ..kernel.test_faults import (
    ENGINE_TIMEOUT,
    FAULTS_DIR,
    FAULTY,
    FAULTY_KEY,
    HANGS,
    LOAD_TIMEOUT,
    PREDICTION_FAULTS,
    SLACK,
    bounded,
    build_faulty_model,
    clear,
    expect_error,
    inject,
)
from ..serve_helpers import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-fault-models")
    folder = build_faulty_model(root)
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        "LMKERNEL_MODELS": os.environ["LMKERNEL_MODELS"] + os.pathsep + str(root),
        "LMKERNEL_ENGINE_TIMEOUT": str(ENGINE_TIMEOUT),
        "LMKERNEL_LOAD_TIMEOUT": str(LOAD_TIMEOUT),
    }
    s = Server("--model", TINY, "--any-model", "--allow-unload", env=env)
    s.faults = folder
    yield s
    assert s.stop() == 0


class NativeAPI:
    name = "native"

    def __init__(self, host: str) -> None:
        self.host = host

    def complete(self, key=FAULTY):
        with lms.Client(self.host) as client:
            return client.llm.model(key).complete("the cat sat", config={"maxTokens": 8, "temperature": 0})

    def load(self, key=FAULTY):
        with lms.Client(self.host) as client:
            return client.llm.model(key).identifier

    def unload(self, identifier=FAULTY_KEY):
        with lms.Client(self.host) as client:
            for model in client.llm.list_loaded():
                if model.identifier == identifier:
                    model.unload()
            assert identifier not in [model.identifier for model in client.llm.list_loaded()]


class HttpAPI:
    name = "http"

    def __init__(self, host: str) -> None:
        self.url = f"http://{host}"

    def complete(self, key=FAULTY):
        body = json.dumps({"model": key, "prompt": "the cat sat", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"{self.url}/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return HttpFailure(exc.code, json.loads(exc.read())["error"]["message"])

    load = complete


class HttpFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def apis(server):
    return [NativeAPI(server.host), HttpAPI(server.host)]


def expect_ok(api) -> None:
    result, _ = bounded(api.complete, limit=60)
    if isinstance(result, dict):
        assert result["choices"][0]["finish_reason"] in ("length", "stop"), result
    else:
        assert isinstance(result, lms.PredictionResult), result


def expect_failure(api, outcome, *fragments: str) -> None:
    if isinstance(api, HttpAPI):
        expect_error(outcome, HttpFailure, *fragments)
        assert outcome.status == 500
    else:
        expect_error(outcome, lms.LMKernelBackendError, *fragments)


class RemoteBystander:
    """A stream on another model of the same server while the fault happens."""

    def __init__(self, host: str) -> None:
        self.result = self.error = None
        self._thread = threading.Thread(target=self._run, args=(host,), daemon=True)
        self._thread.start()

    def _run(self, host: str) -> None:
        try:
            with lms.Client(host) as client:
                self.result = client.llm.model(TINY).complete("the dog", config={"maxTokens": 60, "temperature": 0})
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def check(self) -> None:
        self._thread.join(30)
        assert self.error is None, self.error
        assert self.result.stats.stop_reason in ("maxPredictedTokensReached", "eosFound")


@pytest.mark.parametrize("which", [0, 1], ids=["native", "http"])
@pytest.mark.parametrize(("method", "mode", "message"), PREDICTION_FAULTS, ids=lambda v: str(v)[:12])
def test_engine_fault_over_the_network(server, which, method, mode, message):
    api = apis(server)[which]
    expect_ok(api)
    bystander = RemoteBystander(server.host)
    inject(server.faults, method, mode, after=1 if method == "step" else 0)
    outcome, _ = bounded(api.complete, limit=30)
    expect_failure(api, outcome, message)
    bystander.check()
    clear(server.faults)
    expect_ok(api)


@pytest.mark.parametrize("which", [0, 1], ids=["native", "http"])
@pytest.mark.parametrize(("method", "after"), HANGS, ids=lambda v: str(v))
def test_hung_engine_call_over_the_network(server, which, method, after):
    api = apis(server)[which]
    expect_ok(api)
    inject(server.faults, method, "hang", after=after, seconds=ENGINE_TIMEOUT + 4)
    outcome, elapsed = bounded(api.complete, limit=ENGINE_TIMEOUT + SLACK + 10)
    expect_failure(api, outcome, "did not return within 2 s")
    assert elapsed < ENGINE_TIMEOUT + SLACK
    clear(server.faults)
    expect_ok(api)


@pytest.mark.parametrize("which", [0, 1], ids=["native", "http"])
@pytest.mark.parametrize(("mode", "message"), [
    ("raise", "InjectedFault: injected fault in load"),
    ("malformed", "Engine.context_length must be a positive integer, got -1"),
    ("hang", "did not return within 4 s"),
])
def test_load_fault_over_the_network(server, which, mode, message):
    api = apis(server)[which]
    NativeAPI(server.host).unload()
    inject(server.faults, "load", mode, seconds=LOAD_TIMEOUT + 4)
    outcome, elapsed = bounded(api.load, limit=LOAD_TIMEOUT + SLACK + 10)
    expect_failure(api, outcome, message)
    assert elapsed < LOAD_TIMEOUT + SLACK
    clear(server.faults)
    expect_ok(api)


def test_describe_with_a_bad_format_does_not_break_listing(server):
    inject(server.faults, "describe", "malformed")
    with lms.Client(server.host) as client:
        keys = [m.model_key for m in client.list_downloaded_models()]
    assert TINY_KEY in keys and FAULTY_KEY in keys  # MLX still describes the folder; the bad answer is skipped
    with urllib.request.urlopen(f"http://{server.host}/v1/models", timeout=30) as response:
        assert TINY_KEY in {m["id"] for m in json.loads(response.read())["data"]}
    clear(server.faults)


def test_remove_fault_on_a_native_cancel(server):
    api = NativeAPI(server.host)
    expect_ok(api)
    inject(server.faults, "remove", "raise")
    with lms.Client(server.host) as client:
        stream = client.llm.model(FAULTY).complete_stream("the cat", config={"maxTokens": 500, "temperature": 0})
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
        assert stream.result().stats.stop_reason == "userStopped"
    clear(server.faults)
    expect_ok(api)


def test_remove_fault_when_an_http_client_goes_away(server):
    api = HttpAPI(server.host)
    expect_ok(api)
    inject(server.faults, "remove", "raise")
    body = json.dumps({"model": FAULTY, "prompt": "the cat", "max_tokens": 100_000, "stream": True}).encode()
    host, port = server.host.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")  # streaming: then the client leaves
    time.sleep(0.5)
    clear(server.faults)
    expect_ok(api)  # the server cancelled it, replaced the engine, and goes on


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_close_fault_on_a_native_unload(server, mode):
    api = NativeAPI(server.host)
    expect_ok(api)
    inject(server.faults, "close", mode, seconds=ENGINE_TIMEOUT + 4)
    outcome, _ = bounded(api.unload, limit=ENGINE_TIMEOUT + SLACK + 10)
    assert outcome is None, outcome
    clear(server.faults)
    expect_ok(api)
