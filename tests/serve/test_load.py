"""A bounded load test on loopback: 1,000 idle connections (500 HTTP keep-alive, 500 native
sessions), 50 slowloris clients and 32 active streams (16 native, 16 HTTP) at once. The streams
finish with the right text, the slowloris clients get 408 at the header timeout, the idle
connections are still served, and the server's memory and open files stay bounded (and its
open files come back down once the clients leave). The figures are printed (``-s``)."""

from __future__ import annotations

import json
import resource
import socket
import threading
import time

import openai

import lmkernel as lms
from lmkernel.kernel import messages as m

from ..conftest import TINY
from ..serve_helpers import Server, process_figures
from ._client import connect, frame, http_request, native_socket, recv_event

IDLE_HTTP, IDLE_NATIVE, SLOWLORIS, STREAMS = 500, 500, 50, 32
PROMPTS = ["The cat sat on the", "Once upon a time", "$ ls -l\n", "Hello"]
GREEDY = {"maxTokens": 48, "temperature": 0, "repeatPenalty": False, "topKSampling": 0, "minPSampling": False}


def keep_alive_health(sock: socket.socket) -> dict:
    sock.sendall(http_request("GET", "/health"))
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        data += sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200")
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


class Sampler(threading.Thread):
    """The server's peak resident memory and open files, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.peak_fds, self.done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss, fds = process_figures(self.pid)
            self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
            time.sleep(0.05)


def test_idle_slowloris_and_active_streams_at_once():
    want = {p: lms.llm(TINY).complete(p, config=GREEDY).content for p in PROMPTS}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = Server("--model", TINY, "--max-connections", "1200", "--header-timeout", "5")
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        with lms.Client(server.host) as warm:  # one request each way, so that "before" is a served state
            warm.llm.model(TINY).complete("Hello", config=GREEDY)
        with connect(server.host) as sock:
            keep_alive_health(sock)
        time.sleep(0.5)
        before = process_figures(server.proc.pid)
        sampler = Sampler(server.proc.pid)
        sampler.start()
        started = time.time()

        for _ in range(IDLE_HTTP):
            sock = connect(server.host)
            keep_alive_health(sock)
            idle.append(sock)
        for _ in range(IDLE_NATIVE):
            idle.append(native_socket(server.host))
        held = process_figures(server.proc.pid)
        opened = time.time() - started

        slowloris_answers: list[tuple[float, bytes]] = []

        def slowloris() -> None:
            for _ in range(SLOWLORIS):
                sock = connect(server.host)
                sock.sendall(b"GET /health HTTP/1.1\r\n")
                sock.setblocking(False)
                slow.append(sock)
            begun, pending = time.time(), set(slow)
            while pending and time.time() - begun < 30:
                for sock in list(pending):
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        try:
                            sock.send(b"x")
                        except OSError:
                            pending.discard(sock)
                        continue
                    slowloris_answers.append((time.time() - begun, data))
                    pending.discard(sock)
                time.sleep(0.5)

        errors: list[str] = []

        def native_stream(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            with lms.Client(server.host) as client:
                stream = client.llm.model(TINY).complete_stream(prompt, config=GREEDY)
                text = "".join(fragment.content for fragment in stream)
                if text != want[prompt]:
                    errors.append(f"native {i}: {text!r} != {want[prompt]!r}")

        def http_stream(i: int) -> None:
            prompt = PROMPTS[i % len(PROMPTS)]
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
            try:
                chunks = client.completions.create(model=TINY, prompt=prompt, max_tokens=48, temperature=0,
                                                   stream=True)
                text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
                if text != want[prompt]:
                    errors.append(f"http {i}: {text!r} != {want[prompt]!r}")
            finally:
                client.close()

        threads = [threading.Thread(target=slowloris)]
        threads += [threading.Thread(target=native_stream if i < STREAMS // 2 else http_stream, args=(i,))
                    for i in range(STREAMS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        assert len(slowloris_answers) == SLOWLORIS
        assert all(data.startswith(b"HTTP/1.1 408") and 4 <= at < 8 for at, data in slowloris_answers), \
            slowloris_answers[:3]
        # The idle connections were held all along, and are still served.
        for sock in idle[:IDLE_HTTP:50]:
            assert keep_alive_health(sock)["status"] == "ok"
        for sock in idle[IDLE_HTTP::50]:
            sock.sendall(frame(m.ListLoaded(id=1)))
            assert isinstance(recv_event(sock), m.LoadedList)
        busy = time.time() - started
    finally:
        for sock in idle + slow:
            sock.close()
        try:
            deadline = time.time() + 20
            while process_figures(server.proc.pid)[1] > before[1] + 8 and time.time() < deadline:
                time.sleep(0.1)
            after = process_figures(server.proc.pid)
            sampler.done.set()
        finally:
            assert server.stop() == 0
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    connections = IDLE_HTTP + IDLE_NATIVE + SLOWLORIS + STREAMS
    print(f"\nload test: {IDLE_HTTP + IDLE_NATIVE} idle connections opened in {opened:.1f} s; "
          f"{connections} at once; all done in {busy:.1f} s\n"
          f"server RSS KiB: before {before[0]}, holding the idle ones {held[0]}, peak {sampler.peak_rss}, "
          f"after {after[0]}\n"
          f"server open files: before {before[1]}, holding the idle ones {held[1]}, peak {sampler.peak_fds}, "
          f"after {after[1]}")
    assert held[1] >= before[1] + IDLE_HTTP + IDLE_NATIVE  # every idle connection was held
    assert sampler.peak_fds <= before[1] + connections + 16
    assert after[1] <= before[1] + 8  # and let go
    assert sampler.peak_rss - before[0] < 256 * 1024  # KiB: well under a quarter of a MiB per connection
