"""One source for both facades: the sync API is generated from the async one and cannot drift."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import lmkernel as lms
from lmkernel.sdk import _async_stream, _sync_facade, _sync_stream, async_api

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "unasync.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("unasync", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_sync_facade_is_what_the_async_source_generates():
    done = subprocess.run([sys.executable, str(TOOL), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_fails_on_any_difference():
    tool = load_tool()
    assert [source.name for source, _, _ in tool.PAIRS] == ["async_api.py", "_async_stream.py"]
    for source_path, target, docstring in tool.PAIRS:
        source = source_path.read_text(encoding="utf-8")
        generated = tool.convert(source, docstring, source_path.name)
        assert generated == target.read_text(encoding="utf-8")
        # A hand edit of either side shows up as a difference.
        edited = source.replace("__all__ = [", "__all__: list[str] = [", 1)
        assert edited != source and tool.convert(edited, docstring, source_path.name) != generated


def test_the_rewrite_rules():
    tool = load_tool()
    code = (
        '"""Doc."""\n'
        "class AsyncThing(_AsyncBase):\n"
        "    async def __aenter__(self):\n"
        "        async for x in self:\n"
        "            await self._inbox.aget()\n"
        "        async with y:\n"
        "            await self.aclose()\n"
        "        raise StopAsyncIteration  # ``async for`` over an AsyncThing\n"
        "    x = 'AsyncThing'\n"
        "from ._async_io import waker\n"
    )
    out = tool.convert(code).split('"""\n', 2)[-1]
    assert out == (
        "class Thing(_Base):\n"
        "    def __enter__(self):\n"
        "        for x in self:\n"
        "            self._inbox.get()\n"
        "        with y:\n"
        "            self.close()\n"
        "        raise StopIteration  # ``for`` over an Thing\n"
        "    x = 'Thing'\n"
        "from ._sync_io import waker\n"
    )


def public_methods(cls) -> dict[str, inspect.Signature]:
    names = {n for n in dir(cls) if not n.startswith("_") or n in ("__enter__", "__aenter__")}
    return {n: inspect.signature(getattr(cls, n)) for n in names if callable(getattr(cls, n))}


def test_each_sync_class_has_the_async_classs_methods_and_signatures():
    pairs = [
        (lms.Client, lms.AsyncClient), (lms.LLM, lms.AsyncLLM),
        (lms.PredictionStream, lms.AsyncPredictionStream), (lms.DownloadedLlm, lms.AsyncDownloadedLlm),
    ]
    for sync, asynchronous in pairs:
        assert sync.__module__ in (_sync_facade.__name__, _sync_stream.__name__)
        assert asynchronous.__module__ in (async_api.__name__, _async_stream.__name__)
        sync_methods = public_methods(sync)
        async_methods = {"close" if n == "aclose" else n: s for n, s in public_methods(asynchronous).items()}
        async_methods = {"__enter__" if n == "__aenter__" else n: s for n, s in async_methods.items()}
        assert sync_methods.keys() == async_methods.keys(), sync
        for name, signature in sync_methods.items():
            assert str(signature).replace("Async", "") == str(async_methods[name]).replace("Async", ""), (sync, name)
