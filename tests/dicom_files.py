"""Small DICOM files for tests, written with pydicom: single radiographs and whole site folders.

:func:`write_dicom` writes one file from stored pixel values, with the
elements a test asks for (photometric interpretation, bits stored, a window,
a rescale slope and intercept, a compressed transfer syntax).
:func:`write_dicom_site` writes 8-bit images (scikit-learn's digits, say) as
a site folder of class sub-folders of ``.dcm`` files, cycling through
:data:`VARIANTS` (MONOCHROME1 and 2, 12- and 16-bit, with and without a
window, one with a rescale): fedhead reads every file back to its 8-bit image
within :data:`TOLERANCE` grey levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Variant", "VARIANTS", "TOLERANCE", "write_dicom", "encode", "write_dicom_site"]

# The largest difference between an image written by write_dicom_site and the image fedhead reads back.
TOLERANCE = 1


@dataclass(frozen=True)
class Variant:
    """How write_dicom_site stores one image."""

    photometric: str
    bits_stored: int
    windowed: bool
    rescaled: bool = False

    @property
    def scaling(self) -> str:
        return "window" if self.windowed else "min-max"


VARIANTS = (
    Variant("MONOCHROME2", 16, windowed=False),
    Variant("MONOCHROME1", 12, windowed=False),
    Variant("MONOCHROME2", 12, windowed=True),
    Variant("MONOCHROME1", 16, windowed=True, rescaled=True),
)

# A rescale (stored * slope + intercept) in CT-like units, for the variants that have one.
_SLOPE, _INTERCEPT = 2.0, -1024.0


def write_dicom(
    path: str | Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | tuple[list[float], list[float]] | None = None,
    rescale: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
) -> Path:
    """Write ``stored`` ((H, W), or (frames, H, W); uint8/uint16/int16) as a DICOM file; ``window``: (centre, width)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.set_pixel_data(stored, photometric, bits_stored or stored.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def encode(image: np.ndarray, variant: Variant) -> tuple[np.ndarray, dict]:
    """(stored pixels, write_dicom's keyword arguments) that fedhead reads back as the 8-bit ``image``."""
    top = 2**variant.bits_stored - 1
    scale = top / 255.0
    values = np.rint(image.astype(np.float64) * scale)
    if variant.photometric == "MONOCHROME1":
        values = top - values
    stored = values.astype(np.uint16)
    kwargs: dict = {"photometric": variant.photometric, "bits_stored": variant.bits_stored}
    slope, intercept = (_SLOPE, _INTERCEPT) if variant.rescaled else (1.0, 0.0)
    if variant.rescaled:
        kwargs["rescale"] = (slope, intercept)
    if variant.windowed:  # the whole stored range, in modality units: centre and width as DICOM's LINEAR function reads them
        kwargs["window"] = ((top + 1) / 2 * slope + intercept, (top + 1) * slope)
    elif image.min() == image.max():
        raise ValueError("a constant image has no min-max range to scale from; give it a windowed variant")
    elif image.min() != 0 or image.max() != 255:
        raise ValueError("an image read by its min-max range must span 0..255 to be read back unchanged")
    return stored, kwargs


def write_dicom_site(
    root: str | Path,
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    *,
    split: str | None = None,
    variants: Sequence[Variant] = VARIANTS,
) -> Path:
    """Write 8-bit ``images`` (N, H, W) as ``root/[split/]<class>/NNNNNN.dcm``, image i stored as variant i mod len(variants).

    Images whose range is not 0..255 are stored with a window (their min-max would stretch them).
    """
    root = Path(root)
    folder = root / split if split else root
    windowed = [v for v in variants if v.windowed] or [Variant("MONOCHROME2", 12, windowed=True)]
    for i, (image, label) in enumerate(zip(images, labels)):
        variant = variants[i % len(variants)]
        if not variant.windowed and (image.min() != 0 or image.max() != 255):
            variant = windowed[i % len(windowed)]
        stored, kwargs = encode(image, variant)
        (folder / class_names[int(label)]).mkdir(parents=True, exist_ok=True)
        write_dicom(folder / class_names[int(label)] / f"{i:06d}.dcm", stored, **kwargs)
    return root
