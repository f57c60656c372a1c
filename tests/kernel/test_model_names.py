"""Model keys and paths as LM Studio names them (docs/models.md).

A models folder in LM Studio's layout (``publisher/repo``) holds real tiny Llamas; the key is
the repository name lower-cased, the path is relative to the models folder, both load the
same model, and an instance is named after the key.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import lmkernel as lms
from lmkernel.backends.mlx import MLXBackend
from lmkernel.kernel._catalog import BUILTIN_DEMO, Catalog, demo_model_path, is_explicit_path, model_key
from lmkernel.testing import build_tiny_llama

REPO = "hugging-quants/Llama-3.2-1B-Instruct"
KEY = "llama-3.2-1b-instruct"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """One tiny Llama, built once; tests copy it where they need it."""
    return build_tiny_llama(tmp_path_factory.mktemp("built") / "tiny", hidden_size=64, num_layers=1, num_heads=2,
                            corpus_lines=2000)


def place(model: Path, *paths: Path) -> None:
    for path in paths:
        shutil.copytree(model, path)


def catalog(*roots: Path) -> Catalog:
    return Catalog([MLXBackend()], roots=[(root, "plain") for root in roots])


# ---- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key"),
    [(REPO, KEY), ("lmstudio-community/Qwen2.5-7B-Instruct-1M", "qwen2.5-7b-instruct-1m"), ("my-model", "my-model"),
     ("Pub/Repo/", "repo")],
)
def test_the_key_is_the_last_part_of_the_path_lower_cased(path, key):
    assert model_key(path) == key


@pytest.mark.parametrize(
    ("key", "explicit"),
    [("/srv/x", True), ("~/models/x", True), ("~", True), ("./x", True), ("../x", True), (".", True),
     ("x", False), ("pub/x", False), (".hidden", False), ("lmkernel/kjv-demo", False)],
)
def test_what_is_written_as_a_path(key, explicit):
    assert is_explicit_path(key) is explicit


def test_lm_studio_layout_gives_keys_and_relative_paths(tiny_model, tmp_path):
    place(tiny_model, tmp_path / REPO, tmp_path / "solo")
    entries = catalog(tmp_path).entries()
    assert [(e.key, e.info().path, e.info().display_name) for e in entries] == [
        (KEY, REPO, "Llama-3.2-1B-Instruct"), ("solo", "solo", "solo")]
    assert entries[0].path == tmp_path / REPO  # what a backend loads: the folder itself


def test_key_path_and_suffix_name_the_same_model(tiny_model, tmp_path):
    place(tiny_model, tmp_path / REPO)
    cat = catalog(tmp_path)
    for key in (KEY, REPO, KEY.upper(), REPO.lower(), "Llama-3.2-1B-Instruct", REPO + "/", str(tmp_path / REPO)):
        assert cat.resolve(key).key == KEY, key


def test_key_collisions_are_settled_by_folder_order_then_path_order(tiny_model, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    place(tiny_model, first / "a" / "Tiny", first / "tiny", second / "a" / "Tiny", second / "b" / "tiny")
    cat = catalog(first, second)
    named = [(e.key, e.info().path, e.path) for e in cat.entries()]
    assert named == [
        ("tiny", "a/Tiny", first / "a" / "Tiny"),  # first models folder, first path: the plain key
        (str(first / "tiny"), "tiny", first / "tiny"),  # its key and its path are taken: its folder
        ("b/tiny", "b/tiny", second / "b" / "tiny"),  # its key is taken: its path
    ]  # second/a/Tiny: the same path as first/a/Tiny, which hides it
    assert cat.resolve("tiny").path == first / "a" / "Tiny"
    assert cat.resolve("b/tiny").path == second / "b" / "tiny"
    assert cat.resolve(str(second / "a" / "Tiny")).key == str(second / "a" / "Tiny")  # a hidden folder: by its path
    with pytest.raises(lms.LMKernelModelNotFoundError) as info:
        cat.resolve("TINY")
    assert str(info.value) == "The key 'TINY' matches 3 models: a/Tiny, tiny, b/tiny; name one by its key or its path"


def test_hugging_face_cache_paths_are_repository_ids(tiny_model, tmp_path):
    place(tiny_model, tmp_path / "hub" / "models--Pub--Some-Repo" / "snapshots" / "abc")
    (entry,) = Catalog([MLXBackend()], roots=[(tmp_path / "hub", "hf-cache")]).entries()
    assert (entry.key, entry.info().path) == ("some-repo", "Pub/Some-Repo")


def test_a_catalog_key_wins_over_a_folder_of_the_working_directory(tiny_model, tmp_path, monkeypatch):
    place(tiny_model, tmp_path / "models" / "pub" / "tiny", tmp_path / "cwd" / "tiny", tmp_path / "cwd" / "mine" / "x")
    monkeypatch.chdir(tmp_path / "cwd")
    cat = catalog(tmp_path / "models")
    assert cat.resolve("tiny").path == tmp_path / "models" / "pub" / "tiny"
    own = cat.resolve("./tiny")  # written as a path: the folder
    assert (own.key, own.info().path) == (str(tmp_path / "cwd" / "tiny"), str(tmp_path / "cwd" / "tiny"))
    assert cat.resolve("mine/x").key == str(tmp_path / "cwd" / "mine" / "x")  # no model of that name: the folder


def test_built_in_models_keep_their_keys(tiny_model, tmp_path):
    place(tiny_model, tmp_path / "lmkernel" / "kjv-demo", tmp_path / "pub" / "tiny")
    cat = catalog(tmp_path)
    assert [e.key for e in cat.entries()] == ["tiny"]  # lmkernel/kjv-demo names the built-in model
    if not (demo_model_path() / "config.json").exists():
        pytest.skip("this installation has no demo model")
    for key in (BUILTIN_DEMO, "kjv-demo", "KJV-Demo", str(demo_model_path())):
        demo = cat.resolve(key)
        assert (demo.key, demo.info().path) == (BUILTIN_DEMO, BUILTIN_DEMO), key


# ---- through the SDK --------------------------------------------------------------------


@pytest.fixture
def lm_studio_folder(tiny_model, tmp_path, monkeypatch, fresh_kernel) -> Path:
    """The process kernel's models folder, in LM Studio's layout."""
    place(tiny_model, tmp_path / REPO, tmp_path / "other" / "Some-Model")
    monkeypatch.setenv("LMKERNEL_MODELS", str(tmp_path))
    yield tmp_path
    for model in lms.list_loaded_models():  # before the folder goes
        model.unload()


def test_list_downloaded_models_as_lm_studio_shows_them(lm_studio_folder):
    downloaded = lms.list_downloaded_models()
    assert [(d.model_key, d.path) for d in downloaded[:2]] == [(KEY, REPO), ("some-model", "other/Some-Model")]
    assert all(d.path == d.info.path and d.model_key == d.info.model_key for d in downloaded)


def test_key_and_path_load_one_model_named_after_the_key(lm_studio_folder):
    by_key = lms.llm(KEY)
    by_path = lms.llm(REPO)
    assert by_key.identifier == by_path.identifier == KEY
    info = by_path.get_info()
    assert (info.model_key, info.path, info.identifier) == (KEY, REPO, KEY)
    assert [m.identifier for m in lms.list_loaded_models()] == [KEY]
    result = by_key.complete("The cat", config={"maxTokens": 2, "temperature": 0})
    assert result.model_info.model_key == KEY and result.model_info.path == REPO
    with lms.Client() as client:
        second = client.llm.load_new_instance(REPO)
        assert second.identifier == f"{KEY}:2"


def test_a_folder_outside_the_models_folders_is_named_by_its_absolute_path(lm_studio_folder, tiny_model,
                                                                          tmp_path_factory):
    mine = tmp_path_factory.mktemp("elsewhere") / "llama-3.2-1b-instruct"  # named like a listed model's key
    place(tiny_model, mine)
    listed, own = lms.llm(KEY), lms.llm(str(mine))
    assert listed.identifier == KEY
    assert own.identifier == own.get_info().model_key == own.get_info().path == str(mine)
    assert lms.llm(os.path.relpath(mine)).identifier == str(mine)  # the same folder, the same instance
