"""`fedhead site check`: what a site holds, how its files are stored, what is skipped and why, what would leave."""

from __future__ import annotations

import re
import numpy as np
import pytest
from PIL import Image

from simulations.cli import main
from tests.dicom_files import VARIANTS, write_dicom, write_dicom_site

CLASSES = ("zero", "one", "two")


def _check(capsys, monkeypatch, *args: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout with runs of spaces collapsed, fedhead's stderr lines) of `fedhead site check ARGS`."""
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside table cells
    code = main(["site", "check", *map(str, args)])
    captured = capsys.readouterr()
    problems = [line.removeprefix("fedhead: ") for line in captured.err.splitlines() if line.startswith("fedhead: ")]
    for line in captured.err.splitlines():  # each skipped file is named once, by the command, not also by the reader's log
        assert not line.startswith("WARNING common.data_formats: skipping"), captured.err
    return code, " ".join(captured.out.split()), problems


def _table_count(out: str, row: str) -> int:
    match = re.search(re.escape(row) + r" │ ([\d,]+) │", out)
    assert match, f"no row '{row}' in: {out}"
    return int(match.group(1).replace(",", ""))


def test_a_dicom_site_is_reported_file_kind_by_file_kind_with_every_skipped_file(tmp_path, digits, capsys, monkeypatch):
    pytest.importorskip("pydicom", reason="DICOM is the optional extra fedhead[dicom]")
    images, labels = digits
    spans = (images.min(axis=(1, 2)) == 0) & (images.max(axis=(1, 2)) == 255)  # each stored as its variant, none falling back
    keep = np.flatnonzero((labels < 3) & spans)[:60]
    write_dicom_site(tmp_path, images[keep], labels[keep], CLASSES)
    write_dicom(tmp_path / "one" / "cine.dcm", np.zeros((2, 8, 8), np.uint16), bits_stored=12)
    (tmp_path / "two" / "worklist.dcm").write_text("not a DICOM file")
    code, out, problems = _check(capsys, monkeypatch, tmp_path)
    assert code == 1
    assert "54 training and 6 validation images" in out
    assert "classes, in label order (from the class folders, sorted; give the run the same 'classes'): one, two, zero" in out
    for variant in VARIANTS:  # 60 images, four variants in turn
        assert _table_count(out, f"8x8 grey {variant.bits_stored}-bit DICOM ({variant.photometric}, {variant.scaling})") == 15
    assert "head parameters │ 3,843 numbers: the linear head on mobilenet_v2's 1,280 features, 3 classes" in out
    assert "eval-accuracy" in out and "stays here │ images, features, file names and paths" in out
    assert problems[0] == "2 unreadable image files were skipped:"
    skipped = {line.split(": ", 1)[0].rsplit("/", 1)[-1]: line.split(": ", 1)[1] for line in problems[1:3]}
    assert skipped["cine.dcm"].startswith("2 frames; fedhead reads single-frame radiographs")
    assert skipped["worklist.dcm"].startswith("not a DICOM file")
    warnings = [line for line in problems if line.startswith("warning: ")]
    assert any("validation split is too small to measure: fewer than 10 images of one (" in w for w in warnings)
    assert any(re.search(r"mixed bit depths \(12-bit: \d+, 16-bit: \d+\)", w) for w in warnings)


def test_a_manifest_site_names_its_classes_and_warns_of_an_empty_class_and_mixed_channels(tmp_path, digits, capsys, monkeypatch):
    images, labels = digits
    rows = ["path,label,split"]
    for i in range(40):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'odd' if labels[i] % 2 else 'even'},{'val' if i >= 30 else 'train'}")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    rows.append("photo.png,even,train")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    code, out, problems = _check(capsys, monkeypatch, tmp_path / "labels.csv")
    assert code == 0 and "31 training and 10 validation images" in out
    assert "classes, in label order (from the manifest's labels, sorted; give the run the same 'classes'): even, odd" in out
    assert _table_count(out, "8x8 grey 8-bit PNG") == 40 and _table_count(out, "8x8 RGB 8-bit PNG") == 1
    assert any("images of mixed channel counts (RGB: 1, grey: 40)" in line for line in problems)

    code, out, problems = _check(capsys, monkeypatch, tmp_path / "labels.csv", "--classes", "even,odd,effusion")
    assert code == 0 and "(from --classes): even, odd, effusion" in out
    assert any("no training images of 1 of 3 classes (effusion)" in line for line in problems)


