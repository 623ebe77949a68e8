"""Checking one site's reply before anything in it is used."""

from __future__ import annotations

import math

from flwr.app import ConfigRecord, Message, MetricRecord

from common.exchange import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS, Layout, validate_arrays
from server.round_log import short_reason

__all__ = ["check_train_reply", "check_evaluate_reply", "reply_site"]


def reply_site(msg: Message) -> str:
    """The site name a reply carries, else its node id."""
    if not msg.has_error() and "site" in msg.content and isinstance(msg.content["site"], ConfigRecord):
        return str(msg.content["site"].get("site", msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def _check_metrics(msg: Message, problems: list[str], expected_keys: frozenset[str]) -> MetricRecord | None:
    records = msg.content.metric_records
    if list(records) != ["metrics"]:
        problems.append(f"expected one MetricRecord 'metrics', got {sorted(records) or 'none'}")
        return None
    metrics = records["metrics"]
    missing, extra = sorted(expected_keys - set(metrics)), sorted(set(metrics) - expected_keys)
    if missing or extra:
        problems.append(f"metric keys differ from fedhead's: missing {missing}, unexpected {extra}")
    num = metrics.get("num-examples")
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        problems.append(f"'num-examples' must be a non-negative integer, got {num!r}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and math.isinf(v) for v in values):
            problems.append(f"metric '{key}' is infinite")
    return metrics


def check_train_reply(msg: Message, layout: Layout, expected_sha256: str) -> list[str]:
    """Every problem with a training reply: its records, its arrays, its backbone."""
    if msg.has_error():
        return [f"site failed: {short_reason(msg.error.reason)}"]
    problems: list[str] = []
    metrics = _check_metrics(msg, problems, TRAIN_METRIC_KEYS)
    if metrics is not None and metrics.get("num-examples") == 0:
        problems.append("'num-examples' is 0: an empty update cannot be weighted")
    arrays = msg.content.array_records
    if list(arrays) != ["arrays"]:
        problems.append(f"expected one ArrayRecord 'arrays', got {sorted(arrays) or 'none'}")
    else:
        problems.extend(validate_arrays(arrays["arrays"], layout))
    site = msg.content.config_records.get("site")
    if site is not None and site.get("backbone-sha256") not in (None, expected_sha256):
        problems.append("the site trained on a different backbone (weights sha256 differs)")
    return problems


def check_evaluate_reply(msg: Message) -> list[str]:
    """Every problem with an evaluation reply."""
    if msg.has_error():
        return [f"site failed: {short_reason(msg.error.reason)}"]
    problems: list[str] = []
    _check_metrics(msg, problems, EVAL_METRIC_KEYS)
    if msg.content.array_records:
        problems.append("an evaluation reply must not carry arrays")
    return problems

