"""Local stand-ins for a package index (PEP 691 JSON) and the Hugging Face hub, for download tests.

Each is a real HTTP server on 127.0.0.1 in a thread, answering what the real one answers to the
requests lmkernel and ``huggingface_hub`` make: no test touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: path -> (status, headers, body); a callable body is given the handler and writes the answer itself.
Route = tuple[int, dict[str, str], "bytes | Callable[[BaseHTTPRequestHandler], None]"]


@dataclass
class StandIn:
    """A server and its routes; ``requests`` records each (method, path) it was asked."""

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""


@contextmanager
def serve() -> Iterator[StandIn]:
    stand_in = StandIn()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def answer(self, head_only: bool) -> None:
            path = urlsplit(self.path).path
            stand_in.requests.append((self.command, path))
            status, headers, body = stand_in.routes.get(
                path, (404, {"X-Error-Code": "RepoNotFound", "Content-Type": "text/plain"}, b"not found")
            )
            if callable(body):
                body(self)
                return
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self.answer(head_only=False)

        def do_HEAD(self) -> None:
            self.answer(head_only=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_with(member: str, data: bytes) -> bytes:
    """A wheel (a zip) holding ``member`` with ``data``, and the metadata files a wheel has."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("fake_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n")
        archive.writestr(member, data)
    return buffer.getvalue()


def add_package(stand_in: StandIn, package: str, filename: str, wheel: bytes, *, sha: str | None = None) -> None:
    """Publish ``wheel`` as ``filename`` of ``package`` on the stand-in index (at ``/simple``)."""
    page = {
        "meta": {"api-version": "1.1"},
        "name": package,
        "files": [
            {"filename": f"{package}-0.9.tar.gz", "url": f"/files/{package}-0.9.tar.gz", "hashes": {}},
            {"filename": filename, "url": f"../../files/{filename}", "size": len(wheel),
             "hashes": {"sha256": sha or sha256(wheel)}},
        ],
    }
    stand_in.routes[f"/simple/{package}/"] = (200, {"Content-Type": "application/vnd.pypi.simple.v1+json"},
                                              json.dumps(page).encode())
    stand_in.routes[f"/files/{filename}"] = (200, {"Content-Type": "application/octet-stream"}, wheel)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_repo(stand_in: StandIn, repo: str, files: dict[str, bytes], *, lfs: tuple[str, ...] = ()) -> None:
    """Publish ``files`` as the Hugging Face repository ``repo`` (``lfs``: the ones stored as LFS)."""
    siblings = []
    for name, data in files.items():
        sibling: dict[str, object] = {"rfilename": name, "size": len(data), "blobId": sha256(data)[:40]}
        if name in lfs:
            sibling["lfs"] = {"size": len(data), "sha256": sha256(data), "pointerSize": 132}
        siblings.append(sibling)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha256(data)}"', "Content-Type": "application/octet-stream"}
        stand_in.routes[f"/{repo}/resolve/{COMMIT}/{name}"] = (200, headers, data)
    info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}
    stand_in.routes[f"/api/models/{repo}"] = (200, {"Content-Type": "application/json"}, json.dumps(info).encode())


def broken_off(after: int, total: int) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer that announces ``total`` bytes, sends ``after`` of them, and closes the connection."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(total))
        handler.end_headers()
        handler.wfile.write(b"\0" * after)
        handler.wfile.flush()
        handler.close_connection = True

    return answer
