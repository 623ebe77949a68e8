"""``fedhead report``: one self-contained HTML page of a run, for a researcher and a privacy auditor.

The page is built from the run's signed audit log when it has one (the round
records as the server signed them, checked by :func:`common.audit_verify.verify_run`
first), else from ``metrics.jsonl``. A figure the log lacks (its run-start or
run-end record is missing) is taken from ``summary.json`` and marked unsigned
where it is shown. Everything is inline: the figures are PNG data URIs and a
Content-Security-Policy forbids the page any request.

It holds what the log holds and no more: counts, scores, hashes, norms and
privacy figures. No image, feature or per-example value, and no path: free
text quoted from a failure (an error or a site's reason) has anything that
looks like an absolute path replaced by ``<path>``.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from common.audit_log import AUDIT_FILE, read_audit_lines
from common.audit_verify import AuditReport, verify_run
from common.errors import DataError
from common.files import write_bytes_atomic
from common.metrics import recall_by_class
from common.round_record import RoundRecord, load_round_records
from server.formatting import percent, site_order
from server.plots import (
    epsilon_figure,
    metric_figure,
    participation_figure,
    png_bytes,
    update_norms_figure,
)

__all__ = ["RunEvidence", "load_evidence", "render_report", "write_report", "check_report_path", "redact_paths", "REPORT_FILE"]

REPORT_FILE = "report.html"  # in the run folder, unless told otherwise
_TEMPLATES = Path(__file__).parent / "templates"
_UNSIGNED = "from summary.json, not signed"  # beside every figure the signed log does not hold
_PATH = re.compile(r"(?<![\w.:/-])(?:~|[A-Za-z]:)?(?:[/\\][\w.@+-]+){2,}[/\\]?")


def redact_paths(text: Any) -> str:
    """``text`` with every absolute-looking path (two or more components) replaced by ``<path>``."""
    return _PATH.sub("<path>", str(text))


@dataclass
class RunEvidence:
    """What a run folder says about its run: the round records and where they came from, and its verification."""

    name: str
    records: list[RoundRecord]
    source: str  # "audit log" or "metrics.jsonl"
    run_id: str = ""
    start: dict[str, Any] = field(default_factory=dict)  # the run-start record's content (empty without one)
    end: dict[str, Any] = field(default_factory=dict)  # the run-end record's content, else summary.json
    verification: AuditReport | None = None  # None: the run has no audit log
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json, as the run folder holds it
    end_signed: bool = False  # whether ``end`` is the log's run-end record (else summary.json, unsigned)

    def missing_records(self) -> list[str]:
        """The log's records whose figures this page takes from summary.json instead (none without a log)."""
        if self.verification is None:
            return []
        return [name for name, present in (("run-start", bool(self.start)), ("run-end", self.end_signed)) if not present]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _require_run_folder(run_dir: Path) -> None:
    """DataError unless ``run_dir`` holds an audit log or ``metrics.jsonl``."""
    if not ((run_dir / AUDIT_FILE).is_file() or (run_dir / "metrics.jsonl").is_file()):
        raise DataError(f"{run_dir} is not a run folder (no {AUDIT_FILE} or metrics.jsonl in it)")


def load_evidence(run_dir: Path, *, key: str | None = None, site_keys: dict[str, str] | None = None) -> RunEvidence:
    """Verify ``run_dir``'s audit log and read its records; a run without a log falls back to ``metrics.jsonl``.

    Raises DataError when the folder holds neither.
    """
    run_dir = Path(run_dir)
    _require_run_folder(run_dir)
    summary = _json(run_dir / "summary.json")
    if (run_dir / AUDIT_FILE).is_file():
        verification = verify_run(run_dir, key=key, site_keys=site_keys)
        start, end, records, run_id = {}, None, [], ""
        for _, record, _ in read_audit_lines(run_dir / AUDIT_FILE):
            content = record.get("content") if isinstance(record, dict) else None
            if not isinstance(content, dict):
                continue
            if record.get("kind") == "run-start" and not start:
                start, run_id = content, str(record.get("run_id", ""))
            elif record.get("kind") == "round":
                try:
                    records.append(RoundRecord.from_json(content["record"]))
                except (KeyError, TypeError, AttributeError):
                    continue  # the verifier has named it
            elif record.get("kind") == "run-end":
                end = content
        return RunEvidence(run_dir.name, records, "audit log", run_id, start, summary if end is None else end,
                           verification, summary, end_signed=end is not None)
    return RunEvidence(run_dir.name, load_round_records(run_dir / "metrics.jsonl"), "metrics.jsonl", end=summary, summary=summary)


