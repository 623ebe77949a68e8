"""The typed site configuration, read once from a SuperNode's node_config.

A hospital starts its SuperNode with ``--node-config "site-name='oslo'
data-dir='/data/xray' state-dir='/var/lib/fedhead'"``; a simulated site gets
``partition-id`` and ``num-partitions`` from Flower. Everything a site keeps
(feature cache now; privacy ledger and keys later) lives in its own
``state-dir``, never where the server's run config points.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.devices import PRECISIONS
from common.errors import ConfigError
from common.files import ensure_writable_dir
from common.paths import fedhead_home

__all__ = ["SiteConfig", "build_site_config"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_KEYS = ("site-name", "data-dir", "state-dir", "policy", "device", "precision", "partition-id", "num-partitions")


@dataclass(frozen=True)
class SiteConfig:
    """One site's settings; paths are absolute."""

    site_name: str
    data_dir: Path | None
    state_dir: Path
    policy: Path | None = None
    device: str = "auto"
    partition_id: int | None = None
    num_partitions: int | None = None
    precision: str = "auto"

    @property
    def cache_dir(self) -> Path:
        """The site's feature cache."""
        return self.state_dir / "features"

    @property
    def simulated(self) -> bool:
        """True for a simulated site that reads a prepared partition instead of its own data."""
        return self.data_dir is None and self.partition_id is not None


def _int(node_config: Mapping[str, Any], key: str, problems: list[str]) -> int | None:
    if key not in node_config:
        return None
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        problems.append(f"'{key}' = {value!r}: must be a non-negative integer")
        return None
    return int(value)


def build_site_config(node_config: Mapping[str, Any]) -> SiteConfig:
    """Validate ``node_config`` into a SiteConfig; every problem is reported at once.

    Defaults: ``site-name`` from the partition id (``site-<i>``) else ``site``;
    ``state-dir`` ``$FEDHEAD_HOME/sites/<site-name>``; ``device`` ``auto`` (CUDA
    when torch sees a GPU, else the CPU); ``precision`` ``auto`` (float32;
    ``float16`` is the faster GPU path, see common.devices).
    The state folder is created and proven writable here, before any work.
    """
    problems: list[str] = []
    for key in sorted(set(node_config) - set(_KEYS)):
        problems.append(f"unknown node-config key '{key}'; known keys: {', '.join(_KEYS)}")
    partition_id = _int(node_config, "partition-id", problems)
    num_partitions = _int(node_config, "num-partitions", problems)
    default_name = f"site-{partition_id}" if partition_id is not None else "site"
    name = str(node_config.get("site-name", default_name)).strip()
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", name):
        problems.append(
            f"'site-name' = {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it names the site in every record)"
        )
    data_dir = None
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"])).expanduser().resolve()
        if not data_dir.exists():
            problems.append(f"'data-dir' = '{data_dir}' does not exist; point it at the site's image folder, .csv manifest or .npz file")
    elif partition_id is None:
        problems.append("node config names no data: give the SuperNode --node-config \"data-dir='/path/to/images'\"")
    policy = None
    if str(node_config.get("policy", "")).strip():
        policy = Path(str(node_config["policy"])).expanduser().resolve()
        if not policy.is_file():
            problems.append(f"'policy' = '{policy}' is not a file; give the path of the site's privacy policy (TOML)")
    device = str(node_config.get("device", "auto")).strip().lower()
    if not _DEVICE.fullmatch(device):
        problems.append(f"'device' = {device!r}: choose auto, cpu, cuda or cuda:N")
    precision = str(node_config.get("precision", "auto")).strip().lower()
    if precision not in PRECISIONS:
        problems.append(f"'precision' = {precision!r}: choose {', '.join(PRECISIONS)}")
    state_raw = str(node_config.get("state-dir", "")).strip()
    state_dir = Path(state_raw).expanduser() if state_raw else fedhead_home() / "sites" / name
    if not problems:
        try:
            state_dir = ensure_writable_dir(state_dir, "state-dir")
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid site config (node_config):\n  - " + "\n  - ".join(problems))
    return SiteConfig(name, data_dir, state_dir, policy, device, partition_id, num_partitions, precision)
