"""The `fedhead` command line: help everywhere, exit codes, one clear line per problem."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from simulations.cli import main


def _fedhead(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args",
    [[], ["simulate"], ["weights"], ["weights", "stage"], ["site"], ["site", "check"], ["bench"], ["show"],
     ["audit"], ["audit", "verify"], ["audit", "cross-check"]],
)
def test_every_subcommand_has_help(args, capsys):
    assert main([*args, "--help"]) == 0
    assert f"Usage: fedhead {' '.join(args)}".strip() in " ".join(capsys.readouterr().out.split())


def test_staging_a_file_that_is_no_release_is_refused_in_one_line(tmp_path):
    bogus = tmp_path / "model.pth"
    bogus.write_bytes(b"\0" * 100)
    out = _fedhead("weights", "stage", str(bogus))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a release file fedhead knows" in lines[0]


def test_site_check_counts_images_per_class(tmp_path, digits, capsys):
    images, labels = digits
    path = tmp_path / "site.npz"
    np.savez(path, train_images=images[:100], train_labels=labels[:100] % 2)
    assert main(["site", "check", str(path), "--classes", "even,odd"]) == 0
    out = capsys.readouterr().out
    assert "90 training and 10 validation images" in out
    rows = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in re.finditer(r"(even|odd|all)\s*\S\s*\d*\s*\S\s*(\d+)\s*\S\s*(\d+)", out)}
    assert set(rows) == {"even", "odd", "all"} and rows["all"] == (90, 10)
    assert rows["even"][0] + rows["odd"][0] == 90 and rows["even"][0] > 30 and rows["odd"][0] > 30


def test_site_check_names_a_bad_label_range(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, train_images=np.zeros((5, 8, 8), np.uint8), train_labels=np.arange(5))
    out = _fedhead("site", "check", str(path), "--classes", "a,b")
    assert out.returncode == 2 and "labels range 0..4, but the run has 2 classes" in out.stderr


def _records():
    from common.round_record import NodeProblem, RoundRecord, SiteEvaluate, SiteRound, SiteTrain

    scores = {"loss": 0.5, "accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.88, "auroc": 0.99}
    records = [RoundRecord(round=0, central_eval={"accuracy": 0.1, "f1": 0.05, "loss": 2.3})]
    for rnd in (1, 2):
        sites = {
            "site-0": SiteRound("site-0", 11, SiteTrain(True, 400, 200, 90, 0.7), SiteEvaluate(True, 400, 50, 10, scores=scores)),
            "site-10": SiteRound("site-10", 12, SiteTrain(rnd == 1, 400, 200, 80, 0.6), SiteEvaluate(True, 400, 50, 9, scores=scores)),
        }
        problems = [] if rnd == 1 else [NodeProblem(12, "site-10", "train", "rejected", ["update norm is not finite"])]
        records.append(
            RoundRecord(
                round=rnd, sampled_nodes=[11, 12], sites=sites, problems=problems,
                aggregated_sites=["site-0", "site-10"] if rnd == 1 else ["site-0"],
                federated_eval={"accuracy": 0.9, "f1": 0.88}, central_eval={"accuracy": 0.85 + rnd / 100, "f1": 0.8, "loss": 0.6},
                bytes_down=800, bytes_up=400, wall_seconds=1.5,
            )
        )
    return records


def test_tables_come_from_round_records_and_name_why_a_site_was_left_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside cells
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(r.to_line() + "\n" for r in _records()))
    summary = {"status": "degraded", "error": "1 site-round(s) did not take part fully", "accuracy": 0.87, "macro_f1": 0.8,
               "evaluated_on": "held-out test set", "rounds_completed": 2, "num_server_rounds": 2, "wall_seconds": 3.0,
               "problems": {"site-10": ["round 2: train rejected: update norm is not finite"]}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["show", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 of 2" in out and "1 of 2" in out  # sites aggregated in round 1 and round 2
    assert "87.00%" in out  # round 2's test accuracy
    assert out.index("site-0") < out.index("site-10")  # natural order
    assert "round 2 train rejected: update norm is not finite" in out
    assert "degraded" in out and "macro F1 80.00%" in out


def test_show_tolerates_a_torn_last_line_and_refuses_a_folder_that_holds_no_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(_records()[0].to_line() + "\n" + '{"round": 1, "si')
    assert main(["show", str(run)]) == 0
    assert main(["show", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_site_check_lists_every_skipped_file_with_its_reason(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(6):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / label / f"{i}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    out = _fedhead("site", "check", str(tmp_path), "--classes", "a,b")
    assert out.returncode == 1, out.stderr
    assert "training and" in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.startswith("fedhead: ")]  # the rest is the log
    assert lines[0] == "fedhead: 1 unreadable image files were skipped:"
    assert lines[1].startswith(f"fedhead: skipped {tmp_path / 'b' / 'broken.png'}: ") and len(lines[1]) > len(f"fedhead: skipped {tmp_path / 'b' / 'broken.png'}: ")


def test_a_site_with_no_readable_image_names_each_file_it_skipped(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.png").write_text("not an image")
    out = _fedhead("site", "check", str(tmp_path))
    assert out.returncode == 2 and "holds no training images (2 image files were skipped as unreadable)" in out.stderr
    for name in ("one", "two"):
        assert out.stderr.count(f"{tmp_path / name / name}.png: not an image file that PIL can identify") == 1, out.stderr


def test_readme_lists_exactly_the_commands_of_fedhead_help(capsys):
    from simulations.runner import project_root

    readme = (project_root() / "README.md").read_text()
    block = readme.split("## The `fedhead` command", 1)[1].split("```", 2)[1]
    documented = {line.split()[0] for line in block.splitlines()[2:] if line.strip()}
    assert main(["--help"]) == 0
    helped = set(re.findall(r"│ (\w[\w-]*)\s{2,}", capsys.readouterr().out))
    assert documented == helped == {
        "show", "report", "predict", "simulate", "privacy-sweep", "bench", "bench-extraction", "audit", "site", "federation", "weights",
    }


def test_site_check_shows_what_the_policy_allows_and_the_budget_left(tmp_path, digits, capsys):
    from client.privacy_ledger import PrivacyLedger
    from client.site_data import load_site_data
    from common.config import build_run_config
    from common.privacy import DPEvent, epsilon_spent

    images, labels = digits
    data = tmp_path / "site.npz"
    np.savez(data, train_images=images[:200], train_labels=labels[:200] % 2)
    policy = tmp_path / "policy.toml"
    policy.write_text("require-dp = true\nmax-epsilon = 5.0\nmax-delta = 1e-5\n")
    fingerprint = load_site_data(data, build_run_config(classes="even,odd")).records_fingerprint()
    event = DPEvent(1.5, 0.1, 40, 1.0, "rdp")
    PrivacyLedger.in_state_dir(tmp_path / "state").record(fingerprint, run_id="7", server_round=1, event=event)
    spent = epsilon_spent([event], delta=1e-5, accountant="rdp")
    code = main(["site", "check", str(data), "--classes", "even,odd", "--policy", str(policy), "--state-dir", str(tmp_path / "state")])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert f"lifetime-epsilon │ {spent:.4g}" in out and f"epsilon-left │ {5.0 - spent:.4g}" in out
    assert "trainings-recorded │ 1" in out and "require-dp │ True" in out
