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
