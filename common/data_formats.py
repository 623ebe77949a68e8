"""The one reader per data format (MedMNIST-style .npz, image file, image folder, CSV manifest), used by every caller.

An .npz's problems are collected and raised once, as one DataError. An image
that cannot be decoded safely (not an image, truncated, corrupt, a
decompression bomb, a DICOM file fedhead does not read) raises
UnreadableImageError; folder and manifest readers skip it and return a
SkippedFile with the reason. DICOM files are read by :mod:`common.dicom`.
Folder readers also return the files that are not images fedhead reads
(:mod:`common.image_files`), for the caller to name.

A CSV manifest (``.csv``, UTF-8) has a header row naming a ``path`` and a
``label`` column, and optionally a ``split`` column (``train`` or ``val``);
other columns are ignored. Paths are relative to the manifest's folder;
labels are class names exactly as the run's classes spell them (an integer
is read as a class's name, never as its index). Without a ``split`` column,
or without any ``val`` row, every row is training data.
"""

from __future__ import annotations

import csv
import hashlib
import posixpath
import logging
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.dicom import DICOM_SUFFIXES, looks_like_dicom, read_dicom
from common.errors import DataError, UnreadableImageError
from common.image_files import IMAGE_SUFFIXES, describe_ignored, is_left_out, list_image_files, sort_files

__all__ = [
    "IMAGE_SUFFIXES", "MANIFEST_SPLITS", "ImageKind", "Split", "SkippedFile", "UnreadableImageError",
    "read_npz", "image_to_uint8", "read_image", "read_image_file", "read_image_folder", "read_site_folder",
    "read_manifest", "class_names_of", "read_benchmark_folder", "check_labels", "empty_classes",
]

log = logging.getLogger(__name__)

MANIFEST_SPLITS = ("train", "val")
_LAYOUT = "expected the MedMNIST layout: '<split>_images' (uint8) and '<split>_labels' (one class index per image)"
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


@dataclass(frozen=True, order=True)
class ImageKind:
    """How one image file was stored: its format, size, channels as read, and bits per sample as stored."""

    format: str
    width: int
    height: int
    channels: int
    bits: int
    detail: str = ""

    def __str__(self) -> str:
        colour = "grey" if self.channels == 1 else "RGB"
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.width}x{self.height} {colour} {self.bits}-bit {self.format}{detail}"


@dataclass
class Split:
    """Images (one uint8 tensor, or a list of single (C, H, W) images) and int64 labels.

    ``kinds``: how each image was stored, where it was read from a file (None for arrays).
    """

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor
    kinds: list[ImageKind] | None = field(default=None, compare=False)

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


@dataclass(frozen=True)
class SkippedFile:
    """A file a folder reader left out, and why."""

    path: str
    reason: str


def read_npz(
    path: str | Path, *, prefixes: Sequence[str] = ("train", "val", "test"), required: Sequence[str] = ()
) -> dict[str, Split]:
    """The splits among ``prefixes`` in a MedMNIST-style .npz; all of ``required`` must be there, else DataError."""
    path = Path(path)
    present, arrays = _load_arrays(path, {f"{p}_{kind}" for p in prefixes for kind in ("images", "labels")})
    problems: list[str] = []
    splits: dict[str, Split] = {}
    for prefix in prefixes:
        images, labels = arrays.get(f"{prefix}_images"), arrays.get(f"{prefix}_labels")
        if images is None and labels is None:
            if prefix in required:
                problems.append(f"must hold '{prefix}_images' and '{prefix}_labels' arrays; it has {present}")
            continue
        split = _npz_split(prefix, images, labels, problems)
        if split is not None:
            splits[prefix] = split
    if problems:
        raise DataError(f"'{path}': " + "; ".join(problems) + f" ({_LAYOUT})")
    return splits


