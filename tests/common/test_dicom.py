"""DICOM radiographs: pixel values after the file's own rescale and window, inversion, refusals with reasons."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

from common.data_formats import read_image, read_image_file, read_image_folder
from common.errors import UnreadableImageError
from tests.dicom_files import TOLERANCE, VARIANTS, encode, write_dicom, write_dicom_site

pydicom = pytest.importorskip("pydicom", reason="DICOM is the optional extra fedhead[dicom]: pip install 'fedhead[dicom]'")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402
from pydicom.uid import RLELossless  # noqa: E402


def _ramp(top: int, shape=(16, 16)) -> np.ndarray:
    """Stored values from 0 to ``top``, row-major."""
    n = shape[0] * shape[1]
    return np.rint(np.linspace(0, top, n)).astype(np.uint16).reshape(shape)


def _read(path) -> np.ndarray:
    return read_image_file(path)[0].numpy()


def _reason(path) -> str:
    with pytest.raises(UnreadableImageError) as caught:
        read_image_file(path)
    assert str(path) not in caught.value.reason  # the reason names no path: the folder readers add it
    return caught.value.reason


@pytest.mark.parametrize("bits", [12, 16])
def test_monochrome1_is_inverted_to_equal_the_monochrome2_image(tmp_path, bits):
    top = 2**bits - 1
    stored = _ramp(top)
    plain = _read(write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2", bits_stored=bits))
    inverted = _read(write_dicom(tmp_path / "m1.dcm", (top - stored).astype(np.uint16), photometric="MONOCHROME1", bits_stored=bits))
    expected = np.rint(stored / top * 255).astype(np.uint8)  # no window: the stored values' own range (here 0..top)
    assert np.array_equal(plain, expected) and np.array_equal(inverted, expected)
    assert plain[0, 0] == 0 and plain[-1, -1] == 255  # higher stored value = brighter in MONOCHROME2, lower in MONOCHROME1


def test_twelve_bits_in_sixteen_bit_storage_ignore_the_unused_high_bits(tmp_path):
    stored = _ramp(4095)
    clean = write_dicom(tmp_path / "clean.dcm", stored, bits_stored=12)
    ds = pydicom.dcmread(clean)
    ds.PixelData = (stored | 0xF000).astype("<u2").tobytes()  # garbage above Bits Stored, as some modalities write
    ds.save_as(tmp_path / "dirty.dcm")
    image, kind = read_image(tmp_path / "dirty.dcm")
    assert np.array_equal(image[0].numpy(), _read(clean))
    assert (kind.bits, kind.channels, kind.format, kind.detail) == (12, 1, "DICOM", "MONOCHROME2, min-max")


def test_without_a_window_the_image_is_scaled_from_its_own_range(tmp_path):
    stored = (1000 + _ramp(100)).astype(np.uint16)  # a narrow band of a 16-bit range
    image = _read(write_dicom(tmp_path / "narrow.dcm", stored, bits_stored=16))
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) == 101


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_window_maps_its_centre_to_mid_grey_and_clips_outside_it(tmp_path, photometric):
    stored = _ramp(4095, shape=(64, 64))
    window = ([1000.0, 3000.0], [200.0, 500.0])  # multi-valued: the first window is used
    image = _read(write_dicom(tmp_path / "w.dcm", stored, photometric=photometric, bits_stored=12, window=window)).astype(int)
    if photometric == "MONOCHROME1":
        image = 255 - image
    flat, values = image.ravel(), stored.ravel().astype(int)
    centre = flat[np.argmin(np.abs(values - 1000))]
    assert abs(centre - 128) <= 2
    assert (flat[values <= 899] == 0).all() and (flat[values >= 1100] == 255).all()
    inside = flat[(values > 900) & (values < 1100)]
    assert (np.diff(inside) >= 0).all() and len(np.unique(inside)) > 50  # a ramp, not a step


def test_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path):
    stored = _ramp(2047, shape=(32, 32))
    hounsfield = stored.astype(np.int32) * 2 - 1024
    window = (40.0, 400.0)  # in Hounsfield units, as a CT file gives it
    rescaled = _read(write_dicom(tmp_path / "ct.dcm", stored, bits_stored=12, rescale=(2.0, -1024.0), window=window))
    direct = _read(write_dicom(tmp_path / "hu.dcm", hounsfield.astype(np.int16), bits_stored=16, window=window))
    assert np.array_equal(rescaled, direct)
    flat = rescaled.ravel().astype(int)
    assert abs(flat[np.argmin(np.abs(hounsfield.ravel() - 40))] - 128) <= 2
    assert (flat[hounsfield.ravel() <= -160] == 0).all() and (flat[hounsfield.ravel() >= 240] == 255).all()


def test_pydicom_s_own_ct_is_read_through_its_modality_lut(tmp_path):
    path = get_testdata_file("CT_small.dcm")  # 128x128, signed 16-bit, rescale intercept, no window
    image, kind = read_image(path)
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds)
    expected = np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)
    assert image.shape == (1, 128, 128) and np.array_equal(image[0].numpy(), expected)
    assert str(kind) == "128x128 grey 16-bit DICOM (MONOCHROME2, min-max)"


def test_pydicom_s_own_mr_is_windowed_by_its_own_window():
    path = get_testdata_file("MR_small.dcm")  # Window Center 600, Width 1600
    image, kind = read_image(path)
    stored = pydicom.dcmread(path).pixel_array.astype(int).ravel()
    flat = image[0].numpy().ravel().astype(int)
    assert kind.detail == "MONOCHROME2, window"
    assert (flat[stored <= -200] == 0).all() and (flat[stored > 1400] == 255).all()
    assert abs(flat[np.argmin(np.abs(stored - 600))] - 128) <= 3


def test_an_rle_compressed_file_is_decoded_to_the_same_image(tmp_path):
    stored = _ramp(4095)
    plain = write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12, window=(2048.0, 4096.0))
    packed = write_dicom(tmp_path / "rle.dcm", stored, bits_stored=12, window=(2048.0, 4096.0), transfer_syntax=RLELossless)
    image, kind = read_image(packed)
    assert np.array_equal(image[0].numpy(), _read(plain))
    assert kind.detail == "MONOCHROME2, window, RLE Lossless"


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "JPEG-lossy.dcm"])
def test_a_compressed_file_is_decoded_or_refused_naming_its_transfer_syntax_and_the_fix(name):
    path = get_testdata_file(name)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    try:
        image = read_image_file(path)
    except UnreadableImageError as exc:
        assert syntax.name in exc.reason and str(syntax) in exc.reason and "pip install pylibjpeg" in exc.reason
        return
    if name.startswith("MR_small"):  # lossless: the same image as the uncompressed file
        assert np.array_equal(image.numpy(), read_image_file(get_testdata_file("MR_small.dcm")).numpy())
    else:
        assert image.dtype.is_floating_point is False and image.shape[0] == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda d: write_dicom(d / "x.dcm", np.stack([_ramp(255).astype(np.uint8)] * 3)), "3 frames; fedhead reads single-frame radiographs", id="multi-frame"),
        pytest.param(lambda d: get_testdata_file("rtdose.dcm"), "15 frames; fedhead reads single-frame radiographs", id="pydicom-multi-frame"),
        pytest.param(lambda d: write_dicom(d / "x.dcm", np.zeros((8, 8, 3), np.uint8), photometric="RGB"), "photometric interpretation RGB", id="rgb"),
        pytest.param(lambda d: get_testdata_file("examples_palette.dcm"), "photometric interpretation PALETTE COLOR", id="palette"),
        pytest.param(lambda d: get_testdata_file("MR_truncated.dcm"), "cannot decode its pixel data", id="truncated"),
        pytest.param(lambda d: get_testdata_file("rtplan.dcm"), "a DICOM file without pixel data (RT Plan Storage)", id="no-pixels"),
        pytest.param(lambda d: d / "text.dcm", "not a DICOM file", id="not-dicom"),
    ],
)
def test_a_file_fedhead_does_not_read_is_refused_with_the_reason(tmp_path, make, reason):
    (tmp_path / "text.dcm").write_text("patient list, not an image")
    assert reason in _reason(make(tmp_path))


def test_refused_and_non_dicom_files_are_skipped_and_counted_by_the_folder_reader(tmp_path):
    (tmp_path / "a").mkdir()
    write_dicom(tmp_path / "a" / "good.dcm", _ramp(4095), bits_stored=12)
    write_dicom(tmp_path / "a" / "cine.dcm", np.stack([_ramp(4095)] * 2), bits_stored=12)
    (tmp_path / "a" / "notes.dcm").write_bytes(b"\x00" * 300)
    split, skipped, _ = read_image_folder(tmp_path, ["a"])
    assert len(split) == 1 and split.kinds[0].format == "DICOM"
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in skipped}
    assert set(reasons) == {"cine.dcm", "notes.dcm"}
    assert reasons["cine.dcm"].startswith("2 frames") and reasons["notes.dcm"].startswith("not a DICOM file")


def test_a_dicom_file_without_the_dcm_suffix_is_read_as_dicom(tmp_path):
    path = write_dicom(tmp_path / "IM0001.dcm", _ramp(4095), bits_stored=12)
    renamed = path.rename(tmp_path / "IM0001")
    assert np.array_equal(_read(renamed), _read(write_dicom(tmp_path / "again.dcm", _ramp(4095), bits_stored=12)))


@pytest.mark.parametrize("name", ["IM0001", "IM0001.dicom", "scan.png"])
def test_a_dicom_file_under_no_suffix_an_unknown_one_or_a_png_s_is_read_as_dicom(tmp_path, name):
    """A PNG's name is not looked at for DICOM's marker before PIL, only once PIL cannot identify the file."""
    expected = _read(write_dicom(tmp_path / "plain.dcm", _ramp(4095), bits_stored=12))
    path = write_dicom(tmp_path / "x.dcm", _ramp(4095), bits_stored=12).rename(tmp_path / name)
    image, kind = read_image(path)
    assert kind.format == "DICOM" and np.array_equal(image[0].numpy(), expected)


def _tiff_preamble() -> bytes:
    """128 bytes that are a whole 1x1 grey TIFF: a DICOM file's preamble may be one (a dual-personality file)."""
    import struct

    tags = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (262, 3, 1, 1), (273, 4, 1, 98), (278, 3, 1, 1), (279, 4, 1, 1)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x7f"  # the one pixel at byte 98
    return tiff.ljust(128, b"\x00")


