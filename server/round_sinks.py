"""Where a closed round record goes: ``metrics.jsonl`` and the server log's progress table."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.round_record import RoundRecord

__all__ = ["MetricsFile", "log_round_row"]

log = logging.getLogger(__name__)


class MetricsFile:
    """Appends each record as one line of ``metrics.jsonl``, flushed to disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, record: RoundRecord) -> None:
        if record.round == 0 and not record.central_eval:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(record.to_line() + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def log_round_row(record: RoundRecord) -> None:
    """One row of the progress table in the server's log."""

    def pct(value: float | None) -> str:
        return f"{100 * value:6.2f}%" if isinstance(value, float) and value == value else "     - "

    if record.round == 0:
        log.info("round |  sites | site-val acc | test acc | test loss |  bytes/round")
    loss = record.central_eval.get("loss")
    log.info(
        "%5d | %2d of %d | %12s | %8s | %9s | %12s",
        record.round,
        len(record.aggregated_sites),
        len(record.sampled_nodes),
        pct(record.federated_eval.get("accuracy")),
        pct(record.central_eval.get("accuracy")),
        f"{loss:.4f}" if isinstance(loss, float) else "-",
        f"{record.bytes_down + record.bytes_up:,}",
    )
    for name, reasons in record.problem_sites().items():
        log.warning("round %d: %s did not take part fully: %s", record.round, name, "; ".join(reasons))
