"""The remote backend against a hostile upstream: a fake OpenAI-compatible server that misbehaves on purpose.

:class:`Hostile` is a raw-socket HTTP server (one thread per connection, every thread joined at
the end) whose answers the test scripts: a completion's prompt (or a chat's last message)
``evil:<name>`` picks the behaviour, and ``models_fn`` replaces ``/v1/models``. Each connection is
counted until the client closes it, so a socket lmkernel leaks shows as a connection left open.

What must hold for every attack: the request ends, within the configured ``timeout`` (1 s here)
where the server stalls or trickles, with a clear error naming the server (or a correct
result); the other requests, the other servers and the kernel keep working; no traceback is
logged; every connection is closed.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable

import pytest
import trio

import lmkernel as lms
import lmkernel.backends.remote as remote_backend
from lmkernel.backends.remote._config import RemoteConfigError, Server, load_servers
from lmkernel.backends.remote._engine import Pool
from lmkernel.backends.remote._http import Url
from lmkernel.errors import LMKernelBackendError, LMKernelModelNotFoundError

from .remote_servers import remote_client

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.0  # the servers' configured timeout: every stall must end within a small multiple of it


# ---- the hostile server ---------------------------------------------------------------------------------


class Conn:
    """One accepted connection, as a behaviour writes to it."""

    def __init__(self, sock: socket.socket, server: Hostile) -> None:
        self.sock = sock
        self.server = server
        self.gone = False  # the client closed the connection
        self.answered = False  # the behaviour is done: a close from now on is the client's normal end

    def send(self, data: bytes | str) -> bool:
        """Send ``data``; False when the client went away (or the server stops)."""
        if self.gone or self.server.stopping.is_set():
            return False
        try:
            self.sock.sendall(data.encode() if isinstance(data, str) else data)
            return True
        except OSError:
            self.gone = True
            return False

    def wait(self, seconds: float) -> bool:
        """Wait ``seconds``; True at once when the client closes the connection (or the server stops)."""
        deadline = time.monotonic() + seconds
        while not self.gone and not self.server.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if select.select([self.sock], [], [], min(left, 0.05))[0]:
                try:
                    got = self.sock.recv(4096)
                except OSError:
                    got = b""
                if not got:
                    self.gone = True
                    if not self.answered:
                        self.server.gone_at.append(time.monotonic())
        return True

    def head(self, status: str = "200 OK", headers: dict | None = None, version: str = "HTTP/1.1") -> bool:
        fields = {"Content-Type": "text/event-stream", "Connection": "close", **(headers or {})}
        return self.send(f"{version} {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n")

    def json(self, value: object, status: str = "200 OK", raw: bytes | None = None) -> bool:
        body = raw if raw is not None else json.dumps(value).encode()
        return self.head(status, {"Content-Type": "application/json", "Content-Length": str(len(body))}) \
            and self.send(body)

    def event(self, value: object) -> bool:
        data = value if isinstance(value, str) else json.dumps(value)
        return self.send(f"data: {data}\n\n")

    def trickle(self, data: bytes, every: float) -> None:
        for i in range(len(data)):
            if not self.send(data[i:i + 1]) or self.wait(every):
                return


def chunk(text: object = None, finish: object = None, **extra: object) -> dict:
    """A streamed /v1/completions chunk."""
    return {"id": "x", "object": "text_completion",
            "choices": [{"index": 0, "text": "" if text is None else text, "finish_reason": finish}], **extra}


def stream(conn: Conn, *pieces: object, finish: object = "stop", done: bool = True, head: bool = True) -> None:
    """A stream of ``pieces`` (texts, JSON chunks, or bytes sent as an event's data as they are), then a finish."""
    if head:
        conn.head()
    for piece in pieces:
        sent = conn.send(b"data: " + piece + b"\n\n") if isinstance(piece, bytes) else conn.event(
            piece if isinstance(piece, dict) else chunk(piece))
        if not sent:
            return
    if finish is not None:
        conn.event(chunk(None, finish, usage={"prompt_tokens": 3, "completion_tokens": len(pieces)}))
    if done:
        conn.event("[DONE]")


class Hostile(socketserver.ThreadingTCPServer):
    """A fake OpenAI-compatible server on loopback; :meth:`stop` ends it and joins every thread."""

    daemon_threads = False
    block_on_close = True  # server_close() joins the connection threads

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.open = 0  # connections accepted and not yet closed by the client
        self.gone_at: list[float] = []  # when a client closed a connection in the middle of an answer
        self.requests: list[tuple[str, str, dict | None]] = []
        self.behaviours: dict[str, Callable[[Conn, dict], object]] = dict(BEHAVIOURS)
        self.models_fn: Callable[[Conn], object] | None = None
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"hostile-{name}")
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class _Handler(socketserver.BaseRequestHandler):
    server: Hostile

    def handle(self) -> None:
        server, sock = self.server, self.request
        with server.lock:
            server.open += 1
        try:
            conn = Conn(sock, server)
            request = self._read(sock)
            if request is None:
                return
            method, target, body = request
            with server.lock:
                server.requests.append(request)
            sock.settimeout(5)  # a send waits this long for a client that stopped reading
            if target.endswith("/models"):
                if server.models_fn is not None:
                    server.models_fn(conn)
                else:
                    conn.json({"data": [{"id": "m", "max_model_len": 4096}]})
            else:
                text = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
                name = text.split("evil:", 1)[1].split()[0] if "evil:" in text else "ok"
                server.behaviours[name](conn, body)
            conn.answered = True
            try:  # wait until the client closes its end (a client that never does leaks a socket)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return
            conn.wait(10)
        finally:
            sock.close()
            with server.lock:
                server.open -= 1

    def _read(self, sock: socket.socket) -> tuple[str, str, dict | None] | None:
        raw = b""
        sock.settimeout(0.2)
        while b"\r\n\r\n" not in raw:
            try:
                got = sock.recv(65536)
            except TimeoutError:
                if self.server.stopping.is_set():
                    return None
                continue
            except OSError:
                return None
            if not got:
                return None
            raw += got
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                       if k.strip().lower() == "content-length"), 0)
        while len(body) < length:
            try:
                got = sock.recv(65536)
            except OSError:
                return None
            if not got:
                return None
            body += got
        return method, target, json.loads(body) if body else None


