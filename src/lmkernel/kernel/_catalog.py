"""Model folders on disk, and how a key names one of them.

A key is a path to a model folder, or a name looked up in the model folders: the
``LMKERNEL_MODELS`` path list, LM Studio's models folder and the Hugging Face hub cache
(``LMKERNEL_NO_DEFAULT_FOLDERS=1`` keeps only ``LMKERNEL_MODELS``). Keys are
``publisher/name`` as those tools lay them out; a bare ``name`` matches when it is unique.
A folder is a model when some backend's :meth:`~lmkernel.plugins.Backend.describe` accepts it.

Two models are built in. ``lmkernel/kjv-demo`` ships inside the package: a small Llama
trained on the King James Bible (``tools/train_demo_model.py``), the default when no other
model is found, so that a fresh machine completes text in English. ``lmkernel/tiny-random-llama``
is a tiny seeded random Llama, generated into lmkernel's cache folder on first use (noise; for
tests and benchmarks).
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LMKernelModelNotFoundError
from ..plugins.contract import Backend, ModelDescription
from .messages import LlmInfo

BUILTIN_TINY = "lmkernel/tiny-random-llama"
BUILTIN_DEMO = "lmkernel/kjv-demo"


def demo_model_path() -> Path:
    """Where the demo model ships, inside the installed package."""
    return Path(__file__).resolve().parent.parent / "models" / "kjv-demo"


def cache_dir() -> Path:
    """lmkernel's cache folder (``LMKERNEL_CACHE``, else ``~/.cache/lmkernel``)."""
    env = os.environ.get("LMKERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lmkernel"


def model_roots() -> list[tuple[Path, str]]:
    """The folders searched for models, each with its layout (``"plain"`` or ``"hf-cache"``)."""
    roots = [(Path(p).expanduser(), "plain") for p in os.environ.get("LMKERNEL_MODELS", "").split(os.pathsep) if p]
    if os.environ.get("LMKERNEL_NO_DEFAULT_FOLDERS", "") not in ("", "0"):
        return roots
    home = Path.home()
    roots += [(home / ".lmstudio" / "models", "plain"), (home / ".cache" / "lm-studio" / "models", "plain")]
    hf_hub = os.environ.get("HF_HUB_CACHE") or (
        Path(os.environ["HF_HOME"]) / "hub" if "HF_HOME" in os.environ else home / ".cache" / "huggingface" / "hub"
    )
    roots.append((Path(hf_hub), "hf-cache"))
    return roots


@dataclass(frozen=True)
class CatalogEntry:
    """A model folder some backend accepts: its key, path, description per backend."""

    key: str
    path: Path
    descriptions: dict[str, ModelDescription]

    def info(self) -> LlmInfo:
        desc = next(iter(self.descriptions.values()))
        return LlmInfo(
            model_key=self.key,
            format=desc.format,
            display_name=desc.display_name or self.key.rsplit("/", 1)[-1],
            path=str(self.path),
            size_bytes=desc.size_bytes,
            max_context_length=desc.max_context_length,
            params_string=desc.params_string,
            architecture=desc.architecture,
        )


def _candidates(root: Path, layout: str) -> Iterable[tuple[str, Path]]:
    if not root.is_dir():
        return
    if layout == "hf-cache":
        for repo in sorted(root.glob("models--*")):
            snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
            if snapshots:
                yield repo.name.removeprefix("models--").replace("--", "/"), snapshots[-1]
        return
    # LM Studio and most users lay models out as publisher/name/ or name/.
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        yield child.name, child
        for grandchild in sorted(p for p in child.iterdir() if p.is_dir() and not p.name.startswith(".")):
            yield f"{child.name}/{grandchild.name}", grandchild


class Catalog:
    """Scans the model folders (on every call: folders change while a program runs)."""

    def __init__(self, backends: list[Backend], roots: list[tuple[Path, str]] | None = None) -> None:
        self._backends = backends
        self._roots = roots

    def describe(self, key: str, path: Path) -> CatalogEntry | None:
        descriptions = {}
        for backend in self._backends:
            try:
                desc = backend.describe(path)
            except Exception:  # a plugin's describe must not break listing
                desc = None
            if desc is not None:
                descriptions[backend.name] = desc
        return CatalogEntry(key, path, descriptions) if descriptions else None

    def entries(self) -> list[CatalogEntry]:
        """Every model folder a known backend accepts, first root first."""
        seen: dict[str, CatalogEntry] = {}
        for root, layout in self._roots if self._roots is not None else model_roots():
            for key, path in _candidates(root, layout):
                if key not in seen and (entry := self.describe(key, path)) is not None:
                    seen[key] = entry
        return list(seen.values())

    def resolve(self, key: str) -> CatalogEntry:
        """Find the model ``key`` names; raise a not-found error listing what exists."""
        path = Path(key).expanduser()
        if path.is_dir():
            path = path.resolve()
            known = next((e for e in self.entries() if e.path.resolve() == path), None)
            if known is not None:  # a folder in the model folders keeps its key
                return known
            entry = self.describe(path.name, path)
            if entry is None:
                raise LMKernelModelNotFoundError(
                    f"No backend can load the folder {str(path)!r}: "
                    "it needs a config.json and weights in a format a backend reads"
                )
            return entry
        if key == BUILTIN_TINY:
            return self.builtin_tiny()
        if key == BUILTIN_DEMO and (demo := self.builtin_demo()) is not None:
            return demo
        entries = self.entries()
        for entry in entries:
            if entry.key == key:
                return entry
        by_name = [e for e in entries if e.key.rsplit("/", 1)[-1].lower() == key.lower()]
        if len(by_name) == 1:
            return by_name[0]
        keys = [e.key for e in entries] + [BUILTIN_DEMO, BUILTIN_TINY]
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LMKernelModelNotFoundError(
            f"No model matches the key {key!r}.{hint} Available: {', '.join(keys)}"
            " (folders searched: LMKERNEL_MODELS, LM Studio's models folder, the Hugging Face cache;"
            " a path to a model folder works too)"
        )

    def builtin_tiny(self) -> CatalogEntry:
        """The built-in tiny random model, generated on first use."""
        path = cache_dir() / "models" / BUILTIN_TINY
        if not (path / "config.json").exists():
            from ..testing import build_tiny_llama

            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            build_tiny_llama(tmp)
            try:
                tmp.replace(path)
            except OSError:  # another process built it first
                shutil.rmtree(tmp, ignore_errors=True)
        entry = self.describe(BUILTIN_TINY, path)
        if entry is None:
            raise LMKernelModelNotFoundError(f"No available backend can load the built-in model {BUILTIN_TINY!r}")
        return entry

    def builtin_demo(self) -> CatalogEntry | None:
        """The demo model shipped with the package, if this installation has it."""
        path = demo_model_path()
        if not (path / "config.json").exists():
            return None
        return self.describe(BUILTIN_DEMO, path)

    def default(self) -> CatalogEntry:
        """The model ``llm()`` loads when given no key and nothing is loaded.

        ``LMKERNEL_DEFAULT_MODEL`` if set, else the first model found in the model folders,
        else the shipped demo model, else the built-in tiny random model.
        """
        key = os.environ.get("LMKERNEL_DEFAULT_MODEL")
        if key:
            return self.resolve(key)
        entries = self.entries()
        if entries:
            return entries[0]
        return self.builtin_demo() or self.builtin_tiny()
