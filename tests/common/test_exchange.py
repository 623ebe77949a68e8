"""The head-only exchange: only trainable parameters travel, and bad ones are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import build_run_config
from common.errors import ReplyError
from common.exchange import arrays_nbytes, load_arrayrecord, to_arrayrecord, trainable_layout, validate_arrays
from common.model import build_split_model


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config())


def test_only_the_head_travels_and_is_under_one_percent_of_the_model(model):
    record = to_arrayrecord(model.trainable)
    assert set(record.keys()) == {"head.weight", "head.bias"}
    assert arrays_nbytes(record) == (1280 * 10 + 10) * 4
    full = model.model_bytes()
    assert record.count_bytes() <= 0.01 * full


def test_round_trip_reproduces_the_model_exactly(model):
    sender = build_split_model(build_run_config(), head_seed=1)
    receiver = build_split_model(build_run_config(), head_seed=2)
    features = torch.randn(8, 1280)
    assert not torch.allclose(sender.trainable(features), receiver.trainable(features))
    load_arrayrecord(receiver.trainable, to_arrayrecord(sender.trainable))
    assert torch.equal(sender.trainable(features), receiver.trainable(features))


def test_open_blocks_travel_with_the_head():
    opened = build_split_model(build_run_config(pretrained=False, unfreeze_blocks=1))
    keys = set(to_arrayrecord(opened.trainable).keys())
    assert {"head.weight", "head.bias"} < keys
    assert all(k.startswith(("head.", "open_stages.")) for k in keys)


def _with(record: ArrayRecord, name: str, value) -> ArrayRecord:
    arrays = {k: record[k] for k in record.keys() if k != name}
    if value is not None:
        arrays[name] = Array(value)
    return ArrayRecord(arrays)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: _with(r, "head.weight", np.zeros((10, 12), np.float32)), "shape (10, 12), expected (10, 1280)"),
        (lambda r: _with(r, "head.bias", np.full(10, np.nan, np.float32)), "10 non-finite values"),
        (lambda r: _with(r, "head.bias", None), "missing array 'head.bias'"),
        (lambda r: _with(r, "extra", np.zeros(3, np.float32)), "unexpected array 'extra'"),
        (lambda r: _with(r, "head.bias", np.zeros(10, np.float64)), "dtype float64"),
    ],
)
def test_malformed_parameters_are_named_and_refused(model, change, expected):
    record = change(to_arrayrecord(model.trainable))
    problems = validate_arrays(record, trainable_layout(model.trainable))
    assert any(expected in p for p in problems), problems
    with pytest.raises(ReplyError, match="do not fit"):
        load_arrayrecord(model.trainable, record)
