"""``fedhead bench``: cached-feature head training against the plain way, and DP-SGD's cost, in one run.

The arms train the same head on the same Fashion-MNIST images (scikit-learn
digits where Fashion-MNIST is not available) for the same rounds and epochs:
the plain arm runs the frozen backbone on every batch of every epoch, the
cached arm once per image, and the DP arm runs DP-SGD (Opacus, the same
epochs in Poisson-sampled steps, noise calibrated for epsilon 3) on the cached
arm's features. Printed: wall time of each, the cached/plain ratio, DP-SGD's
training time against the cached arm's training time (the noise calibration,
once per run, timed apart), backbone forward
passes, and what one site sends per round against the full model. Ratios, not
absolute times, are the figure to compare across machines.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from client.feature_cache import FeatureCache
from client.dp_training import secret_generator, train_privately
from client.feature_source import build_feature_source
from client.site_data import Split
from client.training import evaluate_locally, train_locally
from common.config import build_run_config
from common.errors import DataError
from common.exchange import arrays_nbytes, to_arrayrecord
from common.benchmarks import load_benchmark
from common.model import build_split_model
from common.privacy import calibrate_noise_multiplier

__all__ = ["run_bench"]

log = logging.getLogger(__name__)


def _data(images: int, cache_root: Path) -> tuple[str, np.ndarray, np.ndarray]:
    try:
        bench = load_benchmark(build_run_config(dataset="fashion-mnist"), cache_root / "data")
    except DataError:
        bench = load_benchmark(build_run_config(dataset="digits"), cache_root / "data")
    n = min(images, len(bench.train_labels))
    return bench.name, bench.train_images[:n], bench.train_labels[:n]


def _dp_plan(cfg, examples: int, rounds: int) -> tuple[float, float, int]:
    """The DP arm's noise multiplier (epsilon 3 at delta 1e-5 over the run), sample rate and steps per round."""
    rate = min(1.0, cfg.batch_size / examples)
    steps = cfg.local_epochs * max(1, round(1 / rate))
    noise = calibrate_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=rate, steps=steps * rounds, accountant="rdp"
    )
    return noise, rate, steps


def run_bench(*, images: int = 2000, epochs: int = 2, rounds: int = 3, image_size: int = 64) -> dict[str, float]:
    """Run both arms; return the measured figures (the CLI prints them)."""
    root = Path(__file__).resolve().parent.parent / ".cache" / "fedhead"
    name, x, y = _data(images, root)
    n_val = len(y) // 5
    train = Split(torch.from_numpy(x[n_val:]), torch.from_numpy(y[n_val:]))
    val = Split(torch.from_numpy(x[:n_val]), torch.from_numpy(y[:n_val]))
    cfg = build_run_config(image_size=image_size, local_epochs=epochs, classes=",".join(str(i) for i in range(10)))
    results: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("plain", "cached", "dp"):
            model = build_split_model(cfg)
            cache = FeatureCache(tmp) if arm != "plain" else None  # the DP arm reads the cached arm's features
            started = time.perf_counter()
            train_src = build_feature_source(model, train, cache=cache, augment_views=0, seed=0, label=f"{arm} train")
            val_src = build_feature_source(model, val, cache=cache, augment_views=0, seed=0, label=f"{arm} val")
            if arm == "dp":  # calibrated once per run and timed apart: it depends on the plan, not on the data
                calibrating = time.perf_counter()
                noise, rate, steps = _dp_plan(cfg, len(train), rounds)
                results["dp_calibration_seconds"] = time.perf_counter() - calibrating
            training = time.perf_counter()
            for server_round in range(1, rounds + 1):
                if arm == "dp":
                    train_privately(
                        model.trainable, train_src, train.labels, cfg, server_round=server_round, noise_multiplier=noise,
                        sample_rate=rate, steps=steps, generator=secret_generator(),
                    )
                else:
                    train_locally(model.trainable, train_src, train.labels, val_src, val.labels, cfg, server_round=server_round)
            results[f"{arm}_train_seconds"] = time.perf_counter() - training
            results[f"{arm}_seconds"] = time.perf_counter() - started
            results[f"{arm}_forwards"] = train_src.forwards + val_src.forwards
            accuracy[arm] = evaluate_locally(model.trainable, val_src, val.labels, 10)["accuracy"]
    head = arrays_nbytes(to_arrayrecord(model.trainable))
    full = model.model_bytes()
    results["speedup"] = results["plain_seconds"] / results["cached_seconds"]
    results["dp_cost"] = results["dp_train_seconds"] / results["cached_train_seconds"]
    results["bytes_fraction"] = head / full
    results.update(
        images=len(train), rounds=rounds, epochs=epochs, image_size=image_size, head_bytes=head, full_bytes=full,
        plain_accuracy=accuracy["plain"], cached_accuracy=accuracy["cached"], dp_accuracy=accuracy["dp"],
    )
    log.info("bench on %s: %s, %d images", name, cfg.backbone, len(train))
    return results
