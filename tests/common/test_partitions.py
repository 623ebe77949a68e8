"""Site files for simulations, from each supported benchmark layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.site_data import load_site_data
from common.config import build_run_config
from common.errors import DataError
from common.partitions import prepare_federation


def _assert_sites_load(federation, cfg, num_sites):
    total = 0
    for i in range(num_sites):
        site = load_site_data(federation.partitions_dir / f"site-{i}.npz", cfg)
        assert len(site.train) > 0
        total += len(site.train) + len(site.val)
    return total


def test_digits_partitions_are_written_once_and_reused(tmp_path):
    cfg = build_run_config(dataset="digits", partitioner="iid", classes="0,1,2,3,4,5,6,7,8,9")
    first = prepare_federation(cfg, 3, cache_root=tmp_path)
    mtime = (first.partitions_dir / "site-0.npz").stat().st_mtime_ns
    again = prepare_federation(cfg, 3, cache_root=tmp_path)
    assert again.partitions_dir == first.partitions_dir
    assert (again.partitions_dir / "site-0.npz").stat().st_mtime_ns == mtime
    assert _assert_sites_load(first, cfg, 3) == 1797 - 359
    other = prepare_federation(build_run_config(dataset="digits", partitioner="iid", seed=5), 3, cache_root=tmp_path)
    assert other.partitions_dir != first.partitions_dir


def test_medmnist_style_npz(tmp_path, digits):
    images, labels = digits
    path = tmp_path / "bloodmnist_like.npz"
    np.savez(
        path,
        train_images=np.repeat(images[:300, :, :, None], 3, axis=3), train_labels=labels[:300, None],
        val_images=np.repeat(images[300:350, :, :, None], 3, axis=3), val_labels=labels[300:350, None],
        test_images=np.repeat(images[350:450, :, :, None], 3, axis=3), test_labels=labels[350:450, None],
    )
    cfg = build_run_config(dataset="npz", dataset_path=str(path), partitioner="iid")
    federation = prepare_federation(cfg, 2, cache_root=tmp_path / "state")
    assert federation.classes == tuple(f"class-{i}" for i in range(10))
    site_cfg = build_run_config(classes=",".join(federation.classes))
    assert _assert_sites_load(federation, site_cfg, 2) == 350


def test_image_folder(tmp_path, digits):
    images, labels = digits
    for split, rng in (("train", range(0, 60)), ("test", range(60, 80))):
        for i in rng:
            folder = tmp_path / "data" / split / ("even" if labels[i] % 2 == 0 else "odd")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    cfg = build_run_config(dataset="image-folder", dataset_path=str(tmp_path / "data"), partitioner="iid", image_size=16)
    federation = prepare_federation(cfg, 2, cache_root=tmp_path / "state")
    assert federation.classes == ("even", "odd")
    assert _assert_sites_load(federation, build_run_config(classes="even,odd"), 2) == 60


def test_npz_without_a_path_is_refused(tmp_path):
    with pytest.raises(DataError, match="dataset-path"):
        prepare_federation(build_run_config(dataset="npz"), 2, cache_root=tmp_path)
