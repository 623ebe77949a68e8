"""Writing the trained model: the exchanged parameters, a manifest, a full inference model.

``model/head.safetensors`` holds exactly the trainable parameters that
travelled; ``model/manifest.json`` says what they fit (backbone, weights
sha256, cut, classes, head layout, preprocessing); ``model/model.pt2`` is the
whole network (normalisation, frozen trunk, trained part) as a
``torch.export`` program that loads with plain torch:
``torch.export.load("model.pt2").module()(images)`` with float images in
[0, 1] of shape (N, 3, S, S).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from common.files import atomic_path, write_json_atomic
from common.model import SplitModel, trainable_parameters

__all__ = ["export_model", "InferenceModel"]

log = logging.getLogger(__name__)


class InferenceModel(nn.Module):
    """Normalisation, trunk and trainable part in one module (input in [0, 1])."""

    def __init__(self, model: SplitModel) -> None:
        super().__init__()
        self.trunk = model.trunk
        self.trainable = model.trainable
        self.register_buffer("mean", torch.tensor(model.preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.preprocessing.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trainable(self.trunk((images - self.mean) / self.std))


def export_model(model: SplitModel, out_dir: Path, *, class_names: tuple[str, ...], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write head.safetensors, manifest.json and model.pt2 into ``out_dir``; return the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model.trainable)}
    with atomic_path(out_dir / "head.safetensors") as tmp:
        save_file(params, tmp)
    manifest: dict[str, Any] = {
        "backbone": model.spec.name,
        "weights_sha256": model.weights_sha256,
        "cut": model.cut_id,
        "unfrozen_stages": model.num_stages - model.cut,
        "classes": list(class_names),
        "head": model.head_layout,
        "trainable_parameters": {name: list(t.shape) for name, t in params.items()},
        "preprocessing": model.preprocessing.describe(),
        "files": {"head": "head.safetensors", "full_model": None},
        **(extra or {}),
    }
    net = InferenceModel(model).eval()
    size = model.preprocessing.image_size
    try:
        example = torch.rand(2, 3, size, size)
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(net, (example,), dynamic_shapes={"images": {0: batch}})
        with atomic_path(out_dir / "model.pt2") as tmp:
            torch.export.save(program, tmp)
        manifest["files"]["full_model"] = "model.pt2"
        manifest["full_model_usage"] = (
            "torch.export.load('model.pt2').module()(images); images: float32 (N, 3, "
            f"{size}, {size}) in [0, 1], resized with {model.preprocessing.interpolation} interpolation"
        )
    except Exception as exc:  # torch.export rejects some graphs; recorded, and the run is marked incomplete
        manifest["full_model_error"] = f"{type(exc).__name__}: {exc}"
        log.error("could not export the full model with torch.export (%s); head.safetensors is written", exc)
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest
