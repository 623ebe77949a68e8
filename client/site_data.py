"""A site's local data: where it is, loading it, and checking it before training.

A hospital names its data in node_config (``data-dir``); a simulated site gets
the partition file that ``fedhead simulate`` wrote for its ``partition-id``.
Both end up in the same loaders, so a simulation exercises the code path a
real site runs. Supported layouts:

- a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, optional
  ``val_images``/``val_labels``);
- an image folder with one sub-folder per class name, optionally under
  ``train/`` and ``val/``. Unreadable images are skipped and reported.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.config import RunConfig
from common.errors import DataError

__all__ = ["SiteData", "Split", "image_to_uint8", "resolve_site_data_path", "load_site_data", "site_name"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass
class Split:
    """Images (one uint8 tensor, or a list of single images) and integer labels."""

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """sha256 over the images' and labels' bytes: changes whenever the data does."""
        digest = hashlib.sha256()
        images = [self.images] if isinstance(self.images, torch.Tensor) else self.images
        for img in images:
            digest.update(str(tuple(img.shape)).encode())
            digest.update(img.contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().astype(np.int64).tobytes())
        return digest.hexdigest()


@dataclass
class SiteData:
    """One site's train and validation splits."""

    name: str
    source: str
    train: Split
    val: Split
    skipped: list[str] = field(default_factory=list)


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site's name: ``site-name`` from node_config, else from its partition id."""
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    return "site"


def resolve_site_data_path(node_config: Mapping[str, Any], cfg: RunConfig) -> Path:
    """Where this site's data is: ``data-dir`` for a real site, else its simulation partition."""
    if "data-dir" in node_config:
        path = Path(str(node_config["data-dir"])).expanduser()
    elif "partition-id" in node_config:
        if not cfg.partitions_dir:
            raise DataError(
                "this simulated site has partition-id "
                f"{node_config['partition-id']} but run-config 'partitions-dir' is empty; "
                "start simulations with `fedhead simulate`, which prepares the partitions"
            )
        path = Path(cfg.partitions_dir) / f"site-{int(node_config['partition-id'])}.npz"
    else:
        raise DataError(
            "node_config names no data: give the SuperNode --node-config \"data-dir='/path/to/images'\""
        )
    if not path.exists():
        raise DataError(f"site data '{path}' does not exist; check data-dir in the node config")
    return path


def _labels(array: np.ndarray, what: str) -> torch.Tensor:
    labels = np.asarray(array)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{what} has shape {labels.shape}; expected one integer label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what} has dtype {labels.dtype}; expected integer class indices")
    return torch.from_numpy(labels.astype(np.int64))


def _npz_split(data: Mapping[str, np.ndarray], prefix: str, path: Path) -> Split | None:
    if f"{prefix}_images" not in data:
        return None
    images = np.asarray(data[f"{prefix}_images"])
    if f"{prefix}_labels" not in data:
        raise DataError(f"{path} has {prefix}_images but no {prefix}_labels")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {prefix}_images has dtype {images.dtype}; expected uint8 (0-255)")
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: {prefix}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, C)")
    labels = _labels(data[f"{prefix}_labels"], f"{path}: {prefix}_labels")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} {prefix}_images but {len(labels)} {prefix}_labels")
    return Split(torch.from_numpy(np.ascontiguousarray(images)), labels)


def _load_npz(path: Path) -> tuple[Split, Split | None]:
    try:
        with np.load(path, allow_pickle=False) as data:
            train = _npz_split(data, "train", path)
            val = _npz_split(data, "val", path)
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read '{path}' as .npz: {exc}") from exc
    if train is None:
        raise DataError(f"{path} has no 'train_images' array; expected the MedMNIST .npz layout")
    return train, val


def image_to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit pixels; 16-bit and float images are rescaled from their own range, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return np.rint(scaled).astype(np.uint8)
    if img.mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        img.load()
        array = image_to_uint8(img)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _load_folder_split(root: Path, class_names: Sequence[str], skipped: list[str]) -> Split:
    index = {name: i for i, name in enumerate(class_names)}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DataError(
            f"{root} has class folders {unknown} that are not among the run's classes "
            f"({', '.join(class_names)}); rename them or set run-config 'classes'"
        )
    images, labels = [], []
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            try:
                images.append(_read_image(file))
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                log.warning("skipping unreadable image %s: %s", file, exc)
                skipped.append(str(file))
                continue
            labels.append(index[folder.name])
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def _load_folder(path: Path, class_names: Sequence[str], skipped: list[str]) -> tuple[Split, Split | None]:
    if (path / "train").is_dir():
        train = _load_folder_split(path / "train", class_names, skipped)
        val = _load_folder_split(path / "val", class_names, skipped) if (path / "val").is_dir() else None
        return train, val
    return _load_folder_split(path, class_names, skipped), None


def _take(split: Split, idx: torch.Tensor) -> Split:
    if isinstance(split.images, torch.Tensor):
        return Split(split.images[idx], split.labels[idx])
    return Split([split.images[i] for i in idx.tolist()], split.labels[idx])


def _split_off_val(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    n = len(train)
    n_val = int(round(n * fraction))
    if n_val == 0 or n - n_val < 1:
        return train, _take(train, torch.arange(0))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _take(train, order[n_val:]), _take(train, order[:n_val])


def _check(split: Split, what: str, num_classes: int, source: Path) -> None:
    if len(split) == 0:
        return
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{source}: {what} labels range {low}..{high}, but the run has {num_classes} classes "
            f"(labels 0..{num_classes - 1}); check the data or run-config 'classes'"
        )


def load_site_data(path: Path, cfg: RunConfig, *, name: str = "site") -> SiteData:
    """Load and check a site's data; a validation split is carved off if none is given."""
    skipped: list[str] = []
    if path.is_file() and path.suffix == ".npz":
        train, val = _load_npz(path)
    elif path.is_dir():
        train, val = _load_folder(path, cfg.class_names, skipped)
    else:
        raise DataError(f"'{path}' is neither a .npz file nor an image folder")
    if len(train) == 0:
        raise DataError(f"{path} holds no training images")
    if val is None:
        train, val = _split_off_val(train, cfg.val_fraction, cfg.seed)
    _check(train, "train", cfg.num_classes, path)
    _check(val, "val", cfg.num_classes, path)
    if skipped:
        log.warning("%s: skipped %d unreadable images (listed above)", path, len(skipped))
    return SiteData(name=name, source=str(path), train=train, val=val, skipped=skipped)
