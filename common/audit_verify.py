"""``fedhead audit verify``: everything an auditor can check in a run folder without trusting its server.

Checked, record by record: the JSON, the sequence numbers, the hash chain,
each record's own hash and the server's signature (with the key in the
run-start record, or a pinned one); the run id; the order of kinds (run-start
first, run-end last); each round's "before" head hash against the previous
round's "after" (round 1 against the initial head); the saved head's hash
against the last round's and the run-end record's; the exported model files
and ``summary.json`` against the run-end record; the run folder's
``server.pub`` against the log's key (unless one is pinned); and every epsilon the log
reports, recomputed from the recorded DP events with an accountant other than
the one that produced it (record-level: Google's ``dp-accounting`` for
fedhead's Opacus figures; client-level: Opacus for Flower's figures), and held
against the budgets the run-start record declares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.audit_log import AUDIT_FILE, AUDIT_KINDS, GENESIS, SERVER_PUB_FILE, format_line, read_audit_lines, record_sha256
from common.config import is_plain_name
from common.errors import ConfigError
from common.hashing import sha256_file, sha256_safetensors
from common.privacy import PRV_EPS_ERROR, DPEvent, independent_central_epsilon, independent_epsilon
from common.protocol import receipt_payload
from common.signing import load_public_key, verify_hex

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
    trust: str = ""  # which keys were pinned by the auditor and which taken from the log
    model_files: int = 0  # exported model files (model.pt2, model.onnx, manifest.json) that match the signed hashes

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_line(self, run_dir: Path) -> str:
        """One line: what holds, or how many problems."""
        if self.ok:
            return (
                f"{run_dir}: audit log verified: {self.records} records, {self.rounds} rounds, "
                f"{self.site_signatures} site signatures, {self.epsilons_checked} epsilons and "
                f"{self.model_files} exported model files checked, "
                f"signed by {self.signer[:16]}... ({self.trust})"
            )
        return f"{run_dir}: {len(self.problems)} problem(s) in the audit log"


def _close(reported: Any, expected: float, accountant: str) -> bool:
    if not isinstance(reported, (int, float)) or isinstance(reported, bool) or not math.isfinite(reported):
        return False
    if accountant == "prv":  # Opacus's PRV is an upper bound within PRV_EPS_ERROR of the PLD figure
        return expected * (1 - _REL) - 1e-9 <= reported <= expected + PRV_EPS_ERROR + _REL * expected
    return abs(reported - expected) <= _REL * max(abs(expected), 1e-12)


_WEIGHT_TOLERANCE = 1e-9
# A recorded DP event is recomputed only within these bounds (the independent PLD accountant takes about 7 s for noise
# multiplier 0.3 and 300 steps at sample rate 1/15, and runs out of memory on a hostile 1e11 steps).
MIN_AUDITED_NOISE = 0.3
MAX_AUDITED_STEPS = 1_000_000


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


class _Verifier:
    def __init__(self, run_dir: Path, pinned_key: str | None, site_keys: Mapping[str, str]) -> None:
        self.run_dir, self.pinned_key = run_dir, pinned_key
        self.site_keys = dict(site_keys)  # site -> public key: pinned, else the first one its receipts show
        self.pinned_sites = set(site_keys)
        self.report = AuditReport()
        self.key: str | None = pinned_key
        self.run_id: str | None = None
        self.privacy: Mapping[str, Any] = {}
        self.central: Mapping[str, Any] = {}  # client-level DP as declared at run start
        self.last_head: str | None = None
        self.last_round = -1
        self.site_events: dict[str, list[DPEvent]] = {}
        self.site_release: dict[str, DPEvent] = {}  # each site's feature-mean release in this run, counted once
        self.site_epsilon: dict[str, float] = {}
        self.central_releases = 0
        self.central_epsilon: float | None = None
        self.rounds_aggregated = 0
        self.classes: list[Any] | None = None  # the run's classes, as its run-start record declares them

    def problem(self, where: str, message: str) -> None:
        self.report.problems.append(f"{where}: {message}")

    def run(self) -> AuditReport:
        path = self.run_dir / AUDIT_FILE
        if not path.is_file():
            self.problem(str(path), "no audit log")
            return self.report
        lines = read_audit_lines(path)
        if not any(line.strip() for _, _, line in lines):
            self.problem(AUDIT_FILE, "the log is empty (no records): the run wrote none, or the file was emptied; "
                                     "there is nothing to verify without the log the run's server wrote")
            return self.report
        if not _ends_with_newline(path):
            self.problem(f"record {len(lines) - 1} (line {len(lines)})", "the last line has no newline: the log was cut off mid-write, or edited")
        prev: str | None = GENESIS
        kinds: list[tuple[int, str]] = []
        for index, (number, record, line) in enumerate(lines):
            where = f"record {index} (line {number})"
            if record is None:
                self.problem(where, "not a JSON object; the line was damaged or cut off")
                prev = None
                continue
            try:
                self._record(where, index, record, line, prev)
                kinds.append((index, str(record.get("kind"))))
            except Exception as exc:  # a hostile log gets a problem line, never a traceback
                self.problem(where, f"malformed record ({type(exc).__name__}: {str(exc)[:200]})")
            prev = record.get("sha256") if isinstance(record.get("sha256"), str) else None
        self.report.records = len(lines)
        self._kinds(kinds, len(lines))
        self.report.signer = self.key
        folder_key = self._folder_key()
        unpinned = sorted(set(self.site_keys) - self.pinned_sites)
        self.report.trust = (
            f"server key {'pinned' if self.pinned_key else 'as the log names it'}"
            + (f" and as {SERVER_PUB_FILE} holds it" if folder_key else "") + "; "
            + (f"site keys of {', '.join(unpinned)} as first seen in the log" if unpinned else "every site key pinned")
        )
        return self.report

    def _folder_key(self) -> str | None:
        """The run folder's ``server.pub``, held against the key the log names (unless the auditor pinned one)."""
        path = self.run_dir / SERVER_PUB_FILE
        if self.pinned_key or not path.is_file():
            return None
        try:
            folder_key = load_public_key(path)
        except (OSError, ConfigError) as exc:
            self.problem(SERVER_PUB_FILE, f"cannot be read as the server's public key ({exc}); pin the key you trust with --key")
            return None
        if self.key and folder_key != self.key:
            self.problem(SERVER_PUB_FILE, f"holds key {folder_key[:16]}..., but the log is signed by {self.key[:16]}...: "
                                          "one of them was replaced; pin the server key you trust with --key")
            return None
        return folder_key

    def _kinds(self, kinds: list[tuple[int, str]], count: int) -> None:
        """Exactly one run-start, first, and one run-end, last."""
        starts = [i for i, kind in kinds if kind == "run-start"]
        ends = [i for i, kind in kinds if kind == "run-end"]
        if starts != [0]:
            where = f"record {starts[1] if len(starts) > 1 else 0} (line {(starts[1] if len(starts) > 1 else 0) + 1})"
            self.problem(where, "the log must begin with its one run-start record" + (f"; found run-start at records {starts}" if starts else ""))
        last = count - 1
        if ends != [last]:
            self.problem(f"record {last} (line {count})", "the log does not end with its one run-end record: the run did not "
                         "end, or records were cut off or added" + (f"; found run-end at records {ends}" if ends else ""))

    def _record(self, where: str, index: int, record: dict[str, Any], line: str, prev: str | None) -> None:
        missing = [f for f in _FIELDS if f not in record]
        if missing:
            self.problem(where, f"missing field(s) {', '.join(missing)}")
            return
        if line != format_line(record):
            self.problem(where, "the line's bytes are not its record's canonical form: it was edited")
        self._envelope(where, index, record, prev)
        self._content(where, index, record)

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
            self.key = self.key or (declared if isinstance(declared, str) else None)
        signed = str(record["sha256"]).encode("utf-8")
        if not self.key or not verify_hex(self.key, signed, str(record["signature"])):
            self.problem(where, "the server's signature does not verify")
        if self.run_id is None:
            self.run_id = str(record["run_id"])
        elif record["run_id"] != self.run_id:
            self.problem(where, f"run id {record['run_id']!r} is not the run's {self.run_id!r}")

    def _content(self, where: str, index: int, record: dict[str, Any]) -> None:
        kind, content = record["kind"], record["content"]
        if kind not in AUDIT_KINDS or not isinstance(content, dict):
            self.problem(where, f"unknown kind {kind!r} or content that is not an object")
            return
        if kind == "run-start":
            if index == 0:
                self._start(where, content)
        elif kind == "round":
            self._round(where, content)
        elif kind == "problem":
            self._problem_record(where, content)
        else:
            self._end(where, content)

    def _start(self, where: str, content: dict[str, Any]) -> None:
        """The declared privacy; a declared client-level budget must be what its noise gives over the run."""
        self.privacy = dict(content["privacy"] or {})
        self.classes = content["classes"] if isinstance(content["classes"], list) else None
        self.last_head = content["initial_head_sha256"]
        self.central = dict(self.privacy.get("central") or {})
        if self.privacy.get("dp") in ("central", "both") and not self.central:
            self.problem(where, "the run declares client-level DP but not its mechanism")
        if self.central:
            planned = independent_central_epsilon(self.central["noise_multiplier"], content["num_server_rounds"], self.central["delta"])
            self.report.epsilons_checked += 1
            if not _close(self.central["planned_epsilon"], planned, "rdp"):
                self.problem(where, f"the declared client-level budget {self.central['planned_epsilon']!r} is not what noise "
                                    f"{self.central['noise_multiplier']!r} gives over {content['num_server_rounds']} rounds ({planned:.6g})")
            if self.central["delta"] != self.privacy.get("target_delta"):
                self.problem(where, "the client-level delta is not the run's target delta")

    def _problem_record(self, where: str, content: dict[str, Any]) -> None:
        ok = (
            isinstance(content.get("round"), int) and isinstance(content.get("node_id"), int)
            and isinstance(content.get("site"), str) and content.get("phase") in ("train", "evaluate")
            and content.get("kind") in ("failed", "rejected", "refused", "missing")
            and isinstance(content.get("reasons"), list) and all(isinstance(r, str) for r in content["reasons"])
        )
        if not ok:
            self.problem(where, "a problem record needs round, node_id, site, phase, kind and reasons")

    def _round(self, where: str, content: dict[str, Any]) -> None:
        rec = content["record"]
        number = rec["round"]
        if not isinstance(number, int) or number <= self.last_round:
            self.problem(where, f"round {number!r} comes after round {self.last_round}")
            return
        self.last_round = number
        aggregated = list(rec["aggregated_sites"])
        if number == 0:
            if aggregated or rec.get("central_privacy") or rec.get("head_sha256_after") not in (None, self.last_head):
                self.problem(where, "round 0 evaluates the initial head only; this one aggregates or changes it")
            return
        self.report.rounds += 1
        if rec["head_sha256_before"] != self.last_head:
            self.problem(where, f"round {number} starts from head {str(rec['head_sha256_before'])[:16]}..., "
                                f"but the previous round ended at {str(self.last_head)[:16]}...")
        self.last_head = rec["head_sha256_after"]
        changed = rec["head_sha256_after"] != rec["head_sha256_before"]
        if aggregated:
            self.rounds_aggregated += 1
        elif changed:
            self.problem(where, f"round {number}: the head changed, but no site's update was aggregated")
        sites = rec["sites"]
        records_dp = self.privacy.get("dp") in ("sample", "both")
        for name in aggregated:
            train = (sites.get(name) or {}).get("train") or {}
            if not train.get("accepted"):
                self.problem(where, f"round {number}, {name}: aggregated without an accepted update")
            elif records_dp and not train.get("privacy"):
                self.problem(where, f"round {number}, {name}: aggregated without the record-level DP the run declares")
        for name, site in sorted(sites.items()):
            train = site.get("train") or {}
            if train.get("accepted"):
                self._receipt(where, number, name, train)
                if train.get("privacy"):
                    self._record_level(where, number, name, train["privacy"])
        self._aggregation(where, number, rec, content["aggregation"])
        self._client_level(where, number, rec, changed)

    def _aggregation(self, where: str, number: int, rec: dict[str, Any], aggregation: dict[str, Any]) -> None:
        """The weights the log says it used: equal under client-level DP, else each site's share of the examples."""
        if aggregation["central_dp"] != rec.get("central_privacy"):
            self.problem(where, f"round {number}: the aggregation's client-level DP is not the round record's")
        weights = aggregation["weights"]
        aggregated = rec["aggregated_sites"]
        if weights is None:
            if self.central and aggregated:
                self.problem(where, f"round {number}: client-level DP needs equal weights, none are recorded")
            return
        if set(weights) != set(aggregated):
            self.problem(where, f"round {number}: weights are given for {sorted(weights)}, the aggregated sites are {sorted(aggregated)}")
            return
        if self.central:
            expected = {name: 1 / len(aggregated) for name in aggregated}
        else:
            examples = {name: rec["sites"][name]["train"]["num_examples"] for name in aggregated}
            expected = {name: n / sum(examples.values()) for name, n in examples.items()}
        if any(abs(_number(weights[name]) - expected[name]) > _WEIGHT_TOLERANCE for name in aggregated):
            self.problem(where, f"round {number}: weights {weights} are not the {'equal' if self.central else 'example-weighted'} ones")

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
        """A site's epsilon for this run: at least what its recorded events compose to (a rejected round also spends)."""
        target = self.privacy.get("target_epsilon")
        event = DPEvent.from_json(privacy["event"])
        release = DPEvent.from_json(privacy["feature_mean_release"]) if "feature_mean_release" in privacy else None
        for each in (event, release):
            if each is not None and (each.noise_multiplier < MIN_AUDITED_NOISE or each.steps > MAX_AUDITED_STEPS):
                # Such an event's epsilon is in the hundreds; recomputing it can take the accountant hours and gigabytes.
                self.problem(where, f"round {number}, {name}: DP event with noise multiplier {each.noise_multiplier:g} and "
                                    f"{each.steps} steps, outside what is recomputed (noise multiplier >= {MIN_AUDITED_NOISE:g}, "
                                    f"steps <= {MAX_AUDITED_STEPS:,}): this site's privacy is unverified")
                return
        if release is not None and not self._one_release(where, number, name, release, event):
            return
        events = self.site_events.setdefault(name, [])
        events.append(event)
        if name in self.site_release:
            events = [self.site_release[name], *events]
        expected = independent_epsilon(events, delta=privacy["delta"], accountant=event.accountant)
        reported = _number(privacy["epsilon_run"])
        self.report.epsilons_checked += 1
        low = expected * (1 - _REL) - (PRV_EPS_ERROR if event.accountant == "prv" else 0.0)
        if reported is None or reported < low:
            self.problem(where, f"round {number}, {name}: reported epsilon {privacy['epsilon_run']!r} for this run, "
                                f"but its {len(events)} recorded DP events give {expected:.6g}")
            return
        self.site_epsilon[name] = reported
        if target is not None and reported > target * (1 + _REL):
            self.problem(where, f"round {number}, {name}: epsilon {reported:.6g} exceeds the declared target {target:g}")
        if privacy["delta"] != self.privacy.get("target_delta"):
            self.problem(where, f"round {number}, {name}: delta {privacy['delta']!r} is not the declared {self.privacy.get('target_delta')!r}")

    def _one_release(self, where: str, number: int, name: str, release: DPEvent, event: DPEvent) -> bool:
        """A site's feature-mean release: the Gaussian mechanism once (rate 1, one step, the run's accountant), one a run."""
        if release.sample_rate != 1.0 or release.steps != 1 or release.accountant != event.accountant:
            self.problem(where, f"round {number}, {name}: the feature-mean release {release.to_json()} is not one Gaussian "
                                f"release (sample rate 1, one step, accountant {event.accountant})")
            return False
        first = self.site_release.setdefault(name, release)
        if first != release:
            self.problem(where, f"round {number}, {name}: a second, different feature-mean release in this run "
                                f"({release.to_json()}, after {first.to_json()})")
            return False
        return True

    def _client_level(self, where: str, number: int, rec: dict[str, Any], changed: bool) -> None:
        central = rec.get("central_privacy")
        if self.central and not central:
            self.problem(where, f"round {number}: the run declares client-level DP, but the round records none")
        if not central:
            return
        if not self.central:
            self.problem(where, f"round {number}: a client-level release the run never declared")
            return
        for key in ("clipping", "clip_norm", "noise_multiplier", "sites_per_round", "delta"):
            if central[key] != self.central.get(key):
                self.problem(where, f"round {number}: client-level {key} {central[key]!r} is not the declared {self.central.get(key)!r}")
        released = central["released"] is True
        if released != changed:
            self.problem(where, f"round {number}: released={central['released']!r}, but the head {'changed' if changed else 'did not change'}")
        if released and len(rec["aggregated_sites"]) != self.central.get("sites_per_round"):
            self.problem(where, f"round {number}: released the mean of {len(rec['aggregated_sites'])} sites, noise calibrated for {self.central.get('sites_per_round')}")
        self.central_releases += 1 if released else 0
        if central["releases"] != self.central_releases:
            self.problem(where, f"round {number}: {central['releases']} client-level releases reported, {self.central_releases} recorded")
        expected = independent_central_epsilon(self.central["noise_multiplier"], self.central_releases, self.central["delta"])
        self.report.epsilons_checked += 1
        if not _close(central["epsilon"], expected, "rdp"):
            self.problem(where, f"round {number}: reported client-level epsilon {central['epsilon']!r}, "
                                f"but {self.central_releases} releases at noise {self.central['noise_multiplier']:.6g} give {expected:.6g}")
        self.central_epsilon = expected
        if expected > self.central["planned_epsilon"] * (1 + _REL):
            self.problem(where, f"round {number}: client-level epsilon {expected:.6g} exceeds the declared budget {self.central['planned_epsilon']:.6g}")

    def _end(self, where: str, content: dict[str, Any]) -> None:
        if content["head_sha256"] != self.last_head:
            self.problem(where, f"the run ends at head {str(content['head_sha256'])[:16]}..., the last round at {str(self.last_head)[:16]}...")
        try:
            saved = sha256_safetensors(self.run_dir / "model" / "head.safetensors")
        except Exception as exc:  # a damaged file is a finding, not a crash
            self.problem(where, f"model/head.safetensors cannot be read ({type(exc).__name__})")
            return
        if saved is None and content["status"] in ("finished", "degraded"):
            self.problem(where, f"the run ended {content['status']}, but model/head.safetensors is missing")
        if saved is not None and saved != self.last_head:
            self.problem(where, f"model/head.safetensors hashes to {saved[:16]}..., not the last round's head {str(self.last_head)[:16]}...")
        if content["saved_head_sha256"] != saved:
            self.problem(where, "the saved head's hash in the run-end record is not the file's")
        if content["rounds_completed"] != self.rounds_aggregated:
            self.problem(where, f"rounds_completed {content['rounds_completed']!r}, but {self.rounds_aggregated} rounds aggregated")
        if not _same(content["client_epsilon"], self.central_epsilon):
            self.problem(where, f"client_epsilon {content['client_epsilon']!r} is not the last round's {self.central_epsilon!r}")
        largest = max(self.site_epsilon.values(), default=None)
        if not _same(content["max_epsilon"], largest):
            self.problem(where, f"max_epsilon {content['max_epsilon']!r} is not the largest site epsilon {largest!r}")
        if content.get("confusion_matrix") is not None:
            self._confusion(where, content["confusion_matrix"], content["accuracy"])
        self._model_files(where, content.get("model_files"))
        self._summary_file(content)

    def _model_files(self, where: str, files: Any) -> None:
        """Each exported file (model.pt2, model.onnx, manifest.json) against the hash the run-end record signed."""
        if files is None:  # a log from before the exported files were hashed
            return
        if not isinstance(files, dict):
            self.problem(where, f"model_files is a {type(files).__name__}, not a mapping of file names to sha256")
            return
        for name, digest in sorted(files.items()):
            path = self.run_dir / "model" / name
            if not is_plain_name(name) or not path.is_file():
                self.problem(where, f"model/{name}, which the run-end record lists, is missing")
            elif sha256_file(path) != digest:
                self.problem(where, f"model/{name} hashes to {sha256_file(path)[:16]}..., not the {str(digest)[:16]}... "
                                    "the run-end record signed: it was changed after the run")
            else:
                self.report.model_files += 1

    def _summary_file(self, end: dict[str, Any]) -> None:
        """summary.json, which `fedhead show` prints, must say what the signed run-end record says."""
        path = self.run_dir / "summary.json"
        if not path.exists():
            return
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            self.problem("summary.json", f"cannot be read as JSON ({exc}); the signed run-end record holds the run's figures")
            return
        if not isinstance(summary, dict):
            self.problem("summary.json", "is not a JSON object")
            return
        for key in ("status", "rounds_completed", "head_sha256", "accuracy", "max_epsilon", "client_epsilon"):
            if key in end and summary.get(key) != end[key]:
                self.problem("summary.json", f"{key} {summary.get(key)!r} is not the signed run-end record's {end[key]!r}: "
                                             "the file was changed after the run")

    def _confusion(self, where: str, confusion: Any, accuracy: Any) -> None:
        """The held-out confusion matrix: square over the run's classes, its diagonal giving the reported accuracy."""
        classes = self.classes
        counts = confusion.get("counts") if isinstance(confusion, dict) else None
        n = len(classes) if isinstance(classes, list) else -1
        if (not isinstance(counts, list) or len(counts) != n or confusion.get("classes") != classes or not all(
                isinstance(row, list) and len(row) == n and all(isinstance(c, int) and c >= 0 for c in row) for row in counts)):
            self.problem(where, f"the confusion matrix is not {n} x {n} counts over the run's classes")
            return
        total = sum(map(sum, counts))
        correct = sum(counts[i][i] for i in range(n))
        if not total or not isinstance(accuracy, float) or abs(correct / total - accuracy) > 1e-9:
            self.problem(where, f"the confusion matrix gives accuracy {correct}/{total}, the run-end record {accuracy!r}")


