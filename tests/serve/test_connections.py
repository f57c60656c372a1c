"""What a connection may cost the server: a client that leaves cancels its work, a client that
does not read is dropped, duplicate request ids are refused, and startup fails in one line."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time

import pytest
import trio

from lmkernel.kernel import messages as m
from lmkernel.kernel._kernel import Kernel
from lmkernel.kernel.serve import ServeConfig

from ..conftest import TINY
from ..serve_helpers import Server, in_process
from ._client import (
    connect,
    frame,
    http_request,
    native_socket,
    read_event,
    recv_all,
    recv_event,
)

LONG = {"maxTokens": 100_000, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    s = Server("--model", TINY)
    yield s
    assert s.stop() == 0


def wait_for(predicate, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_leaves_a_whole_completion_cancels_it(server):
    body = json.dumps({"model": TINY, "prompt": "The cat", "max_tokens": 100_000}).encode()
    sock = connect(server.host)
    sock.sendall(http_request("POST", "/v1/completions", body))
    wait_for(lambda: server.health()["predictions"] == 1)
    sock.close()
    wait_for(lambda: server.health()["predictions"] == 0, 5)
    # A client that only half-closes (sent its request, then EOF) has left too.
    sock = connect(server.host)
    sock.sendall(http_request("POST", "/v1/completions", body))
    wait_for(lambda: server.health()["predictions"] == 1)
    sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: server.health()["predictions"] == 0, 5)
    assert sock.recv(100) == b""
    sock.close()


def test_pipelined_requests_while_generating_are_kept(server):
    short = json.dumps({"model": TINY, "prompt": "The cat", "max_tokens": 5, "temperature": 0}).encode()
    with connect(server.host) as sock:
        sock.sendall(http_request("POST", "/v1/completions", short) + http_request("GET", "/health"))
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            data += sock.recv(65536)
    assert b'"text_completion"' in data and b'"status": "ok"' in data


def test_two_requests_with_one_id_on_a_connection_the_second_is_refused(server):
    with native_socket(server.host) as sock:
        predict = frame(m.Predict(id=5, model=TINY, prompt="The cat", config={"maxTokens": 20, "temperature": 0}))
        sock.sendall(predict + predict)
        refusal = recv_event(sock)
        assert isinstance(refusal, m.Failed) and refusal.id == 5 and refusal.error.kind == "value"
        assert refusal.error.message == ("Request id 5 is already in flight on this connection (ids must stay "
                                         "unique until their request ends)")
        events = []
        while not isinstance(event := recv_event(sock), m.Finished):
            events.append(event)
        assert event.id == 5 and event.stats.predicted_tokens_count == 20  # the first ran, once
        sock.sendall(predict)  # ended: the id may be used again
        while not m.is_terminal(event := recv_event(sock)):
            pass
        assert isinstance(event, m.Finished)


def test_a_native_client_that_does_not_read_is_dropped_at_the_send_buffer():
    kernel = Kernel()

    async def check(host, port):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        await stream.send_all(m.MAGIC + frame(m.Hello(id=0)))
        buffer = bytearray()
        assert isinstance(await read_event(stream, buffer), m.Welcome)
        await stream.send_all(b"".join(frame(m.Predict(id=i, model=TINY, prompt="The cat", config=LONG))
                                       for i in range(1, 9)))
        with trio.fail_after(60):  # and never read: the server drops it, its predictions end
            while kernel.load_summary()["predictions"] == 0:
                await trio.sleep(0.05)
            while kernel.load_summary()["predictions"]:
                await trio.sleep(0.05)
            while await read_event(stream, buffer) is not None:
                pass
        await stream.aclose()
        async with await trio.open_tcp_stream(host, port) as other:  # everyone else is served
            await other.send_all(http_request("GET", "/health"))
            assert (await other.receive_some(65536)).startswith(b"HTTP/1.1 200")

    in_process(check, ServeConfig(port=0, models=[TINY], idle_timeout=600, send_buffer=16384), autojump=False,
               kernel=kernel)


@pytest.mark.parametrize(("send_buffer", "idle_timeout"), [(16384, 600), (ServeConfig.send_buffer, 2)],
                         ids=["buffer-full", "idle-timeout"])
def test_an_http_stream_that_is_not_read_is_dropped(send_buffer, idle_timeout):
    """A client that stops reading is dropped when its send buffer fills, or when a write makes
    no progress for the idle timeout; its prediction is cancelled either way."""
    kernel = Kernel()

    async def check(host, port):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        body = json.dumps({"model": TINY, "prompt": "The cat", "max_tokens": 1_000_000, "stream": True}).encode()
        await stream.send_all(http_request("POST", "/v1/completions", body))
        with trio.fail_after(60):
            while kernel.load_summary()["predictions"] == 0:
                await trio.sleep(0.05)
            while kernel.load_summary()["predictions"]:
                await trio.sleep(0.05)
        await stream.aclose()

    config = ServeConfig(port=0, models=[TINY], idle_timeout=idle_timeout, send_buffer=send_buffer)
    in_process(check, config, autojump=False, kernel=kernel)


def lmkernel_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmkernel", "serve", *args], capture_output=True, text=True,
                          check=False, timeout=timeout)


def test_a_taken_port_fails_in_one_line_before_loading_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.time()
        result = lmkernel_serve("--port", str(port), "--model", TINY)
    assert result.returncode == 1 and result.stdout == ""  # nothing was loaded
    assert result.stderr == f"lmkernel serve: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert time.time() - started < 30


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--model", "nope"], "lmkernel serve: cannot load 'nope': No model matches the key 'nope'."),
        (["--model", TINY, "--model", "aa/tiny-ctx64", "--max-models", "1"],
         "lmkernel serve: --max-models 1 is below the 2 models given with --model"),
        (["--idle-timeout", "0"], "lmkernel serve: --idle-timeout must be a positive number of seconds, got 0.0"),
        (["--max-connections", "-3"], "lmkernel serve: --max-connections must be a positive integer, got -3"),
        (["--host", "no.such.host.invalid", "--api-key", "k"],
         "lmkernel serve: cannot listen on no.such.host.invalid:0: "),
    ],
)
def test_startup_failures_are_one_line_and_exit_1(args, error):
    result = lmkernel_serve("--port", "0", *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(error) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_the_open_file_limit_is_raised_for_the_connections_allowed():
    from lmkernel.kernel.serve._limits import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_file_limit(1000) == (min(1000, hard), hard)
        assert raise_open_file_limit(100) == (min(1000, hard), hard)  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    server = Server("--model", TINY, "--max-connections", "3000")  # after the model (and its engine) loaded
    try:
        with open(f"/proc/{server.proc.pid}/limits") as limits:
            line = next(line for line in limits if line.startswith("Max open files"))
        server_soft, server_hard = (int(v) if v != "unlimited" else 2**62 for v in line.split()[3:5])
        assert server_soft >= min(server_hard, 3000 + 64 + 64 + 256)
    finally:
        assert server.stop() == 0


def test_an_answer_sent_before_the_whole_body_is_read_reaches_the_client(server):
    # 413 on the declared length, while the body is still coming: the answer arrives. (The server
    # drains what still comes before it closes, as Apache and nginx do, so that a reset cannot
    # destroy the answer on the client's side; Linux loopback keeps it either way.)
    for _ in range(5):
        with connect(server.host) as sock:
            try:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n"
                             + b"a" * 500_000)
            except OSError:
                pass
            time.sleep(0.2)
            data = recv_all(sock)
        assert data.startswith(b"HTTP/1.1 413 "), data[:100]
