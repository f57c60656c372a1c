"""Every malformed input gets an answer, and a handler that fails ends only its connection.

An in-process server on trio's autojump clock, with no model loaded: these requests are
refused before any model is needed.
"""

from __future__ import annotations

import json

import pytest
import trio

from lmkernel.kernel import messages as m
from lmkernel.kernel.serve import ServeConfig
from lmkernel.kernel.serve._native import NativeConnection
from lmkernel.kernel.serve._openai import OpenAIHandler

from ..serve_helpers import in_process
from ._client import error_of, frame, http_request, native_session, read_all, read_event, read_response


def answer(request: bytes, config: ServeConfig | None = None, shut: bool = False) -> tuple[int, dict, bytes]:
    """Send ``request`` on a fresh connection; the whole response (the server closes, or we do)."""
    result = []

    async def check(host, port):
        async with await trio.open_tcp_stream(host, port) as stream, trio.open_nursery() as nursery:
            nursery.start_soon(send, stream)
            result.append(await read_response(stream))

    async def send(stream):
        try:
            await stream.send_all(request)
            if shut:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the server answered before it read everything, and closed

    in_process(check, config)
    return result[0]


def completion(body: bytes) -> bytes:
    return http_request("POST", "/v1/completions", body)


MAX64 = "from 1 to 9223372036854775807 (or null: no limit)"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b'{"prompt": "\xff\xfe"}', None, "The request body is not valid JSON: Invalid UTF-8 encoded string"),
        (b"\xc3\x28", None, "The request body is not valid JSON"),
        (b"<html>", None, "The request body is not valid JSON"),
        (b"", None, "The request body is not valid JSON"),
        (b'{"prompt": "x", "max_tokens": 18446744073709551616}', "max_tokens",
         f"'max_tokens' must be an integer {MAX64}, got 18446744073709551616"),
        (b'{"prompt": "x", "max_tokens": 9223372036854775808}', "max_tokens",
         f"'max_tokens' must be an integer {MAX64}, got 9223372036854775808"),
        (b'{"prompt": "x", "max_tokens": -1}', "max_tokens", f"'max_tokens' must be an integer {MAX64}, got -1"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens", f"'max_tokens' must be an integer {MAX64}, got 0"),
        (b'{"prompt": "x", "max_tokens": 1' + b"0" * 30 + b"}", "max_tokens",
         f"'max_tokens' must be an integer {MAX64}, got an integer of 100 bits"),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens", "Integer value out of range"),
        (b'{"prompt": "x", "temperature": 1e999}', "temperature", "Number out of range"),
        (b'{"prompt": "x", "temperature": NaN}', None, "The request body is not valid JSON"),
        (b'{"prompt": "x", "top_p": Infinity}', None, "The request body is not valid JSON"),
        (b'{"prompt": "x", "stream_options": {"include_usage": 3}}', "stream_options", "Expected `bool`"),
        (b'{"prompt": "\\ud800"}', None, "The request body is not valid JSON"),
        (b'{"prompt": "x", "seed": 18446744073709551616}', "seed", "'seed' is not supported"),
        (b'[1, 2]', None, "Expected `object`, got `array`"),
    ],
)
def test_malformed_bodies_get_400_naming_the_field(body, param, message):
    status, _, data = answer(completion(body))
    error = error_of(data)
    assert status == 400 and message in error["message"], error
    assert error["param"] == param


def test_oversized_heads_and_bodies_get_431_and_413():
    status, headers, body = answer(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert (status, headers["connection"]) == (431, "close")
    assert error_of(body)["message"] == "The request head is over 65536 bytes"
    declared = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
    status, _, body = answer(declared % 10_000_000)  # refused on its declared length, before any byte
    assert status == 413 and error_of(body)["message"] == "The body is over 4194304 bytes"
    status, _, body = answer(declared % 10**30)
    assert status == 400 and error_of(body)["message"] == "Malformed HTTP request: bad Content-Length"
    chunked = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + (b"100000\r\n" + b"a" * 0x100000 + b"\r\n") * 5)
    status, _, body = answer(chunked)  # no declared length: refused once it is over
    assert status == 413 and error_of(body)["message"] == "The body is over 4194304 bytes"


