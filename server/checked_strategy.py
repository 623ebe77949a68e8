"""A wrapper that checks and records every reply before Flower's strategy aggregates it.

Like Flower's own DP wrappers, it wraps any strategy: sampling, configuration
and aggregation stay the wrapped strategy's. What it adds is the one place
where replies are validated (rejected replies never reach aggregation) and
where the round's participants, per-site metrics and bytes are recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.exchange import Layout
from server.reply_check import check_evaluate_reply, check_train_reply, reply_site
from server.round_log import RoundLog

__all__ = ["CheckedStrategy", "message_bytes"]

log = logging.getLogger(__name__)


def message_bytes(msg: Message) -> int:
    """Bytes of a message's content, as Flower counts them (array data + keys + config)."""
    if msg.has_error():
        return 0
    return int(sum(record.count_bytes() for record in msg.content.values()))


class CheckedStrategy(Strategy):
    """Validate and record replies, then delegate to ``inner``."""

    def __init__(self, inner: Strategy, *, layout: Layout, backbone_sha256: str, round_log: RoundLog) -> None:
        self.inner = inner
        self.layout = layout
        self.backbone_sha256 = backbone_sha256
        self.round_log = round_log

    def summary(self) -> None:
        log.info("strategy %s, every reply checked against %d arrays", type(self.inner).__name__, len(self.layout))
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.round_log.sent(server_round, "train", {m.metadata.dst_node_id: message_bytes(m) for m in messages})
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self.round_log.sent(server_round, "evaluate", {m.metadata.dst_node_id: message_bytes(m) for m in messages})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in replies:
            problems = check_train_reply(msg, self.layout, self.backbone_sha256)
            self.round_log.received(server_round, "train", msg, reply_site(msg), message_bytes(msg), problems)
            if problems:
                log.warning("round %d: rejected the update of %s: %s", server_round, reply_site(msg), "; ".join(problems))
            else:
                accepted.append(msg)
        if not accepted:
            log.error("round %d: no acceptable updates; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        return (self._as_layout(arrays) if arrays is not None else None), metrics

    def _as_layout(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the layout's dtypes (FedAdam/FedYogi compute in float64)."""
        return ArrayRecord(
            {name: Array(np.asarray(arrays[name].numpy(), dtype=dtype)) for name, (_, dtype) in self.layout.items()}
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted = []
        for msg in replies:
            problems = check_evaluate_reply(msg)
            self.round_log.received(server_round, "evaluate", msg, reply_site(msg), message_bytes(msg), problems)
            if problems:
                log.warning("round %d: ignored the evaluation of %s: %s", server_round, reply_site(msg), "; ".join(problems))
            else:
                accepted.append(msg)
        # A site without validation examples has nothing to weigh in the average.
        weighted = [m for m in accepted if m.content["metrics"]["num-examples"] > 0]
        if not weighted:
            return None
        return self.inner.aggregate_evaluate(server_round, weighted)
