"""`fedhead predict` on files it cannot read: exit codes, the rows it still writes, what it names on stderr."""

from __future__ import annotations

import csv
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from simulations.cli import main

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-backbone model exported as model.pt2 only (no ONNX, no simulation): predict then uses torch."""
    from common.config import build_run_config
    from common.model import build_split_model
    from server.export import export_model

    cfg = build_run_config(classes=",".join(CLASSES), image_size=32, pretrained=False)
    folder = tmp_path_factory.mktemp("run") / "model"
    export_model(build_split_model(cfg), folder, class_names=cfg.class_names, onnx=False)
    return folder


def _png(path, value: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _predict(capsys, *args) -> tuple[int, str, list[str]]:
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, [line.removeprefix("fedhead: ") for line in captured.err.splitlines() if line.startswith("fedhead: ")]


def _rows(path) -> dict[str, dict[str, str]]:
    return {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(path.open())}


def test_some_unreadable_images_exit_1_with_every_row_written_and_the_count_on_stderr(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    _png(folder / "a.png"), _png(folder / "b.png", 200)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "predictions.csv"
    code, stdout, problems = _predict(capsys, model_dir, folder, "--out", out, "--engine", "torch")
    assert code == 1
    assert "2 images classified with torch (model.pt2), 1 unreadable" in stdout
    rows = _rows(out)
    assert set(rows) == {"a.png", "b.png", "broken.png"}
    assert rows["a.png"]["class"] in CLASSES and rows["broken.png"]["error"] == "not an image file that PIL can identify"
    assert problems[-1].startswith("1 of 3 images could not be read")


def test_every_image_classified_exits_0_and_none_readable_exits_2(model_dir, tmp_path, capsys):
    good, bad = _png(tmp_path / "good.png"), tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    assert _predict(capsys, model_dir, good, "--out", tmp_path / "one.csv")[0] == 0
    code, _, problems = _predict(capsys, model_dir, bad, "--out", tmp_path / "two.csv")
    assert code == 2 and problems[-1].startswith("1 of 1 images could not be read")


def test_a_folder_s_dicom_without_extension_is_read_and_other_files_are_named(model_dir, tmp_path, capsys):
    pytest.importorskip("pydicom", reason="DICOM is the optional extra fedhead[dicom]")
    from tests.dicom_files import write_dicom

    folder = tmp_path / "scans"
    folder.mkdir()
    write_dicom(folder / "IM0001.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 64, bits_stored=12).rename(folder / "IM0001")
    _png(folder / "x.png")
    for name in ("scan.jp2", "notes.xyz", ".DS_Store"):
        (folder / name).write_bytes(b"\x00" * 200)
    out = tmp_path / "predictions.csv"
    code, stdout, problems = _predict(capsys, model_dir, folder, "--out", out)
    assert code == 0 and "2 images classified" in stdout
    assert set(_rows(out)) == {"IM0001", "x.png"}
    assert problems == [
        f"warning: ignored 2 files that are not images fedhead reads: {folder / 'notes.xyz'}, {folder / 'scan.jp2'}; "
        "fedhead reads .bmp, .dcm, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp and DICOM files of any name: "
        "convert the images among them to one of those, or move them out of the folder"
    ]


@pytest.mark.parametrize("named", ["folder", "file"])
def test_a_dicom_without_extension_is_looked_at_for_dicom_s_marker_once(model_dir, tmp_path, monkeypatch, named):
    """Found in a folder by its marker, it is read as DICOM without looking again; named itself, it is looked at on reading."""
    pytest.importorskip("pydicom", reason="DICOM is the optional extra fedhead[dicom]")
    import common.data_formats
    import common.image_files
    from common.dicom import looks_like_dicom
    from server.predict import find_images, load_predictor, predict
    from tests.dicom_files import write_dicom

    looked: list[str] = []

    def spy(path) -> bool:
        looked.append(str(path))
        return looks_like_dicom(path)

    for module in (common.image_files, common.data_formats):
        monkeypatch.setattr(module, "looks_like_dicom", spy)
    folder = tmp_path / "scans"
    folder.mkdir()
    scan = write_dicom(folder / "IM0001.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 64, bits_stored=12).rename(folder / "IM0001")
    found = find_images([folder if named == "folder" else scan])
    predictions = predict(load_predictor(model_dir, "torch"), found.paths, dicom=found.dicom)
    assert [(p.path, p.error) for p in predictions] == [(str(scan), "")] and found.ignored == []
    assert looked == [str(scan)]


def test_a_folder_of_only_files_fedhead_does_not_read_names_them(model_dir, tmp_path, capsys):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "chest.jp2").write_bytes(b"\x00" * 200)
    code, _, problems = _predict(capsys, model_dir, tmp_path / "scans", "--out", tmp_path / "p.csv")
    assert code == 2 and "no image files under" in problems[0] and "chest.jp2" in problems[0]


def test_a_truncated_model_pt2_gives_one_clear_line_and_no_torch_traceback(model_dir, tmp_path, capfd):
    damaged = shutil.copytree(model_dir, tmp_path / "model")
    data = (damaged / "model.pt2").read_bytes()
    (damaged / "model.pt2").write_bytes(data[: len(data) // 3])
    image = _png(tmp_path / "x.png")
    assert main(["predict", str(damaged), str(image), "--out", str(tmp_path / "p.csv"), "--engine", "torch"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fedhead: {damaged / 'model.pt2'} does not load"), err
    assert logging.getLogger("torch.export").filters == []  # silenced only around the load
