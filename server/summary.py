"""The final figures of a run, as written to ``summary.json``, built from its round records."""

from __future__ import annotations

from typing import Any

from common.config import RunConfig
from common.model import SplitModel, trainable_parameters
from common.round_record import RoundRecord

__all__ = ["build_summary"]


def _forwards(history: list[RoundRecord]) -> tuple[dict[str, dict[str, int]], dict[str, int], int]:
    """Trunk passes by site (accepted replies only), training images by site, cache hits."""
    by_site: dict[str, dict[str, int]] = {}
    train_images: dict[str, int] = {}
    hits = 0
    for record in history:
        for name, site in record.sites.items():
            counts = by_site.setdefault(name, {"train": 0, "eval": 0})
            for key, value in site.backbone_forwards.items():
                counts[key] += value
            if site.train and site.train.accepted:
                train_images[name] = site.train.num_examples or 0
                hits += site.train.cache_hits
    return by_site, train_images, hits


def _privacy(cfg: RunConfig, history: list[RoundRecord]) -> dict[str, Any]:
    """Per site, the last reported record-level DP figures; the run's maxima; client-level DP at the server."""
    by_site: dict[str, dict[str, Any]] = {}
    for record in history:
        for name, site in record.sites.items():
            if site.train and site.train.accepted and site.train.privacy:
                p = site.train.privacy
                by_site[name] = {
                    "epsilon_run": p["epsilon_run"], "epsilon_lifetime": p["epsilon_lifetime"], "delta": p["delta"],
                    "noise_multiplier": p["event"]["noise_multiplier"], "sample_rate": p["event"]["sample_rate"],
                    "accountant": p["event"]["accountant"], "last_round": record.round,
                }
    return {
        "dp": cfg.dp,
        "target_epsilon": cfg.target_epsilon if cfg.records_dp else None,
        "target_delta": cfg.target_delta if cfg.records_dp else None,
        "max_epsilon": max((s["epsilon_run"] for s in by_site.values()), default=None),
        "max_lifetime_epsilon": max((s["epsilon_lifetime"] for s in by_site.values()), default=None),
        "by_site": by_site,
        # client-level DP: the last round's release record (settings and the run's epsilon after it)
        "central": next((r.central_privacy for r in reversed(history) if r.central_privacy), None),
    }


def build_summary(
    cfg: RunConfig,
    model: SplitModel,
    records: list[RoundRecord],
    *,
    run_name: str,
    wall_seconds: float,
    server_eval_forwards: int,
    status: str,
    error: str | None = None,
    confusion: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Final accuracy and F1, rounds, time, problems, privacy, bytes and backbone work of a run."""
    history = [r for r in records if r.round > 0]
    last = history[-1] if history else None
    central = last.central_eval if last else {}
    federated = last.federated_eval if last else {}
    final = central or federated
    head_bytes = int(sum(p.numel() * p.element_size() for _, p in trainable_parameters(model.trainable)))
    full_bytes = model.model_bytes()
    trains = [s.train for r in history for s in r.sites.values() if s.train and s.train.accepted]
    train_down = max((t.bytes_down for t in trains), default=0)
    train_up = max((t.bytes_up for t in trains), default=0)
    by_site, train_images, hits = _forwards(history)
    problems: dict[str, list[str]] = {}
    for record in history:
        for name, reasons in record.problem_sites().items():
            problems.setdefault(name, []).extend(f"round {record.round}: {reason}" for reason in reasons)
    return {
        "run_name": run_name,
        "status": status,
        "error": error,
        "problems": problems,
        "rounds_completed": sum(1 for r in history if r.aggregated_sites),
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
        # the final model on the held-out set: rows are true classes, columns predictions, in "classes" order
        "confusion_matrix": {"classes": list(cfg.class_names), "counts": confusion} if confusion else None,
        "head_sha256": last.head_sha256_after if last else None,
        "dp": cfg.dp,
        "max_epsilon": (privacy := _privacy(cfg, history))["max_epsilon"],  # record-level, at the sites
        "client_epsilon": privacy["central"]["epsilon"] if privacy["central"] else None,  # client-level, at the server
        "privacy": privacy,
        "bytes": {
            "head_parameter_bytes": head_bytes,
            "full_model_bytes": full_bytes,
            "max_train_bytes_to_site": train_down,
            "max_train_bytes_from_site": train_up,
            "fraction_of_full_model": round(max(train_down, train_up) / full_bytes, 6) if full_bytes else None,
        },
        "bytes_per_round": round(sum(r.bytes_down + r.bytes_up for r in history) / len(history)) if history else 0,
        "backbone_forwards": {
            "cache_features": cfg.cache_features,
            "by_site": by_site,
            "train_images_by_site": train_images,
            "server_eval": server_eval_forwards,
            "total": sum(c["train"] + c["eval"] for c in by_site.values()) + server_eval_forwards,
            "cache_hits": hits,
        },
    }
