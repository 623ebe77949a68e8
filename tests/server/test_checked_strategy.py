"""Every reply is checked in one place; bad updates never reach Flower's aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from common.config import build_run_config
from common.exchange import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, to_arrayrecord, trainable_layout
from common.model import build_split_model
from server.checked_strategy import CheckedStrategy
from server.round_log import RoundLog
from server.strategies import build_strategy


pytestmark = pytest.mark.usefixtures("flower_identity")

TRAIN_METRICS = {key: 0 for key in TRAIN_METRIC_KEYS} | {"train-loss": 0.5, "seconds": 1.0}


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config(pretrained=False))


def _request(node_id: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id, message_type="train")


def _reply(node_id: int, weight: np.ndarray, bias: np.ndarray, n: int = 10) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"head.weight": Array(weight), "head.bias": Array(bias)}),
            "metrics": MetricRecord({**TRAIN_METRICS, "num-examples": n}),
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
def test_each_strategy_is_flowers_own_and_aggregates_in_the_layout(name, model, tmp_path):
    inner = build_strategy(build_run_config(strategy=name))
    assert type(inner).__module__.startswith("flwr.serverapp.strategy")
    strategy, _ = _strategy(model, tmp_path, inner=inner)
    current = to_arrayrecord(model.trainable)
    list(strategy.configure_train(1, current, ConfigRecord(), _OneNodeGrid()))  # FedAdam/FedYogi keep the current model
    rng = np.random.default_rng(0)
    replies = [_reply(i, rng.normal(size=(10, 1280)).astype(np.float32), np.zeros(10, np.float32)) for i in range(1, 6)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert validate_arrays_ok(arrays, model)


def validate_arrays_ok(arrays, model) -> bool:
    from common.exchange import validate_arrays

    return validate_arrays(arrays, trainable_layout(model.trainable)) == []


class _OneNodeGrid:
    """Just enough of a Grid for configure_train's node sampling."""

    def get_node_ids(self):
        return [1, 2, 3, 4, 5]


def test_sites_without_validation_examples_do_not_break_the_average(model, tmp_path):
    strategy, _ = _strategy(model, tmp_path)

    def eval_reply(node_id: int, n: int, accuracy: float) -> Message:
        metrics = {key: 0.0 for key in EVAL_METRIC_KEYS} | {"num-examples": n, "eval-accuracy": accuracy, "backbone-forwards-eval": 0}
        content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": f"s{node_id}"})})
        return Message(content=content, reply_to=_request(node_id))

    assert strategy.aggregate_evaluate(1, [eval_reply(1, 0, 0.0)]) is None
    aggregated = strategy.aggregate_evaluate(1, [eval_reply(1, 0, 0.0), eval_reply(2, 10, 0.9)])
    assert aggregated["eval-accuracy"] == pytest.approx(0.9)


def test_a_reply_with_other_metric_keys_is_rejected_not_fatal(model, tmp_path):
    strategy, log = _strategy(model, tmp_path)
    good = _reply(1, np.ones((10, 1280), np.float32), np.zeros(10, np.float32))
    odd = _reply(2, np.ones((10, 1280), np.float32), np.zeros(10, np.float32))
    odd.content["metrics"]["surprise"] = 1.0
    arrays, _ = strategy.aggregate_train(1, [good, odd])
    assert arrays is not None
    assert "unexpected ['surprise']" in log.finish_round(1, None, 0.0)["rejected_sites"]["site-2"][0]