def _data_uri(fig) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig)).decode("ascii")


def _short(sha: Any) -> str:
    return f"{sha[:12]}" if isinstance(sha, str) else "-"


def _facts(ev: RunEvidence, summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The run's facts, one (label, value, note) per row; the note says when a value is not from the signed log."""
    start, end = ev.start, ev.end
    first = start or summary  # without a run-start record, its facts come from summary.json
    from_start = "" if start else _UNSIGNED
    from_end = "" if ev.end_signed else _UNSIGNED
    privacy = first.get("privacy") or {}
    versions, from_versions = first.get("versions") or {}, from_start
    if not versions and summary.get("versions"):  # a run-start record without versions: summary.json's, unsigned
        versions, from_versions = summary["versions"], _UNSIGNED
    rows = [
        ("run", ev.name, ""),
        ("run id", ev.run_id or "-", ""),
        ("status", str(end.get("status") or "-"), from_end),
        ("rounds", f"{end.get('rounds_completed', '-')} of {first.get('num_server_rounds', '-')} aggregated", from_end or from_start),
        ("strategy", str(first.get("strategy") or "-"), from_start),
        ("backbone", f"{first.get('backbone') or '-'} (weights sha256 {_short(first.get('weights_sha256'))}...)", from_start),
        ("classes", ", ".join(map(str, start.get("classes") or [])) or "-", ""),
    ]
    accuracy = end.get("accuracy")
    if isinstance(accuracy, (int, float)):
        rows.append(("final accuracy", f"{100 * accuracy:.2f}% on the {summary.get('evaluated_on') or 'evaluation set'}", from_end))
    dp = privacy.get("dp") or first.get("dp") or "none"
    rows.append(("differential privacy", {"none": "none", "sample": "record-level (DP-SGD at each site)",
                                          "central": "client-level (noise at the server)",
                                          "both": "record-level at the sites and client-level at the server"}.get(dp, dp), from_start))
    if end.get("max_epsilon") is not None:
        rows.append(("record-level epsilon", f"largest at a site {end['max_epsilon']:.3f} (target {privacy.get('target_epsilon', '-')}, "
                                             f"delta {privacy.get('target_delta', '-')})", from_end or from_start))
    central = privacy.get("central") or {}
    if central:
        spent = end.get("client_epsilon")
        rows.append(("client-level DP", f"noise multiplier {central.get('noise_multiplier', 0):.4g}, clip norm {central.get('clip_norm')} "
                                        f"({central.get('clipping')}-side), {central.get('sites_per_round')} sites per round, "
                                        f"epsilon {spent if spent is None else f'{spent:.3f}'} of {central.get('planned_epsilon', 0):.3f} planned",
                     from_end or from_start))
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v), from_versions))
    if end.get("error"):
        rows.append(("error", redact_paths(end["error"]), from_end))
    return [(label, value, note if value != "-" else "") for label, value, note in rows]


_UNREADABLE = (TypeError, KeyError, AttributeError, ValueError)  # what a hostile record's odd types raise


