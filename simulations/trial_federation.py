"""``fedhead federation up``: a whole secure federation on loopback, for a trial.

A SuperLink with TLS and node authentication, N SuperNodes each with its own
image folder (``data-dir``) and ``state-dir`` and its own enrolled node key,
the run submitted with ``flwr run`` and streamed; the run folder is the same
as a simulation's. Every process it starts carries the trial's ``FLWR_HOME``
and is listed in ``processes.json``; all are stopped, by PID and by that
environment, on success, failure and signal (``fedhead federation down``
stops a trial left running by a killed ``up``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from common.errors import ConfigError
from common.data_formats import folder_name, read_npz, write_site_folder
from common.partitions import Federation, prepare_federation
from simulations.app_source import staged_app
from simulations.federation import (
    FederationFiles,
    diagnose_supernode,
    enrol_site,
    init_federation,
    make_site_key,
    site_key_paths,
    supernode_command,
)
from simulations.processes import find_by_env, free_port, process_group, stop_processes, superlink, write_connection
from simulations.run_inputs import check_run_target, project_root
from simulations.runner import SimulationResult, run_status_of, stop_everything, submit_run

__all__ = ["TrialSite", "run_trial", "trial_root", "stop_trials", "site_folders", "PROCESSES_FILE"]

log = logging.getLogger(__name__)

PROCESSES_FILE = "processes.json"  # in a trial's folder: the PIDs it started and its FLWR_HOME


@dataclass(frozen=True)
class TrialSite:
    """One trial site: its name, image folder and state-dir."""

    name: str
    data_dir: Path
    state_dir: Path

    @property
    def node_key(self) -> Path:
        return site_key_paths(self.state_dir)[0]


def trial_root(state: Path) -> Path:
    """Where trials keep their folders (one per run name)."""
    return state / "trials"


def site_folders(federation: Federation, root: Path) -> list[TrialSite]:
    """Each prepared partition as an image folder of its own (``train/`` and ``val/``, PNG), and a state-dir per site."""
    sites = []
    for i in range(len(federation.site_sizes)):
        name = f"site-{i}"
        data_dir = root / "data" / name
        if not (data_dir / ".complete").exists():
            splits = read_npz(federation.partitions_dir / f"site-{i}.npz", prefixes=("train", "val"), required=("train",))
            write_site_folder(splits, data_dir, federation.classes)
            (data_dir / ".complete").touch()
        sites.append(TrialSite(name, data_dir, root / "sites" / name))
    return sites


def run_trial(
    *,
    num_sites: int = 3,
    name: str = "",
    overrides: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    policies: Mapping[str, Path] | None = None,
) -> SimulationResult:
    """Run a trial federation of ``num_sites`` sites on loopback; return it when ``finished`` or ``degraded``.

    ``policies`` gives sites (``site-<i>``) a privacy policy file each.
    Raises like :func:`simulations.runner.run_simulation`.
    """
    target = check_run_target(num_sites=num_sites, name=name, overrides=overrides, state_dir=state_dir)
    cfg, run_dir, run_name, state = target.cfg, target.run_dir, target.run_name, target.state
    federation = prepare_federation(cfg, num_sites, cache_root=state)
    root = trial_root(state) / run_name
    sites = site_folders(federation, root)
    unknown = sorted(set(policies or {}) - {s.name for s in sites})
    if unknown:
        raise ConfigError(f"--policy names {', '.join(unknown)}, not among this trial's sites ({', '.join(s.name for s in sites)})")
    resolved = target.resolved(federation.test_path, [folder_name(c) for c in federation.classes], num_sites)  # folders' names
    files = init_federation(FederationFiles(root / "operator"), ["127.0.0.1", "localhost"], days=2, force=True)
    resolved["enrolment"] = str(files.enrolment)
    files.enrolment.unlink(missing_ok=True)  # enrolled afresh against this trial's SuperLink
    home = root / "flwr-home"
    log.info("trial federation of %d sites over TLS with authenticated nodes; run folder %s", num_sites, run_dir / run_name)
    return submit_run(
        resolved, state=state, flwr_home=home,
        launch=lambda env, run_config: _run(root, home, env, files, sites, run_config, on_line, dict(policies or {})),
    )


class _NodeWatch:
    """Notices a SuperNode that exits while the run goes on, and says why (from its log)."""

    def __init__(self, nodes: dict[str, tuple[subprocess.Popen, Path]], superlink_address: str, ca: Path) -> None:
        self.nodes, self.address, self.ca = nodes, superlink_address, ca
        self.reported: set[str] = set()

    def check(self) -> None:
        """Log, once per SuperNode, that it exited and why."""
        for name, (process, log_file) in self.nodes.items():
            if name not in self.reported and process.poll() is not None:
                self.reported.add(name)
                why = diagnose_supernode(log_file.read_text(errors="replace"), process.returncode, superlink=self.address,
                                         ca_cert=self.ca, public_key=None)
                log.warning("%s's SuperNode exited: %s", name, why)


def _run(
    root: Path, home: Path, env: dict[str, str], files: FederationFiles, sites: list[TrialSite], run_config_file: Path,
    on_line: Callable[[str], None] | None, policies: dict[str, Path],
) -> tuple[int, str | None]:
    """Start the SuperLink, enrol and start the sites, stream ``flwr run``; stop every process however this ends."""
    process: subprocess.Popen | None = None
    emit = on_line or (lambda line: None)
    try:
        with contextlib.ExitStack() as stack:
            port = stack.enter_context(superlink(home, env, simulation=False, tls=files.superlink_tls()))
            address = f"127.0.0.1:{port}"
            nodes: dict[str, tuple[subprocess.Popen, Path]] = {}
            for site in sites:
                node_id = enrol_site(files, site.name, make_site_key(site.state_dir), superlink=address)
                log.info("enrolled %s as node %d", site.name, node_id)
            node_env = {**env, "OMP_NUM_THREADS": str(_threads_per_site(len(sites)))}
            for site in sites:
                node_config = {"site-name": site.name, "data-dir": str(site.data_dir), "state-dir": str(site.state_dir)}
                if site.name in policies:
                    node_config["policy"] = str(Path(policies[site.name]).resolve())
                command = supernode_command(superlink=address, ca_cert=files.ca.cert, private_key=site.node_key,
                                            port=free_port(), node_config=node_config)
                log_file = root / f"{site.name}.log"
                nodes[site.name] = (stack.enter_context(process_group(command, node_env, log_file)), log_file)
            pids = {name: p.pid for name, (p, _) in nodes.items()}
            pids = {"superlink": superlink_pid(home), **pids}
            listing = {"flwr_home": str(home), "superlink": address, "ca": str(files.ca.cert)}
            _write_processes(root, {**listing, "pids": pids})
            connection = write_connection(home, port, "trial", ca_cert=files.ca.cert)
            source = stack.enter_context(staged_app(project_root(), home))
            process = subprocess.Popen(
                ["flwr", "run", str(source), connection, "--stream", "--run-config", str(run_config_file)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            )
            _write_processes(root, {**listing, "pids": {**pids, "flwr-run": process.pid}})
            watch = _NodeWatch(nodes, address, files.ca.cert)
            for line in _lines_while_watching(process, watch):
                emit(line.rstrip("\n"))
            process.wait()
            return process.returncode, run_status_of(env, connection)
    finally:
        try:
            stop_everything(home, process)
        except KeyboardInterrupt:
            stop_everything(home, process)
            raise
        (root / PROCESSES_FILE).unlink(missing_ok=True)


def _threads_per_site(num_sites: int) -> int:
    """The CPU threads each site's torch may use when ``num_sites`` SuperNodes share this machine.

    A real site has its machine to itself; in a trial, N processes each
    running one torch thread per core would oversubscribe the cores.
    """
    return max(1, (os.cpu_count() or 1) // num_sites)


def _lines_while_watching(process: subprocess.Popen, watch: _NodeWatch) -> Iterator[str]:
    """``process``'s output lines, while ``watch`` logs any SuperNode that exits."""
    done = threading.Event()

    def poll() -> None:
        while not done.wait(1.0):
            watch.check()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield from process.stdout or ()
    finally:
        done.set()
        thread.join(timeout=2)
    watch.check()


