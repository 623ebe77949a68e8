"""The ``fedhead`` command line, assembled: each command group is defined beside the code it serves.

``site`` (client/cli.py), ``show`` and ``report`` (server/cli.py), ``weights``
(common/cli.py), ``audit`` (common/audit_cli.py), ``federation``
(simulations/federation_cli.py), ``privacy-sweep`` (simulations/sweep.py),
``simulate`` and ``bench`` (here). Exit codes are :class:`common.cli.ExitCode`'s;
every problem is one ``fedhead: ...`` line on stderr.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from importlib import metadata
from typing import Annotated

import click
import typer
from rich.table import Table

from client.cli import site_app
from common.audit_cli import audit_app
from common.cli import ExitCode, check_run_name, exit_code_for_error, parse_run_config, report_problem, stdout_console, weights_app
from common.errors import FedHeadError
from common.logs import LOG_LEVELS, configure_logging
from server.cli import predict, report, show
from simulations.federation_cli import federation_app
from simulations.sweep import privacy_sweep

__all__ = ["app", "main"]

EXIT_CODES = (
    "Exit codes: 0 finished; 3 degraded (a site failed or was rejected in some round; tables and summary still "
    "written); 1 failed; 2 bad input (nothing was started); 130 interrupted by SIGINT or SIGTERM (every process "
    "the run started is stopped, summary.json says interrupted)."
)

app = typer.Typer(
    name="fedhead",
    help="Federated fine-tuning of a frozen torchvision backbone's head, with Flower and Opacus.",
    epilog="Global options (--log-level) may also follow the subcommand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(site_app)
app.add_typer(audit_app)
app.add_typer(federation_app)
app.add_typer(weights_app)
app.command("show")(show)
app.command("report")(report)
app.command("predict")(predict)
app.command("privacy-sweep")(privacy_sweep)


def _versions() -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"fedhead {version('fedhead')} (Flower {version('flwr')}, torch {version('torch')}, "
        f"torchvision {version('torchvision')}, Opacus {version('opacus')}, Python {platform.python_version()})"
    )


def _print_version(value: bool) -> None:
    if value:
        print(_versions())
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print fedhead's, Flower's and torch's versions.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help=f"One of {', '.join(LOG_LEVELS)} (default: $FEDHEAD_LOG_LEVEL, else INFO).")] = "",
) -> None:
    """Federated fine-tuning of a frozen torchvision backbone's head, with Flower and Opacus."""
    configure_logging(log_level or None)
    if log_level:
        os.environ["FEDHEAD_LOG_LEVEL"] = log_level.strip().upper()  # Flower's app processes inherit it
    logging.getLogger("flwr").setLevel(logging.WARNING)


@app.command(epilog=EXIT_CODES)
def simulate(
    sites: Annotated[int, typer.Option(min=1, help="Number of simulated sites.")] = 4,
    name: Annotated[str | None, typer.Option(help="Run folder name under run-dir: letters, digits, '.', '_', '-' (default: <UTC time>-<backbone>-<strategy>).")] = None,
    run_config: Annotated[str, typer.Option("--run-config", metavar="'K=V ...'", help="Run-config overrides, e.g. \"num-server-rounds=5 strategy='fedprox'\" (keys: pyproject.toml's \\[tool.flwr.app.config]).")] = "",
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show Flower's and Ray's whole log stream.")] = False,
) -> None:
    """Run a local multi-site simulation through a real Flower SuperLink and `flwr run`.

    Prints fedhead's log lines from Flower's stream, then the per-round and per-site tables and the summary.
    """
    from simulations.run_inputs import check_run_target

    overrides = parse_run_config(run_config)
    if name is not None:
        check_run_name(name)
    check_run_target(num_sites=sites, name=name or "", overrides=overrides)  # refuse bad input in a blink

    from simulations.run_output import run_and_report
    from simulations.runner import run_simulation

    run_and_report(lambda on_line: run_simulation(num_sites=sites, name=name or "", overrides=overrides, on_line=on_line), verbose)


