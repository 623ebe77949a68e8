"""The audit log's format: append-only JSON lines, hash-chained and signed, fsynced per record.

Each line of ``audit.jsonl`` is one record::

    {"seq": 0, "time": "...Z", "run_id": "...", "kind": "run-start", "content": {...},
     "prev_sha256": "000...0", "sha256": "...", "signature": "..."}

``sha256`` is the hex sha256 of the record's canonical JSON without
``sha256`` and ``signature``; ``prev_sha256`` is the previous record's
``sha256`` (64 zeros for the first); ``signature`` is the server's Ed25519
signature of the ``sha256`` hex string's ASCII bytes. Changing, removing,
inserting or reordering any record breaks the chain at that record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import DataError
from common.hashing import sha256_json
from common.signing import sign_hex

__all__ = ["AUDIT_FILE", "AUDIT_KINDS", "GENESIS", "AuditWriter", "record_sha256", "format_line", "read_audit_lines"]

AUDIT_FILE = "audit.jsonl"  # in the run folder
SERVER_PUB_FILE = "server.pub"  # in the run folder: the public half of the key that signs the log
AUDIT_KINDS = ("run-start", "round", "problem", "run-end")
GENESIS = "0" * 64
_UNHASHED = ("sha256", "signature")


def record_sha256(record: Mapping[str, Any]) -> str:
    """The hash a record's ``sha256`` field must hold: over everything but ``sha256`` and ``signature``."""
    return sha256_json({k: v for k, v in record.items() if k not in _UNHASHED})


def format_line(record: Mapping[str, Any]) -> str:
    """A record's one line (no newline): the only byte form a verifier accepts for it."""
    return json.dumps(record, sort_keys=True, allow_nan=False)


class AuditWriter:
    """Appends signed, chained records to one ``audit.jsonl``; each is on disk (fsynced) when ``append`` returns."""

    def __init__(self, path: Path, key: Ed25519PrivateKey, run_id: str) -> None:
        self.path, self.key, self.run_id = Path(path), key, run_id
        if self.path.exists() and self.path.stat().st_size:
            raise DataError(f"{self.path} already exists; an audit log is never appended to by a second run")
        self.seq, self.prev = 0, GENESIS

    def append(self, kind: str, content: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record of ``kind``; return it."""
        if kind not in AUDIT_KINDS:
            raise ValueError(f"unknown audit record kind {kind!r}; one of {', '.join(AUDIT_KINDS)}")
        record: dict[str, Any] = {
            "seq": self.seq,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "run_id": self.run_id,
            "kind": kind,
            "content": dict(content),
            "prev_sha256": self.prev,
        }
        record["sha256"] = record_sha256(record)
        record["signature"] = sign_hex(self.key, record["sha256"].encode("ascii"))
        line = format_line(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.seq, self.prev = self.seq + 1, record["sha256"]
        return record


def read_audit_lines(path: Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """Every line of an audit log as (line number, record or None if not a JSON object, raw text).

    Lines end at ``\n`` only: a ``\r`` stays in its line's text, where it
    differs from the record's canonical form, and a last line without its
    ``\n`` is returned as read; a verifier names both.
    """
    out: list[tuple[int, dict[str, Any] | None, str]] = []
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last record; it starts no line
    for number, raw in enumerate(lines, 1):
        line = raw.decode("utf-8", "replace")
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # not text, not JSON, or nested to crash a parser
            value = None
        out.append((number, value if isinstance(value, dict) else None, line))
    return out
