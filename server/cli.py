"""``fedhead show RUN_DIR``: a run's rounds, sites and summary as tables; ``fedhead report RUN_DIR``: the same as a page.

The tables are drawn from the typed round records of ``metrics.jsonl``
(:class:`common.round_record.RoundRecord`) and from ``summary.json``; the same
renderer prints the end of ``fedhead simulate``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from common.cli import ExitCode, report_problem, stdout_console
from common.round_record import RoundRecord, load_round_records
from server.formatting import percent, site_order

__all__ = ["round_table", "site_table", "summary_table", "print_run", "show", "report"]

_STATUS_STYLE = {"finished": "green", "degraded": "yellow", "interrupted": "yellow", "failed": "red"}


def _num(value: float | None, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}" if n else "-"


def _train_loss(record: RoundRecord) -> float | None:
    trains = [s.train for s in record.sites.values() if s.train and s.train.accepted and s.train.train_loss is not None]
    weight = sum(t.num_examples or 0 for t in trains)
    if not trains or not weight:
        return None
    return sum((t.train_loss or 0.0) * (t.num_examples or 0) for t in trains) / weight


def round_table(records: Iterable[RoundRecord]) -> Table:
    """One row per round: sites aggregated, problems, losses and scores, bytes and time."""
    table = Table(title="Rounds", title_justify="left")
    for header in ("round", "sites", "problems", "train loss", "site-val acc", "site-val F1", "test acc", "test F1", "test loss", "MB down", "MB up", "s"):
        table.add_column(header, justify="left" if header == "problems" else "right")
    for r in records:
        sampled = len(r.sampled_nodes) or len(r.sites)
        problems = Text(str(len(r.problems)), style="red") if r.problems else Text("-")
        table.add_row(
            str(r.round), f"{len(r.aggregated_sites)} of {sampled}" if r.round else "-", problems, _num(_train_loss(r)),
            percent(r.federated_eval.get("accuracy")), percent(r.federated_eval.get("f1")),
            percent(r.central_eval.get("accuracy")), percent(r.central_eval.get("f1")), _num(r.central_eval.get("loss")),
            _mb(r.bytes_down), _mb(r.bytes_up), f"{r.wall_seconds:.1f}",
        )
    return table


def _site_problems(records: list[RoundRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in records:
        for site, reasons in r.problem_sites().items():
            out.setdefault(site, []).extend(f"round {r.round} {reason}" for reason in reasons)
    return out


def site_table(records: list[RoundRecord], *, max_reasons: int = 3) -> Table:
    """One row per site: its last accepted evaluation, the rounds its update was aggregated in, and its problems."""
    rounds = [r for r in records if r.round > 0]
    problems = _site_problems(records)
    names = sorted({n for r in records for n in r.sites} | set(problems), key=site_order)
    table = Table(title="Sites (last accepted evaluation on each site's validation split)", title_justify="left")
    for header in ("site", "train", "val", "aggregated", "accuracy", "F1", "AUROC", "loss", "failed or rejected"):
        table.add_column(header, justify="left" if header in ("site", "failed or rejected") else "right")
    for name in names:
        seen = [r.sites[name] for r in records if name in r.sites]
        trains = [s.train for s in seen if s.train and s.train.accepted]
        evals = [s.evaluate for s in seen if s.evaluate and s.evaluate.accepted]
        scores = evals[-1].scores if evals else {}
        reasons = problems.get(name, [])
        shown = reasons[:max_reasons] + ([f"... and {len(reasons) - max_reasons} more"] if len(reasons) > max_reasons else [])
        table.add_row(
            Text(name, style="red" if reasons else ""),
            str(trains[-1].num_examples or "-") if trains else "-",
            str(evals[-1].num_examples or "-") if evals else "-",
            f"{sum(1 for r in rounds if name in r.aggregated_sites)} of {len(rounds)}",
            percent(scores.get("accuracy")), percent(scores.get("f1")), percent(scores.get("auroc")), _num(scores.get("loss")),
            Text("\n".join(shown) or "-", style="red" if reasons else ""),
        )
    return table


def summary_table(summary: dict[str, Any]) -> Table:
    """The run's final figures from ``summary.json``, one per line."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    status = str(summary.get("status"))
    grid.add_row("status", Text(status, style=_STATUS_STYLE.get(status, "")))
    if summary.get("error"):
        grid.add_row("why", str(summary["error"]))
    grid.add_row(f"accuracy ({summary.get('evaluated_on') or 'not evaluated'})", f"{percent(summary.get('accuracy'))}, macro F1 {percent(summary.get('macro_f1'))}")
    grid.add_row("rounds", f"{summary.get('rounds_completed')} of {summary.get('num_server_rounds')} in {_num(summary.get('wall_seconds'), '.0f')} s")
    b = summary.get("bytes") or {}
    if b.get("max_train_bytes_to_site") is not None:
        grid.add_row(
            "bytes to a site per round",
            f"{b['max_train_bytes_to_site']:,} (head {b.get('head_parameter_bytes') or 0:,}; "
            f"{percent(b.get('fraction_of_full_model'))} of the full model's {b.get('full_model_bytes') or 0:,})",
        )
    privacy = summary.get("privacy") or {}
    if privacy.get("max_epsilon") is not None:
        grid.add_row(
            "record-level DP",
            f"epsilon {privacy['max_epsilon']:.4g} at delta {privacy.get('target_delta'):g} (largest over sites; "
            f"target {privacy.get('target_epsilon'):g}; largest lifetime {privacy.get('max_lifetime_epsilon'):.4g})",
        )
    central = privacy.get("central")
    if central:
        grid.add_row(
            "client-level DP",
            f"epsilon {central['epsilon']:.4g} at delta {central['delta']:g} after {central['releases']} releases "
            f"(noise multiplier {central['noise_multiplier']:.4g}, clip {central['clip_norm']:g} at the {central['clipping']}, "
            f"{central['sites_per_round']} sites a round)",
        )
    fwd = summary.get("backbone_forwards") or {}
    if fwd.get("total") is not None:
        cached = "cached features" if fwd.get("cache_features") else "no cache"
        grid.add_row("backbone passes", f"{fwd['total']:,} ({cached}; server held-out set {fwd.get('server_eval', 0):,}; cache hits {fwd.get('cache_hits', 0)})")
    for site, reasons in sorted((summary.get("problems") or {}).items(), key=lambda kv: site_order(kv[0])):
        grid.add_row(f"problems: {site}", f"{len(reasons)}, first: {reasons[0]}" if reasons else "-")
    return grid


