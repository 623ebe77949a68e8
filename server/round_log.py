"""What happened in each round: who was asked, who answered, what they reported.

One JSON object per round goes to ``metrics.jsonl`` when the round ends; the
running totals feed ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

from common.metrics import METRIC_NAMES, weighted_mean

__all__ = ["RoundLog"]

log = logging.getLogger(__name__)


def short_reason(reason: str, limit: int = 400) -> str:
    """The informative tail of a failure reason (Flower wraps the site's exception in a traceback)."""
    text = reason.split("Message:", 1)[-1] if "Message:" in reason else reason
    text = " ".join(text.replace("\x1b", "").split()).strip(" '>")
    return text if len(text) <= limit else "..." + text[-limit:]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


@dataclass
class _Round:
    sent: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_site: dict[int, str] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)


class RoundLog:
    """Collects a run's rounds and appends each finished one to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rounds: dict[int, _Round] = defaultdict(_Round)
        self.history: list[dict[str, Any]] = []
        self.forwards_by_site: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "eval": 0})
        self.cache_hits = 0

    def sent(self, server_round: int, phase: str, bytes_by_node: dict[int, int]) -> None:
        """Record the messages sent in ``phase`` ("train" or "evaluate")."""
        self.rounds[server_round].sent[phase].update(bytes_by_node)

    def received(self, server_round: int, phase: str, msg: Message, site: str, nbytes: int, problems: list[str]) -> None:
        """Record one reply, accepted (no problems) or rejected."""
        rnd = self.rounds[server_round]
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            rnd.failed.append({"node_id": node_id, "phase": phase, "reason": short_reason(msg.error.reason)})
            return
        if node_id in rnd.node_site:
            site = rnd.node_site[node_id]
        elif site in rnd.sites:  # two nodes claim one name: keep both, told apart by node id
            site = f"{site}@{node_id}"
        rnd.node_site[node_id] = site
        entry = rnd.sites.setdefault(site, {"node_id": node_id})
        entry[f"{phase}_bytes_down"] = rnd.sent[phase].get(node_id, 0)
        entry[f"{phase}_bytes_up"] = nbytes
        entry[f"{phase}_accepted"] = not problems
        if problems:
            entry[f"{phase}_problems"] = problems
        metrics = dict(msg.content["metrics"]) if "metrics" in msg.content.metric_records else {}
        if phase == "train":
            entry["num_train_examples"] = metrics.get("num-examples")
            for key in ("train-loss", "epochs-run", "seconds", "cache-hits"):
                if key in metrics:
                    entry[key.replace("-", "_")] = metrics[key]
        else:
            entry["num_eval_examples"] = metrics.get("num-examples")
            entry["eval"] = {name: metrics.get(f"eval-{name}") for name in METRIC_NAMES}
        forwards = self.forwards_by_site[site]
        forwards["train"] += int(metrics.get("backbone-forwards-train", 0))
        forwards["eval"] += int(metrics.get("backbone-forwards-eval", 0))
        self.cache_hits += int(metrics.get("cache-hits", 0))
        entry["backbone_forwards"] = entry.get("backbone_forwards", 0) + int(
            metrics.get("backbone-forwards-train", 0)
        ) + int(metrics.get("backbone-forwards-eval", 0))

    def finish_round(self, server_round: int, central: dict[str, float] | None, wall_seconds: float) -> dict[str, Any]:
        """Close a round: aggregate, append its line to metrics.jsonl, log a table row."""
        rnd = self.rounds.pop(server_round, _Round())
        sampled = sorted(set(rnd.sent["train"]) | set(rnd.sent["evaluate"]))
        answered = set(rnd.node_site) | {f["node_id"] for f in rnd.failed}
        evaluated = [s for s in rnd.sites.values() if s.get("evaluate_accepted") and s.get("eval")]
        weights = [float(s.get("num_eval_examples") or 0) for s in evaluated]
        aggregate = {
            name: weighted_mean([float(s["eval"][name]) if s["eval"][name] is not None else float("nan") for s in evaluated], weights)
            for name in METRIC_NAMES
        } if evaluated else {}
        train_accepted = [name for name, s in rnd.sites.items() if s.get("train_accepted")]
        rejected = {name: s["train_problems"] for name, s in rnd.sites.items() if s.get("train_problems")}
        bytes_down = sum(rnd.sent["train"].values()) + sum(rnd.sent["evaluate"].values())
        bytes_up = sum(s.get("train_bytes_up", 0) + s.get("evaluate_bytes_up", 0) for s in rnd.sites.values())
        record = _clean(
            {
                "round": server_round,
                "wall_seconds": round(wall_seconds, 3),
                "sampled_nodes": sampled,
                "missing_nodes": sorted(set(sampled) - answered),
                "failed": rnd.failed,
                "aggregated_sites": sorted(train_accepted),
                "rejected_sites": rejected,
                "federated_eval": aggregate,
                "central_eval": central,
                "bytes_down": bytes_down,
                "bytes_up": bytes_up,
                "sites": rnd.sites,
            }
        )
        if server_round > 0 or central:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
            self.history.append(record)
            self._log_row(record)
        return record

    @staticmethod
    def _log_row(record: dict[str, Any]) -> None:
        fed = record["federated_eval"] or {}
        central = record["central_eval"] or {}

        def pct(value: Any) -> str:
            return f"{100 * value:6.2f}%" if isinstance(value, (int, float)) else "     - "

        if record["round"] == 0:
            log.info("round |  sites | site-val acc | test acc | test loss |  bytes/round")
        log.info(
            "%5d | %2d of %d | %12s | %8s | %9s | %12s",
            record["round"],
            len(record["aggregated_sites"]),
            len(record["sampled_nodes"]),
            pct(fed.get("accuracy")),
            pct(central.get("accuracy")),
            f"{central['loss']:.4f}" if isinstance(central.get("loss"), float) else "-",
            f"{record['bytes_down'] + record['bytes_up']:,}",
        )
