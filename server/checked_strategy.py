"""A wrapper that parses and records every reply before Flower's strategy aggregates it.

Like Flower's own DP wrappers, it wraps any strategy: sampling, configuration
and aggregation stay the wrapped strategy's. What it adds is the one place
where replies are parsed into the protocol's types (a reply that does not
parse never reaches aggregation, and the server never raises on one) and the
:class:`~server.round_recorder.RoundRecorder` that records each round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.errors import ReplyError, SiteFailedError
from common.exchange import Layout
from common.privacy import DPEvent, epsilon_spent
from common.replies import TrainReply, claimed_site_name, parse_evaluate_reply, parse_train_reply, update_l2_norm
from server.central_dp import CentralDP
from server.round_recorder import RoundRecorder, message_bytes, short_reason

__all__ = ["CheckedStrategy", "POLICY_REFUSAL"]

# How a site's error reason starts when its own privacy policy refused the round.
POLICY_REFUSAL = "PolicyRefusal:"

log = logging.getLogger(__name__)


class CheckedStrategy(Strategy):
    """Parse and record replies, then delegate to ``inner`` (or to ``central``'s DP wrapper around it)."""

    def __init__(
        self,
        inner: Strategy,
        *,
        layout: Layout,
        backbone_sha256: str,
        max_examples: int,
        recorder: RoundRecorder,
        require_privacy: bool = False,
        central: CentralDP | None = None,
        run_id: str = "",
        num_classes: int | None = None,
        enrolled: Mapping[int, str] | None = None,
    ) -> None:
        self.enrolled = dict(enrolled) if enrolled is not None else None  # node id -> site name, when the federation enrols its sites
        self.num_classes = num_classes  # bounds the class indices of the sites' recall per class
        self.run_id = run_id  # what the sites sign their replies for
        self.inner = central.strategy if central is not None else inner
        self.central = central
        self.require_privacy = require_privacy
        self._dp_events: dict[int, list[DPEvent]] = {}  # node -> the DP events of its accepted updates in this run
        self._releases: dict[int, DPEvent] = {}  # node -> its feature-mean release in this run (counted once)
        self.layout = layout
        self.backbone_sha256 = backbone_sha256
        self.max_examples = max_examples
        self.recorder = recorder
        self._global: dict[int, ArrayRecord] = {}

    def summary(self) -> None:
        log.info("strategy %s, every reply parsed against %d arrays", type(self.inner).__name__, len(self.layout))
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._global = {server_round: arrays}
        self.recorder.sent(server_round, "train", messages, arrays)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self.recorder.sent(server_round, "evaluate", messages, arrays)
        return messages

    def _problem(self, server_round: int, phase: str, msg: Message, exc: ReplyError) -> None:
        node_id = self.recorder.node_of(server_round, phase, msg)
        if isinstance(exc, SiteFailedError):
            reasons = [short_reason(r) for r in exc.problems]
            kind = "refused" if any(r.startswith(POLICY_REFUSAL) for r in reasons) else "failed"
            self.recorder.problem(server_round, phase, node_id, kind, reasons)
            log.warning("round %d: %s %s (%s): %s", server_round, self.recorder.site_name(node_id), kind, phase, "; ".join(reasons))
        else:
            self.recorder.problem(
                server_round, phase, node_id, "rejected", exc.problems,
                nbytes=message_bytes(msg), claimed_name=claimed_site_name(msg),
            )
            log.warning(
                "round %d: rejected the %s reply of %s: %s",
                server_round, phase, self.recorder.site_name(node_id), "; ".join(exc.problems),
            )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, names = [], []
        reference = self._global.get(server_round)
        for msg in replies:
            try:
                reply = parse_train_reply(
                    msg, layout=self.layout, backbone_sha256=self.backbone_sha256, max_examples=self.max_examples,
                    require_privacy=self.require_privacy, run_id=self.run_id, server_round=server_round,
                )
            except ReplyError as exc:
                self._problem(server_round, "train", msg, exc)
                continue
            stranger = self._not_enrolled(reply.node_id, reply.site.name)
            if stranger:
                self._problem(server_round, "train", msg, ReplyError([stranger]))
                continue
            if reply.privacy is not None:
                understated = self._understated_epsilon(reply)
                if understated:
                    self._problem(server_round, "train", msg, ReplyError([understated]))
                    continue
                self._dp_events.setdefault(reply.node_id, []).append(reply.privacy.event)
                if reply.privacy.release is not None:
                    self._releases.setdefault(reply.node_id, reply.privacy.release)
            norm = update_l2_norm(reply.arrays, reference) if reference is not None else float("nan")
            unclipped = self._unclipped(norm)
            if unclipped:
                self._problem(server_round, "train", msg, ReplyError([unclipped]))
                continue
            self.recorder.train_accepted(server_round, reply, nbytes=message_bytes(msg), update_l2_norm=norm)
            accepted.append(msg)
            names.append(self.recorder.site_name(reply.node_id))
        if not accepted:
            log.error("round %d: no acceptable updates; the global model is unchanged", server_round)
            self.recorder.aggregated(server_round, None, [], central_privacy=self._central_report(False))
            return None, None
        if self.central is not None:
            # Client-level DP bounds each site's influence on an equally weighted mean: examples do not weigh.
            for msg in accepted:
                for record in msg.content.metric_records.values():
                    record[self.central.weight_key] = 1
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        arrays = self._as_layout(arrays) if arrays is not None else None
        if arrays is None and self.central is not None:
            log.error(
                "round %d: %d of %d sampled sites sent an acceptable update; client-level DP releases a round only "
                "when all did (its noise is calibrated for them): the global model is unchanged",
                server_round, len(accepted), self.central.sites_per_round,
            )
        self.recorder.aggregated(
            server_round, arrays, names if arrays is not None else [],
            central_privacy=self._central_report(arrays is not None),
        )
        return arrays, metrics

    def _not_enrolled(self, node_id: int, claimed: str) -> str | None:
        """A problem if the federation enrols its sites and this node is not enrolled under the name it claims."""
        if self.enrolled is None:
            return None
        enrolled = self.enrolled.get(node_id)
        if enrolled is None:
            return f"node {node_id} is not in the federation's enrolment"
        if claimed != enrolled:
            return f"the reply names itself {claimed!r}, but node {node_id} is enrolled as {enrolled!r}"
        return None

    def _central_report(self, released: bool) -> dict | None:
        return self.central.round_report(released) if self.central is not None else None

    def _unclipped(self, norm: float) -> str | None:
        """A problem if, under client-side clipping, a site's update is longer than the clip norm it was sent."""
        central = self.central
        if central is None or central.clipping != "client" or norm <= central.clip_norm * (1 + 1e-5):
            return None
        return f"the update's L2 norm {norm:.6g} exceeds the clip norm {central.clip_norm:g} the site was asked to clip to"

    def _understated_epsilon(self, reply: TrainReply) -> str | None:
        """A problem if the site reports less epsilon for this run than its own accepted events add up to.

        The server sees only the events of accepted updates, so the site's figure
        may be higher (a rejected round still spent budget), never lower.
        """
        privacy = reply.privacy
        release = privacy.release or self._releases.get(reply.node_id)  # one a run, carried by every later reply
        events = [*([release] if release else []), *self._dp_events.get(reply.node_id, []), privacy.event]
        floor = epsilon_spent(events, delta=privacy.delta, accountant=privacy.event.accountant)
        if privacy.epsilon_run < floor * (1 - 1e-6):
            return (
                f"the site reports epsilon {privacy.epsilon_run:.6g} for this run, but its {len(events)} DP events "
                f"accepted so far compose to {floor:.6g}"
            )
        return None

    def _as_layout(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the layout's dtypes (FedAdam/FedYogi compute in float64)."""
        return ArrayRecord(
            {name: Array(np.asarray(arrays[name].numpy(), dtype=dtype)) for name, (_, dtype) in self.layout.items()}
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Parse and record evaluation replies; the weighted averages are the round record's."""
        for msg in replies:
            try:
                reply = parse_evaluate_reply(
                    msg, backbone_sha256=self.backbone_sha256, max_examples=self.max_examples, num_classes=self.num_classes
                )
            except ReplyError as exc:
                self._problem(server_round, "evaluate", msg, exc)
                continue
            stranger = self._not_enrolled(reply.node_id, reply.site.name)
            if stranger:
                self._problem(server_round, "evaluate", msg, ReplyError([stranger]))
                continue
            self.recorder.evaluate_accepted(server_round, reply, nbytes=message_bytes(msg))
        return None
