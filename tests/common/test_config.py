"""The typed run config: defaults, coercion, and errors that name the problem."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig, build_run_config
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_defaults_match_the_dataclass():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig().to_run_config()


def test_pyproject_names_the_apps_and_cli():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "server.app:app",
        "clientapp": "client.app:app",
    }
    assert pyproject["project"]["scripts"]["fedhead"] == "simulations.cli:main"


def test_values_are_coerced_from_strings():
    cfg = build_run_config({"local-epochs": "3", "cache-features": "false", "lr": "0.5"})
    assert cfg.local_epochs == 3 and cfg.cache_features is False and cfg.lr == 0.5


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_run_config({"strategy": "fedsgd", "local-epochs": 0, "lcoal-epochs": 2})
    text = str(err.value)
    assert "'strategy' = 'fedsgd'" in text and "fedavg" in text
    assert "'local-epochs' = 0" in text
    assert "unknown run-config key 'lcoal-epochs'" in text


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        build_run_config({"image-size": "big"})


def test_classes_define_the_head_size():
    cfg = build_run_config(classes="benign, malignant")
    assert cfg.class_names == ("benign", "malignant") and cfg.num_classes == 2
