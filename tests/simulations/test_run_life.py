"""A run's life, with real processes: refused before it starts, stopped completely when signalled."""

from __future__ import annotations

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

from simulations.runner import project_root

ROOT = project_root()


def _fedhead(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_fedhead_alone_shows_help():
    out = _fedhead()
    assert out.returncode in (0, 2)
    text = " ".join(out.stdout.split())
    assert "Usage: fedhead" in text and "simulate" in text and "site" in text and "show" in text


def test_version_names_fedhead_flower_and_torch():
    out = _fedhead("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("fedhead ") and "Flower 1.42" in out.stdout and "torch " in out.stdout


@pytest.mark.parametrize("text", ["lr 0.1", "= =", "lr=", "=3", "num-server-rounds=2 strategy=fedprox", "seed='4"])
def test_a_malformed_run_config_is_refused_quoting_it(text):
    out = _fedhead("simulate", "--run-config", text)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"fedhead: cannot parse --run-config {text!r}:"
    assert all(line.startswith("fedhead: ") for line in lines)
    assert "Traceback" not in out.stderr and "run folder" not in out.stderr


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "..", "a\\b"])
def test_a_run_name_that_is_not_a_plain_name_is_refused(name, tmp_path):
    out = _fedhead("simulate", "--name", name, "--run-config", f"dataset='digits' run-dir='{tmp_path}'")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert out.stderr.startswith(f"fedhead: --name {name!r} is not a plain name")
    assert list(tmp_path.iterdir()) == []


def test_a_run_name_in_the_run_config_is_checked_too(tmp_path):
    out = _fedhead("simulate", "--run-config", f"dataset='digits' run-dir='{tmp_path}' run-name='../up'")
    assert out.returncode == 2 and "'run-name' = '../up'" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "says"), [
    ("min-sites=3", "'min-sites' = 3: more than the 2 sites, so no round could start"),
    ("classes='a,b'", "'classes' names 2 classes, but dataset 'digits' has 10"),
    ("enrolment='no-such-enrolment.json'", "'enrolment' = 'no-such-enrolment.json' is not a file"),
    ("num-server-rounds=99999999999999999999", "must be 1 to 100,000"),
])
def test_a_config_that_could_never_run_is_refused_before_anything_starts(tmp_path, capsys, text, says):
    from simulations.cli import main

    assert main(["simulate", "--sites", "2", "--run-config", f"dataset='digits' run-dir='{tmp_path}' {text}"]) == 2
    assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_run_dir_is_refused_before_anything_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = _fedhead("simulate", "--run-config", f"dataset='digits' run-dir='{blocker / 'runs'}'")
    assert out.returncode == 2
    assert out.stderr.startswith(f"fedhead: run-dir '{blocker / 'runs'}' is not a writable folder")


def test_global_options_work_after_the_subcommand(tmp_path):
    out = _fedhead("show", str(tmp_path), "--log-level", "LOUD")
    assert out.returncode == 2 and "log level 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR" in out.stderr


def _round_logged(metrics: Path) -> bool:
    if not metrics.exists():
        return False
    for line in metrics.read_text().splitlines():
        try:
            if json.loads(line)["round"] >= 1:
                return True
        except (json.JSONDecodeError, KeyError):
            continue
    return False


def _marked(proc, flwr_home: str) -> bool:
    try:
        return proc.environ().get("FLWR_HOME") == flwr_home or any(flwr_home in part for part in proc.cmdline())
    except psutil.Error:
        return False


@pytest.mark.slow
def test_sigterm_stops_every_process_of_the_run_and_marks_it_interrupted(tmp_path):
    name = f"sigterm-{uuid.uuid4().hex[:8]}"
    flwr_home = str(ROOT / ".cache" / "fedhead" / "flwr-home" / name)
    run_config = f"dataset='digits' image-size=32 num-server-rounds=20 run-dir='{tmp_path / 'runs'}'"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        cli = subprocess.Popen(
            [sys.executable, "-m", "simulations.cli", "simulate", "--sites", "2", "--name", name, "--run-config", run_config],
            stdout=out, stderr=err, cwd=ROOT, start_new_session=True,
        )
    seen: dict[int, tuple[float, str]] = {}
    listening: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 240
    try:
        while not _round_logged(tmp_path / "runs" / name / "metrics.jsonl"):
            assert cli.poll() is None, (tmp_path / "err.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, "round 1 was not logged within 240 s"
            for child in psutil.Process(cli.pid).children(recursive=True):
                try:
                    seen.setdefault(child.pid, (child.create_time(), child.name()))
                    listening |= {(child.name(), c.laddr.ip) for c in child.net_connections("inet") if c.status == psutil.CONN_LISTEN}
                except psutil.Error:
                    pass
            time.sleep(0.5)
        os.kill(cli.pid, signal.SIGTERM)
        sent = time.monotonic()
        returncode = cli.wait(timeout=60)
        stop_seconds = time.monotonic() - sent
    finally:
        if cli.poll() is None:
            cli.kill()
        shutil.rmtree(flwr_home, ignore_errors=True)  # the CLI's state folder is the project's .cache
    err = (tmp_path / "err.txt").read_text()
    assert returncode == 130, err[-2000:]
    assert stop_seconds < 30
    assert {"raylet", "gcs_server"} <= {n for _, n in seen.values()}, seen  # Ray's daemons were among them
    assert {n for n, _ in listening} >= {"raylet", "gcs_server"}, listening
    assert {ip for _, ip in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening  # loopback only
    time.sleep(1)
    left = []
    for pid, (created, proc_name) in seen.items():
        try:
            if psutil.Process(pid).create_time() == created:
                left.append((pid, proc_name))
        except psutil.NoSuchProcess:
            pass
    assert left == [], f"still running after SIGTERM: {left}"
    assert [p.pid for p in psutil.process_iter() if _marked(p, flwr_home)] == []
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert 1 <= summary["rounds_completed"] < 20
    assert "interrupted by SIGTERM" in err and "Rounds" in (tmp_path / "out.txt").read_text()
