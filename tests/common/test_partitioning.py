"""Partitions from flwr-datasets' partitioners: reproducible from a seed, disjoint, non-IID when asked."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError
from common.partitioning import partition_indices


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shard"])
def test_same_seed_same_partitions_and_disjoint(digits, kind):
    _, labels = digits
    a = partition_indices(labels, 3, kind=kind, alpha=0.5, seed=7)
    b = partition_indices(labels, 3, kind=kind, alpha=0.5, seed=7)
    c = partition_indices(labels, 3, kind=kind, alpha=0.5, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    joined = np.concatenate(a)
    assert len(joined) == len(np.unique(joined))


def test_dirichlet_is_more_skewed_than_iid(digits):
    _, labels = digits

    def skew(parts):
        hists = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([np.abs(h - 0.1).sum() for h in hists]))

    iid = partition_indices(labels, 3, kind="iid", seed=1)
    dirichlet = partition_indices(labels, 3, kind="dirichlet", alpha=0.3, seed=1)
    assert sum(map(len, iid)) == len(labels)
    assert skew(dirichlet) > 3 * skew(iid)


def test_more_sites_than_examples_is_a_clear_error():
    with pytest.raises(ConfigError, match="use fewer sites"):
        partition_indices(np.zeros(3, np.int64), 5, kind="iid")
