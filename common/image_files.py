"""Which files in a folder are images fedhead reads, and naming the ones it leaves out.

A file is an image when its suffix is one of :data:`IMAGE_SUFFIXES` (PNG,
JPEG and the other formats PIL reads, ``.dcm``), or when it holds DICOM's
'DICM' marker whatever its name: DICOM files often have no extension, or a
UID with dots for a name. A DICOMDIR (the index of a DICOM disc) is not an
image. Hidden names (``.DS_Store``, ``._scan.png``, ``.git/``) are left out
quietly: the system puts them there, not the site. Every other file is
*ignored*, and callers name those (:func:`describe_ignored`) rather than
drop them silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.dicom import DICOM_SUFFIXES, looks_like_dicom

__all__ = ["IMAGE_SUFFIXES", "is_image_file", "list_image_files", "describe_ignored"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}) | DICOM_SUFFIXES


def is_image_file(path: Path) -> bool:
    """True for a file fedhead reads as an image: a known suffix, or DICOM's marker under any name."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.name.upper() != "DICOMDIR" and looks_like_dicom(path)


def list_image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, ignored files) under ``folder`` at any depth, each sorted; hidden names are in neither."""
    images: list[Path] = []
    ignored: list[Path] = []
    for path in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if hidden or not path.is_file():
            continue
        (images if is_image_file(path) else ignored).append(path)
    return images, ignored


def describe_ignored(ignored: Sequence[Path | str], *, shown: int = 5) -> str:
    """"ignored 3 files that are not images fedhead reads: a.jp2, b.xyz, notes.txt; ..." with the fix."""
    count = len(ignored)
    names = ", ".join(str(path) for path in ignored[:shown])
    more = f" and {count - shown:,} more" if count > shown else ""
    what = "1 file that is not an image" if count == 1 else f"{count:,} files that are not images"
    readable = ", ".join(sorted(IMAGE_SUFFIXES))
    return (f"ignored {what} fedhead reads: {names}{more}; fedhead reads {readable} and DICOM files of any name: "
            "convert the images among them to one of those, or move them out of the folder")
