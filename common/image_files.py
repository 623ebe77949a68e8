"""Which files in a folder are images fedhead reads, and naming the ones it leaves out.

A file is an image when its suffix is one of :data:`IMAGE_SUFFIXES` (PNG,
JPEG and the other formats PIL reads, ``.dcm``), or when it holds DICOM's
'DICM' marker whatever its name: DICOM files often have no extension, or a
UID with dots for a name. Hidden names (``.DS_Store``, ``._scan.png``,
``.git/``) and a DICOMDIR (the index of a DICOM disc) are left out quietly:
the system or the disc puts them there, not the site. Every other file is
*ignored*, and callers name those (:func:`describe_ignored`) rather than
drop them silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.dicom import DICOM_SUFFIXES, looks_like_dicom

__all__ = ["IMAGE_SUFFIXES", "FolderFiles", "is_left_out", "sort_files", "list_image_files", "describe_ignored"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}) | DICOM_SUFFIXES


@dataclass
class FolderFiles:
    """Files sorted into images fedhead reads and ignored ones, in the order given.

    ``dicom``: the images known to be DICOM by their marker (no ``.dcm`` suffix), to read as DICOM without looking again.
    """

    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    dicom: set[Path] = field(default_factory=set)


def is_left_out(name: str) -> bool:
    """True for a name left out quietly: hidden (``.*``), or a DICOMDIR."""
    return name.startswith(".") or name.upper() == "DICOMDIR"


def sort_files(paths: Iterable[Path]) -> FolderFiles:
    """``paths`` (files) in one pass: images by suffix or DICOM's marker, ignored the rest; left-out names in neither."""
    files = FolderFiles()
    for path in paths:
        if is_left_out(path.name):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.images.append(path)
        elif looks_like_dicom(path):
            files.images.append(path)
            files.dicom.add(path)
        else:
            files.ignored.append(path)
    return files


def list_image_files(folder: Path) -> FolderFiles:
    """:func:`sort_files` of the files under ``folder`` at any depth, sorted; none under a hidden folder."""
    return sort_files(
        path for path in sorted(folder.rglob("*"))
        if not any(part.startswith(".") for part in path.relative_to(folder).parent.parts) and path.is_file()
    )


def describe_ignored(ignored: Sequence[Path | str], *, shown: int = 5) -> str:
    """"ignored 3 files that are not images fedhead reads: a.jp2, b.xyz, notes.txt; ..." with the fix."""
    count = len(ignored)
    names = ", ".join(str(path) for path in ignored[:shown])
    more = f" and {count - shown:,} more" if count > shown else ""
    what = "1 file that is not an image" if count == 1 else f"{count:,} files that are not images"
    readable = ", ".join(sorted(IMAGE_SUFFIXES))
    return (f"ignored {what} fedhead reads: {names}{more}; fedhead reads {readable} and DICOM files of any name: "
            "convert the images among them to one of those, or move them out of the folder")
