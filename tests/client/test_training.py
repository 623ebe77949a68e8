"""Local training on cached features: learns, touches only the trainable set."""

from __future__ import annotations

import pytest
import torch

from client.feature_cache import FeatureCache
from client.feature_source import build_feature_source
from client.site_data import load_site_data
from client.training import build_optimizer, evaluate_locally, train_locally
from common.config import build_run_config
from common.model import build_split_model, trainable_parameters


@pytest.fixture
def setup(tmp_path, digits_npz, digits_cfg):
    model = build_split_model(digits_cfg)
    site = load_site_data(digits_npz, digits_cfg)
    cache = FeatureCache(tmp_path / "cache")
    train = build_feature_source(model, site.train, cache=cache, augment_views=0, seed=0, label="train")
    val = build_feature_source(model, site.val, cache=cache, augment_views=0, seed=0, label="val")
    return model, site, train, val


def test_local_training_learns_digits(setup, digits_cfg):
    model, site, train, val = setup
    before = evaluate_locally(model.trainable, val, site.val.labels, 10)["accuracy"]
    trunk_before = [p.clone() for p in model.trunk.parameters()]
    cfg = build_run_config(classes=",".join(map(str, range(10))), image_size=32, local_epochs=10, lr=0.01)
    report = train_locally(model.trainable, train, site.train.labels, val, site.val.labels, cfg, server_round=1)
    after = evaluate_locally(model.trainable, val, site.val.labels, 10)
    assert report.epochs_run == 10 and report.num_examples == 1000
    assert before < 0.3 and after["accuracy"] > 0.8  # chance is 0.1
    assert all(torch.equal(a, b) for a, b in zip(trunk_before, model.trunk.parameters()))


def test_optimizer_holds_exactly_the_trainable_set():
    cfg = build_run_config(pretrained=False, backbone="resnet18", unfreeze_blocks=1, backbone_lr_scale=0.1, lr=0.01)
    model = build_split_model(cfg)
    optimizer = build_optimizer(model.trainable, cfg)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for _, p in trainable_parameters(model.trainable)}
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs == pytest.approx([0.001, 0.01])


def test_early_stopping_stops_and_keeps_the_best(setup):
    model, site, train, val = setup
    cfg = build_run_config(classes=",".join(map(str, range(10))), image_size=32, local_epochs=30, lr=0.05, early_stopping_patience=2)
    report = train_locally(model.trainable, train, site.train.labels, val, site.val.labels, cfg, server_round=1)
    assert report.epochs_run < 30
    assert evaluate_locally(model.trainable, val, site.val.labels, 10)["loss"] == pytest.approx(report.val_loss, rel=1e-4)


def test_proximal_term_keeps_the_update_closer(setup, digits_cfg):
    model, site, train, val = setup
    start = {n: p.detach().clone() for n, p in trainable_parameters(model.trainable)}

    def drift(mu: float) -> float:
        model.trainable.load_state_dict({k: v.clone() for k, v in start.items()}, strict=False)
        train_locally(model.trainable, train, site.train.labels, val, site.val.labels, digits_cfg, server_round=1, proximal_mu=mu)
        return sum(float((p.detach() - start[n]).norm()) for n, p in trainable_parameters(model.trainable))

    assert drift(10.0) < 0.8 * drift(0.0)


def test_training_without_cache_runs_the_backbone_every_epoch(digits_npz, digits_cfg):
    model = build_split_model(digits_cfg)
    site = load_site_data(digits_npz, digits_cfg)
    cfg = build_run_config(classes=",".join(map(str, range(10))), image_size=32, local_epochs=2, augment_views=1)
    train = build_feature_source(model, site.train, cache=None, augment_views=1, seed=0, label="live")
    val = build_feature_source(model, site.val, cache=None, augment_views=0, seed=0, label="live val")
    train_locally(model.trainable, train, site.train.labels, val, site.val.labels, cfg, server_round=1)
    assert train.forwards == 2 * 1000
    assert evaluate_locally(model.trainable, val, site.val.labels, 10)["accuracy"] > 0.5
