"""Server-side evaluation of the global model on a held-out set.

The ServerApp lives for the whole run, so the held-out set's trunk outputs are
computed once, in memory, and each round evaluates only the trainable part.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.errors import DataError
from common.exchange import load_arrayrecord
from common.features import extract_features
from common.metrics import classification_metrics
from common.model import SplitModel

__all__ = ["CentralEvaluator", "load_eval_arrays"]

log = logging.getLogger(__name__)


def load_eval_arrays(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8) and labels from an .npz with ``test_images``/``test_labels``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "test_images" not in data or "test_labels" not in data:
                raise DataError(f"{path} must hold 'test_images' and 'test_labels' arrays; it has {sorted(data.files)}")
            images, labels = data["test_images"], np.asarray(data["test_labels"]).reshape(-1)
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read held-out set '{path}': {exc}") from exc
    if images.dtype != np.uint8 or len(images) != len(labels):
        raise DataError(f"{path}: expected uint8 test_images with one label each, got {images.dtype} x {len(images)}, {len(labels)} labels")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class CentralEvaluator:
    """Evaluates arrays on a held-out set whose features are computed once."""

    def __init__(self, model: SplitModel, path: str | Path, num_classes: int) -> None:
        self.model = model
        self.num_classes = num_classes
        images, self.labels = load_eval_arrays(path)
        if len(self.labels) and (int(self.labels.max()) >= num_classes or int(self.labels.min()) < 0):
            raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
        log.info("server: computing backbone features for %d held-out images", len(images))
        self.features = extract_features(model.trunk, model.preprocessing, images, description="held-out set")
        self.forwards = len(images)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Metrics of ``arrays`` (the trainable part) on the held-out set."""
        load_arrayrecord(self.model.trainable, arrays)
        self.model.trainable.eval()
        with torch.no_grad():
            logits = torch.cat([self.model.trainable(chunk) for chunk in self.features.split(2048)])
        return classification_metrics(logits, self.labels, self.num_classes)
