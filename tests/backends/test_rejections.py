"""A folder no backend takes: the error names each backend and its reason, for each kind of folder.

Real folders (a real tiny Llama, then broken one way at a time), the real MLX and ExLlamaV2
backends (``describe`` needs neither CUDA nor exllamav2), the real catalog.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from pathlib import Path

import pytest

import lmkernel as lms
from lmkernel.backends.exllamav2 import ExLlamaV2Backend
from lmkernel.backends.mlx import MLXBackend
from lmkernel.kernel._catalog import Catalog
from lmkernel.plugins.contract import ModelRejected, read_config

MLX_LM = importlib.metadata.version("mlx-lm")


@pytest.fixture
def folder(tiny_path, tmp_path) -> Path:
    """A copy of the session's tiny Llama, to break."""
    return Path(shutil.copytree(tiny_path, tmp_path / "model"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def why(path: Path | str) -> str:
    with pytest.raises(lms.LMKernelModelNotFoundError) as info:
        Catalog([MLXBackend(), ExLlamaV2Backend()], roots=[]).resolve(str(path))
    return str(info.value)


def test_a_missing_path(tmp_path):
    assert why(tmp_path / "missing") == f"No model folder at {str(tmp_path / 'missing')!r}: the path does not exist"


def test_a_file_instead_of_a_folder(folder):
    assert why(folder / "config.json") == f"No model folder at {str(folder / 'config.json')!r}: it is not a folder or a .gguf file"


def test_no_config_json(tmp_path):
    assert why(tmp_path) == f"No backend can load the folder {str(tmp_path)!r}: mlx, exllamav2: no config.json"


def test_invalid_json_names_the_line(folder):
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64\n  "vocab_size": 10\n}\n')
    assert why(folder) == (f"No backend can load the folder {str(folder)!r}: mlx, exllamav2: config.json is not valid"
                           " JSON: Expecting ',' delimiter at line 4, column 3")


@pytest.mark.parametrize(
    ("text", "reason"),
    [('["llama"]', "config.json must hold a JSON object, got a JSON array"),
     (b"\xff\xfe{}", "config.json is not UTF-8 text (invalid start byte at byte 0)"),
     ("[" * 100_000, "config.json is not valid JSON: RecursionError")],
)
def test_config_json_that_is_not_an_object(folder, text, reason):
    config = folder / "config.json"
    config.write_bytes(text) if isinstance(text, bytes) else config.write_text(text)
    assert why(folder) == f"No backend can load the folder {str(folder)!r}: mlx, exllamav2: {reason}"


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    assert why(folder) == (f"No backend can load the folder {str(folder)!r}: mlx: no weights (no model*.safetensors"
                           " file); exllamav2: no weights (no *.safetensors file)")


def test_unsupported_model_type_and_architecture(folder):
    edit_config(folder, model_type="nosuchmodel", architectures=["NoSuchForCausalLM"])
    assert why(folder) == (f"No backend can load the folder {str(folder)!r}: mlx: model_type 'nosuchmodel' is not"
                           f" supported by mlx-lm {MLX_LM}; exllamav2: architecture 'NoSuchForCausalLM' is not one"
                           " ExLlamaV2 runs")


def test_no_model_type_and_no_architecture(folder):
    edit_config(folder, model_type=None, architectures=None)
    assert why(folder) == (f"No backend can load the folder {str(folder)!r}: mlx: config.json has no model_type;"
                           " exllamav2: config.json names no architecture ('architectures')")


def test_other_engines_quantization(folder):
    edit_config(folder, quantization_config={"quant_method": "awq", "bits": 4})
    assert why(folder) == (f"No backend can load the folder {str(folder)!r}: mlx: its weights are quantized with"
                           " 'awq', which mlx-lm does not read; exllamav2: quantization 'awq' is not one ExLlamaV2"
                           " reads (exl2, gptq or none)")


@pytest.mark.parametrize(
    ("backend", "changes", "reason"),
    [(MLXBackend(), {"model_type": ["llama"]}, "config.json's model_type must be a model name, got ['llama']"),
     (MLXBackend(), {"model_type": "../llama"}, "config.json's model_type must be a model name, got '../llama'"),
     (MLXBackend(), {"max_position_embeddings": "4096"},
      "config.json's max_position_embeddings must be a positive integer, got '4096'"),
     (ExLlamaV2Backend(), {"max_position_embeddings": -1},
      "config.json's max_position_embeddings must be a positive integer, got -1"),
     (ExLlamaV2Backend(), {"architectures": [5]}, "architecture 5 is not one ExLlamaV2 runs"),
     (ExLlamaV2Backend(), {"quantization_config": {"quant_method": ["exl2"]}},
      "quantization ['exl2'] is not one ExLlamaV2 reads (exl2, gptq or none)")],
)
def test_odd_config_values_are_reasons_not_crashes(folder, backend, changes, reason):
    edit_config(folder, **changes)
    with pytest.raises(ModelRejected) as info:
        backend.describe(folder)
    assert str(info.value) == reason


def test_a_remapped_model_type_is_accepted(folder):
    edit_config(folder, model_type="mistral")  # mlx-lm runs Mistral as Llama (its MODEL_REMAPPING)
    assert MLXBackend().describe(folder).architecture == "mistral"


def test_a_plugin_that_gives_no_reason(tmp_path):
    from lmkernel.plugins.contract import Availability, Backend

    class Silent(Backend):
        name = "silent"

        def availability(self):
            return Availability(True)

        def describe(self, path):
            return None

        def load(self, path, options, on_progress):
            raise AssertionError

    with pytest.raises(lms.LMKernelModelNotFoundError) as info:
        Catalog([Silent()], roots=[]).resolve(str(tmp_path))
    assert str(info.value) == (f"No backend can load the folder {str(tmp_path)!r}: silent: does not take this folder"
                               " (it gave no reason)")


def test_rejections_are_not_logged_while_listing(models_dir, caplog, tmp_path):
    (tmp_path / "pub" / "broken").mkdir(parents=True)
    (tmp_path / "pub" / "broken" / "config.json").write_text("{")
    with caplog.at_level(logging.DEBUG, logger="lmkernel"):
        entries = Catalog([MLXBackend(), ExLlamaV2Backend()], roots=[(models_dir, "plain"), (tmp_path, "plain")]).entries()
    assert [e.key for e in entries] == ["tiny", "tiny-ctx64"]
    assert entries[0].rejections == {}  # both take the tiny Llama
    assert caplog.records == []


def test_read_config_is_the_shared_reader(folder):
    assert read_config(folder)["model_type"] == "llama"
    with pytest.raises(ModelRejected, match="^no config.json$"):
        read_config(folder.parent)


def test_the_sdk_error_names_each_backend_and_its_reason(folder, fresh_kernel):
    (folder / "model.safetensors").unlink()
    with pytest.raises(lms.LMStudioModelNotFoundError) as info:
        lms.llm(str(folder))
    assert f"No backend can load the folder {str(folder)!r}: " in str(info.value)
    assert "mlx: no weights (no model*.safetensors file)" in str(info.value)
