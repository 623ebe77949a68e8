"""``fedhead privacy-sweep``: the default task without DP and at several target epsilons, in one table.

Every run averages each image's features over its mirrored and shifted
views (``feature-views='mirror-shift'``) and centres them on the site's
mean (``centre-features``, a private release under DP) unless
``--run-config`` says otherwise. Each point is a full ``fedhead simulate`` run (record-level DP-SGD at every
site for the DP points) under ``runs/<name>/``; the sweep writes
``sweep.json``, a Markdown table ``sweep.md`` and ``accuracy_vs_epsilon.png``
beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from common.cli import ExitCode, check_run_name, parse_run_config, report_problem, stdout_console
from common.errors import ConfigError
from common.files import atomic_path, write_json_atomic, write_text_atomic

__all__ = ["run_privacy_sweep", "privacy_sweep"]

log = logging.getLogger(__name__)

# every point of the sweep, DP or not: the features that did best under DP (README, "Differential privacy at each site")
SWEEP_RUN_CONFIG = {"feature-views": "mirror-shift", "centre-features": True}


def _point(label: str, epsilon: float | None, summary: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run": label,
        "target_epsilon": epsilon,
        "status": summary.get("status"),
        "accuracy": summary.get("accuracy"),
        "macro_f1": summary.get("macro_f1"),
        "max_epsilon": summary.get("max_epsilon"),
        "wall_seconds": summary.get("wall_seconds"),
    }


def run_privacy_sweep(
    *,
    epsilons: list[float],
    num_sites: int,
    name: str,
    overrides: Mapping[str, Any],
    dp_overrides: Mapping[str, Any],
    on_line: Callable[[str], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run the task without DP, then at each epsilon; write the table and plot; return the folder and the points."""
    from simulations.runner import run_simulation

    root = Path(str(overrides.get("run-dir", "runs"))).resolve() / name
    points = []
    for epsilon in [None, *epsilons]:
        label = "no-dp" if epsilon is None else f"eps-{epsilon:g}"
        run = {**overrides, "run-dir": str(root)}
        if epsilon is not None:
            run.update({**dp_overrides, "dp": "sample", "target-epsilon": epsilon})
        log.info("privacy sweep: %s", label)
        result = run_simulation(num_sites=num_sites, name=label, overrides=run, on_line=on_line)
        points.append(_point(label, epsilon, result.summary))
    write_json_atomic(root / "sweep.json", {"num_sites": num_sites, "overrides": dict(overrides), "dp_overrides": dict(dp_overrides), "points": points})
    write_text_atomic(root / "sweep.md", _markdown(points))
    _plot(points, root / "accuracy_vs_epsilon.png")
    return root, points


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, float) else "-"


def _markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| target epsilon | epsilon spent (max over sites) | test accuracy | macro F1 | status |", "|---|---|---|---|---|"]
    for p in points:
        target = "no DP" if p["target_epsilon"] is None else f"{p['target_epsilon']:g}"
        spent = "-" if p["max_epsilon"] is None else f"{p['max_epsilon']:.3f}"
        lines.append(f"| {target} | {spent} | {_pct(p['accuracy'])} | {_pct(p['macro_f1'])} | {p['status']} |")
    return "\n".join(lines) + "\n"


def _plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [p for p in points if p["target_epsilon"] is not None and p["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["max_epsilon"] for p in dp], [p["accuracy"] for p in dp], marker="o", label="record-level DP-SGD at each site")
    for p in points:
        if p["target_epsilon"] is None and p["accuracy"] is not None:
            ax.axhline(p["accuracy"], linestyle="--", color="gray", label="without DP")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta as configured)")
    ax.set_ylabel("held-out test accuracy")
    ax.set_title("accuracy against epsilon")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def privacy_sweep(
    epsilons: Annotated[str, typer.Option(help="Comma-separated target epsilons.")] = "1,3,8",
    sites: Annotated[int, typer.Option(min=1, help="Number of simulated sites.")] = 4,
    name: Annotated[str, typer.Option(help="Folder under run-dir holding the sweep's runs.")] = "privacy-sweep",
    run_config: Annotated[str, typer.Option("--run-config", metavar="'K=V ...'", help="Overrides for every run, on top of feature-views='mirror-shift' (each image's features averaged over 6 mirrored and shifted views; feature-views='one' for plain features) and centre-features=true (each site's features centred on their mean; false to keep them as they are).")] = "",
    dp_config: Annotated[str, typer.Option("--dp-config", metavar="'K=V ...'", help="Extra overrides for the DP runs only.")] = "dp-sample-rate=0.0667 lr=0.01 accountant='prv' keep-optimizer-state=true",
) -> None:
    """Run the task without DP and at each target epsilon; print and write the accuracy-epsilon table."""
    check_run_name(name)
    try:
        targets = [float(e) for e in epsilons.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons {epsilons!r}: give comma-separated numbers, e.g. 1,3,8") from None
    if not targets or any(e <= 0 for e in targets):
        raise ConfigError(f"--epsilons {epsilons!r}: give one or more epsilons > 0")
    from simulations.processes import stop_on_signals
    from simulations.runner import SimulationInterrupted

    with stop_on_signals():
        try:
            root, points = run_privacy_sweep(
                epsilons=targets, num_sites=sites, name=name,
                overrides={**SWEEP_RUN_CONFIG, **parse_run_config(run_config)}, dp_overrides=parse_run_config(dp_config),
            )
        except SimulationInterrupted as exc:
            report_problem(str(exc))
            raise typer.Exit(ExitCode.INTERRUPTED) from None
    table = Table("target epsilon", "epsilon spent", "test accuracy", "macro F1", "status", title=f"Privacy sweep ({root})", title_justify="left")
    for p in points:
        table.add_row("no DP" if p["target_epsilon"] is None else f"{p['target_epsilon']:g}",
                      "-" if p["max_epsilon"] is None else f"{p['max_epsilon']:.3f}",
                      _pct(p["accuracy"]), _pct(p["macro_f1"]), str(p["status"]))
    stdout_console().print(table)
