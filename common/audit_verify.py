"""``fedhead audit verify``: everything an auditor can check in a run folder without trusting its server.

Checked, record by record: the JSON, the sequence numbers, the hash chain,
each record's own hash and the server's signature (with the key in the
run-start record, or a pinned one); the run id; the order of kinds (run-start
first, run-end last); each round's "before" head hash against the previous
round's "after" (round 1 against the initial head); the saved head's hash
against the last round's and the run-end record's; and every epsilon the log
reports, recomputed from the recorded DP events with an accountant other than
the one that produced it (record-level: Google's ``dp-accounting`` for
fedhead's Opacus figures; client-level: Opacus for Flower's figures), and held
against the budgets the run-start record declares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.audit_log import AUDIT_FILE, AUDIT_KINDS, GENESIS, format_line, read_audit_lines, record_sha256
from common.hashing import sha256_safetensors
from common.privacy import PRV_EPS_ERROR, DPEvent, PrivacyError, independent_central_epsilon, independent_epsilon
from common.protocol import receipt_payload
from common.signing import verify_hex

__all__ = ["AuditReport", "verify_run", "cross_check"]

_FIELDS = ("seq", "time", "run_id", "kind", "content", "prev_sha256", "sha256", "signature")
_REL = 1e-6  # how closely a reported epsilon must match its recomputation


@dataclass
class AuditReport:
    """What ``verify_run`` found: the problems (each naming its record) and counts for the summary line."""

    problems: list[str] = field(default_factory=list)
    records: int = 0
    rounds: int = 0
    epsilons_checked: int = 0
    site_signatures: int = 0
    signer: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_line(self, run_dir: Path) -> str:
        """One line: what holds, or how many problems."""
        if self.ok:
            return (
                f"{run_dir}: audit log verified: {self.records} records, {self.rounds} rounds, "
                f"{self.site_signatures} site signatures and {self.epsilons_checked} epsilons checked, "
                f"signed by {self.signer[:16]}..."
            )
        return f"{run_dir}: {len(self.problems)} problem(s) in the audit log"


def _close(reported: Any, expected: float, accountant: str) -> bool:
    if not isinstance(reported, (int, float)) or isinstance(reported, bool) or not math.isfinite(reported):
        return False
    if accountant == "prv":  # Opacus's PRV is an upper bound within PRV_EPS_ERROR of the PLD figure
        return expected * (1 - _REL) - 1e-9 <= reported <= expected + PRV_EPS_ERROR + _REL * expected
    return abs(reported - expected) <= _REL * max(abs(expected), 1e-12)


class _Verifier:
    def __init__(self, run_dir: Path, pinned_key: str | None, site_keys: Mapping[str, str]) -> None:
        self.run_dir, self.pinned_key = run_dir, pinned_key
        self.site_keys = dict(site_keys)  # site -> public key: pinned, else the first one its receipts show
        self.pinned_sites = set(site_keys)
        self.report = AuditReport()
        self.key: str | None = pinned_key
        self.run_id: str | None = None
        self.privacy: Mapping[str, Any] = {}
        self.last_head: str | None = None
        self.last_round = -1
        self.site_events: dict[str, list[DPEvent]] = {}
        self.central_releases = 0

    def problem(self, where: str, message: str) -> None:
        self.report.problems.append(f"{where}: {message}")

    def run(self) -> AuditReport:
        path = self.run_dir / AUDIT_FILE
        if not path.is_file():
            self.problem(str(path), "no audit log")
            return self.report
        lines = read_audit_lines(path)
        prev, kinds = GENESIS, []
        for index, (number, record, line) in enumerate(lines):
            where = f"record {index} (line {number})"
            if record is None:
                self.problem(where, "not a JSON object; the line was damaged or cut off")
                prev = None
                continue
            missing = [f for f in _FIELDS if f not in record]
            if missing:
                self.problem(where, f"missing field(s) {', '.join(missing)}")
                prev = record.get("sha256")
                continue
            if line != format_line(record):
                self.problem(where, "the line's bytes are not its record's canonical form: it was edited")
            self._envelope(where, index, record, prev)
            prev = record["sha256"]
            kinds.append(record["kind"])
            self._content(where, record)
        self.report.records = len(lines)
        if not kinds or kinds[0] != "run-start":
            self.problem("record 0 (line 1)", "the log does not begin with a run-start record")
        if not kinds or kinds[-1] != "run-end":
            self.problem(f"record {len(lines) - 1} (line {len(lines)})", "the log does not end with a run-end record: the run did not end, or records were cut off")
        self.report.signer = self.key
        return self.report

    def _envelope(self, where: str, index: int, record: dict[str, Any], prev: str | None) -> None:
        if record["seq"] != index:
            self.problem(where, f"sequence number {record['seq']!r}, expected {index}: a record was removed, inserted or moved")
        if prev is not None and record["prev_sha256"] != prev:
            self.problem(where, "prev_sha256 is not the previous record's sha256: the chain is broken here")
        if record["sha256"] != record_sha256(record):
            self.problem(where, "its content does not hash to its sha256: the record was changed")
        if record["kind"] == "run-start" and index == 0:
            declared = record["content"].get("server_public_key") if isinstance(record["content"], dict) else None
            if self.pinned_key and declared != self.pinned_key:
                self.problem(where, f"signed by key {str(declared)[:16]}..., not the pinned key {self.pinned_key[:16]}...")
            self.key = self.key or declared
        if not self.key or not verify_hex(self.key, str(record["sha256"]).encode("ascii"), str(record["signature"])):
            self.problem(where, "the server's signature does not verify")
        if self.run_id is None:
            self.run_id = record["run_id"]
        elif record["run_id"] != self.run_id:
            self.problem(where, f"run id {record['run_id']!r} is not the run's {self.run_id!r}")

    def _content(self, where: str, record: dict[str, Any]) -> None:
        kind, content = record["kind"], record["content"]
        if kind not in AUDIT_KINDS or not isinstance(content, dict):
            self.problem(where, f"unknown kind {kind!r} or content that is not an object")
            return
        try:
            if kind == "run-start":
                self.privacy = content.get("privacy") or {}
                self.last_head = content.get("initial_head_sha256")
            elif kind == "round":
                self._round(where, content)
            elif kind == "run-end":
                self._end(where, content)
        except (KeyError, TypeError, ValueError, PrivacyError) as exc:
            self.problem(where, f"malformed {kind} record ({type(exc).__name__}: {exc})")

    def _round(self, where: str, content: dict[str, Any]) -> None:
        rec = content["record"]
        number = rec["round"]
        if number <= self.last_round:
            self.problem(where, f"round {number} comes after round {self.last_round}")
        self.last_round = number
        if number == 0:
            return
        self.report.rounds += 1
        if rec["head_sha256_before"] != self.last_head:
            self.problem(where, f"round {number} starts from head {str(rec['head_sha256_before'])[:16]}..., "
                                f"but the previous round ended at {str(self.last_head)[:16]}...")
        self.last_head = rec["head_sha256_after"]
        for name, site in sorted(rec["sites"].items()):
            train = site.get("train") or {}
            if train.get("accepted"):
                self._receipt(where, number, name, train)
                if train.get("privacy"):
                    self._record_level(where, number, name, train["privacy"])
        self._client_level(where, number, rec)

    def _receipt(self, where: str, number: int, name: str, train: dict[str, Any]) -> None:
        """The site's own signature of the update the log says it sent."""
        receipt = train.get("receipt")
        if not receipt:
            self.problem(where, f"round {number}, {name}: the update carries no site signature: nothing shows the site sent it")
            return
        key = self.site_keys.setdefault(name, receipt["public_key"])
        if receipt["public_key"] != key:
            how = "the pinned key" if name in self.pinned_sites else "the key of its earlier receipts"
            self.problem(where, f"round {number}, {name}: signed by key {receipt['public_key'][:16]}..., not {how} {key[:16]}...")
            return
        payload = receipt_payload(
            run_id=str(self.run_id), server_round=number, site=name, update_sha256=train["update_sha256"],
            num_examples=train["num_examples"], privacy=train.get("privacy"),
        )
        self.report.site_signatures += 1
        if not verify_hex(key, payload, receipt["signature"]):
            self.problem(where, f"round {number}, {name}: the site's signature does not match the update, examples "
                                "and privacy figures the log records for it")

    def _record_level(self, where: str, number: int, name: str, privacy: dict[str, Any]) -> None:
        target = self.privacy.get("target_epsilon")
        event = DPEvent.from_json(privacy["event"])
        events = self.site_events.setdefault(name, [])
        events.append(event)
        expected = independent_epsilon(events, delta=privacy["delta"], accountant=event.accountant)
        self.report.epsilons_checked += 1
        if not _close(privacy["epsilon_run"], expected, event.accountant):
            self.problem(where, f"round {number}, {name}: reported epsilon {privacy['epsilon_run']!r} for this run, "
                                f"but its {len(events)} recorded DP events give {expected:.6g}")
        if target is not None and privacy["epsilon_run"] > target * (1 + _REL):
            self.problem(where, f"round {number}, {name}: epsilon {privacy['epsilon_run']:.6g} exceeds the declared target {target:g}")
        if privacy["delta"] != self.privacy.get("target_delta"):
            self.problem(where, f"round {number}, {name}: delta {privacy['delta']!r} is not the declared {self.privacy.get('target_delta')!r}")

    def _client_level(self, where: str, number: int, rec: dict[str, Any]) -> None:
        central = rec.get("central_privacy")
        if self.privacy.get("dp") in ("central", "both") and not central:
            self.problem(where, f"round {number}: the run declares client-level DP, but the round records none")
        if not central:
            return
        self.central_releases += 1 if central["released"] else 0
        if central["releases"] != self.central_releases:
            self.problem(where, f"round {number}: {central['releases']} client-level releases reported, {self.central_releases} recorded")
        expected = independent_central_epsilon(central["noise_multiplier"], self.central_releases, central["delta"])
        self.report.epsilons_checked += 1
        if not _close(central["epsilon"], expected, "rdp"):
            self.problem(where, f"round {number}: reported client-level epsilon {central['epsilon']!r}, "
                                f"but {self.central_releases} releases at noise {central['noise_multiplier']:.6g} give {expected:.6g}")
        declared = self.privacy.get("central") or {}
        target = declared.get("planned_epsilon", self.privacy.get("target_epsilon"))
        if target is not None and central["epsilon"] > target * (1 + _REL):
            self.problem(where, f"round {number}: client-level epsilon {central['epsilon']:.6g} exceeds the declared budget {target:.6g}")
        if declared and central["noise_multiplier"] != declared.get("noise_multiplier"):
            self.problem(where, f"round {number}: noise multiplier {central['noise_multiplier']!r} is not the declared {declared.get('noise_multiplier')!r}")

    def _end(self, where: str, content: dict[str, Any]) -> None:
        if content["head_sha256"] != self.last_head:
            self.problem(where, f"the run ends at head {str(content['head_sha256'])[:16]}..., the last round at {str(self.last_head)[:16]}...")
        saved = sha256_safetensors(self.run_dir / "model" / "head.safetensors")
        if content.get("status") in ("finished", "degraded"):
            if saved is None:
                self.problem(where, "model/head.safetensors is missing")
            elif saved != self.last_head:
                self.problem(where, f"model/head.safetensors hashes to {saved[:16]}..., not the last round's head {str(self.last_head)[:16]}...")
        if content.get("saved_head_sha256") not in (None, saved):
            self.problem(where, "the saved head's hash in the run-end record is not the file's")


