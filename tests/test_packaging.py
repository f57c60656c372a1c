"""The wheel a user installs: built here from a copy of the tree (pip's build isolation, ~5 s)."""

from __future__ import annotations

import email.parser
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import lmkernel

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("wheel")
    tree = work / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".pytest_cache"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(work / "dist"), str(tree)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (path,) = (work / "dist").glob("lmkernel-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _metadata(wheel: zipfile.ZipFile):
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_wheel_holds_py_typed_the_license_and_the_demo_model(wheel):
    names = set(wheel.namelist())
    assert "lmkernel/py.typed" in names
    assert "lmkernel/models/kjv-demo/model.safetensors" in names  # the model the README's command runs
    (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_name) == (ROOT / "LICENSE").read_bytes()


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta["Version"] == lmkernel.__version__ == importlib.metadata.version("lmkernel")
    assert meta["License-Expression"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert meta.get_all("Project-URL")


def test_version_has_one_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lmkernel._version.__version__"}


def test_mlx_lm_is_pinned_to_the_tested_minor_release():
    """lmkernel drives mlx-lm's BatchGenerator, not a stable API: a new minor needs a test run first."""
    (spec,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["mlx"]
               if Requirement(r).name == "mlx-lm"]
    upper = [s for s in spec.specifier if s.operator == "<"]
    assert upper, f"mlx-lm needs an upper bound, got {spec}"
    installed = importlib.metadata.version("mlx-lm")
    assert spec.specifier.contains(installed), f"the installed mlx-lm {installed} is outside {spec}"
    major, minor = (int(part) for part in installed.split(".")[:2])
    assert upper[0].version == f"{major}.{minor + 1}"


def test_ci_builds_the_wheel_and_runs_the_readme_command_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    main_command = re.search(r'pip install -e "\.\[mlx\]" && (lmkernel complete .*)', readme).group(1)
    assert main_command in ci
    assert "pip wheel" in ci and "python -m venv" in ci and 'cd "$work"' in ci
    assert ci.rstrip().endswith("python -m pytest")
