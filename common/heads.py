"""Classification heads trained on backbone features: a registry of builders."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.errors import ConfigError

__all__ = ["HEADS", "build_head", "describe_head"]


def _linear(in_features: int, num_classes: int, hidden: int) -> nn.Module:
    return nn.Linear(in_features, num_classes)


def _mlp(in_features: int, num_classes: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))


# run-config 'head' -> builder(in_features, num_classes, hidden).
HEADS: dict[str, Callable[[int, int, int], nn.Module]] = {"linear": _linear, "mlp": _mlp}


def build_head(kind: str, in_features: int, num_classes: int, *, hidden: int = 256) -> nn.Module:
    """A ``linear`` head, or an ``mlp`` head with one hidden layer of ``hidden`` units."""
    if kind not in HEADS:
        raise ConfigError(f"unknown head '{kind}'; choose one of: {', '.join(HEADS)}")
    return HEADS[kind](in_features, num_classes, hidden)


def describe_head(kind: str, in_features: int, num_classes: int, *, hidden: int = 256) -> dict:
    """The head's layout, as recorded in the model manifest."""
    layout = {"kind": kind, "in_features": in_features, "num_classes": num_classes}
    if kind == "mlp":
        layout["hidden"] = hidden
    return layout
