"""Start ``lmkernel serve`` in a subprocess for a test, on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request


class Server:
    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # stderr: read on failure, never a full pipe
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmkernel", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("lmkernel serving on "):
                self.host = line.split()[3]
                break
        else:
            self.log.seek(0)
            raise RuntimeError(f"lmkernel serve did not start: {self.log.read()}")
        self.url = f"http://{self.host}"

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
            return json.loads(response.read())

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait: the exit code of a graceful shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.lines += self.proc.stdout.readlines()
        self.proc.stdout.close()
        self.log.close()
        return rc


def process_figures(pid: int) -> tuple[int, int]:
    """(resident memory in KiB, open files) of process ``pid``, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def in_process(test, config=None, *, autojump: bool = True, kernel=None):
    """Run ``await test(host, port)`` against ``serve(config)`` in this process.

    On trio's autojump clock by default, so that timeouts of seconds take no real time (for
    tests that load no model: an engine's worker threads run in real time).
    """
    import trio
    import trio.testing

    from lmkernel.kernel.serve import ServeConfig, serve

    async def main():
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(lambda task_status: serve(
                config or ServeConfig(port=0), kernel=kernel, report=lambda _: None, stop=stop,
                task_status=task_status))
            try:
                await test(host, port)
            finally:
                stop.set()  # a graceful shutdown: models unloaded, connections ended

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0) if autojump else None)
