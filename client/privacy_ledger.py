"""The site's privacy ledger: every DP event its data took part in, as JSON in its state-dir.

``<state-dir>/privacy-ledger.json`` holds, per data fingerprint (the sha256
of the site's training data), one entry per local training: run id, server
round, attempt, time, and the :class:`~common.privacy.DPEvent`. An entry of
another mechanism names it (``"mechanism": "feature-mean"``, the release of
the site's feature mean, see client.feature_centre); entries without the key
are DP-SGD. The lifetime
epsilon of that data is the composition of all its entries, across rounds,
restarted processes and runs; the run epsilon composes one run's entries.

``record`` is deliberately NOT idempotent on (run id, round): each call is a
training that happened, and a retried round that trained again released a
fresh noisy update and spent budget again (it is stored as attempt 2). Call it
once per training, after training and before the reply leaves the site: a
crash in between over-counts, never under-counts.

The file is written atomically under an exclusive lock; reading it checks
its structure and its checksum, and any problem is an error naming the file:
a ledger is never silently reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import FedHeadError
from common.files import write_json_atomic
from common.hashing import sha256_json
from common.privacy import DPEvent, PrivacyError, epsilon_spent

__all__ = ["LEDGER_FILE", "DP_SGD", "FEATURE_MEAN", "MECHANISMS", "LedgerError", "LedgerEntry", "PrivacyLedger"]

LEDGER_FILE = "privacy-ledger.json"
_FORMAT, _VERSION = "fedhead-privacy-ledger", 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = {"run_id", "server_round", "attempt", "recorded_at", "event"}
DP_SGD = "dp-sgd"
FEATURE_MEAN = "feature-mean"  # the private release of a site's feature mean (client.feature_centre)
MECHANISMS = (DP_SGD, FEATURE_MEAN)


class LedgerError(FedHeadError, ValueError):
    """The privacy ledger is unreadable, malformed or fails its checksum."""


@dataclass(frozen=True)
class LedgerEntry:
    """One local training (or another release, ``mechanism``) on the fingerprinted data."""

    run_id: str
    server_round: int
    attempt: int
    recorded_at: str
    event: DPEvent
    mechanism: str = DP_SGD

    def to_json(self) -> dict[str, Any]:
        entry = {"run_id": self.run_id, "server_round": self.server_round, "attempt": self.attempt,
                 "recorded_at": self.recorded_at, "event": self.event.to_json()}
        return entry if self.mechanism == DP_SGD else {**entry, "mechanism": self.mechanism}


def _check_fingerprint(data_fingerprint: str) -> str:
    if not isinstance(data_fingerprint, str) or not _SHA256.fullmatch(data_fingerprint):
        raise LedgerError(f"data fingerprint {data_fingerprint!r} is not a lowercase hex sha256 (64 characters)")
    return data_fingerprint


def _parse_entry(raw: Any, where: str, problems: list[str]) -> LedgerEntry | None:
    if not isinstance(raw, dict) or set(raw) - {"mechanism"} != _ENTRY_KEYS:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        problems.append(f"{where}: expected keys {sorted(_ENTRY_KEYS)} (and optionally 'mechanism'), found {keys}")
        return None
    mechanism = raw.get("mechanism", DP_SGD)
    if mechanism not in MECHANISMS:
        problems.append(f"{where}: mechanism {mechanism!r} is not one of {', '.join(MECHANISMS)}")
        return None
    bad = [k for k, ok in (
        ("run_id", isinstance(raw["run_id"], str) and bool(raw["run_id"])),
        ("server_round", isinstance(raw["server_round"], int) and not isinstance(raw["server_round"], bool) and raw["server_round"] >= 0),
        ("attempt", isinstance(raw["attempt"], int) and not isinstance(raw["attempt"], bool) and raw["attempt"] >= 1),
        ("recorded_at", isinstance(raw["recorded_at"], str)),
    ) if not ok]
    if bad:
        problems.append(f"{where}: bad {', '.join(f'{k}={raw[k]!r}' for k in bad)}")
        return None
    try:
        event = DPEvent.from_json(raw["event"])
    except PrivacyError as exc:
        problems.append(f"{where}: {exc}")
        return None
    return LedgerEntry(raw["run_id"], raw["server_round"], raw["attempt"], raw["recorded_at"], event, mechanism)


class PrivacyLedger:
    """The ledger file at ``path``; :meth:`load` it before reading."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._entries: dict[str, list[LedgerEntry]] = {}

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike) -> PrivacyLedger:
        """The ledger of the site whose state-dir is ``state_dir``, loaded."""
        return cls(Path(state_dir) / LEDGER_FILE).load()

    def load(self) -> PrivacyLedger:
        """Read and validate the file (a missing file is an empty ledger); returns self."""
        self._entries = self._read()
        return self

    def _fail(self, problems: list[str]) -> LedgerError:
        return LedgerError(
            f"privacy ledger {self.path} is not a valid fedhead ledger; it is not reset automatically. "
            "Restore it from a backup (its budget is this site's record of privacy spent):\n  - " + "\n  - ".join(problems)
        )

    def _read(self) -> dict[str, list[LedgerEntry]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LedgerError(f"privacy ledger {self.path} cannot be read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise self._fail([f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._fail([f"not JSON ({exc.msg} at line {exc.lineno})"]) from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise self._fail([f"expected format {_FORMAT!r} version {_VERSION}"])
        datasets, problems = data.get("datasets"), []
        if set(data) != {"format", "version", "datasets", "sha256"} or not isinstance(datasets, dict):
            raise self._fail([f"expected keys datasets, format, sha256, version; found {sorted(data)}"])
        if data["sha256"] != sha256_json(datasets):
            problems.append("checksum mismatch: the entries were changed outside fedhead (or the file is damaged)")
        entries: dict[str, list[LedgerEntry]] = {}
        for fingerprint, raw_entries in datasets.items():
            if not _SHA256.fullmatch(fingerprint) or not isinstance(raw_entries, list):
                problems.append(f"dataset {fingerprint!r}: expected a sha256 key holding a list of entries")
                continue
            parsed = [_parse_entry(raw, f"dataset {fingerprint[:12]} entry {i}", problems) for i, raw in enumerate(raw_entries)]
            entries[fingerprint] = [e for e in parsed if e is not None]
            seen: dict[tuple[str, int, str], int] = {}
            for entry in entries[fingerprint]:
                key = (entry.run_id, entry.server_round, entry.mechanism)
                seen[key] = seen.get(key, 0) + 1
                if entry.attempt != seen[key]:
                    problems.append(f"dataset {fingerprint[:12]}: run {entry.run_id} round {entry.server_round} "
                                    f"has attempt {entry.attempt} where {seen[key]} was expected (entries missing?)")
        if problems:
            raise self._fail(problems)
        return entries

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def entries(self, data_fingerprint: str, *, run_id: str | None = None, mechanism: str | None = None) -> list[LedgerEntry]:
        """The entries of this data (of one run, of one mechanism, when given), oldest first."""
        found = self._entries.get(_check_fingerprint(data_fingerprint), [])
        return [e for e in found if run_id in (None, e.run_id) and mechanism in (None, e.mechanism)]

    def events(self, data_fingerprint: str, *, run_id: str | None = None) -> list[DPEvent]:
        """The DP events of this data (of one run when ``run_id`` is given)."""
        return [e.event for e in self.entries(data_fingerprint, run_id=run_id)]

    def record(
        self, data_fingerprint: str, *, run_id: str, server_round: int, event: DPEvent, mechanism: str = DP_SGD
    ) -> LedgerEntry:
        """Append one training's (or ``mechanism``'s) event (re-reading the file under a lock) and write the ledger atomically."""
        entry = self._append(data_fingerprint, run_id=run_id, server_round=server_round, event=event, mechanism=mechanism, once=False)
        assert entry is not None
        return entry

    def record_once(
        self, data_fingerprint: str, *, run_id: str, server_round: int, event: DPEvent, mechanism: str
    ) -> LedgerEntry | None:
        """:meth:`record`, unless run ``run_id`` already has a ``mechanism`` entry for this data (checked under the lock): then None."""
        return self._append(data_fingerprint, run_id=run_id, server_round=server_round, event=event, mechanism=mechanism, once=True)

    def _append(
        self, data_fingerprint: str, *, run_id: str, server_round: int, event: DPEvent, mechanism: str, once: bool
    ) -> LedgerEntry | None:
        _check_fingerprint(data_fingerprint)
        if not isinstance(run_id, str) or not run_id:
            raise LedgerError(f"run id {run_id!r}: give a non-empty string")
        if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 0:
            raise LedgerError(f"server round {server_round!r}: give an integer >= 0")
        if not isinstance(event, DPEvent):
            raise LedgerError(f"event {event!r} is not a DPEvent")
        if mechanism not in MECHANISMS:
            raise LedgerError(f"mechanism {mechanism!r}: choose one of {', '.join(MECHANISMS)}")
        with self._locked():
            self._entries = self._read()
            mine = self._entries.setdefault(data_fingerprint, [])
            if once and any((e.run_id, e.mechanism) == (run_id, mechanism) for e in mine):
                return None
            attempt = 1 + sum(1 for e in mine if (e.run_id, e.server_round, e.mechanism) == (run_id, server_round, mechanism))
            entry = LedgerEntry(run_id, server_round, attempt, datetime.now(timezone.utc).isoformat(timespec="seconds"), event, mechanism)
            mine.append(entry)
            datasets = {fp: [e.to_json() for e in found] for fp, found in self._entries.items()}
            write_json_atomic(self.path, {"format": _FORMAT, "version": _VERSION, "datasets": datasets, "sha256": sha256_json(datasets)})
        return entry

    def lifetime_epsilon(self, data_fingerprint: str, *, delta: float, accountant: str) -> float:
        """Epsilon this data has spent over every run so far."""
        return epsilon_spent(self.events(data_fingerprint), delta=delta, accountant=accountant)

    def run_epsilon(self, data_fingerprint: str, *, run_id: str, delta: float, accountant: str) -> float:
        """Epsilon this data has spent in run ``run_id``."""
        return epsilon_spent(self.events(data_fingerprint, run_id=run_id), delta=delta, accountant=accountant)
