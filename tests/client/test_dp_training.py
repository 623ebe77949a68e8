"""DP-SGD with Opacus: the guarantee's ingredients are really there, on real digits."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from client.dp_training import DPTrainingError, train_privately
from client.feature_source import CachedFeatures
from common.config import build_run_config
from common.model import TrainablePart, trainable_parameters
from common.privacy import DPEvent

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def digit_features(digits):
    images, labels = digits
    return torch.as_tensor(images, dtype=torch.float32).reshape(len(images), 64) / 255.0, torch.as_tensor(labels)


def _source(x: torch.Tensor, views: int) -> CachedFeatures:
    """View 0 is ``x``; the others are fixed, data-independent perturbations of it."""
    g = torch.Generator().manual_seed(7)
    return CachedFeatures([x] + [x + 0.2 * torch.randn(x.shape, generator=g) for _ in range(views - 1)], forwards=0, hits=0)


def _part(kind: str = "linear", seed: int = 0) -> TrainablePart:
    torch.manual_seed(seed)
    if kind == "linear":
        return TrainablePart([], nn.Linear(64, 10))
    if kind == "mlp":
        return TrainablePart([], nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)))
    stage = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
    stage[1].running_mean.uniform_(-0.1, 0.1)
    for p in stage[1].parameters():
        p.requires_grad_(False)  # as build_split_model freezes open stages' BatchNorm
    return TrainablePart([stage], nn.Linear(16, 10))


def _params(part: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in trainable_parameters(part)]


@pytest.mark.parametrize(
    ("kind", "views", "mode"),
    [("linear", 3, "linear"), ("linear", 1, "linear"), ("mlp", 3, "ghost"), ("open", 3, "hooks"), ("open", 1, "ghost")],
)
def test_one_step_is_the_sum_of_clipped_per_image_mean_gradients(digit_features, kind, views, mode):
    x, y = digit_features[0][:12], digit_features[1][:12]
    source, part, smoothing = _source(x, views), _part(kind), 0.1
    before, anchors, mu = _params(part), [p + 0.5 for p in _params(part)], 0.3
    part.eval()  # the reference below: the same per-image loss, by plain autograd
    params = [p for _, p in trainable_parameters(part)]
    inputs = source.views.transpose(0, 1)  # (N, V, 64)
    grads = [
        torch.autograd.grad(F.cross_entropy(part(inputs[i]), y[i].repeat(views), label_smoothing=smoothing), params)
        for i in range(len(x))
    ]
    norms = [float(torch.sqrt(sum((g**2).sum() for g in gs))) for gs in grads]
    clip = sum(sorted(norms)[5:7]) / 2  # half the images get clipped (no norm sits on the boundary)
    summed = [sum(gs[k] * min(1.0, clip / (n + 1e-6)) for gs, n in zip(grads, norms)) for k in range(len(params))]
    per_view = [torch.zeros_like(p) for p in params]  # what "each view is a record" would do instead
    for i in range(len(x)):
        for v in range(views):
            gv = torch.autograd.grad(F.cross_entropy(part(inputs[i, v : v + 1]), y[i : i + 1], label_smoothing=smoothing), params)
            nv = float(torch.sqrt(sum((g**2).sum() for g in gv)))
            per_view = [s + g * min(1.0, clip / (nv + 1e-6)) / views for s, g in zip(per_view, gv)]
    expected = [b - (s / len(x) + mu * (b - a)) for b, s, a in zip(before, summed, anchors)]  # SGD lr 1, first step
    cfg = build_run_config(optimizer="sgd", lr=1.0, backbone_lr_scale=1.0, max_grad_norm=clip, label_smoothing=smoothing)
    report, event = train_privately(
        part, source, y, cfg, server_round=1, noise_multiplier=1e-9, sample_rate=1.0, steps=1,
        proximal_mu=mu, global_params=anchors, generator=torch.Generator().manual_seed(0),
    )
    after = _params(part)
    assert report.grad_sample_mode == mode and report.per_sample_gradients == [len(x)]  # images, not images x views
    assert report.max_per_sample_norm == pytest.approx(max(norms), rel=1e-4)
    assert report.clipped_fraction == pytest.approx(sum(n > clip for n in norms) / len(x))
    assert 0 < report.clipped_fraction < 1
    for got, want in zip(after, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if views > 1:
        other = [b - (s / len(x) + mu * (b - a)) for b, s, a in zip(before, per_view, anchors)]
        assert max(float((o - a).abs().max()) for o, a in zip(other, after)) > 1e-3  # the test can tell them apart
    assert event == DPEvent(1e-9, 1.0, 1, clip, "rdp")


def test_every_per_image_gradient_is_clipped_to_max_grad_norm(digit_features):
    x, y = digit_features[0][:40] * 1000.0, digit_features[1][:40].flip(0)  # huge raw gradients (shuffled labels)
    part = _part()
    before = _params(part)
    cfg = build_run_config(optimizer="sgd", lr=1.0, max_grad_norm=1.0)
    report, _ = train_privately(part, _source(x, 2), y, cfg, server_round=1, noise_multiplier=1e-9, sample_rate=1.0,
                                steps=1, generator=torch.Generator().manual_seed(0))
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(_params(part), before)))
    assert report.max_per_sample_norm > 100 and report.clipped_fraction > 0.5
    assert float(step) <= 1.0 + 1e-5  # mean of 40 clipped gradients, each of norm <= 1
    assert float(step) > 0.1


def test_noise_is_present_with_the_calibrated_scale(digit_features):
    x, y = digit_features[0][:50], digit_features[1][:50]
    cfg = build_run_config(optimizer="sgd", lr=1.0, max_grad_norm=1.0)
    heads = []
    for seed in (1, 2, 1):
        part = _part()
        train_privately(part, _source(x, 1), y, cfg, server_round=1, noise_multiplier=2.0, sample_rate=1.0, steps=1,
                        generator=torch.Generator().manual_seed(seed))
        heads.append(torch.cat([p.flatten() for p in _params(part)]))
    assert torch.equal(heads[0], heads[2])  # same secret seed, same head
    difference = heads[0] - heads[1]  # = (noise_1 - noise_2) / 50: std sqrt(2) * 2.0 * 1.0 / 50
    assert float(difference.std()) == pytest.approx(2**0.5 * 2.0 / 50, rel=0.15)


def test_sampling_is_poisson_and_empty_samples_still_step():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(400, 64, generator=g), torch.randint(0, 10, (400,), generator=g)
    cfg = build_run_config()
    report, event = train_privately(_part(), _source(x, 1), y, cfg, server_round=1, noise_multiplier=1.0,
                                    sample_rate=0.05, steps=150, generator=torch.Generator().manual_seed(4))
    sizes = torch.tensor(report.batch_sizes, dtype=torch.float64)
    assert event.steps == 150 and len(sizes) == 150 and len(set(report.batch_sizes)) >= 5
    assert abs(float(sizes.mean()) - 20.0) < 1.5  # expected 0.05 * 400; standard error 0.36
    assert 10 < float(sizes.var()) < 30  # binomial variance 400 * 0.05 * 0.95 = 19
    tiny, _ = train_privately(_part(), _source(x[:30], 1), y[:30], cfg, server_round=1, noise_multiplier=1.0,
                              sample_rate=0.01, steps=40, generator=torch.Generator().manual_seed(5))
    assert 0 in tiny.batch_sizes and tiny.steps == 40


def test_adam_dp_sgd_learns_digits(digit_features):
    x, y = digit_features
    cfg = build_run_config(optimizer="adam", lr=0.02, max_grad_norm=1.0)
    part = _part()
    report, _ = train_privately(part, _source(x[:1500], 2), y[:1500], cfg, server_round=1, noise_multiplier=1.0,
                                sample_rate=0.05, steps=200, generator=torch.Generator().manual_seed(0))
    part.eval()
    with torch.no_grad():
        accuracy = float((part(x[1500:]).argmax(1) == y[1500:]).float().mean())
    assert accuracy > 0.8 and report.epochs_run == 10


def test_trunk_statistics_and_frozen_parameters_never_move_and_opacus_leaves_nothing_behind(digit_features):
    x, y = digit_features[0][:200], digit_features[1][:200]
    part = _part("open")
    bn = part.open_stages[0][1]
    frozen = [t.clone() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)]
    before = _params(part)
    for views in (1, 3):
        train_privately(part, _source(x, views), y, build_run_config(), server_round=1, noise_multiplier=1.0,
                        sample_rate=0.1, steps=5, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(frozen, (bn.running_mean, bn.running_var, bn.weight, bn.bias)))
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(part)))
    leftovers = {"grad_sample", "_forward_counter", "_norm_sample", "summed_grad", "_current_grad_sample"}
    assert not any(hasattr(p, name) for p in part.parameters() for name in leftovers)
    assert not any(m._forward_hooks or m._backward_hooks for m in part.modules())


def test_a_trainable_batchnorm_fails_opacus_validation(digit_features):
    part = _part("open")
    for p in part.open_stages[0][1].parameters():
        p.requires_grad_(True)
    with pytest.raises(DPTrainingError, match="validators"):
        train_privately(part, _source(digit_features[0][:20], 1), digit_features[1][:20], build_run_config(),
                        server_round=1, noise_multiplier=1.0, sample_rate=0.5, steps=1, generator=torch.Generator())


def test_flower_logger_level_and_warning_filters_are_left_as_they_were(digit_features):
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.INFO)
    filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
    train_privately(_part(), _source(digit_features[0][:50], 1), digit_features[1][:50], build_run_config(),
                    server_round=1, noise_multiplier=1.0, sample_rate=0.2, steps=3, generator=torch.Generator())
    assert flwr.level == logging.INFO
    assert warnings.filters == filters and logging.getLogger().handlers == handlers


def test_a_fresh_process_keeps_flower_at_info_after_importing_and_running_opacus():
    script = """
