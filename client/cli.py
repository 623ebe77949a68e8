"""``fedhead site``: what a site's IT team runs before the site joins a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.cli import ExitCode, report_problem, stdout_console

__all__ = ["site_app"]

def _show_policy(path: Path, state_dir: Path | None, delta: float | None, fingerprint: str, console) -> None:
    """The policy's rules and this data's lifetime budget from the site's privacy ledger."""
    from client.privacy_ledger import PrivacyLedger
    from client.privacy_policy import describe, load_policy
    from common.paths import fedhead_home

    ledger = PrivacyLedger.in_state_dir(state_dir or fedhead_home() / "sites" / "site")
    facts = describe(load_policy(path), ledger=ledger, data_fingerprint=fingerprint, accountant="rdp", delta=delta)
    table = Table("rule or figure", "value", title=f"Privacy policy {path}", title_justify="left")
    for key, value in facts.items():
        if key != "policy":
            shown = "not set" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
            table.add_row(key, shown)
    console.print(table)


site_app = typer.Typer(name="site", help="Check a site's data before it joins.", no_args_is_help=True)


@site_app.command("check")
def check(
    data_dir: Annotated[Path, typer.Argument(help="An image folder (one sub-folder per class) or a MedMNIST-style .npz file.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names, in label order (default: Fashion-MNIST's).")] = "",
    policy: Annotated[Path | None, typer.Option(help="The site's privacy policy (TOML): show what it allows and the budget left.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="The site's state-dir, where its privacy ledger is (default: $FEDHEAD_HOME/sites/site).")] = None,
    delta: Annotated[float | None, typer.Option(help="Delta to state the lifetime epsilon at (default: the policy's max-delta).")] = None,
) -> None:
    """Load a site's data as its ClientApp would; print images per class and every file skipped, with why.

    DATA_DIR is an image folder (one sub-folder per class, optionally under train/ and val/) or a MedMNIST-style .npz file.

    Exits 0 when every image was read, 1 when some were skipped as unreadable,
    2 when the data cannot be trained on at all.
    """
    from client.site_data import load_site_data
    from common.config import build_run_config

    cfg = build_run_config({"classes": classes} if classes else {})
    site = load_site_data(data_dir, cfg, name="site")
    console = stdout_console()
    console.print(f"{data_dir}: {len(site.train)} training and {len(site.val)} validation images")
    table = Table("class", "label", "train", "val", title=None)
    for label, name in enumerate(cfg.class_names):
        table.add_row(name, str(label), str(int((site.train.labels == label).sum())), str(int((site.val.labels == label).sum())))
    table.add_section()
    table.add_row("all", "", str(len(site.train)), str(len(site.val)))
    console.print(table)
    if policy is not None:
        _show_policy(policy, state_dir, delta, site.records_fingerprint(), console)
    for warning in site.warnings:
        report_problem(f"warning: {warning}")
    if site.skipped:
        report_problem(f"{len(site.skipped)} unreadable image files were skipped:")
        for skipped in site.skipped:
            report_problem(f"skipped {skipped.path}: {skipped.reason}")
        raise typer.Exit(ExitCode.FAILED)
