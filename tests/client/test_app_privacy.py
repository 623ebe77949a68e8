"""Record-level DP through the real ClientApp: calibrated noise, the site's ledger across runs, its policy first."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app
from common.config import build_run_config
from common.exchange import to_arrayrecord, trainable_layout
from common.model import build_split_model
from common.privacy import DPEvent, independent_epsilon
from common.replies import parse_train_reply

pytestmark = pytest.mark.usefixtures("flower_identity")

RUN_CONFIG = {
    "classes": ",".join(str(d) for d in range(10)), "image-size": 32, "local-epochs": 1, "lr": 0.01,
    "dp": "sample", "target-epsilon": 2.0, "target-delta": 1e-5, "num-server-rounds": 2, "batch-size": 100,
}


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config(RUN_CONFIG))


def _context(tmp_path, data, *, run_id=1, policy=None):
    node_config = {"data-dir": str(data), "site-name": "haukeland", "state-dir": str(tmp_path / "state")}
    if policy:
        node_config["policy"] = str(policy)
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config=RUN_CONFIG)


def _train(model, server_round: int) -> Message:
    config = ConfigRecord({"server-round": server_round, "backbone-sha256": model.weights_sha256})
    return Message(RecordDict({"arrays": to_arrayrecord(model.trainable), "config": config}), dst_node_id=7, message_type="train")


def _parse(model, reply, *, run_id: int = 1, server_round: int = 1):
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return parse_train_reply(reply, layout=trainable_layout(model.trainable), backbone_sha256=model.weights_sha256,
                             max_examples=10**6, require_privacy=True, run_id=str(run_id), server_round=server_round)


def test_a_run_ends_at_its_target_and_a_second_run_adds_to_the_lifetime(tmp_path, digits_npz, model):
    first = [_parse(model, app(_train(model, r), _context(tmp_path, digits_npz)), server_round=r) for r in (1, 2)]
    p1, p2 = first[0].privacy, first[1].privacy
    assert p1.event.sample_rate == pytest.approx(100 / 1000) and p1.event.steps == 10
    assert p1.epsilon_run < p2.epsilon_run <= 2.0 and p2.epsilon_run == pytest.approx(2.0, rel=0.01)  # the run's target
    assert p2.epsilon_lifetime == pytest.approx(p2.epsilon_run)
    # the reported figure is what an independent accountant computes from the recorded events
    assert p2.epsilon_run == pytest.approx(independent_epsilon([p1.event, p2.event], delta=1e-5), rel=1e-6)
    second = _parse(model, app(_train(model, 1), _context(tmp_path, digits_npz, run_id=2)), run_id=2).privacy
    assert second.epsilon_run == pytest.approx(p1.epsilon_run, rel=1e-6)  # a new run starts its own sum ...
    assert second.epsilon_lifetime > p2.epsilon_lifetime  # ... and the site's lifetime sum goes on
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert sum(len(entries) for entries in ledger["datasets"].values()) == 3


def test_the_sites_policy_refuses_before_any_training(tmp_path, digits_npz, model):
    policy = tmp_path / "policy.toml"
    policy.write_text("require-dp = true\nmax-epsilon = 1.7\nmax-delta = 1e-5\n")
    context = _context(tmp_path, digits_npz, policy=policy)
    _parse(model, app(_train(model, 1), context))  # round 1 spends about 1.6 of the 1.7
    cache_files = sorted((tmp_path / "state" / "features").glob("*"))
    refused = app(_train(model, 2), context)
    assert refused.has_error() and refused.error.reason.startswith("PolicyRefusal:")
    assert "max-epsilon" in refused.error.reason and "> 1.70 allowed" in refused.error.reason
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    assert sum(len(entries) for entries in ledger["datasets"].values()) == 1  # nothing spent by the refused round
    assert sorted((tmp_path / "state" / "features").glob("*")) == cache_files


def test_a_site_that_requires_dp_refuses_a_run_without_it(tmp_path, digits_npz, model, monkeypatch):
    policy = tmp_path / "policy.toml"
    policy.write_text("require-dp = true\n")
    context = _context(tmp_path, digits_npz, policy=policy)
    context.run_config = {**RUN_CONFIG, "dp": "none"}
    refused = app(_train(model, 1), context)
    assert refused.has_error() and "require-dp" in refused.error.reason
    assert not (tmp_path / "state" / "features").exists()


def test_the_budget_is_judged_at_the_sites_delta_not_the_servers(tmp_path, digits_npz, model):
    """At the server's delta 1e-2 the run would end at epsilon 2.0; at the site's 1e-5 one round is already 3.6."""
    policy = tmp_path / "policy.toml"
    policy.write_text("max-epsilon = 3.0\nmax-delta = 1e-5\n")
    context = _context(tmp_path, digits_npz, policy=policy)
    context.run_config = {**RUN_CONFIG, "target-delta": 1e-2}
    refused = app(_train(model, 1), context)
    assert refused.has_error() and "max-epsilon: this round would bring the lifetime epsilon to 3.63 > 3.00" in refused.error.reason


def test_a_policy_with_a_budget_must_name_its_delta(tmp_path, digits_npz, model):
    policy = tmp_path / "policy.toml"
    policy.write_text("max-epsilon = 3.0\n")
    reply = app(_train(model, 1), _context(tmp_path, digits_npz, policy=policy))
    assert reply.has_error() and reply.error.reason.startswith("ConfigError")


def test_all_the_server_receives_is_the_head_the_declared_numbers_and_signatures(tmp_path, digits_npz, model):
    """Every record and value of a site's train and evaluate replies, as they leave the ClientApp (mods included)."""
    import re

    from flwr.app import ArrayRecord, MetricRecord

    from common.protocol import EvaluateMetrics, PrivacyReport, TrainMetrics, metric_keys

    context = _context(tmp_path, digits_npz)
    train = app(_train(model, 1), context).content
    assert set(train) == {"arrays", "metrics", "site", "privacy", "receipt"}
    assert isinstance(train["arrays"], ArrayRecord)
    assert {k: tuple(v.shape) for k, v in train["arrays"].items()} == {
        k: tuple(v.shape) for k, v in to_arrayrecord(model.trainable).items()}  # the head's parameters, nothing else
    assert isinstance(train["metrics"], MetricRecord) and set(train["metrics"]) <= set(metric_keys(TrainMetrics))
    assert all(isinstance(v, (int, float)) for v in train["metrics"].values())
    assert dict(train["site"]) == {"site-name": "haukeland", "backbone-sha256": model.weights_sha256, "skipped-images": 0}
    privacy = dict(train["privacy"])
    assert set(privacy) == set(PrivacyReport._KEYS) and privacy["accountant"] == "rdp"
    assert all(isinstance(v, (int, float)) for k, v in privacy.items() if k != "accountant")
    assert set(train["receipt"]) == {"public-key", "signature"}
    assert all(re.fullmatch(r"[0-9a-f]+", v) for v in train["receipt"].values())  # hex: a key and a signature
    config = _train(model, 1).content["config"]
    evaluate = app(Message(RecordDict({"arrays": to_arrayrecord(model.trainable), "config": config}), dst_node_id=7,
                           message_type="evaluate"), context).content
    assert set(evaluate) == {"metrics", "site", "class-recall"}
    assert set(evaluate["metrics"]) <= set(metric_keys(EvaluateMetrics))
    assert set(evaluate["class-recall"]) <= {str(c) for c in range(10)}
    assert all(0.0 <= v <= 1.0 for v in evaluate["class-recall"].values())


