"""Where models live on disk: the model folders, their candidate subfolders, and guarded filesystem calls.

Every filesystem call here is guarded (:func:`guarded`): a folder that cannot be read, a name
too long, an unknown ``~user`` gives a default, never an exception, so listing models never
fails on one odd folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_FS_ERRORS = (OSError, ValueError, RuntimeError)  # file names too long, NUL bytes, unknown ~user


def guarded(call: Callable[[], T], default: T) -> T:
    """Run a filesystem call; any filesystem error gives ``default``."""
    try:
        return call()
    except _FS_ERRORS:
        return default


def demo_model_path() -> Path:
    """Where the demo model ships, inside the installed package."""
    return Path(__file__).resolve().parent.parent / "models" / "kjv-demo"


def cache_dir() -> Path:
    """lmkernel's cache folder (``LMKERNEL_CACHE``, else ``~/.cache/lmkernel``)."""
    env = os.environ.get("LMKERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lmkernel"


def models_dir() -> Path:
    """lmkernel's own models folder, where ``lmkernel get`` puts models: ``<cache>/models``."""
    return cache_dir() / "models"


def model_roots() -> list[tuple[Path, str]]:
    """The folders searched for models, each with its layout (``"plain"`` or ``"hf-cache"``)."""
    roots = [
        (guarded(Path(p).expanduser, Path(p)), "plain")
        for p in os.environ.get("LMKERNEL_MODELS", "").split(os.pathsep)
        if p
    ]
    if os.environ.get("LMKERNEL_NO_DEFAULT_FOLDERS", "") not in ("", "0"):
        return roots
    home = guarded(Path.home, None)
    if home is None:  # no home folder: only the folders named in the environment
        return roots
    roots.append((guarded(models_dir, home / ".cache" / "lmkernel" / "models"), "plain"))
    roots += [(home / ".lmstudio" / "models", "plain"), (home / ".cache" / "lm-studio" / "models", "plain")]
    hf_hub = os.environ.get("HF_HUB_CACHE") or (
        Path(os.environ["HF_HOME"]) / "hub" if "HF_HOME" in os.environ else home / ".cache" / "huggingface" / "hub"
    )
    roots.append((Path(hf_hub), "hf-cache"))
    return roots


def subdirs(folder: Path) -> list[Path]:
    """The visible subfolders of ``folder``, sorted; unreadable ones are left out."""

    def listing() -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and guarded(p.is_dir, False))

    return guarded(listing, [])


def mtime(path: Path) -> float:
    return guarded(lambda: path.stat().st_mtime, 0.0)


def gguf_files(folder: Path) -> list[Path]:
    """The GGUF model files in ``folder``, sorted: ``*.gguf`` but vision projectors (``mmproj*``) and
    the second and later parts of a split model (``-00002-of-00003.gguf``; llama.cpp loads the rest
    from the first)."""

    def listing() -> list[Path]:
        return sorted(
            p for p in folder.iterdir()
            if p.suffix.lower() == ".gguf" and not p.name.startswith(".")
            and not p.name.lower().startswith("mmproj") and not _later_split_part(p.name)
            and guarded(p.is_file, False)
        )

    return guarded(listing, [])


def _later_split_part(name: str) -> bool:
    match = _SPLIT.search(name)
    return match is not None and int(match.group(1)) != 1


_SPLIT = re.compile(r"-(\d{5})-of-\d{5}\.gguf$", re.IGNORECASE)


def candidates(root: Path, layout: str) -> Iterable[tuple[str, Path]]:
    """The folders and GGUF files of ``root`` that may hold a model, each with its path relative to ``root``."""
    if not guarded(root.is_dir, False):
        return
    if layout == "hf-cache":
        for repo in guarded(lambda: sorted(root.glob("models--*")), []):
            snapshots = sorted(subdirs(repo / "snapshots"), key=mtime)
            if snapshots:
                repo_id = repo.name.removeprefix("models--").replace("--", "/")
                yield repo_id, snapshots[-1]
                for file in gguf_files(snapshots[-1]):
                    yield f"{repo_id}/{file.name}", file
        return
    # LM Studio and most users lay models out as publisher/name/ or name/; GGUF files inside them.
    for file in gguf_files(root):
        yield file.name, file
    for child in subdirs(root):
        yield child.name, child
        for file in gguf_files(child):
            yield f"{child.name}/{file.name}", file
        for grandchild in subdirs(child):
            yield f"{child.name}/{grandchild.name}", grandchild
            for file in gguf_files(grandchild):
                yield f"{child.name}/{grandchild.name}/{file.name}", file


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def existing_folder(key: str) -> Path | None:
    """The model folder or GGUF file ``key`` names as a path (``~`` expanded, resolved), or ``None``."""
    path = guarded(Path(key).expanduser, Path(key))  # "~nosuchuser/x" stays as written
    if not guarded(path.is_dir, False) and not (is_gguf(path) and guarded(path.is_file, False)):
        return None
    return guarded(path.resolve, None)


def folder_problem(key: str) -> str:
    """Say why ``key`` names no folder (it does not exist, is a file, cannot be read)."""
    path = guarded(Path(key).expanduser, Path(key))
    try:
        path.stat()
    except FileNotFoundError:
        return "the path does not exist"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or type(exc).__name__})"
    except (ValueError, RuntimeError):
        return "the path does not exist"
    return "it is not a folder or a .gguf file"
