"""End to end: `fedhead simulate` drives a real SuperLink and `flwr run` on small real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.round_record import load_round_records
from simulations.runner import run_simulation

pytestmark = pytest.mark.slow

DIGITS = {
    "dataset": "digits",
    "image-size": 48,
    "num-server-rounds": 3,
    "local-epochs": 5,
    "lr": 0.01,
    "partitioner": "iid",
}


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """Three digit sites, features cached, pretrained MobileNetV2."""
    root = tmp_path_factory.mktemp("sim")
    result = run_simulation(num_sites=3, name="cached", overrides={**DIGITS, "run-dir": str(root / "runs")}, state_dir=root / "state")
    return result


def test_run_learns_well_above_chance(cached_run):
    summary = cached_run.summary
    assert summary["status"] == "finished" and summary["rounds_completed"] == 3
    assert summary["evaluated_on"] == "held-out test set"
    assert summary["accuracy"] > 0.8  # chance is 0.1
    assert summary["macro_f1"] > 0.75


def test_run_folder_holds_what_design_promises(cached_run):
    root = cached_run.run_dir
    for name in ("config.json", "metrics.jsonl", "summary.json", "model/head.safetensors", "model/manifest.json", "model/model.pt2"):
        assert (root / name).is_file(), name
    assert sorted(p.name for p in (root / "plots").glob("*.png")) == ["accuracy.png", "loss.png", "sites.png"]
    config = json.loads((root / "config.json").read_text())
    assert config["weights_sha256"].startswith("b0353104") and config["versions"]["flwr"].startswith("1.42")
    rounds = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    last = load_round_records(root / "metrics.jsonl")[-1]
    assert sorted(last.sites) == ["site-0", "site-1", "site-2"] and last.complete
    for site in last.sites.values():
        assert set(site.evaluate.scores) == {"loss", "accuracy", "precision", "recall", "f1", "auroc"}
        assert len(site.train.update_sha256) == 64 and site.train.update_l2_norm > 0
    assert set(last.federated_eval) == {"loss", "accuracy", "precision", "recall", "f1", "auroc"}
    assert last.head_sha256_before == load_round_records(root / "metrics.jsonl")[-2].head_sha256_after
    for name in ("site-0", "site-1", "site-2"):  # each site's cache lives in its own state folder
        assert list((root.parent.parent / "state" / "sites" / name / "features").glob("*.safetensors"))


def test_only_the_head_travels(cached_run):
    b = cached_run.summary["bytes"]
    assert b["head_parameter_bytes"] == (1280 * 10 + 10) * 4
    assert b["head_parameter_bytes"] <= b["max_train_bytes_to_site"] <= b["head_parameter_bytes"] + 1024
    assert b["fraction_of_full_model"] <= 0.01


def test_backbone_runs_once_per_image_with_the_cache(cached_run):
    from common.config import build_run_config
    from common.partitions import prepare_federation

    fwd = cached_run.summary["backbone_forwards"]
    state = cached_run.run_dir.parent.parent / "state"
    sites = prepare_federation(build_run_config(DIGITS), 3, cache_root=state).site_sizes  # the files the run used
    for site in sites:
        counts = fwd["by_site"][site["site"]]
        assert counts == {"train": site["train"], "eval": site["val"]}
    assert fwd["server_eval"] == 359
    assert fwd["cache_hits"] > 0


def test_exported_model_predicts_without_fedhead(cached_run):
    """model.pt2 loads with plain torch in a fresh interpreter that never imports fedhead."""
    from sklearn.datasets import load_digits

    images = np.clip(np.rint(load_digits().images[:200] * (255 / 16)), 0, 255).astype(np.uint8)
    x = torch.nn.functional.interpolate(torch.from_numpy(images).float().div(255).unsqueeze(1), size=(48, 48), mode="bilinear", antialias=True)
    x = x.expand(-1, 3, -1, -1).contiguous()
    np.save(cached_run.run_dir / "probe.npy", x.numpy())
    code = (
        "import sys, numpy as np, torch\n"
        "m = torch.export.load(sys.argv[1] + '/model/model.pt2').module()\n"
        "x = torch.from_numpy(np.load(sys.argv[1] + '/probe.npy'))\n"
        "print(m(x).argmax(1).tolist())\n"
        "assert not any(k.split('.')[0] in ('common', 'client', 'server', 'simulations') for k in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(cached_run.run_dir)], capture_output=True, text=True, cwd="/", check=True)
    predictions = json.loads(out.stdout)
    labels = load_digits().target[:200]
    assert np.mean(np.array(predictions) == labels) > 0.8


def test_cli_refuses_a_bad_config_with_one_clear_line():
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--run-config", "strategy='fedsgd'"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fedhead: invalid run config:",
        "fedhead: - 'strategy' = 'fedsgd': choose one of fedavg, fedprox, fedadam, fedyogi, fedmedian, fedtrimmedavg, krum",
    ]


def test_a_run_that_fails_inside_flower_exits_non_zero(tmp_path):
    """Flower's `flwr run` exits 0 for a failed run; `fedhead simulate` must not."""
    broken = tmp_path / "held-out.npz"
    np.savez(broken, images=np.zeros((3, 8, 8), np.uint8))  # lacks test_images/test_labels
    run_config = f"dataset='digits' num-server-rounds=1 image-size=32 run-dir='{tmp_path / 'runs'}' server-eval-data='{broken}'"
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--sites", "2", "--name", "broken", "--run-config", run_config],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1, out.stdout[-2000:]
    assert "simulation 'broken' did not finish" in out.stderr
    assert "test_images" in out.stdout + out.stderr
    summary = json.loads((tmp_path / "runs" / "broken" / "summary.json").read_text())
    assert summary["status"] == "failed" and "must hold 'test_images'" in summary["error"]