def _write_processes(root: Path, listing: dict[str, Any]) -> None:
    """``processes.json``: the trial's FLWR_HOME, SuperLink address, CA and the PIDs it started (for `down` and for tests)."""
    (root / PROCESSES_FILE).write_text(json.dumps(listing, indent=2))


def superlink_pid(home: Path) -> int | None:
    """The PID of the SuperLink started with FLWR_HOME ``home``."""
    for pid in find_by_env("FLWR_HOME", str(home)):
        with contextlib.suppress(Exception):
            if "flower-superlink" in " ".join(psutil.Process(pid).cmdline()):
                return pid
    return None


def stop_trials(state: Path, name: str | None = None) -> list[str]:
    """Stop every process of every trial federation under ``state``, or of the one called ``name``
    (``fedhead federation down``); return what was stopped."""
    stopped = []
    for listing in sorted(trial_root(state).glob(f"{name or '*'}/{PROCESSES_FILE}")):
        try:
            data = json.loads(listing.read_text())
            home, pids = str(data["flwr_home"]), [int(p) for p in data["pids"].values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s is not a trial's process list; stopping by its folder's FLWR_HOME only", listing)
            home, pids = str(listing.parent / "flwr-home"), []
        count = stop_processes(pids + find_by_env("FLWR_HOME", home))
        listing.unlink(missing_ok=True)
        stopped.append(f"{listing.parent.name}: {count} processes stopped")
    return stopped
