"""`flwr run .` from the project root, as in Flower's own templates: sites prepare their own partitions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.round_record import load_round_records
from simulations.processes import find_by_env, stop_processes
from simulations.runner import project_root

pytestmark = pytest.mark.slow


def test_flwr_run_dot_runs_a_two_site_simulation_that_learns(tmp_path):
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(tmp_path / "flwr"),
        FEDHEAD_HOME=str(tmp_path / "home"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    run_config = (
        "dataset='digits' classes='0,1,2,3,4,5,6,7,8,9' image-size=32 num-server-rounds=2 local-epochs=3 lr=0.01 "
        f"export-onnx=false run-dir='{tmp_path / 'runs'}' run-name='plain-flower'"
    )
    try:
        out = subprocess.run(
            ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=2", "--run-config", run_config],
            cwd=project_root(), env=env, capture_output=True, text=True, timeout=400,
        )
    finally:  # `flwr run` leaves its local SuperLink running; nothing stops it but its PID
        stop_processes(find_by_env("FLWR_HOME", env["FLWR_HOME"]))
    run_dir = tmp_path / "runs" / "plain-flower"
    assert (run_dir / "summary.json").is_file(), out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["evaluated_on"] == "held-out test set" and summary["accuracy"] > 0.5  # chance is 0.1
    records = load_round_records(run_dir / "metrics.jsonl")
    assert sorted(records[-1].sites) == ["site-0", "site-1"]
    prepared = list((tmp_path / "home" / "partitions").glob("digits-dirichlet-2sites-*/site-*.npz"))
    assert len(prepared) == 2  # prepared once, by whichever site came first, and shared
    assert not find_by_env("FLWR_HOME", env["FLWR_HOME"])