def verify_run(run_dir: Path, *, key: str | None = None, site_keys: Mapping[str, str] | None = None) -> AuditReport:
    """Verify ``run_dir``'s audit log (and saved head); ``key`` pins the server's key, ``site_keys`` sites' keys (hex)."""
    return _Verifier(Path(run_dir), key.lower() if key else None, site_keys or {}).run()


def cross_check(run_dir: Path, receipts: list[dict[str, Any]], site_key: str) -> tuple[list[str], list[str]]:
    """A site's own receipts against the run's audit log: (problems, one line per round that agrees).

    Every receipt of this run must match an accepted update in the log (same
    round, update hash, examples, epsilons and signature); every accepted update
    the log credits to the site's name must have a receipt. A receipt whose
    update the log records as rejected or failed, with its reasons, agrees.
    """
    lines = read_audit_lines(Path(run_dir) / AUDIT_FILE)
    records = [record for _, record, _ in lines if record is not None]
    run_id = records[0].get("run_id") if records else None
    mine = [r for r in receipts if r.get("run_id") == run_id and r.get("public_key") == site_key]
    names = {r.get("site") for r in mine}
    claimed: dict[int, tuple[int, dict[str, Any]]] = {}
    rejected: dict[int, list[str]] = {}
    for index, record in enumerate(records):
        content = record.get("content") or {}
        if record.get("kind") == "round":
            rec = content.get("record") or {}
            for name, site in (rec.get("sites") or {}).items():
                train = site.get("train") or {}
                if train.get("accepted") and (name in names or (train.get("receipt") or {}).get("public_key") == site_key):
                    claimed[rec.get("round")] = (index, train)
        elif record.get("kind") == "problem" and content.get("site") in names and content.get("phase") == "train":
            rejected.setdefault(content.get("round"), []).extend(content.get("reasons") or [])
    problems: list[str] = []
    agreed: list[str] = []
    for receipt in mine:
        number = receipt.get("server_round")
        if number not in claimed:
            if number in rejected:
                agreed.append(f"round {number}: not aggregated, as the log says: {'; '.join(rejected[number])[:200]}")
            else:
                problems.append(f"round {number}: the site signed update {str(receipt.get('update_sha256'))[:16]}..., "
                                "the log records neither it nor its rejection")
            continue
        index, train = claimed.pop(number)
        differs = [k for k in ("update_sha256", "num_examples", "privacy") if train.get(k) != receipt.get(k)]
        if (train.get("receipt") or {}).get("signature") != receipt.get("signature"):
            differs.append("signature")
        if differs:
            problems.append(f"record {index}: round {number}: the log's {', '.join(differs)} differ from the site's receipt")
        else:
            agreed.append(f"round {number}: update {str(receipt.get('update_sha256'))[:16]}... as the site signed it")
    for number, (index, _) in sorted(claimed.items()):
        problems.append(f"record {index}: round {number}: the log credits the site with an update it has no receipt for")
    if not mine:
        problems.append(f"the site's ledger holds no receipt signed with its key for run {run_id}")
    return problems, agreed
