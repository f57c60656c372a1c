"""Real OpenAI-compatible servers for the remote backend's tests: mlx_lm.server and llama_cpp.server.

:class:`UpstreamServer` starts one server as a subprocess on a free loopback port, waits until
its ``/v1/models`` answers (and, with ``warm``, until it has generated once, so that loading the
model is not measured by a test), logs to a file the tests read (the request lines both servers
write, llama_cpp.server's "Disconnected from client", mlx_lm.server's ``BrokenPipeError``), and
is stopped by its fixture also when a test fails. :func:`cpu_seconds` reads a process's CPU time
from ``/proc/<pid>/stat`` (user + system, all its threads): the way to see that a server stopped
generating, since neither server reports what it is running.

:func:`write_config` writes the ``LMKERNEL_REMOTE`` TOML file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmkernel as lms

__all__ = [
    "UpstreamServer",
    "cpu_seconds",
    "free_port",
    "llama_cpp_server",
    "mlx_server",
    "remote_client",
    "remote_key",
    "wait_until",
    "write_config",
]

_TICK = os.sysconf("SC_CLK_TCK")
# Run before the server's Python: SIGTERM when the test process dies (even by SIGKILL, which skips the
# fixtures' teardown), then exec the server in the same process (same pid: its /proc figures are the server's).
_ORPHAN_GUARD = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                 "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) process ``pid`` has used, from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


def wait_until(condition, timeout: float, interval: float = 0.05, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)


def remote_key(server: str, model_id: str) -> str:
    """The key the remote backend lists a server's model under (leading and double slashes dropped)."""
    return "remote/" + server + "/" + "/".join(part for part in model_id.split("/") if part)


@contextmanager
def remote_client() -> Iterator[lms.Client]:
    """A fresh in-process ``Client`` (its kernel reads ``LMKERNEL_REMOTE`` as set now); at the end the
    remote models it loaded are unloaded and the default client is reset."""
    lms.sync_api._reset_default_client()
    try:
        with lms.Client() as client:
            yield client
            for model in client.llm.list_loaded():
                if model.identifier.startswith("remote/"):
                    model.unload()
    finally:
        lms.sync_api._reset_default_client()


def write_config(path: Path, servers: dict[str, dict]) -> Path:
    """Write an ``LMKERNEL_REMOTE`` file: ``{name: {"url": ..., "urls": [...], "models": [...], ...}}``."""
    lines = []
    for name, table in servers.items():
        lines.append(f"[servers.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]  # JSON strings, lists are TOML
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class UpstreamServer:
    """One OpenAI-compatible server process; :meth:`stop` (or :meth:`kill`) ends it."""

    def __init__(self, kind: str, argv: list[str], port: int, log_path: Path, model_id: str,
                 env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.port = port
        self.model_id = model_id
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        if sys.platform == "linux" and argv[0] == sys.executable:
            argv = [sys.executable, "-c", _ORPHAN_GUARD, *argv[1:]]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        self.pid = self.proc.pid

    # ---- life -------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``GET /v1/models`` answers 200; fail at once, with the log, if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before it answered:\n"
                                   f"{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not answer GET /v1/models within {timeout:g} s:\n"
                                   f"{self.log_text()[-4000:]}")
            time.sleep(0.1)

    def warm(self) -> None:
        """Generate one token directly (mlx_lm.server loads its model on the first request)."""
        self.post("/completions", {"model": self.model_id, "prompt": "Hi", "max_tokens": 1, "temperature": 0})

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed machine would."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds; close the log."""
        try:
            if self.alive:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(30)
        finally:
            self._log.close()

    # ---- what it did ------------------------------------------------------------------

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def requests(self, endpoint: str = "/v1/completions") -> int:
        """How many ``POST <endpoint>`` requests its access log shows (both servers log each one)."""
        return sum(1 for line in self.log_text().splitlines() if f'"POST {endpoint} HTTP/1.1"' in line)

    def post(self, path: str, body: dict, timeout: float = 120) -> dict:
        """A direct, non-streamed request (the tests' reference, not through lmkernel)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())

    def __repr__(self) -> str:
        return f"<{self.kind} pid={self.pid} {self.url}>"


def _log_path(workdir: Path, kind: str, port: int) -> Path:
    n = 0
    while (path := workdir / f"{kind}-{port}-{n}.log").exists():  # a server started again on its port
        n += 1
    return path


def mlx_server(model: Path, workdir: Path, *, port: int | None = None, warm: bool = True) -> UpstreamServer:
    """``mlx_lm.server --model <model folder>`` (it lists the model by its absolute path)."""
    port = port or free_port()
    hf_cache = workdir / f"hf-cache-{port}"  # it needs an existing Hugging Face cache folder to list models
    hf_cache.mkdir(parents=True, exist_ok=True)
    server = UpstreamServer(
        "mlx_lm.server", [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port),
                          "--host", "127.0.0.1"],
        port, _log_path(workdir, "mlx", port), str(model),
        env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "MLX_DISABLE_COMPILE": "1"})
    return _started(server, warm)


def llama_cpp_server(gguf: Path, workdir: Path, *, alias: str, n_ctx: int, warm: bool = True) -> UpstreamServer:
    """``llama_cpp.server --model <file.gguf> --model_alias <alias> --n_ctx <n_ctx>`` (verbose: its logs
    say when a client disconnected)."""
    port = free_port()
    server = UpstreamServer(
        "llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
                             "--n_ctx", str(n_ctx), "--host", "127.0.0.1", "--port", str(port)],
        port, _log_path(workdir, "llama", port), alias)
    return _started(server, warm)


def _started(server: UpstreamServer, warm: bool) -> UpstreamServer:
    try:
        server.wait_ready()
        if warm:
            server.warm()
    except BaseException:
        server.stop()
        raise
    return server
