"""The final figures of a run, as written to ``summary.json``."""

from __future__ import annotations

from typing import Any

from torch import nn

from common.config import RunConfig
from common.model import SplitModel, trainable_parameters
from server.round_log import RoundLog

__all__ = ["build_summary", "module_bytes"]


def module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``."""
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def build_summary(
    cfg: RunConfig,
    model: SplitModel,
    round_log: RoundLog,
    *,
    run_name: str,
    wall_seconds: float,
    server_eval_forwards: int,
    status: str,
    error: str | None = None,
) -> dict[str, Any]:
    """Final accuracy and F1, rounds, time, privacy, bytes and backbone work of a run."""
    history = [r for r in round_log.history if r["round"] > 0]
    last = history[-1] if history else {}
    central = last.get("central_eval") or {}
    federated = last.get("federated_eval") or {}
    final = central or federated
    head_bytes = int(sum(p.numel() * p.element_size() for _, p in trainable_parameters(model.trainable)))
    full_bytes = module_bytes(model.trunk) + module_bytes(model.trainable)
    per_site = [s for r in history for s in r["sites"].values()]
    train_down = max((s.get("train_bytes_down", 0) for s in per_site), default=0)
    train_up = max((s.get("train_bytes_up", 0) for s in per_site), default=0)
    train_images = {}
    for record in history:
        for site, entry in record["sites"].items():
            if entry.get("num_train_examples"):
                train_images[site] = entry["num_train_examples"]
    forwards = {site: dict(counts) for site, counts in round_log.forwards_by_site.items()}
    return {
        "run_name": run_name,
        "status": status,
        "error": error,
        "rounds_completed": sum(1 for r in history if r["aggregated_sites"]),
        "num_server_rounds": cfg.num_server_rounds,
        "wall_seconds": round(wall_seconds, 2),
        "backbone": cfg.backbone,
        "pretrained": cfg.pretrained,
        "weights_sha256": model.weights_sha256,
        "strategy": cfg.strategy,
        "evaluated_on": "held-out test set" if central else ("sites' validation splits" if federated else None),
        "accuracy": final.get("accuracy"),
        "macro_f1": final.get("f1"),
        "test": central or None,
        "federated_eval": federated or None,
        "dp": cfg.dp,
        "max_epsilon": None,
        "bytes": {
            "head_parameter_bytes": head_bytes,
            "full_model_bytes": full_bytes,
            "max_train_bytes_to_site": train_down,
            "max_train_bytes_from_site": train_up,
            "fraction_of_full_model": round(max(train_down, train_up) / full_bytes, 6) if full_bytes else None,
        },
        "bytes_per_round": round(sum(r["bytes_down"] + r["bytes_up"] for r in history) / len(history)) if history else 0,
        "backbone_forwards": {
            "cache_features": cfg.cache_features,
            "by_site": forwards,
            "train_images_by_site": train_images,
            "server_eval": server_eval_forwards,
            "total": sum(c["train"] + c["eval"] for c in forwards.values()) + server_eval_forwards,
            "cache_hits": round_log.cache_hits,
        },
    }
