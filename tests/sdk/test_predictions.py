"""Prediction semantics on the real engine: limits, stop strings, stats, errors, lifecycle."""

from __future__ import annotations

import gc
import logging

import pytest

import lmkernel as lms

from ..conftest import TINY, TINY_CTX64, TINY_CTX64_KEY, TINY_KEY


def test_max_tokens_is_exact_and_counted(tiny_model):
    for n in (1, 5, 17):
        result = tiny_model.complete("The cat sat on the", config={"maxTokens": n, "temperature": 0,
                                                                   "stopStrings": []})
        stats = result.stats  # greedy on the seeded model: deterministic, no end token this early
        assert stats.stop_reason == "maxPredictedTokensReached"
        assert stats.predicted_tokens_count == n
        assert stats.prompt_tokens_count == tiny_model.count_tokens("The cat sat on the")
        assert stats.total_tokens_count == stats.prompt_tokens_count + stats.predicted_tokens_count
        assert stats.time_to_first_token_sec > 0 and stats.tokens_per_second > 0


def test_greedy_is_deterministic_and_snake_case_config_works(tiny_model):
    a = tiny_model.complete("Once upon a time", config={"max_tokens": 15, "temperature": 0})
    b = tiny_model.complete("Once upon a time", config=lms.LlmPredictionConfig(max_tokens=15, temperature=0.0))
    assert a.content == b.content and a.content
    assert a.prediction_config.max_tokens == 15 and a.prediction_config.temperature == 0.0
    assert isinstance(a.load_config, lms.LlmLoadModelConfig)


def test_stop_string_cuts_before_it_and_is_never_emitted(tiny_model):
    full = tiny_model.complete("The cat sat on the", config={"maxTokens": 40, "temperature": 0}).content
    # Pick a stop string from the middle of the greedy text (spanning token boundaries).
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    assert len(stop) == 3
    fragments = []
    stream = tiny_model.complete_stream("The cat sat on the",
                                        config={"maxTokens": 40, "temperature": 0, "stopStrings": [stop]})
    for fragment in stream:
        fragments.append(fragment.content)
    result = stream.result()
    assert result.stats.stop_reason == "stopStringFound"
    assert result.content == full[: full.index(stop)]
    assert stop not in "".join(fragments)


def test_context_length_reached_and_prompt_too_long():
    model = lms.llm(TINY_CTX64)
    assert model.get_context_length() == 64
    prompt = "The cat sat on the mat"
    n_prompt = model.count_tokens(prompt)
    stop = {"contextOverflowPolicy": "stopAtLimit"}  # the default, truncateMiddle, cuts and goes on
    result = model.complete(prompt, config={"temperature": 0, "repeatPenalty": False, **stop})
    assert result.stats.stop_reason == "contextLengthReached"  # greedy, deterministic: fills the window
    assert result.stats.total_tokens_count == 64
    assert result.stats.predicted_tokens_count == 64 - n_prompt
    with pytest.raises(lms.LMKernelPromptTooLongError, match=rf"The prompt is \d+ tokens but model '{TINY_CTX64_KEY}' has a context length of 64"):
        model.complete("the cat " * 100, config=stop)
    # The model still works afterwards.
    assert model.complete(prompt, config={"maxTokens": 3}).stats.predicted_tokens_count <= 3


def test_load_config_context_length_limits_the_instance():
    with lms.Client() as client:
        model = client.llm.load_new_instance(TINY, "tiny-ctx32", config={"contextLength": 32})
        try:
            assert model.identifier == "tiny-ctx32"
            assert model.get_context_length() == 32
            assert model.get_load_config().context_length == 32
            result = model.complete("The cat", config={"temperature": 0, "maxTokens": 100,
                                                       "contextOverflowPolicy": "stopAtLimit"})
            assert result.stats.stop_reason == "contextLengthReached"
            assert result.stats.total_tokens_count == 32
        finally:
            model.unload()
        with pytest.raises(lms.LMKernelConfigError, match="supports at most 4096 tokens, got 5000"):
            client.llm.load_new_instance(TINY, config={"contextLength": 5000})


def test_the_load_config_reports_the_context_length_also_when_not_asked_for(tiny_model):
    # As LM Studio's get_load_config(): the instance's context length, not None.
    assert tiny_model.get_load_config().context_length == tiny_model.get_context_length() == 4096
    result = tiny_model.complete("The cat", config={"maxTokens": 1})
    assert result.load_config.context_length == 4096


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_tokenz": 3}, "Unknown prediction config key 'max_tokenz'; did you mean 'maxTokens'?"),
        ({"topP": 0.5}, "Unknown prediction config key 'topP'; did you mean 'topPSampling'?"),
        ({"temperature": "hot"}, "Invalid prediction config value for 'temperature': expected a number, got 'hot'"),
        ({"temperature": -1}, "Invalid prediction config value for 'temperature': expected a number >= 0, got -1"),
        ({"stopStrings": "$"}, "Invalid prediction config value for 'stopStrings': expected a list, got '$'"),
        ({"maxTokens": 0}, "Invalid prediction config value for 'maxTokens': expected an integer >= 1, or -1 or False for no limit, got 0"),
        ({"maxTokens": 3, "max_tokens": 4}, "prediction config key 'maxTokens' is given twice (as 'max_tokens' too)"),
    ],
)
def test_bad_config_raises_before_any_compute(tiny_model, config, message):
    with pytest.raises(lms.LMKernelConfigError) as info:
        tiny_model.complete_stream("x", config=config)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, lms.ValidationError) and isinstance(info.value, lms.LMStudioValueError)


