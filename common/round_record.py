"""One typed record per round: everything that happened in it.

A :class:`RoundRecord` is built by the server's recorder (owned by the strategy
wrapper) and is the single source of ``metrics.jsonl``, ``summary.json``, the
plots and the CLI's tables; the DP events and the audit log extend it. It
round-trips through JSON exactly (:meth:`RoundRecord.to_json` /
:meth:`RoundRecord.from_json`), so readers of ``metrics.jsonl`` get the same
typed object back instead of reaching into dictionaries by string key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.errors import DataError

__all__ = [
    "SiteTrain",
    "SiteEvaluate",
    "SiteRound",
    "NodeProblem",
    "RoundRecord",
    "load_round_records",
    "RUN_STATUSES",
]

# How a run ended (summary.json "status"), most to least successful.
RUN_STATUSES = ("finished", "degraded", "interrupted", "failed")

Phase = Literal["train", "evaluate"]
ProblemKind = Literal["failed", "rejected", "refused", "missing"]


@dataclass
class SiteTrain:
    """One site's train reply in a round, accepted or not."""

    accepted: bool
    bytes_down: int = 0
    bytes_up: int = 0
    num_examples: int | None = None
    train_loss: float | None = None
    epochs_run: int | None = None
    seconds: float | None = None
    cache_hits: int = 0
    backbone_forwards_train: int = 0
    backbone_forwards_eval: int = 0
    skipped_images: int = 0
    update_sha256: str | None = None
    update_l2_norm: float | None = None
    # record-level DP: {"event": {noise_multiplier, sample_rate, steps, max_grad_norm, accountant},
    # "delta", "epsilon_run", "epsilon_lifetime"}, and "feature_mean_release" (an event of the same form,
    # counted once a run) from the round a site released its feature mean on (common.protocol.PrivacyReport.to_json)
    privacy: dict[str, Any] | None = None
    # the site's signature of this reply: {"public_key", "signature"} over common.protocol.receipt_payload
    receipt: dict[str, str] | None = None


@dataclass
class SiteEvaluate:
    """One site's evaluate reply in a round, accepted or not."""

    accepted: bool
    bytes_down: int = 0
    bytes_up: int = 0
    num_examples: int | None = None
    backbone_forwards_eval: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    class_recall: dict[str, float] = field(default_factory=dict)  # class index (as text, for JSON) -> recall


@dataclass
class SiteRound:
    """What one site did in one round."""

    site: str
    node_id: int
    train: SiteTrain | None = None
    evaluate: SiteEvaluate | None = None

    @property
    def backbone_forwards(self) -> dict[str, int]:
        """Trunk passes this round in accepted replies only: a rejected reply counts for nothing."""
        train = self.train if self.train and self.train.accepted else None
        evaluate = self.evaluate if self.evaluate and self.evaluate.accepted else None
        return {
            "train": train.backbone_forwards_train if train else 0,
            "eval": (train.backbone_forwards_eval if train else 0) + (evaluate.backbone_forwards_eval if evaluate else 0),
        }


@dataclass
class NodeProblem:
    """A sampled node that failed, refused by its own privacy policy, whose reply was rejected, or that never answered."""

    node_id: int
    site: str
    phase: Phase
    kind: ProblemKind
    reasons: list[str]


@dataclass
class RoundRecord:
    """Everything that happened in one round (round 0: the initial model's evaluation)."""

    round: int
    wall_seconds: float = 0.0
    strategy: str = ""
    sampled_nodes: list[int] = field(default_factory=list)
    evaluate_nodes: list[int] = field(default_factory=list)
    sites: dict[str, SiteRound] = field(default_factory=dict)
    problems: list[NodeProblem] = field(default_factory=list)
    aggregated_sites: list[str] = field(default_factory=list)
    head_sha256_before: str | None = None
    head_sha256_after: str | None = None
    federated_eval: dict[str, float] = field(default_factory=dict)
    central_eval: dict[str, float] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    # client-level DP at the server: settings, whether this round released a noised aggregate, and the run's
    # epsilon after it (server.central_dp.CentralDP.round_report)
    central_privacy: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """True when every sampled node took part and nothing was rejected or missing."""
        return not self.problems

    def problem_sites(self) -> dict[str, list[str]]:
        """Site (or node) name -> the reasons it did not take part fully this round."""
        out: dict[str, list[str]] = {}
        for p in self.problems:
            out.setdefault(p.site, []).extend(f"{p.phase} {p.kind}: {r}" for r in p.reasons)
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become null)."""
        return _clean(asdict(self))

    def to_line(self) -> str:
        """One ``metrics.jsonl`` line."""
        return json.dumps(self.to_json(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RoundRecord":
        """The record that :meth:`to_json` wrote."""
        values = dict(data)
        values["sites"] = {
            name: SiteRound(
                site=s["site"],
                node_id=s["node_id"],
                train=SiteTrain(**s["train"]) if s.get("train") else None,
                evaluate=SiteEvaluate(**s["evaluate"]) if s.get("evaluate") else None,
            )
            for name, s in data.get("sites", {}).items()
        }
        values["problems"] = [NodeProblem(**p) for p in data.get("problems", [])]
        values["federated_eval"] = {k: v for k, v in (data.get("federated_eval") or {}).items() if v is not None}
        values["central_eval"] = {k: v for k, v in (data.get("central_eval") or {}).items() if v is not None}
        return cls(**values)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def load_round_records(path: str | Path) -> list[RoundRecord]:
    """Every record of a ``metrics.jsonl`` file, in order (an absent file gives none).

    A torn last line (a writer killed mid-line) is left out; any other line that
    is not a round record is a DataError naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(RoundRecord.from_json(json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise DataError(f"{path} line {number} is not JSON ({exc.msg}); the file is damaged") from None
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path} line {number} is no round record ({type(exc).__name__}: {exc})") from None
    return records
