import tomllib
from pathlib import Path

import pytest

import models
from fedrad.core.config import MODEL_NAMES, RUN_CONFIG_HELP, NodeConfig, RunConfig
from fedrad.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_run_config_defaults_equal_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]

    assert declared == RunConfig().to_user_config()


def test_every_key_has_help():
    assert set(RUN_CONFIG_HELP) == set(RunConfig().to_user_config())


def test_from_user_config_coerces_strings_from_the_command_line():
    config = RunConfig.from_user_config({"num-server-rounds": "3", "learning-rate": "0.1"})

    assert config.num_server_rounds == 3
    assert config.learning_rate == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modle": "cnn"}, "Did you mean 'model'?"),
        ({"strategy": "fedavgg"}, "Did you mean 'fedavg'?"),
        ({"num-server-rounds": 0}, "'num-server-rounds' must be between 1"),
        ({"learning-rate": -1.0}, "'learning-rate' must be positive"),
        ({"batch-size": "many"}, "'batch-size' must be an integer"),
        ({"kind": "4d"}, "'kind' must be one of 2d, 3d"),
        ({"fraction-train": 1.5}, "'fraction-train' must be in (0, 1]"),
        ({"positive-label": 2}, "'positive-label' must be between 0 and 1"),
        ({"model": "cnnn"}, "'model' must be one of cnn, cnn-lstm, transformer, got 'cnnn'."),
        ({"model": "cnnn"}, "Did you mean 'cnn'?"),
    ],
)
def test_invalid_run_config_names_the_problem(raw, message):
    with pytest.raises(ConfigError, match=None) as info:
        RunConfig.from_user_config(raw)

    assert message in str(info.value)


def test_node_config_rejects_unknown_keys_with_hint():
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_user_config({"data_dir": "/x"})

    assert "Did you mean 'data-dir'?" in str(info.value)


def test_model_names_are_the_model_registry():
    assert MODEL_NAMES == tuple(models.MODELS)
