"""The run folder: ``runs/<name>/`` with config, metrics, model, summary and plots."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from common.config import RunConfig, is_plain_name
from common.errors import ConfigError
from common.files import ensure_writable_dir, write_json_atomic

__all__ = ["RunFolder", "default_run_name", "package_versions"]

_PACKAGES = ("flwr", "torch", "torchvision", "opacus", "numpy", "safetensors", "fedhead")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run's results depend on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def default_run_name(cfg: RunConfig) -> str:
    """``<UTC time>-<backbone>-<strategy>``, unique enough for one machine."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{cfg.backbone}-{cfg.strategy}"


@dataclass
class RunFolder:
    """Paths of one run's outputs."""

    root: Path

    @classmethod
    def create(cls, cfg: RunConfig) -> "RunFolder":
        """Make ``run-dir/run-name``; a folder that already holds a run is an error."""
        name = cfg.run_name or default_run_name(cfg)
        if not is_plain_name(name):
            raise ConfigError(f"run-name {name!r} is not a plain folder name; use letters, digits, '.', '_' and '-'")
        root = ensure_writable_dir(cfg.run_dir, "run-dir") / name
        if (root / "config.json").exists():
            raise ConfigError(f"run folder {root} already holds a run; choose another run-name or remove it")
        root.mkdir(exist_ok=True)
        return cls(root)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def write_json(self, name: str, content: dict[str, Any]) -> Path:
        """Write ``content`` as indented JSON, atomically."""
        return write_json_atomic(self.root / name, content)
