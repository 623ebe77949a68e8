"""Classification metrics against hand-computed values."""

from __future__ import annotations

import math

import torch

from common.metrics import classification_metrics, weighted_mean


def test_perfect_predictions_score_one():
    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 10
    m = classification_metrics(logits, labels, 3)
    assert m["accuracy"] == m["precision"] == m["recall"] == m["f1"] == m["auroc"] == 1.0
    assert m["loss"] < 1e-3


def test_macro_scores_match_a_hand_count():
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    m = classification_metrics(logits, labels, 2)
    assert m["accuracy"] == 0.75
    assert math.isclose(m["precision"], (2 / 3 + 1) / 2)
    assert math.isclose(m["recall"], (1 + 0.5) / 2)


def test_auroc_skips_classes_absent_from_the_split():
    labels = torch.tensor([0, 1, 0, 1])
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert classification_metrics(logits, labels, 3)["auroc"] == 1.0


def test_weighted_mean_ignores_nan():
    assert weighted_mean([1.0, float("nan"), 3.0], [1, 5, 3]) == 2.5
