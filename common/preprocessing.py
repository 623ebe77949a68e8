"""Image preprocessing shared by sites and server: the backbone's own transforms.

Mean, std and interpolation are the backbone's torchvision weights' own
(``weights.transforms()``, recorded in its :class:`BackboneSpec`); the resize and crop are set to ``image-size`` so a
small dataset is not blown up to 224 px unless asked. Grey images are repeated
to three channels. The description returned by :meth:`Preprocessing.describe`
is part of the feature cache key and of the exported model's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.backbones import BackboneSpec
from common.errors import ConfigError, DataError

__all__ = ["Preprocessing", "build_preprocessing", "to_uint8_nchw"]


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``image_size`` square, scale to [0, 1], normalise per channel."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def describe(self) -> dict:
        """A JSON-ready description (cache key, manifest)."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "channels": 3,
            "input": "uint8 images, resized to image_size x image_size, scaled to [0,1], normalised",
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Map a uint8 batch (N, C, H, W) to the backbone's float input (N, 3, S, S)."""
        return self.normalise(self.resize(images))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) to uint8 (N, 3, S, S): resized, grey repeated to three channels."""
        return _resize(images, self.image_size, self.interpolation)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Resized uint8 images to normalised float, on whatever device they are."""
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _resize(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    images = to_uint8_nchw(images)
    if images.shape[-2:] != (size, size):  # grey is resized once, then repeated (the same pixels as after)
        from torchvision.transforms import v2  # only when there is resizing to do: a cache hit never imports it

        mode = v2.InterpolationMode(interpolation)
        images = v2.functional.resize(images, [size, size], interpolation=mode, antialias=True)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """Accept (N, H, W), (N, H, W, C) or (N, C, H, W) uint8; return (N, C, H, W)."""
    if images.dtype != torch.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}; convert them to 0-255 integers first")
    if images.dim() == 3:
        return images.unsqueeze(1)
    if images.dim() == 4:
        if images.shape[1] in (1, 3):
            return images
        if images.shape[-1] in (1, 3):
            return images.permute(0, 3, 1, 2)
    raise DataError(
        f"images have shape {tuple(images.shape)}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with 1 or 3 channels"
    )


def build_preprocessing(spec: BackboneSpec, image_size: int) -> Preprocessing:
    """The preprocessing for ``spec`` at ``image_size`` pixels, with its weights' mean, std and interpolation."""
    if spec.fixed_image_size and image_size != spec.fixed_image_size:
        raise ConfigError(
            f"backbone '{spec.name}' accepts only image-size={spec.fixed_image_size}, got {image_size}; "
            f"set image-size={spec.fixed_image_size}"
        )
    return Preprocessing(image_size=image_size, mean=spec.mean, std=spec.std, interpolation=spec.interpolation)