# ---- the behaviours: the prompt "evil:<name> ..." picks one ------------------------------------------------

def _forever(conn: Conn, _: dict) -> None:
    conn.head()
    while conn.event(chunk("x")) and not conn.wait(0.01):
        pass


def _giant_line(conn: Conn, _: dict) -> None:
    conn.head()
    conn.send(b'data: {"choices": [{"text": "')
    block = b"x" * (1 << 20)
    for _ in range(64):  # 64 MiB without a newline
        if not conn.send(block):
            return
    conn.send(b'"}]}\n\n')


def _utf8_split(conn: Conn, _: dict) -> None:
    conn.head()
    conn.trickle('data: {"choices": [{"text": "é😀"}]}\n\n'.encode(), 0.002)  # each byte its own TCP segment
    conn.event(chunk(None, "stop"))
    conn.event("[DONE]")


def _once_then_ok(status: str) -> Callable[[Conn, dict], object]:
    """``status`` for the first request, then a good answer (``state`` is shared by the replicas)."""
    state = {"n": 0}

    def behaviour(conn: Conn, body: dict) -> None:
        state["n"] += 1
        if state["n"] == 1:
            conn.json({"error": {"message": "slow down"}}, status=status)
        else:
            stream(conn, "second")
    return behaviour


def _reset(conn: Conn, _: dict) -> None:
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()  # an RST, not a FIN
    conn.gone = True


def _keep_alive(conn: Conn, _: dict) -> None:
    """Lines forever, never a text: comments and empty chunks."""
    conn.head()
    while conn.send(": keep-alive\n\n") and conn.event(chunk("")) and not conn.wait(0.05):
        pass


ONE_EVENT = b'data: {"choices":[{"text":"a"}]}\n\n'

