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

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import RunConfig
from common.data_formats import (
    SkippedFile, Split, check_labels, empty_classes, image_to_uint8, read_manifest, read_npz, read_site_folder,
)
from common.errors import DataError
from common.files import remove_stale_siblings, write_json_atomic
from common.image_files import describe_ignored
from common.logs import HeldRecords

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
    if len(val) == 0 and cfg.val_fraction > 0:  # val-fraction 0: no validation split is what was asked for
        notes.append(_empty_validation(train, cfg, carved))
    return notes


def load_site_data(
    path: Path,
    cfg: RunConfig,
    *,
    name: str = "site",
    warnings_shown_by_caller: bool = False,
    state_dir: Path | None = None,
    run_id: str | None = None,
) -> SiteData:
    """Load and check a site's data; a validation split is carved off if none is given.

    Raises DataError for data that cannot be trained on; skipped files and
    warnings (classes without examples, an empty validation split, files that
    are not images fedhead reads) are recorded. The warnings, and the readers'
    lines naming each skipped file, are logged at WARNING the first time this
    process loads the data (a ClientApp loads it every round) and, given
    ``state_dir`` and ``run_id``, the first time in that run (a deployment's
    ClientApp is a fresh process for every message: a marker in the state-dir
    remembers them), else at DEBUG; at DEBUG when ``warnings_shown_by_caller``
    (``fedhead site check`` prints the skipped files and warnings itself; pydicom's
    own warnings about a file still follow the rule above).
    """
    path = Path(path)
    with HeldRecords(_READER_LOGGERS) as held:  # on a failure they are let through as they were
        train, val, skipped, notes = _read_and_check(path, cfg)
    summary = [f"skipped {len(skipped)} unreadable image files (listed above)"] if skipped else []
    own = [f"{path}: {note}" for note in notes + summary]
    # the caller shows the skipped files and the notes; pydicom's warnings about a file it does not
    shown = [warnings_shown_by_caller and r.name != "common.dicom" for r in held.records] + [warnings_shown_by_caller] * len(own)
    levels = _note_levels(path, [r.getMessage() for r in held.records] + own, shown, state_dir=state_dir, run_id=run_id)
    for record, level in zip(held.records, levels):
        held.pass_on(record, level)
    for line, level in zip(own, levels[len(held.records):]):
        log.log(level, "%s", line)
    return SiteData(name=name, source=str(path), train=train, val=val, skipped=skipped, warnings=notes)


def _read_and_check(path: Path, cfg: RunConfig) -> tuple[Split, Split, list[SkippedFile], list[str]]:
    """(train, val, skipped, warnings) of the site's data; DataError for data that cannot be trained on."""
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
    return train, val, skipped, notes


# The readers whose own WARNING lines name a site's files (skipped as unreadable, pydicom's warnings about one).
_READER_LOGGERS = ("common.data_formats", "common.dicom")


_NOTED: set[tuple[str, str]] = set()  # (data path, note) logged at WARNING in this process
_NOTES_DIR = "data-notes"  # in a site's state-dir: <run id>.json, digests of the notes a run has logged at WARNING
_NOTES_DAYS = 7  # a marker untouched this long belongs to a run that has ended


def _note_levels(path: Path, notes: Sequence[str], shown: Sequence[bool], *, state_dir: Path | None, run_id: str | None) -> list[int]:
    """Per note about ``path``: DEBUG where the caller shows it (``shown``) or this process or (given ``state_dir``
    and ``run_id``) an earlier message of the run has logged it; else WARNING."""
    where = str(path.resolve())
    fresh = [note for note in dict.fromkeys(n for n, by_caller in zip(notes, shown) if not by_caller) if (where, note) not in _NOTED]
    _NOTED.update((where, note) for note in fresh)
    if fresh and state_dir is not None and run_id is not None:
        fresh = _first_in_run(Path(state_dir) / _NOTES_DIR / f"{run_id}.json", where, fresh)
    unlogged, levels = set(fresh), []
    for note, by_caller in zip(notes, shown):
        levels.append(logging.WARNING if note in unlogged and not by_caller else logging.DEBUG)
        if not by_caller:
            unlogged.discard(note)
    return levels


def _first_in_run(marker: Path, where: str, notes: list[str]) -> list[str]:
    """Those of ``notes`` that ``marker`` does not list yet, now added to it; all of them if it cannot be written."""
    digests = {note: hashlib.sha256(f"{where}\0{note}".encode()).hexdigest() for note in notes}
    try:
        logged = {digest for digest in json.loads(marker.read_text())["noted"] if isinstance(digest, str)}
    except FileNotFoundError:
        logged = set()
    except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged: the notes are logged again, and it is rewritten
        log.debug("cannot read %s (%s); logging this run's data notes again", marker, exc)
        logged = set()
    new = [note for note in notes if digests[note] not in logged]
    if not new:
        with contextlib.suppress(OSError):  # a run still going touches its marker, so it is never taken for stale
            os.utime(marker)
    else:
        try:
            write_json_atomic(marker, {"noted": sorted(logged | {digests[note] for note in new})})
            remove_stale_siblings(marker, "*.json", days=_NOTES_DAYS)  # other runs' markers, of runs that have ended
        except OSError as exc:  # never fail a round over a log marker: the notes are logged, and may be again
            log.debug("cannot write %s (%s); later messages of this run will log its data notes again", marker, exc)
    return new


def _why_none(skipped: list[SkippedFile], ignored: list[Path]) -> str:
    reasons = [f"{len(skipped)} image files were skipped as unreadable"] if skipped else []
    reasons += [describe_ignored(ignored)] if ignored else []
    return f" ({'; '.join(reasons)})" if reasons else ""
