"""Model folders on disk, and how a key names one of them.

The model folders: the ``LMKERNEL_MODELS`` path list, LM Studio's models folder and the
Hugging Face hub cache (``LMKERNEL_NO_DEFAULT_FOLDERS=1`` keeps only ``LMKERNEL_MODELS``).
A folder is a model when some backend's :meth:`~lmkernel.plugins.Backend.describe` accepts it.

Names follow LM Studio; ``docs/models.md`` states the rule and its reasons. A model is a folder
or a GGUF file. Its ``path`` is where it lies relative to its models folder (``publisher/repo``,
``publisher/repo/file.gguf``; in the Hugging Face cache, the repository id), its ``model_key``
the last part of that path, lower-cased (a GGUF file: its repository's name without ``-GGUF``,
and ``@quantization`` when the repository holds several); a key already taken goes to the first
model (folders in order, then paths sorted), a later one is keyed by its path. A key resolves as:
an explicit path (absolute, ``~``, ``./``, ``../``), a built-in key, a model's key, its path, a
GGUF repository's first quantization, the one model it names ignoring case (or a trailing part
of its path), and last a folder relative to the working directory. A folder outside the model
folders is named by its absolute path.

Two models are built in, keyed like LM Studio's hub models (``publisher/name``), which are
also their paths. ``lmkernel/kjv-demo`` ships inside the package: a small Llama trained on
the King James Bible (``tools/train_demo_model.py``), the default when no other model is
found, so that a fresh machine completes text in English. ``lmkernel/tiny-random-llama`` is a
tiny seeded random Llama, generated into lmkernel's cache folder on first use (noise; for
tests and benchmarks). A folder at one of those paths in a models folder is not listed.

Nothing here raises but :class:`~lmkernel.LMKernelModelNotFoundError` (no such model, or
no backend takes the folder: each backend's reason is in the message) and
:class:`~lmkernel.LMKernelValueError` (a key that cannot name anything): every filesystem
call is guarded, and what a plugin's ``describe()`` says is checked
(:func:`check_description`) and bounded in time (:data:`DESCRIBE_TIMEOUT`); a plugin that
raises, hangs or answers wrongly loses its models from the listing, and is logged once.
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LMKernelModelNotFoundError, LMKernelValueError
from ..plugins.contract import Backend, ModelDescription, ModelRejected
from ._boundary import check_description, offered_problem
from ._describer import DESCRIBE_TIMEOUT, DescribeHung, Describer, text_of
from ._folders import (
    cache_dir,
    candidates,
    demo_model_path,
    existing_folder,
    folder_problem,
    guarded,
    is_gguf,
    model_roots,
)
from ._names import check_key, is_explicit_path, model_key
from ._values import show, some, unicode_problem
from .messages import LlmInfo

log = logging.getLogger("lmkernel")

BUILTIN_TINY = "lmkernel/tiny-random-llama"
BUILTIN_DEMO = "lmkernel/kjv-demo"

@dataclass(frozen=True)
class CatalogEntry:
    """A model folder some backend accepts.

    ``key``: its model key; ``path``: the folder (absolute, what a backend loads);
    ``relative_path``: the path shown as ``LlmInfo.path`` (relative to its models folder;
    ``None`` for a folder outside them, shown as its absolute path); ``descriptions``: per
    accepting backend; ``rejections``: per refusing backend, its reason.
    """

    key: str
    path: Path
    descriptions: dict[str, ModelDescription]
    relative_path: str | None = None
    rejections: Mapping[str, str] = field(default_factory=dict)
    offered: bool = False  # a model a backend offers (on a server), not a folder

    def info(self) -> LlmInfo:
        desc = next(iter(self.descriptions.values()))
        shown = self.relative_path if self.relative_path is not None else str(self.path)
        return LlmInfo(
            model_key=self.key,
            format=desc.format,
            display_name=desc.display_name or shown.rstrip("/").rsplit("/", 1)[-1] or self.key,
            path=shown,
            size_bytes=desc.size_bytes,
            max_context_length=desc.max_context_length,
            params_string=desc.params_string,
            architecture=desc.architecture,
            quantization=desc.quantization,
        )


def _reasons(rejections: Mapping[str, str]) -> str:
    """``mlx, exllamav2: no config.json; other: ...``: each reason once, with the backends that gave it."""
    if not rejections:
        return "no backend is installed"
    by_reason: dict[str, list[str]] = {}
    for name, reason in rejections.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


class Catalog:
    """Scans the model folders (on every call: folders change while a program runs).

    Methods run on worker threads, possibly several at once; ``describe_timeout`` bounds each
    plugin ``describe()`` call (default :data:`DESCRIBE_TIMEOUT`; ``0``: call it directly).
    """

    def __init__(
        self,
        backends: list[Backend],
        roots: list[tuple[Path, str]] | None = None,
        describe_timeout: float | None = None,
    ) -> None:
        self._backends = backends
        self._roots = roots
        self._timeout = describe_timeout
        self._describers: dict[int, Describer] = {}  # by id(backend)
        self._lock = threading.Lock()
        self._logged: set[tuple[str, str]] = set()
        self._unlisted: list[str] = []  # why offered models were missing from the last listing

    def _warn_once(self, backend: str, message: str) -> None:
        if (backend, message) not in self._logged:
            self._logged.add((backend, message))
            log.warning("%s", message)

    def _call_describe(self, backend: Backend, path: Path) -> Any:
        """Call ``backend.describe(path)`` on the backend's helper thread, waiting at most the timeout."""
        timeout = DESCRIBE_TIMEOUT if self._timeout is None else self._timeout
        if timeout <= 0:
            return backend.describe(path)
        with self._lock:
            describer = self._describers.get(id(backend))
            if describer is None:
                describer = self._describers[id(backend)] = Describer(backend)
        return describer.call(path, timeout)

    def _describe_folder(self, path: Path) -> tuple[dict[str, ModelDescription], dict[str, str]]:
        """Ask every backend about ``path``: the descriptions of those that accept it, the reasons of the others."""
        descriptions: dict[str, ModelDescription] = {}
        rejections: dict[str, str] = {}
        for backend in self._backends:
            name = getattr(backend, "name", type(backend).__name__)
            try:
                desc = self._call_describe(backend, path)
                if desc is None:
                    rejections[name] = "does not take this folder (it gave no reason)"
                else:
                    descriptions[name] = check_description(name, desc)
            except ModelRejected as exc:  # the usual answer for a folder that is not this backend's model
                rejections[name] = text_of(exc)
            except Exception as exc:  # noqa: BLE001 - a plugin's describe must not break listing
                if isinstance(exc, LMKernelValueError):
                    rejections[name] = text_of(exc).removeprefix(f"Backend {name!r} ")
                    message = f"{exc} (for the folder {str(path)!r}); its description is skipped"
                elif isinstance(exc, DescribeHung):
                    rejections[name] = text_of(exc)
                    message = f"Backend {name!r} is skipped while listing models: {exc}"
                else:
                    rejections[name] = f"describe() raised {type(exc).__name__}: {text_of(exc)}"
                    message = f"Backend {name!r} failed to describe {str(path)!r}: {type(exc).__name__}: {text_of(exc)}"
                self._warn_once(name, message)
        return descriptions, rejections

    def describe(self, key: str, path: Path, relative_path: str | None = None) -> CatalogEntry | None:
        """The entry for the folder ``path`` under ``key``, or ``None`` when no backend accepts it."""
        descriptions, rejections = self._describe_folder(path)
        return CatalogEntry(key, path, descriptions, relative_path, rejections) if descriptions else None

    def entries(self) -> list[CatalogEntry]:
        """Every model folder a known backend accepts, first models folder first, each path once, each key once."""
        keys = {BUILTIN_DEMO, BUILTIN_TINY}
        paths = {BUILTIN_DEMO, BUILTIN_TINY}
        folders: set[Path] = set()
        found: list[CatalogEntry] = []
        for root, layout in self._roots if self._roots is not None else model_roots():
            listed = list(candidates(root, layout))
            ggufs_in = Counter(relative.rpartition("/")[0] for relative, path in listed if is_gguf(path))
            for relative, folder in listed:
                if relative in paths:
                    if relative == BUILTIN_TINY and folder == cache_dir() / "models" / BUILTIN_TINY:
                        continue  # the built-in model's own folder, in lmkernel's models folder
                    if relative in (BUILTIN_DEMO, BUILTIN_TINY):
                        self._warn_once("", f"Skipped the model folder {str(folder)!r}: {relative!r} names a built-in model")
                    continue
                if unicode_problem(relative) is not None or unicode_problem(str(folder)) is not None:
                    self._warn_once("", f"Skipped the model folder {str(folder)!r}: its name is not valid Unicode")
                    continue
                real = guarded(folder.resolve, folder)
                if real in folders and not is_gguf(folder):  # one folder reached from two models folders
                    continue  # (GGUF files linked under two names, as users link models, are two models)
                descriptions, rejections = self._describe_folder(folder)
                if not descriptions:
                    continue
                parent = relative.rpartition("/")[0]  # files at the top of a models folder are keyed by their names
                variant = is_gguf(folder) and parent != "" and ggufs_in[parent] > 1
                key = next((k for k in (model_key(relative, variant), relative, str(folder)) if k not in keys), str(real))
                keys.add(key)
                paths.add(relative)
                folders.add(real)
                found.append(CatalogEntry(key, folder, descriptions, relative, rejections))
        found.extend(self._offered(keys, paths))
        return found

    def _offered(self, keys: set[str], paths: set[str]) -> list[CatalogEntry]:
        """The models backends offer besides folders (:meth:`~lmkernel.plugins.Backend.offered_models`),
        keyed by their paths; a path already listed keeps its first model."""
        found: list[CatalogEntry] = []
        unlisted: list[str] = []
        timeout = DESCRIBE_TIMEOUT if self._timeout is None else self._timeout
        for backend in self._backends:
            if type(backend).offered_models is Backend.offered_models:
                continue  # offers nothing: no thread, no wait
            name = getattr(backend, "name", type(backend).__name__)
            try:
                with self._lock:
                    describer = self._describers.get(id(backend))
                    if describer is None:
                        describer = self._describers[id(backend)] = Describer(backend)
                offered = describer.offered(timeout) if timeout > 0 else backend.offered_models()
                offered = list(offered)
                unlisted += [f"{name}: {text_of(p)}" for p in list(backend.offer_problems())[:10] if isinstance(p, str)]
            except Exception as exc:  # noqa: BLE001 - a plugin's listing must not break the others
                message = f"could not list the models it offers: {type(exc).__name__}: {text_of(exc)}"
                unlisted.append(f"{name}: {message}")
                self._warn_once(name, f"Backend {name!r} {message}")
                continue
            for model in offered:
                problem = offered_problem(model, reserved=(BUILTIN_DEMO, BUILTIN_TINY))
                if problem is None:
                    try:
                        description = check_description(name, model.description)
                    except LMKernelValueError as exc:
                        problem = text_of(exc)
                if problem is not None:
                    self._warn_once(name, f"Backend {name!r} offered a model the kernel skips: {problem}")
                    continue
                if model.path in paths:
                    continue
                keys.add(model.path)
                paths.add(model.path)
                found.append(CatalogEntry(model.path, Path(model.path), {name: description}, model.path, offered=True))
        self._unlisted = unlisted
        return found

    def lookup(self, key: str) -> CatalogEntry:
        """Find the listed or built-in model ``key`` names, never a folder on disk (as a server must).

        Raises :class:`~lmkernel.LMKernelModelNotFoundError` listing what exists.
        """
        check_key(key)
        builtin = self._builtin(key)
        return builtin if builtin is not None else self._match(key, self.entries())

    def resolve(self, key: str) -> CatalogEntry:
        """Find the model ``key`` names (a key, a path, or a folder); raise a not-found error saying why not.

        Raises only :class:`~lmkernel.LMKernelModelNotFoundError` and, for a key that cannot
        name anything (empty, NUL, not valid Unicode), :class:`~lmkernel.LMKernelValueError`.
        """
        check_key(key)
        if is_explicit_path(key):
            folder = existing_folder(key)
            if folder is None:
                what = "GGUF file" if key.lower().endswith(".gguf") else "folder"
                raise LMKernelModelNotFoundError(f"No model {what} at {key!r}: {folder_problem(key)}")
            return self._folder_entry(folder, self.entries())
        builtin = self._builtin(key)
        if builtin is not None:
            return builtin
        entries = self.entries()
        try:
            return self._match(key, entries)
        except LMKernelModelNotFoundError as exc:
            error = exc
        folder = existing_folder(key)  # last: a folder relative to the working directory
        if folder is None:
            raise error
        return self._folder_entry(folder, entries)

    def _builtin(self, key: str) -> CatalogEntry | None:
        if key == BUILTIN_TINY:
            return self.builtin_tiny()
        if key == BUILTIN_DEMO:
            return self.builtin_demo()
        return None

    def _match(self, key: str, entries: list[CatalogEntry]) -> CatalogEntry:
        """The entry ``key`` names among ``entries`` and the built-ins: a key, a path, then a unique match ignoring case."""
        for entry in entries:
            if entry.key == key:
                return entry
        for entry in entries:
            if entry.relative_path == key:
                return entry
        for entry in entries:  # a GGUF repository with several quantizations: its first, as LM Studio
            if entry.key.startswith(key + "@") and is_gguf(entry.path):
                return entry
        named = [(e.key, e.relative_path or str(e.path), lambda e=e: e, e.offered) for e in entries]
        if guarded((demo_model_path() / "config.json").is_file, False):
            named.append((BUILTIN_DEMO, BUILTIN_DEMO, self.builtin_demo, False))
        named.append((BUILTIN_TINY, BUILTIN_TINY, self.builtin_tiny, False))
        wanted = key.lower().rstrip("/")
        found = [
            (path, get, offered) for k, path, get, offered in named
            if wanted and (wanted in (k.lower(), path.lower()) or path.lower().endswith("/" + wanted))
        ]
        local = [match for match in found if not match[2]]
        if len(found) > 1 and len(local) == 1:  # a short name keeps naming the local model a server also has
            found = local
        if len(found) == 1 and (entry := found[0][1]()) is not None:
            return entry
        if len(found) > 1:
            raise LMKernelModelNotFoundError(
                f"The key {show(key)} matches {len(found)} models: {some(path for path, _, _ in found)};"
                " name one by its key or its path"
            )
        shown = [k if k == path else f"{k} ({path})" for k, path, _, _ in named]
        names = [k for k, _, _, _ in named] + [path for k, path, _, _ in named if path != k]
        close = difflib.get_close_matches(key, names[:2000], n=1) if len(key) <= 200 else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        unlisted = f". Not listed now: {'; '.join(self._unlisted)}" if self._unlisted else ""
        raise LMKernelModelNotFoundError(
            f"No model matches the key {show(key)}.{hint} Available: {some(shown)}"
            " (folders searched: LMKERNEL_MODELS, lmkernel's models folder, LM Studio's, the Hugging Face cache;"
            f" a path to a model folder or .gguf file works too){unlisted}"
        )

    def _folder_entry(self, folder: Path, entries: list[CatalogEntry]) -> CatalogEntry:
        """The entry for ``folder`` (resolved): a listed or built-in model keeps its key; another is keyed by its path."""
        for entry in entries:
            if guarded(entry.path.resolve, entry.path) == folder:
                return entry
        if folder == guarded(demo_model_path().resolve, None) and (demo := self.builtin_demo()) is not None:
            return demo
        descriptions, rejections = self._describe_folder(folder)
        if not descriptions:
            what = "file" if is_gguf(folder) else "folder"
            raise LMKernelModelNotFoundError(f"No backend can load the {what} {str(folder)!r}: {_reasons(rejections)}")
        return CatalogEntry(str(folder), folder, descriptions, None, rejections)

    def builtin_tiny(self) -> CatalogEntry:
        """The built-in tiny random model, generated on first use."""
        try:
            path = cache_dir() / "models" / BUILTIN_TINY
            if not (path / "config.json").exists():
                from ..testing import build_tiny_llama  # a leaf module: it imports nothing of lmkernel

                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                build_tiny_llama(tmp)
                try:
                    tmp.replace(path)
                except OSError:  # another process built it first
                    shutil.rmtree(tmp, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - no cache folder, a full disk: the model is not there
            raise LMKernelModelNotFoundError(
                f"The built-in model {BUILTIN_TINY!r} could not be built: {type(exc).__name__}: {exc}"
            ) from None
        descriptions, rejections = self._describe_folder(path)
        if not descriptions:
            raise LMKernelModelNotFoundError(f"No backend can load the built-in model {BUILTIN_TINY!r}: {_reasons(rejections)}")
        return CatalogEntry(BUILTIN_TINY, path, descriptions, BUILTIN_TINY, rejections)

    def builtin_demo(self) -> CatalogEntry | None:
        """The demo model shipped with the package, if this installation has it."""
        path = demo_model_path()
        if not guarded((path / "config.json").exists, False):
            return None
        return self.describe(BUILTIN_DEMO, path, BUILTIN_DEMO)

    def default(self) -> CatalogEntry:
        """The model ``llm()`` loads when given no key and nothing is loaded.

        ``LMKERNEL_DEFAULT_MODEL`` if set, else the first model found in the model folders,
        else the shipped demo model, else the built-in tiny random model.
        """
        key = os.environ.get("LMKERNEL_DEFAULT_MODEL")
        if key:
            return self.resolve(key)
        entries = [entry for entry in self.entries() if not entry.offered]  # never a server's, unasked
        if entries:
            return entries[0]
        return self.builtin_demo() or self.builtin_tiny()
