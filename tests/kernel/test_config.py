"""Config validation: camelCase and snake_case, near-match suggestions, round trips."""

import pytest

import lmkernel as lms
from lmkernel.kernel.config import parse_load_config, parse_prediction_config


def test_translation_matches_lm_studio():
    config = lms.LlmPredictionConfig.from_dict({"max_tokens": 50, "temperature": 0})
    assert config == lms.LlmPredictionConfig(max_tokens=50, temperature=0)
    assert config.to_dict() == {"maxTokens": 50, "temperature": 0}
    assert parse_prediction_config({"topKSampling": 40, "stop_strings": ["$"]}).to_dict() == {
        "stopStrings": ["$"], "topKSampling": 40.0}


def test_false_disables_and_minus_one_means_unlimited():
    config = parse_prediction_config({"maxTokens": -1, "topPSampling": False, "repeatPenalty": False})
    assert config.max_tokens == -1 and config.top_p_sampling is False


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"maxTokenz": 1}, "Unknown prediction config key 'maxTokenz'; did you mean 'maxTokens'?"),
        ({"stop": ["x"]}, "Unknown prediction config key 'stop'; did you mean 'stopStrings'?"),
        ({"raw": {}}, "Unknown prediction config key 'raw' (known keys:"),
        ({1: 2}, "prediction config keys must be strings, got 1"),
        ({"topPSampling": 1.5}, "Invalid prediction config value for 'topPSampling': expected a number in (0, 1], or False, got 1.5"),
        ({"contextOverflowPolicy": "bad"}, "Invalid prediction config value for 'contextOverflowPolicy': expected one of 'rollingWindow', 'stopAtLimit', 'truncateMiddle', got 'bad'"),
        ("maxTokens=3", "prediction config must be a dict or LlmPredictionConfig, got str: 'maxTokens=3'"),
    ],
)
def test_prediction_config_errors(config, message):
    with pytest.raises(lms.LMKernelConfigError) as info:
        parse_prediction_config(config)
    assert str(info.value).startswith(message)


def test_struct_configs_are_validated_too():
    with pytest.raises(lms.LMKernelConfigError, match="'temperature': expected a number >= 0, got -2"):
        parse_prediction_config(lms.LlmPredictionConfig(temperature=-2))


def test_load_config():
    assert parse_load_config({"context_length": 128, "seed": 3}).to_dict() == {"contextLength": 128, "seed": 3}
    with pytest.raises(lms.LMKernelConfigError, match="'contextLength': expected an integer from 1 to 2147483647, got 0"):
        parse_load_config({"contextLength": 0})
    with pytest.raises(lms.LMKernelConfigError, match="did you mean 'contextLength'"):
        parse_load_config({"numCtx": 10})