BEHAVIOURS: dict[str, Callable[[Conn, dict], object]] = {
    "ok": lambda c, b: stream(c, "Hello", " world") if "prompt" in b else _chat_ok(c),
    # streams that are wrong
    "json_body": lambda c, b: c.json({"choices": [{"text": "hi", "finish_reason": "stop"}]}),
    "not_json": lambda c, b: (c.head(), c.event("{not json")),
    "not_object": lambda c, b: (c.head(), c.event("[1, 2]")),
    "choices_int": lambda c, b: stream(c, {"choices": 5}),
    "choices_dict": lambda c, b: stream(c, {"choices": {"text": "a"}}),
    "choice_str": lambda c, b: stream(c, {"choices": ["a"]}),
    "text_number": lambda c, b: stream(c, chunk(5)),
    "done_first": lambda c, b: (c.head(), c.event("[DONE]")),
    "empty": lambda c, b: c.head(),
    "bad_chunked": lambda c, b: (c.head(headers={"Transfer-Encoding": "chunked"}), c.send(b"zz\r\nhello\r\n")),
    "mid_headers": lambda c, b: c.send(b"HTTP/1.1 200 OK\r\nContent-Ty"),
    "not_http": lambda c, b: c.send(b"garbage garbage\r\n\r\n"),
    "huge_header": lambda c, b: c.send(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"),
    "giant_line": _giant_line,
    "deep": lambda c, b: (c.head(), c.event("[" * 100_000)),  # JSON nested deeper than Python's stack
    "reset": _reset,
    # ... after the first token
    "error_mid": lambda c, b: stream(c, "a", {"error": {"message": "out of memory"}}, finish=None, done=False),
    "no_finish": lambda c, b: stream(c, "a", "b", finish=None, done=False),
    "no_finish_done": lambda c, b: stream(c, "a", "b", finish=None),
    "not_json_after": lambda c, b: stream(c, "a", b"{not json", finish=None),
    "choices_int_after": lambda c, b: stream(c, "a", {"choices": 5}),
    "short_body": lambda c, b: (c.head(headers={"Content-Length": "1000"}), c.event(chunk("a"))),
    "bad_chunked_after": lambda c, b: (
        c.head(headers={"Transfer-Encoding": "chunked"}),
        c.send(b"%x\r\n%s\r\n" % (len(ONE_EVENT), ONE_EVENT)), c.send(b"zz\r\n")),
    "deep_after": lambda c, b: stream(c, "a", b"[" * 100_000, finish=None),
    # error statuses
    "e302": lambda c, b: c.head("302 Found", {"Location": "http://10.255.255.1/v1/completions", "Content-Length": "0"}),
    "e401": lambda c, b: c.json({"error": {"message": "invalid api key"}}, status="401 Unauthorized"),
    "e404": lambda c, b: c.json({"error": {"message": "no such model"}}, status="404 Not Found"),
    "e429": lambda c, b: c.json({"error": {"message": "slow down"}}, status="429 Too Many Requests"),
    "e500": lambda c, b: c.json(None, status="500 Internal Server Error", raw=b"<html>oops</html>"),
    "e429_trickled": lambda c, b: (c.head("429 Too Many Requests", {"Content-Length": "100"}),
                                   c.trickle(b"x" * 100, 0.2)),
    # streams odd but right
    "utf8_split": _utf8_split,
    "surrogates": lambda c, b: stream(c, chunk("\ud83d"), chunk("\ude00"), chunk("a\udc80b"), chunk("z\ud83d")),
    "invalid_utf8": lambda c, b: (c.head(), c.send(b'data: {"choices": [{"text": "a\xff\xfeb"}]}\n\n'),
                                  c.event(chunk(None, "stop")), c.event("[DONE]")),
    "nul": lambda c, b: stream(c, "a\x00b"),
    "http10": lambda c, b: (c.head(version="HTTP/1.0"), c.event(chunk("ten")), c.event(chunk(None, "stop"))),
    "continue": lambda c, b: (c.send(b"HTTP/1.1 100 Continue\r\n\r\n"), stream(c, "after", "100")),
    "bad_usage": lambda c, b: (c.head(), c.event(chunk("a")), c.event(chunk(None, "stop", usage={
        "prompt_tokens": -3, "completion_tokens": True, "prompt_tokens_details": {"cached_tokens": 10**30}})),
        c.event("[DONE]")),
    "usage_list": lambda c, b: (c.head(), c.event(chunk("a", usage=[1])), c.event(chunk(None, "stop", usage={
        "prompt_tokens_details": 5})), c.event("[DONE]")),
    "missing_fields": lambda c, b: stream(c, {}, {"choices": None}, {"choices": [{}]}, {"choices": [{"delta": None}]},
                                          "a"),
    "finish_number": lambda c, b: (c.head(), c.event(chunk("a", finish=5)), c.event("[DONE]")),
    "comments": lambda c, b: (c.head(), c.send(": keep-alive\n\nevent: x\nid: 1\nretry: 5\n"),
                              c.send('data: {"choices": [{"text": "a"}]}\r\n\r\n'), c.event(chunk(None, "stop"))),
    # stalls
    "stall_head": lambda c, b: c.wait(30),
    "stall_mid": lambda c, b: (c.head(), c.event(chunk("a")), c.wait(30)),
    "trickle_head": lambda c, b: c.trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: yes\r\n" * 20 + b"\r\n", 0.2),
    "trickle_line": lambda c, b: (c.head(), c.trickle(b'data: {"choices": [{"text": "a"}]}\n\n' * 5, 0.2)),
    "forever": _forever,
    "keep_alive": _keep_alive,
    "e429_once": _once_then_ok("429 Too Many Requests"),
    "slow_first": lambda c, b: (c.head(), c.wait(0.8), stream(c, "late", head=False)),
    "strict": lambda c, b: c.json({"error": {"message": f"Unrecognized request argument supplied: {extended}"}},
                                  status="400 Bad Request")
    if (extended := sorted({"top_k", "min_p", "repeat_penalty", "repetition_penalty"} & set(b)))
    else stream(c, "plain", " body"),
}


def _chat_ok(conn: Conn) -> None:
    conn.head()
    for piece in ({"role": "assistant"}, {"content": "Hi"}, {"content": " there"}):
        conn.event({"choices": [{"index": 0, "delta": piece, "finish_reason": None}]})
    conn.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    conn.event("[DONE]")


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers():
    made = {name: Hostile(name) for name in ("evil", "a", "b", "good")}
    yield made
    for server in made.values():
        server.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("hostile-")]


