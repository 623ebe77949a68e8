"""Centring a site's features on their mean (run-config ``centre-features``), inside the guarantee.

A linear layer on centred features, ``W (x - m) + b``, is the same function as
``W x + (b - W m)``. So a site trains its head's first linear layer on
``x - m`` and converts back before it replies: what leaves the site, the
global model and its export are the plain head on plain features, and ``m``
never leaves the site. Only the training differs. Backbone features are
non-negative, so every image shares a large common part (on the default task
the mean is 72% of a feature vector's length). Centring takes it out of each
per-image gradient, and DP-SGD's clipping and noise then act on what tells
the images apart.

Under record-level DP ``m`` is a release of the site's data, and it is made
inside the guarantee: the Gaussian mechanism on the sum of the images'
features, each image's clipped to L2 norm ``centre-clip-norm``, with noise of
std ``centre-noise-multiplier * centre-clip-norm`` on each coordinate, divided
by the number of training images (which every reply sends in the clear). It is
one DP event (sample rate 1, one step) in the site's privacy ledger, made once
a run before the first DP-SGD step, and the run's noise calibration counts it,
so the run still ends at ``target-epsilon``. The noise's expected length is
``centre-noise-multiplier * centre-clip-norm * sqrt(features) / images``; a site
with too few images for it to stay under a tenth of the clip norm (7,200 for
MobileNetV2's 1,280 features at the defaults) would centre on noise, so it
makes no release and trains on its plain features. Without record-level DP the
exact mean is used (client-level DP covers whatever a site computes locally).

FedProx's pull and weight decay act on the centred parameters (the anchors
are taken after the shift): they bound the drift of ``W`` and ``b + W m``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from client.feature_source import FeatureSource
from common.config import RunConfig
from common.errors import ConfigError, FedHeadError
from common.privacy import DPEvent

__all__ = [
    "MAX_NOISE_TO_CLIP", "CentringError", "CentredFeatures", "centre_event", "release_noise_to_clip", "feature_mean", "first_linear", "centred_head",
    "read_kept_centre", "keep_centre",
]

log = logging.getLogger(__name__)

_BATCH = 4096
MAX_NOISE_TO_CLIP = 0.1  # a private mean noisier than this (its expected error over the clip norm) is not released


class CentringError(FedHeadError, ValueError):
    """The site's features have no usable mean (none, or not finite)."""


def centre_event(cfg: RunConfig) -> DPEvent:
    """The DP event of one private release of a site's feature mean."""
    return DPEvent(cfg.centre_noise_multiplier, 1.0, 1, cfg.centre_clip_norm, cfg.accountant)


def release_noise_to_clip(cfg: RunConfig, *, num_examples: int, feature_dim: int) -> float:
    """The private mean's expected error over the clip norm: ``noise multiplier * sqrt(features) / images``.

    Only public numbers: the run's settings and the number of training images.
    """
    return cfg.centre_noise_multiplier * feature_dim**0.5 / max(num_examples, 1)


@torch.no_grad()
def feature_mean(
    source: FeatureSource, *, clip: float | None = None, noise_multiplier: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The mean of each image's features (the mean over its views), on the CPU.

    With ``clip`` each image's features are first scaled to L2 norm at most
    ``clip``; with ``noise_multiplier`` > 0 Gaussian noise of std
    ``noise_multiplier * clip`` (drawn from ``generator``) is added to the sum
    before dividing by the number of images: the Gaussian mechanism.
    """
    n = len(source)
    if n == 0:
        raise CentringError("no training images to take the feature mean of")
    if noise_multiplier > 0 and (clip is None or generator is None):
        raise ValueError("a noisy feature mean needs a clip norm and a (secret) generator")
    total: torch.Tensor | None = None
    for start in range(0, n, _BATCH):
        index = torch.arange(start, min(n, start + _BATCH))
        rows = sum(source.get(index, torch.full_like(index, v)).float().cpu() for v in range(source.num_views))
        rows = rows.flatten(1) / source.num_views
        if clip is not None:
            rows = rows * (clip / (rows.norm(dim=1, keepdim=True) + 1e-12)).clamp(max=1.0)
        part = rows.sum(0)
        total = part if total is None else total + part
    assert total is not None
    if not bool(torch.isfinite(total).all()):  # before any noise: nothing is released
        raise CentringError("the training images' features are not all finite: their mean cannot centre them; "
                            "check the images and the backbone's weights")
    if noise_multiplier > 0:
        total = total + torch.normal(0.0, noise_multiplier * clip, total.shape, generator=generator)
    return total / n


class CentredFeatures(FeatureSource):
    """``source``'s features minus ``centre``."""

    def __init__(self, source: FeatureSource, centre: torch.Tensor) -> None:
        self.source = source
        self.num_views = source.num_views
        self._centre = centre
        self._placed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.source.get(index, views)
        key = (rows.device, rows.dtype)
        if key not in self._placed:
            self._placed[key] = self._centre.to(rows.device, rows.dtype).view(rows.shape[1:])
        return rows - self._placed[key]


def first_linear(trainable: nn.Module) -> nn.Linear:
    """The linear layer that first sees the trunk's features: the head itself, or an MLP head's first layer."""
    stages = getattr(trainable, "open_stages", None)
    if stages is not None and len(stages):
        raise ConfigError("'centre-features' centres the trunk's features for the head, so it needs 'unfreeze-blocks' = 0")
    head = getattr(trainable, "head", trainable)
    layer = head[0] if isinstance(head, nn.Sequential) and len(head) else head
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise ConfigError(f"'centre-features' needs a head that starts with a linear layer with a bias, not {type(layer).__name__}")
    return layer


@contextlib.contextmanager
def centred_head(trainable: nn.Module, centre: torch.Tensor | None) -> Iterator[None]:
    """Inside: the head's first layer takes centred features (bias + W m). On exit: plain again (bias - W m).

    The function of the whole trainable part is the same before and after
    (up to float rounding); the bias on exit uses the weights training left.
    """
    if centre is None:
        yield
        return
    layer = first_linear(trainable)
    m = centre.to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        layer.bias.add_(layer.weight @ m)
    try:
        yield
    finally:
        with torch.no_grad():
            layer.bias.sub_(layer.weight @ m)


def read_kept_centre(path: Path, *, feature_dim: int) -> torch.Tensor | None:
    """The feature mean an earlier round of this run kept at ``path``; None if missing, unreadable or of another size."""
    if not path.is_file():
        return None
    try:
        centre = torch.load(path, weights_only=True)
        if not isinstance(centre, torch.Tensor) or centre.shape != (feature_dim,) or not bool(torch.isfinite(centre).all()):
            raise ValueError(f"not a finite vector of {feature_dim} features")
    except Exception as exc:  # a damaged file: this run trains uncentred from here on; no budget is spent again
        log.warning("%s cannot be read (%s: %s)", path.name, type(exc).__name__, str(exc)[:120])
        return None
    os.utime(path)  # a live run's file: not taken for an ended run's (state-dir clean-up)
    return centre


def keep_centre(path: Path, centre: torch.Tensor, *, stale_days: float) -> None:
    """Write the feature mean to ``path`` atomically, for the run's later rounds.

    Other runs' kept means beside it untouched for ``stale_days`` days belong to
    runs that have ended and are removed.
    """
    from common.files import atomic_path, remove_stale_siblings

    with atomic_path(path) as tmp:
        torch.save(centre.detach().cpu(), tmp)
    for stale in remove_stale_siblings(path, "*.pt", days=stale_days):
        log.info("removed %s, the feature mean of a run that ended (untouched for %g days)", stale.name, stale_days)
