"""A bounded protocol fuzz of ``lmkernel serve`` (Hypothesis): random and mutated HTTP requests
and bodies, random native frames. Every input gets an answer (or, for bytes that are not a
request, a close), never a 500; the server stays up; a well-formed request afterwards is
answered correctly. About a minute; examples are derandomized so a CI run is reproducible."""

from __future__ import annotations

import json
import socket

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmkernel as lms
from lmkernel.kernel import messages as m

from ..conftest import TINY, TINY_KEY
from ..serve_helpers import Server
from ._client import connect, frame, native_socket, recv_event

FUZZ = settings(max_examples=500, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow], print_blob=True)
ANSWERS = {200, 400, 401, 404, 405, 408, 413, 429, 431}
GREEDY = {"temperature": 0, "repeatPenalty": False, "topKSampling": 0, "minPSampling": False}


@pytest.fixture(scope="module")
def server():
    s = Server("--model", TINY, "--header-timeout", "2", "--body-timeout", "2")
    yield s
    s.log.seek(0)
    log = s.log.read()
    assert s.stop() == 0
    assert "Traceback" not in log, log  # no handler failed: every input had an owner that answered it


def alive(server: Server) -> None:
    assert server.proc.poll() is None, "the server died"


# ---- HTTP ------------------------------------------------------------------------------

huge = st.integers(min_value=-(2**80), max_value=2**80)
number = st.one_of(st.integers(-3, 8), huge, st.floats(allow_nan=True, allow_infinity=True), st.booleans())
text = st.text(max_size=40)
keys = st.sampled_from([TINY, "aa/tiny-ctx64", "tiny", "nope", "/etc", "~", "../aa/tiny", "C:\\x", "a" * 600, ""])
field_values = {
    "prompt": st.one_of(text, st.lists(text, max_size=3), number),
    "model": st.one_of(keys, text, st.none(), number),
    "max_tokens": st.one_of(number, st.none(), text),
    "temperature": st.one_of(number, st.none()),
    "top_p": st.one_of(number, st.none()),
    "stop": st.one_of(text, st.lists(text, max_size=4), st.none(), number),
    "stream": st.one_of(st.booleans(), number),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), text, st.none()),
    "seed": st.one_of(number, st.none()),
    "n": number,
    "echo": st.booleans(),
    "user": text,
    "unknown_field": text,
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=field_values).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
targets = st.one_of(st.sampled_from(["/v1/completions", "/v1/models", "/health", "/", "/v1/completions?x=1",
                                     "*", "http://x/v1/models"]),
                    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=50))
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "get", "P0ST"])
headers = st.lists(st.tuples(st.sampled_from(["authorization", "content-type", "expect", "x-any", "accept",
                                              "transfer-encoding", "connection"]),
                             st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)),
                   max_size=3)


def build(method: str, target: str, extra: list, body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: fuzz", "connection: close", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in extra if k not in ("transfer-encoding", "connection")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@FUZZ
@given(method=methods, target=targets, extra=headers, body=bodies)
def test_fuzzed_http_requests_get_answers(server, method, target, extra, body):
    with connect(server.host, timeout=60) as sock:
        sock.sendall(build(method, target, extra, body))
        response = read_until_closed(sock)
    assert status_of(response) in ANSWERS, response[:300]
    alive(server)


completion_fields = {
    "model": st.one_of(st.just(TINY), st.none(), keys, text),
    "max_tokens": st.one_of(st.integers(1, 8), number, st.none()),
    "temperature": st.one_of(st.floats(0, 2), number),
    "top_p": st.one_of(st.floats(0, 1), number),
    "stop": st.one_of(text, st.lists(text, max_size=3)),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), st.none()),
    **{k: v for k, v in field_values.items() if k in ("seed", "n", "echo", "user")},
}
completions = st.fixed_dictionaries({"prompt": st.one_of(text, st.lists(text, min_size=1, max_size=2))},
                                    optional=completion_fields)


@FUZZ
@given(body=completions)
def test_fuzzed_completion_bodies_get_answers(server, body):
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # an answer within seconds; larger counts are the same code path
    with connect(server.host, timeout=60) as sock:
        sock.sendall(build("POST", "/v1/completions", [], json.dumps(body).encode()))
        response = read_until_closed(sock)
    status = status_of(response)
    assert status in ANSWERS, response[:300]
    if status == 200 and not body.get("stream"):
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["object"] == "text_completion"
    elif status == 200:
        assert response.rstrip().endswith(b"data: [DONE]\n\n0") or b"data: [DONE]" in response
    alive(server)


