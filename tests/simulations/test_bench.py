"""``fedhead bench`` runs its three arms on real images and reports the ratios it exists for."""

from __future__ import annotations

import math

from simulations.bench import run_bench


def test_bench_measures_the_cache_and_dp_sgd_against_plain_training():
    r = run_bench(images=120, epochs=1, rounds=2, image_size=32)
    assert r["images"] == 96  # a fifth is held out for validation
    assert r["plain_forwards"] == 2 * 96  # every epoch of every round runs the backbone on every training image
    assert r["cached_forwards"] == 96 + 24 and r["dp_forwards"] == 0  # once per image; the DP arm reads the cache
    for key in ("speedup", "dp_cost", "dp_calibration_seconds", "cached_train_seconds", "dp_train_seconds", "dp_accuracy"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert 0 < r["bytes_fraction"] < 0.01


def test_bench_extraction_measures_each_arm_against_the_cpu():
    from simulations.extraction_bench import run_extraction_bench

    (arm,) = run_extraction_bench((("mobilenet_v2", 32, 28),), devices=("cpu",), cpu_images=32)
    assert (arm.backbone, arm.device, arm.precision, arm.images) == ("mobilenet_v2", "cpu", "float32", 32)
    assert arm.images_per_second > 0 and arm.trunk_images_per_second > 0
    assert arm.ratio_to_cpu == 1.0 and arm.max_relative_error == 0.0