@contextlib.contextmanager
def _client_logs(caplog):
    """The ClientApp's records (its logging keeps fedhead's loggers from propagating to the root)."""
    logger = logging.getLogger("client")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def test_a_centred_run_releases_its_feature_mean_once_and_ends_at_its_target(tmp_path, digits_npz, model, caplog):
    """``centre-features``: round 1 releases the mean (an event in the ledger and the reply), later rounds reuse it."""
    context = _context(tmp_path, digits_npz)
    # 1,000 images: a useful release needs little noise (2.5 * sqrt(1280) / 1000 = 0.09 of the clip norm), which costs 1.7
    context.run_config = {**RUN_CONFIG, "centre-features": True, "centre-noise-multiplier": 2.5, "num-server-rounds": 3,
                          "target-epsilon": 6.0}
    replies = [_parse(model, app(_train(model, r), context), server_round=r).privacy for r in (1, 2)]
    release = replies[0].release
    assert release == DPEvent(2.5, 1.0, 1, 40.0, "rdp")
    assert replies[1].release == release  # every later reply carries it: a lost round-1 reply hides nothing
    [kept] = (tmp_path / "state" / "feature-centre").glob("1-*.pt")  # named by the run and the data
    kept.unlink()  # lost between rounds: the site trains uncentred rather than release (and spend) again
    with _client_logs(caplog):
        replies.append(_parse(model, app(_train(model, 3), context), server_round=3).privacy)
    assert "trains on uncentred features rather than spend budget on it again" in caplog.text
    assert replies[2].release == release and not kept.exists()
    events = [release, *(p.event for p in replies)]  # the release counted once
    assert len({e.noise_multiplier for e in events[1:]}) == 1  # one calibration for the run, release included
    assert replies[2].epsilon_run == pytest.approx(independent_epsilon(events, delta=1e-5), rel=1e-6)
    assert 6.0 * 0.99 <= replies[2].epsilon_run <= 6.0  # the release is inside the run's target
    ledger = json.loads((tmp_path / "state" / "privacy-ledger.json").read_text())
    [entries] = ledger["datasets"].values()
    assert [(e["server_round"], e.get("mechanism", "dp-sgd"), e["attempt"]) for e in entries] == [
        (1, "feature-mean", 1), (1, "dp-sgd", 1), (2, "dp-sgd", 1), (3, "dp-sgd", 1)]


def test_a_site_with_too_few_images_for_a_useful_private_mean_releases_none(tmp_path, digits_npz, model, caplog):
    context = _context(tmp_path, digits_npz)
    context.run_config = {**RUN_CONFIG, "centre-features": True}  # noise 20: 0.72 of the clip norm for 1,000 images
    with _client_logs(caplog):
        privacy = _parse(model, app(_train(model, 1), context)).privacy
    assert privacy.release is None and "1000 training images are too few" in caplog.text
    assert not (tmp_path / "state" / "feature-centre").exists()
    assert privacy.epsilon_run == pytest.approx(independent_epsilon([privacy.event], delta=1e-5), rel=1e-6)


def test_a_release_that_would_spend_the_runs_budget_is_named(tmp_path):
    from client.privacy_ledger import PrivacyLedger
    from client.privacy_round import plan_round
    from common.privacy import BudgetError

    cfg = build_run_config({**RUN_CONFIG, "centre-features": True, "centre-noise-multiplier": 0.5})
    with pytest.raises(BudgetError, match="feature-mean release \\(centre-noise-multiplier 0.5\\) alone spends epsilon"):
        plan_round(cfg, num_examples=100_000, data_fingerprint="a" * 64, ledger=PrivacyLedger.in_state_dir(tmp_path),
                   run_id="1", feature_dim=1280)
