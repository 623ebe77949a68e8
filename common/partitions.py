"""Writing each simulated site's data as the .npz file a real site would have.

``prepare_federation`` partitions the benchmark's training split among the
sites, carves each site's validation split, and writes ``site-<i>.npz``
(MedMNIST layout) plus ``test.npz`` (the held-out test split, for server-side
evaluation) into a folder keyed by everything the split depends on, so a
repeated run reuses it and a changed setting never does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.errors import DataError
from simulations.datasets import load_benchmark
from simulations.partitioning import partition_indices

__all__ = ["Federation", "prepare_federation"]

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
    parts = {
        "source": _source_stamp(cfg),
        "classes": cfg.classes,
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
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def prepare_federation(cfg: RunConfig, num_sites: int, *, cache_root: Path) -> Federation:
    """Write (or reuse) the site files for ``num_sites`` sites under ``cache_root``."""
    out = cache_root / "partitions" / f"{cfg.dataset}-{cfg.partitioner}-{num_sites}sites-{_key(cfg, num_sites)}"
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all((out / f"site-{i}.npz").exists() for i in range(num_sites)) and (out / "test.npz").exists():
            log.info("reusing the site partitions in %s", out)
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
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d site partitions of %s to %s", num_sites, bench.name, out)
    return Federation(out, out / "test.npz", bench.classes, sites)
