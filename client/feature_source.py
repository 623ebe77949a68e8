"""Where the trainable part's inputs come from: the cache, or the backbone live.

``CachedFeatures`` holds the trunk's output for every image and view, read
from (or written to) the feature cache once. ``LiveFeatures`` runs the frozen
trunk on every batch of every epoch: the plain way, kept for comparison
(``cache-features=false``). Both count the images they pass through the trunk.
"""

from __future__ import annotations

import logging

import torch

from client.feature_cache import FeatureCache
from client.site_data import Split
from common.devices import Extraction
from common.features import extract_features
from common.model import SplitModel
from common.preprocessing import to_uint8_nchw

__all__ = ["FeatureSource", "CachedFeatures", "LiveFeatures", "build_feature_source", "augment"]

log = logging.getLogger(__name__)

AUGMENTATION = "random-resized-crop(0.6-1.0)+hflip"


def _augmenter(size: tuple[int, int]):
    from torchvision.transforms import v2  # only to compute views: a round served from the cache never imports it

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()])


def augment(images: torch.Tensor | list[torch.Tensor], *, seed: int | None = None) -> list[torch.Tensor] | torch.Tensor:
    """One random augmentation per image (deterministic when ``seed`` is given)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(images, torch.Tensor):
            batch = to_uint8_nchw(images)
            aug = _augmenter(tuple(batch.shape[-2:]))
            return torch.stack([aug(img) for img in batch])
        return [_augmenter(tuple(img.shape[-2:]))(img) for img in images]


class FeatureSource:
    """Inputs for the trainable part, by example index and view."""

    num_views: int = 1
    forwards: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Trainable-part inputs for examples ``index`` (view 0 when ``views`` is None)."""
        raise NotImplementedError


class CachedFeatures(FeatureSource):
    """All views of a split's trunk outputs, held in memory (on ``device``) after one cache lookup each."""

    def __init__(self, views: list[torch.Tensor], *, forwards: int, hits: int, device: torch.device | None = None) -> None:
        self.views = torch.stack(views).to(device or "cpu")
        self.num_views = len(views)
        self.forwards = forwards
        self.hits = hits

    def __len__(self) -> int:
        return self.views.shape[1]

    def get(self, index: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        if views is None:
            return self.views[0, index]
        return self.views[views, index]


class LiveFeatures(FeatureSource):
    """Runs the trunk on each requested batch; augmented views are drawn afresh."""

    def __init__(self, model: SplitModel, split: Split, *, augment_views: int, extraction: Extraction, device: torch.device | None = None) -> None:
        self.model = model
        self.split = split
        self.extraction = extraction
        self.device = device or torch.device("cpu")
        self.num_views = augment_views + 1
        self.forwards = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self.split)

    def get(self, index: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        images = self.split.images
        batch = images[index] if isinstance(images, torch.Tensor) else [images[i] for i in index.tolist()]
        if views is not None and bool((views > 0).any()):
            augmented = augment(batch)
            mask = (views > 0).tolist()
            if isinstance(batch, torch.Tensor):
                batch = to_uint8_nchw(batch).clone()
                batch[views > 0] = augmented[views > 0]
            else:
                batch = [a if m else b for a, b, m in zip(augmented, batch, mask)]
        self.forwards += len(index) * self.model.trunk_passes
        features = extract_features(self.model.trunk, self.model.preprocessing, batch, extraction=self.extraction)
        return features.to(self.device)


def build_feature_source(
    model: SplitModel,
    split: Split,
    *,
    cache: FeatureCache | None,
    augment_views: int,
    seed: int,
    label: str,
    extraction: Extraction = Extraction(),
    device: torch.device | None = None,
) -> FeatureSource:
    """A cached source (one lookup per view) when ``cache`` is given, else a live one.

    The trunk (on ``extraction.device``) computes what is missing; the
    features are served on ``device`` (where the trainable part is; the CPU by
    default). Features extracted under mixed precision are cached apart from
    float32 ones; float32 features from a GPU and from the CPU share entries.
    """
    if cache is None:
        return LiveFeatures(model, split, augment_views=augment_views, extraction=extraction, device=device)
    fingerprint = split.fingerprint()
    base = {
        "weights_sha256": model.weights_sha256,
        "cut": model.cut_id,
        "preprocessing": model.preprocessing.describe(),
        "data_sha256": fingerprint,
    }
    if extraction.mixed:
        base["precision"] = f"{extraction.precision} autocast"
    views, forwards, hits = [], 0, 0
    for view in range(augment_views + 1):
        parts = dict(base, view=view)
        if view:
            parts.update(augmentation=AUGMENTATION, augmentation_seed=seed)

        def compute(view: int = view) -> torch.Tensor:
            images = split.images if view == 0 else augment(split.images, seed=seed * 1009 + view)
            if len(split):
                log.info("%s: computing backbone features for %d images (view %d, %s)", label, len(split), view, extraction.describe())
            return extract_features(model.trunk, model.preprocessing, images, extraction=extraction, description=label)

        lookup = cache.get_or_compute(parts, len(split), compute)
        views.append(lookup.features)
        forwards += lookup.forwards * model.trunk_passes
        hits += int(lookup.hit)
    return CachedFeatures(views, forwards=forwards, hits=hits, device=device)