def test_malformed_http_gets_400():
    status, headers, body = answer(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert (status, headers["connection"]) == (400, "close")
    assert error_of(body)["message"].startswith("Malformed HTTP request: ")
    status, _, _ = answer(b"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n")
    assert status == 400
    status, _, _ = answer(b"GET /health HTTP/1.1\r\nho", shut=True)  # cut off: answered all the same
    assert status == 400


def test_health_says_only_ok_without_the_key():
    config = ServeConfig(port=0, api_key="s3cret")
    status, _, body = answer(http_request("GET", "/health"), config)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = answer(http_request("GET", "/health", headers={"authorization": "Bearer wrong"}), config)
    assert json.loads(body) == {"status": "ok"}
    status, _, body = answer(http_request("GET", "/health", headers={"authorization": "Bearer s3cret"}), config)
    assert json.loads(body) == {"status": "ok", "models": [], "predictions": 0}
    status, _, body = answer(http_request("GET", "/v1/models", headers={"authorization": "Bearer s3cre"}), config)
    assert status == 401 and error_of(body)["type"] == "authentication_error"
    status, _, body = answer(http_request("GET", "/health"))  # no key configured: the details, as before
    assert json.loads(body) == {"status": "ok", "models": [], "predictions": 0}


def test_head_gets_the_head_of_health_and_models():
    heads = []

    async def check(host, port):
        for path in ("/health", "/v1/models"):
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(http_request("HEAD", path, headers={"connection": "close"}))
                heads.append(await read_all(stream))

    in_process(check)
    for data in heads:
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and b"content-type: application/json" in head
        assert body == b""  # the head of the answer, no body


@pytest.mark.parametrize("size", [m.MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_a_frame_over_the_limit_gets_an_error_frame_before_the_close(size):
    async def check(host, port):
        stream, buffer = await native_session(host, port)
        await stream.send_all(size.to_bytes(4, "big") + b"\x00" * 1000)
        event = await read_event(stream, buffer)
        assert isinstance(event, m.Failed) and event.id == 0 and event.error.kind == "value"
        assert event.error.message == (f"Request frame refused: frame of {size} bytes is over the limit of "
                                       f"{m.MAX_FRAME}; closing the connection")
        assert await read_event(stream, buffer) is None
        await stream.aclose()
        async with await trio.open_tcp_stream(host, port) as stream:  # the same, in place of the Hello
            await stream.send_all(m.MAGIC + size.to_bytes(4, "big"))
            event = await read_event(stream, bytearray())
            assert event.error.message.startswith(f"Request frame refused: frame of {size} bytes")

    in_process(check)


def test_undecodable_native_frames_get_an_error_and_the_connection_goes_on():
    async def check(host, port):
        stream, buffer = await native_session(host, port)
        for payload in (b"", b"\xc1", b"\x93garbage", m.encode({"op": "predict", "id": "1"}),
                        m.encode({"op": "load", "id": 1, "model": b"\xff"}), m.encode({"op": "nope", "id": 1})):
            await stream.send_all(len(payload).to_bytes(4, "big") + payload)
            event = await read_event(stream, buffer)
            assert isinstance(event, m.Failed) and event.id == 0
            assert event.error.message.startswith("Malformed request frame: ")
        await stream.send_all(frame(m.ListLoaded(id=9)))
        assert await read_event(stream, buffer) == m.LoadedList(id=9, models=[])
        await stream.aclose()

    in_process(check)


def test_a_handler_that_raises_ends_only_its_connection(monkeypatch, caplog):
    async def boom(self, *args):
        raise ExceptionGroup("handler bug", [KeyError("injected")])

    async def check(host, port):
        with monkeypatch.context() as patch:
            patch.setattr(OpenAIHandler, "_route", boom)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(http_request("GET", "/health"))
                assert await read_all(stream) == b""
            patch.setattr(NativeConnection, "_dispatch", lambda *args: 1 / 0)
            stream, buffer = await native_session(host, port)
            await stream.send_all(frame(m.ListLoaded(id=1)))
            assert await read_event(stream, buffer) is None
            await stream.aclose()
        async with await trio.open_tcp_stream(host, port) as stream:  # the server goes on
            await stream.send_all(http_request("GET", "/health"))
            assert (await read_response(stream))[0] == 200
        stream, buffer = await native_session(host, port)
        await stream.send_all(frame(m.ListLoaded(id=1)))
        assert isinstance(await read_event(stream, buffer), m.LoadedList)
        await stream.aclose()

    in_process(check)
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        "connection handler failed; the connection is closed, the server goes on"] * 2


def test_an_error_while_sending_a_response_ends_only_that_connection(monkeypatch):
    import h11

    async def check(host, port):
        real = h11.Connection.send

        def send(self, event):
            if isinstance(event, h11.Data):
                raise h11.LocalProtocolError("injected")
            return real(self, event)

        with monkeypatch.context() as patch:
            patch.setattr(h11.Connection, "send", send)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(http_request("GET", "/health"))
                data = await read_all(stream)
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n")  # head, no body
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(http_request("GET", "/health"))
            assert (await read_response(stream))[0] == 200

    in_process(check)


def test_unknown_routes_methods_and_long_targets():
    status, _, body = answer(http_request("GET", "/" + "x" * 5000))
    assert status == 404 and len(error_of(body)["message"]) < 300
    status, _, _ = answer(http_request("DELETE", "/health"))
    assert status == 405
    status, _, body = answer(http_request("GET", "/v1/completions"))
    assert status == 405
    status, _, body = answer(http_request("GET", "/health?x=1"))
    assert status == 200 and json.loads(body)["status"] == "ok"