def test_a_run_that_loses_a_site_is_degraded_names_it_and_exits_3_and_uncached_passes_scale(tmp_path):
    """site-1 claims more examples than the cap allows: rejected every round, the run goes on without it.

    The same run computes features afresh every epoch (cache-features=false): site-0's backbone passes are
    its images x rounds x epochs, and the rejected site's count for nothing.
    """
    run_config = (
        f"dataset='digits' num-server-rounds=2 local-epochs=2 cache-features=false image-size=32 "
        f"max-examples-per-site=600 export-onnx=false run-dir='{tmp_path / 'runs'}'"
    )
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--sites", "2", "--name", "lossy", "--run-config", run_config],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "lossy" / "summary.json").read_text())
    assert summary["status"] == "degraded" and summary["rounds_completed"] == 2
    # round 1: an update never accepted is named by its node id, and the name it claims is quoted; once its
    # evaluation was accepted under 'site-1', round 2's rejection is recorded under that name
    (left_out, reasons), (named, later) = sorted(summary["problems"].items(), key=lambda kv: kv[1][0])
    assert left_out.startswith("node-") and reasons[0].startswith("round 1: ") and "outside [1, 600]" in reasons[0]
    assert "the reply names itself 'site-1'" in " ".join(reasons)
    assert named == "site-1" and later[0].startswith("round 2: ") and "outside [1, 600]" in later[0]
    final_table = " ".join(out.stdout[out.stdout.rfind("Sites"):].split())
    assert "outside [1, 600]" in final_table and "names itself 'site-1'" in final_table  # who was left out, and why
    assert (tmp_path / "runs" / "lossy" / "model" / "head.safetensors").is_file()
    fwd = summary["backbone_forwards"]
    assert fwd["cache_hits"] == 0 and set(fwd["train_images_by_site"]) == {"site-0"}
    assert fwd["by_site"]["site-0"]["train"] == fwd["train_images_by_site"]["site-0"] * 2 * 2  # rounds x epochs


# float32 logits through MobileNetV2: onnxruntime's kernels (which it picks by thread count) land up to about 1e-4
# from PyTorch's (1.03e-4 seen once in CI); a fault in the export or its preprocessing is off by whole units
EXPORT_TOLERANCE = 5e-4

