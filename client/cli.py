"""``fedhead site``: what a site's IT team runs before the site joins a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.cli import ExitCode, report_problem, stdout_console

__all__ = ["site_app"]

site_app = typer.Typer(name="site", help="Check a site's data before it joins.", no_args_is_help=True)


@site_app.command("check")
def check(
    data_dir: Annotated[Path, typer.Argument(help="An image folder (one sub-folder per class) or a MedMNIST-style .npz file.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names, in label order (default: Fashion-MNIST's).")] = "",
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
    for warning in site.warnings:
        report_problem(f"warning: {warning}")
    if site.skipped:
        report_problem(f"{len(site.skipped)} unreadable image files were skipped:")
        for skipped in site.skipped:
            report_problem(f"skipped {skipped.path}: {skipped.reason}")
        raise typer.Exit(ExitCode.FAILED)
