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
    data_dir: Annotated[Path, typer.Argument(help="An image folder (one sub-folder per class), a CSV manifest (path,label[,split]) or a MedMNIST-style .npz file.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class names, in label order (default: the folders' or the manifest's, sorted; Fashion-MNIST's for an .npz).")] = "",
    policy: Annotated[Path | None, typer.Option(help="The site's privacy policy (TOML): show what it allows and the budget left.")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="The site's state-dir, where its privacy ledger is (default: $FEDHEAD_HOME/sites/site).")] = None,
    delta: Annotated[float | None, typer.Option(help="Delta to state the lifetime epsilon at (default: the policy's max-delta).")] = None,
) -> None:
    """Load a site's data as its ClientApp would; show what it holds, how its images are stored, what would leave the site, and every file skipped, with why.

    DATA_DIR is an image folder (one sub-folder per class, optionally under train/ and val/), a CSV manifest
    (columns path and label, optionally split: train or val; paths relative to the manifest) or a MedMNIST-style
    .npz file. Images may be PNG, JPEG and the other formats PIL reads, or DICOM (.dcm, or any name holding
    DICOM's marker; with fedhead[dicom]). Other files in a folder are ignored and named; hidden (.*) ones and a
    DICOMDIR quietly.

    Warnings (on stderr): a class with no images, an empty validation split or one too small to measure
    (fewer than 10 images of a class), images of mixed bit depths or channel counts, files ignored.

    Exits 0 when every image was read, 1 when some were skipped as unreadable,
    2 when the data cannot be trained on at all.
    """
    from client.site_data import load_site_data
    from client.site_report import check_warnings, image_kinds
    from common.config import build_run_config

    if delta is not None and not 0.0 < delta < 1.0:  # NaN fails too
        report_problem(f"--delta {delta}: must be in (0, 1), e.g. --delta 1e-5")
        raise typer.Exit(ExitCode.BAD_INPUT)
    names, origin = _class_names(data_dir, classes)
    cfg = build_run_config({"classes": ",".join(names)} if names else {})
    # each skipped file is named below, once: the reader's own lines go to DEBUG (at WARNING if nothing can be trained on)
    site = load_site_data(data_dir, cfg, name="site", warnings_shown_by_caller=True)
    console = stdout_console()
    console.print(f"{data_dir}: {len(site.train)} training and {len(site.val)} validation images")
    console.print(f"classes, in label order ({origin}): {', '.join(cfg.class_names)}")
    console.print(_class_table(site, cfg.class_names))
    kinds = image_kinds(site)
    console.print(_kinds_table(kinds))
    if policy is not None:
        _show_policy(policy, state_dir, delta, site.records_fingerprint(), console)
    console.print(_leaves_table(cfg))
    if site.skipped:
        report_problem(f"{len(site.skipped)} unreadable image files were skipped:")
        for skipped in site.skipped:
            report_problem(f"skipped {skipped.path}: {skipped.reason}")
    for warning in site.warnings + check_warnings(site, cfg.class_names, kinds):
        report_problem(f"warning: {warning}")
    if site.skipped:
        raise typer.Exit(ExitCode.FAILED)


def _class_names(data_dir: Path, classes: str) -> tuple[tuple[str, ...], str]:
    """(class names, where they came from); no names: the run's default."""
    from common.data_formats import class_names_of

    if classes:
        return _classes_option(classes), "from --classes"
    names = class_names_of(data_dir)
    if names is None:
        return (), "the run's default, Fashion-MNIST's: an .npz holds indices only; name them with --classes"
    _check_found_classes(data_dir, names)
    source = "the manifest's labels" if data_dir.is_file() else "the class folders"
    return names, f"from {source}, sorted; give the run the same 'classes'"


def _classes_option(classes: str) -> tuple[str, ...]:
    """--classes as names; ConfigError for an empty name, fewer than two names, or a name given twice."""
    from collections import Counter

    from common.errors import ConfigError

    names = tuple(name.strip() for name in classes.split(","))
    fix = "give the class names in label order, comma-separated, e.g. --classes normal,pneumonia"
    if not any(names):
        raise ConfigError(f"--classes {classes!r} holds no class names; {fix}")
    if not all(names):
        raise ConfigError(f"--classes {classes!r} has an empty class name between its commas; {fix}")
    if len(names) < 2:
        raise ConfigError(f"--classes {classes!r} names one class; a classifier needs at least 2: {fix}")
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise ConfigError(f"--classes {classes!r} names {', '.join(twice)} more than once; {fix}")
    return names


def _check_found_classes(data_dir: Path, names: tuple[str, ...]) -> None:
    """DataError unless the data holds at least two classes, none of whose names has a comma."""
    from common.errors import DataError

    manifest = data_dir.is_file()
    if not names:
        raise DataError(f"'{data_dir}' holds no class folders or manifest rows; put each class's images in a folder named after it")
    if len(names) < 2:
        found = f"only one label, '{names[0]}'" if manifest else f"only one class folder, '{names[0]}'"
        fix = ("add rows of the other classes" if manifest
               else "add a folder of images for each other class beside it (e.g. normal/ and pneumonia/)")
        some = "or, if this site holds only some of the run's classes, name them all in label order with --classes (e.g. --classes normal,pneumonia)"
        raise DataError(f"'{data_dir}' holds {found}; a classifier needs at least 2 classes: {fix}, {some}")
    with_comma = [name for name in names if "," in name]
    if with_comma:
        raise DataError(f"class names {with_comma} hold a comma, which run-config 'classes' cannot; rename them")


def _class_table(site, class_names) -> Table:
    table = Table("class", "label", "train", "val", title=None)
    for label, name in enumerate(class_names):
        table.add_row(name, str(label), str(int((site.train.labels == label).sum())), str(int((site.val.labels == label).sum())))
    table.add_section()
    table.add_row("all", "", str(len(site.train)), str(len(site.val)))
    return table


def _kinds_table(kinds) -> Table:
    table = Table("stored as", "images", title="Image files read", title_justify="left")
    for kind, count in sorted(kinds.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(str(kind), f"{count:,}")
    return table


def _leaves_table(cfg) -> Table:
    from client.site_report import what_leaves

    table = Table("what", "in detail", title="What leaves this site in each reply", title_justify="left")
    for what, detail in what_leaves(cfg):
        table.add_row(what, detail)
    return table
