"""What a simulation is asked to run, checked before anything heavy is imported or started.

Bad input costs the user a fraction of a second: this module imports neither
torch nor Flower, so ``fedhead simulate`` refuses a bad config, run name or
folder before it loads the runner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.cli import check_run_name
from common.config import BENCHMARK_CLASS_COUNTS, RunConfig, build_run_config
from common.errors import ConfigError
from common.files import ensure_writable_dir
from server.run_folder import default_run_name

__all__ = ["RunTarget", "check_run_target", "project_root"]


def project_root() -> Path:
    """The folder holding fedhead's pyproject.toml (the Flower app that is run)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"cannot find fedhead's pyproject.toml next to {root}; run from a source checkout")
    return root


@dataclass(frozen=True)
class RunTarget:
    """A checked request: its config, kebab-case overrides, a writable run-dir and state folder, a free run name."""

    cfg: RunConfig
    overrides: dict[str, Any]
    run_dir: Path
    run_name: str
    state: Path

    def resolved(self, held_out: Path, classes: Sequence[str], num_sites: int) -> dict[str, Any]:
        """The overrides a run is submitted with: these plus the prepared held-out set, classes, run folder and min-sites."""
        overrides = self.overrides
        return {
            **overrides,
            "server-eval-data": str(overrides.get("server-eval-data") or held_out),
            "classes": ",".join(classes),
            "run-dir": str(self.run_dir),
            "run-name": self.run_name,
            "min-sites": min(int(overrides.get("min-sites", self.cfg.min_sites)), num_sites),
        }


def check_run_target(
    *, num_sites: int, name: str = "", overrides: Mapping[str, Any] | None = None, state_dir: Path | None = None
) -> RunTarget:
    """Check everything that can be checked before starting; raise ConfigError naming what is wrong."""
    root = project_root()
    kebab = {str(k).replace("_", "-"): v for k, v in (overrides or {}).items()}
    if num_sites < 1:
        raise ConfigError(f"--sites {num_sites}: need at least one site")
    if str(kebab.get("dp", "")) in ("central", "both"):
        kebab.setdefault("sites-per-round", num_sites)  # client-level noise is calibrated for every site each round
    cfg = build_run_config(kebab)
    if cfg.sites_per_round > num_sites:
        raise ConfigError(f"'sites-per-round' = {cfg.sites_per_round}: more than the {num_sites} simulated sites")
    if cfg.min_sites > num_sites:
        raise ConfigError(f"'min-sites' = {cfg.min_sites}: more than the {num_sites} sites, so no round could start; "
                          f"lower it or pass --sites {cfg.min_sites}")
    fixed = BENCHMARK_CLASS_COUNTS.get(cfg.dataset)
    if fixed is not None and cfg.num_classes != fixed:
        raise ConfigError(f"'classes' names {cfg.num_classes} classes, but dataset {cfg.dataset!r} has {fixed}; "
                          f"leave 'classes' out (or name all {fixed})")
    if cfg.enrolment and not Path(cfg.enrolment).is_file():
        raise ConfigError(f"'enrolment' = {cfg.enrolment!r} is not a file; give the federation's enrolment.json")
    run_name = check_run_name(name) if name else str(kebab.get("run-name", "")) or default_run_name(cfg)
    check_run_name(run_name, "run-name")
    run_dir = ensure_writable_dir(kebab.get("run-dir", root / "runs"), "run-dir")
    state = ensure_writable_dir(state_dir or root / ".cache" / "fedhead", "state folder")
    if (run_dir / run_name).exists():
        raise ConfigError(f"run folder {run_dir / run_name} already exists; choose another --name or remove it")
    return RunTarget(cfg=cfg, overrides=kebab, run_dir=run_dir, run_name=run_name, state=state)
