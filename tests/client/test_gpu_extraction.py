"""On a machine with a CUDA GPU: a site's features and training there match the CPU's.

Skipped where torch sees no GPU (CI, most laptops); run where one is. The
tolerances are :mod:`common.devices`'s stated ones.
"""

from __future__ import annotations

import pytest
import torch

from client.feature_cache import FeatureCache
from client.feature_source import build_feature_source
from client.site_data import Split
from client.training import evaluate_locally, train_locally
from common.config import build_run_config
from common.devices import GPU_FLOAT32_TOLERANCE, MIXED_PRECISION_TOLERANCE, Extraction, resolve_extraction
from common.features import extract_features
from common.model import build_split_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _relative_error(features: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest per-image relative L2 distance."""
    return float(((features - reference).norm(dim=1) / reference.norm(dim=1).clamp(min=1e-12)).max())


@pytest.fixture(scope="module")
def model():
    return build_split_model(build_run_config(image_size=64, classes=",".join(str(d) for d in range(10))))


@pytest.fixture(scope="module")
def images(digits):
    return torch.from_numpy(digits[0])


@pytest.fixture(scope="module")
def cpu_features(model, images):
    model.trunk.to("cpu")
    return extract_features(model.trunk, model.preprocessing, images)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_gpu_features_match_the_cpus_within_the_stated_tolerance(model, images, cpu_features, precision):
    extraction = Extraction(torch.device("cuda"), precision)
    model.trunk.to(extraction.device)
    try:
        features = extract_features(model.trunk, model.preprocessing, images, extraction=extraction)
    finally:
        model.trunk.to("cpu")
    assert features.device.type == "cpu" and features.dtype == torch.float32
    error = _relative_error(features, cpu_features)
    tolerance = GPU_FLOAT32_TOLERANCE if precision == "float32" else MIXED_PRECISION_TOLERANCE[precision]
    print(f"\nGPU {precision} against CPU float32: largest relative L2 error per image {error:.2e} (tolerance {tolerance:.0e})")
    assert error <= tolerance


def test_a_site_on_the_gpu_caches_features_and_trains_its_head_there(images, digits, cpu_features, tmp_path):
    assert resolve_extraction("auto", "auto") == Extraction(torch.device("cuda"), "float32")
    extraction = resolve_extraction("auto", "float16")
    cfg = build_run_config(image_size=64, classes=",".join(str(d) for d in range(10)), local_epochs=10, lr=0.01)
    labels = torch.from_numpy(digits[1])
    train, val = Split(images[:1400], labels[:1400]), Split(images[1400:], labels[1400:])
    cache = FeatureCache(tmp_path / "features")
    model = build_split_model(cfg)  # as the ClientApp does: the trunk is placed on the GPU before it is built
    model.place_trunk(extraction.device)
    assert not model.trunk_built
    model.trainable.to(extraction.device)
    try:
        sources = [
            build_feature_source(model, split, cache=cache, augment_views=0, seed=0, label=name, extraction=extraction, device=extraction.device)
            for name, split in (("train", train), ("val", val))
        ]
        assert sources[0].forwards == 1400 and sources[0].views.device.type == "cuda"
        assert next(model.trunk.parameters()).device.type == "cuda"
        again = build_feature_source(model, val, cache=cache, augment_views=0, seed=0, label="val", extraction=extraction)
        assert again.hits == 1 and again.forwards == 0  # float16 features are cached under their own key
        report = train_locally(model.trainable, sources[0], train.labels, sources[1], val.labels, cfg, server_round=1)
        scores = evaluate_locally(model.trainable, sources[1], val.labels, 10)
    finally:
        model.trunk.to("cpu")
        model.trainable.to("cpu")
    print(f"\nfloat16 features of the validation split: largest relative error {_relative_error(again.views[0], cpu_features[1400:]):.2e}")
    print(f"\nhead trained on the GPU: validation accuracy {scores['accuracy']:.4f}, train loss {report.train_loss:.3f}")
    assert scores["accuracy"] >= 0.85
    cpu_entry = FeatureCache(tmp_path / "features").path(
        {"weights_sha256": model.weights_sha256, "cut": model.cut_id, "preprocessing": model.preprocessing.describe(),
         "data_sha256": val.fingerprint(), "view": 0}
    )
    assert not cpu_entry.exists()  # a float32 site would not read the float16 entry