@pytest.fixture(scope="module")
def client(servers, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "remote.toml"
    path.write_text(
        f'[servers.evil]\nurl = "{servers["evil"].url}"\ntimeout = {TIMEOUT}\n'
        f'[servers.pair]\nurls = ["{servers["a"].url}", "{servers["b"].url}"]\ntimeout = {TIMEOUT}\n'
        f'[servers.good]\nurl = "{servers["good"].url}"\ntimeout = {TIMEOUT}\n'
        f'[servers.fixed]\nurl = "{servers["evil"].url}"\nmodels = ["m"]\ncontext_length = 4096\n'
        f'timeout = {TIMEOUT}\n', encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMKERNEL_REMOTE", str(path))
        with remote_client() as client:
            yield client


@pytest.fixture
def evil(client, servers):
    return client.llm.model("remote/evil/m")


@pytest.fixture
def good(client, servers):
    return client.llm.model("remote/good/m")


@pytest.fixture(autouse=True)
def clean(request, servers, caplog):
    """After each test: no traceback logged, every connection closed by the client, /v1/models sane again."""
    caplog.set_level(logging.WARNING)
    yield
    for server in servers.values():
        server.models_fn = None
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    deadline = time.monotonic() + 5
    while any(s.open for s in servers.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [s.name for s in servers.values() if s.open], "lmkernel left a connection open"


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()``'s result (or the exception it raised) and how long it took."""
    start = time.monotonic()
    try:
        result: object = fn()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        result = exc
    return result, time.monotonic() - start


def assert_still_works(*models) -> None:
    for model in models:
        assert model.complete("fine", config={"maxTokens": 5}).content == "Hello world"


# ---- streams that are wrong: a clear error naming the server ------------------------------------------------

BEFORE_FIRST_TOKEN = [
    ("json_body", "the server answered with an empty stream (Content-Type: application/json)"),
    ("empty", "the server answered with an empty stream"),
    ("not_json", "a streamed chunk is not JSON: '{not json'"),
    ("not_object", "a streamed chunk is not a JSON object: '[1, 2]'"),
    ("choices_int", "a streamed chunk's choices are not a list of objects"),
    ("choices_dict", "a streamed chunk's choices are not a list of objects"),
    ("choice_str", "a streamed chunk's choices are not a list of objects"),
    ("text_number", "a streamed chunk's text is not a string"),
    ("done_first", "the server ended the stream ([DONE]) before it said the text was finished"),
    ("bad_chunked", "not a valid HTTP answer: illegal chunk header"),
    ("mid_headers", "not a valid HTTP answer"),
    ("not_http", "not a valid HTTP answer: illegal status line"),
    ("huge_header", "not a valid HTTP answer"),
    ("giant_line", "a streamed line is longer than 16777216 bytes"),
    ("deep", "a streamed chunk is not JSON: '[[[["),
    ("reset", ""),  # "the connection broke" or "not a valid HTTP answer", as the RST arrives
    ("e429", "HTTP 429: slow down"),
    ("e500", "HTTP 500: <html>oops</html>"),
    ("e429_trickled", "the answer did not arrive within 1 s"),
]


@pytest.mark.parametrize(("attack", "says"), BEFORE_FIRST_TOKEN, ids=[a for a, _ in BEFORE_FIRST_TOKEN])
def test_a_broken_answer_before_the_first_token_fails_the_request_naming_the_server(evil, servers, attack, says):
    error, took = timed(lambda: evil.complete(f"evil:{attack} go", config={"maxTokens": 5}))
    assert isinstance(error, LMKernelBackendError), error
    message = str(error)
    assert f"no replica of the server evil took the request for model 'm': {servers['evil'].url}: " in message
    assert says in message, message
    assert took < 3 * TIMEOUT + 2, took
    assert_still_works(evil)


AFTER_FIRST_TOKEN = [
    ("error_mid", 1, "the server reported an error: out of memory"),
    ("no_finish", 2, "the stream ended before the server said the text was finished"),
    ("no_finish_done", 2, "the server ended the stream ([DONE]) before it said the text was finished"),
    ("not_json_after", 1, "a streamed chunk is not JSON"),
    ("choices_int_after", 1, "a streamed chunk's choices are not a list of objects"),
    ("short_body", 1, "not a valid HTTP answer: peer closed connection without sending complete message body"),
    ("bad_chunked_after", 1, "not a valid HTTP answer: illegal chunk header"),
    ("deep_after", 1, "a streamed chunk is not JSON"),
    ("stall_mid", 1, "no answer within 1 s"),
]


@pytest.mark.parametrize(("attack", "sent", "says"), AFTER_FIRST_TOKEN, ids=[a for a, _, _ in AFTER_FIRST_TOKEN])
def test_a_broken_stream_after_the_first_token_fails_naming_the_server_and_what_it_sent(evil, servers, attack,
                                                                                      sent, says):
    error, took = timed(lambda: evil.complete(f"evil:{attack} go", config={"maxTokens": 5}))
    assert isinstance(error, LMKernelBackendError), error
    assert f"the server evil ({servers['evil'].url}) failed after sending {sent} tokens: {says}" in str(error)
    assert took < 2 * TIMEOUT + 2, took
    assert_still_works(evil)


def test_a_broken_chat_stream_is_the_same_clear_error(evil):
    error, _ = timed(lambda: evil.respond("evil:choices_int go", config={"maxTokens": 5}))
    assert isinstance(error, LMKernelBackendError) and "choices are not a list of objects" in str(error)
    assert evil.respond("hello", config={"maxTokens": 5}).content == "Hi there"


@pytest.mark.parametrize(("attack", "error", "says"), [
    ("e302", LMKernelBackendError, "the server evil ({url}) answered HTTP 302: (no body)"),
    ("e401", LMKernelBackendError, "the server evil ({url}) answered HTTP 401: invalid api key"),
    ("e404", LMKernelModelNotFoundError, "the server evil ({url}) does not serve model 'm': HTTP 404: no such model"),
])
def test_an_error_status_is_the_requests_error_with_the_servers_message(evil, servers, attack, error, says):
    caught, _ = timed(lambda: evil.complete(f"evil:{attack} go", config={"maxTokens": 5}))
    assert isinstance(caught, error) and says.format(url=servers["evil"].url) in str(caught), caught
    assert_still_works(evil)


def test_a_429_goes_to_the_other_replica(client, servers):
    pair = client.llm.model("remote/pair/m")
    result = pair.complete("evil:e429_once go", config={"maxTokens": 5})
    assert result.content == "second"
    asked = [[r for r in s.requests if r[2] and r[2].get("prompt") == "evil:e429_once go"] for s in (servers["a"],
                                                                                                 servers["b"])]
    assert [len(a) for a in asked] == [1, 1]  # one each: the 429 and the answer


# ---- answers odd but right: the right text ---------------------------------------------------------------

@pytest.mark.parametrize(("attack", "content"), [
    ("utf8_split", "é😀"),  # every byte in its own TCP segment
    ("surrogates", "😀a\ufffdbz\ufffd"),  # a pair split across chunks is joined; lone ones are replaced
    ("invalid_utf8", "a\ufffd\ufffdb"),
    ("nul", "a\x00b"),
    ("http10", "ten"),  # HTTP/1.0, the body ends with the connection
    ("continue", "after100"),  # 100 Continue before the answer
    ("comments", "a"),  # comments, event:, id:, retry: and CRLF line ends
    ("bad_usage", "a"),
    ("usage_list", "a"),
    ("finish_number", "a"),
    ("missing_fields", "a"),
])
def test_an_odd_but_valid_stream_gives_the_text(evil, attack, content):
    result = evil.complete(f"evil:{attack} go", config={"maxTokens": 50})
    assert result.content == content
    assert result.stats.stop_reason == "eosFound"


def test_counts_a_server_gets_wrong_are_not_reported(evil):
    result = evil.complete("evil:bad_usage go", config={"maxTokens": 50})
    assert result.stats.prompt_tokens_count is None and result.stats.predicted_tokens_count == 1


# ---- stalls, trickles, endless streams: every wait is bounded -------------------------------------------------

@pytest.mark.parametrize(("attack", "says"), [
    ("stall_head", "no answer within 1 s"),
    ("trickle_head", "no answer within 1 s"),  # a byte every 0.2 s: the head as a whole is bounded
    ("trickle_line", "no complete line within 1 s (the server trickles)"),
])
def test_a_stalled_or_trickling_server_fails_within_its_timeout(evil, attack, says):
    error, took = timed(lambda: evil.complete(f"evil:{attack} go", config={"maxTokens": 5}))
    assert isinstance(error, LMKernelBackendError) and says in str(error), error
    assert took < 2 * TIMEOUT + 1.5, took


def wait_for(condition: Callable[[], bool], seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_an_endless_stream_ends_at_max_tokens_and_on_cancel(evil, servers):
    """Either way the HTTP connection closes at once: the server sees its client go."""
    gone = servers["evil"].gone_at
    before = len(gone)
    result, took = timed(lambda: evil.complete("evil:forever go", config={"maxTokens": 20}))
    assert result.content == "x" * 20 and result.stats.stop_reason == "maxPredictedTokensReached"
    assert took < 5 and wait_for(lambda: len(gone) == before + 1), "the connection stayed open"
    stream = evil.complete_stream("evil:forever go")  # no maxTokens: only cancel ends it
    for i, _ in enumerate(stream):
        if i == 10:
            stream.cancel()
            cancelled = time.monotonic()
    assert stream.wait_for_result().stats.stop_reason == "userStopped"
    assert wait_for(lambda: len(gone) == before + 2), "the connection stayed open"
    assert gone[-1] - cancelled < 2


def test_a_stream_of_keep_alives_ends_at_the_engine_timeout_or_on_cancel(evil, servers, monkeypatch):
    """Lines keep coming, text never does: ``LMKERNEL_ENGINE_TIMEOUT`` (between two events of any
    asynchronous engine) ends it, and cancel does."""
    server = servers["evil"]
    monkeypatch.setenv("LMKERNEL_ENGINE_TIMEOUT", "1.5")
    before = len(server.gone_at)
    error, took = timed(lambda: evil.complete("evil:keep_alive go", config={"maxTokens": 5}))
    assert isinstance(error, LMKernelBackendError) and "the engine sent nothing for 1.5 s" in str(error), error
    assert took < 4
    monkeypatch.delenv("LMKERNEL_ENGINE_TIMEOUT")
    stream = evil.complete_stream("evil:keep_alive go")
    threading.Timer(0.3, stream.cancel).start()
    assert stream.wait_for_result().stats.stop_reason == "userStopped"
    assert wait_for(lambda: len(server.gone_at) == before + 2), "a connection stayed open"


def test_a_stalled_request_holds_up_no_other(evil, good):
    stalled: list[object] = []
    thread = threading.Thread(target=lambda: stalled.append(timed(
        lambda: evil.complete("evil:stall_head go", config={"maxTokens": 5}))))
    thread.start()
    try:
        for model in (good, evil, good):
            _, took = timed(lambda: assert_still_works(model))  # noqa: B023 - called at once
            assert took < 0.5 * TIMEOUT, took
    finally:
        thread.join(10)
    [(error, took)] = stalled
    assert isinstance(error, LMKernelBackendError) and took < 2 * TIMEOUT + 1


def test_many_attacks_at_once_each_end_on_their_own(evil, good):
    attacks = ["stall_head", "stall_mid", "trickle_line", "forever", "giant_line", "not_json", "e500", "ok"]
    results: dict[str, tuple[object, float]] = {}

    def attack(name: str) -> None:
        results[name] = timed(lambda: evil.complete(f"evil:{name} go", config={"maxTokens": 5}))

    threads = [threading.Thread(target=attack, args=(name,)) for name in attacks]
    for thread in threads:
        thread.start()
    assert_still_works(good)
    for thread in threads:
        thread.join(10)
    assert results["ok"][0].content == "Hello world" and results["forever"][0].content == "xxxxx"
    failed = [name for name in attacks if name not in ("ok", "forever")]
    assert all(isinstance(results[name][0], LMKernelBackendError) for name in failed), results
    assert max(took for _, took in results.values()) < 2 * TIMEOUT + 2
    assert_still_works(evil, good)


# ---- /v1/models: listing and loading -----------------------------------------------------------------------

def _trickled_models(conn: Conn) -> None:
    body = json.dumps({"data": [{"id": "m"}]}).encode()
    conn.head(headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
    conn.trickle(body, 0.2)


MODELS_ATTACKS: dict[str, Callable[[Conn], object]] = {
    "not_json": lambda c: c.json(None, raw=b"<html>nope"),
    "e500": lambda c: c.json({"error": "down"}, status="500 Internal Server Error"),
    "not_object": lambda c: c.json([1, 2]),
    "data_not_list": lambda c: c.json({"data": {"id": "m"}}),
    "stall": lambda c: c.wait(30),
    "trickle": _trickled_models,
    "mid_headers": lambda c: c.send(b"HTTP/1.1 200 OK\r\nContent-Ty"),
    "deep": lambda c: c.json(None, raw=b"[" * 100_000),
    "redirect": lambda c: c.head("302 Found", {"Location": "http://10.255.255.1/v1/models", "Content-Length": "0"}),
}


@pytest.mark.parametrize("attack", list(MODELS_ATTACKS))
def test_a_broken_model_list_costs_the_listing_at_most_the_timeout(client, servers, monkeypatch, attack):
    monkeypatch.setattr(remote_backend, "LIST_TTL", 0.0)
    servers["evil"].models_fn = MODELS_ATTACKS[attack]
    keys, took = timed(lambda: {m.model_key for m in client.list_downloaded_models()})
    assert took < 2 * TIMEOUT + 1.5, took
    assert "remote/good/m" in keys and "remote/evil/m" not in keys  # the other servers are listed
    # loading a model the config names (the server is not asked for its list): within the bound
    loaded, took = timed(lambda: client.llm.model("remote/fixed/m"))
    assert took < 2 * TIMEOUT + 1.5, took
    if attack in ("not_object", "data_not_list"):  # JSON: the server answers, the config names the model
        assert loaded.identifier == "remote/fixed/m"
        loaded.unload()
    else:
        assert isinstance(loaded, LMKernelBackendError), loaded
        assert f"no replica of the server fixed answers: {servers['evil'].url}: " in str(loaded)


def _listed_once(first: list[str], then: Callable[[Conn], object]) -> Callable[[Conn], object]:
    """``/v1/models`` listing ``first`` once (the listing that finds the key), then ``then`` (the load's check)."""
    calls = []

    def models(conn: Conn) -> object:
        calls.append(1)
        return conn.json({"data": [{"id": i} for i in first]}) if len(calls) == 1 else then(conn)
    return models


def test_a_server_trickling_its_model_list_does_not_stall_the_kernel(client, servers, good, monkeypatch):
    monkeypatch.setattr(remote_backend, "LIST_TTL", 0.0)
    servers["evil"].models_fn = _listed_once(["m", "other"], _trickled_models)
    loading: list[object] = []
    thread = threading.Thread(target=lambda: loading.append(timed(lambda: client.llm.model("remote/evil/other"))))
    thread.start()
    try:
        while thread.is_alive():
            _, took = timed(lambda: assert_still_works(good))
            assert took < 0.5, f"a request to another server waited {took:.2f} s"
    finally:
        thread.join(10)
    [(error, took)] = loading
    assert isinstance(error, LMKernelBackendError) and "no answer to GET /models in time" in str(error), error
    assert took < 2 * TIMEOUT + 1.5


def test_model_ids_a_server_should_not_send(client, servers, monkeypatch):
    monkeypatch.setattr(remote_backend, "LIST_TTL", 0.0)
    ids = ["", "a\x00b", "..", "../../etc", "/abs/path", "ünï/☃", "x" * 5000, 5, None, "m", "a\nb"]
    servers["evil"].models_fn = lambda c: c.json({"data": [{"id": i} for i in ids] + ["str"]})
    keys = {m.model_key for m in client.list_downloaded_models() if m.model_key.startswith("remote/evil/")}
    assert {"remote/evil/m", "remote/evil/abs/path", "remote/evil/ünï/☃"} <= keys
    assert not [k for k in keys if "\x00" in k or len(k) > 500]
    assert client.llm.model("remote/evil/ünï/☃").identifier == "remote/evil/ünï/☃"
    client.llm.model("remote/evil/ünï/☃").unload()


def test_a_huge_model_list_is_cut_and_named_briefly(client, servers, monkeypatch):
    """A server listing 100 000 models: the first 10 000 are offered; one it stops listing between the
    listing and the load is not found, in a message of a few lines."""
    monkeypatch.setattr(remote_backend, "LIST_TTL", 0.0)
    huge = [f"model-{i}" for i in range(100_000)]
    servers["evil"].models_fn = lambda c: c.json({"data": [{"id": i} for i in huge]})
    keys, took = timed(lambda: [m.model_key for m in client.list_downloaded_models()])
    assert sum(k.startswith("remote/evil/") for k in keys) == remote_backend.MAX_MODELS and took < 5
    servers["evil"].models_fn = _listed_once(["gone"], lambda c: c.json({"data": [{"id": i} for i in huge]}))
    error, _ = timed(lambda: client.llm.model("remote/evil/gone"))
    assert isinstance(error, LMKernelBackendError) and "the server evil does not serve 'gone'" in str(error), error
    assert "model-19 and 9980 more" in str(error) and len(str(error)) < 1000


# ---- the config file ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "says"), [
    ('[servers.x]\nurl = "http://user:s3cret@h:8000/v1"\n', "holds no credentials (user:password@)"),
    ('[servers.x]\nurl = "http://h:8000/v1?key=1"\n', "has no query (?...) or fragment (#...)"),
    ('[servers.x]\nurl = "http://h:8000/v1#top"\n', "has no query (?...) or fragment (#...)"),
    ('[servers.x]\nurl = "http://h:0/v1"\n', "the port must be from 1 to 65535, got '0'"),
    ('[servers.x]\nurl = "http://h:99999/v1"\n', "the port must be from 1 to 65535, got '99999'"),
    ('[servers.x]\nurl = "http://h:http/v1"\n', "the port must be from 1 to 65535, got 'http'"),
    ('[servers.x]\nurl = "http://a b:80/v1"\n', "no spaces or control characters"),
    ('[servers.x]\nurl = "http:///v1"\n', "a host must follow"),
    ('[servers.x]\nurl = "http://h/v1"\napi_key = "ключ"\n', "'api_key' must be a string of printable ASCII"),
    ('[servers.x]\nurl = "http://h/v1"\napi_key = "a\\u0000b"\n', "'api_key' must be a string of printable ASCII"),
    ('[servers.x]\nurl = "http://h/v1"\napi_key = 5\n', "'api_key' must be a string of printable ASCII"),
    ('[servers.x]\nurl = "http://h/v1"\ntimeout = "5"\n', "'timeout' must be a number of seconds"),
    ('[servers.x]\nurl = "http://h/v1"\ntimeout = nan\n', "'timeout' must be a number of seconds"),
    ('[servers.x]\nurl = "http://h/v1"\nhealth_interval = inf\n', "'health_interval' must be a number of seconds"),
    ('[servers.x]\nurl = "http://h/v1"\nhealth_interval = 1e-9\n', "'health_interval' must be a number of seconds from "
                                                                 "0.1 to 86400, got 1e-09"),  # a busy loop
    ('[servers.x]\nurl = "http://h/v1"\nmodels = "m"\n', "'models' must be a list of model ids, got 'm'"),
    ('[servers.x]\nurl = "http://h/v1"\ncontext_length = true\n', "'context_length' must be a positive integer"),
    ('[servers.x]\nurl = 5\n', "'urls' must be a non-empty list of base URLs, got [5]"),
    ('[servers.x]\nurls = "http://h/v1"\n', "'urls' must be a non-empty list of base URLs"),
    ('[servers.x]\nurl = "http://h/v1"\npassword = "x"\n', "unknown key(s) password"),
    ("servers = [1]\n", "'servers' must be a table of [servers.<name>] tables"),
    ("[servers]\nx = 1\n", "[servers.x] must be a table"),
    ("\x00\xff", "is not valid TOML"),
])
def test_a_config_attack_is_refused_naming_the_file_and_the_rule(tmp_path, text, says):
    path = tmp_path / "remote.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RemoteConfigError) as caught:
        load_servers(path)
    assert says in str(caught.value) and str(path) in str(caught.value), caught.value
    assert "s3cret" not in str(caught.value)


def test_an_api_key_from_the_environment_follows_the_same_rule(tmp_path, monkeypatch):
    path = tmp_path / "remote.toml"
    path.write_text('[servers.x]\nurl = "http://h/v1"\napi_key_env = "HOSTILE_KEY"\n', encoding="utf-8")
    monkeypatch.setenv("HOSTILE_KEY", "two words")
    with pytest.raises(RemoteConfigError, match=r"the key in \$HOSTILE_KEY must be a string of printable ASCII"):
        load_servers(path)


def test_an_unreadable_config_is_the_remote_backends_reason_and_lists_nothing(tmp_path, monkeypatch):
    path = tmp_path / "remote.toml"
    path.write_bytes(b'[servers.x]\nurl = "http://h/\xff"\n')
    monkeypatch.setenv("LMKERNEL_REMOTE", str(path))
    availability = remote_backend.RemoteBackend().availability()
    assert not availability.available and str(path) in availability.reason and "cannot read it" in availability.reason


def test_an_ipv6_server_is_reached_with_a_valid_host_header():
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    listener.listen(1)
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            seen.append(data)
            body = b'{"data": [{"id": "m"}]}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        pool = Pool(Server("v6", (Url.parse(f"http://[::1]:{port}/v1"),), timeout=2))
        [answer] = trio.run(pool.check_all)
    finally:
        thread.join(5)
        listener.close()
    assert f"Host: [::1]:{port}\r\n".encode() in seen[0]
    assert answer == {"data": [{"id": "m"}]}


def test_a_strict_server_that_refuses_the_extended_fields_gets_only_openais(evil, servers):
    """OpenAI's own API refuses fields it does not know: the engine learns it from the 400 and asks
    again with the OpenAI API's fields only (also from then on), instead of failing every request."""
    result = evil.complete("evil:strict", config={"temperature": 0.7, "topKSampling": 40, "maxTokens": 5})
    assert result.content == "plain body"
    bodies = [body for _, target, body in servers["evil"].requests if body and "evil:strict" in str(body)]
    assert "top_k" in bodies[-2] and not {"top_k", "min_p", "repeat_penalty"} & set(bodies[-1])
    assert bodies[-1]["temperature"] == 0.7 and bodies[-1]["max_tokens"] == 5
    assert evil.complete("evil:strict", config={"temperature": 0}).content == "plain body"
    last = [body for _, target, body in servers["evil"].requests if body and "evil:strict" in str(body)][-1]
    assert "repeat_penalty" not in last  # asked once, remembered


def test_a_sync_client_waits_for_a_server_that_is_slow_to_its_first_token(evil):
    """The server bounds its own waits (its timeout): while the request waits on it, the sync API does
    not time out (the kernel says it is queued), as for a request queued on a local model."""
    previous = lms.get_sync_api_timeout()
    lms.set_sync_api_timeout(0.3)
    try:
        assert evil.complete("evil:slow_first").content == "late"  # 0.8 s before the first token
    finally:
        lms.set_sync_api_timeout(previous)
