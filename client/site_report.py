"""What ``fedhead site check`` says about a site's data beyond its counts.

- how its images are stored (:func:`image_kinds`: size, grey or RGB, bits
  per sample, format; for DICOM the photometric interpretation, whether the
  file's own window or VOI LUT or its min-max range scaled it, and a
  compressed transfer syntax);
- warnings that need a person's judgement (:func:`check_warnings`): a
  validation split too small to measure (fewer than
  :data:`MIN_VAL_PER_CLASS` images of a class), images of mixed bit depths or
  channel counts;
- what would leave the site (:func:`what_leaves`): the head's parameters and
  the named metric numbers of each reply; nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from client.site_data import SiteData
from common.config import RunConfig
from common.data_formats import ImageKind, Split
from common.preprocessing import to_uint8_nchw

__all__ = ["MIN_VAL_PER_CLASS", "image_kinds", "check_warnings", "what_leaves"]

# Below this many validation images of a class, its recall moves by 10 points or more with one image:
# too few to tell a better head from a worse one.
MIN_VAL_PER_CLASS = 10


def image_kinds(site: SiteData) -> Counter[ImageKind]:
    """How many of the site's images (train and validation) were stored each way."""
    return _kinds(site.train) + _kinds(site.val)


def _kinds(split: Split) -> Counter[ImageKind]:
    if split.kinds is not None:
        return Counter(split.kinds)
    if len(split) == 0:
        return Counter()
    if isinstance(split.images, torch.Tensor):  # an .npz's array: one kind for all
        _, channels, height, width = to_uint8_nchw(split.images[:1]).shape
        return Counter({ImageKind("npz array", width, height, channels, 8): len(split)})
    return Counter(ImageKind("array", img.shape[-1], img.shape[-2], img.shape[0], 8) for img in split.images)


def check_warnings(site: SiteData, class_names: Sequence[str], kinds: Counter[ImageKind]) -> list[str]:
    """Warnings about a site's data that :func:`client.site_data.load_site_data` does not give."""
    notes = _small_validation(site, class_names)
    notes += _mixed(kinds, lambda k: f"{k.bits}-bit", "bit depths", "each file is scaled to 8 bits from its own window or range, "
                    "so equal brightness may not mean equal signal; check that this is intended")
    notes += _mixed(kinds, lambda k: "grey" if k.channels == 1 else "RGB", "channel counts", "grey images are repeated to RGB; "
                    "if one class is mostly colour, the head may learn the format instead of the finding")
    return notes


def _small_validation(site: SiteData, class_names: Sequence[str]) -> list[str]:
    if len(site.val) == 0:
        return []  # load_site_data already warns of an empty validation split
    counts = torch.bincount(site.val.labels, minlength=len(class_names)).tolist()
    trained = set(site.train.labels.tolist())
    small = [f"{name} ({counts[i]})" for i, name in enumerate(class_names) if i in trained and counts[i] < MIN_VAL_PER_CLASS]
    if not small:
        return []
    return [
        f"the validation split is too small to measure: fewer than {MIN_VAL_PER_CLASS} images of {', '.join(small)}; "
        "its per-class recall and F1 will swing with single images: add validation images or raise val-fraction"
    ]


def _mixed(kinds: Counter[ImageKind], key, what: str, consequence: str) -> list[str]:
    groups: Counter[str] = Counter()
    for kind, count in kinds.items():
        groups[key(kind)] += count
    if len(groups) < 2:
        return []
    shown = ", ".join(f"{name}: {count:,}" for name, count in sorted(groups.items()))
    return [f"images of mixed {what} ({shown}); {consequence}"]


def what_leaves(cfg: RunConfig) -> list[tuple[str, str]]:
    """(what, in detail) for everything a site's replies hold; the rest stays at the site."""
    from common.backbones import get_backbone_spec
    from common.heads import build_head
    from common.protocol import BACKBONE_SHA256, CLASS_RECALL_RECORD, SITE_NAME, SKIPPED_IMAGES, EvaluateMetrics, TrainMetrics, metric_keys

    spec = get_backbone_spec(cfg.backbone)
    head = build_head(cfg.head, spec.feature_dim, cfg.num_classes, hidden=cfg.head_hidden)
    count = sum(p.numel() for p in head.parameters())
    blocks = f", plus the last {cfg.unfreeze_blocks} backbone blocks' parameters" if cfg.unfreeze_blocks else ""
    return [
        ("head parameters", f"{count:,} numbers: the {cfg.head} head on {cfg.backbone}'s {spec.feature_dim:,} features, {cfg.num_classes} classes{blocks}"),
        ("training reply", ", ".join(metric_keys(TrainMetrics))),
        ("evaluation reply", ", ".join(metric_keys(EvaluateMetrics)) + f"; recall per class ('{CLASS_RECALL_RECORD}')"),
        ("about the site", f"{SITE_NAME}, {BACKBONE_SHA256}, {SKIPPED_IMAGES} (a count); under DP-SGD its DP event and epsilon spent; its signature of each training reply"),
        ("stays here", "images, features, file names and paths, labels of single images, per-example values"),
    ]
