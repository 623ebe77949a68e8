"""A trial federation's life as an operator and a hospital live it, with real processes.

A site's SuperNode is stopped between rounds and started again with
`fedhead federation join`: it comes back as the same enrolled node and its
next rounds use the features it cached before. Ctrl-C of `fedhead federation
up` stops the run and every process it started and says `interrupted`; Ctrl-C
of `join` stops its SuperNode. An `up` killed outright leaves its processes
running, and `fedhead federation down` stops them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from common.round_record import load_round_records
from simulations.processes import find_by_env
from simulations.runner import project_root
from simulations.trial_federation import PROCESSES_FILE, trial_root
from tests.trial_processes import started_trial

pytestmark = pytest.mark.slow

STATE = project_root() / ".cache" / "fedhead"  # where `up` keeps its trials
RUN_CONFIG = ("dataset='digits' partitioner='iid' local-epochs=1 lr=0.01 image-size=32 min-sites=1 export-onnx=false "
              "round-timeout=60.0")


def _cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _wait(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process.poll() is not None:
            pytest.fail(f"{process.args[3:5]} ended (exit {process.returncode}) before {what}: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout} s: {log.read_text()[-3000:]}")


def _processes(pids) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            process = psutil.Process(int(pid))
            found += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def _alive(processes: list[psutil.Process]) -> list[str]:
    """Those still running (``is_running`` compares start times, so a reused PID is not mistaken for one)."""
    return [" ".join(p.cmdline()) for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stop(*clis: subprocess.Popen | None, homes: list[Path]) -> None:
    """After a failed assertion: Ctrl-C each CLI still running, then kill whatever carries one of ``homes`` as FLWR_HOME."""
    running = [cli for cli in clis if cli is not None and cli.poll() is None]
    for cli in running:
        os.killpg(cli.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            cli.wait(timeout=60)
    for pid in [pid for home in homes for pid in find_by_env("FLWR_HOME", str(home))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for cli in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)


def _rounds(run_dir: Path) -> dict:
    return {r.round: r for r in load_round_records(run_dir / "metrics.jsonl")}


def test_a_node_restarted_between_rounds_rejoins_with_its_cache_and_ctrl_c_stops_everything(tmp_path):
    name = f"life-{uuid.uuid4().hex[:8]}"
    trial, run_dir = trial_root(STATE) / name, tmp_path / "runs" / name
    up_log = tmp_path / "up.log"
    up = _cli("federation", "up", "--sites", "2", "--name", name,
              "--run-config", f"{RUN_CONFIG} num-server-rounds=30 run-dir='{tmp_path / 'runs'}'", log=up_log)
    join, join_home = None, tmp_path / "join-flwr-home"
    try:
        listing = _wait(lambda: started_trial(trial), "the trial's processes started", up, up_log)
        started = _processes(listing["pids"].values()) + _processes(find_by_env("FLWR_HOME", listing["flwr_home"]))
        first = _wait(lambda: _rounds(run_dir).get(1), "round 1", up, up_log)
        assert "site-0" in first.aggregated_sites and first.sites["site-0"].train.backbone_forwards_train > 0
        node_id = first.sites["site-0"].node_id

        # The hospital restarts its node between rounds: SIGTERM (systemd's stop), then `join` as it would start it.
        old_node = psutil.Process(listing["pids"]["site-0"])
        os.killpg(old_node.pid, signal.SIGTERM)
        old_node.wait(timeout=30)
        stopped_after = max(_rounds(run_dir))
        site = trial / "sites" / "site-0"
        cached = sorted(p.name for p in (site / "features").glob("*.safetensors"))
        join_log = tmp_path / "join.log"
        env = {**os.environ, "FLWR_HOME": str(join_home), "FEDHEAD_HOME": str(STATE)}
        join = _cli("federation", "join", "--superlink", listing["superlink"], "--ca", listing["ca"],
                    "--data-dir", str(trial / "data" / "site-0"), "--state-dir", str(site), "--site-name", "site-0",
                    log=join_log, env=env)

        # A round sent after the old node was gone can only have been answered by the restarted one.
        def rejoined():
            return [r for n, r in _rounds(run_dir).items() if n >= stopped_after + 2 and "site-0" in r.aggregated_sites]

        (back, *_) = _wait(rejoined, "site-0's restarted node taking part in a round", up, up_log)
        assert back.sites["site-0"].node_id == node_id  # the same enrolled node, named by the SuperLink's enrolment
        train = back.sites["site-0"].train
        assert train.backbone_forwards_train == 0 and train.cache_hits > 0  # its cached features, not a new pass
        assert sorted(p.name for p in (site / "features").glob("*.safetensors")) == cached
        receipts = [json.loads(line) for line in (site / "receipts.jsonl").read_text().splitlines()]
        assert {r["server_round"] for r in receipts} >= {1, back.round}  # one receipt ledger, before and after the restart
        assert join.poll() is None and "site-0's SuperNode exited: it was stopped" in up_log.read_text()

        # Ctrl-C of `up`: the run stops, says so, and nothing it started is left.
        started += _processes(find_by_env("FLWR_HOME", listing["flwr_home"]))
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(timeout=60) == 130, up_log.read_text()[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["rounds_completed"] >= back.round
        assert _alive(started) == [] and find_by_env("FLWR_HOME", listing["flwr_home"]) == []
        assert not (trial / PROCESSES_FILE).exists()

        # Ctrl-C of `join`: its SuperNode (and anything under it) stops with it.
        node = _processes([join.pid])
        os.killpg(join.pid, signal.SIGINT)
        assert join.wait(timeout=60) == 130, join_log.read_text()[-3000:]
        assert "stopped; the SuperNode and everything it started are stopped" in join_log.read_text()
        assert len(node) >= 2 and _alive(node) == []
    finally:
        _stop(up, join, homes=[trial / "flwr-home", join_home])
        shutil.rmtree(trial, ignore_errors=True)


def test_down_stops_a_trial_whose_up_was_killed(tmp_path):
    name = f"orphan-{uuid.uuid4().hex[:8]}"
    trial = trial_root(STATE) / name
    up_log = tmp_path / "up.log"
    up = _cli("federation", "up", "--sites", "1", "--name", name,
              "--run-config", f"{RUN_CONFIG} num-server-rounds=30 run-dir='{tmp_path / 'runs'}'", log=up_log)
    try:
        listing = _wait(lambda: started_trial(trial), "the trial's processes started", up, up_log)
        os.kill(up.pid, signal.SIGKILL)  # the terminal is gone: nothing of up's own clean-up runs
        up.wait(timeout=30)
        left = _processes(listing["pids"].values())
        assert len(_alive(left)) >= 3  # the SuperLink, the SuperNode and flwr run, still running

        def down(trial_name: str) -> subprocess.CompletedProcess:  # by name: other trials (other tests') run on
            return subprocess.run([sys.executable, "-m", "simulations.cli", "federation", "down", "--name", trial_name],
                                  capture_output=True, text=True, timeout=120)

        other = down(f"other-{name}")
        assert other.returncode == 0 and f"no trial federation named 'other-{name}' is running" in other.stdout, other
        assert len(_alive(left)) >= 3
        stopped = down(name)
        assert stopped.returncode == 0 and f"{name}: " in stopped.stdout and "processes stopped" in stopped.stdout, stopped
        assert _alive(left) == [] and find_by_env("FLWR_HOME", listing["flwr_home"]) == []
        assert not (trial / PROCESSES_FILE).exists()
        again = down(name)
        assert again.returncode == 0 and f"no trial federation named '{name}' is running" in again.stdout, again
    finally:
        _stop(up, homes=[trial / "flwr-home"])
        shutil.rmtree(trial, ignore_errors=True)

