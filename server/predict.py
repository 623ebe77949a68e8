"""``fedhead predict``: a run's exported model on image files, following only its manifest.

No training code is involved: the images are decoded by fedhead's one image
reader (PNG, JPEG, DICOM and the rest), prepared exactly as the manifest's
``input`` section says, and run through ``model.onnx`` with onnxruntime where
it is installed, else through ``model.pt2`` with plain torch.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from common.config import is_plain_name
from common.data_formats import UnreadableImageError, read_image
from common.errors import ConfigError, DataError
from common.files import atomic_path
from common.image_files import list_image_files
from common.logs import held_logs
from common.progress import ProgressReporter

__all__ = [
    "ENGINES", "FoundImages", "Prediction", "Predictor", "load_predictor", "check_out_path", "find_images", "image_paths", "predict",
    "write_predictions",
]

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnx", "torch")


@dataclass
class Prediction:
    """One image's class, its probability and the top k, or why it could not be read."""

    path: str
    top: list[tuple[str, float]]
    error: str = ""


class Predictor:
    """The exported model and the input contract from its manifest."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any], engine: str) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.engine = engine
        self.size, self.interpolation, self.antialias, self.classes = _input_and_classes(manifest, model_dir / "manifest.json")
        name = manifest["files"]["onnx" if engine == "onnx" else "torch_export"]
        try:
            if engine == "onnx":
                import onnxruntime

                self._session = onnxruntime.InferenceSession(str(model_dir / name), providers=["CPUExecutionProvider"])
            else:
                with held_logs("torch.export"):  # it logs a traceback at WARNING before it raises
                    self._module = torch.export.load(str(model_dir / name)).module()
        except Exception as exc:  # onnxruntime and torch.export raise many types for a damaged file
            other = "torch" if engine == "onnx" else "onnx"
            hint = f"try --engine {other}" if engine == "onnx" or manifest["files"].get("onnx") else "re-export the run"
            raise DataError(f"{model_dir / name} does not load ({type(exc).__name__}: {exc}); {hint}") from exc
        self._check_outputs(model_dir / name)

    def _check_outputs(self, model_file: Path) -> None:
        """One blank image through the model: it must take the manifest's input and give one logit per listed class."""
        mismatch = "the manifest does not describe this model: restore the run's own manifest.json or re-export the run"
        try:
            outputs = tuple(self.logits(torch.zeros(1, 3, *self.size)).shape)
        except Exception as exc:  # torch.export's guards and onnxruntime raise their own types
            raise DataError(f"{model_file} does not take the manifest's {self.size[0]}x{self.size[1]} input "
                            f"({type(exc).__name__}); {mismatch}") from exc
        if outputs != (1, len(self.classes)):
            raise DataError(f"{model_file} gives {outputs[-1]} outputs per image but the manifest lists "
                            f"{len(self.classes)} classes; {mismatch}")

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """A (C, H, W) uint8 image as the model's input row (3, S, S) in [0, 1], step by step from the manifest."""
        resized = v2.functional.resize(image.unsqueeze(0), list(self.size), interpolation=self.interpolation, antialias=self.antialias)[0]
        if resized.shape[0] == 1:
            resized = resized.expand(3, -1, -1)
        return resized.float().div(255.0)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's output for a float (N, 3, S, S) batch."""
        if self.engine == "onnx":
            return torch.from_numpy(self._session.run(None, {self.manifest["input"]["name"]: inputs.numpy()})[0])
        with torch.no_grad():
            return self._module(inputs)


def _input_and_classes(manifest: dict[str, Any], path: Path) -> tuple[tuple[int, int], v2.InterpolationMode, bool, list[str]]:
    """The manifest's resize and class list, checked: DataError naming every problem."""
    resize = manifest["input"].get("resize")
    resize = resize if isinstance(resize, dict) else {}
    size, interpolation, antialias = resize.get("size"), resize.get("interpolation"), resize.get("antialias")
    classes = manifest["output"].get("classes")
    problems = []
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and 1 <= v <= 4096 for v in size)):
        problems.append(f"input.resize.size is {size!r}; expected [height, width], each 1 to 4096")
    modes = [m.value for m in v2.InterpolationMode]
    if interpolation not in modes:
        problems.append(f"input.resize.interpolation is {interpolation!r}; expected one of {', '.join(modes)}")
    if not isinstance(antialias, bool):
        problems.append(f"input.resize.antialias is {antialias!r}; expected true or false")
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        problems.append(f"output.classes is {str(classes)[:80]}; expected a list of at least 2 distinct class names")
    if problems:
        raise DataError(f"{path} is damaged:\n  - " + "\n  - ".join(problems) + "\nrestore the run's own manifest.json or re-export the run")
    return (size[0], size[1]), v2.InterpolationMode(interpolation), antialias, classes


def _read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; give the folder of a finished run (runs/<name>) or its model/ folder") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); re-export the run or restore the file") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a {type(manifest).__name__}, not a manifest; restore the run's own manifest.json")
    missing = [key for key in ("input", "output", "files") if not isinstance(manifest.get(key), dict)]
    if missing:
        raise DataError(
            f"{path} has no {', '.join(repr(k) for k in missing)} section: it was written by a fedhead older than "
            "the ONNX export, so it does not say what the model takes; rerun the training to get a model with a full manifest"
        )
    for key in ("onnx", "torch_export"):  # the model files are named inside the model folder, never elsewhere
        name = manifest["files"].get(key)
        if name and not (isinstance(name, str) and is_plain_name(name)):
            raise DataError(f"{path}: files.{key} is {name!r}; it must name a file in the model folder itself "
                            "(restore the run's own manifest.json)")
    return manifest


