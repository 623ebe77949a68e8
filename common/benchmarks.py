"""Benchmark datasets as uint8 image arrays with integer labels, read offline.

A registry, name -> loader; each loader takes the run config and a data root:

- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` files, read through
  torchvision's ``FashionMNIST`` (which downloads only where the Debian files
  are absent and the network allows);
- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images; for tests);
- ``npz``: a MedMNIST-style file (``train_*``, optional ``val_*``, ``test_*``);
- ``image-folder``: ``train/`` and ``test/`` folders of class sub-folders.

The npz and image-folder files are read by :mod:`common.data_formats`, with
the same checks as a site's data.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image

from common.config import FASHION_MNIST_CLASSES, RunConfig
from common.data_formats import SkippedFile, Split, empty_classes, read_benchmark_folder, read_npz
from common.errors import ConfigError, DataError
from common.files import atomic_path

__all__ = ["Benchmark", "BenchmarkLoader", "BENCHMARKS", "load_benchmark", "DEBIAN_FASHION_MNIST"]

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
    """A dataset's train and test splits, its class names, and what reading it skipped or noticed."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


BenchmarkLoader = Callable[[RunConfig, Path], Benchmark]
_LOADERS: dict[str, BenchmarkLoader] = {}
BENCHMARKS: Mapping[str, BenchmarkLoader] = MappingProxyType(_LOADERS)


def _register(name: str) -> Callable[[BenchmarkLoader], BenchmarkLoader]:
    def add(loader: BenchmarkLoader) -> BenchmarkLoader:
        if name in _LOADERS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        _LOADERS[name] = loader
        return loader

    return add


def _stage_debian_fashion_mnist(root: Path) -> None:
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).exists() for name in _FASHION_FILES):
        return
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").exists() for name in _FASHION_FILES):
        return
    raw.mkdir(parents=True, exist_ok=True)
    for name in _FASHION_FILES:
        with atomic_path(raw / name) as tmp, gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as src:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    log.info("unpacked Debian's Fashion-MNIST into %s", raw)


@_register("fashion-mnist")
def _fashion_mnist(cfg: RunConfig, data_root: Path) -> Benchmark:
    from torchvision.datasets import FashionMNIST

    _stage_debian_fashion_mnist(data_root)
    try:
        train = FashionMNIST(str(data_root), train=True, download=True)
        test = FashionMNIST(str(data_root), train=False, download=True)
    except (RuntimeError, OSError) as exc:
        raise DataError(
            f"Fashion-MNIST is not in {data_root} and could not be downloaded ({exc}); "
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


@_register("digits")
def _digits(cfg: RunConfig, data_root: Path) -> Benchmark:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    n_test = len(labels) // 5
    test, train = order[:n_test], order[n_test:]
    return Benchmark("digits", images[train], labels[train], images[test], labels[test], tuple(str(d) for d in range(10)))


def _dataset_path(cfg: RunConfig) -> Path:
    if not cfg.dataset_path:
        raise DataError(f"dataset={cfg.dataset} needs run-config 'dataset-path'")
    return Path(cfg.dataset_path).expanduser()


@_register("npz")
def _npz(cfg: RunConfig, data_root: Path) -> Benchmark:
    path = _dataset_path(cfg)
    if not path.is_file():
        raise DataError(f"dataset-path '{path}' is not a file; dataset=npz needs a MedMNIST-style .npz")
    splits = read_npz(path, required=("train", "test"))
    train_images, train_labels = splits["train"].images.numpy(), splits["train"].labels.numpy()
    if "val" in splits:  # a benchmark's validation data is training data: each site carves its own
        val_images = splits["val"].images.numpy()
        if val_images.shape[1:] != train_images.shape[1:]:
            raise DataError(f"{path}: val_images are {val_images.shape[1:]} but train_images {train_images.shape[1:]}; give both one image shape")
        train_images = np.concatenate([train_images, val_images])
        train_labels = np.concatenate([train_labels, splits["val"].labels.numpy()])
    test_images, test_labels = splits["test"].images.numpy(), splits["test"].labels.numpy()
    num_classes = int(max(train_labels.max(initial=0), test_labels.max(initial=0))) + 1
    classes = tuple(f"class-{i}" for i in range(num_classes))
    if cfg.classes != FASHION_MNIST_CLASSES:  # the user named this dataset's classes
        if len(cfg.class_names) < num_classes:
            raise DataError(f"{path} has {num_classes} classes but run-config 'classes' names {len(cfg.class_names)}")
        classes = cfg.class_names
    notes = _empty_class_notes(Split(torch.from_numpy(train_images), torch.from_numpy(train_labels)), classes)
    return Benchmark(path.stem, train_images, train_labels, test_images, test_labels, classes, warnings=notes)


def _to_rgb_array(split: Split, image_size: int) -> np.ndarray:
    out = np.empty((len(split), image_size, image_size, 3), np.uint8)
    for i, image in enumerate(split.images):
        array = image.permute(1, 2, 0).numpy()
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        resized = Image.fromarray(array).resize((image_size, image_size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(resized, dtype=np.uint8)
    return out


@_register("image-folder")
def _image_folder(cfg: RunConfig, data_root: Path) -> Benchmark:
    path = _dataset_path(cfg)
    train, test, classes, skipped = read_benchmark_folder(path)
    for what, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise DataError(f"'{path / what}' holds no readable images ({len(skipped)} skipped); put images in {what}/<class>/")
    notes = _empty_class_notes(train, classes)
    return Benchmark(
        path.name,
        _to_rgb_array(train, cfg.image_size),
        train.labels.numpy(),
        _to_rgb_array(test, cfg.image_size),
        test.labels.numpy(),
        classes,
        skipped=skipped,
        warnings=notes,
    )


def _empty_class_notes(train: Split, classes: tuple[str, ...]) -> list[str]:
    missing = empty_classes(train, classes)
    return [f"no training images of {len(missing)} classes ({', '.join(missing)})"] if missing else []


def load_benchmark(cfg: RunConfig, data_root: Path) -> Benchmark:
    """The dataset named by ``cfg.dataset`` (``dataset-path`` for npz and image-folder); ConfigError for an unknown name."""
    loader = _LOADERS.get(cfg.dataset)
    if loader is None:
        raise ConfigError(f"'dataset' = {cfg.dataset!r} is not a benchmark; choose one of {', '.join(_LOADERS)}")
    bench = loader(cfg, Path(data_root))
    for note in bench.warnings:
        log.warning("%s: %s", bench.name, note)
    if bench.skipped:
        log.warning("%s: skipped %d unreadable image files (listed above)", bench.name, len(bench.skipped))
    return bench
