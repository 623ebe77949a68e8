"""Builds one :class:`~common.round_record.RoundRecord` per round from what the strategy wrapper sees.

The recorder is owned by :class:`server.checked_strategy.CheckedStrategy`,
which tells it what was sent, which replies were accepted, rejected or failed,
and what was aggregated; the ServerApp closes each round with the held-out
scores. A closed record is handed to every sink (``metrics.jsonl``, the log's
table row, later the audit log; see :mod:`server.round_sinks`) and kept in
:attr:`RoundRecorder.records`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, Message

from common.hashing import sha256_arrays
from common.metrics import METRIC_NAMES, weighted_mean
from common.replies import EvaluateReply, TrainReply
from common.round_record import NodeProblem, Phase, ProblemKind, RoundRecord, SiteEvaluate, SiteRound, SiteTrain

__all__ = ["RoundRecorder", "message_bytes", "arrays_sha256", "short_reason"]

log = logging.getLogger(__name__)

Sink = Callable[[RoundRecord], None]


def message_bytes(msg: Message) -> int:
    """Bytes of a message's content, as Flower counts them (array data + keys + config).

    Flower's counter raises on some values a hostile site can send (an empty
    string in a ConfigRecord); such a record counts its keys only, never crashes the server.
    """
    if msg.has_error():
        return 0
    total = 0
    for record in msg.content.values():
        try:
            total += int(record.count_bytes())
        except (ValueError, IndexError, TypeError):  # e.g. an empty string or an empty list as a value
            total += sum(len(str(key).encode()) for key in record)
    return total


def arrays_sha256(arrays: ArrayRecord) -> str:
    """The sha256 of a parameter set, as every record states it."""
    return sha256_arrays({name: arrays[name].numpy() for name in arrays})


def short_reason(reason: str, limit: int = 400) -> str:
    """The informative tail of a failure reason (Flower wraps a site's exception in a traceback)."""
    text = reason.split("Message:", 1)[-1] if "Message:" in reason else reason
    text = " ".join(text.replace("\x1b", "").split()).strip(" '>")
    return text if len(text) <= limit else "..." + text[-limit:]


class RoundRecorder:
    """Collects one round at a time; :meth:`finish` closes it and feeds the sinks."""

    def __init__(self, *, strategy: str, sinks: Iterable[Sink] = (), enrolled: Mapping[int, str] | None = None) -> None:
        self.strategy = strategy
        self.sinks = list(sinks)
        self.records: list[RoundRecord] = []
        self._open: dict[int, RoundRecord] = {}
        self._sent: dict[tuple[int, str], dict[int, int]] = {}
        self._messages: dict[tuple[int, str], list[Message]] = {}
        self._node_names: dict[int, str] = dict(enrolled or {})  # enrolled nodes are named by the enrolment
        self._round_started = time.monotonic()

    def _round(self, server_round: int) -> RoundRecord:
        if server_round not in self._open:
            self._open[server_round] = RoundRecord(round=server_round, strategy=self.strategy)
        return self._open[server_round]

    def _name(self, record: RoundRecord, node_id: int, claimed: str | None) -> str:
        """A stable name for a node: the first name it used, made unique by node id on a clash."""
        if node_id in self._node_names:
            return self._node_names[node_id]
        name = claimed or f"node-{node_id}"
        taken = set(self._node_names.values()) | set(record.sites)
        if name in taken:
            name = f"{name}@{node_id}"
        self._node_names[node_id] = name
        return name

    def sent(self, server_round: int, phase: Phase, messages: list[Message], arrays: ArrayRecord) -> None:
        """Record the messages of ``phase`` and, for training, the global head they carry."""
        record = self._round(server_round)
        self._messages[(server_round, phase)] = list(messages)
        self._sent[(server_round, phase)] = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        nodes = sorted(self._sent[(server_round, phase)])
        if phase == "train":
            record.sampled_nodes = nodes
            record.head_sha256_before = arrays_sha256(arrays)
        else:
            record.evaluate_nodes = nodes

    def node_of(self, server_round: int, phase: Phase, reply: Message) -> int:
        """The node a reply answers for.

        An error reply that the SuperLink writes for a node that went away (Node
        Unavailable) comes from the SuperLink, not the node: it is matched to the
        node through the message it answers (ids are set when Flower pushes a message).
        """
        wanted = reply.metadata.reply_to_message_id
        for sent in self._messages.get((server_round, phase), []):
            if wanted and sent.metadata.message_id == wanted:
                return int(sent.metadata.dst_node_id)
        return int(reply.metadata.src_node_id)

    def _site(self, record: RoundRecord, node_id: int, claimed: str | None) -> SiteRound:
        name = self._name(record, node_id, claimed)
        return record.sites.setdefault(name, SiteRound(site=name, node_id=node_id))

    def train_accepted(self, server_round: int, reply: TrainReply, *, nbytes: int, update_l2_norm: float) -> None:
        """Record an accepted train reply."""
        record = self._round(server_round)
        site = self._site(record, reply.node_id, reply.site.name)
        m = reply.metrics
        site.train = SiteTrain(
            accepted=True,
            bytes_down=self._sent.get((server_round, "train"), {}).get(reply.node_id, 0),
            bytes_up=nbytes,
            num_examples=m.num_examples,
            train_loss=m.train_loss,
            epochs_run=m.epochs_run,
            seconds=m.seconds,
            cache_hits=m.cache_hits,
            backbone_forwards_train=m.backbone_forwards_train,
            backbone_forwards_eval=m.backbone_forwards_eval,
            skipped_images=reply.site.skipped_images,
            update_sha256=reply.update_sha256,
            update_l2_norm=update_l2_norm,
            privacy=reply.privacy.to_json() if reply.privacy else None,
            receipt=reply.receipt.to_json() if reply.receipt else None,
        )

    def evaluate_accepted(self, server_round: int, reply: EvaluateReply, *, nbytes: int) -> None:
        """Record an accepted evaluate reply."""
        record = self._round(server_round)
        site = self._site(record, reply.node_id, reply.site.name)
        site.evaluate = SiteEvaluate(
            accepted=True,
            bytes_down=self._sent.get((server_round, "evaluate"), {}).get(reply.node_id, 0),
            bytes_up=nbytes,
            num_examples=reply.metrics.num_examples,
            backbone_forwards_eval=reply.metrics.backbone_forwards_eval,
            scores=reply.metrics.scores(),
            class_recall={str(c): r for c, r in sorted(reply.class_recall.items())},
        )

    def problem(
        self,
        server_round: int,
        phase: Phase,
        node_id: int,
        kind: ProblemKind,
        reasons: list[str],
        *,
        nbytes: int = 0,
        claimed_name: str | None = None,
    ) -> None:
        """Record a reply that failed or was rejected; it counts for nothing else.

        The node keeps the name it was first accepted under; a node never accepted
        is ``node-<id>``: the name its rejected reply claims is only quoted in the
        reasons, so a hostile reply cannot take another site's name.
        """
        record = self._round(server_round)
        name = self.site_name(node_id)
        if claimed_name and name != claimed_name:
            reasons = [*reasons, f"(the reply names itself '{claimed_name}')"]
        record.problems.append(NodeProblem(node_id=node_id, site=name, phase=phase, kind=kind, reasons=list(reasons)))
        if kind == "rejected":
            site = record.sites.setdefault(name, SiteRound(site=name, node_id=node_id))
            down = self._sent.get((server_round, phase), {}).get(node_id, 0)
            if phase == "train":
                site.train = SiteTrain(accepted=False, bytes_down=down, bytes_up=nbytes)
            else:
                site.evaluate = SiteEvaluate(accepted=False, bytes_down=down, bytes_up=nbytes)

    def aggregated(
        self, server_round: int, arrays: ArrayRecord | None, sites: list[str], *, central_privacy: dict | None = None
    ) -> None:
        """Record the new global head (None: unchanged), whose updates made it, and client-level DP's release."""
        record = self._round(server_round)
        record.aggregated_sites = sorted(sites)
        record.central_privacy = central_privacy
        record.head_sha256_after = arrays_sha256(arrays) if arrays is not None else record.head_sha256_before

    def site_name(self, node_id: int) -> str:
        """The name recorded for ``node_id`` so far (``node-<id>`` if none)."""
        return self._node_names.get(node_id, f"node-{node_id}")

    def finish(self, server_round: int, *, central_eval: dict[str, float] | None, head_sha256: str | None = None) -> RoundRecord:
        """Close the round: missing nodes, federated averages, bytes, wall time; feed the sinks."""
        record = self._open.pop(server_round, None) or RoundRecord(round=server_round, strategy=self.strategy)
        now = time.monotonic()
        record.wall_seconds = round(now - self._round_started, 3)
        self._round_started = now
        if head_sha256 and record.head_sha256_after is None:
            record.head_sha256_after = head_sha256
        for phase, nodes in (("train", record.sampled_nodes), ("evaluate", record.evaluate_nodes)):
            answered = {p.node_id for p in record.problems if p.phase == phase}
            answered |= {s.node_id for s in record.sites.values() if (s.train if phase == "train" else s.evaluate)}
            for node_id in sorted(set(nodes) - answered):
                name = self.site_name(node_id)
                record.problems.append(NodeProblem(node_id, name, phase, "missing", ["no reply before the round timed out"]))
        evaluated = [s.evaluate for s in record.sites.values() if s.evaluate and s.evaluate.accepted and s.evaluate.num_examples]
        if evaluated:
            weights = [float(e.num_examples or 0) for e in evaluated]
            record.federated_eval = {
                name: weighted_mean([e.scores.get(name, float("nan")) for e in evaluated], weights) for name in METRIC_NAMES
            }
        record.central_eval = dict(central_eval or {})
        sent = [b for (r, _), by_node in self._sent.items() if r == server_round for b in by_node.values()]
        record.bytes_down = sum(sent)
        record.bytes_up = sum(
            (s.train.bytes_up if s.train else 0) + (s.evaluate.bytes_up if s.evaluate else 0) for s in record.sites.values()
        )
        self.records.append(record)
        for sink in self.sinks:
            sink(record)
        return record