def _same(reported: Any, expected: float | None) -> bool:
    if expected is None:
        return reported is None
    return _close(reported, expected, "rdp")


def _receipt_signed(receipt: dict[str, Any], site_key: str) -> bool:
    """Whether a receipt's signature is the site's over its own run, round, site, update, examples and privacy."""
    try:
        payload = receipt_payload(
            run_id=str(receipt["run_id"]), server_round=receipt["server_round"], site=receipt["site"],
            update_sha256=receipt.get("update_sha256"), num_examples=receipt.get("num_examples"), privacy=receipt.get("privacy"),
        )
        return verify_hex(site_key, payload, str(receipt.get("signature")))
    except Exception:  # a malformed field cannot carry a valid signature
        return False


def verify_run(run_dir: Path, *, key: str | None = None, site_keys: Mapping[str, str] | None = None) -> AuditReport:
    """Verify ``run_dir``'s audit log (and saved head); ``key`` pins the server's key, ``site_keys`` sites' keys (hex)."""
    return _Verifier(Path(run_dir), key.lower() if key else None, site_keys or {}).run()


def cross_check(run_dir: Path, receipts: list[dict[str, Any]], site_key: str) -> tuple[list[str], list[str]]:
    """A site's own receipts against the run's audit log: (problems, one line per round that agrees).

    Every receipt of this run must match an accepted update in the log (same
    round, update hash, examples, epsilons and signature); every accepted update
    the log credits to the site's name must have a receipt. A receipt whose
    update the log records as rejected or failed, with its reasons, agrees.
    It reads the log as it is: run :func:`verify_run` for its chain and signatures.
    """
    lines = read_audit_lines(Path(run_dir) / AUDIT_FILE)
    records = [record for _, record, _ in lines if record is not None]
    run_id = records[0].get("run_id") if records else None
    problems: list[str] = []
    mine = []
    for number, r in enumerate(receipts, 1):
        if not (isinstance(r, dict) and r.get("run_id") == run_id and r.get("public_key") == site_key):
            continue  # another run's, or another key's
        if isinstance(r.get("site"), str) and type(r.get("server_round")) is int:
            mine.append(r)
        else:
            problems.append(f"receipt {number}: its site {str(r.get('site'))[:40]!r} or round {str(r.get('server_round'))[:40]!r} "
                            "is malformed: the site's ledger is damaged")
    names = {r["site"] for r in mine}
    claimed: dict[int, tuple[int, dict[str, Any]]] = {}
    rejected: dict[int, list[str]] = {}
    for index, record in enumerate(records):
        content = record.get("content")
        if not isinstance(content, dict):
            continue
        if record.get("kind") == "round":
            rec = content.get("record")
            sites = rec.get("sites") if isinstance(rec, dict) else None
            for name, site in (sites.items() if isinstance(sites, dict) else ()):
                train = site.get("train") if isinstance(site, dict) else None
                if not isinstance(train, dict) or not train.get("accepted") or not isinstance(rec.get("round"), int):
                    continue
                receipt = train.get("receipt") if isinstance(train.get("receipt"), dict) else {}
                if name in names or receipt.get("public_key") == site_key:
                    claimed[rec["round"]] = (index, train)
        elif (record.get("kind") == "problem" and isinstance(content.get("site"), str) and content["site"] in names
              and content.get("phase") == "train"
              and isinstance(content.get("round"), int) and isinstance(content.get("reasons"), list)):
            rejected.setdefault(content["round"], []).extend(str(r) for r in content["reasons"])
    agreed: list[str] = []
    for receipt in mine:
        number = receipt["server_round"]
        if not _receipt_signed(receipt, site_key):  # the ledger itself was changed: the log is not to blame
            problems.append(f"receipt of round {number}: its signature does not match its own contents: "
                            "the site's ledger was changed after the site signed it")
            claimed.pop(number, None)
            continue
        if number not in claimed:
            if number in rejected:
                agreed.append(f"round {number}: not aggregated, as the log says: {'; '.join(rejected[number])[:200]}")
            else:
                problems.append(f"round {number}: the site signed update {str(receipt.get('update_sha256'))[:16]}..., "
                                "the log records neither it nor its rejection")
            continue
        index, train = claimed.pop(number)
        differs = [k for k in ("update_sha256", "num_examples", "privacy") if train.get(k) != receipt.get(k)]
        signed = train.get("receipt") if isinstance(train.get("receipt"), dict) else {}
        if signed.get("signature") != receipt.get("signature"):
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


def _ends_with_newline(path: Path) -> bool:
    """Whether the file's last byte is ``\n`` (read alone: the log was just read whole)."""
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"
