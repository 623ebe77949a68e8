"""Site data: loading, checks, and clear refusals."""

from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from client.site_data import load_site_data
from common.config import build_run_config
from common.errors import DataError


def test_npz_site_loads_both_splits(digits_npz, digits_cfg):
    site = load_site_data(digits_npz, digits_cfg)
    assert len(site.train) == 1000 and len(site.val) == 300
    assert site.train.fingerprint() == load_site_data(digits_npz, digits_cfg).train.fingerprint()


def test_labels_outside_the_classes_are_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([0, 1, 2, 5]))
    with pytest.raises(DataError, match="labels range 0..5, but the run has 3 classes"):
        load_site_data(path, build_run_config(classes="a,b,c"))


def test_float_images_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "float.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.float32), train_labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="expected uint8"):
        load_site_data(path, build_run_config())


def test_image_folder_skips_and_reports_a_corrupt_image(tmp_path, digits):
    images, labels = digits
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    for i in range(20):
        Image.fromarray(images[i]).save(tmp_path / ("a" if labels[i] % 2 == 0 else "b") / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    site = load_site_data(tmp_path, build_run_config(classes="a,b", val_fraction=0.25))
    assert len(site.train) + len(site.val) == 20
    assert [s.path.endswith("broken.png") for s in site.skipped] == [True]
    assert "not an image" in site.skipped[0].reason


def test_unknown_class_folder_is_refused(tmp_path):
    (tmp_path / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        load_site_data(tmp_path, build_run_config(classes="a,b"))


def test_sixteen_bit_and_mixed_channel_images_keep_their_contrast(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).astype(np.uint16)  # 0..3780, 12-bit-like
    Image.fromarray(ramp).save(tmp_path / "a" / "ct.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "b" / "photo.png")
    site = load_site_data(tmp_path, build_run_config(classes="a,b", val_fraction=0.0))
    grey = next(img for img, label in zip(site.train.images, site.train.labels) if label == 0)
    assert grey.shape == (1, 8, 8) and int(grey.min()) == 0 and int(grey.max()) == 255
    assert len(torch_unique(grey)) > 32  # not saturated to a few values
    rgb = next(img for img, label in zip(site.train.images, site.train.labels) if label == 1)
    assert rgb.shape == (3, 8, 8)


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_an_empty_validation_split_is_a_warning_unless_val_fraction_0_asked_for_none(tmp_path, digits, fraction):
    images, labels = digits
    path = tmp_path / "site.npz"
    np.savez(path, train_images=images[:40], train_labels=labels[:40] % 2, val_images=images[:0], val_labels=labels[:0])
    site = load_site_data(path, build_run_config(classes="a,b", val_fraction=fraction))
    assert len(site.train) == 40 and len(site.val) == 0
    assert any("validation split is empty" in note for note in site.warnings) == (fraction > 0), site.warnings


def test_a_site_without_validation_examples_still_trains_and_reports(tmp_path, digits):
    from client.feature_cache import FeatureCache
    from client.feature_source import build_feature_source
    from client.training import evaluate_locally, train_locally
    from common.model import build_split_model

    images, labels = digits
    path = tmp_path / "train-only.npz"
    np.savez(path, train_images=images[:50], train_labels=labels[:50])
    cfg = build_run_config(classes=",".join(map(str, range(10))), image_size=32, val_fraction=0.0, early_stopping_patience=1)
    site = load_site_data(path, cfg)
    assert len(site.val) == 0
    model = build_split_model(cfg)
    cache = FeatureCache(tmp_path / "cache")
    train = build_feature_source(model, site.train, cache=cache, augment_views=0, seed=0, label="t")
    val = build_feature_source(model, site.val, cache=cache, augment_views=0, seed=0, label="v")
    report = train_locally(model.trainable, train, site.train.labels, val, site.val.labels, cfg, server_round=1)
    assert report.num_examples == 50 and val.forwards == 0
    assert np.isnan(evaluate_locally(model.trainable, val, site.val.labels, 10)["accuracy"])


def torch_unique(tensor):
    return tensor.unique()


def test_the_privacy_ledger_key_is_the_same_data_however_it_is_split(tmp_path, digits):
    images, labels = digits
    path = tmp_path / "site.npz"
    np.savez(path, train_images=images[:300], train_labels=labels[:300])
    one = load_site_data(path, build_run_config(classes=",".join(str(d) for d in range(10)), val_fraction=0.1))
    two = load_site_data(path, build_run_config(classes=",".join(str(d) for d in range(10)), val_fraction=0.3, seed=7))
    assert len(one.val) != len(two.val) and one.train.fingerprint() != two.train.fingerprint()
    assert one.records_fingerprint() == two.records_fingerprint()
    np.savez(path, train_images=images[:300], train_labels=(labels[:300] + 1) % 10)  # the same images, other labels
    relabelled = load_site_data(path, build_run_config(classes=",".join(str(d) for d in range(10))))
    assert relabelled.records_fingerprint() == one.records_fingerprint()
    np.savez(path, train_images=images[1:301], train_labels=labels[1:301])  # other images
    assert load_site_data(path, build_run_config(classes=",".join(str(d) for d in range(10)))).records_fingerprint() != one.records_fingerprint()


def _two_class_folder(root, digits, split: str = "") -> None:
    images, labels = digits
    for i in range(20):
        folder = root / split / ("a" if labels[i] % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")


def _site_warnings(caplog, path, **options) -> list[str]:
    """The WARNING records client.site_data logs while loading ``path`` (fedhead's loggers may not propagate to the root)."""
    logger = logging.getLogger("client.site_data")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False  # each record once: the handler is on the logger itself, none above it
    caplog.clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="client.site_data"):
            load_site_data(path, build_run_config(classes="a,b", val_fraction=0.25), **options)
    finally:
        logger.propagate = propagate
        logger.removeHandler(caplog.handler)
    return [r.getMessage() for r in caplog.records if r.name == "client.site_data" and r.levelno == logging.WARNING]


def test_a_site_s_warnings_are_logged_once_a_process_and_not_at_all_where_the_caller_shows_them(tmp_path, digits, caplog):
    _two_class_folder(tmp_path, digits)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert _site_warnings(caplog, tmp_path, warnings_shown_by_caller=True) == []  # site check prints them itself
    first = _site_warnings(caplog, tmp_path)
    assert len(first) == 1 and "ignored 1 file that is not an image fedhead reads" in first[0]
    assert _site_warnings(caplog, tmp_path) == []  # a ClientApp loads its data every round: the site log says it once


_NOTE_LOGGERS = ("client.site_data", "common.data_formats", "common.dicom")


def _notes_logged(caplog, path, **options) -> dict[int, list[str]]:
    """{level: messages} that the site loader and the reader log while loading ``path`` (handlers on the loggers themselves)."""
    loggers = [logging.getLogger(name) for name in _NOTE_LOGGERS]
    propagate = [logger.propagate for logger in loggers]
    caplog.clear()
    with contextlib.ExitStack() as stack:
        for logger in loggers:
            logger.addHandler(caplog.handler)
            logger.propagate = False
            stack.callback(logger.removeHandler, caplog.handler)
            stack.enter_context(caplog.at_level(logging.DEBUG, logger=logger.name))
        try:
            load_site_data(path, build_run_config(classes="a,b", val_fraction=0.25), **options)
        finally:
            for logger, was in zip(loggers, propagate):
                logger.propagate = was
    by_level: dict[int, list[str]] = {logging.WARNING: [], logging.DEBUG: []}
    for record in caplog.records:
        if record.name in _NOTE_LOGGERS and record.levelno in by_level:
            by_level[record.levelno].append(record.getMessage())
    return by_level


def _site_with_notes(root, digits):
    """A two-class folder with one unreadable image and one file that is not an image: three notes to log."""
    _two_class_folder(root, digits)
    (root / "a" / "broken.png").write_bytes(b"not an image")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_a_deployment_site_logs_its_data_notes_at_warning_once_a_run_though_each_message_is_a_fresh_process(
    tmp_path, digits, caplog, monkeypatch
):
    import client.site_data

    data, state = _site_with_notes(tmp_path / "data", digits), tmp_path / "state"

    def message(run_id: str) -> dict[int, list[str]]:
        monkeypatch.setattr(client.site_data, "_NOTED", set())  # a fresh ClientApp process
        return _notes_logged(caplog, data, state_dir=state, run_id=run_id)

    first = message("101")
    assert len(first[logging.WARNING]) == 3
    assert first[logging.WARNING][0].startswith(f"skipping {data / 'a' / 'broken.png'}: not an image")
    assert "ignored 1 file that is not an image fedhead reads" in first[logging.WARNING][1]
    assert first[logging.WARNING][2] == f"{data}: skipped 1 unreadable image files (listed above)"
    again = message("101")
    assert again[logging.WARNING] == [] and again[logging.DEBUG] == first[logging.WARNING]  # still there at DEBUG
    assert message("102")[logging.WARNING] == first[logging.WARNING]  # a new run says it again
    assert sorted(p.name for p in (state / "data-notes").iterdir()) == ["101.json", "102.json"]
    week_ago, marker = time.time() - 8 * 86400, state / "data-notes" / "101.json"
    os.utime(marker, (week_ago, week_ago))
    assert message("101")[logging.WARNING] == []  # run 101 goes on after a week: its marker is touched
    message("103")
    assert sorted(p.name for p in (state / "data-notes").iterdir()) == ["101.json", "102.json", "103.json"]
    os.utime(marker, (week_ago, week_ago))  # run 101 has ended
    message("104")
    assert sorted(p.name for p in (state / "data-notes").iterdir()) == ["102.json", "103.json", "104.json"]


def test_a_caller_that_shows_the_skipped_files_and_notes_still_gets_pydicom_s_warnings(tmp_path, digits, caplog):
    pydicom = pytest.importorskip("pydicom", reason="DICOM is the optional extra fedhead[dicom]")
    from tests.dicom_files import write_dicom

    data = _site_with_notes(tmp_path / "data", digits)
    padded = write_dicom(data / "b" / "padded.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 64, bits_stored=12)
    ds = pydicom.dcmread(padded)
    ds.PixelData += b"\x00" * 4  # pydicom reads it, warning of the excess padding
    ds.save_as(padded)
    logged = _notes_logged(caplog, data, warnings_shown_by_caller=True)  # fedhead site check
    assert len(logged[logging.WARNING]) == 1 and logged[logging.WARNING][0].startswith(f"{padded}: pydicom: The pixel data")
    assert any(line.startswith(f"skipping {data / 'a' / 'broken.png'}") for line in logged[logging.DEBUG])


def test_a_state_dir_that_cannot_hold_the_marker_logs_the_notes_every_message_and_loads_the_data(tmp_path, digits, caplog, monkeypatch):
    import client.site_data

    data, state = _site_with_notes(tmp_path / "data", digits), tmp_path / "state"
    state.write_text("a file where a folder should be")
    for _ in range(2):
        monkeypatch.setattr(client.site_data, "_NOTED", set())
        assert len(_notes_logged(caplog, data, state_dir=state, run_id="101")[logging.WARNING]) == 3


@pytest.mark.parametrize("content", ["{not json", '{"noted": [1, ["a"], "0000"]}', "[]"])
def test_a_damaged_marker_is_rewritten_and_the_notes_logged_again(tmp_path, digits, caplog, monkeypatch, content):
    import client.site_data

    data, state = _site_with_notes(tmp_path / "data", digits), tmp_path / "state"
    (state / "data-notes").mkdir(parents=True)
    (state / "data-notes" / "101.json").write_text(content)
    for warnings in (3, 0):
        monkeypatch.setattr(client.site_data, "_NOTED", set())
        assert len(_notes_logged(caplog, data, state_dir=state, run_id="101")[logging.WARNING]) == warnings


def test_the_reader_s_lines_are_logged_at_warning_when_the_data_is_refused(tmp_path, caplog, monkeypatch):
    import client.site_data

    monkeypatch.setattr(client.site_data, "_NOTED", set())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="holds no training images"):
        _notes_logged(caplog, tmp_path, state_dir=tmp_path / "state", run_id="101")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"skipping {tmp_path / 'a' / 'broken.png'}: not an image file that PIL can identify"
    ]


def test_files_beside_train_and_val_are_named_not_dropped(tmp_path, digits):
    for split in ("train", "val"):
        _two_class_folder(tmp_path, digits, split)
    (tmp_path / "README.txt").write_text("how this data was exported")
    Image.fromarray(digits[0][0]).save(tmp_path / "stray.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00" * 16)
    site = load_site_data(tmp_path, build_run_config(classes="a,b"))
    assert len(site.train) == len(site.val) == 20
    assert [(s.path, s.reason) for s in site.skipped] == [
        (str(tmp_path / "stray.png"), "image outside train/ and val/; move it into its split's class folder")
    ]
    ignored = [note for note in site.warnings if note.startswith("ignored")]
    assert len(ignored) == 1 and ignored[0].startswith(f"ignored 1 file that is not an image fedhead reads: {tmp_path / 'README.txt'};")
