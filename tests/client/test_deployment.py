"""Hospitals as real Flower SuperNodes beside their own data, a real SuperLink, `flwr run`; one dies mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
import tomli_w

from common.config import build_run_config
from common.partitions import prepare_federation
from common.round_record import load_round_records
from simulations.processes import flower_env, free_port, process_group, superlink, write_connection
from simulations.runner import project_root

pytestmark = pytest.mark.slow

SITES = ("oslo", "bergen", "tromso")


def _wait_for_round(metrics, server_round: int, run: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.round >= server_round for r in load_round_records(metrics)):
            return
        if run.poll() is not None:
            pytest.fail(f"flwr run ended before round {server_round}: {run.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"round {server_round} did not finish within {timeout} s")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Three SuperNodes with their own data and state; 'bergen' is killed once round 1 is recorded."""
    tmp_path = tmp_path_factory.mktemp("deploy")
    sites = prepare_federation(build_run_config(dataset="digits", partitioner="iid"), 3, cache_root=tmp_path / "prep")
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flower_env(home)
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(superlink(home, env, simulation=False))
        nodes = {}
        for i, name in enumerate(SITES):
            node_config = f"data-dir='{sites.partitions_dir / f'site-{i}.npz'}' site-name='{name}' state-dir='{tmp_path / name}'"
            command = [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", node_config,
            ]
            nodes[name] = stack.enter_context(process_group(command, env, tmp_path / f"{name}.log"))
        connection = write_connection(home, port, name="hospitals")
        run_config = {
            "num-server-rounds": 3, "local-epochs": 3, "lr": 0.01, "image-size": 32, "min-sites": 2,
            "round-timeout": 120.0, "classes": ",".join(sites.classes), "run-dir": str(tmp_path / "runs"),
            "run-name": "deployed", "server-eval-data": str(sites.test_path),
        }
        (tmp_path / "run.toml").write_text(tomli_w.dumps(run_config))
        run = subprocess.Popen(
            ["flwr", "run", str(project_root()), connection, "--stream", "--run-config", str(tmp_path / "run.toml")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        stack.callback(run.kill)
        _wait_for_round(tmp_path / "runs" / "deployed" / "metrics.jsonl", 1, run)
        os.killpg(nodes["bergen"].pid, signal.SIGKILL)  # the hospital's node dies during round 2
        output, _ = run.communicate(timeout=600)
    return tmp_path, sites, output


def test_the_run_survives_a_killed_site_and_says_degraded(deployed):
    tmp_path, _, output = deployed
    run_dir = tmp_path / "runs" / "deployed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "degraded", output[-3000:]
    assert summary["rounds_completed"] == 3 and summary["accuracy"] > 0.7  # chance is 0.1
    assert (run_dir / "model" / "head.safetensors").is_file() and (run_dir / "model" / "model.pt2").is_file()
    records = {r.round: r for r in load_round_records(run_dir / "metrics.jsonl")}
    assert sorted(records[1].aggregated_sites) == sorted(SITES) and records[1].complete
    for server_round in (2, 3):
        assert sorted(records[server_round].aggregated_sites) == ["oslo", "tromso"]
    # Round 2: the SuperLink reports bergen's node unavailable; the problem is recorded under bergen's name.
    assert [(p.site, p.kind, p.phase) for p in records[2].problems] == [("bergen", "failed", "train")]
    assert "Node Unavailable" in records[2].problems[0].reasons[0]
    assert "bergen" in summary["problems"] and "oslo" not in summary["problems"]


def test_each_site_kept_its_cache_in_its_own_state_dir_and_ran_the_backbone_once(deployed):
    tmp_path, sites, _ = deployed
    summary = json.loads((tmp_path / "runs" / "deployed" / "summary.json").read_text())
    manifest = json.loads((sites.partitions_dir / "manifest.json").read_text())["sites"]
    for i, name in enumerate(SITES):
        if name != "bergen":
            assert summary["backbone_forwards"]["by_site"][name] == {"train": manifest[i]["train"], "eval": manifest[i]["val"]}
        assert len(list((tmp_path / name / "features").glob("*.safetensors"))) == 2
