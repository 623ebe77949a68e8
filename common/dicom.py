"""DICOM radiographs read as 8-bit grey images, through pydicom (the optional extra ``fedhead[dicom]``).

Each step is pydicom's own function; fedhead only chooses and checks:

- single-frame MONOCHROME1 / MONOCHROME2 images only: colour, palette and
  multi-frame files are refused, with the reason;
- compressed pixel data is decoded where pydicom has a decoder for it
  (RLE always; JPEG 2000 and 8-bit JPEG through Pillow; the rest with
  pylibjpeg, pyjpegls or gdcm); otherwise the file is refused naming its
  transfer syntax and what to install;
- the file's Modality LUT (Rescale Slope / Intercept, or a LUT) is applied
  (``apply_modality_lut``), then its first window (Window Center / Width,
  ``apply_windowing``) or else its VOI LUT (``apply_voi``), and the result is
  scaled from that window's output range to 0-255;
- without a window or VOI LUT, the modality values are scaled from their own
  minimum and maximum, as 16-bit PNGs are (pydicom masks the bits above Bits
  Stored first);
- MONOCHROME1 is inverted, so that higher is brighter as in MONOCHROME2.

pydicom is imported when a DICOM file is read; without it, every DICOM file is
unreadable with the reason "install fedhead[dicom]". The warnings pydicom gives
while reading a file (a value too long for its VR, say) are logged at WARNING,
naming the file, instead of reaching stderr as Python warnings; any other
warning given during the read is passed on unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.errors import UnreadableImageError

__all__ = ["DICOM_SUFFIXES", "DicomImage", "looks_like_dicom", "read_dicom"]

log = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm"})
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_INSTALL = "install fedhead[dicom] (pip install 'fedhead[dicom]', or pip install pydicom) to read DICOM files"
# What pydicom raises on a malformed file or element (its parser and value converters raise built-ins).
_PARSE_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError)
_DECODE_ERRORS = (RuntimeError, *_PARSE_ERRORS)


@dataclass(frozen=True)
class DicomImage:
    """A radiograph as (H, W) uint8 pixels, and how it was stored and scaled."""

    pixels: np.ndarray
    photometric: str
    bits_stored: int
    scaling: str  # "window", "VOI LUT" or "min-max"
    transfer_syntax: str
    compressed: bool

    def describe(self) -> str:
        """How the file was stored, e.g. "MONOCHROME1, window, RLE Lossless"."""
        parts = [self.photometric, self.scaling] + ([self.transfer_syntax] if self.compressed else [])
        return ", ".join(parts)


def looks_like_dicom(path: str | Path) -> bool:
    """True when ``path`` has DICOM's 128-byte preamble and 'DICM' marker (whatever its name)."""
    try:
        with open(path, "rb") as file:
            head = file.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom(path: str | Path) -> DicomImage:
    """One single-frame monochrome DICOM image as 8-bit grey; UnreadableImageError says why one cannot be read."""
    try:
        with _pydicom_warnings_logged(path):
            return _read_dicom(path)
    except UnreadableImageError:
        raise
    except Exception as exc:  # a damaged file makes pydicom raise many types (struct.error, BytesLengthException, ValueError)
        raise UnreadableImageError(path, f"truncated or malformed DICOM file: {_first_line(exc)}") from exc


@contextlib.contextmanager
def _pydicom_warnings_logged(path: str | Path) -> Iterator[None]:
    """Record the block's warnings; when it ends (returning or raising), pass them on (:func:`_pass_on_warnings`)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _pass_on_warnings(path, caught)


def _pass_on_warnings(path: str | Path, caught: list[warnings.WarningMessage]) -> None:
    """pydicom's warnings while reading ``path``: each distinct one logged once at WARNING (pydicom's own level
    for them); any other warning given again, unchanged, for the caller's filters to handle as before."""
    package = _pydicom_dir()
    logged: set[str] = set()
    for w in caught:
        if not _from_pydicom(w, package):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        elif (message := _first_line(w.message)) not in logged:
            logged.add(message)
            log.warning("%s: pydicom: %s", path, message)


def _from_pydicom(caught: warnings.WarningMessage, package: Path | None) -> bool:
    """True for a warning given by code in pydicom's ``package`` folder, or of a category pydicom defines."""
    if getattr(caught.category, "__module__", "").split(".")[0] == "pydicom":
        return True
    return package is not None and Path(caught.filename).resolve().is_relative_to(package)


def _pydicom_dir() -> Path | None:
    """pydicom's package folder (None when it is not imported: then no warning can be its)."""
    module = sys.modules.get("pydicom")
    file = getattr(module, "__file__", None)
    return Path(file).resolve().parent if file else None


def _read_dicom(path: str | Path) -> DicomImage:
    pydicom = _import_pydicom(path)
    ds = _read_dataset(pydicom, path)
    photometric, ts = _check_image(ds, path)
    stored = _decode_pixels(ds, ts, path)
    unit, scaling = _to_unit_range(stored, ds, path)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    pixels = np.rint(unit * 255.0).astype(np.uint8)
    name = ts.name if ts is not None else "unknown transfer syntax"
    compressed = bool(ts is not None and ts.is_compressed)
    return DicomImage(pixels, photometric, int(ds.BitsStored), scaling, name, compressed)


