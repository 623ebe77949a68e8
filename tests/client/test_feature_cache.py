"""The feature cache: one backbone pass per image, stale and corrupt entries rebuilt."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from client.feature_cache import FeatureCache
from client.feature_source import build_feature_source
from client.site_data import Split, load_site_data
from common.config import build_run_config
from common.features import extract_features
from common.model import build_split_model


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config(image_size=32))


@pytest.fixture
def split(digits):
    images, labels = digits
    return Split(torch.from_numpy(images[:120]), torch.from_numpy(labels[:120]))


def _source(model, split, cache, views=0):
    return build_feature_source(model, split, cache=cache, augment_views=views, seed=1, label="test")


def test_first_lookup_computes_and_later_ones_hit(tmp_path, model, split):
    cache = FeatureCache(tmp_path)
    first = _source(model, split, cache)
    second = _source(model, split, cache)
    assert (first.forwards, first.hits) == (120, 0)
    assert (second.forwards, second.hits) == (0, 1)
    live = extract_features(model.trunk, model.preprocessing, split.images)
    assert torch.allclose(second.get(torch.arange(120)), live, atol=1e-5)


def test_changed_data_is_a_different_entry(tmp_path, model, split):
    cache = FeatureCache(tmp_path)
    _source(model, split, cache)
    images = split.images.clone()
    images[0, 0, 0] ^= 1
    changed = _source(model, Split(images, split.labels), cache)
    assert changed.forwards == 120 and changed.hits == 0


def test_changed_preprocessing_is_a_different_entry(tmp_path, model, split):
    cache = FeatureCache(tmp_path)
    _source(model, split, cache)
    other = build_split_model(build_run_config(image_size=40))
    assert _source(other, split, cache).hits == 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, model, split, damage, caplog):
    cache = FeatureCache(tmp_path)
    good = _source(model, split, cache).get(torch.arange(120))
    (entry,) = tmp_path.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-16] ^= 0x40
    else:
        data = data[: len(data) // 2]
    entry.write_bytes(bytes(data))
    logger = logging.getLogger("client.feature_cache")
    logger.addHandler(caplog.handler)  # fedhead's loggers may not propagate to the root
    try:
        rebuilt = _source(model, split, cache)
    finally:
        logger.removeHandler(caplog.handler)
    assert rebuilt.forwards == 120 and rebuilt.hits == 0
    assert "stale or corrupt" in caplog.text
    assert torch.allclose(rebuilt.get(torch.arange(120)), good, atol=1e-5)
    assert _source(model, split, cache).hits == 1


def test_augmented_views_are_cached_once_each(tmp_path, model, split):
    cache = FeatureCache(tmp_path)
    first = _source(model, split, cache, views=2)
    again = _source(model, split, cache, views=2)
    assert first.forwards == 3 * 120 and again.forwards == 0 and again.hits == 3
    views = torch.tensor([0, 1, 2])
    index = torch.tensor([5, 5, 5])
    a, b, c = again.get(index, views)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


def test_without_cache_every_request_runs_the_backbone(model, split):
    live = build_feature_source(model, split, cache=None, augment_views=0, seed=1, label="live")
    live.get(torch.arange(50))
    live.get(torch.arange(50))
    assert live.forwards == 100


def test_a_round_served_from_the_cache_never_builds_the_backbone_nor_imports_torchvision(tmp_path, digits_npz):
    """A deployment ClientApp is a fresh process per message: on a cache hit it needs only the head."""
    cfg = build_run_config(image_size=32)
    data = load_site_data(digits_npz, cfg, name="site")
    model = build_split_model(cfg)
    expected = {split: _source(model, getattr(data, split), FeatureCache(tmp_path / "cache")).get(torch.arange(n))
                for split, n in (("train", len(data.train)), ("val", len(data.val)))}
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
import client.app  # everything the ClientApp process imports
from client.feature_cache import FeatureCache
from client.feature_source import build_feature_source
from client.site_data import load_site_data
from common.config import build_run_config
from common.model import build_split_model
cfg = build_run_config(image_size=32)
model = build_split_model(cfg)
data = load_site_data({str(digits_npz)!r}, cfg, name="site")
expected = torch.load({str(tmp_path / 'expected.pt')!r})
for split in ("train", "val"):
    source = build_feature_source(model, getattr(data, split), cache=FeatureCache({str(tmp_path / 'cache')!r}),
                                  augment_views=0, seed=1, label=split)
    assert (source.forwards, source.hits) == (0, 1), (source.forwards, source.hits)
    assert torch.equal(source.get(torch.arange(len(source))), expected[split])
assert not model.trunk_built
assert "torchvision" not in sys.modules, "a cache hit imported torchvision"
model.trunk  # a miss builds it
assert "torchvision" in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
