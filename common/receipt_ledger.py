"""Where a site keeps its signing key and its append-only ledger of signed receipts (its ``state-dir``).

The site writes the ledger (:mod:`client.receipts`); an auditor reads it
(``fedhead audit cross-check``). One JSON object per line, fsynced per line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import DataError

__all__ = ["site_key_path", "site_public_key_path", "receipts_path", "append_receipt", "read_receipts"]


def site_key_path(state_dir: Path) -> Path:
    """Where a site's Ed25519 signing key lives."""
    return Path(state_dir) / "keys" / "site-ed25519.pem"


def site_public_key_path(state_dir: Path) -> Path:
    """The public half of the site's key, as 64 hex digits (what an auditor is given)."""
    return Path(state_dir) / "keys" / "site-ed25519.pub"


def receipts_path(state_dir: Path) -> Path:
    """The site's append-only ledger of signed receipts."""
    return Path(state_dir) / "receipts.jsonl"


def append_receipt(state_dir: Path, entry: dict[str, Any]) -> None:
    """Append one receipt to the ledger; it is on disk when this returns."""
    path = receipts_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_receipts(state_dir: Path) -> list[dict[str, Any]]:
    """Every receipt in a site's ledger, in order (a torn last line, from a crash mid-write, is left out)."""
    path = receipts_path(state_dir)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): the ledger is damaged") from None
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise DataError(f"{path} line {number} is not JSON: the ledger is damaged") from None
    return out
