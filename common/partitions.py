"""Each simulated site's data, written once as the .npz file a real site would have.

``prepare_federation`` partitions the benchmark's training split among the
sites, carves each site's validation split, and writes ``site-<i>.npz``
(MedMNIST layout) plus ``test.npz`` (the held-out test split, for server-side
evaluation) into a folder keyed by everything the split depends on, so a
repeated run reuses it and a changed setting never does.

``fedhead simulate`` prepares the files before it starts Flower; a simulated
ClientApp started by ``flwr run .`` prepares (or finds) the same files from its
``partition-id`` / ``num-partitions`` under ``$FEDHEAD_HOME``. A file lock
keeps concurrent sites from preparing the same folder twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.benchmarks import load_benchmark
from common.errors import DataError
from common.files import atomic_path, write_json_atomic
from common.hashing import sha256_json
from common.partitioning import partition_indices

__all__ = ["Federation", "prepare_federation", "partition_file"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class Federation:
    """Where the prepared site files are, and what they hold."""

    partitions_dir: Path
    test_path: Path
    classes: tuple[str, ...]
    site_sizes: list[dict]


def _source_stamp(cfg: RunConfig) -> str:
    """Size and modification time of a dataset file or folder, so a changed source is re-split."""
    if not cfg.dataset_path:
        return ""
    path = Path(cfg.dataset_path).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return hashlib.sha256("".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in files).encode()).hexdigest()


def _key(cfg: RunConfig, num_sites: int) -> str:
    """Everything the split depends on (not class names: they only label it)."""
    parts = {
        "source": _source_stamp(cfg),
        "format": FORMAT_VERSION,
        "dataset": cfg.dataset,
        "dataset_path": str(Path(cfg.dataset_path).expanduser().resolve()) if cfg.dataset_path else "",
        "image_size": cfg.image_size if cfg.dataset == "image-folder" else None,
        "partitioner": cfg.partitioner,
        "alpha": cfg.dirichlet_alpha if cfg.partitioner == "dirichlet" else None,
        "shards": cfg.shards_per_site if cfg.partitioner == "shard" else None,
        "examples_per_site": cfg.examples_per_site,
        "val_fraction": cfg.val_fraction,
        "num_sites": num_sites,
        "seed": cfg.seed,
    }
    return sha256_json(parts)[:16]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (other processes preparing it wait)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_federation(cfg: RunConfig, num_sites: int, *, cache_root: Path) -> Federation:
    """Write (or reuse) the site files for ``num_sites`` sites under ``cache_root``."""
    out = cache_root / "partitions" / f"{cfg.dataset}-{cfg.partitioner}-{num_sites}sites-{_key(cfg, num_sites)}"
    with _locked(cache_root / "partitions"):
        return _prepare(cfg, num_sites, out, cache_root)


def partition_file(cfg: RunConfig, *, partition_id: int, num_partitions: int, cache_root: Path) -> Path:
    """The .npz of simulated site ``partition_id`` of ``num_partitions``, prepared if not there yet."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    return prepare_federation(cfg, num_partitions, cache_root=cache_root).partitions_dir / f"site-{partition_id}.npz"


def _prepare(cfg: RunConfig, num_sites: int, out: Path, cache_root: Path) -> Federation:
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all((out / f"site-{i}.npz").exists() for i in range(num_sites)) and (out / "test.npz").exists():
            log.debug("reusing the site partitions in %s", out)
            return Federation(out, out / "test.npz", tuple(manifest["classes"]), manifest["sites"])
    bench = load_benchmark(cfg, cache_root / "data")
    if len(bench.classes) > 0 and int(bench.train_labels.max()) >= len(bench.classes):
        raise DataError(f"{bench.name}: labels go up to {int(bench.train_labels.max())} but only {len(bench.classes)} classes are named")
    parts = partition_indices(
        bench.train_labels,
        num_sites,
        kind=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        shards_per_site=cfg.shards_per_site,
        seed=cfg.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    sites = []
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        if cfg.examples_per_site:
            idx = idx[: cfg.examples_per_site]
        n_val = int(round(len(idx) * cfg.val_fraction))
        val, train = idx[:n_val], idx[n_val:]
        if len(train) == 0:
            raise DataError(f"site {i} got no training examples; use fewer sites or a larger dirichlet-alpha")
        _save_npz(
            out / f"site-{i}.npz",
            train_images=bench.train_images[train],
            train_labels=bench.train_labels[train],
            val_images=bench.train_images[val],
            val_labels=bench.train_labels[val],
        )
        histogram = np.bincount(bench.train_labels[train], minlength=len(bench.classes)).tolist()
        sites.append({"site": f"site-{i}", "train": int(len(train)), "val": int(len(val)), "label_histogram": histogram})
    _save_npz(out / "test.npz", test_images=bench.test_images, test_labels=bench.test_labels)
    manifest = {"dataset": bench.name, "classes": list(bench.classes), "sites": sites, "test": int(len(bench.test_labels))}
    write_json_atomic(manifest_path, manifest)
    log.info("wrote %d site partitions of %s to %s", num_sites, bench.name, out)
    return Federation(out, out / "test.npz", bench.classes, sites)
