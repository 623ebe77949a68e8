"""`feature-views`: the trunk's features averaged over fixed views of each image, counted, cached apart, exported."""

from __future__ import annotations

import pytest
import torch

from client.feature_cache import FeatureCache
from client.feature_source import build_feature_source
from common.config import FEATURE_VIEWS, build_run_config
from common.data_formats import Split
from common.errors import ConfigError
from common.features import extract_features
from common.model import build_split_model
from common.view_average import VIEW_SETS, View, _view

SIZE = 32  # small inputs keep the pretrained trunk fast; the maps are the same at 64 px


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _features(views: str, images: torch.Tensor) -> torch.Tensor:
    model = build_split_model(build_run_config(image_size=SIZE, feature_views=views))
    return extract_features(model.trunk, model.preprocessing, images)


def test_mirror_averaged_features_are_the_mean_of_both_passes_and_the_same_for_a_mirrored_image():
    images = _images()
    plain, plain_mirrored = _features("one", images), _features("one", images.flip(-1))
    averaged, averaged_mirrored = _features("mirror", images), _features("mirror", images.flip(-1))
    assert not torch.allclose(plain, plain_mirrored, atol=1e-2)  # the backbone alone tells them apart
    torch.testing.assert_close(averaged, (plain + plain_mirrored) / 2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(averaged_mirrored, averaged, rtol=1e-4, atol=1e-4)
    shifted, shifted_mirrored = _features("mirror-shift", images), _features("mirror-shift", images.flip(-1))
    assert not torch.allclose(shifted, averaged, atol=1e-2)
    torch.testing.assert_close(shifted_mirrored, shifted, rtol=1e-4, atol=1e-4)


def test_a_shift_moves_the_image_by_whole_pixels_and_mirrors_the_edge_in():
    x = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8)
    right, left = _view(x, View(shift=1), 2), _view(x, View(shift=-1), 2)
    assert right.shape == left.shape == x.shape
    torch.testing.assert_close(right[..., 2:], x[..., :-2])
    torch.testing.assert_close(left[..., :-2], x[..., 2:])
    torch.testing.assert_close(right[..., :2], x[..., 1:3].flip(-1))  # reflected, not black
    torch.testing.assert_close(_view(x, View(mirror=True), 2), x.flip(-1))


def test_every_view_set_is_a_config_choice_and_counts_one_trunk_pass_per_view(tmp_path):
    assert tuple(VIEW_SETS) == FEATURE_VIEWS
    split = Split(_images(5), torch.zeros(5, dtype=torch.int64))
    cache = FeatureCache(tmp_path / "features")
    for views in FEATURE_VIEWS:
        model = build_split_model(build_run_config(image_size=SIZE, feature_views=views))
        assert model.trunk_passes == len(VIEW_SETS[views])
        first = build_feature_source(model, split, cache=cache, augment_views=0, seed=0, label=views)
        assert first.forwards == 5 * model.trunk_passes and first.hits == 0  # never another set's cache entry
        again = build_feature_source(model, split, cache=cache, augment_views=0, seed=0, label=views)
        assert again.forwards == 0 and again.hits == 1
        torch.testing.assert_close(again.get(torch.arange(5)), first.get(torch.arange(5)))
        live = build_feature_source(model, split, cache=None, augment_views=0, seed=0, label=views)
        live.get(torch.arange(5))
        assert live.forwards == 5 * model.trunk_passes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"feature_views": "flip"}, "'feature-views' = 'flip': choose one of one, mirror, mirror-shift"),
        ({"feature_views": "mirror", "unfreeze_blocks": 1}, "'feature-views' = 'mirror' averages the trunk's pooled features"),
    ],
)
def test_a_view_set_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config(**overrides)


def test_the_exported_model_averages_the_same_views(tmp_path):
    from server.export import export_model

    cfg = build_run_config(classes="a,b,c", image_size=SIZE, pretrained=False, feature_views="mirror-shift")
    model = build_split_model(cfg)
    manifest = export_model(model, tmp_path / "model", class_names=cfg.class_names, onnx=False)
    assert manifest["cut"].endswith(":views=mirror-shift")
    program = torch.export.load(str(tmp_path / "model" / "model.pt2")).module()
    images = _images(4)
    inputs = model.preprocessing.resize(images).float().div(255.0)
    model.trainable.eval()
    with torch.no_grad():
        expected = model.trainable(extract_features(model.trunk, model.preprocessing, images))
        torch.testing.assert_close(program(inputs), expected, rtol=1e-4, atol=1e-4)
