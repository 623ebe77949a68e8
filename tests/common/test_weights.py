"""Weights resolution: the staged ImageNet MobileNetV2, hash checks, staging."""

from __future__ import annotations

import shutil

import pytest
import torch

from common.backbones import get_backbone_spec
from common.config import build_run_config
from common.errors import WeightsError
from common.model import build_split_model
from common.hashing import sha256_file
from common.weights import expected_filename, hub_checkpoint_dir, resolve_weights_file, stage_weights_file

MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


@pytest.fixture(scope="module")
def staged_mobilenet():
    """The real ImageNet MobileNetV2 weights, staged by `make` into torch's hub cache."""
    path = resolve_weights_file(get_backbone_spec("mobilenet_v2"), allow_download=False)
    return path


def test_staged_weights_resolve_and_are_identified_by_sha256(staged_mobilenet):
    assert staged_mobilenet.name == "mobilenet_v2-b0353104.pth"
    model = build_split_model(build_run_config())
    assert model.weights_sha256 == MOBILENET_V2_SHA256 == sha256_file(staged_mobilenet)


def test_a_file_with_the_wrong_hash_is_refused(tmp_path, staged_mobilenet):
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    data = bytearray(staged_mobilenet.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="fedhead weights stage"):
        build_split_model(build_run_config(weights_file=str(bad)))


def test_a_missing_weights_file_says_how_to_provision_it(tmp_path):
    with pytest.raises(WeightsError, match="fedhead weights stage"):
        build_split_model(build_run_config(weights_file=str(tmp_path / "nope.pth")))


def test_missing_cache_entry_names_the_release_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    spec = get_backbone_spec("resnet18")
    with pytest.raises(WeightsError, match=expected_filename(spec)):
        resolve_weights_file(spec, allow_download=False)


def test_stage_checks_then_copies_into_the_hub_cache(tmp_path, monkeypatch, staged_mobilenet):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    dest = stage_weights_file(staged_mobilenet)
    assert dest == hub_checkpoint_dir() / "mobilenet_v2-b0353104.pth"
    assert sha256_file(dest) == MOBILENET_V2_SHA256
    renamed = tmp_path / "weights.pth"
    shutil.copyfile(staged_mobilenet, renamed)
    with pytest.raises(WeightsError, match="not a release file"):
        stage_weights_file(renamed)


def test_pretrained_features_are_informative_and_random_ones_are_not(digits):
    """A linear probe on ImageNet features reads digits; on a random backbone's it cannot."""
    from sklearn.linear_model import LogisticRegression

    images, labels = digits
    x = torch.from_numpy(images[:800])

    def probe_accuracy(pretrained: bool) -> float:
        model = build_split_model(build_run_config(pretrained=pretrained, image_size=32))
        with torch.no_grad():
            features = model.trunk(model.preprocessing(x)).numpy()
        probe = LogisticRegression(max_iter=1000).fit(features[:600], labels[:600])
        return float(probe.score(features[600:800], labels[600:800]))

    assert probe_accuracy(True) > 0.8
    assert probe_accuracy(False) < 0.3  # chance is 0.1


def test_stage_into_a_hub_cache_that_cannot_be_written_says_so(tmp_path, monkeypatch, capsys, staged_mobilenet):
    from simulations.cli import main

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "a-file" / "hub"))
    assert main(["weights", "stage", str(staged_mobilenet)]) == 2
    assert "set TORCH_HOME to a folder this user can write" in capsys.readouterr().err


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o027, 0o640), (0o077, 0o600)])
def test_a_staged_file_is_readable_as_the_umask_allows_like_torch_s_own_downloads(tmp_path, monkeypatch, staged_mobilenet, umask, mode):
    import os
    import stat

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    before = os.umask(umask)
    try:
        dest = stage_weights_file(staged_mobilenet)
    finally:
        os.umask(before)
    assert stat.S_IMODE(dest.stat().st_mode) == mode
