"""Shared fixtures: small real data (scikit-learn digits) and real models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from common.config import build_run_config


# `make test` runs the suite on pytest-xdist workers, one test file each at a time (`--dist loadfile`: a
# module's fixture, a whole federation or simulation, runs once). The longest files go out first.
_LONGEST = ("test_secure_federation.py", "test_trial_life.py", "test_simulate.py")


def pytest_collection_modifyitems(config, items):
    """Order the files longest first: the three longest, then the other slow ones (with -n 0 only the order changes)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        return (_LONGEST.index(name) if name in _LONGEST else len(_LONGEST), item.path not in slow)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 images (0-255) and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, data.target.astype(np.int64)


@pytest.fixture
def digits_npz(tmp_path, digits):
    """A site's MedMNIST-style .npz of 1,000 training and 300 validation digits."""
    images, labels = digits
    path = tmp_path / "site.npz"
    np.savez(path, train_images=images[:1000], train_labels=labels[:1000], val_images=images[1000:1300], val_labels=labels[1000:1300])
    return path


@pytest.fixture
def digits_cfg():
    """A run config for digits at 32 px with the pretrained MobileNetV2."""
    return build_run_config(classes=",".join(str(d) for d in range(10)), image_size=32, local_epochs=5, lr=0.01)


@pytest.fixture(autouse=True)
def _quiet_torch_threads():
    torch.set_num_threads(2)
    logging.getLogger("flwr").setLevel(logging.WARNING)


@pytest.fixture
def flower_identity(monkeypatch):
    """The identity Flower's runtime gives an app process (building a Message needs a run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)
