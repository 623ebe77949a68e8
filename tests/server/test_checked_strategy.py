"""Every reply is parsed in one place; bad updates never reach Flower's aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from common.config import STRATEGIES, build_run_config
from common.exchange import to_arrayrecord, trainable_layout, validate_arrays
from common.hashing import sha256_arrays
from common.model import build_split_model
from common.protocol import EvaluateMetrics, SiteInfo, TrainMetrics, build_evaluate_content, build_train_content
from server.checked_strategy import CheckedStrategy
from server.round_recorder import RoundRecorder
from server.strategies import STRATEGY_BUILDERS, build_strategy
from tests.server.scripted_grid import ScriptedGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config(pretrained=False))


def _request(node_id: int) -> Message:
    return Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id, message_type="train")


def _metrics(n: int) -> TrainMetrics:
    return TrainMetrics(num_examples=n, train_loss=0.5, epochs_run=1, backbone_forwards_train=0,
                        backbone_forwards_eval=0, cache_hits=0, seconds=1.0)


def _reply(model, node_id: int, weight: np.ndarray, n: int = 10, name: str | None = None) -> Message:
    arrays = ArrayRecord({"head.weight": Array(weight), "head.bias": Array(np.zeros(10, np.float32))})
    site = SiteInfo(name or f"site-{node_id}", model.weights_sha256)
    return Message(content=build_train_content(arrays, _metrics(n), site), reply_to=_request(node_id))


def _strategy(model, inner=None, enrolled=None):
    recorder = RoundRecorder(strategy="test", enrolled=enrolled)
    strategy = CheckedStrategy(
        inner or FedAvg(), layout=trainable_layout(model.trainable), backbone_sha256=model.weights_sha256,
        max_examples=1000, recorder=recorder, enrolled=enrolled,
    )
    grid = ScriptedGrid([1, 2, 3, 4, 5], lambda m: None)
    strategy.configure_train(1, to_arrayrecord(model.trainable), ConfigRecord(), grid)
    return strategy, recorder


def test_accepted_updates_are_weighted_by_examples_and_recorded(model):
    strategy, recorder = _strategy(model)
    w = np.ones((10, 1280), np.float32)
    arrays, _ = strategy.aggregate_train(1, [_reply(model, 1, w, n=30), _reply(model, 2, 3 * w, n=10)])
    np.testing.assert_allclose(arrays["head.weight"].numpy(), 1.5)  # (30*1 + 10*3) / 40
    record = recorder.finish(1, central_eval=None)
    assert record.aggregated_sites == ["site-1", "site-2"]
    site = record.sites["site-1"].train
    assert site.update_sha256 == sha256_arrays({"head.weight": w, "head.bias": np.zeros(10, np.float32)})
    initial = to_arrayrecord(model.trainable)
    expected_norm = np.sqrt(((w - initial["head.weight"].numpy()) ** 2).sum() + (initial["head.bias"].numpy() ** 2).sum())
    assert site.update_l2_norm == pytest.approx(expected_norm, rel=1e-6)
    assert record.head_sha256_after == sha256_arrays({k: v.numpy() for k, v in arrays.items()})
    assert sorted(p.node_id for p in record.problems) == [3, 4, 5]  # sampled, never answered
    assert {p.kind for p in record.problems} == {"missing"}


def test_a_site_claiming_more_than_the_cap_cannot_take_over(model):
    strategy, recorder = _strategy(model)
    w = np.ones((10, 1280), np.float32)
    arrays, _ = strategy.aggregate_train(1, [_reply(model, 1, w, n=30), _reply(model, 2, 1000 * w, n=10**12)])
    np.testing.assert_allclose(arrays["head.weight"].numpy(), 1.0)
    rejected = recorder.finish(1, central_eval=None).problems
    assert any(p.node_id == 2 and p.kind == "rejected" and "outside [1, 1000]" in p.reasons[0] for p in rejected)


def test_wrapper_keeps_the_inner_strategys_aggregation(model):
    strategy, _ = _strategy(model, inner=FedMedian())
    w = np.ones((10, 1280), np.float32)
    arrays, _ = strategy.aggregate_train(1, [_reply(model, 1, w), _reply(model, 2, 2 * w), _reply(model, 3, 100 * w)])
    np.testing.assert_allclose(arrays["head.weight"].numpy(), 2.0)


def test_the_strategy_registry_names_exactly_the_configurable_strategies():
    assert tuple(STRATEGY_BUILDERS) == STRATEGIES
    with pytest.raises(ValueError, match="choose one of: fedavg, fedprox"):
        build_strategy(build_run_config().__class__(strategy="fedsgd"))


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_is_flowers_own_and_aggregates_in_the_layout(name, model):
    inner = build_strategy(build_run_config(strategy=name))
    assert type(inner).__module__.startswith("flwr.serverapp.strategy")
    strategy, _ = _strategy(model, inner=inner)
    rng = np.random.default_rng(0)
    replies = [_reply(model, i, rng.normal(size=(10, 1280)).astype(np.float32)) for i in range(1, 6)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert validate_arrays(arrays, trainable_layout(model.trainable)) == []


def test_sites_without_validation_examples_do_not_break_the_average(model):
    strategy, recorder = _strategy(model)

    def eval_reply(node_id: int, n: int, accuracy: float) -> Message:
        scores = {"loss": 1.0, "accuracy": accuracy, "precision": 0.5, "recall": 0.5, "f1": 0.5} if n else {}
        metrics = EvaluateMetrics(num_examples=n, backbone_forwards_eval=0, **scores)
        content = build_evaluate_content(metrics, SiteInfo(f"s{node_id}", model.weights_sha256))
        return Message(content=content, reply_to=_request(node_id))

    strategy.aggregate_evaluate(1, [eval_reply(1, 0, 0.0), eval_reply(2, 10, 0.9), eval_reply(3, 30, 0.5)])
    record = recorder.finish(1, central_eval=None)
    assert record.federated_eval["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert record.sites["s1"].evaluate.accepted and record.sites["s1"].evaluate.scores == {}


def test_a_site_understating_its_epsilon_is_rejected(model):
    from common.privacy import DPEvent, epsilon_spent
    from common.protocol import PrivacyReport

    recorder = RoundRecorder(strategy="test")
    strategy = CheckedStrategy(
        FedAvg(), layout=trainable_layout(model.trainable), backbone_sha256=model.weights_sha256,
        max_examples=1000, recorder=recorder, require_privacy=True,
    )
    strategy.configure_train(1, to_arrayrecord(model.trainable), ConfigRecord(), ScriptedGrid([1, 2, 3, 4], lambda m: None))
    event, release = DPEvent(1.2, 0.05, 40, 1.0, "rdp"), DPEvent(2.0, 1.0, 1, 40.0, "rdp")
    honest = epsilon_spent([event], delta=1e-5, accountant="rdp")
    with_release = epsilon_spent([release, event], delta=1e-5, accountant="rdp")
    w = np.ones((10, 1280), np.float32)
    replies = []
    # site 3 leaves its feature-mean release out of its figure; site 4 counts it
    for node, claimed, released in ((1, honest, None), (2, honest / 2, None), (3, honest, release), (4, with_release, release)):
        arrays = ArrayRecord({"head.weight": Array(w), "head.bias": Array(np.zeros(10, np.float32))})
        privacy = PrivacyReport(event, 1e-5, claimed, claimed, release=released)
        content = build_train_content(arrays, _metrics(10), SiteInfo(f"site-{node}", model.weights_sha256), privacy)
        replies.append(Message(content=content, reply_to=_request(node)))
    strategy.aggregate_train(1, replies)
    record = recorder.finish(1, central_eval=None)
    assert record.aggregated_sites == ["site-1", "site-4"]
    assert record.sites["site-1"].train.privacy["epsilon_run"] == pytest.approx(honest)
    assert record.sites["site-4"].train.privacy["feature_mean_release"] == release.to_json()
    assert {p.node_id for p in record.problems if "compose to" in p.reasons[0]} == {2, 3}


def test_a_privacy_record_with_half_a_release_is_rejected(model):
    from common.privacy import DPEvent, epsilon_spent
    from common.protocol import PrivacyReport

    recorder = RoundRecorder(strategy="test")
    strategy = CheckedStrategy(
        FedAvg(), layout=trainable_layout(model.trainable), backbone_sha256=model.weights_sha256,
        max_examples=1000, recorder=recorder, require_privacy=True,
    )
    # FedAvg waits for 2 nodes before it samples
    strategy.configure_train(1, to_arrayrecord(model.trainable), ConfigRecord(), ScriptedGrid([1, 2], lambda m: None))
    event, release = DPEvent(1.2, 0.05, 40, 1.0, "rdp"), DPEvent(20.0, 1.0, 1, 40.0, "rdp")
    spent = epsilon_spent([release, event], delta=1e-5, accountant="rdp")
    arrays = ArrayRecord({"head.weight": Array(np.ones((10, 1280), np.float32)), "head.bias": Array(np.zeros(10, np.float32))})
    content = build_train_content(arrays, _metrics(10), SiteInfo("site-1", model.weights_sha256),
                                  PrivacyReport(event, 1e-5, spent, spent, release=release))
    del content["privacy"]["feature-mean-clip-norm"]
    strategy.aggregate_train(1, [Message(content=content, reply_to=_request(1))])
    record = recorder.finish(1, central_eval=None)
    assert record.aggregated_sites == []
    assert "unexpected ['feature-mean-noise-multiplier']" in record.problems[0].reasons[0]


def test_enrolled_sites_are_named_by_the_enrolment_not_by_their_replies(model):
    enrolled = {1: "oslo", 2: "bergen", 3: "tromso"}
    strategy, recorder = _strategy(model, enrolled=enrolled)
    w = np.ones((10, 1280), np.float32)
    replies = [
        _reply(model, 1, w, name="oslo"),
        _reply(model, 2, w, name="oslo"),  # bergen's node claims to be oslo
        _reply(model, 5, w, name="tromso"),  # a node the federation never enrolled
    ]
    strategy.aggregate_train(1, replies)
    record = recorder.finish(1, central_eval=None)
    assert record.aggregated_sites == ["oslo"]
    problems = {p.site: (p.kind, p.reasons[0]) for p in record.problems}
    assert problems["bergen"] == ("rejected", "the reply names itself 'oslo', but node 2 is enrolled as 'bergen'")
    assert problems["tromso"][0] == "missing"  # node 3 never answered: named by the enrolment too
    assert problems["node-5"] == ("rejected", "node 5 is not in the federation's enrolment")  # its claim is not taken
