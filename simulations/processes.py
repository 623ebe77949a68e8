"""Flower's processes on this machine: started on loopback, every one of them stopped.

Flower's daemons start children of their own (SuperExec, the simulation
process, Ray's GCS, raylet and workers, ClientApp processes); some leave
their parent's process group, and all of them re-parent to PID 1 when their
parent dies first. So stopping a process group is not enough: the
descendants are snapshot first, and a run's processes are also found by the
run's own ``FLWR_HOME`` in their environment, which every one of them
inherits. Ray is kept on loopback by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(see :func:`flower_env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import tomli_w

from common.errors import FedHeadError

__all__ = [
    "FlowerProcessError",
    "StopRequested",
    "stop_on_signals",
    "free_port",
    "flower_env",
    "wait_healthy",
    "stop_processes",
    "find_by_env",
    "process_group",
    "superlink",
    "SuperLinkTLS",
    "write_connection",
]

log = logging.getLogger(__name__)


class FlowerProcessError(FedHeadError, RuntimeError):
    """A Flower daemon did not start or did not become ready."""


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first SIGINT/SIGTERM raises StopRequested; later ones are only logged.

    Acts only in the main thread (elsewhere Python cannot install handlers);
    the previous handlers come back when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if fired:
            log.warning("%s received; already stopping the run's processes", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise StopRequested(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's tools: our FLWR_HOME, no runtime installs, Ray on loopback, this venv's bin first.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray's node IP 127.0.0.1
    (``ray._private.services.get_node_ip_address``), and GCS, raylet, the
    runtime-env agent and workers listen there; without it they listen on all
    interfaces. Flower's ``init_args`` cannot pass Ray a node address.
    """
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_DEDUP_LOGS"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def wait_healthy(port: int, process: subprocess.Popen, log_file: Path, timeout: float = 60.0, *, tls: bool = False) -> None:
    """Wait until a SuperLink answers /health on ``port`` (over TLS if ``tls``); raise if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerProcessError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        try:
            # only "is it up?" on loopback: the certificate is the sites' to check (an expired one must still start)
            if httpx.get(url, timeout=0.5, verify=False).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise FlowerProcessError(f"flower-superlink did not become ready within {timeout:.0f} s; see {log_file}")


def _descendants(pids: Iterable[int]) -> dict[int, object]:
    found: dict[int, object] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            found[pid] = proc
            found.update((c.pid, c) for c in proc.children(recursive=True))
    return found


def find_by_env(name: str, value: str) -> list[int]:
    """PIDs of this user's processes (not this one) whose environment has ``name=value``."""
    me, pids = os.getpid(), []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != me and proc.environ().get(name) == value:
                pids.append(proc.pid)
    return pids


def stop_processes(pids: Iterable[int], *, groups: Iterable[int] = (), grace_s: float = 3.0) -> int:
    """SIGTERM ``groups`` and ``pids`` with every descendant (snapshot first), SIGKILL what outlives ``grace_s``.

    Returns how many processes were signalled.
    """
    procs = _descendants(pids)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            log.warning("process %d (%s) ignored SIGTERM for %.0f s; killing it", proc.pid, proc.name(), grace_s)
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


@contextlib.contextmanager
def process_group(command: list[str], env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own session, logging to ``log_file``; on exit stop it and all it started."""
    with open(log_file, "wb") as log_handle:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=env, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_processes([process.pid], groups=[process.pid])
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


@dataclass(frozen=True)
class SuperLinkTLS:
    """What a SuperLink serves TLS with, and whether it admits only registered SuperNodes."""

    ca_cert: Path
    cert: Path
    key: Path
    authenticate_nodes: bool = True

    def flags(self) -> list[str]:
        """``flower-superlink``'s TLS (and node authentication) flags."""
        flags = ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key)]
        return flags + (["--enable-supernode-auth"] if self.authenticate_nodes else [])


@contextlib.contextmanager
def superlink(flwr_home: Path, env: dict[str, str], *, simulation: bool, tls: SuperLinkTLS | None = None) -> Iterator[int]:
    """A SuperLink on a free loopback port, ready when entered, stopped on exit; yields its port.

    Without ``tls`` it runs ``--insecure`` (local simulations only).
    """
    port = free_port()
    log_file = flwr_home / f"superlink-{port}.log"
    command = ["flower-superlink", *(tls.flags() if tls else ["--insecure"]), "--host", "127.0.0.1", "--port", str(port)]
    if simulation:
        command += ["--simulation", "--isolation", "subprocess"]
    with process_group(command, env, log_file) as process:
        wait_healthy(port, process, log_file, tls=tls is not None)
        yield port


def write_connection(flwr_home: Path, port: int, name: str = "fedhead-sim", *, ca_cert: Path | None = None, host: str = "127.0.0.1") -> str:
    """Write FLWR_HOME/config.toml with one connection to ``host:port`` (TLS trusting ``ca_cert``, else insecure); return its name."""
    connection: dict[str, object] = {"address": f"{host}:{port}"}
    connection.update({"root-certificates": str(ca_cert)} if ca_cert else {"insecure": True})
    config = {"superlink": {"default": name, name: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))
    return name
