"""The backbone registry: every listed architecture cuts into trunk and trainable part."""

from __future__ import annotations

import pytest
import torch

from common.backbones import BackboneSpec, get_backbone_spec, list_backbones, register_backbone
from common.config import build_run_config
from common.errors import ConfigError
from common.model import build_split_model, trainable_parameters

REQUIRED = ["densenet121", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet50", "vgg16", "vit_b_16"]


def test_registry_lists_the_required_backbones():
    assert set(REQUIRED) <= set(list_backbones())


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        get_backbone_spec("alexnet")


def test_registering_a_name_twice_is_an_error():
    spec = get_backbone_spec("resnet18")
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(BackboneSpec("resnet18", spec.feature_dim, spec.weights_entry, spec.release_file, spec.num_stages, spec.split))


@pytest.mark.parametrize("name", list_backbones())
def test_each_spec_records_what_torchvision_says(name):
    """A cache hit reads the release file, normalisation and stage count from the spec, not from torchvision."""
    spec = get_backbone_spec(name)
    preset = spec.weights.transforms()
    assert spec.release_file == spec.weights.url.rsplit("/", 1)[-1]
    assert (spec.mean, spec.std) == (tuple(preset.mean), tuple(preset.std))
    assert spec.interpolation == preset.interpolation.value
    with torch.device("meta"):  # the architecture alone, no memory for its weights
        assert len(spec.split(spec.build())) == spec.num_stages


@pytest.mark.parametrize("name", REQUIRED)
def test_each_backbone_yields_its_feature_dim_and_opens_blocks(name):
    spec = get_backbone_spec(name)
    size = spec.fixed_image_size or 64
    frozen = build_split_model(build_run_config(backbone=name, pretrained=False, image_size=size))
    opened = build_split_model(build_run_config(backbone=name, pretrained=False, image_size=size, unfreeze_blocks=1))
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        features = frozen.trunk(frozen.preprocessing(images))
        logits = opened.trainable(opened.trunk(opened.preprocessing(images)))
    assert features.shape == (1, spec.feature_dim)
    assert logits.shape == (1, 10)
    head_only = {n for n, _ in trainable_parameters(frozen.trainable)}
    assert head_only == {"head.weight", "head.bias"}
    opened_names = {n for n, _ in trainable_parameters(opened.trainable)}
    assert head_only < opened_names and all(n.startswith(("head.", "open_stages.")) for n in opened_names)
    assert not any(p.requires_grad for p in opened.trunk.parameters())


def test_vit_refuses_other_image_sizes():
    with pytest.raises(ConfigError, match="image-size=224"):
        build_split_model(build_run_config(backbone="vit_b_16", pretrained=False, image_size=64))


def test_too_many_unfrozen_blocks_is_an_error():
    with pytest.raises(ConfigError, match="has 5 stages"):
        build_split_model(build_run_config(backbone="resnet18", pretrained=False, unfreeze_blocks=5))


def test_random_backbone_is_identical_at_every_site():
    cfg = build_run_config(pretrained=False, seed=3)
    assert build_split_model(cfg).weights_sha256 == build_split_model(cfg).weights_sha256
    assert build_split_model(cfg).weights_sha256 != build_split_model(build_run_config(pretrained=False, seed=4)).weights_sha256


def test_the_frozen_trunk_has_its_batch_norms_folded_and_gives_the_same_features(monkeypatch):
    import common.model

    cfg = build_run_config()  # pretrained mobilenet_v2: real BatchNorm statistics, not the identity of a fresh one
    folded = build_split_model(cfg)
    folded.trunk  # noqa: B018 (built now, before folding is switched off)
    monkeypatch.setattr(common.model, "_fold_batch_norms", lambda trunk: 0)
    plain = build_split_model(cfg)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.trunk.modules()) == 52
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.trunk.modules())
    assert not any(p.requires_grad for p in folded.trunk.parameters())
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = folded.trunk(folded.preprocessing(images)), plain.trunk(plain.preprocessing(images))
    assert ((a - b).norm(dim=1) / b.norm(dim=1)).max() < 1e-4
    assert not torch.equal(a, b)  # folded for real: the arithmetic differs in the last bits


def test_the_trunk_is_built_on_first_use_on_the_device_it_was_placed_on():
    model = build_split_model(build_run_config())
    assert not model.trunk_built and model.cut_id == "mobilenet_v2:stage19of19"
    model.place_trunk("meta")  # as a GPU site places it, before any feature is missing
    assert not model.trunk_built
    assert {p.device.type for p in model.trunk.parameters()} == {"meta"} and model.trunk_built
