"""``fedhead simulate``: a local multi-site run through a real ``flwr run``.

The runner validates the config, prepares each site's partition file and
checks the weights before anything starts; then it starts its own
``flower-superlink --simulation`` on a free loopback port (with a project-local
``FLWR_HOME`` and no runtime dependency installs), submits the app with
``flwr run --stream``, and stops the SuperLink afterwards. Flower's own exit
code does not say whether the run failed, so success is read from
``flwr ls`` and from the run folder's ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.config import RunConfig, build_run_config
from common.errors import ConfigError, FedHeadError
from common.model import build_split_model
from server.run_folder import default_run_name
from simulations.prepare import prepare_federation

__all__ = [
    "SimulationResult",
    "SimulationError",
    "run_simulation",
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
    """The simulated run did not finish successfully."""


@dataclass
class SimulationResult:
    """A finished simulation: its folder and summary."""

    run_dir: Path
    summary: dict[str, Any]


def project_root() -> Path:
    """The folder holding fedhead's pyproject.toml (the Flower app that is run)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"cannot find fedhead's pyproject.toml next to {root}; run from a source checkout")
    return root


def parse_run_config(text: str) -> dict[str, Any]:
    """Parse ``"k=v k2=v2"`` exactly as ``flwr run --run-config`` does."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text]) if text.strip() else {}
    except Exception as exc:  # click/toml errors, reworded
        raise ConfigError(f"cannot parse --run-config {text!r}: {exc}; use 'key=value key2=\"text\"'") from exc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's tools: our FLWR_HOME, no runtime installs, this venv's bin first."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_DEDUP_LOGS"] = "0"
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def wait_healthy(port: int, process: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    """Wait until a SuperLink answers /health on ``port``; raise if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SimulationError(f"flower-superlink did not become ready within {timeout:.0f} s; see {log_file}")


@contextlib.contextmanager
def process_group(command: list[str], env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own process group, logging to ``log_file``; stop the whole group on exit.

    Flower's daemons start children of their own (SuperExec, ClientApp
    processes), so the group, not just the PID, is stopped.
    """
    with open(log_file, "wb") as log_handle:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=env, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def superlink(flwr_home: Path, env: dict[str, str], *, simulation: bool) -> Iterator[int]:
    """A SuperLink on a free loopback port, ready when entered, stopped on exit; yields its port."""
    port = free_port()
    log_file = flwr_home / f"superlink-{port}.log"
    command = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    if simulation:
        command += ["--simulation", "--isolation", "subprocess"]
    with process_group(command, env, log_file) as process:
        wait_healthy(port, process, log_file)
        yield port


def write_connection(flwr_home: Path, port: int, name: str = "fedhead-sim") -> str:
    """Write FLWR_HOME/config.toml with one insecure loopback connection; return its name."""
    config = {"superlink": {"default": name, name: {"address": f"127.0.0.1:{port}", "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))
    return name


def _run_status(env: dict[str, str], connection: str) -> str | None:
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
    """Run a local simulation of ``num_sites`` sites; raise SimulationError unless it finished."""
    root = project_root()
    state = (state_dir or root / ".cache" / "fedhead").resolve()
    overrides = {str(k).replace("_", "-"): v for k, v in (overrides or {}).items()}
    cfg = build_run_config(overrides)
    if num_sites < 1:
        raise ConfigError(f"--sites {num_sites}: need at least one site")
    run_dir = Path(overrides.get("run-dir", root / "runs")).resolve()
    run_name = name or str(overrides.get("run-name", "")) or default_run_name(cfg)
    if (run_dir / run_name).exists():
        raise ConfigError(f"run folder {run_dir / run_name} already exists; choose another --name or remove it")
    federation = prepare_federation(cfg, num_sites, cache_root=state)
    resolved: dict[str, Any] = {
        **overrides,
        "partitions-dir": str(federation.partitions_dir),
        "server-eval-data": str(overrides.get("server-eval-data") or federation.test_path),
        "classes": ",".join(federation.classes),
        "run-dir": str(run_dir),
        "run-name": run_name,
        "cache-dir": str(Path(overrides.get("cache-dir", state / "features")).resolve()),
        "min-sites": min(int(overrides.get("min-sites", cfg.min_sites)), num_sites),
    }
    cfg = build_run_config(resolved)
    build_split_model(cfg)  # weights present and verified before any process starts
    run_config = {k: v for k, v in cfg.to_run_config().items() if k in resolved}
    flwr_home = state / "flwr-home" / run_name  # one per run: concurrent simulations never share it
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, dir=flwr_home) as fh:
        fh.write(tomli_w.dumps(run_config))
        run_config_file = fh.name
    federation_config = f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_site}"
    log.info("simulating %d sites; run folder %s", num_sites, run_dir / run_name)
    try:
        with superlink(flwr_home, env, simulation=True) as port:
            connection = write_connection(flwr_home, port)
            command = [
                "flwr", "run", str(root), connection, "--stream",
                "--run-config", run_config_file, "--federation-config", federation_config,
            ]
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in process.stdout or ():
                if on_line:
                    on_line(line.rstrip("\n"))
            process.wait()
            status = _run_status(env, connection)
    finally:
        Path(run_config_file).unlink(missing_ok=True)
    summary_path = run_dir / run_name / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if process.returncode != 0 or summary is None or summary.get("status") != "finished" or status not in (None, "finished:completed"):
        reason = (summary or {}).get("error") or f"flwr run exited {process.returncode}, run status {status}"
        raise SimulationError(f"simulation '{run_name}' did not finish: {reason}; logs above, folder {run_dir / run_name}")
    return SimulationResult(run_dir / run_name, summary)