@pytest.mark.parametrize("name", ["IM0001", "IM0001.dcm", "IM0001.tif", "scan.png"])
def test_a_dicom_file_whose_preamble_is_a_tiff_is_read_as_dicom(tmp_path, name):
    from PIL import Image

    path = write_dicom(tmp_path / "x.dcm", _ramp(4095), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.preamble = _tiff_preamble()
    ds.save_as(path)
    path = path.rename(tmp_path / name)
    with Image.open(path) as tiff:
        assert tiff.format == "TIFF" and tiff.size == (1, 1)  # PIL would read it as that
    (tmp_path / "plain").mkdir()
    plain = _read(write_dicom(tmp_path / "plain" / "x.dcm", _ramp(4095), bits_stored=12))
    image, kind = read_image(path)
    assert kind.format == "DICOM" and np.array_equal(image[0].numpy(), plain)
    (tmp_path / "site" / "a").mkdir(parents=True)
    path.rename(tmp_path / "site" / "a" / name)
    split, skipped, ignored = read_image_folder(tmp_path / "site", ["a"])
    assert [k.format for k in split.kinds] == ["DICOM"] and skipped == ignored == []


def test_a_folder_reads_dicom_files_of_any_name_and_names_the_files_it_ignores(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    for name in ("IM0001", "1.2.840.113619.2.55.3.604688119.868"):  # no extension, a UID for a name
        write_dicom(tmp_path / "x.dcm", _ramp(4095), bits_stored=12).rename(folder / name)
    write_dicom(tmp_path / "x.dcm", _ramp(4095), bits_stored=12).rename(folder / "DICOMDIR")  # a disc's index: left out quietly
    for name in ("scan.jp2", "notes", ".DS_Store"):
        (folder / name).write_bytes(b"\x00" * 300)
    split, skipped, ignored = read_image_folder(tmp_path, ["a"])
    assert len(split) == 2 and {k.format for k in split.kinds} == {"DICOM"} and skipped == []
    assert [p.name for p in ignored] == ["notes", "scan.jp2"]  # hidden names and the DICOMDIR left out


@contextlib.contextmanager
def _dicom_log(caplog):
    """caplog sees each of common.dicom's records once, however fedhead's logging was set up: its handler is on the
    logger itself (fedhead's loggers may not propagate to the root, where caplog's is), and nothing above it."""
    logger = logging.getLogger("common.dicom")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    try:
        with caplog.at_level(logging.WARNING, logger="common.dicom"):
            yield
    finally:
        logger.propagate = propagate
        logger.removeHandler(caplog.handler)


def _padded(tmp_path):
    """A DICOM file pydicom reads with a warning (excess padding after its pixel data)."""
    path = write_dicom(tmp_path / "padded.dcm", _ramp(4095), bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.PixelData += b"\x00" * 4
    ds.save_as(path)
    return path


def test_pydicom_s_warnings_are_logged_naming_the_file_not_raised(tmp_path, caplog):
    path = _padded(tmp_path)
    with warnings.catch_warnings(), _dicom_log(caplog):
        warnings.simplefilter("error")  # a warning that escaped the reader would raise here
        image = _read(path)
    assert np.array_equal(image, _read(write_dicom(tmp_path / "plain.dcm", _ramp(4095), bits_stored=12)))
    logged = [r for r in caplog.records if r.name == "common.dicom"]
    assert [r.levelno for r in logged] == [logging.WARNING]
    assert logged[0].getMessage().startswith(f"{path}: pydicom: The pixel data is 516 bytes long, which indicates it contains 4 bytes of excess padding")


def test_other_warnings_during_a_read_are_passed_on_unchanged_not_logged(tmp_path, caplog, monkeypatch):
    import common.dicom

    scale = common.dicom._to_unit_range

    def scale_with_a_warning(*args):
        warnings.warn("not pydicom's", RuntimeWarning)  # as numpy would, from fedhead's own arithmetic
        return scale(*args)

    monkeypatch.setattr(common.dicom, "_to_unit_range", scale_with_a_warning)
    path = _padded(tmp_path)
    with pytest.warns(RuntimeWarning, match="not pydicom's") as given, _dicom_log(caplog):
        _read(path)
    assert [(w.category, w.filename) for w in given.list] == [(RuntimeWarning, __file__)]  # where it was given
    logged = [r.getMessage() for r in caplog.records if r.name == "common.dicom"]
    assert len(logged) == 1 and "4 bytes of excess padding" in logged[0]  # pydicom's own, still logged


def test_without_pydicom_a_dicom_file_is_unreadable_with_the_extra_to_install(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", _ramp(4095), bits_stored=12)
    script = (
        "import sys; sys.modules['pydicom'] = None\n"  # as if the extra were not installed
        "from common.dicom import read_dicom\n"
        "from common.errors import UnreadableImageError\n"
        f"try: read_dicom({str(path)!r})\n"
        "except UnreadableImageError as exc: print(exc.reason)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "pydicom is not installed: install fedhead[dicom]" in out.stdout


def test_a_generated_dicom_site_reads_back_to_its_eight_bit_images(tmp_path, digits):
    images, labels = digits
    images, labels = images[:40], labels[:40] % 2
    write_dicom_site(tmp_path, images, labels, ["even", "odd"])
    split, skipped, _ = read_image_folder(tmp_path, ["even", "odd"])
    assert skipped == [] and len(split) == 40
    read = {}
    for path in sorted(tmp_path.rglob("*.dcm")):
        read[int(path.stem)] = read_image_file(path)[0].numpy().astype(int)
    assert max(int(np.abs(read[i] - images[i].astype(int)).max()) for i in read) <= TOLERANCE
    details = Counter(k.detail for k in split.kinds)
    assert set(details) == {f"{v.photometric}, {v.scaling}" for v in VARIANTS}
    assert {k.bits for k in split.kinds} == {12, 16}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v.photometric}-{v.bits_stored}-{v.scaling}{'-rescaled' if v.rescaled else ''}")
def test_every_variant_of_the_site_writer_round_trips(tmp_path, variant):
    image = np.linspace(0, 255, 64).round().astype(np.uint8).reshape(8, 8)
    stored, kwargs = encode(image, variant)
    assert np.array_equal(_read(write_dicom(tmp_path / "v.dcm", stored, **kwargs)), image)


def test_a_truncated_or_damaged_dicom_file_is_skipped_with_a_reason_at_any_cut(tmp_path):
    whole = tmp_path / "whole.dcm"
    write_dicom(whole, np.arange(64, dtype=np.uint16).reshape(8, 8) * 64, photometric="MONOCHROME2", bits_stored=12)
    data = whole.read_bytes()
    folder = tmp_path / "site" / "a"
    folder.mkdir(parents=True)
    cuts = sorted({132, 143, 153, 155, 300, 596, 599, len(data) // 2, len(data) - 10})
    for cut in cuts:
        (folder / f"cut-{cut}.dcm").write_bytes(data[:cut])
    split, skipped, _ = read_image_folder(tmp_path / "site", ["a"])
    assert len(split) + len(skipped) == len(cuts) and len(skipped) >= len(cuts) - 1
    assert all(s.reason for s in skipped)
