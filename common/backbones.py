"""Backbone registry: how each torchvision model is cut into stages.

Every backbone is a list of *stages* whose composition maps a preprocessed
image batch to a flat feature vector of ``feature_dim`` floats. With
``unfreeze-blocks=k`` the last ``k`` stages are trainable and the first
``len(stages) - k`` form the frozen trunk whose output the feature cache holds.

What a site needs on a cache hit (the weights' release file, the
normalisation, the number of stages) is written in each spec, so that such a
round never imports torchvision; a test checks every entry against
torchvision's own weights enum and architecture.

Three doors, as in torchvision: :func:`register_backbone`,
:func:`get_backbone_spec` and :func:`list_backbones`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ConfigError

__all__ = ["BackboneSpec", "register_backbone", "get_backbone_spec", "list_backbones"]


@dataclass(frozen=True)
class BackboneSpec:
    """What fedhead knows about one backbone.

    ``weights_entry`` names the torchvision weights enum entry used when
    ``pretrained=true`` and ``release_file`` that entry's file name;
    ``split`` turns a built model into its ``num_stages`` stages; ``mean``,
    ``std`` and ``interpolation`` are the entry's preprocessing;
    ``fixed_image_size`` is set for architectures that accept only one size.
    """

    name: str
    feature_dim: int
    weights_entry: str
    release_file: str
    num_stages: int
    split: Callable[[nn.Module], list[nn.Module]]
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    fixed_image_size: int | None = None

    @property
    def weights_enum(self):
        """torchvision's weights enum class for this architecture."""
        from torchvision import models  # imported only to build a model or download weights: ~2 s

        return models.get_model_weights(self.name)

    @property
    def weights(self):
        """The weights enum entry fedhead uses for this backbone."""
        return self.weights_enum[self.weights_entry]

    def build(self) -> nn.Module:
        """Build the architecture with random weights (weights are loaded separately)."""
        from torchvision import models

        return models.get_model(self.name, weights=None)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; registering a name twice is an error."""
    if spec.name in _REGISTRY:
        raise ConfigError(f"backbone '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    """Return the spec registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone '{name}'; choose one of: {', '.join(list_backbones())}"
        ) from None


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def _pool() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _split_features_then_pool(model: nn.Module) -> list[nn.Module]:
    """mobilenet_v2/v3, efficientnet: ``model.features`` blocks, pooling after the last."""
    blocks = list(model.features.children())
    return blocks[:-1] + [nn.Sequential(blocks[-1], _pool())]


def _split_resnet(model: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [stem, model.layer1, model.layer2, model.layer3, nn.Sequential(model.layer4, _pool())]


def _split_densenet(model: nn.Module) -> list[nn.Module]:
    f = model.features
    return [
        nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0),
        nn.Sequential(f.denseblock1, f.transition1),
        nn.Sequential(f.denseblock2, f.transition2),
        nn.Sequential(f.denseblock3, f.transition3),
        nn.Sequential(f.denseblock4, f.norm5, nn.ReLU(), _pool()),
    ]


def _split_vgg(model: nn.Module) -> list[nn.Module]:
    """Five conv blocks (each ending in max-pooling), then fc6 and fc7 as one stage."""
    stages, current = [], []
    for layer in model.features.children():
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    fc = nn.Sequential(model.avgpool, nn.Flatten(1), *list(model.classifier.children())[:-1])
    return stages + [fc]


class _VitEmbed(nn.Module):
    """Patchify, prepend the class token, add position embeddings."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit_process = vit._process_input
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vit_process(x)
        token = self.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([token, x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _VitClassToken(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)[:, 0]


def _split_vit(model: nn.Module) -> list[nn.Module]:
    layers = list(model.encoder.layers.children())
    return [_VitEmbed(model)] + layers[:-1] + [nn.Sequential(layers[-1], _VitClassToken(model.encoder.ln))]


for _spec in (
    BackboneSpec("mobilenet_v2", 1280, "IMAGENET1K_V1", "mobilenet_v2-b0353104.pth", 19, _split_features_then_pool),
    BackboneSpec("mobilenet_v3_small", 576, "IMAGENET1K_V1", "mobilenet_v3_small-047dcff4.pth", 13, _split_features_then_pool),
    BackboneSpec("resnet18", 512, "IMAGENET1K_V1", "resnet18-f37072fd.pth", 5, _split_resnet),
    BackboneSpec("resnet50", 2048, "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 5, _split_resnet),
    BackboneSpec("densenet121", 1024, "IMAGENET1K_V1", "densenet121-a639ec97.pth", 5, _split_densenet),
    BackboneSpec("vgg16", 4096, "IMAGENET1K_V1", "vgg16-397923af.pth", 6, _split_vgg),
    BackboneSpec("efficientnet_b0", 1280, "IMAGENET1K_V1", "efficientnet_b0_rwightman-7f5810bc.pth", 9,
                 _split_features_then_pool, interpolation="bicubic"),
    BackboneSpec("vit_b_16", 768, "IMAGENET1K_V1", "vit_b_16-c867db91.pth", 13, _split_vit, fixed_image_size=224),
):
    register_backbone(_spec)
