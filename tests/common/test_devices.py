"""A site's device and extraction precision: what it asks for is what it gets, or a clear error."""

from __future__ import annotations

import pytest
import torch

from common.devices import Extraction, resolve_device, resolve_extraction
from common.errors import ConfigError
from common.site_config import build_site_config

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


def test_auto_is_the_gpu_where_there_is_one_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    extraction = resolve_extraction("auto", "auto")
    assert extraction.device.type == expected
    assert extraction.precision == "float32" and not extraction.mixed


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_naming_a_gpu_on_a_machine_without_one_says_so_and_how_to_go_on(name):
    with pytest.raises(ConfigError) as err:
        resolve_device(name)
    message = str(err.value)
    assert f"device '{name}'" in message and "torch sees no CUDA GPU" in message
    assert "nvidia-smi" in message and "device='auto'" in message


def test_mixed_precision_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="precision 'float16' needs a CUDA device"):
        resolve_extraction("cpu", "float16")
    assert resolve_extraction("cpu", "float32") == Extraction(torch.device("cpu"), "float32")


def test_the_site_config_checks_device_and_precision_with_every_other_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_site_config({"data-dir": str(tmp_path), "device": "tpu", "precision": "half"})
    message = str(err.value)
    assert "'device' = 'tpu': choose auto, cpu, cuda or cuda:N" in message
    assert "'precision' = 'half': choose auto, float32, float16" in message
