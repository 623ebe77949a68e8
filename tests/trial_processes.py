"""What a running `fedhead federation up` says it started, for the tests that drive one."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.trial_federation import PROCESSES_FILE


def started_trial(trial: Path) -> dict | None:
    """The trial's ``processes.json`` once ``flwr run`` is among its processes; None before (or if unreadable)."""
    try:
        listing = json.loads((trial / PROCESSES_FILE).read_text())
    except (OSError, ValueError):
        return None
    return listing if "flwr-run" in listing.get("pids", {}) else None
