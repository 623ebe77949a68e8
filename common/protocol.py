"""The wire protocol between the server and its sites, as typed code.

Record names and keys are defined here once and used by both sides. The
server sends :func:`build_instruction_config` and a site reads the request
with :func:`parse_instruction`; a site builds its reply with
:func:`build_train_content` / :func:`build_evaluate_content` from the typed
:class:`TrainMetrics` / :class:`EvaluateMetrics` and :class:`SiteInfo`. The
server parses replies with :mod:`common.replies`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.errors import ReplyError
from common.hashing import canonical_json
from common.privacy import DPEvent, PrivacyError

__all__ = [
    "ARRAYS_RECORD",
    "CONFIG_RECORD",
    "METRICS_RECORD",
    "SITE_RECORD",
    "PRIVACY_RECORD",
    "RECEIPT_RECORD",
    "CLASS_RECALL_RECORD",
    "PrivacyReport",
    "Receipt",
    "receipt_payload",
    "SERVER_ROUND",
    "BACKBONE_SHA256",
    "PROXIMAL_MU",
    "SITE_NAME",
    "SKIPPED_IMAGES",
    "metric_keys",
    "short_repr",
    "SiteInfo",
    "TrainMetrics",
    "EvaluateMetrics",
    "Instruction",
    "build_instruction_config",
    "parse_instruction",
    "build_train_content",
    "build_evaluate_content",
]

# Record names inside a message's RecordDict.
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"
PRIVACY_RECORD = "privacy"
RECEIPT_RECORD = "receipt"
CLASS_RECALL_RECORD = "class-recall"  # an evaluate reply's recall per class: class index (decimal) -> recall

# ConfigRecord keys the server sends. Flower's strategies set SERVER_ROUND
# themselves and FedProx sets PROXIMAL_MU.
SERVER_ROUND = "server-round"
BACKBONE_SHA256 = "backbone-sha256"
PROXIMAL_MU = "proximal-mu"

# Site record keys.
SITE_NAME = "site-name"
SKIPPED_IMAGES = "skipped-images"

# Receipt record keys: the site's Ed25519 public key and its signature of receipt_payload(...).
PUBLIC_KEY = "public-key"
SIGNATURE = "signature"

_FOREVER = 1e9  # an upper bound for counts of seconds and passes that never binds


@dataclass(frozen=True)
class SiteInfo:
    """Who replied and with which backbone (the SITE_RECORD)."""

    name: str
    backbone_sha256: str
    skipped_images: int = 0

    def to_record(self) -> ConfigRecord:
        """This info as the ConfigRecord a reply carries."""
        return ConfigRecord(
            {SITE_NAME: self.name, BACKBONE_SHA256: self.backbone_sha256, SKIPPED_IMAGES: self.skipped_images}
        )


def _key(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name.replace("_", "-"))


def _metric(low: float, high: float | None = None, *, key: str | None = None, optional: bool = False):
    """A metric field: its range (``high=None`` means the run's example cap) and wire key."""
    meta = {"low": low, "high": high, "optional": optional}
    if key:
        meta["key"] = key
    return dataclasses.field(default=None if optional else dataclasses.MISSING, metadata=meta)


@dataclass(frozen=True)
class TrainMetrics:
    """The numbers a site reports after training (the METRICS_RECORD of a train reply)."""

    num_examples: int = _metric(1)
    epochs_run: int = _metric(0, 100_000)
    backbone_forwards_train: int = _metric(0, _FOREVER)
    backbone_forwards_eval: int = _metric(0, _FOREVER)
    cache_hits: int = _metric(0, 1_000_000)
    seconds: float = _metric(0.0, _FOREVER)
    train_loss: float | None = _metric(0.0, _FOREVER, optional=True)  # absent under record-level DP


@dataclass(frozen=True)
class EvaluateMetrics:
    """The numbers a site reports after evaluating; scores are absent when it has no examples."""

    num_examples: int = _metric(0)
    backbone_forwards_eval: int = _metric(0, _FOREVER)
    loss: float | None = _metric(0.0, _FOREVER, key="eval-loss", optional=True)
    accuracy: float | None = _metric(0.0, 1.0, key="eval-accuracy", optional=True)
    precision: float | None = _metric(0.0, 1.0, key="eval-precision", optional=True)
    recall: float | None = _metric(0.0, 1.0, key="eval-recall", optional=True)
    f1: float | None = _metric(0.0, 1.0, key="eval-f1", optional=True)
    auroc: float | None = _metric(0.0, 1.0, key="eval-auroc", optional=True)

    def scores(self) -> dict[str, float]:
        """The classification scores present, by metric name (loss, accuracy, ...)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["optional"] and getattr(self, f.name) is not None
        }


def metric_keys(cls: type) -> dict[str, dataclasses.Field]:
    """Wire key -> field of a metrics dataclass (its range and whether it may be absent in ``metadata``)."""
    return {_key(f): f for f in dataclasses.fields(cls)}


def _to_metric_record(metrics: TrainMetrics | EvaluateMetrics) -> MetricRecord:
    values = {}
    for f in dataclasses.fields(metrics):
        value = getattr(metrics, f.name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue  # undefined (e.g. AUROC with one class present): omitted, never NaN on the wire
        values[_key(f)] = value
    return MetricRecord(values)


def short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class PrivacyReport:
    """A site's record-level DP for one round: the events it ran and what it has spent.

    ``event`` is the round's DP-SGD. ``release`` is the run's Gaussian release
    of the site's feature mean (run-config ``centre-features``: sample rate 1,
    one step, clip norm and noise of its own), carried by every reply from the
    round that made it on, so that a lost reply hides nothing: it counts once
    per site and run. ``epsilon_run`` composes this run's events at this site;
    ``epsilon_lifetime`` every event on the same data in the site's ledger,
    across runs.
    """

    event: DPEvent
    delta: float
    epsilon_run: float
    epsilon_lifetime: float
    release: DPEvent | None = None

    _KEYS = ("noise-multiplier", "sample-rate", "steps", "max-grad-norm", "accountant", "delta", "epsilon-run", "epsilon-lifetime")
    _RELEASE_KEYS = ("feature-mean-noise-multiplier", "feature-mean-clip-norm")

    def to_record(self) -> ConfigRecord:
        """The PRIVACY_RECORD a train reply carries."""
        e = self.event
        record = dict(zip(self._KEYS, (
            float(e.noise_multiplier), float(e.sample_rate), int(e.steps), float(e.max_grad_norm), e.accountant,
            float(self.delta), float(self.epsilon_run), float(self.epsilon_lifetime),
        )))
        if self.release is not None:
            record.update(zip(self._RELEASE_KEYS, (float(self.release.noise_multiplier), float(self.release.max_grad_norm))))
        return ConfigRecord(record)

    @classmethod
    def from_record(cls, record: ConfigRecord, problems: list[str]) -> "PrivacyReport | None":
        """Parse a PRIVACY_RECORD; append every problem to ``problems`` and return None on any."""
        before = len(problems)
        optional = set(cls._RELEASE_KEYS) if set(cls._RELEASE_KEYS) <= set(record) else set()
        extra, missing = sorted(set(record) - set(cls._KEYS) - optional), sorted(set(cls._KEYS) - set(record))
        if extra or missing:
            problems.append(f"privacy record keys differ: missing {missing}, unexpected {extra}")
            return None
        numbers = {}
        for key in ("delta", "epsilon-run", "epsilon-lifetime"):
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"privacy '{key}' must be a finite number >= 0, got {short_repr(value)}")
            else:
                numbers[key] = float(value)
        if "delta" in numbers and not 0 < numbers["delta"] < 1:
            problems.append(f"privacy 'delta' = {numbers['delta']} is outside (0, 1)")
        try:
            event = DPEvent(
                noise_multiplier=record["noise-multiplier"], sample_rate=record["sample-rate"],
                steps=record["steps"], max_grad_norm=record["max-grad-norm"], accountant=record["accountant"],
            )
            release = None if not optional else DPEvent(
                noise_multiplier=record["feature-mean-noise-multiplier"], sample_rate=1.0, steps=1,
                max_grad_norm=record["feature-mean-clip-norm"], accountant=record["accountant"],
            )
        except (PrivacyError, TypeError) as exc:
            problems.append(str(exc))
            return None
        if len(problems) > before:
            return None
        return cls(event, numbers["delta"], numbers["epsilon-run"], numbers["epsilon-lifetime"], release)

    def to_json(self) -> dict:
        """As stored in a round record (``feature_mean_release`` from the round that made it on)."""
        stored = {"event": self.event.to_json(), "delta": self.delta, "epsilon_run": self.epsilon_run,
                  "epsilon_lifetime": self.epsilon_lifetime}
        return stored if self.release is None else {**stored, "feature_mean_release": self.release.to_json()}


def receipt_payload(
    *, run_id: str, server_round: int, site: str, update_sha256: str, num_examples: int, privacy: dict | None
) -> bytes:
    """The bytes a site signs for each train reply, and the server's log lets anyone recompute.

    What the site vouches for: that in this run and round it sent this update
    (its parameter-set sha256), for this many examples, with this DP event and
    these epsilons (``PrivacyReport.to_json()``, or None without record-level DP).
    """
    return canonical_json({
        "kind": "fedhead-train-receipt", "run_id": str(run_id), "round": int(server_round), "site": site,
        "update_sha256": update_sha256, "num_examples": int(num_examples), "privacy": privacy,
    })


@dataclass(frozen=True)
class Receipt:
    """A site's signature of its train reply (the RECEIPT_RECORD)."""

    public_key: str
    signature: str

    def to_record(self) -> ConfigRecord:
        """The RECEIPT_RECORD a train reply carries."""
        return ConfigRecord({PUBLIC_KEY: self.public_key, SIGNATURE: self.signature})

    @classmethod
    def from_record(cls, record: ConfigRecord, problems: list[str]) -> "Receipt | None":
        """Parse a RECEIPT_RECORD (its form only: the signature is checked against the reply it came with)."""
        key, signature = record.get(PUBLIC_KEY), record.get(SIGNATURE)
        extra = sorted(set(record) - {PUBLIC_KEY, SIGNATURE})
        if extra or not _is_hex(key, 64) or not _is_hex(signature, 128):
            problems.append(
                f"the receipt record must hold '{PUBLIC_KEY}' (64 hex digits) and '{SIGNATURE}' (128 hex digits) only"
            )
            return None
        return cls(str(key), str(signature))

    def to_json(self) -> dict:
        """As stored in a round record."""
        return {"public_key": self.public_key, "signature": self.signature}


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Instruction:
    """What the server asks of a site in one message, parsed on the site."""

    server_round: int
    backbone_sha256: str
    proximal_mu: float
    arrays: ArrayRecord


def build_instruction_config(backbone_sha256: str) -> ConfigRecord:
    """The CONFIG_RECORD the server sends with every train and evaluate message."""
    return ConfigRecord({BACKBONE_SHA256: backbone_sha256})


def parse_instruction(msg: Message) -> Instruction:
    """The server's request, checked: its round, backbone hash, FedProx mu and arrays."""
    content = msg.content
    problems = []
    if CONFIG_RECORD not in content.config_records:
        raise ReplyError(["the server's message has no config record"])
    config = content.config_records[CONFIG_RECORD]
    server_round = config.get(SERVER_ROUND, 0)
    backbone = config.get(BACKBONE_SHA256)
    mu = config.get(PROXIMAL_MU, 0.0)
    if not isinstance(server_round, int) or server_round < 0:
        problems.append(f"'{SERVER_ROUND}' must be a non-negative integer, got {short_repr(server_round)}")
    if not isinstance(backbone, str) or not backbone:
        problems.append(f"the server's message lacks '{BACKBONE_SHA256}'")
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        problems.append(f"'{PROXIMAL_MU}' must be a finite number >= 0, got {short_repr(mu)}")
    if ARRAYS_RECORD not in content.array_records:
        problems.append("the server's message carries no parameters")
    if problems:
        raise ReplyError(problems)
    return Instruction(int(server_round), str(backbone), float(mu), content.array_records[ARRAYS_RECORD])


def build_train_content(
    arrays: ArrayRecord, metrics: TrainMetrics, site: SiteInfo, privacy: PrivacyReport | None = None
) -> RecordDict:
    """A site's train reply: the trainable parameters, its numbers, who it is, and its DP event if any."""
    content = {ARRAYS_RECORD: arrays, METRICS_RECORD: _to_metric_record(metrics), SITE_RECORD: site.to_record()}
    if privacy is not None:
        content[PRIVACY_RECORD] = privacy.to_record()
    return RecordDict(content)


def build_evaluate_content(metrics: EvaluateMetrics, site: SiteInfo, class_recall: dict[int, float] | None = None) -> RecordDict:
    """A site's evaluate reply: its numbers, who it is and, when it has examples, its recall per class present."""
    content = {METRICS_RECORD: _to_metric_record(metrics), SITE_RECORD: site.to_record()}
    if class_recall:
        content[CLASS_RECALL_RECORD] = MetricRecord({str(c): float(r) for c, r in sorted(class_recall.items())})
    return RecordDict(content)
