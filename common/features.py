"""Running the frozen trunk over images, in batches, counting every forward pass."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from common.devices import Extraction
from common.errors import ConfigError
from common.preprocessing import Preprocessing
from common.progress import ProgressReporter

__all__ = ["extract_features"]

log = logging.getLogger(__name__)


def _batch(images: torch.Tensor | Sequence[torch.Tensor], start: int, stop: int, pre: Preprocessing, extraction: Extraction) -> torch.Tensor:
    device = extraction.device
    if not extraction.mixed or not isinstance(pre, Preprocessing):
        # float32: resize on the CPU, so a GPU site's pixels are exactly a CPU site's
        if isinstance(images, torch.Tensor):
            batch = pre(images[start:stop])
        else:
            batch = torch.cat([pre(img.unsqueeze(0)) for img in images[start:stop]])
        return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    # mixed precision: send the uint8 pixels and resize on the GPU too, where the CPU would be the bottleneck
    if isinstance(images, torch.Tensor):
        resized = pre.resize(images[start:stop].contiguous().pin_memory().to(device, non_blocking=True))
    else:
        resized = torch.cat([pre.resize(img.unsqueeze(0).to(device, non_blocking=True)) for img in images[start:stop]])
    return pre.normalise(resized).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def extract_features(
    trunk: nn.Module,
    preprocessing: Preprocessing,
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    extraction: Extraction = Extraction(),
    batch_size: int | None = None,
    description: str = "features",
    progress_interval_s: float = 10.0,
    progress_bar: bool | None = None,
) -> torch.Tensor:
    """Trunk outputs for ``images`` (uint8, one batch tensor or a list of single images), as float32 on the CPU.

    Each image passes through the trunk once (once per view when the trunk
    averages views); the caller counts ``len(images)`` times the model's
    ``trunk_passes``. The trunk must already be on
    ``extraction.device``. On the CPU, batches of 64 in channels-last layout
    (the trunk is put in that layout when built) were measured fastest: about
    3x batches of 256 in the default layout. On a GPU batches are 256; in
    float32 they are resized on the CPU (the same pixels as a CPU site's), under
    float16 autocast on the GPU (faster, and within the stated tolerance). Progress shows as a bar on a terminal
    (``progress_bar=None``: when stderr is a TTY), else as a log line about
    every ``progress_interval_s`` seconds with images done, img/s and ETA.
    """
    trunk.eval()
    device = extraction.device
    if batch_size is None:
        batch_size = 64 if device.type == "cpu" else 256
    n = len(images)
    outputs = []
    with ProgressReporter(n, description, interval_s=progress_interval_s, logger=log, bar=progress_bar) as progress:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            with extraction.numerics():
                out = trunk(_batch(images, start, stop, preprocessing, extraction))
            if extraction.mixed and not bool(torch.isfinite(out).all()):
                raise ConfigError(
                    f"{description}: the backbone's activations overflow {extraction.precision} on these images "
                    f"(non-finite features); set the site's precision='float32'"
                )
            outputs.append(out.float().contiguous().to("cpu", non_blocking=device.type == "cuda"))
            progress.advance(stop - start)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not outputs:
        return torch.empty(0)
    features = torch.cat(outputs)
    log.debug("%s: %d images in %.1f s (%s)", description, n, progress.close(), extraction.describe())
    return features