@app.command()
def bench(
    images: Annotated[int, typer.Option(min=10, help="Training images.")] = 2000,
    epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 2,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds.")] = 3,
    image_size: Annotated[int, typer.Option(min=16, help="Image size in pixels.")] = 64,
) -> None:
    """Measure cached-feature head training against running the backbone on every batch, and DP-SGD's cost."""
    from simulations.bench import run_bench

    r = run_bench(images=images, epochs=epochs, rounds=rounds, image_size=image_size)
    table = Table("arm", "seconds", "of which training", "backbone passes", "val accuracy", title=(
        f"mobilenet_v2 at {r['image_size']} px, {r['images']} training images, {r['rounds']} rounds x {r['epochs']} epochs"
    ), title_justify="left")
    for arm, label in (("plain", "plain"), ("cached", "cached"), ("dp", "cached, DP-SGD (epsilon 3)")):
        table.add_row(
            label, f"{r[f'{arm}_seconds']:.1f}", f"{r[f'{arm}_train_seconds']:.1f}", f"{int(r[f'{arm}_forwards']):,}",
            f"{100 * r[f'{arm}_accuracy']:.1f}%",
        )
    console = stdout_console()
    console.print(table)
    console.print(f"cached features are {r['speedup']:.1f}x faster than the plain way")
    console.print(
        f"DP-SGD's head training takes {r['dp_cost']:.2f}x the time of non-private head training on the same cached features "
        f"(and {r['dp_calibration_seconds']:.1f} s once per run to calibrate the noise)"
    )
    console.print(
        f"a site sends {int(r['head_bytes']):,} parameter bytes per round: "
        f"{100 * r['bytes_fraction']:.2f}% of the full model ({int(r['full_bytes']):,})"
    )


@app.command("bench-extraction")
def bench_extraction(
    cpu_images: Annotated[int, typer.Option(min=16, help="Images per CPU arm.")] = 256,
    gpu_images: Annotated[int, typer.Option(min=16, help="Images per GPU arm.")] = 8192,
) -> None:
    """Measure feature-extraction throughput (mobilenet_v2 at 64 px, densenet121 at 224 px) on the CPU and any GPU."""
    import torch

    from simulations.extraction_bench import run_extraction_bench

    arms = run_extraction_bench(cpu_images=cpu_images, gpu_images=gpu_images)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    table = Table("backbone", "device", "precision", "weights", "img/s", "trunk alone", "x CPU", "max feature error",
                  title=f"feature extraction, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {gpu}",
                  title_justify="left")
    for arm in arms:
        table.add_row(
            f"{arm.backbone} {arm.image_size} px", arm.device, arm.precision, arm.weights, f"{arm.images_per_second:,.0f}",
            f"{arm.trunk_images_per_second:,.0f}", f"{arm.ratio_to_cpu:.1f}" if arm.ratio_to_cpu else "-",
            f"{arm.max_relative_error:.1e}",
        )
    stdout_console().print(table)


_GLOBAL_WITH_VALUE = ("--log-level",)


def _hoist_global_options(args: list[str]) -> list[str]:
    """Move global options given after a subcommand to the front, where click reads them."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in _GLOBAL_WITH_VALUE and i + 1 < len(args):
            front += args[i : i + 2]
            i += 2
            continue
        (front if arg.split("=", 1)[0] in _GLOBAL_WITH_VALUE else rest).append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedhead`` console script; returns the exit code."""
    args = _hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        return int(command.main(args=args, prog_name="fedhead", standalone_mode=False) or 0)
    except click.exceptions.NoArgsIsHelpError as exc:  # its message is the help (rich help is printed already)
        if exc.format_message().strip():
            print(exc.format_message())
        return ExitCode.OK
    except click.ClickException as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
        report_problem(exc.format_message() + where)
        return exc.exit_code
    except click.Abort:
        report_problem("interrupted")
        return ExitCode.INTERRUPTED
    except FedHeadError as exc:
        report_problem(exc)
        return exit_code_for_error(exc)


if __name__ == "__main__":
    sys.exit(main())
