"""Centring a site's features: the same function outside, the mean a clipped, noised release under DP."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from client.feature_centre import CentredFeatures, CentringError, centred_head, feature_mean, first_linear, keep_centre, read_kept_centre
from client.feature_source import CachedFeatures
from common.errors import ConfigError
from common.heads import build_head
from common.model import TrainablePart


def _features(n=500, dim=32, views=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CachedFeatures([torch.rand(n, dim, generator=g) * 3 for _ in range(views)], forwards=0, hits=views)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_centred_head_is_the_same_function_on_centred_features_and_plain_again_after(kind):
    torch.manual_seed(0)
    part = TrainablePart([], build_head(kind, 32, 10, hidden=16)).eval()
    x, centre = torch.rand(64, 32) * 3, torch.rand(32)
    before = part(x)
    with centred_head(part, centre):
        assert torch.allclose(part(x - centre), before, atol=1e-5)
        with torch.no_grad():  # training moves the weights: the bias that goes back uses the new ones
            first_linear(part).weight.mul_(2)
        trained = part(x - centre)
    assert torch.allclose(part(x), trained, atol=1e-5)


def test_only_a_head_on_the_trunks_features_can_be_centred():
    with pytest.raises(ConfigError, match="unfreeze-blocks"):
        first_linear(TrainablePart([nn.Conv2d(3, 3, 1)], nn.Linear(3, 2)))
    with pytest.raises(ConfigError, match="linear layer with a bias"):
        first_linear(TrainablePart([], nn.Linear(3, 2, bias=False)))


def test_the_exact_mean_averages_each_images_views_first():
    source = _features(views=2)
    assert torch.allclose(feature_mean(source), source.views.mean((0, 1)), atol=1e-5)
    assert torch.allclose(CentredFeatures(source, feature_mean(source)).get(torch.arange(500), torch.zeros(500, dtype=torch.long)),
                          source.views[0] - source.views.mean((0, 1)), atol=1e-5)


def test_the_released_mean_clips_each_image_and_adds_the_calibrated_noise():
    source = _features(n=1000, dim=2000)
    clean = feature_mean(source, clip=5.0)
    assert float(source.views[0].norm(dim=1).min()) > 5.0  # every image is clipped ...
    assert float(clean.norm()) <= 5.0 + 1e-4  # ... so the mean of clipped images is no longer than the clip norm
    outlier = CachedFeatures([torch.cat([source.views[0][:-1], torch.full((1, 2000), 1e6)])], forwards=0, hits=1)
    assert float((feature_mean(outlier, clip=5.0) - clean).norm()) * 1000 <= 2 * 5.0 + 1e-3  # one image moves the sum by <= 2 clip
    draws = [feature_mean(source, clip=5.0, noise_multiplier=20.0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(draws[0], draws[1])  # noise is present
    noise = (draws[0] - clean) * 1000  # on the sum: std noise_multiplier * clip = 100 per coordinate
    assert float(noise.std()) == pytest.approx(100.0, rel=0.1) and abs(float(noise.mean())) < 10
    with pytest.raises(ValueError, match="clip norm and a \\(secret\\) generator"):
        feature_mean(source, noise_multiplier=1.0)


def test_a_kept_mean_reads_back_and_a_damaged_or_misfit_one_is_none(tmp_path, caplog):
    path = tmp_path / "feature-centre" / "7.pt"
    keep_centre(path, torch.arange(4.0), stale_days=7)
    assert torch.equal(read_kept_centre(path, feature_dim=4), torch.arange(4.0))
    with caplog.at_level(logging.WARNING, logger="client.feature_centre"):
        assert read_kept_centre(path, feature_dim=5) is None  # another head's: never a shape error inside training
        path.write_bytes(b"not a tensor")
        assert read_kept_centre(path, feature_dim=4) is None
    assert "not a finite vector of 5 features" in caplog.text and "7.pt cannot be read" in caplog.text
    assert read_kept_centre(tmp_path / "missing.pt", feature_dim=4) is None


def test_features_that_are_not_finite_have_no_mean_and_nothing_is_released():
    bad = CachedFeatures([torch.tensor([[1.0, float("nan")], [2.0, 3.0]])], forwards=0, hits=1)
    with pytest.raises(CentringError, match="not all finite"):
        feature_mean(bad, clip=5.0, noise_multiplier=20.0, generator=torch.Generator())
