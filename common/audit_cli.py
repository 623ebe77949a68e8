"""``fedhead audit``: an auditor's commands (they read a run folder and need nothing from its server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.audit_log import AUDIT_FILE
from common.audit_verify import cross_check, verify_run
from common.cli import ExitCode, report_problem, stdout_console
from common.errors import ConfigError
from common.errors import DataError
from common.receipt_ledger import read_receipts, site_key_path, site_public_key_path
from common.signing import load_or_create_key, load_public_key, public_hex

__all__ = ["audit_app", "trusted_keys"]

audit_app = typer.Typer(name="audit", help="Check a finished run's signed audit log.", no_args_is_help=True)


def trusted_keys(key: Path | None, site_keys: Path | None) -> tuple[str | None, dict[str, str]]:
    """The server key and the sites' keys an auditor pins (hex); a key that cannot be read exits BAD_INPUT."""
    if site_keys is not None and not (site_keys.is_dir() and any(site_keys.glob("*.pub"))):
        report_problem(f"--site-keys {site_keys}: give a folder holding one <site-name>.pub per site to pin")
        raise typer.Exit(ExitCode.BAD_INPUT)
    try:
        pinned = load_public_key(key) if key is not None else None
        sites = {p.stem: load_public_key(p) for p in sorted(site_keys.glob("*.pub"))} if site_keys is not None else {}
    except (OSError, ConfigError) as exc:
        report_problem(f"cannot read the keys given: {exc}")
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    return pinned, sites


@audit_app.command("verify")
def verify(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/<name>.")],
    key: Annotated[
        Path | None,
        typer.Option(help="The server's public key you trust (PEM, or 64 hex digits); default: the one the log names."),
    ] = None,
    site_keys: Annotated[
        Path | None,
        typer.Option(help="A folder of sites' public keys you trust, one <site-name>.pub each (PEM or hex)."),
    ] = None,
) -> None:
    """Check the chain, hashes, signatures (server's and sites'), head hashes and every epsilon of RUN_DIR's audit.jsonl."""
    pinned, sites = trusted_keys(key, site_keys)
    report = verify_run(run_dir, key=pinned, site_keys=sites)
    if report.ok:
        stdout_console().print(report.summary_line(run_dir), soft_wrap=True)
        return
    for problem in report.problems:
        report_problem(problem)
    report_problem(report.summary_line(run_dir))
    raise typer.Exit(ExitCode.FAILED)


@audit_app.command("cross-check")
def cross_check_site(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/<name>.")],
    site_state_dir: Annotated[Path, typer.Argument(help="The site's state-dir (its key and receipts.jsonl).")],
) -> None:
    """Hold a site's own receipt ledger against RUN_DIR's audit log, round by round (and verify the log)."""
    key_file, private = site_public_key_path(site_state_dir), site_key_path(site_state_dir)
    if not (key_file.is_file() or private.is_file()) or not (run_dir / AUDIT_FILE).is_file():
        report_problem(f"need {key_file} and {run_dir / AUDIT_FILE}; give a site's state-dir and a run folder")
        raise typer.Exit(ExitCode.BAD_INPUT)
    try:
        # the public key; at the site itself (a state-dir from before .pub files), derived from its private key
        site_key = load_public_key(key_file) if key_file.is_file() else public_hex(load_or_create_key(private))
        problems, agreed = cross_check(run_dir, read_receipts(site_state_dir), site_key)
    except (OSError, ConfigError, DataError) as exc:
        report_problem(exc)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    report = verify_run(run_dir)
    console = stdout_console()
    for line in agreed:
        console.print(line, soft_wrap=True)
    if problems or not report.ok:
        for problem in [*report.problems, *problems]:
            report_problem(problem)
        raise typer.Exit(ExitCode.FAILED)
    console.print(
        f"{site_state_dir}: all {len(agreed)} receipts of this run agree with {run_dir / AUDIT_FILE}, which verifies",
        soft_wrap=True,
    )
