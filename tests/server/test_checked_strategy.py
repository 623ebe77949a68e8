"""Every reply is checked in one place; bad updates never reach Flower's aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from common.config import build_run_config
from common.exchange import to_arrayrecord, trainable_layout
from common.model import build_split_model
from server.checked_strategy import CheckedStrategy
from server.round_log import RoundLog
from server.strategies import build_strategy


pytestmark = pytest.mark.usefixtures("flower_identity")


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config(pretrained=False))


def _request(node_id: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id, message_type="train")


def _reply(node_id: int, weight: np.ndarray, bias: np.ndarray, n: int = 10) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"head.weight": Array(weight), "head.bias": Array(bias)}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5, "backbone-forwards-train": n}),
            "site": ConfigRecord({"site": f"site-{node_id}"}),
        }
    )
    return Message(content=content, reply_to=_request(node_id))


def _strategy(model, tmp_path, inner=None):
    log = RoundLog(tmp_path / "metrics.jsonl")
    strategy = CheckedStrategy(
        inner or FedAvg(), layout=trainable_layout(model.trainable), backbone_sha256=model.weights_sha256, round_log=log
    )
    return strategy, log


def test_bad_updates_are_rejected_with_reasons_and_the_rest_aggregated(model, tmp_path):
    strategy, log = _strategy(model, tmp_path)
    w = np.ones((10, 1280), np.float32)
    b = np.zeros(10, np.float32)
    nan_w = w.copy()
    nan_w[0, 0] = np.nan
    replies = [
        _reply(1, w, b, n=30),
        _reply(2, 3 * w, b, n=10),
        _reply(3, nan_w, b),
        _reply(4, np.ones((10, 64), np.float32), b),
        Message(Error(code=0, reason="ValueError: site crashed"), reply_to=_request(5)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["head.weight"].numpy(), 1.5)  # (30*1 + 10*3) / 40
    record = log.finish_round(1, None, 1.0)
    assert record["aggregated_sites"] == ["site-1", "site-2"]
    assert "1 non-finite values" in record["rejected_sites"]["site-3"][0]
    assert "shape (10, 64)" in record["rejected_sites"]["site-4"][0]
    assert record["failed"][0]["reason"] == "ValueError: site crashed"
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["round"] == 1 and line["sites"]["site-1"]["train_accepted"] is True


def test_a_reply_missing_num_examples_is_rejected(model, tmp_path):
    strategy, log = _strategy(model, tmp_path)
    good = to_arrayrecord(model.trainable)
    content = RecordDict({"arrays": good, "metrics": MetricRecord({"train-loss": 0.1}), "site": ConfigRecord({"site": "x"})})
    arrays, _ = strategy.aggregate_train(1, [Message(content=content, reply_to=_request(9))])
    assert arrays is None
    assert "num-examples" in log.finish_round(1, None, 0.0)["rejected_sites"]["x"][0]


def test_wrapper_keeps_the_inner_strategys_aggregation(model, tmp_path):
    strategy, _ = _strategy(model, tmp_path, inner=FedMedian())
    b = np.zeros(10, np.float32)
    w = np.ones((10, 1280), np.float32)
    replies = [_reply(1, w, b), _reply(2, 2 * w, b), _reply(3, 100 * w, b)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["head.weight"].numpy(), 2.0)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum"])
def test_each_configured_strategy_is_flowers_own(name):
    strategy = build_strategy(build_run_config(strategy=name))
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