@FUZZ
@given(request=st.one_of(
    st.binary(max_size=300),
    st.tuples(methods, targets, headers, bodies, st.data()).map(
        lambda t: _mutate(build(*t[:4]), t[4])),
))
def test_random_and_mutated_bytes_get_an_answer_or_a_close(server, request):
    if request.startswith(m.MAGIC[:1]):
        request = b" " + request  # the native protocol has its own fuzz below
    with connect(server.host, timeout=60) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # whatever was sent is all there is
        response = read_until_closed(sock)
    if response:
        assert status_of(response) in ANSWERS, response[:300]
    alive(server)


def _mutate(data: bytes, draw: st.DataObject) -> bytes:
    data = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        if not data:
            break
        at = draw.draw(st.integers(0, len(data) - 1))
        action = draw.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip":
            data[at] ^= 1 << draw.draw(st.integers(0, 7))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw.draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw.draw(st.integers(1, 8))]
    return bytes(data)


# ---- native ------------------------------------------------------------------------------

ids = st.one_of(st.integers(0, 20), st.integers(0, 2**64 - 1), st.integers(-(2**63), -1))
wire_number = st.one_of(st.integers(-3, 8), st.integers(-(2**63), 2**64 - 1), st.floats(), st.booleans())
configs = st.dictionaries(st.sampled_from(["maxTokens", "temperature", "topKSampling", "stopStrings", "seed",
                                           "contextLength", "nope", "max_tokens"]),
                          st.one_of(wire_number, text, st.lists(text, max_size=3), st.none()), max_size=3)
requests = st.one_of(
    st.builds(m.Load, id=ids, model=st.one_of(keys, st.none()), new_instance=st.booleans(), config=configs,
              ttl=st.one_of(st.none(), st.floats(0, 100))),
    st.builds(m.Predict, id=ids, model=keys, prompt=text, config=configs),
    st.builds(m.Cancel, id=ids, target=ids),
    st.builds(m.Unload, id=ids, model=keys),
    st.builds(m.Tokenize, id=ids, model=keys, texts=st.lists(text, max_size=3)),
    st.builds(m.GetInfo, id=ids, model=keys),
    st.builds(m.ListLoaded, id=ids),
    st.builds(m.ListDownloaded, id=ids),
    st.builds(m.Hello, id=ids, token=st.one_of(st.none(), text)),
).map(m.encode)
loose = st.fixed_dictionaries({"op": st.one_of(st.sampled_from(["load", "predict", "cancel", "unload", "tokenize",
                                                                 "get_info", "list_loaded", "hello"]), text)},
                              optional={"id": st.one_of(ids, text), "model": st.one_of(keys, wire_number),
                                        "prompt": st.one_of(text, wire_number), "config": st.one_of(configs, text),
                                        "target": ids, "texts": st.lists(wire_number, max_size=2)},
                              ).map(msgspec.msgpack.encode)
frames = st.one_of(
    requests.map(m.frame),
    loose.map(m.frame),
    st.binary(max_size=64).map(m.frame),
    st.tuples(st.integers(m.MAX_FRAME + 1, 2**32 - 1), st.binary(max_size=16)).map(
        lambda t: t[0].to_bytes(4, "big") + t[1]),
)  # (a frame cut short waits for the body timeout: tests/serve/test_timeouts.py has that one)
SENTINEL = 987654321


@FUZZ
@given(sent=st.lists(frames, min_size=1, max_size=5))
def test_fuzzed_native_frames_get_answers_and_the_connection_goes_on(server, sent):
    with native_socket(server.host) as sock:
        sock.settimeout(60)
        sock.sendall(b"".join(sent) + frame(m.ListLoaded(id=SENTINEL)))
        closing = None
        while True:
            event = recv_event(sock)
            if event is None:  # the server closed: only after saying why, on a frame it could not take
                assert closing is not None and closing.error.message.startswith(("Request frame refused",
                                                                                 "Closing the connection"))
                break
            failure = event.error.message.lower() if isinstance(event, m.Failed) and event.id == 0 else ""
            if "closing the connection" in failure:
                closing = event
            if isinstance(event, m.LoadedList) and event.id == SENTINEL:
                break
    alive(server)


def test_after_the_fuzz_well_formed_requests_are_answered_correctly(server):
    import openai

    want = lms.llm(TINY).complete("The cat sat on the", config={"maxTokens": 12, **GREEDY}).content
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    try:
        got = client.completions.create(model=TINY, prompt="The cat sat on the", max_tokens=12, temperature=0)
        assert got.choices[0].text == want
    finally:
        client.close()
    with lms.Client(server.host) as remote:
        assert remote.llm.model(TINY).complete("The cat sat on the", config={"maxTokens": 12, **GREEDY}).content == want
    health = server.health()
    assert health["status"] == "ok" and TINY_KEY in health["models"]  # the operator's instance, by its key