def _round_rows(records: list[RoundRecord]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        try:
            rows.append(_round_row(r))
        except _UNREADABLE as exc:
            rows.append({"round": r.round, "seconds": "-", "sampled": "-", "aggregated": "-", "head": "-",
                         "problems": [{"site": "-", "phase": "-", "kind": "rejected",
                                       "reason": f"this round's record cannot be shown ({type(exc).__name__}); see Verification"}],
                         "test_accuracy": "-", "test_loss": "-", "site_accuracy": "-", "record_epsilon": "-", "client_epsilon": "-"})
    return rows


def _round_row(r: RoundRecord) -> dict[str, Any]:
    site_eps = [s.train.privacy["epsilon_run"] for s in r.sites.values() if s.train and s.train.accepted and s.train.privacy]
    return {
        "round": r.round,
        "seconds": f"{r.wall_seconds:.1f}",
        "sampled": len(r.sampled_nodes),
        "aggregated": ", ".join(sorted(r.aggregated_sites, key=site_order)) or ("-" if r.round else "initial model"),
        "problems": [{"site": p.site, "phase": p.phase, "kind": p.kind, "reason": redact_paths("; ".join(p.reasons))} for p in r.problems],
        "head": f"{_short(r.head_sha256_before)} → {_short(r.head_sha256_after)}" if r.round else _short(r.head_sha256_after),
        "test_accuracy": percent(r.central_eval.get("accuracy")),
        "test_loss": _num(r.central_eval.get("loss")),
        "site_accuracy": percent(r.federated_eval.get("accuracy")),
        "record_epsilon": _num(max(site_eps)) if site_eps else "-",
        "client_epsilon": _num(r.central_privacy.get("epsilon")) if r.central_privacy else "-",
    }


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "-"


def _shade(value: float | None) -> str:
    """A background from red (0) through yellow to green (1)."""
    if value is None:
        return "#f6f6f6"
    hue = int(120 * max(0.0, min(1.0, value)))
    return f"hsl({hue}, 65%, 80%)"


def _confusion(end: dict[str, Any]) -> dict[str, Any] | None:
    confusion = end.get("confusion_matrix")
    if not isinstance(confusion, dict) or not isinstance(confusion.get("counts"), list):
        return None
    classes, counts = [str(c) for c in confusion.get("classes", [])], confusion["counts"]
    rows = []
    for k, (name, row) in enumerate(zip(classes, counts)):
        total = sum(row) or 1
        # the diagonal shaded by the class's recall; a mistake by the share of the class it takes, in red
        cells = [{"count": c, "shade": _shade(c / total) if i == k else f"hsl(0, 70%, {100 - int(40 * c / total)}%)"}
                 for i, c in enumerate(row)]
        rows.append({"name": name, "cells": cells, "support": sum(row)})
    return {"classes": classes, "rows": rows}


def _fairness(records: list[RoundRecord], classes: list[str], end: dict[str, Any]) -> dict[str, Any] | None:
    """Recall per class at each site (its latest accepted evaluation), the held-out set's, and who is served worst."""
    latest: dict[str, tuple[int, dict[str, float]]] = {}
    for r in records:
        for name, site in r.sites.items():
            if site.evaluate and site.evaluate.accepted and site.evaluate.class_recall:
                latest[name] = (r.round, site.evaluate.class_recall)
    if not latest:
        return None
    n = max([len(classes)] + [int(c) + 1 for _, recall in latest.values() for c in recall])
    names = classes + [str(i) for i in range(len(classes), n)]
    rows = []
    for site in sorted(latest, key=site_order):
        round_, recall = latest[site]
        values = [recall.get(str(i)) for i in range(n)]
        present = [v for v in values if v is not None]
        rows.append({"site": site, "round": round_, "values": values, "mean": sum(present) / len(present) if present else None})
    seen = [[row["values"][i] for row in rows if row["values"][i] is not None] for i in range(n)]
    worst = [min(values) if len(set(values)) > 1 else None for values in seen]  # framed only where the sites differ
    table = [{**row, "cells": [{"text": percent(v) if v is not None else "absent", "shade": _shade(v),
                                "worst": v is not None and v == worst[i]} for i, v in enumerate(row["values"])]}
             for row in rows]
    held_out = None
    confusion = end.get("confusion_matrix")
    if isinstance(confusion, dict) and isinstance(confusion.get("counts"), list):
        recall = recall_by_class(confusion["counts"])
        held_out = [{"text": percent(recall.get(i)) if i in recall else "absent", "shade": _shade(recall.get(i))} for i in range(n)]
    served_worst = min((row for row in rows if row["mean"] is not None), key=lambda row: row["mean"], default=None)
    return {"classes": names, "rows": table, "held_out": held_out,
            "served_worst": served_worst and {"site": served_worst["site"], "mean": percent(served_worst["mean"])}}


def _safely(build, fallback):
    """``build()``, or ``fallback`` when a record's odd types keep it from being shown (the verifier names the record)."""
    try:
        return build()
    except _UNREADABLE:
        return fallback


def render_report(ev: RunEvidence) -> str:
    """The report page of ``ev`` as one HTML string."""
    summary = ev.summary
    records = ev.records
    history = [r for r in records if r.round > 0]
    sites = sorted({name for r in records for name in r.sites} | {p.site for r in records for p in r.problems}, key=site_order)
    title = ev.name
    privacy = ev.start.get("privacy") or {}
    drawings = [
        ("accuracy", "Accuracy per round", lambda: metric_figure(records, "accuracy", title=title)),
        ("loss", "Loss per round", lambda: metric_figure(records, "loss", title=title)),
        ("participation", "Participation: what each site did in each round's training", lambda: participation_figure(records, sites, title=title)),
        ("update-norms", "Update norm per site: the L2 distance of each accepted update from the global head it started from", lambda: update_norms_figure(history, title=title)),
        ("epsilon", "Privacy spent per round", lambda: epsilon_figure(history, title=title, client_level=bool(privacy.get("central")))),
    ]
    figures = []
    for fid, caption, draw in drawings:
        try:
            figures.append((fid, caption, draw()))
        except _UNREADABLE:
            figures.append((fid, caption + " (not drawn: a record it needs cannot be read; see Verification)", None))
    classes = [str(c) for c in (ev.start.get("classes") or (ev.end.get("confusion_matrix") or {}).get("classes") or [])]
    verification = ev.verification
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(
        title=title,
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        source=ev.source,
        verification=None if verification is None else {
            "ok": verification.ok,
            "line": redact_paths(verification.summary_line(Path(ev.name))),
            "problems": [redact_paths(p) for p in verification.problems],
        },
        facts=_safely(lambda: _facts(ev, summary), [("run", ev.name, ""), ("facts", "the run's start or end record cannot be shown; see Verification", "")]),
        missing_records=ev.missing_records(),
        end_unsigned=not ev.end_signed,
        unsigned_note=_UNSIGNED,
        rounds=_round_rows(records),
        figures=[{"id": fid, "caption": caption, "src": _data_uri(fig)} for fid, caption, fig in figures if fig is not None],
        undrawn=[caption for _, caption, fig in figures if fig is None and "not drawn" in caption],
        confusion=_safely(lambda: _confusion(ev.end), None),
        fairness=_safely(lambda: _fairness(records, classes, ev.end), None),
    )


def check_report_path(path: Path, *, given: bool) -> None:
    """DataError naming ``path`` unless its folder exists and can be written: checked before any page is drawn.

    ``given``: whether the user named ``path`` (``--out``), else it is the run folder's default.
    """
    folder = path.parent
    fix = ("give a file in a folder that exists and you can write, e.g. --out report.html" if given
           else "write the page elsewhere with --out FILE.html")
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() or folder.is_symlink() else "does not exist"
        raise DataError(f"cannot write the report to {path}: {folder} {state}; {fix}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DataError(f"cannot write the report to {path}: {folder} cannot be written ({exc.strerror or type(exc).__name__}); {fix}") from None


def write_report(run_dir: Path, out: Path | None = None, *, key: str | None = None,
                 site_keys: dict[str, str] | None = None) -> tuple[Path, RunEvidence]:
    """Write ``run_dir``'s report (default ``run_dir/report.html``); return its path and the evidence it shows.

    Raises DataError, naming the page's path, when it cannot be written.
    """
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    _require_run_folder(run_dir)
    check_report_path(path, given=out is not None)
    evidence = load_evidence(run_dir, key=key, site_keys=site_keys)
    html = render_report(evidence)
    try:
        write_bytes_atomic(path, html.encode("utf-8"))
    except OSError as exc:  # the folder changed while the page was drawn, or the disk is full
        raise DataError(f"cannot write the report to {path} ({exc.strerror or type(exc).__name__}); "
                        "check the folder and the free space, then run the command again") from None
    return path, evidence
