"""Local training and evaluation of the trainable part on a site's features."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from client.feature_source import FeatureSource
from common.config import RunConfig
from common.metrics import classification_metrics, confusion_matrix, recall_by_class
from common.model import trainable_parameters

__all__ = ["TrainReport", "build_optimizer", "train_locally", "evaluate_locally", "evaluate_with_class_recall"]

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What one round of local training did."""

    num_examples: int
    epochs_run: int
    train_loss: float
    val_loss: float


def build_optimizer(trainable: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """An optimizer over exactly the trainable set: the head at ``lr``, open stages scaled."""
    named = trainable_parameters(trainable)
    head = [p for name, p in named if name.startswith("head.")]
    stages = [p for name, p in named if not name.startswith("head.")]
    groups = [{"params": head, "lr": cfg.lr}]
    if stages:
        groups.append({"params": stages, "lr": cfg.lr * cfg.backbone_lr_scale})
    log.debug(
        "optimizer over %d head and %d backbone parameters",
        sum(p.numel() for p in head),
        sum(p.numel() for p in stages),
    )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def _predict(trainable: nn.Module, source: FeatureSource, batch_size: int = 1024) -> torch.Tensor:
    trainable.eval()
    outputs = []
    for start in range(0, len(source), batch_size):
        index = torch.arange(start, min(len(source), start + batch_size))
        outputs.append(trainable(source.get(index)).cpu())
    return torch.cat(outputs)


def evaluate_locally(trainable: nn.Module, source: FeatureSource, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Loss, accuracy, precision, recall, F1 and AUROC of ``trainable`` on ``source``."""
    return evaluate_with_class_recall(trainable, source, labels, num_classes)[0]


def evaluate_with_class_recall(
    trainable: nn.Module, source: FeatureSource, labels: torch.Tensor, num_classes: int
) -> tuple[dict[str, float], dict[int, float]]:
    """:func:`evaluate_locally`'s scores and the recall of each class present in ``labels``, from one pass."""
    logits = _predict(trainable, source) if len(source) else torch.empty(0, num_classes)
    return classification_metrics(logits, labels, num_classes), recall_by_class(confusion_matrix(logits, labels, num_classes))


def train_locally(
    trainable: nn.Module,
    train: FeatureSource,
    train_labels: torch.Tensor,
    val: FeatureSource,
    val_labels: torch.Tensor,
    cfg: RunConfig,
    *,
    server_round: int,
    proximal_mu: float = 0.0,
) -> TrainReport:
    """Train for ``local-epochs`` (early-stopping on validation loss when patience > 0).

    Each epoch every example is seen once, in one of its cached views chosen at
    random. Training runs where ``trainable`` and ``train``'s features are (a
    GPU or the CPU). With ``proximal_mu`` > 0 the FedProx term pulls towards the
    parameters received from the server.
    """
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + server_round)
    optimizer = build_optimizer(trainable, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    global_params = [p.detach().clone() for _, p in trainable_parameters(trainable)] if proximal_mu > 0 else []
    best_val, best_state, stale = math.inf, None, 0
    n = len(train)
    train_loss, val_loss, epochs_run = float("nan"), float("nan"), 0
    for epoch in range(cfg.local_epochs):
        trainable.train()
        order = torch.randperm(n, generator=generator)
        views = torch.randint(0, train.num_views, (n,), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            inputs = train.get(index, views[index])
            loss = criterion(trainable(inputs), train_labels[index].to(inputs.device))
            if proximal_mu > 0:
                prox = sum(((p - g) ** 2).sum() for (_, p), g in zip(trainable_parameters(trainable), global_params))
                loss = loss + proximal_mu / 2 * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
            seen += len(index)
        train_loss = total / max(seen, 1)
        epochs_run = epoch + 1
        if cfg.early_stopping_patience and len(val):
            val_loss = evaluate_locally(trainable, val, val_labels, cfg.num_classes)["loss"]
            if val_loss < best_val - 1e-6:
                best_val, stale = val_loss, 0
                best_state = copy.deepcopy(trainable.state_dict())
            else:
                stale += 1
                if stale >= cfg.early_stopping_patience:
                    log.info("early stop after epoch %d: val loss has not improved for %d epochs", epochs_run, stale)
                    break
    if best_state is not None:
        trainable.load_state_dict(best_state)
        val_loss = best_val
    return TrainReport(num_examples=n, epochs_run=epochs_run, train_loss=train_loss, val_loss=val_loss)
