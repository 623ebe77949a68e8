"""A site's local data: where it is, loading it, and checking it before training.

A hospital names its data in node_config (``data-dir``); a simulated site gets
the partition file that ``fedhead simulate`` wrote for its ``partition-id``.
Both end up in the same loaders, so a simulation exercises the code path a
real site runs. Supported layouts:

- a MedMNIST-style ``.npz`` (``train_images``, ``train_labels``, optional
  ``val_images``/``val_labels``);
- an image folder with one sub-folder per class name, optionally under
  ``train/`` and ``val/``;
- a CSV manifest (``path,label`` and an optional ``split`` column of
  ``train``/``val``; paths relative to the manifest's folder).

Images may be PNG, JPEG and the other formats PIL reads, or DICOM (with the
``fedhead[dicom]`` extra), under any name where they hold DICOM's marker.
Unreadable images are skipped and reported; other files in a folder are
ignored and named in a warning (hidden ``.*`` names and a DICOMDIR quietly).

The readers and their checks are :mod:`common.data_formats`'s, shared with the
server's held-out evaluation and the benchmark loaders.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import RunConfig
from common.data_formats import (
    SkippedFile, Split, check_labels, empty_classes, image_to_uint8, read_manifest, read_npz, read_site_folder,
)
from common.errors import DataError
from common.image_files import describe_ignored

__all__ = ["SiteData", "Split", "SkippedFile", "image_to_uint8", "load_site_data"]

log = logging.getLogger(__name__)


@dataclass
class SiteData:
    """One site's train and validation splits, the files skipped as unreadable, and warnings about the data (files
    ignored as not images among them)."""

    name: str
    source: str
    train: Split
    val: Split
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def records_fingerprint(self) -> str:
        """sha256 of the site's images as a set (train and validation alike; labels left out).

        It keys the site's privacy ledger: splitting the same images another
        way (another val-fraction or seed) or labelling them under another class
        order is still the same data, the same budget.
        """
        digests = sorted(_record_digests(self.train) + _record_digests(self.val))
        return hashlib.sha256("".join(digests).encode()).hexdigest()


def _record_digests(split: Split) -> list[str]:
    images = split.images if not isinstance(split.images, torch.Tensor) else list(split.images)
    return [hashlib.sha256(str(tuple(img.shape)).encode() + img.contiguous().numpy().tobytes()).hexdigest() for img in images]


def _take(split: Split, idx: torch.Tensor) -> Split:
    kinds = None if split.kinds is None else [split.kinds[i] for i in idx.tolist()]
    if isinstance(split.images, torch.Tensor):
        return Split(split.images[idx], split.labels[idx], kinds)
    return Split([split.images[i] for i in idx.tolist()], split.labels[idx], kinds)


def _val_count(n: int, fraction: float) -> int:
    """How many of ``n`` images ``fraction`` carves off for validation: none where it would leave no training image."""
    n_val = int(round(n * fraction))
    return n_val if 1 <= n_val < n else 0


def _split_off_val(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    n = len(train)
    n_val = _val_count(n, fraction)
    if n_val == 0:
        return train, _take(train, torch.arange(0))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _take(train, order[n_val:]), _take(train, order[:n_val])


def _smallest_splittable(fraction: float) -> int | None:
    """The fewest images from which ``fraction`` carves a validation split off (None: none up to 10,000)."""
    return next((n for n in range(2, 10_001) if _val_count(n, fraction)), None)


def _empty_validation(train: Split, cfg: RunConfig, carved: bool) -> str:
    why = "so validation metrics will be NaN"
    if not carved:
        return f"the validation split is empty, {why}; add images to it"
    fewest = _smallest_splittable(cfg.val_fraction)
    if fewest is not None and len(train) < fewest:
        return (f"the validation split is empty: val-fraction {cfg.val_fraction} carves one off only from {fewest} images up "
                f"and this site has {len(train)}, {why}; add images, or a val split of its own")
    return f"the validation split is empty (val-fraction {cfg.val_fraction}), {why}; add val images or raise val-fraction"


def _data_warnings(train: Split, val: Split, cfg: RunConfig, *, carved: bool) -> list[str]:
    notes = []
    missing = empty_classes(train, cfg.class_names)
    if missing:
        notes.append(f"no training images of {len(missing)} of {cfg.num_classes} classes ({', '.join(missing)}); fine for a non-IID site, else check the data")
    if len(val) == 0:
        notes.append(_empty_validation(train, cfg, carved))
    return notes


def load_site_data(path: Path, cfg: RunConfig, *, name: str = "site", warnings_shown_by_caller: bool = False) -> SiteData:
    """Load and check a site's data; a validation split is carved off if none is given.

    Raises DataError for data that cannot be trained on; skipped files and
    warnings (classes without examples, an empty validation split, files that
    are not images fedhead reads) are recorded. The warnings are logged at
    WARNING the first time this process loads the data (a ClientApp loads it
    every round), else at DEBUG; all at DEBUG when ``warnings_shown_by_caller``
    (``fedhead site check`` prints them itself).
    """
    path = Path(path)
    skipped: list[SkippedFile] = []
    ignored: list[Path] = []
    if path.is_file() and path.suffix.lower() == ".npz":
        splits = read_npz(path, prefixes=("train", "val"), required=("train",))
        train, val = splits["train"], splits.get("val")
    elif path.is_file() and path.suffix.lower() == ".csv":
        train, val, skipped = read_manifest(path, cfg.class_names)
    elif path.is_dir():
        train, val, skipped, ignored = read_site_folder(path, cfg.class_names)
    else:
        raise DataError(f"'{path}' is neither a .npz file, a .csv manifest nor an image folder; point data-dir at one")
    if len(train) == 0:
        raise DataError(f"{path} holds no training images{_why_none(skipped, ignored)}; a site needs at least one to train")
    carved = val is None
    if carved:
        train, val = _split_off_val(train, cfg.val_fraction, cfg.seed)
    check_labels(train, cfg.num_classes, f"{path}: train")
    check_labels(val, cfg.num_classes, f"{path}: val")
    notes = _data_warnings(train, val, cfg, carved=carved) + ([describe_ignored(ignored)] if ignored else [])
    summary = [f"skipped {len(skipped)} unreadable image files (listed above)"] if skipped else []
    for note in notes + summary:
        log.log(_note_level(path, note, warnings_shown_by_caller), "%s: %s", path, note)
    return SiteData(name=name, source=str(path), train=train, val=val, skipped=skipped, warnings=notes)


_NOTED: set[tuple[str, str]] = set()  # (data path, warning) logged at WARNING in this process


def _note_level(path: Path, note: str, shown_by_caller: bool) -> int:
    """WARNING for a note about ``path`` this process has not logged yet (and the caller does not show), else DEBUG."""
    key = (str(path.resolve()), note)
    if shown_by_caller or key in _NOTED:
        return logging.DEBUG
    _NOTED.add(key)
    return logging.WARNING


def _why_none(skipped: list[SkippedFile], ignored: list[Path]) -> str:
    reasons = [f"{len(skipped)} image files were skipped as unreadable"] if skipped else []
    reasons += [describe_ignored(ignored)] if ignored else []
    return f" ({'; '.join(reasons)})" if reasons else ""
