"""Benchmark datasets as uint8 image arrays with integer labels, read offline.

- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` files, read through
  torchvision's ``FashionMNIST`` (which downloads only where the Debian files
  are absent and the network allows);
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images; for tests);
- ``npz``: a MedMNIST-style file (``train_*``, optional ``val_*``, ``test_*``);
- ``image-folder``: ``train/`` and ``test/`` folders of class sub-folders.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.site_data import image_to_uint8
from common.config import FASHION_MNIST_CLASSES, RunConfig
from common.errors import DataError

__all__ = ["Benchmark", "load_benchmark", "DEBIAN_FASHION_MNIST"]

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Benchmark:
    """A dataset's train and test splits, and its class names."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def _stage_debian_fashion_mnist(root: Path) -> None:
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).exists() for name in _FASHION_FILES):
        return
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").exists() for name in _FASHION_FILES):
        return
    raw.mkdir(parents=True, exist_ok=True)
    for name in _FASHION_FILES:
        tmp = raw / f".{name}.tmp"
        with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / name)
    log.info("unpacked Debian's Fashion-MNIST into %s", raw)


def _fashion_mnist(root: Path) -> Benchmark:
    from torchvision.datasets import FashionMNIST

    _stage_debian_fashion_mnist(root)
    try:
        train = FashionMNIST(str(root), train=True, download=True)
        test = FashionMNIST(str(root), train=False, download=True)
    except (RuntimeError, OSError) as exc:
        raise DataError(
            f"Fashion-MNIST is not in {root} and could not be downloaded ({exc}); "
            "install Debian's package (`apt-get install dataset-fashion-mnist`) or run `make data`"
        ) from exc
    return Benchmark(
        "fashion-mnist",
        train.data.numpy(),
        train.targets.numpy(),
        test.data.numpy(),
        test.targets.numpy(),
        tuple(FASHION_MNIST_CLASSES.split(",")),
    )


def _digits(seed: int) -> Benchmark:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return Benchmark("digits", images[train], labels[train], images[test], labels[test], tuple(str(d) for d in range(10)))


def _npz(path: Path, cfg: RunConfig) -> Benchmark:
    if not path.is_file():
        raise DataError(f"dataset-path '{path}' is not a file; dataset=npz needs a MedMNIST-style .npz")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in data]
        if missing:
            raise DataError(f"{path} lacks {missing}; expected the MedMNIST layout (train_*, val_*, test_*)")
        train_images, train_labels = data["train_images"], data["train_labels"].reshape(-1)
        if "val_images" in data:
            train_images = np.concatenate([train_images, data["val_images"]])
            train_labels = np.concatenate([train_labels, data["val_labels"].reshape(-1)])
        test_images, test_labels = data["test_images"], data["test_labels"].reshape(-1)
    if train_images.dtype != np.uint8 or test_images.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 (0-255), got {train_images.dtype}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    classes = None
    if cfg.classes != FASHION_MNIST_CLASSES:  # the user named this dataset's classes
        if len(cfg.class_names) < num_classes:
            raise DataError(f"{path} has {num_classes} classes but run-config 'classes' names {len(cfg.class_names)}")
        classes = cfg.class_names
    return Benchmark(
        path.stem,
        train_images,
        train_labels.astype(np.int64),
        test_images,
        test_labels.astype(np.int64),
        classes or tuple(f"class-{i}" for i in range(num_classes)),
    )


def _image_folder(path: Path, image_size: int) -> Benchmark:
    from PIL import Image

    if not (path / "train").is_dir() or not (path / "test").is_dir():
        raise DataError(f"'{path}' must hold train/ and test/ folders, each with one sub-folder per class")
    classes = tuple(sorted(p.name for p in (path / "train").iterdir() if p.is_dir()))

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for label, name in enumerate(classes):
            for file in sorted((path / split / name).glob("*")):
                try:
                    with Image.open(file) as img:
                        array = image_to_uint8(img)
                    if array.ndim == 2:
                        array = np.repeat(array[:, :, None], 3, axis=2)
                    resized = Image.fromarray(array).resize((image_size, image_size), Image.BILINEAR)
                    images.append(np.asarray(resized, dtype=np.uint8))
                    labels.append(label)
                except OSError as exc:
                    log.warning("skipping unreadable image %s: %s", file, exc)
        return np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64)

    train_images, train_labels = read("train")
    test_images, test_labels = read("test")
    return Benchmark(path.name, train_images, train_labels, test_images, test_labels, classes)


def load_benchmark(cfg: RunConfig, data_root: Path) -> Benchmark:
    """The dataset named by ``cfg.dataset`` (``dataset-path`` for npz and image-folder)."""
    if cfg.dataset == "fashion-mnist":
        return _fashion_mnist(data_root)
    if cfg.dataset == "digits":
        return _digits(cfg.seed)
    if not cfg.dataset_path:
        raise DataError(f"dataset={cfg.dataset} needs run-config 'dataset-path'")
    path = Path(cfg.dataset_path).expanduser()
    if cfg.dataset == "npz":
        return _npz(path, cfg)
    return _image_folder(path, cfg.image_size)
