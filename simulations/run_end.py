"""How a simulated run ended, written into its ``summary.json`` when the ServerApp could not say.

The ServerApp writes ``summary.json`` when it ends on its own. When the run
is interrupted, or the ServerApp dies before it writes, the runner settles
the summary from what the run folder holds: the ServerApp's summary if there
is one (its status replaced), else one built from ``metrics.jsonl``'s round
records with the same keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.errors import DataError
from common.files import write_json_atomic
from common.model import SplitModel
from common.round_record import load_round_records
from server.summary import build_summary

__all__ = ["read_summary", "settle_summary"]

log = logging.getLogger(__name__)


def read_summary(run_folder: Path) -> dict[str, Any] | None:
    """``summary.json`` of ``run_folder``, or None when there is none (or it is unreadable)."""
    path = run_folder / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s (%s); writing a new one", path, exc)
        return None


def settle_summary(
    run_folder: Path,
    *,
    status: str,
    error: str,
    cfg: RunConfig,
    model: SplitModel,
    wall_seconds: float,
) -> dict[str, Any]:
    """Write ``status`` and ``error`` into the run's summary (built from its round records if absent); return it."""
    summary = read_summary(run_folder)
    if summary is None:
        try:
            records = load_round_records(run_folder / "metrics.jsonl")
        except DataError as exc:
            log.warning("%s; the summary counts no rounds", exc)
            records = []
        summary = build_summary(
            cfg, model, records, run_name=run_folder.name, wall_seconds=wall_seconds,
            server_eval_forwards=0, status=status, error=error,
        )
    elif summary.get("error") and summary.get("status") != status:
        error = f"{error} (the ServerApp had written: {summary['error']})"
    summary.update(status=status, error=error)
    write_json_atomic(run_folder / "summary.json", summary)
    log.info("summary written to %s (status %s)", run_folder / "summary.json", status)
    return summary
