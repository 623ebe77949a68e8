"""A CSV manifest as a site's layout: rows read in order, problems named by row, files skipped with their row."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client.site_data import load_site_data
from common.config import build_run_config
from common.data_formats import class_names_of, read_manifest
from common.errors import DataError

CLASSES = ("normal", "pneumonia")


def _site(tmp_path, digits, rows: list[str], header: str = "path,label,split") -> tuple:
    """PNG files of digits under tmp_path/images/ and a manifest naming them; returns (manifest, images)."""
    images, _ = digits
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(12):
        Image.fromarray(images[i]).save(tmp_path / "images" / f"{i}.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest, images


def _rows(n: int, split: bool = True) -> list[str]:
    return [f"images/{i}.png,{CLASSES[i % 2]}" + (f",{'val' if i >= 8 else 'train'}" if split else "") for i in range(n)]


def test_a_manifest_with_a_split_column_gives_its_train_and_val_rows_in_order(tmp_path, digits):
    manifest, images = _site(tmp_path, digits, _rows(12))
    train, val, skipped = read_manifest(manifest, CLASSES)
    assert skipped == [] and len(train) == 8 and len(val) == 4
    assert train.labels.tolist() == [0, 1] * 4 and val.labels.tolist() == [0, 1, 0, 1]
    assert np.array_equal(train.images[3][0].numpy(), images[3]) and np.array_equal(val.images[0][0].numpy(), images[8])
    assert str(train.kinds[0]) == "8x8 grey 8-bit PNG"


def test_a_manifest_without_a_split_column_is_all_training_data_and_the_site_carves_val(tmp_path, digits):
    swapped = [",".join(reversed(r.replace("images/", "./images/").split(","))) for r in _rows(12, split=False)]
    manifest, _ = _site(tmp_path, digits, swapped, header="label,path")
    train, val, _ = read_manifest(manifest, CLASSES)
    assert len(train) == 12 and val is None
    site = load_site_data(manifest, build_run_config(classes=",".join(CLASSES), val_fraction=0.25))
    assert (len(site.train), len(site.val)) == (9, 3) and site.source == str(manifest)
    assert class_names_of(manifest) == CLASSES


def test_extra_columns_spaces_case_and_a_byte_order_mark_are_accepted(tmp_path, digits):
    rows = [f"P{i}, {r.replace(',', ' , ').replace('train', 'Train')}" for i, r in enumerate(_rows(4))]
    manifest, _ = _site(tmp_path, digits, rows, header="patient, Path ,LABEL,Split")
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())  # as Excel's "CSV UTF-8" writes it
    train, val, _ = read_manifest(manifest, CLASSES)
    assert len(train) == 4 and val is None  # no row says val


def test_an_unknown_label_names_its_row_and_the_known_classes(tmp_path, digits):
    rows = _rows(6)
    rows[3] = "images/3.png,effusion,train"
    rows[5] = "images/5.png,1,train"  # an index is not a class name
    manifest, _ = _site(tmp_path, digits, rows)
    with pytest.raises(DataError, match=r"not among the run's classes \(normal, pneumonia\): row 5 'effusion'; row 7 '1'; correct those rows"):
        read_manifest(manifest, CLASSES)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("file,label", r"has no 'path' column \(its first row is \['file', 'label'\]\); a manifest is a CSV file whose first row"),
        ("path,class,split", r"has no 'label' column"),
        ("images/0.png,normal", r"has no 'path' or 'label' column"),
    ],
)
def test_a_missing_column_is_refused_naming_the_fix(tmp_path, digits, header, message):
    manifest, _ = _site(tmp_path, digits, _rows(4, split=False), header=header)
    with pytest.raises(DataError, match=message):
        read_manifest(manifest, CLASSES)


def test_bad_rows_are_all_named_at_once(tmp_path, digits):
    rows = _rows(8)
    rows[1] = "images/1.png,pneumonia,test"
    rows[2] = ",normal,train"
    rows[6] = "images/0.png,normal,val"
    manifest, _ = _site(tmp_path, digits, rows)
    with pytest.raises(DataError) as caught:
        read_manifest(manifest, CLASSES)
    message = str(caught.value)
    assert "row 3: split 'test' is not train or val" in message and "row 4: empty path" in message
    assert "rows 2 and 8 list the same file 'images/0.png'" in message


def test_a_missing_or_unreadable_file_is_skipped_with_its_row(tmp_path, digits):
    rows = _rows(6) + ["images/gone.png,normal,train", "images/broken.png,pneumonia,val"]
    manifest, _ = _site(tmp_path, digits, rows)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    site = load_site_data(manifest, build_run_config(classes=",".join(CLASSES)))
    assert len(site.train) == 6 and len(site.val) == 0  # no val row is readable: an empty val split, not a carved one
    assert [(s.path.endswith(name), s.reason.split(":")[0]) for s, name in zip(site.skipped, ("gone.png", "broken.png"))] == [
        (True, "row 8"), (True, "row 9")
    ]
    assert site.skipped[0].reason == "row 8: no such file" and "not an image" in site.skipped[1].reason


def test_a_manifest_that_is_not_utf8_text_says_how_to_save_it(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes("path,label\nröntgen.png,normal\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text.*save the spreadsheet as 'CSV UTF-8'"):
        read_manifest(manifest, CLASSES)


def test_the_same_file_spelled_another_way_and_paths_outside_the_folder_are_refused(tmp_path, digits):
    rows = _rows(4)
    rows[2] = "images/sub/../0.png,pneumonia,val"  # image 0 again, in val, with another label
    rows[3] = "../elsewhere/3.png,pneumonia,train"
    manifest, _ = _site(tmp_path, digits, rows)
    with pytest.raises(DataError) as caught:
        read_manifest(manifest, CLASSES)
    message = str(caught.value)
    assert "rows 2 and 4 list the same file 'images/sub/../0.png'" in message
    assert "row 5: '../elsewhere/3.png' is outside the manifest's folder" in message
