"""Two hospitals as real Flower SuperNodes beside their own data, a real SuperLink, `flwr run`."""

from __future__ import annotations

import contextlib
import json
import subprocess

import pytest
import tomli_w

from common.config import build_run_config
from simulations.prepare import prepare_federation
from simulations.runner import flower_env, free_port, process_group, project_root, superlink, write_connection

pytestmark = pytest.mark.slow


def test_two_sites_with_their_own_data_dirs(tmp_path):
    sites = prepare_federation(build_run_config(dataset="digits", partitioner="iid"), 2, cache_root=tmp_path / "prep")
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flower_env(home)
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(superlink(home, env, simulation=False))
        for i, name in enumerate(("oslo", "bergen")):
            node_config = f"data-dir='{sites.partitions_dir / f'site-{i}.npz'}' site-name='{name}' cache-dir='{tmp_path / name}'"
            command = [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--port", str(free_port()), "--node-config", node_config,
            ]
            stack.enter_context(process_group(command, env, tmp_path / f"{name}.log"))
        connection = write_connection(home, port, name="hospitals")
        run_config = {
            "num-server-rounds": 2, "local-epochs": 3, "lr": 0.01, "image-size": 32,
            "classes": ",".join(sites.classes), "run-dir": str(tmp_path / "runs"), "run-name": "deployed",
            "server-eval-data": str(sites.test_path),
        }
        (tmp_path / "run.toml").write_text(tomli_w.dumps(run_config))
        subprocess.run(
            ["flwr", "run", str(project_root()), connection, "--stream", "--run-config", str(tmp_path / "run.toml")],
            env=env, capture_output=True, text=True, timeout=400, check=True,
        )
    summary = json.loads((tmp_path / "runs" / "deployed" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["accuracy"] > 0.7  # chance is 0.1
    manifest = json.loads((sites.partitions_dir / "manifest.json").read_text())["sites"]
    assert summary["backbone_forwards"]["by_site"] == {
        "oslo": {"train": manifest[0]["train"], "eval": manifest[0]["val"]},
        "bergen": {"train": manifest[1]["train"], "eval": manifest[1]["val"]},
    }
    for name in ("oslo", "bergen"):  # each site's cache is on its own disk
        assert len(list((tmp_path / name).glob("*.safetensors"))) == 2
