"""``fedhead bench-extraction``: feature-extraction throughput per backbone, device and precision, in one run.

Each arm runs :func:`common.features.extract_features`, the code a site runs
(resize on the CPU in float32 or on the GPU under float16, the trunk on the
device, features back on the CPU), over
the same synthetic grey uint8 images, after one warm-up batch. Pretrained
weights are used where they are staged, else random ones (the same
arithmetic, no download needed), and each arm says which. Reported: images
per second of each arm, the trunk alone on preprocessed inputs (the
ceiling), the ratio to the CPU float32 arm of the same backbone, and how far
each arm's features are from the CPU's float32 ones. Imports no Flower and no Opacus, so it runs on any
machine with torch and torchvision.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass

import torch

from common.config import build_run_config
from common.devices import Extraction, resolve_device
from common.features import extract_features
from common.backbones import get_backbone_spec
from common.errors import ConfigError, WeightsError
from common.model import build_split_model
from common.weights import resolve_weights_file

__all__ = ["ExtractionArm", "run_extraction_bench", "DEFAULT_ARMS"]

log = logging.getLogger(__name__)

# (backbone, image size, source image side): Fashion-MNIST's 28 px upsampled; a radiograph downsampled.
DEFAULT_ARMS = (("mobilenet_v2", 64, 28), ("densenet121", 224, 256))


@dataclass
class ExtractionArm:
    """One measured arm."""

    backbone: str
    image_size: int
    device: str
    precision: str
    weights: str  # pretrained or random
    images: int
    seconds: float
    images_per_second: float
    trunk_images_per_second: float  # the trunk alone, on inputs already preprocessed on the device: the ceiling
    ratio_to_cpu: float | None = None
    max_relative_error: float = 0.0  # against CPU float32 features of the first 64 images (largest per-image relative L2)


def _staged(backbone: str) -> bool:
    try:
        resolve_weights_file(get_backbone_spec(backbone), allow_download=False)
    except WeightsError:
        return False
    return True


def _measure(backbone: str, size: int, side: int, extraction: Extraction, images: int) -> ExtractionArm:
    pretrained = _staged(backbone)
    model = build_split_model(build_run_config(backbone=backbone, image_size=size, pretrained=pretrained, classes="a,b"))
    model.trunk.to(extraction.device)
    data = torch.randint(0, 256, (images, 1, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = 64 if extraction.device.type == "cpu" else 256
    extract_features(model.trunk, model.preprocessing, data[:batch], extraction=extraction, progress_bar=False)  # warm-up
    started = time.perf_counter()
    extract_features(model.trunk, model.preprocessing, data, extraction=extraction, progress_bar=False)
    seconds = time.perf_counter() - started
    features = extract_features(model.trunk, model.preprocessing, data[:64], extraction=extraction, progress_bar=False)
    model.trunk.to("cpu")
    reference = extract_features(model.trunk, model.preprocessing, data[:64], progress_bar=False)
    error = float(((features - reference).norm(dim=1) / reference.norm(dim=1).clamp(min=1e-12)).max())
    model.trunk.to(extraction.device)
    return ExtractionArm(
        backbone, size, str(extraction.device), extraction.precision, "pretrained" if pretrained else "random",
        images, seconds, images / seconds,
        _trunk_rate(model.trunk, model.preprocessing(data[:batch]).to(extraction.device), extraction, images),
        max_relative_error=error,
    )


@torch.no_grad()
def _trunk_rate(trunk: torch.nn.Module, inputs: torch.Tensor, extraction: Extraction, images: int) -> float:
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    repeats = max(1, images // len(inputs))
    with extraction.numerics():
        trunk(inputs)
        if extraction.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            trunk(inputs)
        if extraction.device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * len(inputs) / (time.perf_counter() - started)


def run_extraction_bench(
    arms: tuple[tuple[str, int, int], ...] = DEFAULT_ARMS,
    *,
    devices: tuple[str, ...] = ("cpu", "auto"),
    cpu_images: int = 256,
    gpu_images: int = 8192,
) -> list[ExtractionArm]:
    """Measure every backbone on every device (float32, plus float16 autocast on a GPU)."""
    results = []
    for backbone, size, side in arms:
        base = None
        seen = set()
        for name in devices:
            device = resolve_device(name)
            if device in seen:
                continue
            seen.add(device)
            precisions = ("float32",) if device.type == "cpu" else ("float32", "float16")
            for precision in precisions:
                n = cpu_images if device.type == "cpu" else gpu_images
                try:
                    arm = _measure(backbone, size, side, Extraction(device, precision), n)
                except ConfigError as exc:  # float16 overflow: the arm is reported as failing, the others go on
                    log.warning("%s %d px on %s %s: %s", backbone, size, device, precision, exc)
                    continue
                if device.type == "cpu":
                    base = arm.images_per_second
                arm.ratio_to_cpu = arm.images_per_second / base if base else None
                log.info("%s %d px on %s %s: %.0f img/s", backbone, size, device, precision, arm.images_per_second)
                results.append(arm)
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry for machines without fedhead's CLI installed: prints JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-images", type=int, default=256)
    parser.add_argument("--gpu-images", type=int, default=8192)
    args = parser.parse_args(argv)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    for arm in run_extraction_bench(cpu_images=args.cpu_images, gpu_images=args.gpu_images):
        print(json.dumps(asdict(arm)))


if __name__ == "__main__":
    main()
