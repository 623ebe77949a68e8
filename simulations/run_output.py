"""What a run command prints while its run goes and after: Flower's stream filtered, then the run's tables and its exit code.

Shared by ``fedhead simulate`` and ``fedhead federation up``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import typer

from common.cli import ExitCode, report_problem, stdout_console
from common.errors import DataError
from server.cli import print_run

__all__ = ["stream_filter", "print_run_tables", "run_and_report"]

_ROW = re.compile(r"(INFO|WARNING|ERROR) (server|client|common|simulations)[\w.]*: (.*)")


def stream_filter(verbose: bool):
    """What of Flower's stream to print: our own log lines (and errors); everything with ``verbose``."""

    def show_line(line: str) -> None:
        match = _ROW.search(line)
        if verbose:
            print(line, flush=True)
        elif match:
            print(("" if match.group(1) == "INFO" else match.group(1) + ": ") + match.group(3), flush=True)
        elif "Error" in line or "Traceback" in line or "exception" in line.lower():
            print(line, flush=True)

    return show_line


def print_run_tables(run_dir: Path) -> None:
    try:
        print_run(run_dir, stdout_console())
    except DataError as exc:
        report_problem(f"cannot show the run's tables: {exc}")


def run_and_report(run: Callable[[Callable[[str], None]], object], verbose: bool) -> None:
    """Call ``run(on_line)`` under signal handling; print its tables; exit 130 when interrupted, 3 when degraded.

    ``run`` returns a SimulationResult or raises SimulationError / SimulationInterrupted.
    """
    from simulations.processes import stop_on_signals
    from simulations.runner import SimulationError, SimulationInterrupted

    with stop_on_signals():
        try:
            result = run(stream_filter(verbose))
        except SimulationInterrupted as exc:
            print_run_tables(exc.run_dir)
            report_problem(str(exc))
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except SimulationError as exc:
            if exc.run_dir is not None:
                print_run_tables(exc.run_dir)
            raise
        except KeyboardInterrupt:
            report_problem("interrupted before the run started; nothing of it is left running")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        print_run_tables(result.run_dir)
    if result.summary.get("status") == "degraded":
        report_problem(f"the run is degraded: {result.summary.get('error')}")
        raise typer.Exit(ExitCode.DEGRADED)
