"""`flwr run .` from the project root, as in Flower's own templates, on a hospital's archive of DICOM files.

The sites prepare their own partitions of an image folder whose files are
the digits stored as DICOM in all the ways an archive holds them (MONOCHROME1
and 2, 12- and 16-bit, with and without a window, one with a rescale); the
sites and the server's held-out set read them through fedhead's one image
reader. `fedhead predict` then classifies the held-out files again,
following only the exported model's manifest.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.round_record import load_round_records
from simulations.processes import find_by_env, stop_processes
from simulations.runner import project_root
from tests.dicom_files import write_dicom_site

pytestmark = pytest.mark.slow

CLASSES = tuple(str(d) for d in range(10))


def test_flwr_run_dot_learns_from_dicom_files_and_predict_reads_them(tmp_path, digits):
    images, labels = digits
    archive = tmp_path / "xrays"
    write_dicom_site(archive, images[:1000], labels[:1000], CLASSES, split="train")
    write_dicom_site(archive, images[1000:1300], labels[1000:1300], CLASSES, split="test")
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(tmp_path / "flwr"),
        FEDHEAD_HOME=str(tmp_path / "home"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    run_config = (
        f"dataset='image-folder' dataset-path='{archive}' classes='{','.join(CLASSES)}' image-size=32 "
        f"num-server-rounds=2 local-epochs=3 lr=0.01 export-onnx=false run-dir='{tmp_path / 'runs'}' run-name='plain-flower'"
    )
    try:
        out = subprocess.run(
            ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=2", "--run-config", run_config],
            cwd=project_root(), env=env, capture_output=True, text=True, timeout=400,
        )
    finally:  # `flwr run` leaves its local SuperLink running; nothing stops it but its PID
        stop_processes(find_by_env("FLWR_HOME", env["FLWR_HOME"]))
    run_dir = tmp_path / "runs" / "plain-flower"
    assert (run_dir / "summary.json").is_file(), out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["evaluated_on"] == "held-out test set" and summary["accuracy"] > 0.8  # chance is 0.1
    assert summary["backbone_forwards"]["server_eval"] == 300  # every held-out DICOM file was read, none skipped
    records = load_round_records(run_dir / "metrics.jsonl")
    assert sorted(records[-1].sites) == ["site-0", "site-1"]
    prepared = list((tmp_path / "home" / "partitions").glob("image-folder-dirichlet-2sites-*/site-*.npz"))
    assert len(prepared) == 2  # prepared once, by whichever site came first, and shared
    assert not find_by_env("FLWR_HOME", env["FLWR_HOME"])

    predictions = tmp_path / "predictions.csv"
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "predict", str(run_dir), str(archive / "test"), "--out", str(predictions)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "300 images classified with torch (model.pt2), 0 unreadable" in done.stdout  # this run exported no model.onnx
    rows = list(csv.DictReader(predictions.open()))
    correct = sum(row["class"] == Path(row["path"]).parent.name for row in rows)
    assert abs(correct / len(rows) - summary["accuracy"]) <= 0.001
