"""How a run's numbers and site names read, the same in the terminal tables and the report page."""

from __future__ import annotations

import re

__all__ = ["percent", "site_order"]


def percent(value: float | None) -> str:
    """``value`` as a percentage with two decimals; "-" when absent or NaN."""
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and value == value else "-"


def site_order(name: str) -> tuple:
    """Sort key that puts site-2 before site-10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
