"""``lmkernel get owner/repo[@file]``: models from the Hugging Face hub, through ``huggingface_hub``.

What the repository holds is asked first (one request, no retries, so an unreachable hub or a
missing repository is said at once); then each missing file is fetched with
``hf_hub_download`` into a hidden folder beside the model's (``<models>/owner/.repo.*``),
checked against the hub's size and sha256, and moved into ``<models>/owner/repo/`` once every
file is there. ``HF_ENDPOINT`` is read at each call (``huggingface_hub`` reads it at import).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx2  # huggingface_hub 2's HTTP client: its transport errors are what an unreachable hub raises
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm

from ..errors import LMKernelModelNotFoundError, LMKernelOSError, LMKernelValueError
from .downloads import Fractions, Note, check_file, in_place, make_folder, put_in_place, sha256_of

T = TypeVar("T")

#: Files of a repository fetched without ``@file``: the weights and what runs them, at its top level.
WANTED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def get_from_hub(repo: str, file: str | None, root: Path, progress: Fractions, note: Note) -> Path:
    """Fetch ``file`` of ``repo`` (``None``: its weights and configuration) into ``root/repo``."""
    info = hub_call(lambda: HfApi(endpoint=endpoint()).model_info(repo, files_metadata=True), repo, file)
    files = chosen(repo, file, info.siblings or [])
    folder = root / repo
    gguf = len(files) == 1 and files[0].rfilename.lower().endswith(".gguf")
    result = folder / files[0].rfilename if file or gguf else folder
    missing = [s for s in files if not in_place(folder / s.rfilename, s.size, lfs_sha(s))]
    if not missing:
        note(f"{result} is already here (sizes and sha256 checked): not fetched again")
        progress.finish()
        return result
    size = sum(s.size or 0 for s in missing)
    note(f"fetching {len(missing)} file{'s' * (len(missing) > 1)} ({size / 1e6:.1f} MB) of {repo} "
         f"from {endpoint()} into {folder}")
    make_folder(folder.parent)
    progress.expect(size)
    try:
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".download"))
    except OSError as exc:
        raise LMKernelOSError(f"cannot write in {str(folder.parent)!r}: {exc.strerror or exc}") from None
    try:
        for sibling in missing:
            fetch(repo, info.sha, sibling, staging, progress)
        for sibling in missing:
            make_folder((folder / sibling.rfilename).parent)
            put_in_place(staging / sibling.rfilename, folder / sibling.rfilename)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what is left of a failed download; nothing on success
    progress.finish()
    return result


def lfs_sha(sibling: Any) -> str | None:
    return sibling.lfs.sha256 if sibling.lfs is not None else None


def chosen(repo: str, file: str | None, siblings: list[Any]) -> list[Any]:
    """The files of the repository to fetch: ``file``, else its one GGUF or its weights and configuration."""
    names = [s.rfilename for s in siblings]
    ggufs = [name for name in names if name.lower().endswith(".gguf")]
    if file is not None:
        found = [s for s in siblings if s.rfilename == file]
        if not found:
            listing = f"its GGUF files: {', '.join(ggufs)}" if ggufs else f"its files: {', '.join(names) or 'none'}"
            raise LMKernelModelNotFoundError(f"the Hugging Face repository {repo!r} has no file {file!r}; "
                                             f"{listing[:600]}")
        return found
    if len(ggufs) == 1:
        return [s for s in siblings if s.rfilename == ggufs[0]]
    if ggufs:
        raise LMKernelValueError(
            f"the Hugging Face repository {repo!r} holds {len(ggufs)} GGUF files: name one, as "
            f"lmkernel get {repo}@FILE ({', '.join(ggufs)[:600]})"
        )
    wanted = [s for s in siblings if "/" not in s.rfilename and s.rfilename.endswith(WANTED_SUFFIXES)]
    if not any(s.rfilename.endswith(".safetensors") for s in wanted):
        raise LMKernelModelNotFoundError(
            f"the Hugging Face repository {repo!r} holds no weights lmkernel can run (GGUF or .safetensors at its "
            f"top level); its files: {', '.join(names)[:600] or 'none'}"
        )
    return wanted


def fetch(repo: str, revision: str | None, sibling: Any, staging: Path, progress: Fractions) -> None:
    """Download one file of the repository into ``staging`` and check its size and sha256."""
    name = sibling.rfilename
    hub_call(lambda: hf_hub_download(repo, name, revision=revision, local_dir=staging, endpoint=endpoint(),
                                     tqdm_class=partial(_Bar, count=progress.add)), repo, name)
    path, expected = staging / name, lfs_sha(sibling)
    check_file(f"{name} of {repo}", path.stat().st_size, sha256_of(path) if expected else "", sibling.size, expected)


def hub_call(call: Callable[[], T], repo: str, file: str | None) -> T:
    """Run a ``huggingface_hub`` call; its errors become lmkernel's, saying what to do."""
    unreachable = (f"could not reach the Hugging Face hub at {endpoint()} ({{}}): check the network connection, "
                   "or set HF_ENDPOINT to a hub mirror this machine can reach")
    try:
        return call()
    except GatedRepoError:
        raise LMKernelModelNotFoundError(
            f"the Hugging Face repository {repo!r} is gated: accept its terms on the hub, then log in "
            "(hf auth login or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise LMKernelModelNotFoundError(
            f"there is no Hugging Face repository {repo!r} at {endpoint()} (or it is private: log in with "
            "hf auth login or HF_TOKEN)"
        ) from None
    except (RemoteEntryNotFoundError, RevisionNotFoundError):
        raise LMKernelModelNotFoundError(f"the Hugging Face repository {repo!r} has no file {file!r}") from None
    except LocalEntryNotFoundError as exc:  # hf_hub_download's word for "the hub could not be reached"
        raise LMKernelOSError(unreachable.format(exc.__cause__ or exc)) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise LMKernelOSError(f"the Hugging Face hub at {endpoint()} answered HTTP {status} for {repo}: "
                              f"{str(exc).splitlines()[0]}") from None
    except httpx2.TransportError as exc:
        raise LMKernelOSError(unreachable.format(exc)) from None
    except OSError as exc:
        raise LMKernelOSError(f"downloading {repo} failed: {exc.strerror or exc}") from None


class _Bar(tqdm):
    """What ``huggingface_hub`` draws its progress bars with (``tqdm_class``): counts bytes, draws nothing."""

    def __init__(self, *args: Any, count: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})
        self._count = count

    def update(self, n: float | None = 1) -> bool | None:
        self._count(int(n or 0))
        return super().update(n)
