"""Splitting a dataset among simulated sites with flwr-datasets' partitioners, offline."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from common.errors import ConfigError

__all__ = ["PARTITIONERS", "partition_indices"]


def _iid(num_sites: int, *, alpha: float, shards_per_site: int, seed: int) -> Partitioner:
    return IidPartitioner(num_partitions=num_sites)


def _dirichlet(num_sites: int, *, alpha: float, shards_per_site: int, seed: int) -> Partitioner:
    return DirichletPartitioner(
        num_partitions=num_sites, partition_by="label", alpha=alpha, min_partition_size=10, seed=seed
    )


def _shard(num_sites: int, *, alpha: float, shards_per_site: int, seed: int) -> Partitioner:
    return ShardPartitioner(
        num_partitions=num_sites, partition_by="label", num_shards_per_partition=shards_per_site, seed=seed
    )


# run-config 'partitioner' -> flwr-datasets partitioner (the names common.config accepts).
PARTITIONERS: dict[str, Callable[..., Partitioner]] = {"iid": _iid, "dirichlet": _dirichlet, "shard": _shard}


def _partitioner(kind: str, num_sites: int, *, alpha: float, shards_per_site: int, seed: int) -> Partitioner:
    if kind not in PARTITIONERS:
        raise ConfigError(f"unknown partitioner '{kind}'; choose one of: {', '.join(PARTITIONERS)}")
    return PARTITIONERS[kind](num_sites, alpha=alpha, shards_per_site=shards_per_site, seed=seed)


def partition_indices(
    labels: np.ndarray,
    num_sites: int,
    *,
    kind: str,
    alpha: float = 0.5,
    shards_per_site: int = 2,
    seed: int = 42,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``num_sites`` sites; the same seed gives the same split."""
    if num_sites < 1:
        raise ConfigError(f"number of sites = {num_sites}: must be >= 1")
    if num_sites > len(labels):
        raise ConfigError(f"{num_sites} sites but only {len(labels)} examples; use fewer sites")
    order = np.random.default_rng(seed).permutation(len(labels))  # IidPartitioner does not shuffle
    table = Dataset.from_dict({"label": labels[order].astype(np.int64), "index": order.astype(np.int64)})
    partitioner = _partitioner(kind, num_sites, alpha=alpha, shards_per_site=shards_per_site, seed=seed)
    partitioner.dataset = table
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)) for i in range(num_sites)]
    except ValueError as exc:
        raise ConfigError(f"cannot split {len(labels)} examples into {num_sites} {kind} partitions: {exc}") from exc
    return parts