def _choose_engine(manifest: dict[str, Any], engine: str, model_dir: Path) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    files = manifest["files"]
    has_onnx = bool(files.get("onnx")) and (model_dir / str(files["onnx"])).is_file()
    has_pt2 = bool(files.get("torch_export")) and (model_dir / str(files["torch_export"])).is_file()
    try:
        import onnxruntime  # noqa: F401  (only whether it is installed)

        have_runtime = True
    except ImportError:
        have_runtime = False
    if engine == "onnx":
        if not has_onnx:
            raise DataError(f"{model_dir} holds no model.onnx (see the manifest's 'errors'); use --engine torch")
        if not have_runtime:
            raise ConfigError("--engine onnx needs onnxruntime: pip install onnxruntime (or use --engine torch)")
        return "onnx"
    if engine == "auto" and has_onnx and have_runtime:
        return "onnx"
    if not has_pt2:
        raise DataError(f"{model_dir} holds neither a usable model.onnx nor model.pt2; the run's manifest lists why under 'errors'")
    return "torch"


def load_predictor(run_dir: Path, engine: str = "auto") -> Predictor:
    """The run's exported model (``RUN_DIR/model``, or a model folder itself), ready to predict."""
    model_dir = run_dir / "model" if (run_dir / "model" / "manifest.json").exists() else run_dir
    manifest = _read_manifest(model_dir)
    return Predictor(model_dir, manifest, _choose_engine(manifest, engine, model_dir))


def check_out_path(out: Path, images: list[Path], model_dir: Path) -> None:
    """DataError when the CSV would overwrite an image to classify, a file of the model, or is a folder."""
    target = out.resolve()
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a file name, e.g. --out {out / 'predictions.csv'}")
    if target.is_relative_to(model_dir.resolve()):
        raise DataError(f"--out {out} is inside the model folder {model_dir}; write the CSV elsewhere")
    if any(target == image.resolve() for image in images):
        raise DataError(f"--out {out} is one of the images to classify; write the CSV elsewhere")


@dataclass
class FoundImages:
    """What :func:`find_images` found: the image files in order, the files ignored, and those of the image files
    a folder listing already found DICOM's marker in (:func:`predict` reads them as DICOM without looking again)."""

    paths: list[Path]
    ignored: list[Path]
    dicom: frozenset[Path]


def find_images(targets: Iterable[Path]) -> FoundImages:
    """Each file named, and under each folder named (recursively, sorted) the image files; the folders' other
    files are ignored (:mod:`common.image_files`), hidden ones quietly."""
    paths: list[Path] = []
    dicom: set[Path] = set()
    ignored: list[Path] = []
    for target in targets:
        if target.is_dir():
            files = list_image_files(target)
            paths += files.images
            dicom |= files.dicom
            ignored += files.ignored
        elif target.is_file():
            paths.append(target)
        else:
            raise DataError(f"'{target}' is neither an image file nor a folder; check the path")
    return FoundImages(paths, ignored, frozenset(dicom))


def image_paths(targets: Iterable[Path]) -> list[Path]:
    """:func:`find_images`' image files."""
    return find_images(targets).paths


def predict(
    predictor: Predictor, paths: Sequence[Path], *, top_k: int = 3, batch_size: int = 64, dicom: Collection[Path] = frozenset(),
) -> list[Prediction]:
    """Each image's top ``top_k`` classes with probabilities (softmax of the logits), in ``paths``' order.

    An unreadable image gets a row with the reason instead; a progress bar (or
    a log line every 10 s) shows the images done. The files in ``dicom`` (a
    :class:`FoundImages`' own) are read as DICOM without looking for its marker again.
    """
    k = max(1, min(top_k, len(predictor.classes)))
    results: list[Prediction | None] = [None] * len(paths)
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        probabilities = predictor.logits(torch.stack([row for _, row in pending])).softmax(dim=1)
        values, indices = probabilities.topk(k, dim=1)
        for (i, _), vals, idx in zip(pending, values.tolist(), indices.tolist()):
            results[i] = Prediction(str(paths[i]), [(predictor.classes[c], v) for c, v in zip(idx, vals)])
        progress.advance(len(pending))
        pending.clear()

    with ProgressReporter(len(paths), "predict", logger=log) as progress:
        for i, path in enumerate(paths):
            try:
                pending.append((i, predictor.prepare(read_image(path, dicom=path in dicom)[0])))
            except UnreadableImageError as exc:
                results[i] = Prediction(str(path), [], exc.reason)
                progress.advance(1)
            if len(pending) == batch_size:
                flush()
        flush()
    return [r for r in results if r is not None]


def write_predictions(predictions: list[Prediction], out: Path) -> Path:
    """``path,class,probability,top_k,error`` per image; top_k as ``class=probability`` pairs separated by ``;``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "probability", "top_k", "error"])
        for p in predictions:
            best, prob = (p.top[0][0], f"{p.top[0][1]:.6f}") if p.top else ("", "")
            writer.writerow([p.path, best, prob, ";".join(f"{c}={v:.6f}" for c, v in p.top), p.error])
    return out
