"""The `fedhead` command line: help everywhere, exit codes, one clear line per problem."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from simulations.cli import main


def _fedhead(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [[], ["simulate"], ["weights", "stage"], ["site", "check"], ["bench"]])
def test_every_subcommand_has_help(args):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0


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
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[1:]}
    assert set(counts) == {"even", "odd"} and sum(counts.values()) == 90
    assert counts["even"] > 30 and counts["odd"] > 30


def test_site_check_names_a_bad_label_range(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, train_images=np.zeros((5, 8, 8), np.uint8), train_labels=np.arange(5))
    out = _fedhead("site", "check", str(path), "--classes", "a,b")
    assert out.returncode == 2 and "labels range 0..4, but the run has 2 classes" in out.stderr