import logging, warnings, torch
import flwr
from torch import nn
from client.dp_training import train_privately
from client.feature_source import CachedFeatures
from common.config import build_run_config
logging.getLogger("flwr").setLevel(logging.INFO)
filters = list(warnings.filters)
source = CachedFeatures([torch.randn(30, 8)], forwards=0, hits=0)
train_privately(nn.Linear(8, 3), source, torch.randint(0, 3, (30,)), build_run_config(), server_round=1,
                noise_multiplier=1.0, sample_rate=0.2, steps=2, generator=torch.Generator())
assert logging.getLogger("flwr").level == logging.INFO, logging.getLogger("flwr").level
assert logging.getLogger().handlers == [], logging.getLogger().handlers
assert warnings.filters == filters
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("views", [1, 2])
def test_an_open_mobilenet_stage_passes_opacus_and_keeps_its_batchnorm_statistics(views):
    from common.model import build_split_model

    cfg = build_run_config(pretrained=False, unfreeze_blocks=1, image_size=32, classes="a,b,c", max_grad_norm=1.0)
    model = build_split_model(cfg)
    with torch.no_grad():
        source = CachedFeatures([model.trunk(torch.randn(48, 3, 32, 32)) for _ in range(views)], forwards=0, hits=0)
    norms = [m for m in model.trainable.modules() if isinstance(m, nn.BatchNorm2d)]
    statistics = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    before = _params(model.trainable)
    report, _ = train_privately(model.trainable, source, torch.randint(0, 3, (48,)), cfg, server_round=1,
                                noise_multiplier=1.0, sample_rate=0.25, steps=2, generator=torch.Generator().manual_seed(0))
    assert report.grad_sample_mode == ("ghost" if views == 1 else "hooks")
    assert report.per_sample_gradients == report.batch_sizes
    assert norms and all(torch.equal(m.running_mean, a) and torch.equal(m.running_var, b) for m, (a, b) in zip(norms, statistics))
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(model.trainable)))


