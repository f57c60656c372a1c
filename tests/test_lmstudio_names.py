"""LM Studio's names beyond lmkernel's own: aliases, config dicts, data types, and the stubs.

The list of names itself is pinned in ``test_public_api.py``; here each kind keeps its meaning:
aliases are the same objects or LM Studio's unions, the config dicts hold the keys of their
structs and drive a real completion, and every name of a missing feature raises
``LMKernelNotImplementedError`` naming that feature when it is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

import lmkernel as lms
from lmkernel import sdk
from lmkernel._compat import _missing

from .conftest import TINY

CLASSES = sorted(n for n in _missing.NOT_IMPLEMENTED if n[0].isupper())
FUNCTIONS = sorted(n for n in _missing.NOT_IMPLEMENTED if n[0].islower())


def _raises_for(name: str):
    feature = _missing.FEATURES[_missing.NOT_IMPLEMENTED[name]]
    label = feature.split(" (")[0]
    return pytest.raises(lms.LMKernelNotImplementedError, match=rf"^{label} \(.*is not implemented in lmkernel yet: lms\.{name}\b")


@pytest.mark.parametrize("name", CLASSES)
def test_a_missing_class_raises_when_instantiated_or_its_methods_are_called(name):
    cls = getattr(lms, name)
    assert isinstance(cls, type) and cls.__module__ == "lmkernel" and cls.__name__ == name
    assert not isinstance(object(), cls)  # isinstance checks and annotations work
    with _raises_for(name):
        cls()
    with _raises_for(name):
        cls("any", argument=1)
    with _raises_for(name):
        cls.from_dict({})
    subclass = type("Mine", (cls,), {})
    with _raises_for(name):
        subclass()
    with pytest.raises(AttributeError):
        cls._private  # noqa: B018 - private names are not faked


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_missing_function_raises_when_called(name):
    func = getattr(lms, name)
    assert func.__name__ == name and func.__module__ == "lmkernel"
    with _raises_for(name):
        func("some-model")


def test_the_documented_entry_points_of_missing_features_name_their_feature():
    with pytest.raises(lms.LMKernelNotImplementedError, match=r"^Embedding .*lms\.embedding_model\(\)"):
        lms.embedding_model("nomic-embed-text-v1.5")
    with pytest.raises(lms.LMKernelNotImplementedError, match=r"^Image input .*lms\.prepare_image\(\)"):
        lms.prepare_image("photo.png")
    with pytest.raises(NotImplementedError, match=r"^Tool use .*lms\.ToolFunctionDef\b"):
        lms.ToolFunctionDef(name="add", description="Add", parameters={}, implementation=sum)
    with pytest.raises(lms.LMStudioError, match=r"^File handling .*lms\.FileHandle\b"):
        lms.FileHandle(name="a.txt")
    with pytest.raises(lms.LMKernelNotImplementedError, match=r"^Model download .*lms\.DownloadProgressUpdate\b"):
        lms.DownloadProgressUpdate(downloaded_bytes=1, total_bytes=2, speed_bytes_per_second=3.0)


def test_the_table_is_the_only_place_a_stub_comes_from():
    assert set(_missing.NOT_IMPLEMENTED.values()) == set(_missing.FEATURES)  # every feature has names; none without one
    assert _missing.STUBS.keys() == _missing.NOT_IMPLEMENTED.keys()
    for name, stub in _missing.STUBS.items():
        assert getattr(lms, name) is stub, name
    implemented = set(_missing.NOT_IMPLEMENTED) & set(sdk.__all__)
    assert not implemented, f"lmkernel.sdk implements {sorted(implemented)}: delete them from NOT_IMPLEMENTED"


def _keys(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}


@pytest.mark.parametrize(("typed_dict", "struct"), [
    (lms.LlmPredictionConfigDict, lms.LlmPredictionConfig),
    (lms.LlmLoadModelConfigDict, lms.LlmLoadModelConfig),
])
def test_a_config_dict_type_has_the_camel_case_keys_of_its_struct(typed_dict, struct):
    assert set(typed_dict.__annotations__) == _keys(struct)
    assert typed_dict.__total__ is False and typed_dict.__required_keys__ == frozenset()


def test_lm_studio_example_configs_are_accepted_as_typed_dicts():
    prediction: lms.LlmPredictionConfigDict = {"temperature": 0.6, "maxTokens": 50, "stopStrings": ["\n"]}
    load: lms.LlmLoadModelConfigDict = {"contextLength": 8192, "gpu": {"ratio": 0.5}}
    assert lms.LlmPredictionConfig.from_dict(prediction) == lms.LlmPredictionConfig(
        temperature=0.6, max_tokens=50, stop_strings=["\n"]
    )
    assert lms.LlmLoadModelConfig.from_dict(load).context_length == 8192
    text: lms.TextDataDict = {"type": "text", "text": "Hi"}
    assert lms.TextData.from_dict(text) == lms.TextData(text="Hi")


def test_typed_configs_and_callbacks_drive_a_real_completion(fresh_kernel):
    config: lms.LlmPredictionConfigDict = {"temperature": 0.6, "maxTokens": 5, "stopStrings": ["\n"]}
    load: lms.LlmLoadModelConfigDict = {"contextLength": 512}
    seen: list[Any] = []
    on_first_token: lms.PredictionFirstTokenCallback = lambda: seen.append("first")
    on_fragment: lms.PredictionFragmentCallback = lambda fragment: seen.append(fragment)
    on_message: lms.PredictionMessageCallback = lambda message: seen.append(message)
    on_progress: lms.PromptProcessingCallback = lambda progress: seen.append(progress)

    model: lms.SyncModelHandle = lms.llm(TINY, config=load)
    result = model.complete("In the beginning", config=config, on_first_token=on_first_token,
                            on_prediction_fragment=on_fragment, on_message=on_message,
                            on_prompt_processing_progress=on_progress)

    assert result.stats.predicted_tokens_count <= 5 and "\n" not in result.content
    assert seen[0] == 0.0 and "first" in seen
    assert isinstance(seen[-1], lms.AssistantResponse) and seen[-1].content[0].text == result.content
    assert [s.content for s in seen if isinstance(s, lms.LlmPredictionFragment)] != []
    assert isinstance(model.get_info(), lms.ModelInstanceInfo)
    assert isinstance(result.model_info, lms.ModelInfo)
    assert model.get_info().context_length == 512
    assert all(isinstance(d, lms.AnyDownloadedModel) for d in lms.list_downloaded_models())


def test_unions_are_lm_studios_with_lmkernels_types():
    assert set(lms.ModelInfo.__args__) == {lms.LlmInfo, lms.EmbeddingModelInfo}
    assert set(lms.ModelInstanceInfo.__args__) == {lms.LlmInstanceInfo, lms.EmbeddingModelInstanceInfo}
    assert set(lms.AnyDownloadedModel.__args__) == {lms.DownloadedLlm, lms.DownloadedEmbeddingModel}
    assert set(lms.AnyAsyncDownloadedModel.__args__) == {lms.AsyncDownloadedLlm, lms.AsyncDownloadedEmbeddingModel}
    assert set(lms.AnyLoadConfig.__args__) == {lms.LlmLoadModelConfig, lms.EmbeddingLoadModelConfig}
    assert set(lms.UserMessageContent.__args__) == {lms.TextData, lms.FileHandle}
    assert lms.AssistantResponse in lms.AnyChatMessage.__args__
    assert isinstance(lms.TextData(text="x"), lms.AssistantResponseContent)
    assert str in lms.AnyModelSpecifier.__args__ and lms.ModelQuery in lms.AnyModelSpecifier.__args__
    assert Callable[..., Any] in lms.ToolDefinition.__args__
    assert set(lms.FileType.__args__) == {"image", "text/plain", "application/pdf", "application/word",
                                          "text/other", "unknown"}


def test_callback_types_are_lm_studios():
    assert lms.PredictionFirstTokenCallback == Callable[[], Any]
    assert lms.PredictionFragmentCallback == Callable[[lms.LlmPredictionFragment], Any]
    assert lms.PredictionMessageCallback == Callable[[lms.AssistantResponse], Any]
    assert lms.PromptProcessingCallback == Callable[[float], Any]
    assert lms.DownloadProgressCallback == Callable[[lms.DownloadProgressUpdate], Any]
    assert lms.DownloadFinalizedCallback == Callable[[str], Any]


def test_model_queries_and_specifiers_take_lm_studios_dicts():
    query = lms.ModelQuery.from_dict({"identifier": "llama-3.2-1b-instruct", "vision": False})
    assert query.to_dict() == {"identifier": "llama-3.2-1b-instruct", "vision": False}
    by_query = msgspec.convert({"type": "query", "query": {"path": "a/b"}}, lms.ModelSpecifier)
    assert by_query.query == lms.ModelQuery(path="a/b")
    by_reference = msgspec.convert({"type": "instanceReference", "instanceReference": "r1"}, lms.ModelSpecifier)
    assert by_reference.instance_reference == "r1" and by_reference.to_dict()["type"] == "instanceReference"
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"type": "query", "query": {"domain": "image"}}, lms.ModelSpecifier)


def test_small_data_types_have_lm_studios_fields():
    loaded = lms.ModelLoadResult(identifier="m", instance_reference="r", path="p/m")
    assert [f.name for f in dataclasses.fields(loaded)] == ["identifier", "instance_reference", "path"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.path = "q"  # type: ignore[misc]
    error = lms.SerializedLMSExtendedError()
    assert error.title == "Unknown error" and error.to_dict() == {}
    assert lms.SerializedLMSExtendedError.from_dict({"rootTitle": "R", "title": "T"}).root_title == "R"


def test_base_model_gives_the_object_schema_lm_studio_sends():
    class Book(lms.BaseModel):
        title: str
        year: int

    assert Book.model_json_schema() == {
        "$defs": {}, "title": "Book", "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
    }
    assert issubclass(Book, lms.ModelSchema) and not issubclass(int, lms.ModelSchema)
    assert Book(title="Dune", year=1965).year == 1965
    assert lms.BaseModel.__module__ == lms.ModelSchema.__module__ == "lmkernel"