def test_an_npz_site_says_its_classes_are_the_run_s_default(tmp_path, digits, capsys, monkeypatch):
    images, labels = digits
    np.savez(tmp_path / "site.npz", train_images=images[:200], train_labels=labels[:200])
    code, out, problems = _check(capsys, monkeypatch, tmp_path / "site.npz")
    assert code == 0 and "(the run's default, Fashion-MNIST's: an .npz holds indices only; name them with --classes)" in out
    assert _table_count(out, "8x8 grey 8-bit npz array") == 200
    assert not any("mixed" in line for line in problems)


def test_a_manifest_with_an_unknown_label_is_refused_naming_the_row(tmp_path, capsys, monkeypatch):
    for name in ("a", "b"):
        Image.new("L", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,normal\nb.png,pneumonia\n")
    code, _, problems = _check(capsys, monkeypatch, tmp_path / "labels.csv", "--classes", "normal,effusion")
    assert code == 2 and "not among the run's classes (normal, effusion): row 3 'pneumonia'" in problems[0]


@pytest.mark.parametrize("delta", ["nan", "-1", "2", "0"])
def test_a_delta_outside_0_1_is_refused_as_bad_input(tmp_path, capsys, monkeypatch, delta):
    code, _, problems = _check(capsys, monkeypatch, tmp_path, "--delta", delta)
    assert code == 2 and problems == [f"--delta {float(delta)}: must be in (0, 1), e.g. --delta 1e-5"]


def test_a_folder_with_one_class_is_refused_naming_the_data_not_a_run_config(tmp_path, capsys, monkeypatch):
    (tmp_path / "pneumonia").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i).save(tmp_path / "pneumonia" / f"{i}.png")
    code, _, problems = _check(capsys, monkeypatch, tmp_path)
    assert code == 2 and problems == [
        f"'{tmp_path}' holds only one class folder, 'pneumonia'; a classifier needs at least 2 classes: "
        "add a folder of images for each other class beside it (e.g. normal/ and pneumonia/), or, if this site holds "
        "only some of the run's classes, name them all in label order with --classes (e.g. --classes normal,pneumonia)"
    ]
    code, out, problems = _check(capsys, monkeypatch, tmp_path, "--classes", "normal,pneumonia")  # the way out it names
    assert code == 0 and "classes, in label order (from --classes): normal, pneumonia" in out
    assert any(line.startswith("warning: no training images of 1 of 2 classes (normal)") for line in problems)


@pytest.mark.parametrize(("classes", "says"), [
    (",", "holds no class names"),
    (" , ", "holds no class names"),
    ("normal,,pneumonia", "has an empty class name between its commas"),
    ("normal", "names one class; a classifier needs at least 2"),
    ("normal,normal", "names normal more than once"),
])
def test_classes_that_are_not_two_or_more_names_are_refused_as_bad_input(tmp_path, capsys, monkeypatch, classes, says):
    code, out, problems = _check(capsys, monkeypatch, tmp_path, "--classes", classes)
    assert code == 2 and out == "" and len(problems) == 1
    assert problems[0].startswith(f"--classes {classes!r} {says}")
    assert problems[0].endswith("give the class names in label order, comma-separated, e.g. --classes normal,pneumonia")


def test_files_that_are_not_images_are_named_and_hidden_ones_left_out(tmp_path, digits, capsys, monkeypatch):
    images, labels = digits
    for i in range(20):
        folder = tmp_path / ("odd" if labels[i] % 2 else "even")
        folder.mkdir(exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    for name in ("even/chest.jp2", "odd/report.xyz", "odd/.DS_Store", "README"):
        (tmp_path / name).write_bytes(b"\x00" * 200)
    code, out, problems = _check(capsys, monkeypatch, tmp_path)
    assert code == 0 and "18 training and 2 validation images" in out
    ignored = [line for line in problems if "ignored" in line]
    assert ignored == [
        f"warning: ignored 3 files that are not images fedhead reads: {tmp_path / 'README'}, {tmp_path / 'even' / 'chest.jp2'}, "
        f"{tmp_path / 'odd' / 'report.xyz'}; fedhead reads .bmp, .dcm, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp and "
        "DICOM files of any name: convert the images among them to one of those, or move them out of the folder"
    ]


@pytest.mark.parametrize("count", [1, 5])
def test_an_npz_too_small_to_split_warns_that_its_validation_split_is_empty(tmp_path, digits, capsys, monkeypatch, count):
    images, labels = digits
    np.savez(tmp_path / "tiny.npz", train_images=images[:count], train_labels=labels[:count])
    code, out, problems = _check(capsys, monkeypatch, tmp_path / "tiny.npz")
    assert code == 0 and f"{count} training and 0 validation images" in out
    assert (f"warning: the validation split is empty: val-fraction 0.1 carves one off only from 6 images up and this site has "
            f"{count}, so validation metrics will be NaN; add images, or a val split of its own") in problems
