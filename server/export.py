"""Writing the trained model: the exchanged parameters, a manifest, and the whole network to take home.

``model/head.safetensors`` holds exactly the trainable parameters that
travelled. ``model/model.pt2`` (a ``torch.export`` program) and
``model/model.onnx`` (ONNX, for onnxruntime, viewers and edge devices) are
the whole network: normalisation, frozen trunk and trained part, with a
dynamic batch size. ``model/manifest.json`` says exactly what goes in and
what comes out, so that a hospital can use the model from the manifest
alone (``fedhead predict`` does just that), and records how far each
exported file's outputs are from the PyTorch model's on real images.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from common.files import atomic_path, write_json_atomic
from common.model import SplitModel, trainable_parameters
from common.preprocessing import Preprocessing

__all__ = ["export_model", "InferenceModel", "input_contract", "ONNX_OPSET"]

log = logging.getLogger(__name__)

ONNX_OPSET = 18
_MAX_BATCH = 65536


class InferenceModel(nn.Module):
    """Normalisation, trunk and trainable part in one module (input in [0, 1])."""

    def __init__(self, model: SplitModel) -> None:
        super().__init__()
        self.trunk = model.trunk
        self.trainable = model.trainable
        # not "mean": the ONNX graph has an op output of that name (global average pooling)
        self.register_buffer("pixel_mean", torch.tensor(model.preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(model.preprocessing.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trainable(self.trunk((images - self.pixel_mean) / self.pixel_std))


def input_contract(pre: Preprocessing) -> dict[str, Any]:
    """What the exported model takes, step by step from an image file."""
    size = pre.image_size
    return {
        "name": "images",
        "dtype": "float32",
        "shape": ["batch", 3, size, size],
        "layout": "NCHW",
        "value_range": [0.0, 1.0],
        "steps": [
            "decode the image to 8-bit pixels (DICOM: modality LUT, then its window, to 0-255; MONOCHROME1 inverted)",
            f"resize to {size}x{size} pixels, stretching (no crop), with {pre.interpolation} interpolation and antialiasing",
            "grey (one channel) becomes RGB by repeating the channel three times",
            "divide the 0-255 values by 255 to get [0, 1]",
        ],
        "resize": {"size": [size, size], "interpolation": pre.interpolation, "antialias": True, "keep_aspect": False},
        "grey_to_rgb": "repeat",
        "normalisation": {
            "inside_model": True,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "note": "the model subtracts mean and divides by std itself: do not normalise the input",
        },
    }


def _output_contract(class_names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": "logits",
        "dtype": "float32",
        "shape": ["batch", len(class_names)],
        "kind": "logits: apply softmax over the last axis for probabilities",
        "classes": list(class_names),
    }


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _export_pt2(net: nn.Module, example: torch.Tensor, path: Path) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    program = torch.export.export(net, (example,), dynamic_shapes={"images": {0: batch}})
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return program


def _export_onnx(program: torch.export.ExportedProgram, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():  # onnxscript's deprecation chatter is not the user's concern
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, (example,), dynamo=True, opset_version=ONNX_OPSET,
            input_names=["images"], output_names=["logits"], optimize=False, verbose=False,
        )
    with atomic_path(path) as tmp:
        onnx_program.save(str(tmp), external_data=False)


def _onnx_outputs(path: Path, inputs: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0])


def export_model(
    model: SplitModel,
    out_dir: Path,
    *,
    class_names: tuple[str, ...],
    check_images: torch.Tensor | None = None,
    onnx: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write head.safetensors, model.pt2, model.onnx (when ``onnx``) and manifest.json into ``out_dir``.

    ``check_images`` (uint8, e.g. the server's held-out images) are the real
    inputs on which each exported file is compared with the PyTorch model;
    random inputs are used where there are none, and the manifest says which.
    A file that cannot be exported is recorded under ``errors`` and the others
    are still written. Returns the manifest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model.trainable)}
    with atomic_path(out_dir / "head.safetensors") as tmp:
        save_file(params, tmp)
    pre = model.preprocessing
    net = InferenceModel(model).eval()
    if check_images is not None and len(check_images):
        inputs, source = pre.resize(check_images).float().div(255.0), f"{len(check_images)} of the server's held-out images"
    else:
        inputs, source = torch.rand(8, 3, pre.image_size, pre.image_size, generator=torch.Generator().manual_seed(0)), "8 random inputs"
    with torch.no_grad():
        reference = net(inputs)
    manifest: dict[str, Any] = {
        "backbone": model.spec.name,
        "weights_sha256": model.weights_sha256,
        "cut": model.cut_id,
        "unfrozen_stages": model.num_stages - model.cut,
        "head": model.head_layout,
        "trainable_parameters": {name: list(t.shape) for name, t in params.items()},
        "classes": list(class_names),
        "input": input_contract(pre),
        "output": _output_contract(class_names),
        "files": {"head": "head.safetensors", "torch_export": None, "onnx": None},
        "usage": {
            "torch_export": "torch.export.load('model.pt2').module()(images)",
            "onnx": "onnxruntime.InferenceSession('model.onnx').run(None, {'images': images})[0]",
            "fedhead": "fedhead predict RUN_DIR IMAGE_OR_FOLDER... --out predictions.csv",
        },
        "checks": {"inputs": source, "max_abs_difference_from_pytorch": {}},
        "errors": {},
        **(extra or {}),
    }
    checks, errors = manifest["checks"]["max_abs_difference_from_pytorch"], manifest["errors"]
    example = inputs[:2] if len(inputs) >= 2 else torch.rand(2, 3, pre.image_size, pre.image_size)
    program = None
    try:
        program = _export_pt2(net, example, out_dir / "model.pt2")
        manifest["files"]["torch_export"] = "model.pt2"
        with torch.no_grad():
            checks["torch_export"] = _max_difference(program.module()(inputs), reference)
    except Exception as exc:  # torch.export rejects some graphs: recorded, and the run is marked degraded
        errors["torch_export"] = f"{type(exc).__name__}: {exc}"
        log.error("could not export the model with torch.export (%s); head.safetensors is written", exc)
    if onnx and program is None:
        errors["onnx"] = "not attempted: it is exported from the torch.export program, which failed"
    if onnx and program is not None:
        try:
            _export_onnx(program, example, out_dir / "model.onnx")
            outputs = _onnx_outputs(out_dir / "model.onnx", inputs)
            if outputs is not None:
                checks["onnx"] = _max_difference(outputs, reference)
            manifest["files"]["onnx"] = "model.onnx"
            manifest["onnx_opset"] = ONNX_OPSET
        except Exception as exc:  # the ONNX exporter and onnxruntime raise many types; recorded like torch.export's
            errors["onnx"] = f"{type(exc).__name__}: {exc}"
            (out_dir / "model.onnx").unlink(missing_ok=True)  # never leave a file the manifest does not vouch for
            log.error("could not export the model to ONNX (%s)", exc)
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest
