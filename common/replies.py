"""Parsing a site's reply, once, at receipt: the server's side of :mod:`common.protocol`.

:func:`parse_train_reply` / :func:`parse_evaluate_reply` turn a Flower message
into a frozen :class:`TrainReply` / :class:`EvaluateReply`, or raise
:class:`~common.errors.ReplyError` carrying every problem found (a
:class:`~common.errors.SiteFailedError` for an error reply). Nothing unparsed
is used anywhere else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.errors import ReplyError, SiteFailedError
from common.exchange import Layout, validate_arrays
from common.hashing import sha256_arrays
from common.protocol import (
    ARRAYS_RECORD,
    BACKBONE_SHA256,
    CLASS_RECALL_RECORD,
    METRICS_RECORD,
    PRIVACY_RECORD,
    RECEIPT_RECORD,
    SITE_NAME,
    SITE_RECORD,
    SKIPPED_IMAGES,
    EvaluateMetrics,
    PrivacyReport,
    Receipt,
    SiteInfo,
    TrainMetrics,
    metric_keys,
    receipt_payload,
    short_repr,
)
from common.signing import verify_hex

__all__ = ["TrainReply", "EvaluateReply", "parse_train_reply", "parse_evaluate_reply", "update_l2_norm", "claimed_site_name"]


def _parse_metrics(cls: type, record: MetricRecord, max_examples: int, problems: list[str]):
    """Build ``cls`` from ``record``: exact keys, right types, finite, in range."""
    fields = metric_keys(cls)
    for key in sorted(set(record) - set(fields)):
        problems.append(f"unexpected metric '{key}'")
    values, ok = {}, True
    for key, f in fields.items():
        if key not in record:
            if not f.metadata["optional"]:
                problems.append(f"metric '{key}' is missing")
                ok = False
            continue
        value, integer = record[key], "int" in str(f.type) and "float" not in str(f.type)
        low, high = f.metadata["low"], f.metadata["high"]
        high = max_examples if high is None else high
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"metric '{key}' must be a number, got {type(value).__name__} {short_repr(value)}")
        elif integer and not isinstance(value, int):
            problems.append(f"metric '{key}' must be an integer, got {short_repr(value)}")
        elif not math.isfinite(value):
            problems.append(f"metric '{key}' is not finite ({value})")
        elif not low <= value <= high:
            problems.append(f"metric '{key}' = {short_repr(value)} is outside [{low:g}, {high:g}]")
        else:
            values[f.name] = int(value) if integer else float(value)
            continue
        ok = False
    return cls(**values) if ok and not problems else None


@dataclass(frozen=True)
class TrainReply:
    """A parsed, accepted train reply."""

    node_id: int
    site: SiteInfo
    metrics: TrainMetrics
    arrays: ArrayRecord
    update_sha256: str
    privacy: PrivacyReport | None = None
    receipt: Receipt | None = None  # the site's signature of this reply (checked when parsed)


@dataclass(frozen=True)
class EvaluateReply:
    """A parsed, accepted evaluate reply."""

    node_id: int
    site: SiteInfo
    metrics: EvaluateMetrics
    class_recall: dict[int, float] = dataclasses.field(default_factory=dict)  # class index -> recall, classes present


def _parse_site(content: RecordDict, expected_sha256: str, problems: list[str]) -> SiteInfo | None:
    record = content.config_records.get(SITE_RECORD)
    if record is None:
        problems.append(f"the '{SITE_RECORD}' record is missing")
        return None
    name, sha, skipped = record.get(SITE_NAME), record.get(BACKBONE_SHA256), record.get(SKIPPED_IMAGES, 0)
    extra = sorted(set(record) - {SITE_NAME, BACKBONE_SHA256, SKIPPED_IMAGES})
    before = len(problems)
    if extra:
        problems.append(f"unexpected site keys {extra}")
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        problems.append(f"'{SITE_NAME}' must be a non-empty name of at most 128 characters, got {short_repr(name)}")
    if not isinstance(sha, str):
        problems.append(f"'{BACKBONE_SHA256}' is missing from the site record")
    elif sha != expected_sha256:
        problems.append(f"the site trained on another backbone (weights sha256 {sha[:16]}..., expected {expected_sha256[:16]}...)")
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        problems.append(f"'{SKIPPED_IMAGES}' must be a non-negative integer, got {short_repr(skipped)}")
    return SiteInfo(str(name), str(sha), int(skipped)) if len(problems) == before else None


def _check_records(
    content: RecordDict, expected: dict[str, type], problems: list[str], optional: dict[str, type] | None = None
) -> None:
    for name, record in content.items():
        if optional and name in optional:
            if not isinstance(record, optional[name]):
                problems.append(f"record '{name}' is a {type(record).__name__}, expected a {optional[name].__name__}")
        elif name not in expected:
            problems.append(f"unexpected record '{name}' ({type(record).__name__})")
        elif not isinstance(record, expected[name]):
            problems.append(f"record '{name}' is a {type(record).__name__}, expected a {expected[name].__name__}")
    for name in expected:
        if name not in content:
            problems.append(f"the '{name}' record is missing")


def _failed(msg: Message) -> None:
    if msg.has_error():
        raise SiteFailedError(msg.error.reason)


def parse_train_reply(
    msg: Message, *, layout: Layout, backbone_sha256: str, max_examples: int, require_privacy: bool = False,
    run_id: str = "", server_round: int = 0,
) -> TrainReply:
    """Parse a train reply or raise ReplyError listing every problem (SiteFailedError for an error reply).

    With ``require_privacy`` (record-level DP asked of the sites) a reply without
    a valid privacy record is rejected; without it, a reply carrying one is too.
    A receipt, when the site sends one, must be its valid signature of this
    reply in run ``run_id``, round ``server_round``; an unsigned reply is
    accepted and recorded as such (the audit verifier flags it).
    """
    _failed(msg)
    problems: list[str] = []
    content = msg.content
    expected = {ARRAYS_RECORD: ArrayRecord, METRICS_RECORD: MetricRecord, SITE_RECORD: ConfigRecord}
    if require_privacy:
        expected[PRIVACY_RECORD] = ConfigRecord
    _check_records(content, expected, problems, optional={RECEIPT_RECORD: ConfigRecord})
    privacy = None
    if require_privacy and PRIVACY_RECORD in content.config_records:
        privacy = PrivacyReport.from_record(content.config_records[PRIVACY_RECORD], problems)
    site = _parse_site(content, backbone_sha256, problems) if SITE_RECORD in content.config_records else None
    metrics = None
    if METRICS_RECORD in content.metric_records:
        metrics = _parse_metrics(TrainMetrics, content.metric_records[METRICS_RECORD], max_examples, problems)
    arrays = content.array_records.get(ARRAYS_RECORD)
    if arrays is not None:
        problems.extend(validate_arrays(arrays, layout))
    if problems or site is None or metrics is None or arrays is None or (require_privacy and privacy is None):
        raise ReplyError(problems or ["the reply could not be parsed"])
    digest = sha256_arrays({name: arrays[name].numpy() for name in arrays})
    receipt = None
    if RECEIPT_RECORD in content.config_records:
        receipt = Receipt.from_record(content.config_records[RECEIPT_RECORD], problems)
        payload = receipt_payload(
            run_id=run_id, server_round=server_round, site=site.name, update_sha256=digest,
            num_examples=metrics.num_examples, privacy=privacy.to_json() if privacy else None,
        )
        if receipt is not None and not verify_hex(receipt.public_key, payload, receipt.signature):
            problems.append(f"the site's signature does not match this reply (run {run_id}, round {server_round})")
        if problems:
            raise ReplyError(problems)
    return TrainReply(msg.metadata.src_node_id, site, metrics, arrays, digest, privacy, receipt)


def _parse_class_recall(record: MetricRecord, num_classes: int | None, problems: list[str]) -> dict[int, float]:
    """Class index -> recall, each index a class of the run and each recall in [0, 1]."""
    recall = {}
    for key, value in record.items():
        index = int(key) if re.fullmatch(r"0|[1-9][0-9]{0,4}", key) else None
        if index is None or (num_classes is not None and index >= num_classes):
            problems.append(f"class-recall key {short_repr(key)} is not a class index 0..{(num_classes or 1) - 1}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            problems.append(f"class-recall of class {index} must be a number in [0, 1], got {short_repr(value)}")
        else:
            recall[index] = float(value)
    return recall


def parse_evaluate_reply(msg: Message, *, backbone_sha256: str, max_examples: int, num_classes: int | None = None) -> EvaluateReply:
    """Parse an evaluate reply or raise ReplyError listing every problem."""
    _failed(msg)
    problems: list[str] = []
    content = msg.content
    _check_records(content, {METRICS_RECORD: MetricRecord, SITE_RECORD: ConfigRecord}, problems, optional={CLASS_RECALL_RECORD: MetricRecord})
    site = _parse_site(content, backbone_sha256, problems) if SITE_RECORD in content.config_records else None
    metrics = None
    if METRICS_RECORD in content.metric_records:
        metrics = _parse_metrics(EvaluateMetrics, content.metric_records[METRICS_RECORD], max_examples, problems)
    if metrics is not None:
        scores = metrics.scores()
        if metrics.num_examples == 0 and scores:
            problems.append("scores reported for 0 examples")
        required = {"loss", "accuracy", "precision", "recall", "f1"}
        if metrics.num_examples > 0 and not required <= set(scores):
            problems.append(f"scores missing for {metrics.num_examples} examples: {sorted(required - set(scores))}")
    class_recall = {}
    if CLASS_RECALL_RECORD in content.metric_records:
        class_recall = _parse_class_recall(content.metric_records[CLASS_RECALL_RECORD], num_classes, problems)
        if class_recall and metrics is not None and metrics.num_examples == 0:
            problems.append("class-recall reported for 0 examples")
    if problems or site is None or metrics is None:
        raise ReplyError(problems or ["the reply could not be parsed"])
    return EvaluateReply(msg.metadata.src_node_id, site, metrics, class_recall)


def update_l2_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over every array (the size of a site's update)."""
    total = 0.0
    for name in arrays:
        delta = arrays[name].numpy().astype(np.float64) - reference[name].numpy().astype(np.float64)
        total += float(np.square(delta).sum())
    return math.sqrt(total)


def claimed_site_name(msg: Message) -> str | None:
    """The name a reply that did not parse says it comes from, when that is a plain name; else None.

    Used only to label the rejection in the record: a rejected reply is trusted for nothing else.
    """
    if msg.has_error():
        return None
    record = msg.content.config_records.get(SITE_RECORD)
    name = record.get(SITE_NAME) if record is not None else None
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", name):
        return name
    return None
