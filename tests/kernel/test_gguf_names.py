"""GGUF files in the models folders, named as LM Studio names them (docs/models.md).

The catalog's mechanics only: a backend that describes a GGUF file from its header (as the
llama.cpp and MLX backends do) stands in for an engine; the files are small real GGUF files
written by llama.cpp's ``gguf`` package.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import lmkernel as lms
from lmkernel.kernel._catalog import Catalog, model_key
from lmkernel.plugins import Backend, ModelDescription, ModelRejected
from lmkernel.plugins.gguf import read_gguf


class HeaderOnly(Backend):
    """Describes GGUF files from their header; loads nothing."""

    name = "header-only"

    def availability(self):
        raise NotImplementedError

    def describe(self, path: Path) -> ModelDescription:
        if path.suffix != ".gguf":
            raise ModelRejected("not a GGUF file")
        info = read_gguf(path)
        return ModelDescription(architecture=info.architecture, format="gguf",
                                max_context_length=info.context_length or 4096, size_bytes=path.stat().st_size)

    def load(self, path, options, on_progress):
        raise NotImplementedError


def write_gguf(path: Path, context: int = 2048) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def listing(root: Path) -> dict[str, str]:
    return {e.key: e.relative_path for e in Catalog([HeaderOnly()], roots=[(root, "plain")], describe_timeout=0).entries()}


@pytest.mark.parametrize(
    ("path", "key", "variant"),
    [("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct",
      "smollm2-135m-instruct@q4_1"),
     ("ZiangWu/MobileVLM_V2-1.7B-GGUF/MobileVLM_V2-1.7B-Q8_0.gguf", "mobilevlm_v2-1.7b", "mobilevlm_v2-1.7b@q8_0"),
     ("bartowski/Qwen2.5-7B-Instruct-GGUF/Qwen2.5-7B-Instruct-IQ2_XXS.gguf", "qwen2.5-7b-instruct",
      "qwen2.5-7b-instruct@iq2_xxs"),
     ("a/Model/model-f16-00001-of-00003.gguf", "model", "model@f16"),
     ("loose.gguf", "loose", "loose@loose")],
)
def test_a_gguf_model_is_keyed_by_its_repository_without_gguf(path, key, variant):
    assert model_key(path) == key
    assert model_key(path, variant=True) == variant


def test_lm_studio_layout_one_model_per_file(tmp_path):
    repo = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct-GGUF"
    write_gguf(repo / "SmolLM2-135M-Instruct.Q4_1.gguf")
    two = tmp_path / "bartowski" / "Qwen-GGUF"
    write_gguf(two / "Qwen-Q8_0.gguf")
    write_gguf(two / "Qwen-Q4_K_M.gguf")
    write_gguf(two / "mmproj-Qwen-f16.gguf")  # a vision projector: not a language model
    write_gguf(tmp_path / "split" / "big-00001-of-00002.gguf")
    write_gguf(tmp_path / "split" / "big-00002-of-00002.gguf")  # llama.cpp reads it from the first part
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    assert listing(tmp_path) == {
        "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen@q4_k_m": "bartowski/Qwen-GGUF/Qwen-Q4_K_M.gguf",
        "qwen@q8_0": "bartowski/Qwen-GGUF/Qwen-Q8_0.gguf",
        "split": "split/big-00001-of-00002.gguf",
    }


def test_several_quantizations_the_repository_name_loads_the_first(tmp_path):
    two = tmp_path / "bartowski" / "Qwen-GGUF"
    write_gguf(two / "Qwen-Q8_0.gguf", context=1024)
    write_gguf(two / "Qwen-Q4_K_M.gguf", context=512)
    cat = Catalog([HeaderOnly()], roots=[(tmp_path, "plain")], describe_timeout=0)
    assert cat.resolve("qwen").key == "qwen@q4_k_m"
    assert cat.resolve("qwen@q8_0").info().max_context_length == 1024
    assert cat.resolve("bartowski/Qwen-GGUF/Qwen-Q8_0.gguf").key == "qwen@q8_0"


def test_a_gguf_file_by_its_path(tmp_path):
    file = write_gguf(tmp_path / "elsewhere" / "thing.gguf")
    cat = Catalog([HeaderOnly()], roots=[], describe_timeout=0)
    entry = cat.resolve(str(file))
    assert (entry.key, entry.path, entry.info().format) == (str(file), file, "gguf")
    other = tmp_path / "elsewhere" / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(lms.LMKernelModelNotFoundError, match="weights.bin'?: it is not a folder or a .gguf file"):
        cat.resolve(str(other))


def test_the_hugging_face_cache_lists_a_gguf_repository(tmp_path):
    snapshot = tmp_path / "models--bartowski--Phi-GGUF" / "snapshots" / "abc123"
    write_gguf(snapshot / "Phi-Q4_0.gguf")
    entries = Catalog([HeaderOnly()], roots=[(tmp_path, "hf-cache")], describe_timeout=0).entries()
    assert [(e.key, e.relative_path) for e in entries] == [("phi", "bartowski/Phi-GGUF/Phi-Q4_0.gguf")]


def test_gguf_files_at_the_top_of_a_models_folder_are_keyed_by_their_names(tmp_path):
    write_gguf(tmp_path / "one.gguf")
    write_gguf(tmp_path / "two.Q8_0.gguf")
    assert listing(tmp_path) == {"one": "one.gguf", "two.q8_0": "two.Q8_0.gguf"}


def test_a_gguf_file_linked_under_two_names_is_two_models(tmp_path):
    real = write_gguf(tmp_path / "store" / "blob.gguf")
    for repo in ("pub/First-GGUF", "pub/Second-GGUF"):
        (tmp_path / "models" / repo).mkdir(parents=True)
        (tmp_path / "models" / repo / "model.Q4_1.gguf").symlink_to(real)
    assert listing(tmp_path / "models") == {"first": "pub/First-GGUF/model.Q4_1.gguf",
                                            "second": "pub/Second-GGUF/model.Q4_1.gguf"}
