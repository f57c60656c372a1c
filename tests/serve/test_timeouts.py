"""Header, body and idle timeouts, and the connection limit, on both protocols.

An in-process server on trio's autojump clock, with no model loaded: the default timeouts
(10 s head, 30 s body, 60 s idle) pass in no real time.
"""

from __future__ import annotations

import json

import trio

from lmkernel.kernel import messages as m
from lmkernel.kernel.serve import ServeConfig

from ..serve_helpers import in_process
from ._client import error_of, frame, http_request, native_session, parse_response, read_all, read_event, read_response

HEALTH = http_request("GET", "/health")


def test_defaults_are_seconds_to_a_minute():
    config = ServeConfig()
    assert (config.header_timeout, config.body_timeout, config.idle_timeout) == (10.0, 30.0, 60.0)
    assert (config.max_connections, config.max_models, config.send_buffer) == (256, 4, 1 << 20)


def test_a_silent_connection_is_closed_at_the_header_timeout():
    async def check(host, port):
        async with await trio.open_tcp_stream(host, port) as stream:
            start = trio.current_time()
            assert await read_all(stream) == b""
            assert 10 <= trio.current_time() - start < 11

    in_process(check)


def test_slowloris_headers_get_408_at_the_header_timeout():
    async def check(host, port):
        stream = await trio.open_tcp_stream(host, port)
        start = trio.current_time()

        async def dribble():
            try:
                for byte in b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 10_000:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.5)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            data = await read_all(stream)
            nursery.cancel_scope.cancel()
        status, headers, body = parse_response(data)
        assert (status, headers["connection"]) == (408, "close")
        assert error_of(body)["message"] == "The request head did not arrive within 10 s (--header-timeout)"
        assert 10 <= trio.current_time() - start < 11

    in_process(check)


def test_a_slow_body_gets_408_at_the_body_timeout():
    async def check(host, port):
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
            start = trio.current_time()
            status, headers, body = parse_response(await read_all(stream))
        assert (status, headers["connection"]) == (408, "close")
        assert error_of(body)["message"] == "The request body did not arrive within 30 s (--body-timeout)"
        assert 30 <= trio.current_time() - start < 31

    in_process(check)


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout():
    async def check(host, port):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(HEALTH)
        assert (await read_response(stream))[0] == 200
        await trio.sleep(59)  # still open: a second request is served
        await stream.send_all(HEALTH)
        status, _, body = await read_response(stream)
        assert status == 200 and json.loads(body)["status"] == "ok"
        start = trio.current_time()
        assert await read_all(stream) == b""  # closed, without a word: nothing was asked
        assert 60 <= trio.current_time() - start < 61
        await stream.aclose()

    in_process(check)


def test_native_handshake_frame_and_idle_timeouts_end_with_an_error_frame():
    async def silent_after_magic(host, port):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(m.MAGIC)
        buffer = bytearray()
        event = await read_event(stream, buffer)
        assert isinstance(event, m.Failed) and event.id == 0
        assert event.error.message == "Closing the connection: no Hello frame within 10 s (--header-timeout)"
        assert await read_event(stream, buffer) is None
        await stream.aclose()

    async def idle_session(host, port):
        stream, buffer = await native_session(host, port)
        await trio.sleep(50)
        await stream.send_all(frame(m.ListLoaded(id=1)))  # activity: the idle clock starts again
        assert isinstance(await read_event(stream, buffer), m.LoadedList)
        start = trio.current_time()
        event = await read_event(stream, buffer)
        assert isinstance(event, m.Failed) and event.id == 0 and event.error.kind == "server"
        assert event.error.message == "Closing the connection: idle for 60 s (--idle-timeout)"
        assert 59 <= trio.current_time() - start < 61
        assert await read_event(stream, buffer) is None
        await stream.aclose()

    async def half_a_frame(host, port):
        stream, buffer = await native_session(host, port)
        await stream.send_all(b"\x00\x00\x00\x64" + b"\x00" * 10)
        start = trio.current_time()
        event = await read_event(stream, buffer)
        assert isinstance(event, m.Failed) and event.error.message == (
            "Closing the connection: a request frame did not arrive whole within 30 s (--body-timeout)")
        assert 30 <= trio.current_time() - start < 31
        assert await read_event(stream, buffer) is None
        await stream.aclose()

    for check in (silent_after_magic, idle_session, half_a_frame):
        in_process(check)


def test_timeouts_are_configurable():
    config = ServeConfig(port=0, header_timeout=2, body_timeout=3, idle_timeout=4)

    async def check(host, port):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"GET /health HTTP/1.1\r\n")
        start = trio.current_time()
        status, _, body = parse_response(await read_all(stream))
        assert status == 408 and "within 2 s" in error_of(body)["message"]
        assert 2 <= trio.current_time() - start < 3
        await stream.aclose()
        stream, buffer = await native_session(host, port)
        start = trio.current_time()
        assert "idle for 4 s" in (await read_event(stream, buffer)).error.message
        assert 4 <= trio.current_time() - start < 5
        await stream.aclose()

    in_process(check, config)


LIMIT_MESSAGE = ("lmkernel serve is at its limit of 2 connections, all busy (--max-connections); "
                 "try again later")


def test_at_the_connection_limit_idle_connections_give_way_and_busy_ones_refuse():
    async def check(host, port):
        # Two idle connections fill the server; a third evicts the oldest and is served.
        first = await trio.open_tcp_stream(host, port)
        await trio.sleep(1)
        second = await trio.open_tcp_stream(host, port)
        await second.send_all(HEALTH)
        assert (await read_response(second))[0] == 200  # now idle between requests
        third = await trio.open_tcp_stream(host, port)
        start = trio.current_time()
        await third.send_all(HEALTH)
        assert (await read_response(third))[0] == 200
        assert await read_all(first) == b"" and trio.current_time() - start < 1  # evicted, at once
        for stream in (first, second, third):
            await stream.aclose()
        # Two native sessions are busy: a newcomer is refused in its own protocol.
        sessions = [await native_session(host, port) for _ in range(2)]
        http = await trio.open_tcp_stream(host, port)
        await http.send_all(HEALTH)
        status, headers, body = parse_response(await read_all(http))
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
        assert json.loads(body) == {"error": {"message": LIMIT_MESSAGE, "type": "server_error", "param": None,
                                              "code": "connection_limit"}}
        native = await trio.open_tcp_stream(host, port)
        await native.send_all(m.MAGIC + frame(m.Hello(id=0)))
        buffer = bytearray()
        refusal = await read_event(native, buffer)
        assert isinstance(refusal, m.Failed) and (refusal.error.kind, refusal.error.message) == (
            "server", LIMIT_MESSAGE)
        assert await read_event(native, buffer) is None
        # The sessions themselves carry on.
        for stream, buffer in sessions:
            await stream.send_all(frame(m.ListLoaded(id=3)))
            assert isinstance(await read_event(stream, buffer), m.LoadedList)
            await stream.aclose()
        await http.aclose()
        await native.aclose()

    in_process(check, ServeConfig(port=0, max_connections=2))


def test_serve_runs_in_a_thread_and_stops_on_its_event():
    import threading

    answers = []

    async def check(host, port):
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(HEALTH)
            answers.append((await read_response(stream))[0])

    thread = threading.Thread(target=in_process, args=(check,))  # no signals there: `stop` ends it
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and answers == [200]
