"""The catalog never raises but not-found and value errors, and checks what plugins tell it.

Keys of any length or character, unreadable or odd folders, and plugins whose ``describe()``
raises, hangs or answers with values the protocol cannot carry: each ends in a clear error
or a skipped (and logged) description, never in an exception that could end the kernel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

import lmkernel as lms
from lmkernel.backends.mlx import MLXBackend
from lmkernel.kernel import _catalog
from lmkernel.kernel import messages as m
from lmkernel.kernel._catalog import Catalog, check_description, model_roots
from lmkernel.plugins.contract import Availability, Backend, ModelDescription
from lmkernel.testing import build_tiny_llama

from ..conftest import TINY

GOOD = {"architecture": "llama", "format": "safetensors", "max_context_length": 128, "size_bytes": 10}


class DescribeFault(Backend):
    """A plugin whose describe() misbehaves in one way, for every folder."""

    name = "faulty"

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.release = threading.Event()
        self.calls = 0

    def availability(self) -> Availability:
        return Availability(True)

    def load(self, path, options, on_progress):
        raise RuntimeError("never loads")

    def describe(self, path: Path):
        self.calls += 1
        match self.fault:
            case "raise":
                raise RuntimeError("describe exploded")
            case "hang":
                self.release.wait(30)
                return None
            case "format":
                return ModelDescription(**{**GOOD, "format": "weird"})
            case "context":
                return ModelDescription(**{**GOOD, "max_context_length": "4096"})
            case "dict":
                return dict(GOOD)
        raise AssertionError(self.fault)


@pytest.fixture
def catalog(models_dir) -> Catalog:
    return Catalog([MLXBackend()], roots=[(models_dir, "plain")])


# ---- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        ("y" * 300, lms.LMKernelModelNotFoundError,
         ("No model matches the key 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy...yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy': a model key or"
          " path is at most 4096 bytes with at most 255 bytes between slashes (this one: 300 bytes, longest part 300)")),
        ("a/" + "é" * 128, lms.LMKernelModelNotFoundError, "No model matches the key 'a/ééé"),
        ("/x" * 2100, lms.LMKernelModelNotFoundError, "No model matches the key '/x/x/x"),
        ("~nosuchuser/x", lms.LMKernelModelNotFoundError, "No model folder at '~nosuchuser/x': the path does not exist"),
        ("~nosuchuser", lms.LMKernelModelNotFoundError, "No model folder at '~nosuchuser': the path does not exist"),
        ("nope", lms.LMKernelModelNotFoundError,
         ("No model matches the key 'nope'. Available: tiny (aa/tiny), tiny-ctx64 (aa/tiny-ctx64), lmkernel/kjv-demo,"
          " lmkernel/tiny-random-llama (folders searched: ")),
        ("", lms.LMKernelValueError, "A model key must be a non-empty string, got ''"),
        ("a\0b", lms.LMKernelValueError, "A model key cannot contain a NUL character, got 'a\\x00b'"),
        ("\ud800", lms.LMKernelValueError,
         "A model key must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (5, lms.LMKernelValueError, "A model key must be a string, got int: 5"),
        ("/definitely/not/here", lms.LMKernelModelNotFoundError,
         "No model folder at '/definitely/not/here': the path does not exist"),
        ("aa/tinyy", lms.LMKernelModelNotFoundError, "No model matches the key 'aa/tinyy'. Did you mean 'aa/tiny'?"),
    ],
)
def test_resolve_raises_only_not_found_or_value_errors(catalog, key, error, message):
    with pytest.raises(error) as info:
        catalog.resolve(key)
    assert type(info.value) is error
    assert str(info.value).startswith(message)


def test_resolve_still_finds_keys_names_and_paths(catalog, tiny_path):
    assert catalog.resolve("tiny").key == "tiny"
    assert catalog.resolve(TINY).key == "tiny"  # its path
    assert catalog.resolve("TINY").key == "tiny"  # any case
    assert catalog.resolve(str(tiny_path)).key == "tiny"  # a folder in the model folders keeps its key


def test_a_folder_no_backend_accepts_is_not_found(catalog, tmp_path):
    with pytest.raises(lms.LMKernelModelNotFoundError) as info:
        catalog.resolve(str(tmp_path))
    assert str(info.value) == f"No backend can load the folder {str(tmp_path)!r}: mlx: no config.json"


# ---- the filesystem --------------------------------------------------------------------


def test_unusable_roots_list_nothing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    roots = [(Path("y" * 300), "plain"), (Path("a\0b"), "plain"), (a_file, "plain"), (tmp_path / "missing", "plain"),
             (Path("y" * 300), "hf-cache"), (a_file, "hf-cache")]
    assert Catalog([MLXBackend()], roots=roots).entries() == []


def test_folders_that_cannot_be_read_are_skipped(models_dir, monkeypatch):
    original = Path.iterdir

    def iterdir(self):
        if self.name == "aa":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert Catalog([MLXBackend()], roots=[(models_dir, "plain")]).entries() == []  # aa/ holds every test model


def test_hf_cache_layout_survives_missing_snapshots(tmp_path):
    hub = tmp_path / "hub"
    (hub / "models--empty--repo").mkdir(parents=True)
    (hub / "models--nosnap--repo" / "snapshots").mkdir(parents=True)
    build_tiny_llama(hub / "models--pub--tiny" / "snapshots" / "abc", hidden_size=64, num_layers=1, num_heads=2)
    entries = Catalog([MLXBackend()], roots=[(hub, "hf-cache")]).entries()
    assert [(e.key, e.info().path) for e in entries] == [("tiny", "pub/tiny")]


def test_model_roots_survive_unknown_users_and_no_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LMKERNEL_MODELS", os.pathsep.join(["~nosuchuser/models", str(tmp_path)]))
    monkeypatch.setenv("LMKERNEL_NO_DEFAULT_FOLDERS", "0")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert model_roots() == [(Path("~nosuchuser/models"), "plain"), (tmp_path, "plain")]


def test_folders_with_names_that_are_not_unicode_are_skipped(tmp_path, caplog):
    build_tiny_llama(tmp_path / "pub" / "good", hidden_size=64, num_layers=1, num_heads=2)
    build_tiny_llama(tmp_path / "pub" / "bad", hidden_size=64, num_layers=1, num_heads=2)
    (tmp_path / "pub" / "bad").rename(tmp_path / "pub" / os.fsdecode(b"bad\xff"))  # a name that is not UTF-8
    catalog = Catalog([MLXBackend()], roots=[(tmp_path, "plain")])
    with caplog.at_level(logging.WARNING, logger="lmkernel"):
        entries = catalog.entries()
        catalog.entries()
    assert [e.key for e in entries] == ["good"]
    m.encode(m.DownloadedList(id=1, models=[e.info() for e in entries]))
    skipped = [r for r in caplog.records if "its name is not valid Unicode" in r.getMessage()]
    assert len(skipped) == 1  # logged once


def test_built_in_model_that_cannot_be_built_is_not_found(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(_catalog, "cache_dir", lambda: tmp_path / "file" / "cache")
    with pytest.raises(lms.LMKernelModelNotFoundError, match="The built-in model 'lmkernel/tiny-random-llama' could not be built"):
        Catalog([MLXBackend()], roots=[]).resolve("lmkernel/tiny-random-llama")


# ---- what plugins say ------------------------------------------------------------------

_PREFIX = "Backend 'p' returned an invalid model description: "


@pytest.mark.parametrize(
    ("desc", "message"),
    [
        (dict(GOOD), "describe() must return a ModelDescription or None, got dict: {'architecture': 'llama', "),
        (ModelDescription(**{**GOOD, "format": "weird"}),
         "format must be one of exl2, ggml, gguf, mlx_placeholder, onnx, remote, safetensors, torch_safetensors, got 'weird'"),
        (ModelDescription(**{**GOOD, "format": None}), "format must be one of exl2, ggml, "),
        (ModelDescription(**{**GOOD, "max_context_length": "4096"}),
         "max_context_length must be an integer from 1 to 2**63-1, got '4096'"),
        (ModelDescription(**{**GOOD, "max_context_length": 0}), "max_context_length must be an integer from 1 to 2**63-1, got 0"),
        (ModelDescription(**{**GOOD, "max_context_length": True}), "max_context_length must be an integer from 1 to 2**63-1, got True"),
        (ModelDescription(**{**GOOD, "max_context_length": 4096.0}), "max_context_length must be an integer from 1 to 2**63-1, got 4096.0"),
        (ModelDescription(**{**GOOD, "size_bytes": -1}), "size_bytes must be an integer from 0 to 2**63-1, got -1"),
        (ModelDescription(**{**GOOD, "size_bytes": 2**64}), "size_bytes must be an integer from 0 to 2**63-1, got 18446744073709551616"),
        (ModelDescription(**{**GOOD, "architecture": 5}), "architecture must be a string or None, got int: 5"),
        (ModelDescription(**GOOD, display_name="\ud800"),
         "display_name must be valid Unicode text, got '\\ud800' (lone surrogate '\\ud800' at index 0)"),
        (ModelDescription(**GOOD, params_string=b"1B"), "params_string must be a string or None, got bytes: b'1B'"),
    ],
)
def test_check_description_names_the_rule_and_the_value(desc, message):
    with pytest.raises(lms.LMKernelValueError) as info:
        check_description("p", desc)
    assert str(info.value).startswith(_PREFIX + message)


def test_a_good_description_passes_unchanged():
    desc = ModelDescription(**GOOD, params_string="1B", display_name="Tiny")
    assert check_description("p", desc) is desc


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        ("format", "Backend 'faulty' returned an invalid model description: format must be one of"),
        ("context", "Backend 'faulty' returned an invalid model description: max_context_length must be"),
        ("dict", "Backend 'faulty' returned an invalid model description: describe() must return a ModelDescription"),
        ("raise", "Backend 'faulty' failed to describe "),
    ],
)
def test_a_plugin_that_describes_wrongly_loses_only_its_descriptions(models_dir, caplog, fault, logged):
    plugin = DescribeFault(fault)
    catalog = Catalog([MLXBackend(), plugin], roots=[(models_dir, "plain")])
    with caplog.at_level(logging.WARNING, logger="lmkernel"):
        entries = catalog.entries()
        assert [list(e.descriptions) for e in catalog.entries()] == [list(e.descriptions) for e in entries]
    assert [e.key for e in entries] == ["tiny", "tiny-ctx64"]
    assert all(list(e.descriptions) == ["mlx"] for e in entries)
    listing = m.DownloadedList(id=1, models=[e.info() for e in entries])
    assert m.decode_event(m.encode(listing)) == listing  # what the kernel sends, every client can read
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith(logged)]
    assert messages and len(messages) == len(set(messages))  # each problem logged once, over two listings
    assert all("faulty" in text for text in messages)


def test_a_folder_only_a_faulty_plugin_accepts_is_not_found_with_its_reason(tmp_path):
    with pytest.raises(lms.LMKernelModelNotFoundError) as info:
        Catalog([MLXBackend(), DescribeFault("format")], roots=[]).resolve(str(tmp_path))
    assert str(info.value).startswith(
        f"No backend can load the folder {str(tmp_path)!r}: mlx: no config.json;"
        " faulty: returned an invalid model description: format must be one of"
    )


def test_a_hung_describe_is_skipped_in_bounded_time(models_dir, caplog):
    plugin = DescribeFault("hang")
    catalog = Catalog([MLXBackend(), plugin], roots=[(models_dir, "plain")], describe_timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="lmkernel"):
            start = time.monotonic()
            first = catalog.entries()
            middle = time.monotonic()
            second = catalog.entries()  # the plugin is still hung: skipped at once
            end = time.monotonic()
        assert [e.key for e in first] == [e.key for e in second] == ["tiny", "tiny-ctx64"]
        assert middle - start < 2 and end - middle < 0.5
        assert plugin.calls == 1
        assert "Backend 'faulty' is skipped while listing models: describe() did not answer within 0.2 s" in caplog.text
    finally:
        plugin.release.set()
    for _ in range(100):  # once the hung call returns, the plugin is asked again
        catalog.entries()
        if plugin.calls > 1:
            break
        time.sleep(0.02)
    assert plugin.calls > 1


def test_list_downloaded_models_survives_a_plugin_with_a_bad_format(models_dir):
    from lmkernel.kernel._kernel import Kernel
    from lmkernel.kernel.runtime import KernelThread
    from lmkernel.plugins.discovery import BackendStatus, Discovery
    from lmkernel.sdk._connection import Connection

    backends = [MLXBackend(), DescribeFault("format")]
    statuses = [BackendStatus(b.name, "test", b, b.availability()) for b in backends]
    kernel = KernelThread(lambda: Kernel(Discovery(statuses), Catalog(backends, roots=[(models_dir, "plain")]))).start()
    try:
        conn = Connection(kernel=kernel)
        for _ in range(2):  # the connection stays usable
            _, inbox = conn.open(lambda i: m.ListDownloaded(id=i))
            answer = inbox.get(30)
            assert isinstance(answer, m.DownloadedList), answer
            assert [info.model_key for info in answer.models][:2] == ["tiny", "tiny-ctx64"]
        conn.close()
    finally:
        kernel.stop()