def _import_pydicom(path: str | Path) -> Any:
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (its decoders and LUT functions)
    except ImportError as exc:
        raise UnreadableImageError(path, f"a DICOM file, but pydicom is not installed: {_INSTALL}") from exc
    return pydicom


def _read_dataset(pydicom: Any, path: str | Path) -> Any:
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        reason = "not a DICOM file (no 'DICM' marker after a 128-byte preamble); save it as a DICOM Part 10 file or remove it"
        raise UnreadableImageError(path, reason) from exc
    except _PARSE_ERRORS as exc:
        raise UnreadableImageError(path, f"truncated or malformed DICOM file: {_first_line(exc)}") from exc


def _check_image(ds: Any, path: str | Path) -> tuple[str, Any]:
    """(photometric interpretation, transfer syntax or None) of an image fedhead reads; else UnreadableImageError."""
    from pydicom.pixels.utils import get_nr_frames

    if "PixelData" not in ds:
        what = ds.get("SOPClassUID")
        raise UnreadableImageError(path, f"a DICOM file without pixel data ({getattr(what, 'name', what) or 'no SOP class'}); only images can be read")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME:
        shown = photometric or "missing"
        raise UnreadableImageError(
            path, f"photometric interpretation {shown}: fedhead reads monochrome radiographs (MONOCHROME1 or MONOCHROME2); convert the file to greyscale"
        )
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if Image.MAX_IMAGE_PIXELS and rows * columns > Image.MAX_IMAGE_PIXELS:
        limit = f"{Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
        raise UnreadableImageError(path, f"decompression bomb refused: {rows} x {columns} pixels is over the limit of {limit}")
    frames = get_nr_frames(ds, warn=False)
    if frames != 1:
        raise UnreadableImageError(path, f"{frames} frames; fedhead reads single-frame radiographs: export the frame you want as its own file")
    return photometric, _transfer_syntax(ds)


def _transfer_syntax(ds: Any) -> Any:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _decode_pixels(ds: Any, ts: Any, path: str | Path) -> np.ndarray:
    from pydicom.pixels import get_decoder

    name = f"{ts.name} ({ts})" if ts is not None else "an unknown transfer syntax"
    if ts is not None and ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise UnreadableImageError(path, f"pixel data compressed as {name}, which pydicom cannot decode; convert the file to an uncompressed transfer syntax") from exc
        if not decoder.is_available:
            raise UnreadableImageError(path, f"pixel data compressed as {name} and no decoder for it is installed; {_decoder_fix(ts)}")
    try:
        return np.asarray(ds.pixel_array)
    except _DECODE_ERRORS as exc:
        fix = _decoder_fix(ts) if ts is not None and ts.is_compressed else "the file may be truncated or its image elements wrong"
        raise UnreadableImageError(path, f"cannot decode its pixel data ({name}): {_first_line(exc)}; {fix}") from exc


def _decoder_fix(ts: Any) -> str:
    """Which pip packages give pydicom a decoder for ``ts``."""
    from pydicom import uid

    if ts in uid.JPEGLSTransferSyntaxes:
        packages = "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)"
    elif ts in uid.JPEG2000TransferSyntaxes:
        packages = "pylibjpeg pylibjpeg-openjpeg"
    elif ts in uid.JPEGTransferSyntaxes:
        packages = "pylibjpeg pylibjpeg-libjpeg"
    elif ts in uid.RLETransferSyntaxes:
        packages = "pylibjpeg pylibjpeg-rle"
    else:
        packages = "python-gdcm"
    return f"install a decoder: pip install {packages}"


def _to_unit_range(stored: np.ndarray, ds: Any, path: str | Path) -> tuple[np.ndarray, str]:
    """Pixels in [0, 1] after the file's Modality LUT and its window or VOI LUT (else their own range), and which."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    try:
        values = apply_modality_lut(stored, ds)
        if _has_window(ds):
            low, high = _window_range(ds)
            scaling, out = "window", apply_windowing(values, ds, index=0)
        elif ds.get("VOILUTSequence"):
            low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            scaling, out = "VOI LUT", apply_voi(values, ds, index=0)
        else:
            out = np.asarray(values, dtype=np.float64)
            low, high = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
            scaling = "min-max"
    except _PARSE_ERRORS as exc:
        raise UnreadableImageError(path, f"its Modality LUT or window cannot be applied: {_first_line(exc)}") from exc
    out = np.asarray(out, dtype=np.float64)
    if not np.isfinite(out).all() or not np.isfinite([low, high]).all():
        raise UnreadableImageError(path, "non-finite pixel values after its rescale slope and intercept; check those elements")
    if high <= low:
        return np.zeros_like(out), scaling
    return np.clip((out - low) / (high - low), 0.0, 1.0), scaling


def _has_window(ds: Any) -> bool:
    return all(ds.get(key) not in (None, "") for key in ("WindowCenter", "WindowWidth"))


def _window_range(ds: Any) -> tuple[float, float]:
    """The lowest and highest value ``apply_windowing`` gives for ``ds`` (its output range depends on the
    bits stored, signedness and rescale): asked of pydicom by windowing -inf and +inf."""
    from pydicom.pixels import apply_windowing

    with np.errstate(all="ignore"):
        ends = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
    return float(ends[0]), float(ends[1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
