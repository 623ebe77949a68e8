"""Server-side evaluation of the global model on a held-out set.

The ServerApp lives for the whole run, so the held-out set's trunk outputs are
computed once, in memory, and each round evaluates only the trainable part.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from common.data_formats import read_npz
from common.errors import DataError
from common.exchange import load_arrayrecord
from common.features import extract_features
from common.metrics import classification_metrics, confusion_matrix
from common.model import SplitModel

__all__ = ["CentralEvaluator", "load_eval_arrays"]

log = logging.getLogger(__name__)


def load_eval_arrays(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8) and labels of the ``test`` split of a MedMNIST-style .npz; DataError if it has none."""
    test = read_npz(Path(path), prefixes=("test",), required=("test",))["test"]
    return test.images, test.labels


class CentralEvaluator:
    """Evaluates arrays on a held-out set whose features are computed once."""

    def __init__(self, model: SplitModel, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, source: str) -> None:
        self.model = model
        self.num_classes = num_classes
        self.labels = labels
        self.source = source
        if len(labels) and (int(labels.max()) >= num_classes or int(labels.min()) < 0):
            raise DataError(
                f"{source}: held-out labels range {int(labels.min())}..{int(labels.max())}, "
                f"outside the run's classes 0..{num_classes - 1}; check server-eval-data or 'classes'"
            )
        log.info("server: computing backbone features for %d held-out images", len(images))
        self.features = extract_features(model.trunk, model.preprocessing, images, description="held-out set")
        self.sample = images[:64].clone()  # a copy, so the full set can be freed; real inputs on which the exported model is checked against PyTorch
        self.forwards = len(images) * model.trunk_passes

    def _logits(self, arrays: ArrayRecord) -> torch.Tensor:
        load_arrayrecord(self.model.trainable, arrays)
        self.model.trainable.eval()
        with torch.no_grad():
            return torch.cat([self.model.trainable(chunk) for chunk in self.features.split(2048)])

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Metrics of ``arrays`` (the trainable part) on the held-out set."""
        return classification_metrics(self._logits(arrays), self.labels, self.num_classes)

    def confusion(self, arrays: ArrayRecord) -> list[list[int]]:
        """The held-out set's confusion matrix under ``arrays``: rows true classes, columns predictions."""
        return confusion_matrix(self._logits(arrays), self.labels, self.num_classes)
