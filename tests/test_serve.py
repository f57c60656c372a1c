"""``lmkernel serve``: the OpenAI API (through the official client), auth, disconnects,
malformed input, graceful shutdown, and a bounded reliability run. Loopback only."""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

import lmkernel as lms
from lmkernel.kernel import messages as m

from .conftest import TINY, TINY_KEY
from .serve_helpers import Server


@pytest.fixture(scope="module")
def server():
    s = Server("--model", TINY)
    yield s
    assert s.stop() == 0


@pytest.fixture
def oai(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def expected(prompt: str, n: int) -> str:
    """What the same greedy request gives in-process."""
    return lms.llm(TINY).complete(prompt, config={"maxTokens": n, "temperature": 0, "repeatPenalty": False,
                                                  "topKSampling": 0, "minPSampling": False}).content


def test_models_and_health(server, oai):
    ids = [model.id for model in oai.models.list().data]
    assert ids == [TINY_KEY]  # what the operator serves, once, not the whole catalog (that takes --any-model)
    health = server.health()
    assert health["status"] == "ok" and health["models"] == [TINY_KEY]


def test_completion_matches_in_process(oai):
    result = oai.completions.create(model=TINY, prompt="The cat sat on the", max_tokens=12, temperature=0)
    assert result.choices[0].text == expected("The cat sat on the", 12)
    assert result.choices[0].finish_reason in ("length", "stop")
    assert result.usage.completion_tokens <= 12 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streaming_with_usage_and_stop(oai):
    full = expected("Once upon a time", 20)
    stop = full[len(full) // 2:][:2]
    pieces, usage, finish = [], None, None
    for chunk in oai.completions.create(model=TINY, prompt="Once upon a time", max_tokens=20, temperature=0,
                                        stop=[stop], stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == full[: full.index(stop)]
    assert finish == "stop" and usage is not None and usage.completion_tokens >= 1


def test_sampling_settings(oai):
    result = oai.completions.create(model=TINY, prompt="The cat", max_tokens=5, temperature=0.8, top_p=0.9)
    assert result.usage.completion_tokens <= 5 and result.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (b"{not json", 400, None, "The request body is not valid JSON"),
        (json.dumps({"prompt": "x", "max_tokenz": 3}).encode(), 400, "max_tokenz", "unknown field `max_tokenz`"),
        (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens", "Expected `int | null`"),
        (json.dumps({"prompt": "x", "seed": 3}).encode(), 400, "seed", "'seed' is not supported"),
        (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n", "'n' is not supported"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model", "Model 'nope' is not served here"),
        (json.dumps({"model": TINY, "prompt": "x", "temperature": -1}).encode(), 400, "temperature", "'temperature'"),
        (json.dumps({"max_tokens": 3}).encode(), 400, "prompt", "missing required field `prompt`"),
    ],
)
def test_bad_bodies_get_400s_naming_the_field(server, body, status, param, message):
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == status
    error = json.loads(info.value.read())["error"]
    info.value.close()
    assert message in error["message"]
    if param:
        assert error["param"] == param


def test_unknown_route_and_method(server):
    for url, method, code in ((f"{server.url}/v2/nothing", "GET", 404), (f"{server.url}/v1/completions", "GET", 405)):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10)
        assert info.value.code == code
        info.value.close()


def _native(host: str) -> socket.socket:
    address, port = host.rsplit(":", 1)
    sock = socket.create_connection((address, int(port)), timeout=30)
    sock.sendall(m.MAGIC)
    return sock


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv(sock: socket.socket) -> m.Event:
    header = sock.recv(4, socket.MSG_WAITALL)
    (size,) = struct.unpack(">I", header)
    return m.decode_event(sock.recv(size, socket.MSG_WAITALL))


def test_malformed_native_frames_get_an_error_and_the_connection_goes_on(server):
    sock = _native(server.host)
    _send(sock, m.encode(m.Hello(id=0)))
    assert isinstance(_recv(sock), m.Welcome)
    _send(sock, b"\x93garbage")
    error = _recv(sock)
    assert isinstance(error, m.Failed) and error.id == 0 and "Malformed request frame" in error.error.message
    _send(sock, m.encode(m.ListLoaded(id=7)))
    listed = _recv(sock)
    assert isinstance(listed, m.LoadedList) and listed.id == 7
    sock.close()


def _open_stream(server, prompt: str = "The cat") -> socket.socket:
    """POST a streaming completion on a raw socket and read until the first event."""
    body = json.dumps({"model": TINY, "prompt": prompt, "max_tokens": 100_000, "stream": True}).encode()
    address, port = server.host.rsplit(":", 1)
    sock = socket.create_connection((address, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    return sock


def _predictions(server) -> int:
    return server.health()["predictions"]


def _wait_idle(server, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while _predictions(server) and time.time() < deadline:
        time.sleep(0.05)
    assert _predictions(server) == 0


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(server, oai):
    # Native: close the client mid-stream.
    client = lms.Client(server.host)
    stream = client.llm.model(TINY).complete_stream("The cat", config={"maxTokens": 100_000})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    client.close()
    _wait_idle(server)
    # HTTP: drop the socket in the middle of an event stream.
    with _open_stream(server):
        assert _predictions(server) == 1
    _wait_idle(server)
    # Everyone else is still served.
    assert oai.completions.create(model=TINY, prompt="The cat sat on the", max_tokens=12,
                                  temperature=0).choices[0].text == expected("The cat sat on the", 12)


def test_api_key_is_required_on_both_protocols():
    server = Server("--api-key", "s3cret", "--model", TINY)
    try:
        # As in LM Studio's SDK, a client connects on `with` or on its first call, not in its constructor.
        with pytest.raises(lms.LMKernelError, match="Invalid or missing API token"):
            with lms.Client(server.host):
                pass
        with pytest.raises(lms.LMKernelError, match="Invalid or missing API token"):
            lms.Client(server.host, api_token="wrong").llm.list_loaded()
        with lms.Client(server.host, api_token="s3cret") as client:
            assert [model.identifier for model in client.llm.list_loaded()] == [TINY_KEY]
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        bad.close()
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert [model.id for model in good.models.list().data] == [TINY_KEY]
        good.close()
    finally:
        assert server.stop() == 0


class _FakeStream:
    """A connection from ``address`` carrying ``data``: what the server's handler sees."""

    def __init__(self, address: str, data: bytes) -> None:
        self.socket = type("Socket", (), {"getpeername": lambda _self: (address, 40000)})()
        self.data, self.sent, self.closed = data, b"", False

    async def receive_some(self, _max: int) -> bytes:
        data, self.data = self.data, b""
        return data

    async def send_all(self, data: bytes) -> None:
        self.sent += data

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("address", ["192.0.2.7", "2001:db8::1"])
def test_other_hosts_are_refused_without_a_key_or_opt_in(address):
    import trio

    from lmkernel.kernel._kernel import Kernel
    from lmkernel.kernel.serve import ServeConfig, _Server
    from lmkernel.kernel.serve._policy import ModelPolicy

    assert ServeConfig().host == "127.0.0.1"  # loopback by default
    http = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"

    async def handle(data: bytes, config: ServeConfig, kernel: Kernel | None = None) -> bytes:
        stream = _FakeStream(address, data)
        policy = ModelPolicy(kernel, any_model=False, allow_unload=False, max_models=4)
        await _Server(kernel, config, policy).connection(stream)
        assert stream.closed
        return stream.sent

    refused = trio.run(handle, http, ServeConfig())
    assert refused.startswith(b"HTTP/1.1 403 Forbidden") and b"--allow-remote" in refused
    native = trio.run(handle, m.MAGIC + b"\x00\x00\x00\x01x", ServeConfig())
    event = m.decode_event(native[4:])
    assert isinstance(event, m.Failed) and event.error.kind == "unauthorized"

    async def allowed() -> bytes:
        kernel = Kernel()
        async with trio.open_nursery() as nursery:
            await nursery.start(kernel.serve)
            sent = await handle(http, ServeConfig(allow_remote=True), kernel)
            kernel.shutdown()
        return sent

    assert trio.run(allowed).startswith(b"HTTP/1.1 200")


def test_graceful_shutdown_ends_streams_cleanly():
    server = Server("--model", TINY)
    client = lms.Client(server.host)
    stream = client.llm.model(TINY).complete_stream("The cat", config={"maxTokens": 100_000})
    sock = _open_stream(server)
    fragments = 0
    stopper = threading.Thread(target=server.stop)
    for fragment in stream:
        fragments += 1
        if fragments == 3:
            stopper.start()
    assert stream.result().stats.stop_reason == "modelUnloaded"
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    assert b"data: [DONE]" in received and received.endswith(b"0\r\n\r\n")  # the chunked body ended
    assert b'"finish_reason": "stop"' in received
    sock.close()
    client.close()
    stopper.join(60)
    assert server.proc.returncode == 0
    assert any("shutting down" in line for line in server.lines)


def test_reliability_32_clients_both_apis_killed_streams_and_garbage(server):
    """32 concurrent clients (16 native, 16 HTTP), a third killed mid-stream, garbage interleaved;
    afterwards every well-formed request is answered correctly. Bounded: about a minute."""
    prompts = ["The cat sat on the", "Once upon a time", "$ ls -l\n", "Hello"]
    want = {p: expected(p, 10) for p in prompts}
    rng = random.Random(11)
    errors: list[str] = []
    address, port = server.host.rsplit(":", 1)

    def native(i: int) -> None:
        with lms.Client(server.host) as client:
            model = client.llm.model(TINY)
            for round_ in range(3):
                prompt = prompts[(i + round_) % 4]
                if rng.random() < 0.33:
                    stream = model.complete_stream(prompt, config={"maxTokens": 10_000})
                    for j, _ in enumerate(stream):
                        if j == 2:
                            break
                    continue
                got = model.complete(prompt, config={"maxTokens": 10, "temperature": 0, "repeatPenalty": False,
                                                     "topKSampling": 0, "minPSampling": False}).content
                if got != want[prompt]:
                    errors.append(f"native {i}: {got!r} != {want[prompt]!r}")

    def http(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        try:
            for round_ in range(3):
                prompt = prompts[(i + round_) % 4]
                roll = rng.random()
                if roll < 0.2:  # garbage on a raw socket
                    with socket.create_connection((address, int(port)), timeout=30) as s:
                        s.sendall(rng.choice([b"\x00\x01garbage\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n"
                                              b"content-length: 5\r\n\r\n{bad}", m.MAGIC + b"\xff\xff\xff\xff"]))
                        s.settimeout(10)
                        try:
                            s.recv(4096)
                        except OSError:
                            pass
                    continue
                if roll < 0.45:  # killed mid-stream
                    body = json.dumps({"model": TINY, "prompt": prompt, "max_tokens": 10_000, "stream": True})
                    with socket.create_connection((address, int(port)), timeout=30) as s:
                        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(body), body.encode()))
                        s.recv(4096)
                    continue
                got = client.completions.create(model=TINY, prompt=prompt, max_tokens=10, temperature=0)
                if got.choices[0].text != want[prompt]:
                    errors.append(f"http {i}: {got.choices[0].text!r} != {want[prompt]!r}")
        finally:
            client.close()

    started = time.time()
    threads = [threading.Thread(target=native if i < 16 else http, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)
    assert time.time() - started < 180
    assert errors == []
    _wait_idle(server, 20)
    for prompt in prompts:  # and afterwards, correct answers
        with lms.Client(server.host) as client:
            got = client.llm.model(TINY).complete(prompt, config={
                "maxTokens": 10, "temperature": 0, "repeatPenalty": False, "topKSampling": 0, "minPSampling": False})
            assert got.content == want[prompt]