def _load_arrays(path: Path, keys: set[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    fix = "write it with numpy.savez(path, train_images=..., train_labels=...)"
    if not zipfile.is_zipfile(path):  # before np.load, which would try (and refuse) to unpickle it
        found = "not a zip of .npy arrays" if path.is_file() else "no such file"
        raise DataError(f"'{path}' is not an .npz archive ({found}); {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            present = sorted(data.files)
            return present, {name: np.asarray(data[name]) for name in present if name in keys}
    except MemoryError:  # an array header can claim any shape; numpy allocates it before reading
        raise DataError(f"'{path}' holds an array too large to load into memory (or a damaged header that claims one); "
                        f"split the data, or {fix}") from None
    except _NPZ_ERRORS as exc:
        raise DataError(f"cannot read '{path}' as an .npz archive: {exc}; {fix}") from exc


def _npz_split(prefix: str, images: np.ndarray | None, labels: np.ndarray | None, problems: list[str]) -> Split | None:
    if images is None or labels is None:
        have, lack = (f"{prefix}_labels", f"{prefix}_images") if images is None else (f"{prefix}_images", f"{prefix}_labels")
        problems.append(f"it has '{have}' but no '{lack}'; add '{lack}' (one per {'label' if images is None else 'image'}) or remove '{have}'")
        return None
    before = len(problems)
    if images.dtype != np.uint8:
        problems.append(f"'{prefix}_images' has dtype {images.dtype}; expected uint8 (0-255): rescale and store with .astype(np.uint8)")
    if images.ndim not in (3, 4):
        problems.append(f"'{prefix}_images' has shape {images.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        problems.append(f"'{prefix}_labels' has shape {labels.shape}; expected one class index per image, shape (N,) or (N, 1)")
    elif not np.issubdtype(labels.dtype, np.integer):
        problems.append(f"'{prefix}_labels' has dtype {labels.dtype}; expected integer class indices: store them with .astype(np.int64)")
    elif labels.size and int(labels.min()) < 0:
        low, count = int(labels.min()), int((labels < 0).sum())
        problems.append(f"'{prefix}_labels' has {count} negative labels (lowest {low}); expected class indices 0..num_classes-1")
    if images.ndim >= 1 and labels.ndim == 1 and len(images) != len(labels):
        problems.append(f"{len(images)} '{prefix}_images' but {len(labels)} '{prefix}_labels'; give exactly one label per image")
    return None if len(problems) > before else Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def image_to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit pixels, (H, W) for greyscale or (H, W, 3); 16-bit and float images are rescaled from their own range."""
    if img.mode.startswith("I") or img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{img.mode} image has non-finite pixel values")
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return np.rint(scaled).astype(np.uint8)
    if img.mode in ("L", "1", "LA"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image_file(path: str | Path) -> torch.Tensor:
    """One image as (C, H, W) uint8: C = 1 for greyscale, else 3 (palette, RGBA, CMYK -> RGB).

    UnreadableImageError: not an image, truncated or corrupt, over ``PIL.Image.MAX_IMAGE_PIXELS``,
    or a DICOM file :mod:`common.dicom` does not read.
    """
    return read_image(path)[0]


def read_image(path: str | Path, *, dicom: bool = False) -> tuple[torch.Tensor, ImageKind]:
    """:func:`read_image_file`'s image, and how the file stored it.

    ``.dcm`` files, and files of any name that hold DICOM's marker, are read as DICOM (a DICOM file's 128-byte
    preamble may itself be a valid TIFF header); ``dicom``: the caller already found the marker. The marker is
    looked for before decoding only in a ``.tif``/``.tiff`` or a file with no or an unknown suffix; a PNG, JPEG
    and the like go straight to PIL, and are looked at only when PIL cannot read them.
    """
    suffix = Path(path).suffix.lower()
    if dicom or suffix in DICOM_SUFFIXES or (suffix not in _PIL_ONLY_SUFFIXES and looks_like_dicom(path)):
        array, kind = _read_dicom_file(path)
    else:
        try:
            array, kind = _read_pil_file(path)
        except UnreadableImageError:
            if suffix not in _PIL_ONLY_SUFFIXES or not looks_like_dicom(path):
                raise
            array, kind = _read_dicom_file(path)  # a DICOM file under a PNG's or JPEG's name
        else:
            if kind.format == "TIFF" and suffix in _PIL_ONLY_SUFFIXES and looks_like_dicom(path):
                array, kind = _read_dicom_file(path)  # a DICOM whose preamble is a TIFF, under a PNG's name
    tensor = torch.from_numpy(array.copy())
    return (tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)), kind


# Suffixes whose files go straight to PIL: a DICOM file hides in a TIFF's name (its preamble may be a TIFF header),
# under no suffix or an unknown one, but its marker is not looked for in these before decoding (it costs a read).
_PIL_ONLY_SUFFIXES = IMAGE_SUFFIXES - DICOM_SUFFIXES - {".tif", ".tiff"}


def _read_dicom_file(path: str | Path) -> tuple[np.ndarray, ImageKind]:
    image = read_dicom(path)
    height, width = image.pixels.shape
    return image.pixels, ImageKind("DICOM", width, height, 1, image.bits_stored, image.describe())


def _read_pil_file(path: str | Path) -> tuple[np.ndarray, ImageKind]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                array = image_to_uint8(img)
                fmt, mode, (width, height) = img.format or "image", img.mode, img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(path, f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImageError(path, "not an image file that PIL can identify") from exc
    except _DECODE_ERRORS as exc:
        raise UnreadableImageError(path, f"truncated or corrupt image: {exc}") from exc
    channels = 1 if array.ndim == 2 else array.shape[-1]
    detail = "" if mode in ("L", "RGB") else f"mode {mode}"
    return array, ImageKind(fmt, width, height, channels, _PIL_BITS.get(mode, 8), detail)


_PIL_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


def read_image_folder(root: str | Path, class_names: Sequence[str]) -> tuple[Split, list[SkippedFile], list[Path]]:
    """(images, skipped, ignored) under ``root/<class>/`` (any depth), labelled by the class's index in ``class_names``.

    Unreadable image files are skipped, with reasons; files that are not images fedhead reads
    (:mod:`common.image_files`) are returned as ignored; hidden (``.*``) names and a DICOMDIR are left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder; expected one sub-folder per class ({', '.join(class_names)})")
    index = {name: i for i, name in enumerate(class_names)}
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DataError(
            f"'{root}' has class folders {unknown} that are not among the run's classes "
            f"({', '.join(class_names)}); rename them or set run-config 'classes'"
        )
    loose = sort_files(p for p in entries if p.is_file())
    ignored = loose.ignored
    skipped = [SkippedFile(str(p), "image outside any class folder; move it into its class's folder") for p in loose.images]
    images, labels, kinds = [], [], []
    for folder in folders:
        files = list_image_files(folder)
        ignored += files.ignored
        for file in files.images:
            try:
                image, kind = read_image(file, dicom=file in files.dicom)
            except UnreadableImageError as exc:
                skipped.append(SkippedFile(str(file), exc.reason))
                continue
            images.append(image)
            kinds.append(kind)
            labels.append(index[folder.name])
    for item in skipped:
        log.warning("skipping %s: %s", item.path, item.reason)
    return Split(images, torch.tensor(labels, dtype=torch.int64), kinds), skipped, ignored


def read_site_folder(root: str | Path, class_names: Sequence[str]) -> tuple[Split, Split | None, list[SkippedFile], list[Path]]:
    """(train, val or None, skipped, ignored) of a site's folder: class folders in ``root``, or in ``train/`` and optional ``val/``.

    Beside ``train/`` and ``val/``, image files are skipped (they are in no split) and other files ignored, as
    :func:`read_image_folder` does with files beside its class folders.
    """
    root = Path(root)
    flat = not (root / "train").is_dir() or "train" in class_names
    train, skipped, ignored = read_image_folder(root if flat else root / "train", class_names)
    if flat:
        return train, None, skipped, ignored
    loose = sort_files(sorted(p for p in root.iterdir() if not is_left_out(p.name) and p.is_file()))
    beside = [SkippedFile(str(p), "image outside train/ and val/; move it into its split's class folder") for p in loose.images]
    for item in beside:
        log.warning("skipping %s: %s", item.path, item.reason)
    ignored = loose.ignored + ignored
    if not (root / "val").is_dir():
        return train, None, beside + skipped, ignored
    val, more, more_ignored = read_image_folder(root / "val", class_names)
    return train, val, beside + skipped + more, ignored + more_ignored


@dataclass(frozen=True)
class _ManifestRow:
    row: int  # the spreadsheet's row number: the header is row 1
    path: str
    label: str
    split: str


_MANIFEST_FIX = "a manifest is a CSV file whose first row names the columns 'path' and 'label' (and optionally 'split': train or val)"


def read_manifest(path: str | Path, class_names: Sequence[str]) -> tuple[Split, Split | None, list[SkippedFile]]:
    """(train, val or None, skipped) of a CSV manifest; val is None when no row says ``val``.

    DataError, naming the rows: no ``path`` or ``label`` column, an empty cell, a split other than train/val,
    a file listed twice, a label not among ``class_names``. A missing or unreadable file is skipped, its row named.
    """
    path = Path(path)
    rows = _manifest_rows(path)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [f"row {r.row} '{r.label}'" for r in rows if r.label not in index]
    if unknown:
        raise DataError(
            f"'{path}' has labels that are not among the run's classes ({', '.join(class_names)}): {_listed(unknown)}; "
            "correct those rows or set run-config 'classes' (labels are class names, not indices)"
        )
    parts: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in MANIFEST_SPLITS}
    skipped: list[SkippedFile] = []
    for row in rows:
        file = path.parent / row.path
        try:
            if not file.is_file():
                raise UnreadableImageError(file, "no such file")
            image, kind = read_image(file)
        except UnreadableImageError as exc:
            skipped.append(SkippedFile(str(file), f"row {row.row}: {exc.reason}"))
            continue
        images, labels, kinds = parts[row.split]
        images.append(image)
        labels.append(index[row.label])
        kinds.append(kind)
    for item in skipped:
        log.warning("skipping %s: %s", item.path, item.reason)
    train, val = (Split(i, torch.tensor(l, dtype=torch.int64), k) for i, l, k in parts.values())
    return train, (val if any(r.split == "val" for r in rows) else None), skipped


def _manifest_rows(path: Path) -> list[_ManifestRow]:
    """The rows of a manifest, checked for structure (not labels); every problem raised at once, as one DataError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            records = list(csv.reader(file))
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); save the spreadsheet as 'CSV UTF-8'") from exc
    except (OSError, csv.Error) as exc:
        raise DataError(f"cannot read '{path}' as CSV: {exc}; {_MANIFEST_FIX}") from exc
    header = [cell.strip().lower() for cell in records[0]] if records else []
    missing = [name for name in ("path", "label") if name not in header]
    if missing:
        found = f"its first row is {records[0]}" if records else "it is empty"
        raise DataError(f"'{path}' has no {' or '.join(repr(m) for m in missing)} column ({found}); {_MANIFEST_FIX}")
    rows, problems = [], []
    for number, cells in enumerate(records[1:], start=2):
        if any(cell.strip() for cell in cells):
            rows.append(_manifest_row(number, dict(zip(header, (cell.strip() for cell in cells))), problems))
    problems += _repeated_paths(rows)
    if problems:
        raise DataError(f"'{path}': {_listed(problems)}; correct those rows ({_MANIFEST_FIX})")
    return rows


def _manifest_row(number: int, cells: dict[str, str], problems: list[str]) -> _ManifestRow:
    path, label, split = cells.get("path", ""), cells.get("label", ""), cells.get("split", "train").lower()
    for name, value in (("path", path), ("label", label)):
        if not value:
            problems.append(f"row {number}: empty {name}")
    if split not in MANIFEST_SPLITS:
        problems.append(f"row {number}: split '{cells.get('split')}' is not {' or '.join(MANIFEST_SPLITS)}")
    return _ManifestRow(number, path, label, split)


def _repeated_paths(rows: list[_ManifestRow]) -> list[str]:
    first: dict[str, int] = {}
    problems = []
    for row in rows:
        key = posixpath.normpath(row.path)  # sub/../a.png is a.png
        if row.path and (posixpath.isabs(key) or key == ".." or key.startswith("../")):
            problems.append(f"row {row.row}: '{row.path}' is outside the manifest's folder; give paths relative to it")
        if row.path and key in first:
            problems.append(f"rows {first[key]} and {row.row} list the same file '{row.path}'")
        first.setdefault(key, row.row)
    return problems


def _listed(problems: list[str], limit: int = 10) -> str:
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def class_names_of(path: str | Path) -> tuple[str, ...] | None:
    """The class names a site's data holds, sorted: its manifest's labels or its class folders
    (those under ``train/`` and ``val/`` where it has them); None for an .npz, which holds indices only."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return tuple(sorted({row.label for row in _manifest_rows(path)}))
    if not path.is_dir():
        return None
    roots = [path / name for name in ("train", "val") if (path / name).is_dir()] or [path]
    return tuple(sorted({p.name for root in roots for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}))


def read_benchmark_folder(root: str | Path) -> tuple[Split, Split, tuple[str, ...], list[SkippedFile]]:
    """(train, test, classes, skipped) of ``root/train/`` and ``root/test/``; classes: train/'s sub-folders, sorted."""
    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"'{root}' must hold train/ and test/ folders, each with one sub-folder per class")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise DataError(f"'{root / 'train'}' has no class sub-folders; put each class's images in train/<class>/")
    train, skipped, ignored = read_image_folder(root / "train", classes)
    test, more, more_ignored = read_image_folder(root / "test", classes)
    if ignored or more_ignored:
        log.warning("%s: %s", root, describe_ignored(ignored + more_ignored))
    return train, test, classes, skipped + more


def check_labels(split: Split, num_classes: int, what: str) -> None:
    """Raise DataError unless every label of ``split`` is in 0..num_classes-1; ``what`` names the split."""
    if len(split) == 0:
        return
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= num_classes:
        fix = f"(labels 0..{num_classes - 1}); check the data or run-config 'classes'"
        raise DataError(f"{what} labels range {low}..{high}, but the run has {num_classes} classes {fix}")


def empty_classes(split: Split, class_names: Sequence[str]) -> list[str]:
    """The classes with no example in ``split`` (to warn about: a non-IID site may lack some)."""
    present = set(split.labels.tolist())
    return [name for i, name in enumerate(class_names) if i not in present]


def folder_name(class_name: str) -> str:
    """A class name usable as one folder name ("T-shirt/top" -> "T-shirt-top")."""
    return class_name.replace("/", "-").replace("\\", "-").strip() or "_"


def write_site_folder(splits: dict[str, Split], root: str | Path, class_names: Sequence[str]) -> Path:
    """Write ``splits`` ("train", "val") as PNG files under ``root/<split>/<class>/``, the layout :func:`read_site_folder` reads.

    Class folders are named by :func:`folder_name`; give the run the same names.
    """
    root = Path(root)
    for split_name, split in splits.items():
        for i, (image, label) in enumerate(zip(split.images, split.labels.tolist())):
            folder = root / split_name / folder_name(class_names[label])
            folder.mkdir(parents=True, exist_ok=True)
            array = np.asarray(image, dtype=np.uint8)
            if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
                array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            Image.fromarray(array).save(folder / f"{i:06d}.png")
    return root
