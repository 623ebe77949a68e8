"""What the server writes into a run's signed audit log (``runs/<name>/audit.jsonl``).

One :class:`AuditTrail` per run: a ``run-start`` record (the run's identity,
config hash, versions, backbone, classes, DP settings, the server's public
key and the initial head's hash), then per closed round one ``problem``
record for each node that failed, refused, was rejected or went missing and
one ``round`` record (the typed round record and the aggregation: rule,
weights used, client-level DP release), and a ``run-end`` record. The
server's Ed25519 key lives outside the run folder, in
``$FEDHEAD_HOME/keys/server-audit.pem``; its public half is in the run-start
record and in ``server.pub``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.audit_log import AUDIT_FILE, SERVER_PUB_FILE, AuditWriter
from common.config import RunConfig
from common.files import write_bytes_atomic
from common.hashing import sha256_json
from common.paths import fedhead_home
from common.round_record import RoundRecord
from common.signing import load_or_create_key, public_hex, public_pem

__all__ = ["AuditTrail", "server_key_path", "SERVER_PUB_FILE"]

log = logging.getLogger(__name__)

_WEIGHTED = ("fedavg", "fedprox", "fedadam", "fedyogi")  # strategies that average updates weighted by examples


def server_key_path() -> Path:
    """Where the server's audit-signing key lives: outside every run folder."""
    return fedhead_home() / "keys" / "server-audit.pem"


def dp_settings(cfg: RunConfig, central: dict[str, Any] | None = None) -> dict[str, Any]:
    """The privacy the run declares: modes, budgets and mechanisms (what the verifier holds epsilons against).

    ``central``: client-level DP's settings (``CentralDP.settings()``), whose
    ``planned_epsilon`` is the client-level budget, declared before any round.
    """
    return {
        "dp": cfg.dp,
        "target_epsilon": cfg.target_epsilon if cfg.dp != "none" else None,
        "target_delta": cfg.target_delta if cfg.dp != "none" else None,
        "accountant": cfg.accountant if cfg.records_dp else None,
        "max_grad_norm": cfg.max_grad_norm if cfg.records_dp else None,
        "dp_sample_rate": cfg.dp_sample_rate if cfg.records_dp else None,
        "central": central,
    }


def aggregation_weights(cfg: RunConfig, record: RoundRecord) -> dict[str, float] | None:
    """Each aggregated site's weight in the new head (None for the robust rules, which do not average)."""
    sites = [record.sites[name] for name in record.aggregated_sites if name in record.sites]
    if not sites or cfg.strategy not in _WEIGHTED:
        return None
    if cfg.central_dp:
        return {s.site: 1 / len(sites) for s in sites}
    total = sum(s.train.num_examples or 0 for s in sites if s.train)
    return {s.site: (s.train.num_examples or 0) / total for s in sites if s.train} if total else None


class AuditTrail:
    """The run's audit log: signed by the server, one record per event, on disk when written."""

    def __init__(self, run_folder: Path, cfg: RunConfig, *, run_id: str, enrolled_keys: dict[str, str] | None = None) -> None:
        key = load_or_create_key(server_key_path())
        self.cfg = cfg
        self.enrolled_keys = dict(enrolled_keys or {})  # site -> the node key the SuperLink authenticates it by
        self.public_key = public_hex(key)
        self.writer = AuditWriter(run_folder / AUDIT_FILE, key, run_id)  # refuses a folder that already has a log
        write_bytes_atomic(run_folder / SERVER_PUB_FILE, public_pem(key))

    def start(
        self, *, versions: dict[str, Any], weights_sha256: str, head_sha256: str, central: dict[str, Any] | None = None
    ) -> None:
        """The run-start record (``central``: client-level DP's settings, if on)."""
        cfg = self.cfg
        self.writer.append("run-start", {
            "run_name": cfg.run_name,
            "config_sha256": sha256_json(cfg.to_run_config()),
            "config": cfg.to_run_config(),
            "versions": versions,
            "backbone": cfg.backbone,
            "weights_sha256": weights_sha256,
            "classes": list(cfg.class_names),
            "strategy": cfg.strategy,
            "num_server_rounds": cfg.num_server_rounds,
            "privacy": dp_settings(cfg, central),
            "server_public_key": self.public_key,
            "enrolled_site_keys": self.enrolled_keys,
            "initial_head_sha256": head_sha256,
        })

    def __call__(self, record: RoundRecord) -> None:
        """A round sink: its problems, then the round."""
        for p in record.problems:
            self.writer.append("problem", {"round": record.round, "node_id": p.node_id, "site": p.site,
                                           "phase": p.phase, "kind": p.kind, "reasons": p.reasons})
        self.writer.append("round", {
            "record": record.to_json(),
            "aggregation": {
                "strategy": self.cfg.strategy,
                "weights": aggregation_weights(self.cfg, record),
                "central_dp": record.central_privacy,
            },
        })

    def end(self, summary: dict[str, Any], *, saved_head_sha256: str | None, model_files: dict[str, str] | None = None) -> None:
        """The run-end record: how it ended, the final and the saved head's hashes, the exported files' hashes
        (``model_files``: file name in model/ -> sha256), the privacy spent."""
        self.writer.append("run-end", {
            "model_files": model_files or {},
            "status": summary.get("status"),
            "error": summary.get("error"),
            "rounds_completed": summary.get("rounds_completed"),
            "head_sha256": summary.get("head_sha256"),
            "saved_head_sha256": saved_head_sha256,
            "accuracy": summary.get("accuracy"),
            "max_epsilon": summary.get("max_epsilon"),
            "client_epsilon": summary.get("client_epsilon"),
            "confusion_matrix": summary.get("confusion_matrix"),
        })
