"""Classification heads trained on backbone features."""

from __future__ import annotations

from torch import nn

from common.errors import ConfigError

__all__ = ["build_head", "describe_head"]


def build_head(kind: str, in_features: int, num_classes: int, *, hidden: int = 256) -> nn.Module:
    """A ``linear`` head, or an ``mlp`` head with one hidden layer of ``hidden`` units."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, num_classes),
        )
    raise ConfigError(f"unknown head '{kind}'; choose 'linear' or 'mlp'")


def describe_head(kind: str, in_features: int, num_classes: int, *, hidden: int = 256) -> dict:
    """The head's layout, as recorded in the model manifest."""
    layout = {"kind": kind, "in_features": in_features, "num_classes": num_classes}
    if kind == "mlp":
        layout["hidden"] = hidden
    return layout