def test_documented_keys_the_backend_cannot_honour_raise(tiny_model):
    with pytest.raises(lms.LMKernelUnsupportedConfigError, match="'draftModel' are not supported by backend 'mlx'"):
        tiny_model.complete("x", config={"draftModel": "other"})
    with pytest.raises(lms.LMKernelUnsupportedConfigError, match="'flashAttention' are not supported by backend 'mlx'"):
        lms.Client().llm.load_new_instance(TINY, config={"flashAttention": True})


def test_sampling_settings_run(tiny_model):
    for config in (
        {"temperature": 0.7, "topKSampling": 20, "topPSampling": 0.9, "minPSampling": 0.1, "repeatPenalty": 1.3},
        {"temperature": 1.0, "topKSampling": 0, "topPSampling": False, "minPSampling": False, "repeatPenalty": False},
    ):
        result = tiny_model.complete("The cat", config={**config, "maxTokens": 8})
        assert result.stats.stop_reason in ("maxPredictedTokensReached", "eosFound")
        for key, value in config.items():
            reported = result.prediction_config.to_dict()[key]
            assert reported == value or (value is False and reported in (0, 1.0, 0.0))


def test_unknown_handle_raises_model_not_found():
    handle = lms.LLM("No such model", lms.get_default_client().llm)
    with pytest.raises(lms.LMStudioModelNotFoundError, match="No loaded model has the identifier 'No such model'"):
        handle.complete("Some text")
    with pytest.raises(lms.LMStudioModelNotFoundError):
        handle.tokenize("x")
    with pytest.raises(lms.LMStudioModelNotFoundError):
        lms.get_default_client().llm.unload("No such model")


def test_stream_lifecycle_errors(tiny_model):
    stream = tiny_model.complete_stream("The cat", config={"maxTokens": 3})
    stream.start()
    with pytest.raises(lms.LMStudioRuntimeError, match="already been sent"):
        stream.start()
    list(stream)
    with pytest.raises(lms.LMStudioRuntimeError, match="already been received"):
        list(stream)
    assert stream.wait_for_result() is stream.result()

    stream = tiny_model.complete_stream("The cat", config={"maxTokens": 50})
    with stream:
        pass
    with pytest.raises(lms.LMStudioCancelledError, match="please use .cancel()"):
        stream.result()

    stream = tiny_model.complete_stream("The cat", config={"maxTokens": 50})
    with pytest.raises(KeyError):
        with stream:
            raise KeyError("user code")
    with pytest.raises(KeyError):
        stream.result()


def test_callback_errors_are_logged_not_raised(tiny_model, caplog):
    def boom(*_):
        raise ValueError("callback bug")

    with caplog.at_level(logging.ERROR, logger="lmkernel"):
        result = tiny_model.complete("The cat", config={"maxTokens": 4, "temperature": 0},
                                     on_prediction_fragment=boom, on_first_token=boom)
    assert result.stats.predicted_tokens_count >= 1
    assert "on_prediction_fragment callback failed" in caplog.text


def test_result_types_behave_like_lm_studio(tiny_model):
    result = tiny_model.complete("The cat", config={"maxTokens": 4, "temperature": 0})
    assert result.parsed is result.content and result.structured is False
    assert str(result) == result.content and repr(result) == f"PredictionResult(content={result.content!r})"
    assert isinstance(result.model_info, lms.LlmInfo) and not hasattr(result.model_info, "identifier")
    assert result.model_info.model_key == TINY_KEY and result.model_info.path == TINY
    assert result.model_info.architecture == "llama"
    assert result.model_info.size_bytes > 0 and result.model_info.max_context_length == 4096
    assert str(result.stats).startswith("LlmPredictionStats.from_dict({")
    info = tiny_model.get_info()
    assert (info.identifier, info.model_key, info.path) == (TINY_KEY, TINY_KEY, TINY)
    assert info.context_length == 4096 and info.backend == "mlx"


def test_dropped_stream_stops_its_prediction(tiny_model):
    stream = tiny_model.complete_stream("The cat", config={"maxTokens": 4000, "temperature": 0})
    stream.start()
    del stream
    gc.collect()
    # The engine is free again: a short prediction finishes promptly.
    assert tiny_model.complete("The cat", config={"maxTokens": 2}).stats.predicted_tokens_count <= 2


def test_sync_timeout(tiny_model):
    old = lms.get_sync_api_timeout()
    assert old == 60.0
    try:
        lms.set_sync_api_timeout(0)
        with pytest.raises(lms.LMStudioTimeoutError):
            tiny_model.get_info()
    finally:
        lms.set_sync_api_timeout(old)
    assert tiny_model.get_info().identifier == TINY_KEY