def test_predict_reproduces_the_held_out_accuracy_from_image_files(cached_run, tmp_path):
    """`fedhead predict` on the held-out images written as PNG files, prepared only as the manifest says."""
    from PIL import Image

    from common.benchmarks import load_benchmark
    from common.config import build_run_config
    from server.predict import image_paths, load_predictor

    manifest = json.loads((cached_run.run_dir / "model" / "manifest.json").read_text())
    assert manifest["files"] == {"head": "head.safetensors", "torch_export": "model.pt2", "onnx": "model.onnx"}
    assert manifest["input"]["normalisation"]["inside_model"] and manifest["input"]["value_range"] == [0.0, 1.0]
    assert manifest["output"]["classes"] == [str(d) for d in range(10)] and manifest["errors"] == {}
    assert manifest["checks"]["inputs"] == "64 of the server's held-out images"
    assert max(manifest["checks"]["max_abs_difference_from_pytorch"].values()) < EXPORT_TOLERANCE

    held_out = load_benchmark(build_run_config(DIGITS), cached_run.run_dir.parent.parent / "state" / "data")
    folder = tmp_path / "held-out"
    folder.mkdir()
    for i, (image, label) in enumerate(zip(held_out.test_images, held_out.test_labels)):
        Image.fromarray(image).save(folder / f"{i:04d}-{label}.png")
    out = tmp_path / "predictions.csv"
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "predict", str(cached_run.run_dir), str(folder), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(held_out.test_labels)} images classified with onnx" in done.stdout
    import csv

    rows = list(csv.DictReader(out.open()))
    correct = [row["class"] == Path(row["path"]).stem.split("-")[1] for row in rows]
    assert len(rows) == 359 and abs(sum(correct) / len(rows) - cached_run.summary["accuracy"]) <= 0.001

    paths = image_paths([folder])[:64]
    onnx, program = load_predictor(cached_run.run_dir, "onnx"), load_predictor(cached_run.run_dir, "torch")
    batch = torch.stack([onnx.prepare(torch.from_numpy(np.array(Image.open(p)))[None]) for p in paths])
    assert float((onnx.logits(batch) - program.logits(batch)).abs().max()) <= EXPORT_TOLERANCE


@pytest.mark.parametrize(("change", "says"), [
    (lambda m: {**m, "output": {**m["output"], "classes": m["output"]["classes"][:9]}}, "gives 10 outputs per image but the manifest lists 9"),
    (lambda m: {**m, "output": {**m["output"], "classes": m["output"]["classes"][:9] + ["0"]}}, "at least 2 distinct"),
    (lambda m: {**m, "input": {**m["input"], "resize": {**m["input"]["resize"], "size": [100000, 100000]}}}, "each 1 to 4096"),
    (lambda m: {**m, "input": {**m["input"], "resize": {**m["input"]["resize"], "interpolation": "sharp"}}}, "expected one of"),
    (lambda m: {**m, "files": {**m["files"], "torch_export": "../../model.pt2"}}, "must name a file in the model folder"),
    (lambda m: [m], "holds a list, not a manifest"),
])
def test_predict_refuses_a_manifest_that_does_not_describe_its_model(cached_run, tmp_path, change, says):
    import shutil

    from common.errors import DataError
    from server.predict import load_predictor

    model = shutil.copytree(cached_run.run_dir / "model", tmp_path / "model")
    (model / "manifest.json").write_text(json.dumps(change(json.loads((model / "manifest.json").read_text()))))
    with pytest.raises(DataError, match="restore the run's own manifest.json") as err:
        load_predictor(model, "torch")
    assert says in str(err.value)


def test_predict_never_writes_over_an_image_or_the_model(cached_run, tmp_path):
    from PIL import Image

    from simulations.cli import main

    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(image)
    model_file = cached_run.run_dir / "model" / "model.pt2"
    before = model_file.read_bytes()
    for out in (image, model_file, tmp_path):
        assert main(["predict", str(cached_run.run_dir), str(image), "--out", str(out)]) == 2
    assert model_file.read_bytes() == before and Image.open(image).size == (8, 8)
