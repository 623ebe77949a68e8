"""Where fedhead keeps state that belongs to no single run."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FEDHEAD_HOME_ENV", "fedhead_home"]

FEDHEAD_HOME_ENV = "FEDHEAD_HOME"


def fedhead_home() -> Path:
    """``$FEDHEAD_HOME``, else ``~/.cache/fedhead``: simulated sites' state and prepared partitions.

    ``fedhead simulate`` points it at the project's ``.cache/fedhead``. A real
    site names its own ``state-dir`` in its node config instead.
    """
    configured = os.environ.get(FEDHEAD_HOME_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fedhead"