def print_run(run_dir: Path, console: Console | None = None) -> dict[str, Any] | None:
    """Print a run folder's round table, site table and summary; return the summary (None if absent)."""
    console = console or stdout_console()
    records = load_round_records(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    parts: list[Any] = []
    if records:
        parts += [round_table(records), site_table(records)]
    else:
        parts.append(Text("no round was recorded", style="yellow"))
    parts.append(Text(f"Run folder: {run_dir}", style="bold"))
    if summary is not None:
        parts.append(summary_table(summary))
    console.print(Group(*parts))
    return summary


def show(run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/<name>.")]) -> None:
    """Print a run's per-round table, final per-site table and summary.

    RUN_DIR is a run folder, e.g. runs/<name>.
    """
    if not run_dir.is_dir() or not ((run_dir / "metrics.jsonl").exists() or (run_dir / "summary.json").exists()):
        report_problem(f"{run_dir} is not a run folder (no metrics.jsonl or summary.json in it)")
        raise typer.Exit(ExitCode.BAD_INPUT)
    from common.errors import FedHeadError

    try:
        print_run(run_dir)
    except (ValueError, FedHeadError) as exc:  # a damaged summary.json or metrics.jsonl (JSON, encoding)
        report_problem(f"{run_dir}: its summary or metrics cannot be read ({exc}); `fedhead audit verify {run_dir}` "
                       "checks the run against its signed log")
        raise typer.Exit(ExitCode.BAD_INPUT) from None


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/<name>.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the page (default: RUN_DIR/report.html).")] = None,
    key: Annotated[Path | None, typer.Option(help="The server's public key you trust (PEM, or 64 hex digits).")] = None,
    site_keys: Annotated[Path | None, typer.Option(help="A folder of sites' public keys you trust, one <site-name>.pub each.")] = None,
) -> None:
    """Write one self-contained HTML page of a run: its facts, the audit log's verification, rounds, plots and fairness.

    The page needs no network (figures are embedded) and holds no path, image
    or per-example value. It is written even when the log does not verify, and
    then says so at the top; `fedhead audit verify` gives the exit code to act on.
    """
    from common.audit_cli import trusted_keys
    from common.errors import DataError
    from server.report import write_report  # matplotlib and jinja2: only when a page is drawn

    pinned, sites = trusted_keys(key, site_keys)
    if out is not None and (out.is_dir() or (out.resolve().is_relative_to(run_dir.resolve()) and out.suffix.lower() != ".html")):
        # the run folder's own files (the signed log, the model, the summary) are never written over
        report_problem(f"--out {out}: give an .html file name outside the run's own files, e.g. --out {run_dir / 'report.html'}")
        raise typer.Exit(ExitCode.BAD_INPUT)
    try:
        path, evidence = write_report(run_dir, out, key=pinned, site_keys=sites)
    except (DataError, OSError) as exc:
        report_problem(exc)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    console = stdout_console()
    verification = evidence.verification
    if verification is None:
        console.print(f"{run_dir} has no audit log: the report shows metrics.jsonl, unsigned", soft_wrap=True)
    elif verification.ok:
        console.print(verification.summary_line(run_dir), soft_wrap=True)
    else:
        report_problem(f"{verification.summary_line(run_dir)}; the report lists them at the top")
    console.print(f"report written to {path}", soft_wrap=True)


def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's folder (runs/<name>) or its model/ folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM, ...) or folders of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The CSV to write.")] = Path("predictions.csv"),
    top_k: Annotated[int, typer.Option(min=1, help="How many classes to list per image.")] = 3,
    engine: Annotated[str, typer.Option(help="onnx (onnxruntime), torch (model.pt2) or auto: onnx where onnxruntime is installed.")] = "auto",
) -> None:
    """Classify images with a run's exported model, prepared only as its manifest says; write one CSV row per image.

    A folder's image files are read at any depth: PNG, JPEG and the other formats PIL reads, and DICOM
    (.dcm, or any name holding DICOM's marker). Its other files are ignored and named on stderr; hidden
    (.*) ones and a DICOMDIR quietly. An image that cannot be read gets a row saying why, and a line on stderr.

    Exits 0 when every image was classified, 1 when some could not be read (the other rows are written),
    2 when none could or on bad input (no model, no image files, an --out that would overwrite an input).
    """
    from common.errors import FedHeadError
    from common.image_files import describe_ignored
    from server.predict import check_out_path, find_images, load_predictor, write_predictions
    from server.predict import predict as run_predict

    try:
        predictor = load_predictor(run_dir, engine)
        found = find_images(images)
        paths, ignored = found.paths, found.ignored
        if not paths:
            raise FedHeadError(f"no image files under {', '.join(str(i) for i in images)}"
                               + (f" ({describe_ignored(ignored)})" if ignored else ""))
        if ignored:
            report_problem(f"warning: {describe_ignored(ignored)}")
        check_out_path(out, paths, predictor.model_dir)
        predictions = run_predict(predictor, paths, top_k=top_k, dicom=found.dicom)
        write_predictions(predictions, out)
    except (FedHeadError, OSError) as exc:
        report_problem(exc)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    failed = [p for p in predictions if p.error]
    for p in failed:
        report_problem(f"{p.path}: {p.error}")
    console = stdout_console()
    console.print(
        f"{len(predictions) - len(failed):,} images classified with {predictor.engine} "
        f"(model.{'onnx' if predictor.engine == 'onnx' else 'pt2'}), {len(failed):,} unreadable; written to {out}",
        soft_wrap=True,
    )
    if failed:
        report_problem(f"{len(failed):,} of {len(predictions):,} images could not be read (listed above; their rows in {out} "
                       "say why): replace or remove them and run predict again")
        raise typer.Exit(ExitCode.BAD_INPUT if len(failed) == len(predictions) else ExitCode.FAILED)
