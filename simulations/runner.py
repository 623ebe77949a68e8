"""``fedhead simulate``: a local multi-site run through a real ``flwr run``.

The runner validates the config, prepares each site's partition file and
checks the weights before anything starts; then it starts its own
``flower-superlink --simulation`` on a free loopback port (with a project-local
``FLWR_HOME`` and no runtime dependency installs), submits the app with
``flwr run --stream``, and stops every process the run started afterwards
(:mod:`simulations.processes`), interrupted or not. Flower's own exit code does
not say whether the run failed, so success is read from ``flwr ls`` and from
the run folder's ``summary.json``. A ``degraded`` run (a site failed or was
rejected) returns normally; an interrupted one (SIGINT/SIGTERM) raises
:class:`SimulationInterrupted` after its ``summary.json`` says ``interrupted``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.cli import ExitCode, parse_run_config
from common.config import RunConfig, build_run_config
from common.errors import FedHeadError
from common.model import SplitModel, build_split_model
from common.partitions import prepare_federation
from common.paths import FEDHEAD_HOME_ENV
from simulations.app_source import staged_app
from simulations.processes import (  # flower_env, free_port, process_group, superlink, write_connection: re-exported
    StopRequested,
    find_by_env,
    flower_env,
    free_port,
    process_group,
    stop_processes,
    superlink,
    write_connection,
)
from simulations.run_end import read_summary, settle_summary
from simulations.run_inputs import check_run_target, project_root

__all__ = [
    "SimulationResult",
    "SimulationError",
    "SimulationInterrupted",
    "run_simulation",
    "submit_run",
    "run_status_of",
    "stop_everything",
    "judge_run",
    "interrupted_run",
    "project_root",
    "parse_run_config",
    "free_port",
    "flower_env",
    "process_group",
    "superlink",
    "write_connection",
]

log = logging.getLogger(__name__)


class SimulationError(FedHeadError, RuntimeError):
    """The simulated run did not finish; ``run_dir`` and ``summary`` say how far it got (None before it started)."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, run_dir: Path | None = None, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.run_dir, self.summary = run_dir, summary


class SimulationInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; every process it started is gone and its summary says ``interrupted``."""

    def __init__(self, message: str, *, run_dir: Path, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.run_dir, self.summary = run_dir, summary


@dataclass
class SimulationResult:
    """A finished simulation: its folder and summary."""

    run_dir: Path
    summary: dict[str, Any]


def run_status_of(env: dict[str, str], connection: str) -> str | None:
    """Status of the run on our own SuperLink (it only ever holds this one run); None if unreadable."""
    try:
        result = subprocess.run(
            ["flwr", "ls", connection, "--format", "json"], env=env, capture_output=True, text=True, timeout=60
        )
        runs = json.loads(result.stdout).get("runs", [])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError) as exc:
        log.warning("could not read the run status from `flwr ls` (%s); judging by summary.json alone", exc)
        return None
    return str(runs[-1].get("status")) if runs else None  # e.g. "finished:completed"


def run_simulation(
    *,
    num_sites: int = 4,
    name: str = "",
    overrides: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    cpus_per_site: int = 1,
) -> SimulationResult:
    """Run a local simulation of ``num_sites`` sites; return it when ``finished`` or ``degraded``.

    Raises ConfigError (and friends) before anything starts, SimulationError
    when the run failed, SimulationInterrupted on SIGINT/SIGTERM (or Ctrl-C).
    """
    root = project_root()
    target = check_run_target(num_sites=num_sites, name=name, overrides=overrides, state_dir=state_dir)
    cfg, run_dir, run_name, state = target.cfg, target.run_dir, target.run_name, target.state
    federation = prepare_federation(cfg, num_sites, cache_root=state)
    resolved = target.resolved(federation.test_path, federation.classes, num_sites)
    flwr_home = state / "flwr-home" / run_name  # one per run: concurrent simulations never share it
    federation_config = f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site}"
    log.info("simulating %d sites; run folder %s", num_sites, run_dir / run_name)
    return submit_run(
        resolved, state=state, flwr_home=flwr_home,
        launch=lambda env, run_config: _run_flower(root, flwr_home, env, run_config, federation_config, on_line),
    )


def submit_run(
    resolved: dict[str, Any], *, state: Path, flwr_home: Path,
    launch: Callable[[dict[str, str], Path], tuple[int, str | None]],
) -> SimulationResult:
    """Check ``resolved`` and the model, write the run config, ``launch(env, run_config_file)`` and judge how it ended.

    ``launch`` starts Flower's processes and streams ``flwr run``; it returns
    flwr's exit code and the run's status. Every Flower process gets
    ``flwr_home`` as FLWR_HOME and ``state`` as FEDHEAD_HOME.
    """
    cfg = build_run_config(resolved)
    model = build_split_model(cfg)  # weights present and verified before any process starts
    run_folder = Path(cfg.run_dir) / cfg.run_name
    run_config = {k: v for k, v in cfg.to_run_config().items() if k in resolved}
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    env[FEDHEAD_HOME_ENV] = str(state)  # sites keep their state, and simulated ones find their partitions, here
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, dir=flwr_home) as fh:
        fh.write(tomli_w.dumps(run_config))
        run_config_file = Path(fh.name)
    started = time.monotonic()
    try:
        returncode, flwr_status = launch(env, run_config_file)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, StopRequested) else signal.SIGINT
        raise interrupted_run(run_folder, signal.Signals(signum).name, cfg, model, time.monotonic() - started) from None
    finally:
        run_config_file.unlink(missing_ok=True)
    return judge_run(run_folder, returncode, flwr_status, cfg, model, time.monotonic() - started)


def _run_flower(
    root: Path, flwr_home: Path, env: dict[str, str], run_config_file: Path, federation_config: str,
    on_line: Callable[[str], None] | None,
) -> tuple[int, str | None]:
    """Start a SuperLink, stream ``flwr run``; stop every process of the run however this ends."""
    process: subprocess.Popen | None = None
    try:
        with staged_app(root, flwr_home) as source, superlink(flwr_home, env, simulation=True) as port:
            connection = write_connection(flwr_home, port)
            command = [
                "flwr", "run", str(source), connection, "--stream",
                "--run-config", str(run_config_file), "--federation-config", federation_config,
            ]
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop it, in order
            )
            for line in process.stdout or ():
                if on_line:
                    on_line(line.rstrip("\n"))
            process.wait()
            return process.returncode, run_status_of(env, connection)
    finally:
        try:
            stop_everything(flwr_home, process)
        except KeyboardInterrupt:  # a first signal mid-sweep; stop_on_signals raises only once, so this one completes
            stop_everything(flwr_home, process)
            raise


def stop_everything(flwr_home: Path, process: subprocess.Popen | None) -> None:
    """Stop ``flwr run`` and every process that carries this run's FLWR_HOME (re-parented ones too)."""
    roots = [process.pid] if process is not None and process.poll() is None else []
    for _ in range(3):  # a process may start another while we stop it
        pids = roots + find_by_env("FLWR_HOME", str(flwr_home))
        if not pids:
            break
        log.debug("stopping %d processes of the run (and their children)", len(pids))
        stop_processes(pids, groups=roots)
        roots = []
    else:
        log.warning("processes of the run are still running: %s", find_by_env("FLWR_HOME", str(flwr_home)))
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def interrupted_run(run_folder: Path, signame: str, cfg: RunConfig, model: SplitModel, seconds: float) -> SimulationInterrupted:
    summary = settle_summary(run_folder, status="interrupted", error=f"interrupted by {signame}", cfg=cfg, model=model, wall_seconds=seconds)
    return SimulationInterrupted(
        f"simulation '{run_folder.name}' was interrupted by {signame} after {summary.get('rounds_completed')} "
        f"of {summary.get('num_server_rounds')} rounds; every process it started is stopped; folder {run_folder}",
        run_dir=run_folder,
        summary=summary,
    )


def judge_run(run_folder: Path, returncode: int, flwr_status: str | None, cfg: RunConfig, model: SplitModel, seconds: float) -> SimulationResult:
    """The result of a run that ended on its own; SimulationError unless it finished or is degraded."""
    summary = read_summary(run_folder)
    how = f"flwr run exited {returncode}, run status {flwr_status}"
    if summary is None:
        summary = settle_summary(run_folder, status="failed", error=f"the ServerApp wrote no summary; {how}", cfg=cfg, model=model, wall_seconds=seconds)
    ended_well = summary.get("status") in ("finished", "degraded")
    if returncode != 0 or not ended_well or flwr_status not in (None, "finished:completed"):
        if ended_well:
            summary = settle_summary(run_folder, status="failed", error=how, cfg=cfg, model=model, wall_seconds=seconds)
        reason = summary.get("error") or how
        raise SimulationError(
            f"simulation '{run_folder.name}' did not finish: {reason}; logs above, folder {run_folder}",
            run_dir=run_folder,
            summary=summary,
        )
    return SimulationResult(run_folder, summary)