def test_a_kept_optimizer_state_continues_adams_moments_and_a_misfit_starts_afresh(digit_features, caplog):
    x, y = digit_features
    cfg = build_run_config(optimizer="adam", lr=0.02, max_grad_norm=1.0)
    kwargs = dict(noise_multiplier=1.0, sample_rate=0.05, steps=20)
    part = _part()
    first, _ = train_privately(part, _source(x[:1500], 1), y[:1500], cfg, server_round=1, generator=torch.Generator().manual_seed(0), **kwargs)
    assert [s["step"].item() for s in first.optimizer_state["state"].values()] == [20.0, 20.0]
    second, _ = train_privately(part, _source(x[:1500], 1), y[:1500], cfg, server_round=2, generator=torch.Generator().manual_seed(1),
                                optimizer_state=first.optimizer_state, **kwargs)
    assert [s["step"].item() for s in second.optimizer_state["state"].values()] == [40.0, 40.0]  # moments carried on
    misfit = _part("mlp")  # another head: the state's parameter groups do not fit it
    third, _ = train_privately(misfit, _source(x[:1500], 1), y[:1500], cfg, server_round=3, generator=torch.Generator().manual_seed(2),
                               optimizer_state=first.optimizer_state, **kwargs)
    assert all(s["step"].item() == 20.0 for s in third.optimizer_state["state"].values())
    assert "does not fit" in caplog.text


def test_a_damaged_optimizer_state_file_costs_only_the_momentum(tmp_path, caplog):
    from client.privacy_round import _read_optimizer_state

    path = tmp_path / "dp-optimizer" / "run.pt"
    assert _read_optimizer_state(path) is None and _read_optimizer_state(None) is None
    path.parent.mkdir()
    path.write_bytes(b"not a torch file")
    assert _read_optimizer_state(path) is None and "cannot be read" in caplog.text


def test_optimizer_states_of_runs_that_ended_are_removed_and_live_ones_kept(tmp_path):
    from client.privacy_round import OPTIMIZER_STATE_DAYS, _remove_stale_states

    kept, live, ended = (tmp_path / f"{name}.pt" for name in ("this-run", "other-run", "ended-run"))
    for path in (kept, live, ended):
        path.write_bytes(b"state")
    old = time.time() - (OPTIMIZER_STATE_DAYS + 1) * 86400
    os.utime(ended, (old, old))
    os.utime(kept, (old, old))  # the run being written is never removed
    _remove_stale_states(kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-run.pt", "this-run.pt"]
